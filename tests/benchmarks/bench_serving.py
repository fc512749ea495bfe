"""Serving benchmark: the engine's ceiling without HTTP, then mlx_lm.server and mlx-gateway under the
same streaming load, one table. See docs/benchmarks.md for the commands and recorded results.

    python tests/benchmarks/bench_serving.py --shape small --servers mlx_lm,gateway \\
        --concurrency 1,8,32,64,256 --requests-per-client 2 --out /tmp/bench.md

Steps: (1) make or reuse a random-weight model of `--shape` outside the repo; (2) in a child process,
time `stream_generate` (one stream) and `batch_generate` (each batch size); (3) for each server in
turn (never two at once), start it on loopback, wait for /health, warm it with one request, then for
each concurrency level run one unmeasured round at that concurrency (as the ceiling warms up at each
batch size) and the streaming load while a separate process polls /health; stop it.
Every child is in its own process group and is killed on exit, error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import EOS_BIAS, cpu_model, make_prompt
from bench_load import client_processes_for, one_request, run_level_in_processes, summarize_probe
from bench_models import DEFAULT_MODEL_DIR, SHAPES, ensure_model
from bench_servers import REPO_ROOT, SERVERS, Server, free_port, server_spec, spawn, stop, stop_all

HERE = Path(__file__).resolve().parent
partial_reports: list[dict[str, Any]] = []  # a server's report, kept when an interrupt cuts its run short
LEVEL_STRIDE = 10_000  # prompt indexes per level: no request repeats a prompt from an earlier level


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    model = parser.add_argument_group("model")
    model.add_argument("--shape", choices=sorted(SHAPES), default="small")
    model.add_argument("--model", type=Path, help="benchmark this existing model folder instead of --shape")
    model.add_argument(
        "--model-dir",
        type=Path,
        default=DEFAULT_MODEL_DIR,
        help="where shape models are made and reused (the gateway's --models-dir)",
    )
    model.add_argument("--seed", type=int, default=0)
    load = parser.add_argument_group("load")
    load.add_argument(
        "--servers", default="mlx_lm,gateway", help=f"comma-separated, of: {', '.join(SERVERS)}"
    )
    load.add_argument("--concurrency", type=int_list, default=int_list("1,8,32,64,256"))
    load.add_argument("--requests-per-client", type=int, default=2)
    load.add_argument("--max-tokens", type=int, default=128)
    load.add_argument("--prompt-tokens", type=int, default=64, help="words of user text (one token each)")
    load.add_argument(
        "--eos",
        choices=["auto", "bias", "none"],
        default="auto",
        help="bias: send logit_bias against EOS so every request generates --max-tokens "
        "(costly: mlx-lm applies it row by row); auto: only if a lone stream stops early "
        "(the --shape models never emit EOS, see bench_models.silence_eos); none: never",
    )
    load.add_argument(
        "--level-timeout", type=float, default=300.0, help="seconds for one level, all requests"
    )
    load.add_argument("--read-timeout", type=float, default=120.0, help="seconds without a byte on a stream")
    load.add_argument("--health-interval-ms", type=float, default=75.0)
    load.add_argument("--pause", type=float, default=2.0, help="seconds of quiet between levels")
    load.add_argument(
        "--clients-per-process", type=int, default=16,
        help="load clients per load-generator process: one Python process reads ~3000 SSE events/s",
    )
    load.add_argument("--max-client-processes", type=int, default=4, help="cap on load-generator processes")
    load.add_argument(
        "--no-level-warmup", dest="level_warmup", action="store_false",
        help="skip the unmeasured round of min(c, --max-running) requests before each level (the ceiling "
        "warms up at each batch size; on CUDA, MLX compiles kernels for new batch shapes on first use)",
    )
    srv = parser.add_argument_group("servers")
    srv.add_argument(
        "--max-running", type=int, default=64, help="gateway --max-running (also caps batch sizes)"
    )
    srv.add_argument("--max-queue", type=int, default=256, help="gateway --max-queue")
    srv.add_argument("--startup-timeout", type=float, default=600.0)
    srv.add_argument("--mlx-lm-args", default="", help="extra arguments for mlx_lm.server (one string)")
    srv.add_argument("--gateway-args", default="", help="extra arguments for mlx-gateway serve (one string)")
    ceil = parser.add_argument_group("ceiling")
    ceil.add_argument(
        "--batch-sizes",
        type=int_list,
        default=None,
        help="batch_generate sizes (default: each concurrency level > 1, capped at --max-running)",
    )
    ceil.add_argument("--ceiling-repeats", type=int, default=3)
    ceil.add_argument("--ceiling-timeout", type=float, default=1800.0)
    ceil.add_argument("--skip-ceiling", action="store_true")
    out = parser.add_argument_group("output")
    out.add_argument("--work-dir", type=Path, default=None, help="logs and raw results (default: under /tmp)")
    out.add_argument("--out", type=Path, default=None, help="markdown table here, JSON beside it (.json)")
    out.add_argument("--repeat", type=int, default=1,
                     help="run the whole comparison this many times in a row (each with its own ceiling) and "
                     "print the median per level")
    out.add_argument("--merge", type=Path, nargs="+", default=None,
                     help="print the median table of results saved by earlier runs (their .json) and exit")
    args = parser.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for name in args.servers:
        if name not in SERVERS:
            parser.error(f"unknown server {name!r}")
    if args.batch_sizes is None:
        args.batch_sizes = sorted({min(c, args.max_running) for c in args.concurrency if c > 1})
    if args.work_dir is None:
        args.work_dir = Path("/tmp/mlx-gateway-bench") / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    return args


# --- steps -------------------------------------------------------------------------------------


def run_ceiling(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    out = args.work_dir / "ceiling.json"
    argv = [
        sys.executable,
        str(HERE / "bench_ceiling.py"),
        "--model",
        str(model),
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--max-tokens",
        str(args.max_tokens),
        "--batch-sizes",
        ",".join(map(str, args.batch_sizes)),
        "--repeats",
        str(args.ceiling_repeats),
        "--eos",
        args.eos,
        "--out",
        str(out),
    ]
    if args.skip_ceiling:
        argv.append("--prompt-only")
    log(f"ceiling: {shlex.join(argv[1:])}")
    proc = spawn(argv, args.work_dir / "ceiling.log")
    try:
        proc.wait(args.ceiling_timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise RuntimeError(
            f"the ceiling run took over {args.ceiling_timeout:.0f}s; see {args.work_dir}/ceiling.log"
        ) from None
    stop(proc)
    if proc.returncode != 0 or not out.is_file():
        tail = (args.work_dir / "ceiling.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the ceiling run failed ({proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def request_body(model_id: str, args: argparse.Namespace, eos_ids: list[int] | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model_id,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": args.max_tokens,
        "temperature": 0,
    }
    if eos_ids:
        body["logit_bias"] = {str(t): EOS_BIAS for t in eos_ids}
    return body


def run_server(
    name: str, index: int, args: argparse.Namespace, model: Path, ceiling: dict[str, Any]
) -> dict[str, Any]:
    port = free_port()
    extra = shlex.split(args.gateway_args if name == "gateway" else args.mlx_lm_args)
    spec = server_spec(
        name, model, port, max_running=args.max_running, max_queue=args.max_queue, extra_args=extra
    )
    server = Server(spec, port, args.work_dir / f"{name}.log")
    report: dict[str, Any] = {"server": name, "argv": spec.argv, "levels": [], "notes": []}
    log(f"{name}: starting: {shlex.join(spec.argv)}")
    server.start()
    try:
        report["startup_s"] = server.wait_ready(args.startup_timeout)
        log(f"{name}: ready in {report['startup_s']:.1f}s on {server.base_url}")

        eos_ids = ceiling["eos_ids"] if ceiling["eos_bias"] else None
        body = request_body(spec.model_id, args, eos_ids)
        warm_prompt = make_prompt(ceiling["words"], args.prompt_tokens, 10**8 + index)

        async def warm(b: dict[str, Any]) -> Any:
            import httpx

            timeout = httpx.Timeout(args.startup_timeout, connect=10.0)
            async with httpx.AsyncClient(timeout=timeout) as client:
                request = {**b, "messages": [{"role": "user", "content": warm_prompt}]}
                return await one_request(client, server.base_url + "/v1/chat/completions", request)

        started = time.perf_counter()
        warm_result = asyncio.run(warm(body))
        # A server may answer /health before its model is loaded: retry "not yet" answers until the deadline.
        while (
            warm_result.outcome != "ok"
            and warm_result.reason.startswith(("http_503", "http_429", "connect_error"))
            and time.perf_counter() - started < args.startup_timeout
            and server.alive()
        ):
            time.sleep(1.0)
            warm_result = asyncio.run(warm(body))
        if warm_result.outcome != "ok" and eos_ids and "logit_bias" in warm_result.reason:
            report["notes"].append(
                f"{name} refused logit_bias ({warm_result.reason[:120]}); sent without it, "
                "so its requests may stop at EOS before max_tokens"
            )
            body = request_body(spec.model_id, args, None)
            warm_result = asyncio.run(warm(body))
        report["warmup"] = {
            "outcome": warm_result.outcome,
            "reason": warm_result.reason,
            "tokens": warm_result.tokens,
            "s": time.perf_counter() - started,
        }
        if warm_result.outcome != "ok":
            raise RuntimeError(f"warm-up request failed: {warm_result.reason}\n{server.log_tail()}")
        log(f"{name}: warmed up ({warm_result.tokens} tokens in {report['warmup']['s']:.1f}s)")

        for level_index, concurrency in enumerate(args.concurrency):
            if not server.alive():
                report["notes"].append(
                    f"{name} exited (code {server.proc and server.proc.returncode}) "
                    f"before concurrency {concurrency}"
                )
                break
            report["levels"].append(
                run_one_level(server, args, body, ceiling, index, level_index, concurrency)
            )
            time.sleep(args.pause)
    except KeyboardInterrupt:
        report["notes"].append(f"{name}: interrupted")
        partial_reports.append(report)
        raise
    except RuntimeError as exc:
        report["error"] = str(exc)
        log(f"{name}: {exc}")
    finally:
        report["exit_code"] = server.stop()
        log(f"{name}: stopped (exit code {report['exit_code']})")
    return report


def run_one_level(
    server: Server,
    args: argparse.Namespace,
    body: dict[str, Any],
    ceiling: dict[str, Any],
    server_index: int,
    level_index: int,
    concurrency: int,
) -> dict[str, Any]:
    name = server.spec.name
    total = concurrency * args.requests_per_client
    first = (server_index * 100 + level_index + 1) * LEVEL_STRIDE
    prompts = [make_prompt(ceiling["words"], args.prompt_tokens, first + i) for i in range(total)]
    warmup_s = None
    if args.level_warmup:
        # As the ceiling does at each batch size: one unmeasured round, with prompts of its own.
        size = min(concurrency, args.max_running)
        warm_prompts = [make_prompt(ceiling["words"], args.prompt_tokens, first + LEVEL_STRIDE // 2 + i)
                        for i in range(size)]
        started = time.perf_counter()
        run_level_in_processes(server.base_url, body, warm_prompts, size, 1, args.level_timeout, args.read_timeout,
                               client_processes_for(size, args.clients_per_process, args.max_client_processes))
        warmup_s = time.perf_counter() - started
        log(f"{name}: level warm-up, {size} requests at once, took {warmup_s:.1f}s")
    probe_out = args.work_dir / f"health-{name}-c{concurrency}.json"
    probe_ready = probe_out.with_suffix(".ready")
    probe = spawn(
        [
            sys.executable,
            str(HERE / "bench_load.py"),
            "probe",
            "--url",
            server.base_url + server.spec.health_path,
            "--interval-ms",
            str(args.health_interval_ms),
            "--max-seconds",
            str(args.level_timeout + 60),
            "--out",
            str(probe_out),
            "--ready-file",
            str(probe_ready),
        ],
        args.work_dir / "probe.log",
    )
    deadline = time.monotonic() + 15
    while not probe_ready.exists() and time.monotonic() < deadline and probe.poll() is None:
        time.sleep(0.05)  # load starts once the prober is measuring
    load_before = os.getloadavg()[0]
    processes = client_processes_for(concurrency, args.clients_per_process, args.max_client_processes)
    log(
        f"{name}: concurrency {concurrency} x {args.requests_per_client} requests from {processes} "
        f"load process(es) (load average {load_before:.2f}) ..."
    )
    try:
        level = run_level_in_processes(
            server.base_url,
            body,
            prompts,
            concurrency,
            args.requests_per_client,
            args.level_timeout,
            args.read_timeout,
            processes,
        )
    finally:
        stop(probe)
    summary = level.summary()
    summary["health"] = summarize_probe(probe_out)
    summary["server_alive_after"] = server.alive()
    summary["loadavg_1m_before"] = load_before
    summary["level_warmup_s"] = warmup_s
    summary["client_processes"] = processes
    with contextlib.suppress(OSError):
        (args.work_dir / f"requests-{name}-c{concurrency}.json").write_text(
            json.dumps([r.__dict__ for r in level.results])
        )
    health_p99 = summary["health"].get("p99_s")
    log(
        f"{name}: c={concurrency}: ok {summary['ok']}, failed {summary['failed']}, "
        f"429 {summary['rate_limited']}, "
        f"{summary['tok_s']:.1f} tok/s, TTFT p50 {fmt_ms(summary['ttft_p50_s'])} ms, "
        f"/health p99 {fmt_ms(health_p99)} ms" + (" (LEVEL TIMED OUT)" if summary["timed_out"] else "")
    )
    return summary


# --- report ------------------------------------------------------------------------------------


def fmt_ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}" if seconds >= 0.01 else f"{seconds * 1000:.1f}"


def fmt_num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def ceiling_for(ceiling: dict[str, Any], concurrency: int, max_running: int) -> float | None:
    if concurrency == 1:
        single = ceiling.get("single")
        return single["tok_s"] if single else None
    batch = ceiling.get("batch", {}).get(str(min(concurrency, max_running)))
    return batch["tok_s"] if batch else None


HEADER = [
    "server",
    "conc.",
    "ok",
    "failed",
    "429",
    "tok/s",
    "tok/req",
    "TTFT p50 ms",
    "TTFT p95 ms",
    "/health p99 ms",
    "ceiling tok/s",
    "ratio",
]


def table_rows(result: dict[str, Any]) -> list[list[str]]:
    ceiling = result["ceiling"]
    max_running = result["args"]["max_running"]
    rows: list[list[str]] = []
    single = ceiling.get("single")
    if single:
        rows.append(
            [
                "engine stream_generate",
                "1",
                "1",
                "0",
                "0",
                fmt_num(single["tok_s"]),
                str(single["tokens"]),
                fmt_ms(single["ttft_s"]),
                "-",
                "-",
                fmt_num(single["tok_s"]),
                "1.00",
            ]
        )
    for size, batch in sorted(ceiling.get("batch", {}).items(), key=lambda kv: int(kv[0])):
        rows.append(
            [
                "engine batch_generate",
                size,
                size,
                "0",
                "0",
                fmt_num(batch["tok_s"]),
                fmt_num(batch["tokens"] / int(size), 0),
                "-",
                "-",
                "-",
                fmt_num(batch["tok_s"]),
                "1.00",
            ]
        )
    for server in result["servers"]:
        for level in server["levels"]:
            ceil = ceiling_for(ceiling, level["concurrency"], max_running)
            ratio = f"{level['tok_s'] / ceil:.2f}" if ceil else "-"
            flag = " (timed out)" if level["timed_out"] else ""
            rows.append(
                [
                    server["server"] + flag,
                    str(level["concurrency"]),
                    str(level["ok"]),
                    str(level["failed"]),
                    str(level["rate_limited"]),
                    fmt_num(level["tok_s"]),
                    fmt_num(level["tokens_per_ok_request"], 0),
                    fmt_ms(level["ttft_p50_s"]),
                    fmt_ms(level["ttft_p95_s"]),
                    fmt_ms(level["health"].get("p99_s")),
                    fmt_num(ceil),
                    ratio,
                ]
            )
        if not server["levels"]:
            rows.append(
                [
                    server["server"],
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    "no result: "
                    + ((server.get("error") or "").splitlines() or server["notes"][-1:] or ["?"])[0][:80],
                ]
            )
    return rows


def text_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [HEADER, *rows]) for i in range(len(HEADER))]

    def line(row: list[str]) -> str:
        cells = zip(row, widths, strict=True)
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(cells))

    return "\n".join([line(HEADER), "  ".join("-" * w for w in widths), *map(line, rows)])


def markdown_table(rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] + ["---:"] * (len(HEADER) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def environment() -> dict[str, Any]:
    versions = {}
    for dist in (
        "mlx",
        "mlx-lm",
        "mlx-cuda",
        "mlx-metal",
        "httpx",
        "granian",
        "litestar",
        "msgspec",
        "transformers",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[dist] = importlib.metadata.version(dist)
    cpu = cpu_model()
    gpu = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        gpu = (
            subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = (
            subprocess.run(
                ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    return {
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "versions": versions,
        "commit": commit,
    }


def render_markdown(result: dict[str, Any]) -> str:
    a, env, ceiling = result["args"], result["environment"], result["ceiling"]
    shape = a["model"] or f"{a['shape']} ({', '.join(f'{k}={v}' for k, v in SHAPES[a['shape']].items())})"
    lines = [
        f"### {a['model'] or a['shape']}: {result['started']}",
        "",
        f"- Command: `{result['command']}`",
        f"- Machine: {env['cpu']}, {env['cpu_count']} cores"
        + (f", GPU {env['gpu']}" if env["gpu"] else "")
        + f"; MLX device {ceiling.get('device', '?')}; {env['platform']}",
        f"- Versions: Python {env['python']}, "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + f"; repo {env['commit']}",
        f"- Model: {shape}; prompt {ceiling.get('prompt_tokens')} tokens with the chat template; "
        f"{a['max_tokens']} new tokens; EOS bias {'on' if ceiling.get('eos_bias') else 'off'}",
        f"- Load: {a['requests_per_client']} requests per client"
        f"{' after an unmeasured round at each level' if a.get('level_warmup', True) else ''}; "
        f"up to {a.get('clients_per_process', '?')} clients per load process, at most "
        f"{a.get('max_client_processes', '?')} processes; "
        f"level timeout {a['level_timeout']:.0f}s; "
        f"/health polled every {a['health_interval_ms']:.0f} ms; ceiling best of {a['ceiling_repeats']}",
        f"- Took {result['duration_s']:.0f}s in all; 1-minute load average "
        f"{env['loadavg_at_start'][0]:.2f} at the start"
        + (" (well above 0: other processes shared the CPU)" if env["loadavg_at_start"][0] > 0.5 else ""),
        "",
        markdown_table(table_rows(result)),
    ]
    notes = []
    for server in result["servers"]:
        notes += server["notes"]
        if server.get("error"):
            notes.append(f"{server['server']}: {server['error'].splitlines()[0][:300]}")
        for level in server["levels"]:
            if level["failure_reasons"]:
                notes.append(
                    f"{server['server']} c={level['concurrency']} failures: {level['failure_reasons']}"
                )
            if level["rate_limited"]:
                notes.append(
                    f"{server['server']} c={level['concurrency']}: {level['rate_limited']} answered 429, "
                    f"{level['rate_limited_with_retry_after']} of them with Retry-After"
                )
            if level["health"].get("errors"):
                notes.append(
                    f"{server['server']} c={level['concurrency']} /health errors: {level['health']['errors']}"
                )
            if level["ok"] and level["min_tokens"] != a["max_tokens"]:
                notes.append(
                    f"{server['server']} c={level['concurrency']}: generated {level['min_tokens']}.."
                    f"{level['max_tokens']} tokens per request, not {a['max_tokens']}"
                )
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def run_once(args: argparse.Namespace, argv: list[str] | None) -> tuple[dict[str, Any], bool]:
    """One full comparison (ceiling, then each server) into args.work_dir; (result, interrupted)."""
    args.work_dir.mkdir(parents=True, exist_ok=True)
    partial_reports.clear()
    started = time.monotonic()
    result: dict[str, Any] = {
        "started": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python "
        + shlex.join([os.path.relpath(__file__, REPO_ROOT), *(sys.argv[1:] if argv is None else argv)]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": environment(),
        "servers": [],
    }
    interrupted = False
    try:
        model = args.model.resolve() if args.model else ensure_model(args.shape, args.model_dir, args.seed)
        log(f"model: {model}; work dir: {args.work_dir}")
        result["ceiling"] = run_ceiling(args, model)
        for index, name in enumerate(args.servers):
            result["servers"].append(run_server(name, index, args, model, result["ceiling"]))
    except KeyboardInterrupt:
        interrupted = True
        result["servers"] += partial_reports
        log("interrupted: stopping every process this run started; the table holds what finished")
    except RuntimeError as exc:  # the ceiling failed: this run has no table, a later one may
        result["error"] = str(exc)
        log(f"run failed: {exc}")
    finally:
        stop_all()
    result["duration_s"] = time.monotonic() - started
    result["interrupted"] = interrupted
    result.setdefault("ceiling", {})
    result["ceiling"]["words"] = len(result["ceiling"].get("words", []))  # an input, not a result
    print(text_table(table_rows(result)), flush=True)
    (args.work_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    (args.work_dir / "result.md").write_text(render_markdown(result))
    log(f"run done in {result['duration_s']:.0f}s; raw results and logs in {args.work_dir}")
    return result, interrupted


# --- several runs: the median ---------------------------------------------------------------------

MEDIAN_HEADER = ["server", "conc.", "runs", "tok/s (median)", "ceiling tok/s (median)", "ratio (median)",
                 "ratio (each run)", "TTFT p50 ms (median)", "failed (all runs)", "429 (all runs)"]


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def median_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    """Per server and level, the median over runs of tok/s and of the ratio to that same run's ceiling."""
    cells: dict[tuple[str, int], dict[str, list[float]]] = {}
    order: list[tuple[str, int]] = []
    for result in results:
        ceiling = result.get("ceiling", {})
        max_running = result["args"]["max_running"]
        for server in result.get("servers", []):
            for level in server["levels"]:
                key = (server["server"], level["concurrency"])
                if key not in cells:
                    cells[key] = {"tok_s": [], "ceiling": [], "ratio": [], "ttft": [], "failed": [], "429": []}
                    order.append(key)
                cell = cells[key]
                cell["tok_s"].append(level["tok_s"])
                ceil = ceiling_for(ceiling, level["concurrency"], max_running)
                if ceil:
                    cell["ceiling"].append(ceil)
                    cell["ratio"].append(level["tok_s"] / ceil)
                if level["ttft_p50_s"] is not None:
                    cell["ttft"].append(level["ttft_p50_s"])
                cell["failed"].append(level["failed"])
                cell["429"].append(level["rate_limited"])
    rows = []
    for key in order:
        cell = cells[key]
        ratio = _median(cell["ratio"])
        rows.append([key[0], str(key[1]), str(len(cell["tok_s"])), fmt_num(_median(cell["tok_s"])),
                     fmt_num(_median(cell["ceiling"])), "-" if ratio is None else f"{ratio:.2f}",
                     " ".join(f"{r:.2f}" for r in cell["ratio"]) or "-", fmt_ms(_median(cell["ttft"])),
                     str(int(sum(cell["failed"]))), str(int(sum(cell["429"])))])
    return rows


