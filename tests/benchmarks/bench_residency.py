"""Model residency on a real server (issue 10): what a running stream feels while another model loads, and
what the first request after a load waits. Prints markdown tables.

  pause   A stream on a small model runs; a large model is loaded beside it (by a 1-token request, which
          any version of the server understands, or through the admin API). Every SSE chunk's arrival is
          recorded; the table compares the gaps between chunks before, during and after the load. The
          longest gap during the load is the pause the load caused.
  ttft    For one model (`--shape` or `--model`): a fresh server loads it through the admin API (the call
          returns when the model is ready), then two streaming requests are timed. With warm-up the first
          request should wait no longer than the second; `--compare` runs once more with
          `--no-model-warmup`, to show what the first request pays without it (kernel compilation on CUDA).

The server is `python -m gateway.cli serve` run from `--repo` (default: this checkout), so an export of
another revision can be measured the same way (`git archive REV | tar -x -C DIR`, then `--repo DIR`;
revisions without the admin API need `--trigger request`).

  python tests/benchmarks/bench_residency.py pause --stream-shape small --load-shape llama-3.2-1b
  python tests/benchmarks/bench_residency.py ttft --shape llama-3.2-1b --compare     # the GPU figure
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from bench_models import DEFAULT_MODEL_DIR, ensure_model

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def server(repo: Path, models_dir: Path, args: list[str], log: Path) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port), "--no-hf-cache",
             "--models-dir", str(models_dir), *args],
            cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"the server was not ready in 120s; see {log}")
                time.sleep(0.2)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def prompt_of(words: int, start: int = 0) -> str:
    """`words` words; a different `start` shares no prefix (no prefix-cache hit between the two)."""
    vocabulary = ["the", "model", "reads", "this", "prompt", "and", "answers", "with", "a", "long", "story",
                  "about", "water", "and", "light"]
    return " ".join(vocabulary[(start + i) % len(vocabulary)] for i in range(words))


def stream(url: str, model: str, prompt: str, max_tokens: int, arrivals: list[float] | None = None,
           stop: threading.Event | None = None) -> dict[str, Any]:
    """One streaming chat completion; the arrival time of every content chunk goes into `arrivals`."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    arrivals = arrivals if arrivals is not None else []
    started = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(900.0)) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                arrivals.append(time.monotonic())
            if stop is not None and stop.is_set():
                break
    return {"ttft_s": arrivals[0] - started if arrivals else None, "chunks": len(arrivals),
            "wall_s": time.monotonic() - started}


def admin(url: str, action: str, model: str) -> dict[str, Any]:
    r = httpx.post(f"{url}/admin/models/{action}", json={"model": model}, timeout=900.0)
    r.raise_for_status()
    return r.json()  # type: ignore[no-any-return]


def gaps_in(arrivals: list[float], start: float, end: float) -> list[float]:
    return [b - a for a, b in itertools.pairwise(arrivals) if start <= b and a <= end]


def row(name: str, gaps: list[float]) -> str:
    if not gaps:
        return f"| {name} | 0 | - | - | - |"
    ordered = sorted(gaps)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (f"| {name} | {len(gaps)} | {statistics.median(gaps) * 1000:.0f} | {p99 * 1000:.0f} | "
            f"{max(gaps) * 1000:.0f} |")


