"""Read a per-token timeline folder (mlx_backend/timeline.py) and print where each token's time went.

    python tests/benchmarks/timeline.py DIR [DIR ...]     # one table per folder

Every process wrote its own `<role>-<pid>.jsonl` (engine, gateway, client). Frames are joined on
(request id, tokens so far): the engine's E to the gateway's R; a gateway text event H covers every frame
up to its token count (several when deltas waited and were merged); the client's C joins H on (request
id, text event index). Requests are split by how they were asked (Q: streamed or not). Figures are
microseconds, median and 90th percentile over every token (or event) of that kind.
"""

from __future__ import annotations

import bisect
import itertools
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

STAGES: list[tuple[str, str]] = [
    ("engine ITL", "engine: one token's sampled time to the next's, per request"),
    ("engine: sent -> next sampled", "end of one frame write to the next token (device wait + loop)"),
    ("engine: sent -> launched", "solo: loop, next step's graph built and queued"),
    ("engine: launched -> sampled", "solo: waiting for the device (token.item())"),
    ("engine: sampled -> emitted", "detokenize, stops, the event built"),
    ("engine: emitted -> sent", "held until the step's end, then sendall"),
    ("engine: sendall", "the write itself"),
    ("IPC: sent -> gateway read", "socket, gateway wake-up, read and decode"),
    ("gateway: read -> handed to HTTP", "queue hop, exchange, SSE encode (streamed only)"),
    ("HTTP: send call", "Litestar + Granian's send, until our generator resumes"),
    ("HTTP: handed -> client read", "Granian writes, TCP, the client reads"),
    ("sampled -> client read", "the whole way, per event (its last token)"),
    ("client ITL", "between text events at the client, per request"),
    ("TTFT: client sent -> admitted", "streamed: connection, HTTP, Litestar, guards, body decode, admission"),
    ("TTFT: admitted -> first sampled", "streamed: Generate to the engine, its queue, prefill, the first step"),
    ("TTFT: first sampled -> client read", "streamed: the first token's way to the client"),
    ("gateway: last read -> body ready", "non-streamed: the fold's end"),
    ("client: body ready -> read", "non-streamed: the body's way to the client"),
]


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (q / 100) * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def load(folder: Path) -> dict[str, list[list[Any]]]:
    records: dict[str, list[list[Any]]] = defaultdict(list)
    for path in sorted(folder.glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            if line.strip():
                row = json.loads(line)
                records[row[0]].append(row[1:])
    return records


def analyze(folder: Path | dict[str, list[list[Any]]], only: set[str] | None = None
            ) -> dict[str, dict[str, list[float]]]:
    """{mode: {stage: [microseconds, ...]}} with mode "stream" or "whole", over the requests in `only`
    (default: all); `folder` may be what `load` returned."""
    r = load(folder) if isinstance(folder, Path) else folder
    mode = {rid: ("stream" if stream else "whole") for rid, stream, _ in r.get("Q", [])
            if only is None or rid in only}
    out: dict[str, dict[str, list[float]]] = {"stream": defaultdict(list), "whole": defaultdict(list)}
    frames: dict[str, list[list[Any]]] = defaultdict(list)
    for rid, cum, n, launched, sampled, emitted, begin, end in r.get("E", []):
        frames[rid].append([cum, n, sampled, emitted, begin, end, launched])
    received = {(rid, cum): t for rid, cum, _n, t in r.get("R", [])}
    handed: dict[str, list[list[Any]]] = defaultdict(list)
    for rid, k, cum, t_hand, t_back in r.get("H", []):
        handed[rid].append([cum, k, t_hand, t_back])
    client = {(rid, k): t for rid, k, t in r.get("C", [])}
    client_times: dict[str, list[int]] = defaultdict(list)
    for rid, _k, t in r.get("C", []):
        client_times[rid].append(t)
    ends = {rid: (sent, done) for rid, _stream, sent, done in r.get("Z", [])}
    admitted = {rid: t for rid, _stream, t in r.get("Q", [])}
    done_at = {rid: t for rid, t in r.get("D", [])}
    us = 1e-3
    for rid, rows in frames.items():
        kind = mode.get(rid)
        if kind is None:
            continue
        stage = out[kind]
        rows.sort()
        events = sorted(handed.get(rid, []))
        cums = [e[0] for e in events]
        frame_cums = [f[0] for f in rows]
        last_read = None
        for i, (cum, n, sampled, emitted, begin, end, launched) in enumerate(rows):
            if i:
                prev = rows[i - 1]
                stage["engine ITL"].append((sampled - prev[2]) * us / max(1, n))
                stage["engine: sent -> next sampled"].append((sampled - prev[5]) * us)
                if launched:  # the solo path: this token's wait began after the previous frame went out
                    stage["engine: sent -> launched"].append((launched - prev[5]) * us)
                    stage["engine: launched -> sampled"].append((sampled - launched) * us)
            stage["engine: sampled -> emitted"].append((emitted - sampled) * us)
            stage["engine: emitted -> sent"].append((end - emitted) * us)
            stage["engine: sendall"].append((end - begin) * us)
            got = received.get((rid, cum))
            if got is None:
                continue
            last_read = got
            stage["IPC: sent -> gateway read"].append((got - end) * us)
            j = bisect.bisect_left(cums, cum)
            if j < len(events):
                stage["gateway: read -> handed to HTTP"].append((events[j][2] - got) * us)
        for cum, k, t_hand, t_back in events:
            stage["HTTP: send call"].append((t_back - t_hand) * us)
            seen = client.get((rid, k))
            if seen is not None:
                stage["HTTP: handed -> client read"].append((seen - t_hand) * us)
                idx = bisect.bisect_left(frame_cums, cum)
                if idx < len(rows) and rows[idx][0] == cum:
                    stage["sampled -> client read"].append((seen - rows[idx][2]) * us)
        stage["merged events"].append(sum(1 for i, e in enumerate(events) if e[0] - (events[i - 1][0] if i else 0) > 1))
        stage["events"].append(len(events))
        stage["client ITL"].extend((b - a) * us for a, b in itertools.pairwise(sorted(client_times[rid])))
        if kind == "whole" and rid in done_at:
            if last_read is not None:
                stage["gateway: last read -> body ready"].append((done_at[rid] - last_read) * us)
            if rid in ends:
                stage["client: body ready -> read"].append((ends[rid][1] - done_at[rid]) * us)
        if kind == "stream" and rid in ends and rid in admitted and rows:  # where the first token's wait went
            stage["TTFT: client sent -> admitted"].append((admitted[rid] - ends[rid][0]) * us)
            stage["TTFT: admitted -> first sampled"].append((rows[0][2] - admitted[rid]) * us)
            if client_times.get(rid):
                stage["TTFT: first sampled -> client read"].append((min(client_times[rid]) - rows[0][2]) * us)
        if rid in ends and rows:
            sent, done = ends[rid]
            tokens = rows[-1][0]
            stage["request ms"].append((done - sent) * 1e-6)
            stage["request ms/token"].append((done - sent) * 1e-6 / max(1, tokens))
    return out


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}"


