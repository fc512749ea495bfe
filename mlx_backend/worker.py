"""The engine process: `python -m mlx_backend.worker --fd N --config JSON`.

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
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import msgspec

from mlx_backend import timeline
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.ipc import ConnectionClosed, EngineSide
from mlx_backend.registry import ModelRegistry
from mlx_backend.types import (
    Abort,
    Command,
    CountPrompt,
    EngineConfig,
    Event,
    Failed,
    Generate,
    Heartbeat,
    Loading,
    ModelControl,
    ModelControlDone,
    PromptCount,
    Ready,
    Shutdown,
    Started,
)

if TYPE_CHECKING:
    from mlx_backend.batcher import Batcher
    from mlx_backend.control import Controls

log = logging.getLogger("mlx_gateway.engine")

PROCESS_NAME = "mlx-gateway-engine"


def _setup_logging() -> None:
    # stderr is the gateway's: the prefix tells engine lines apart in one log stream.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"engine: %(asctime)s %(levelname)s {PROCESS_NAME}[%(process)d] %(name)s: %(message)s"
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("MLX_GATEWAY_ENGINE_LOG_LEVEL", "INFO").upper())


def _set_process_name() -> None:
    """Linux: name the process in ps/top (comm), so it is told apart from the gateway."""
    if sys.platform == "linux":
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6").prctl(15, PROCESS_NAME.encode()[:15], 0, 0, 0)  # PR_SET_NAME


class Channel:
    """The socket, with one rule: if the gateway is gone, so are we.

    The MLX thread's events (`emit`) go out together at the end of each loop pass (`flush`): one frame
    write per step, not one per row. Loading and Started go at once: a model load or a prefill may follow.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._side = EngineSide(sock)

    def send(self, event: Event) -> None:
        """Now, from any thread (the heartbeat thread's way)."""
        try:
            self._side.send(event)
        except OSError as exc:
            self._gone(exc)

    def emit(self, event: Event) -> None:
        """The MLX thread's events, in order, sent by the next `flush`."""
        self._side.hold(event)
        if isinstance(event, Loading | Started):
            self.flush()

    def flush(self) -> None:
        try:
            self._side.flush()
        except OSError as exc:
            self._gone(exc)

    def _gone(self, exc: OSError) -> None:
        log.error("cannot write to the gateway (%s); exiting", exc)
        _exit(1)

    def read_forever(self, inbox: queue.Queue[Command]) -> None:
        try:
            while True:
                inbox.put(self._side.receive())
        except (ConnectionClosed, OSError):
            log.info("the gateway closed the connection; exiting")
            _exit(0)
        except Exception:  # a frame we cannot decode: the stream is broken
            log.exception("unreadable command from the gateway; exiting")
            _exit(1)


def _exit(code: int) -> None:
    timeline.stop()
    logging.shutdown()
    os._exit(code)


def _heartbeats(channel: Channel, interval_s: float, source: list[Callable[[], Event]]) -> None:
    """Send source[0]() every interval; the MLX thread swaps in the batcher's once it exists."""
    while True:
        try:
            heartbeat = source[0]()
        except Exception:  # a race with the MLX thread must not silence the heartbeat for good
            log.debug("heartbeat snapshot failed; trying again", exc_info=True)
        else:
            channel.send(heartbeat)
        time.sleep(interval_s)


def _warmup(setting: bool | None, device: str) -> bool:
    """Warm models up on a GPU, where the first generation compiles kernels (about 17 s on CUDA); on the CPU
    nothing is compiled and the warm-up would only cost compute (seconds for a 1B model on 2 cores)."""
    return setting if setting is not None else device != "cpu"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def serve(channel: Channel, config: EngineConfig) -> int:
    """Run the MLX loop until Shutdown; returns the exit code."""
    inbox: queue.Queue[Command] = queue.Queue()
    if config.trace_tokens:
        log.info("per-token timeline on: %s", timeline.start(config.trace_tokens, "engine"))
    threading.Thread(target=channel.read_forever, args=(inbox,), name="ipc-reader", daemon=True).start()
    # Ready as soon as MLX is up; mlx-lm and transformers take a second or two more to import, during
    # which heartbeats already flow and commands wait in the inbox.
    device = mx.default_device().type.name
    versions = _version("mlx"), _version("mlx-lm")
    channel.send(Ready(pid=os.getpid(), device=device, mlx_version=versions[0], mlx_lm_version=versions[1]))
    source: list[Callable[[], Event]] = [lambda: Heartbeat(
        progress=0, running=0, waiting=inbox.qsize(), loading=None, loaded=(), failed=(),
        memory_budget_bytes=0, active_memory_bytes=0, prompt_cache_bytes=0, starting=True,
    )]
    threading.Thread(target=_heartbeats, args=(channel, config.heartbeat_interval_s, source),
                     name="heartbeat", daemon=True).start()

    from mlx_backend.batcher import Batcher  # the heavy imports: mlx_lm, transformers
    from mlx_backend.cache import ModelCache
    from mlx_backend.control import Controls
    from mlx_backend.residency import KeepAlive

    registry = ModelRegistry(
        [Path(d) for d in config.models_dirs],
        Path(config.hf_cache_dir) if config.hf_cache_dir else None,
        config.include_demo_model,
        allowed=config.allowed_models,
    )
    cache = ModelCache(registry, config.memory_budget_bytes, config.load_retry_backoff_s,
                       keep_alive=KeepAlive(config.keep_alive_s, config.model_keep_alive),
                       warmup=_warmup(config.warmup, device), prefill_step_size=config.prefill_step_size,
                       read_delay_s=config.test_read_delay_s if config.allow_fault_injection else 0.0)
    cache.on_event = channel.emit
    batcher = Batcher(config, cache, channel.emit)
    controls = Controls(cache, channel.emit, batcher.busy_models, batcher.heartbeat)
    source[0] = batcher.heartbeat
    log.info("ready on %s (mlx %s, mlx-lm %s), memory budget %.2f GB, batch of %d",
             device, *versions, cache.budget / 1e9, config.max_running)
    controls.preload(config.preload, config.pinned)
    counts: list[Generate] = []  # prompts to count, waiting for their model's load

    while True:
        try:
            # Wait for a command only while there is nothing to decode, and no longer than until the next
            # keep-alive runs out (or a load reading on its thread is worth a look); then step.
            commands: list[Command] = []
            timeout = batcher.idle_timeout()
            if timeout != 0:
                with contextlib.suppress(queue.Empty):
                    commands.append(inbox.get(timeout=timeout))
            with contextlib.suppress(queue.Empty):
                while True:
                    commands.append(inbox.get_nowait())
            for command in commands:
                if not apply_command(batcher, command, channel.emit, controls=controls, counts=counts):
                    return 0
            batcher.step()
            counts[:] = [c for c in counts if not _answered(channel, count_prompt(batcher, c))]
        except Exception as exc:  # a bug outside any one request: end what is running, keep serving
            log.exception("unexpected error in the MLX loop")
            with contextlib.suppress(Exception):
                batcher.fail_all(f"The engine hit an internal error: {type(exc).__name__}: {exc}")
        finally:
            channel.flush()  # this pass's events, in one write


