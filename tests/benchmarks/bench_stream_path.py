"""Streamed against non-streamed through the whole gateway, per token: where the time goes (issue 14).

    # the gateway + Granian path alone, with the paced stand-in engine (no MLX), a token every 1/2/3 ms
    python tests/benchmarks/bench_stream_path.py --engine paced --step-ms 1,2,3 --tokens 512 --repeats 3
    # with the per-token timeline, and pinned apart
    python tests/benchmarks/bench_stream_path.py --engine paced --step-ms 2 --trace --affinity none,split
    # the real engine on a model folder (what tests/benchmarks/gpu_session.sh runs on a GPU)
    python tests/benchmarks/bench_stream_path.py --engine mlx --model DIR --tokens 512 --trace

For every server configuration (engine pace x frames x timeline x affinity) it starts a gateway, warms it
up, then for each concurrency runs each mode (streamed, whole) --repeats times, interleaved; each level
is `c` clients (tests/benchmarks/raw_client.py) sending --per-client requests each. Per level it reads
the scheduler figures of every gateway and engine thread (/proc schedstat: CPU time, run-queue wait,
switches, migrations). With --trace the gateway runs with --trace-tokens, the client's stamps join the
engine's and the gateway's, and the timeline table is printed per concurrency (tests/benchmarks/timeline.py).
Every child is in its own process group and is stopped on exit; every wait has a deadline.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import procstat
import raw_client
import timeline as tl
from bench_common import cpu_model, percentile
from bench_load import summarize_probe
from bench_servers import REPO_ROOT, free_port, spawn, stop, stop_all

HERE = Path(__file__).resolve().parent
DEMO_ID = "mlx-gateway-demo"
ALLOWED = os.sched_getaffinity(0)  # restored after a pinned configuration


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def words(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--engine", choices=["paced", "mlx"], default="paced")
    p.add_argument("--model", type=Path, help="--engine mlx: the model folder (served under its folder name)")
    p.add_argument("--step-ms", type=floats, default=floats("2"), help="paced: milliseconds per step (list)")
    p.add_argument("--cpu-us", type=floats, default=floats("0"),
                   help="paced: busy CPU microseconds per step, hidden behind the step in flight (list)")
    p.add_argument("--wait", choices=["sleep", "spin"], default="sleep", help="paced: how a step waits")
    p.add_argument("--frames", type=words, default=words("step"),
                   help="paced: 'step' (one sendall per step) and/or 'event' (one per frame, as before)")
    p.add_argument("--tokens", type=ints, default=ints("512"),
                   help="new tokens per request: one value, or one per --concurrency level")
    p.add_argument("--concurrency", type=ints, default=ints("1"))
    p.add_argument("--per-client", type=int, default=1, help="requests each client sends in turn, per level")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--modes", type=words, default=words("stream,whole"))
    p.add_argument("--trace", type=words, default=words("off"), nargs="?", const=words("on"),
                   help="timeline: on, off, or both ('on,off')")
    p.add_argument("--affinity", type=words, default=words("none"),
                   help="none, and/or split (the gateway's --engine-cpus: the engine on a quarter of the cores)")
    p.add_argument("--client-processes", type=int, default=1)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds for one level")
    p.add_argument("--startup-timeout", type=float, default=180.0)
    p.add_argument("--gateway-args", default="", help="extra `mlx-gateway serve` arguments")
    p.add_argument("--repo", type=Path, default=REPO_ROOT,
                   help="the gateway code to run (another revision: `git archive REV | tar -x -C DIR`)")
    p.add_argument("--health", action="store_true",
                   help="probe /health every 75 ms from a process of its own while each level runs")
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="JSON of every figure (and .md beside it)")
    args = p.parse_args(argv)
    if args.engine == "mlx" and not args.model:
        p.error("--engine mlx needs --model")
    if len(args.tokens) not in (1, len(args.concurrency)):
        p.error("--tokens takes one value or one per --concurrency level")
    args.tokens_at = dict(zip(args.concurrency, args.tokens * len(args.concurrency), strict=False))
    if args.engine == "mlx":
        args.step_ms, args.frames, args.cpu_us = [0.0], ["step"], [0.0]
    if args.work_dir is None:
        args.work_dir = Path("/tmp/mlx-gateway-bench") / f"stream-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


# --- placement -------------------------------------------------------------------------------------


def split_cpus() -> dict[str, set[int]]:
    """The engine on the first quarter of the physical cores (at least one), passed to the gateway as
    --engine-cpus (which puts the gateway on the rest); the client on the last quarter when there are
    four cores or more, else with the gateway."""
    cores = procstat.physical_cores()
    n = len(cores)
    quarter = max(1, n // 4)
    flat = lambda groups: {c for g in groups for c in g}  # noqa: E731
    engine = flat(cores[:quarter])
    client = flat(cores[-quarter:]) if n >= 4 else flat(cores[quarter:])
    return {"engine": engine, "gateway": flat(cores) - engine, "client": client}


# --- one server ------------------------------------------------------------------------------------


class Gateway:
    def __init__(self, args: argparse.Namespace, label: str, env: dict[str, str], trace_dir: Path | None,
                 engine_cpus: set[int] | None) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.label = label
        self.log_path = args.work_dir / f"gateway-{label}.log"
        serve_args = ["--host", "127.0.0.1", "--port", str(self.port), "--no-hf-cache", "--prompt-cache-gb", "0",
                      "--max-running", str(max(max(args.concurrency), 1)), "--max-queue", "256",
                      "--max-tokens-default", str(max(args.tokens))]
        if trace_dir is not None:
            serve_args += ["--trace-tokens", str(trace_dir)]
        if engine_cpus:
            serve_args += ["--engine-cpus", ",".join(map(str, sorted(engine_cpus)))]
        if args.engine == "mlx":
            serve_args += ["--models-dir", str(args.model.resolve().parent)]
            argv = [sys.executable, "-m", "gateway.cli", "serve", *serve_args]
            self.model = args.model.resolve().name
        else:
            argv = [sys.executable, str(args.repo.resolve() / "tests" / "benchmarks" / "paced_gateway.py"), *serve_args]
            self.model = DEMO_ID
        argv += shlex.split(args.gateway_args)
        self.argv = argv
        self.proc = spawn(argv, self.log_path, {"PYTHONPATH": str(args.repo.resolve()), **env})
        self.engine_pid = 0

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = ""
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the gateway exited ({self.proc.returncode}); see {self.log_path}")
                with contextlib.suppress(httpx.HTTPError):
                    response = client.get(self.base + "/health")
                    last = response.text[:200]
                    if response.status_code == 200:
                        self.engine_pid = int(response.json()["engine"]["pid"])
                        return
                time.sleep(0.2)
        raise RuntimeError(f"the gateway was not ready in {timeout_s:.0f}s (last: {last}); see {self.log_path}")

    def body(self, stream: bool, tokens: int, index: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": tokens, "temperature": 0, "stream": stream,
                                "messages": [{"role": "user", "content": f"Count for me, request {index}."}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def stop(self) -> int | None:
        return stop(self.proc, grace_s=20.0)


# --- levels ----------------------------------------------------------------------------------------


def run_level(gw: Gateway, args: argparse.Namespace, stream: bool, concurrency: int, first: int) -> dict[str, Any]:
    total = concurrency * args.per_client
    bodies = [gw.body(stream, args.tokens_at[concurrency], first + i) for i in range(total)]
    pids = {"gateway": gw.proc.pid, "engine": gw.engine_pid}
    prober = HealthProber(gw, args.work_dir / f"health-{gw.label}-c{concurrency}-{first}.json") if args.health else None
    before = {k: procstat.snapshot(pid) for k, pid in pids.items()}
    started = time.monotonic_ns()
    results = raw_client.run("127.0.0.1", gw.port, bodies, concurrency, args.per_client, args.timeout,
                             args.client_processes)
    wall_s = (time.monotonic_ns() - started) / 1e9
    after = {k: procstat.snapshot(pid) for k, pid in pids.items()}
    health = prober.finish() if prober is not None else {}
    ok = [r for r in results if r.ok]
    tokens = sum(r.tokens for r in ok)
    per_token = [(r.done_ns - r.sent_ns) / 1e6 / r.tokens for r in ok]
    itl = [(b - a) / 1e3 for r in ok for a, b in itertools.pairwise(r.events)]
    ttft = [(r.first_ns - r.sent_ns) / 1e6 for r in ok if r.first_ns]
    level: dict[str, Any] = {
        "mode": "stream" if stream else "whole", "concurrency": concurrency, "requests": len(results),
        "ok": len(ok), "errors": sorted({r.error[:120] for r in results if not r.ok})[:3], "tokens": tokens,
        "wall_s": wall_s, "tok_s": tokens / wall_s if wall_s else 0.0,
        "ms_per_token_p50": percentile(per_token, 50), "request_s_p50": percentile(
            [(r.done_ns - r.sent_ns) / 1e9 for r in ok], 50),
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p95": percentile(ttft, 95),
        "health_p99_ms": health["p99_s"] * 1e3 if health.get("p99_s") is not None else None,
        "health_errors": health.get("errors"), "client_itl_us_p50": percentile(itl, 50),
        "client_itl_us_p90": percentile(itl, 90), "events_per_token": (
            sum(len(r.events) for r in ok) / tokens if stream and tokens else None),
        "rids": [r.rid for r in results],
        "client": [[r.rid, int(r.stream), r.sent_ns, r.done_ns, r.events] for r in results],
    }
    events = sum(len(r.events) for r in ok)
    level["events_s"] = events / wall_s if stream and wall_s else None
    for role, pid in pids.items():
        groups = procstat.delta(before[role], after[role], main_tid=pid)
        level[role] = {name: vars(stat) for name, stat in groups.items()}
        if tokens:
            everything, main = groups["all"], groups.get("main", procstat.ThreadStat())
            level[f"{role}_cpu_us_per_token"] = everything.cpu_ns / 1e3 / tokens
            level[f"{role}_cpu_share"] = everything.cpu_ns / 1e9 / wall_s  # cores busy, on average
            if stream and events:
                level[f"{role}_cpu_us_per_event"] = everything.cpu_ns / 1e3 / events
            level[f"{role}_main_cpu_us_per_token"] = main.cpu_ns / 1e3 / tokens
            level[f"{role}_main_runqueue_us_per_token"] = main.runqueue_ns / 1e3 / tokens
            level[f"{role}_main_involuntary_per_100"] = 100 * main.involuntary / tokens
            level[f"{role}_main_migrations_per_100"] = 100 * main.migrations / tokens
            # The rest of the wall time the main thread spent blocked (the device, a socket, a sleep).
            level[f"{role}_main_blocked_us_per_token"] = (
                wall_s * 1e9 - main.cpu_ns - main.runqueue_ns) / 1e3 / tokens
    return level


class HealthProber:
    """bench_load.py's /health prober in a process of its own for one level (the load starts once it has had
    its first answer); `finish` stops it and returns its summary (p50_s, p99_s, max_s, errors)."""

    def __init__(self, gw: Gateway, out: Path) -> None:
        self.out = out
        ready = out.with_suffix(".ready")
        self.proc = spawn([sys.executable, str(HERE / "bench_load.py"), "probe", "--url", gw.base + "/health",
                           "--out", str(out), "--ready-file", str(ready)], out.with_suffix(".log"))
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.05)

    def finish(self) -> dict[str, Any]:
        stop(self.proc, grace_s=10.0)
        return summarize_probe(self.out)


def write_client_timeline(trace_dir: Path, level: dict[str, Any]) -> None:
    with (trace_dir / f"client-{os.getpid()}.jsonl").open("a") as out:
        for rid, stream, sent, done, events in level["client"]:
            out.write(json.dumps(["Z", rid, stream, sent, done]) + "\n")
            for k, t in enumerate(events):
                out.write(json.dumps(["C", rid, k, t]) + "\n")


def run_config(args: argparse.Namespace, config: dict[str, Any], index: int, reports: list[dict[str, Any]]) -> None:
    """One gateway configuration, its report added to `reports` at once (a run cut short keeps it)."""
    label = "-".join(f"{k}{v}" for k, v in config.items() if k != "engine")
    env: dict[str, str] = {}
    if args.engine == "paced":
        env = {"PACED_STEP_MS": str(config["step_ms"]), "PACED_CPU_US": str(config["cpu_us"]),
               "PACED_WAIT": args.wait, "PACED_FRAMES": config["frames"]}
    trace_dir = args.work_dir / f"trace-{label}" if config["trace"] == "on" else None
    report: dict[str, Any] = {"config": config, "label": label, "levels": [], "notes": []}
    reports.append(report)
    pinned = split_cpus() if config["affinity"] == "split" else {}
    log(f"[{label}] starting the gateway" + (f"; CPUs {({k: sorted(v) for k, v in pinned.items()})}" if pinned else ""))
    gw = Gateway(args, label, env, trace_dir, pinned.get("engine"))
    report["argv"] = gw.argv
    try:
        gw.wait_ready(args.startup_timeout)
        if pinned:
            os.sched_setaffinity(0, pinned["client"])
        for mode in args.modes:  # warm-up: model load, first kernels, both paths (not measured)
            raw_client.run("127.0.0.1", gw.port, [gw.body(mode == "stream", min(max(args.tokens), 64), -1)], 1, 1,
                           args.startup_timeout)
        first = 1000 * (index + 1)
        for concurrency in args.concurrency:
            if concurrency > 1:  # one unmeasured round at this batch size
                raw_client.run("127.0.0.1", gw.port, [gw.body(True, 16, -2)] * concurrency, concurrency, 1,
                               args.timeout, args.client_processes)
            for repeat in range(args.repeats):
                for mode in args.modes:
                    level = run_level(gw, args, mode == "stream", concurrency, first)
                    first += concurrency * args.per_client
                    level["repeat"] = repeat
                    report["levels"].append(level)
                    if trace_dir is not None:
                        write_client_timeline(trace_dir, level)
                    log(f"[{label}] c={concurrency} {level['mode']} #{repeat}: {level['ok']}/{level['requests']} ok, "
                        f"{fmt(level['ms_per_token_p50'], 3)} ms/token, {level['tok_s']:.0f} tok/s, "
                        f"gateway {fmt(level.get('gateway_cpu_us_per_token'))} µs CPU/token, engine main "
                        f"run-queue {fmt(level.get('engine_main_runqueue_us_per_token'))} µs/token"
                        + (f"; errors {level['errors']}" if level["errors"] else ""))
    except (RuntimeError, OSError) as exc:
        report["error"] = str(exc)
        log(f"[{label}] {exc}")
    except KeyboardInterrupt:  # cut short: keep the levels done and their timeline, then stop everything
        report["interrupted"] = True
    finally:
        os.sched_setaffinity(0, ALLOWED)
        report["exit_code"] = gw.stop()
        report["pinned"] = {k: sorted(v) for k, v in pinned.items()}
    if trace_dir is not None and trace_dir.is_dir():
        records = tl.load(trace_dir)
        report["timeline"] = {}
        for concurrency in args.concurrency:
            rids = {rid for lv in report["levels"] if lv["concurrency"] == concurrency for rid in lv["rids"]}
            result = tl.analyze(records, rids)
            report["timeline"][str(concurrency)] = tl.summary(result)
            print(f"\n### timeline {label}, c={concurrency}\n{tl.table(result)}\n", flush=True)
    if report.get("interrupted"):
        raise KeyboardInterrupt


# --- report ----------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


COLUMNS = [
    ("config", None), ("c", "concurrency"), ("mode", "mode"), ("ok", "ok"), ("ms/token", "ms_per_token_p50"),
    ("tok/s", "tok_s"), ("client ITL p50 µs", "client_itl_us_p50"), ("ITL p90 µs", "client_itl_us_p90"),
    ("events/token", "events_per_token"), ("events/s", "events_s"), ("TTFT p50 ms", "ttft_ms_p50"),
    ("/health p99 ms", "health_p99_ms"), ("gateway cores busy", "gateway_cpu_share"),
    ("gateway CPU µs/event", "gateway_cpu_us_per_event"), ("gateway CPU µs/token", "gateway_cpu_us_per_token"),
    ("gw main µs/token", "gateway_main_cpu_us_per_token"), ("engine CPU µs/token", "engine_cpu_us_per_token"),
    ("engine main run-queue µs/token", "engine_main_runqueue_us_per_token"),
    ("engine main CPU µs/token", "engine_main_cpu_us_per_token"),
    ("engine main blocked µs/token", "engine_main_blocked_us_per_token"),
    ("engine main preempted /100 tok", "engine_main_involuntary_per_100"),
    ("engine main migrations /100 tok", "engine_main_migrations_per_100"),
]


def median_rows(reports: list[dict[str, Any]]) -> list[list[str]]:
    """One row per (config, c, mode): the median over repeats of each figure."""
    rows = []
    for report in reports:
        keys = sorted({(lv["concurrency"], lv["mode"]) for lv in report["levels"]},
                      key=lambda k: (k[0], k[1] != "stream"))
        for concurrency, mode in keys:
            levels = [lv for lv in report["levels"] if lv["concurrency"] == concurrency and lv["mode"] == mode]
            row = [report["label"]]
            for title, key in COLUMNS[1:]:
                values = [lv.get(key) for lv in levels]
                if key in ("concurrency", "mode"):
                    row.append(str(values[0]))
                elif key == "ok":
                    row.append(f"{sum(lv['ok'] for lv in levels)}/{sum(lv['requests'] for lv in levels)}")
                else:
                    numbers = [v for v in values if isinstance(v, int | float)]
                    digits = 3 if title == "ms/token" else 2 if title in ("events/token", "gateway cores busy") else 1
                    row.append(fmt(percentile(numbers, 50), digits) if numbers else "-")
            rows.append(row)
    return rows


def markdown(rows: list[list[str]]) -> str:
    header = [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write(args: argparse.Namespace, result: dict[str, Any]) -> str:
    """result.json and result.md in the work dir (and --out); returns the markdown table."""
    table = markdown(median_rows(result["configs"]))
    slim = {**result, "configs": [{**r, "levels": [{k: v for k, v in lv.items() if k not in ("client", "rids")}
                                                    for lv in r["levels"]]} for r in result["configs"]]}
    document = json.dumps(slim, indent=1, default=str)
    (args.work_dir / "result.json").write_text(document)
    (args.work_dir / "result.md").write_text(table + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(document)
        args.out.with_suffix(".md").write_text(table + "\n")
    return table


def environment() -> dict[str, Any]:
    cpu = cpu_model()
    return {"cpu": cpu, "cpus": os.cpu_count(), "allowed": sorted(os.sched_getaffinity(0)),
            "cores": procstat.physical_cores(), "platform": platform.platform(), "python": platform.python_version(),
            "loadavg": os.getloadavg()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)

    def on_sigterm(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    started = time.monotonic()
    result: dict[str, Any] = {"command": shlex.join(sys.argv), "environment": environment(), "configs": []}
    log(f"work dir {args.work_dir}; {result['environment']}")
    configs = [dict(engine=args.engine, step_ms=s, cpu_us=u, frames=f, trace=t, affinity=a)
               for s in args.step_ms for u in args.cpu_us for f in args.frames for t in args.trace
               for a in args.affinity]
    try:
        for index, config in enumerate(configs):
            run_config(args, config, index, result["configs"])
            write(args, result)  # so far: a run cut short keeps what finished
    except KeyboardInterrupt:
        result["interrupted"] = True
        log("interrupted; reporting what finished")
    finally:
        stop_all()
    result["duration_s"] = time.monotonic() - started
    print(write(args, result), flush=True)
    log(f"done in {result['duration_s']:.0f}s; {args.work_dir}")
    return 1 if any(r.get("error") for r in result["configs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