def table(result: dict[str, dict[str, list[float]]]) -> str:
    modes = [m for m in ("stream", "whole") if result[m].get("engine ITL")]
    header = ["stage (µs)", *[f"{m} {q}" for m in modes for q in ("p50", "p90")], "what it is"]
    rows = []
    for name, meaning in STAGES:
        cells = []
        for m in modes:
            values = result[m].get(name, [])
            cells += [_fmt(_pct(values, 50)), _fmt(_pct(values, 90))]
        if any(c != "-" for c in cells):
            rows.append([name, *cells, meaning])
    for m in modes:
        per = result[m]
        if per.get("request ms"):
            rows.append([f"{m}: request ms (median of {len(per['request ms'])})", *[""] * (2 * len(modes)),
                         f"{_fmt(_pct(per['request ms'], 50))} ms, "
                         f"{_pct(per['request ms/token'], 50) or 0:.3f} ms/token"])
        if per.get("events"):
            rows.append([f"{m}: merged events", *[""] * (2 * len(modes)),
                         f"{sum(per['merged events'])} of {sum(per['events'])} text events carried >1 token"])
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i in (0, len(row) - 1) else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def summary(result: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Median and p90 of every stage, for JSON reports."""
    return {m: {k: {"p50": _pct(v, 50), "p90": _pct(v, 90), "n": float(len(v))} for k, v in per.items()}
            for m, per in result.items()}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for folder in map(Path, argv):
        print(f"## {folder}")
        print(table(analyze(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