def median_markdown(results: list[dict[str, Any]]) -> str:
    rows = median_rows(results)
    lines = [f"### Median of {len(results)} runs", "",
             *[f"- Run {i + 1}: {r.get('started', '?')}, {r.get('duration_s', 0):.0f}s, ceiling c=1 "
               f"{fmt_num(ceiling_for(r.get('ceiling', {}), 1, r['args']['max_running']))} tok/s"
               + (f"; error: {r['error'][:200]}" if r.get("error") else "") for i, r in enumerate(results)],
             "", "| " + " | ".join(MEDIAN_HEADER) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(MEDIAN_HEADER) - 1)) + "|",
             *["| " + " | ".join(r) + " |" for r in rows]]
    return "\n".join(lines) + "\n"


def load_runs(paths: list[Path]) -> list[dict[str, Any]]:
    """Results saved by earlier runs (a single run's JSON, or a --repeat file with "runs")."""
    runs: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(path.read_text())
        runs += data.get("runs", [data])
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def on_sigterm(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    # Explicitly: a shell's background job inherits SIGINT ignored, and Python then never raises.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.merge:
        print(median_markdown(load_runs(args.merge)))
        return 0
    base = args.work_dir
    runs: list[dict[str, Any]] = []
    interrupted = False
    for index in range(args.repeat):
        if args.repeat > 1:
            args.work_dir = base / f"run-{index + 1}"
            log(f"run {index + 1} of {args.repeat}")
        result, interrupted = run_once(args, argv)
        runs.append(result)
        if interrupted:
            break
    args.work_dir = base
    if args.repeat == 1:
        document: dict[str, Any] = runs[0]
        markdown = render_markdown(runs[0])
    else:
        document = {"runs": runs}
        markdown = "\n".join(render_markdown(r) for r in runs) + "\n" + median_markdown(runs)
        print("\n" + median_markdown(runs))
        (base / "result.json").write_text(json.dumps(document, indent=1, default=str))
        (base / "result.md").write_text(markdown)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown)
        args.out.with_suffix(".json").write_text(json.dumps(document, indent=1, default=str))
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
