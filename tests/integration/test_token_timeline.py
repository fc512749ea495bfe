"""The per-token timeline through a real server: `--trace-tokens DIR` makes the engine and the gateway each
write their records, and every token of a streamed and a non-streamed request can be followed from the
engine's sampling to the HTTP layer (tests/benchmarks/timeline.py joins them)."""

from __future__ import annotations

import json
import signal
from collections import defaultdict
from pathlib import Path

import httpx

from tests.benchmarks import timeline as analysis
from tests.integration.conftest import StartServer


def test_every_token_is_followed_from_the_engine_to_the_http_layer(
    start_server: StartServer, models_dir: Path, tmp_path: Path
) -> None:
    trace = tmp_path / "trace"
    server = start_server("--models-dir", str(models_dir), "--trace-tokens", str(trace))
    server.wait_ready()
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 24, "temperature": 0}
    texts = 0
    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            streamed = response.headers["x-request-id"]
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    delta = json.loads(line[6:])["choices"][:1]
                    texts += bool(delta and delta[0]["delta"].get("content"))
        whole = client.post("/v1/chat/completions", json=body)
        folded = whole.headers["x-request-id"]
        tokens = whole.json()["usage"]["completion_tokens"]
    server.signal(signal.SIGTERM)  # the records are written at exit
    assert server.wait_exit(30) == 0

    records = analysis.load(trace)
    assert {p.name.split("-")[0] for p in trace.glob("*.jsonl")} == {"engine", "gateway"}
    assert sorted((rid, stream) for rid, stream, _ in records["Q"]) == sorted([(streamed, 1), (folded, 0)])
    frames = defaultdict(list)
    for rid, cum, _n, _launched, sampled, emitted, begin, end in records["E"]:
        frames[rid].append(cum)
        assert sampled <= emitted <= begin <= end
    received = {(rid, cum) for rid, cum, _n, _t in records["R"]}
    assert {(rid, cum) for rid, cums in frames.items() for cum in cums} == received  # every frame read
    assert max(frames[folded]) == tokens
    handed = [row for row in records["H"] if row[0] == streamed]
    assert [k for _rid, k, *_ in handed] == list(range(texts))  # one record per text event sent
    assert [rid for rid, _t in records["D"]] == [folded]
    result = analysis.analyze(records)
    assert len(result["stream"]["engine: sampled -> emitted"]) == len(frames[streamed])
    assert len(result["stream"]["gateway: read -> handed to HTTP"]) == len(frames[streamed])
    assert len(result["whole"]["gateway: last read -> body ready"]) == 1