def cmd_pause(args: argparse.Namespace) -> None:
    stream_model = ensure_model(args.stream_shape, args.model_dir).name
    load_model = ensure_model(args.load_shape, args.model_dir).name
    warm_bytes = sum(f.stat().st_size for f in (args.model_dir / load_model).glob("*.safetensors"))
    log = args.work_dir / f"pause-{args.label}.log"
    with server(args.repo, args.model_dir, args.server_args.split(), log) as url:
        stream(url, stream_model, prompt_of(16), 4)  # the stream's model is loaded and warm
        if args.cold:  # drop the large model's pages so its files are read from disk (needs root)
            subprocess.run(["sh", "-c", "sync; echo 1 > /proc/sys/vm/drop_caches"], check=False)
        arrivals: list[float] = []
        stop = threading.Event()
        streamer = threading.Thread(target=stream, args=(url, stream_model, prompt_of(32), args.max_tokens,
                                                          arrivals, stop), daemon=True)
        streamer.start()
        time.sleep(args.before_s)
        load_started = time.monotonic()
        if args.trigger == "admin":
            admin(url, "load", load_model)
        else:
            stream(url, load_model, prompt_of(4), 1)
        load_ended = time.monotonic()
        time.sleep(args.after_s)
        stop.set()
        streamer.join(60)
    print(f"\n### Stream on `{stream_model}` while `{load_model}` ({warm_bytes / 1e9:.2f} GB) loads "
          f"({args.label}, trigger: {args.trigger})\n")
    print(f"load took {load_ended - load_started:.2f}s; server log: {log}\n")
    print("| phase | gaps | median ms | p99 ms | max ms |")
    print("| --- | --- | --- | --- | --- |")
    print(row("before the load", gaps_in(arrivals, 0, load_started)))
    print(row("during the load", gaps_in(arrivals, load_started, load_ended)))
    print(row("after the load", gaps_in(arrivals, load_ended, float("inf"))))
    during = sorted(((b - a, a - load_started) for a, b in itertools.pairwise(arrivals)
                     if load_started <= b and a <= load_ended), reverse=True)[:5]
    print("\nlongest gaps during the load: " + ", ".join(f"{g * 1000:.0f} ms at +{t:.1f}s" for g, t in during))


def cmd_ttft(args: argparse.Namespace) -> None:
    folder = Path(args.model) if args.model else ensure_model(args.shape, args.model_dir)
    models_dir, model = folder.parent, folder.name
    # Explicit both ways: the default warms up on a GPU only.
    runs = [("with warm-up", ["--model-warmup"])]
    if args.compare:
        runs.append(("without warm-up", ["--no-model-warmup"]))
    print(f"\n### First request after a load: `{model}`\n")
    print("| run | load s | warm-up s | 1st TTFT s | 2nd TTFT s | 1st wall s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, extra in runs:
        log = args.work_dir / f"ttft-{name.replace(' ', '-')}.log"
        with server(args.repo, models_dir, [*extra, *args.server_args.split()], log) as url:
            started = time.monotonic()
            described = admin(url, "load", model)
            load_s = time.monotonic() - started
            first = stream(url, model, prompt_of(args.prompt_words), args.max_tokens)
            second = stream(url, model, prompt_of(args.prompt_words, start=7), args.max_tokens)
        warm = described.get("warmup_s")
        print(f"| {name} | {load_s:.2f} | {warm if warm is not None else '-'} | {first['ttft_s']:.3f} | "
              f"{second['ttft_s']:.3f} | {first['wall_s']:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in (sub.add_parser("pause"), sub.add_parser("ttft")):
        command.add_argument("--repo", type=Path, default=REPO_ROOT, help="the checkout whose server runs")
        command.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
        command.add_argument("--work-dir", type=Path, default=Path("/tmp/mlx-gateway-bench/residency"))
        command.add_argument("--server-args", default="", help="more arguments for `serve`")
    pause = sub.choices["pause"]
    pause.add_argument("--stream-shape", default="small")
    pause.add_argument("--load-shape", default="llama-3.2-1b")
    pause.add_argument("--trigger", choices=("request", "admin"), default="request")
    pause.add_argument("--max-tokens", type=int, default=4000, help="the stream's length (ended early)")
    pause.add_argument("--before-s", type=float, default=3.0)
    pause.add_argument("--after-s", type=float, default=3.0)
    pause.add_argument("--cold", action="store_true", help="drop the page cache before the load (root only)")
    pause.add_argument("--label", default="this checkout")
    ttft = sub.choices["ttft"]
    ttft.add_argument("--shape", default="small")
    ttft.add_argument("--model", help="an existing model folder instead of a --shape")
    ttft.add_argument("--compare", action="store_true", help="also run without the warm-up")
    ttft.add_argument("--prompt-words", type=int, default=32)
    ttft.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    {"pause": cmd_pause, "ttft": cmd_ttft}[args.command](args)


if __name__ == "__main__":
    main()