def apply_command(
    batcher: Batcher,
    command: Command,
    send: Callable[[Event], None],
    *,
    controls: Controls | None = None,
    counts: list[Generate] | None = None,
) -> bool:
    """Hand one command to the batcher (MLX thread); False once it was Shutdown (the batcher is then empty).

    `controls` answers the admin API (a single engine: an engine group's ranks would have to agree on each
    such decision, which they do not yet); `counts` keeps the prompt counts that wait for their model's load,
    answered after each step; without it a count is answered at once."""
    if isinstance(command, Shutdown):
        log.info("shutdown requested: ending %d requests and freeing the models", batcher.running + batcher.waiting)
        batcher.shutdown()
        return False
    if isinstance(command, Generate):
        batcher.submit(command)
    elif isinstance(command, Abort):
        batcher.abort(command.request_id)
    elif isinstance(command, ModelControl):
        if controls is not None:
            controls.handle(command)
        else:
            send(ModelControlDone(command.request_id, EngineErrorCode.INVALID_REQUEST.value,
                                  "Loading, unloading and pinning models is not available for an engine group."))
    elif isinstance(command, CountPrompt):
        if counts is not None:
            counts.append(command.request)
        else:
            send(count_prompt(batcher, command.request) or Failed(
                command.request.request_id, EngineErrorCode.ENGINE_OVERLOADED.value,
                "The model is loading; count the prompt again shortly."))
    return True


def _answered(channel: Channel, answer: PromptCount | Failed | None) -> bool:
    if answer is None:
        return False
    channel.emit(answer)
    return True


def count_prompt(batcher: Batcher, command: Generate) -> PromptCount | Failed | None:
    """The prompt `command` would run with, counted, on the MLX thread (which owns the model cache); None
    while its model loads (the load is asked for, as a request would, and happens between decode steps)."""
    from mlx_backend import vision
    from mlx_backend.tools import prompt_tokens

    rid = command.request_id
    try:
        cached = batcher.cache.acquire(command.model, batcher.busy_models(), waiter=rid)
        if cached is None:
            return None
        vision.refuse_images(command, cached.entry, sees=vision.takes_images(cached))
        if vision.takes_images(cached):  # its images' tokens counted too
            return PromptCount(rid, len(vision.prompt_of(command, cached)[0]))
        return PromptCount(rid, len(prompt_tokens(command, cached.artifacts.tokenizer)))
    except EngineError as exc:
        return Failed(rid, exc.code.value, exc.message, exc.param)
    except Exception as exc:
        log.exception("counting the prompt of %s failed", rid)
        return Failed(rid, EngineErrorCode.INTERNAL.value, f"Counting the prompt failed: {type(exc).__name__}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_backend.worker")
    parser.add_argument("--fd", type=int, help="inherited socket file descriptor")
    parser.add_argument("--connect", help="a group's rank: the gateway's HOST:PORT (mlx_backend/rank.py)")
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    args = parser.parse_args(argv)
    if args.connect:
        from mlx_backend import rank

        return rank.main(args.connect, args.config)
    if args.fd is None:
        parser.error("--fd or --connect is required")
    _setup_logging()
    _set_process_name()
    # Ctrl-C in a terminal and a service manager's SIGTERM reach the whole process group; the gateway
    # handles them (drain, then Shutdown). The engine ends on Shutdown, on EOF, or by SIGKILL.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = msgspec.json.decode(args.config, type=EngineConfig)
    channel = Channel(socket.socket(fileno=args.fd))
    log.info("starting (python %s)", sys.version.split()[0])
    code = serve(channel, config)
    _exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
