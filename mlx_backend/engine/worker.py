"""The engine process: `python -m mlx_backend.engine.worker --fd N --config JSON`.

Three threads. The main thread is the MLX thread: it owns every `mx` call and runs the batcher. A reader
thread turns socket frames into commands in the MLX thread's inbox. A heartbeat thread reports progress
every `heartbeat_interval_s` and never touches MLX, so it keeps going while the MLX thread is stuck inside
native code; the gateway sees the heartbeats continue while `progress` stops, and knows.

The process never outlives the gateway: socket EOF or a failed send ends it at once (os._exit, since the
MLX thread may be stuck and could never join).
"""

from __future__ import annotations

import os

# Offline before anything imports huggingface_hub or transformers (mlx_lm does): never download.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no tokenizer thread pools in a long-lived process
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its warnings would lack our log prefix

import argparse
import contextlib
import logging
import queue
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx
import msgspec

from mlx_backend import cpu_blas, timeline
from mlx_backend.contract import (
    Command,
    EngineConfig,
    Event,
    Heartbeat,
    Ready,
)
from mlx_backend.engine.channel import (
    Channel,
    exit_process,
    package_version,
    send_heartbeats,
    set_process_name,
    setup_logging,
)
from mlx_backend.engine.commands import apply_command
from mlx_backend.registry import ModelRegistry

log = logging.getLogger("mlx_gateway.engine")


def _warmup(setting: bool | None, device: str) -> bool:
    """Warm models up on a GPU, where the first generation compiles kernels (about 17 s on CUDA); on the CPU
    nothing is compiled and the warm-up would only cost compute (seconds for a 1B model on 2 cores)."""
    return setting if setting is not None else device != "cpu"


def serve(channel: Channel, config: EngineConfig) -> int:
    """Run the MLX loop until Shutdown; returns the exit code."""
    inbox: queue.Queue[Command] = queue.Queue()
    if config.trace_tokens:
        log.info("per-token timeline on: %s", timeline.start(config.trace_tokens, "engine"))
    threading.Thread(target=channel.read_forever, args=(inbox,), name="ipc-reader", daemon=True).start()
    # Ready as soon as MLX is up; mlx-lm and transformers take a second or two more to import, during
    # which heartbeats already flow and commands wait in the inbox.
    device = mx.default_device().type.name
    versions = package_version("mlx"), package_version("mlx-lm")
    channel.send(Ready(pid=os.getpid(), device=device, mlx_version=versions[0], mlx_lm_version=versions[1]))
    source: list[Callable[[], Event]] = [lambda: Heartbeat(
        progress=0, running=0, waiting=inbox.qsize(), loading=None, loaded=(), failed=(),
        memory_budget_bytes=0, active_memory_bytes=0, prompt_cache_bytes=0, starting=True,
    )]
    threading.Thread(target=send_heartbeats, args=(channel, config.heartbeat_interval_s, source),
                     name="heartbeat", daemon=True).start()

    from mlx_backend.engine.batcher import Batcher  # the heavy imports: mlx_lm, transformers
    from mlx_backend.engine.control import Controls
    from mlx_backend.engine.embeddings import EmbedRequests
    from mlx_backend.engine.residency.residency import Residency
    from mlx_backend.keep_alive import KeepAlive

    registry = ModelRegistry(
        [Path(d) for d in config.models_dirs],
        Path(config.hf_cache_dir) if config.hf_cache_dir else None,
        config.include_demo_model,
        allowed=config.allowed_models,
    )
    batcher = Batcher(config, lambda events: Residency(
        registry, config.memory_budget_bytes, config.load_retry_backoff_s, events=events,
        prefix_cache_bytes=config.prompt_cache_bytes,
        keep_alive=KeepAlive(config.keep_alive_s, config.model_keep_alive),
        warmup=_warmup(config.warmup, device), prefill_step_size=config.prefill_step_size,
        read_delay_s=config.test_read_delay_s if config.allow_fault_injection else 0.0,
    ), channel.emit)
    controls = Controls(batcher.residency, channel.emit, batcher.busy_models, batcher.heartbeat)

    def made_progress() -> None:  # embeddings' forward passes move the stall clock's counter too
        batcher.progress += 1

    embeds = EmbedRequests(batcher.residency, channel.emit, made_progress, config.prefill_piece_s)
    source[0] = batcher.heartbeat
    log.info("ready on %s (mlx %s, mlx-lm %s), memory budget %.2f GB, batch of %d",
             device, *versions, batcher.residency.budget / 1e9, config.max_running)
    if device == "cpu" and sys.platform == "linux":
        log.info("matrix products on the CPU: %s", cpu_blas.in_use())
    log.info("speculative decoding of a lone request: %s", f"up to {batcher.max_draft_tokens} draft tokens a pass"
             if batcher.max_draft_tokens else "off" if config.max_draft_tokens <= 0 else
             "off (MLX's reference BLAS: a pass of several tokens costs as much as that many passes)")
    controls.preload(config.preload, config.pinned)

    while True:
        try:
            # Wait for a command only while there is nothing to decode, and no longer than until the next
            # keep-alive runs out (or a load reading on its thread is worth a look); then step.
            commands: list[Command] = []
            timeout = 0 if embeds.ready() else batcher.idle_timeout()
            if timeout != 0:
                with contextlib.suppress(queue.Empty):
                    commands.append(inbox.get(timeout=timeout))
            with contextlib.suppress(queue.Empty):
                while True:
                    commands.append(inbox.get_nowait())
            for command in commands:
                if not apply_command(batcher, command, channel.emit, controls=controls, embeds=embeds):
                    return 0
            batcher.step()
            embeds.step(batcher.busy_models())
        except Exception as exc:  # a bug outside any one request: end what is running, keep serving
            log.exception("unexpected error in the MLX loop")
            with contextlib.suppress(Exception):
                batcher.fail_all(f"The engine hit an internal error: {type(exc).__name__}: {exc}")
        finally:
            channel.flush()  # this pass's events, in one write


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_backend.engine.worker")
    parser.add_argument("--fd", type=int, help="inherited socket file descriptor")
    parser.add_argument("--connect", help="a group's rank: the gateway's HOST:PORT (mlx_backend/engine/rank.py)")
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    args = parser.parse_args(argv)
    if args.connect:
        from mlx_backend.engine import rank

        return rank.main(args.connect, args.config)
    if args.fd is None:
        parser.error("--fd or --connect is required")
    setup_logging()
    set_process_name()
    # Ctrl-C in a terminal and a service manager's SIGTERM reach the whole process group; the gateway
    # handles them (drain, then Shutdown). The engine ends on Shutdown, on EOF, or by SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = msgspec.json.decode(args.config, type=EngineConfig)
    channel = Channel(socket.socket(fileno=args.fd))
    log.info("starting (python %s)", sys.version.split()[0])
    code = serve(channel, config)
    exit_process(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
