"""A stand-in engine process for benchmarking the gateway's streaming path without MLX: one token per
running request every step, a step every PACED_STEP_MS milliseconds, over the real IPC protocol.

It stands for a GPU engine as the solo path drives one: each step does PACED_CPU_US microseconds of busy
CPU work (detokenizing the last token, building the next step's graph), queues the next step on a
"device" that runs steps of PACED_STEP_MS back to back, then waits for the step in flight, off the CPU
(`sleep`, as MLX's CUDA eval blocks in cudaEventSynchronize) or on it (`spin`). CPU work shorter than a
step is hidden, as on a GPU; a CPU phase that is delayed past the step shows as a slower token.

Every running request gets one Delta per step, as the batcher's rows do; PACED_FRAMES=step writes a
step's frames in one sendall (what mlx_backend.engine.worker does), =event one sendall per frame (what it did
before). The timeline (`EngineConfig.trace_tokens`) is recorded as the real engine records it.

    python -m tests.support.paced_worker --fd N --config JSON    (started by EngineClient)
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import threading
import time
from collections import deque

import msgspec

from mlx_backend import timeline
from mlx_backend.contract import (
    Abort,
    Command,
    Delta,
    EngineConfig,
    Finished,
    Generate,
    Heartbeat,
    Ready,
    Shutdown,
    Started,
)
from mlx_backend.ipc import ConnectionClosed, EngineSide


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as the real engine: the gateway ends us (Shutdown, EOF)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = msgspec.json.decode(args.config, type=EngineConfig)
    step_s = float(os.environ.get("PACED_STEP_MS", "2")) / 1000
    cpu_s = float(os.environ.get("PACED_CPU_US", "0")) / 1e6
    spin = os.environ.get("PACED_WAIT", "sleep") == "spin"
    per_event = os.environ.get("PACED_FRAMES", "step") == "event"
    if config.trace_tokens:
        timeline.start(config.trace_tokens, "engine")
    side = EngineSide(socket.socket(fileno=args.fd))
    inbox: queue.Queue[Command] = queue.Queue()
    state = {"progress": 0, "running": 0}

    def leave() -> None:
        timeline.stop()
        os._exit(0)

    def heartbeats() -> None:
        while True:
            side.send(Heartbeat(progress=state["progress"], running=state["running"], waiting=0, loading=None,
                                loaded=(), failed=(), memory_budget_bytes=0, active_memory_bytes=0,
                                prompt_cache_bytes=0))
            time.sleep(config.heartbeat_interval_s)

    def reader() -> None:
        try:
            while True:
                inbox.put(side.receive())
        except (ConnectionClosed, OSError):
            leave()

    threading.Thread(target=heartbeats, daemon=True).start()
    threading.Thread(target=reader, daemon=True).start()
    side.send(Ready(pid=os.getpid(), device="paced", mlx_version="-", mlx_lm_version="-"))

    def emit(event: Delta | Finished | Started) -> None:
        side.hold(event)
        if per_event:
            side.flush()

    running: dict[str, list[int]] = {}  # request id -> [tokens left, tokens made]
    in_flight: deque[float] = deque()  # when each step queued on the "device" is done (perf_counter)
    while True:
        commands = [inbox.get()] if not running else []
        try:
            while True:
                commands.append(inbox.get_nowait())
        except queue.Empty:
            pass
        for command in commands:
            if isinstance(command, Shutdown):
                side.flush()
                leave()
            elif isinstance(command, Generate):
                running[command.request_id] = [max(1, command.params.max_tokens), 0]
                emit(Started(command.request_id, 8, 0))
                side.flush()
            elif isinstance(command, Abort) and command.request_id in running:
                made = running.pop(command.request_id)[1]
                emit(Finished(command.request_id, "abort", 8, made, 0))
        state["running"] = len(running)
        if not running:
            in_flight.clear()
        else:
            # As the solo path does: CPU work (the last token's detokenizing, the next step's graph), then the
            # next step is queued on the device behind the one in flight, then we wait for the one in flight.
            _busy(cpu_s)
            while len(in_flight) < 2:  # one step in flight while we work (two at the very start)
                now = time.perf_counter()
                in_flight.append(max(now, in_flight[-1] if in_flight else now) + step_s)
            timeline.mark_launched()
            wait = in_flight.popleft() - time.perf_counter()
            if wait > 0:
                _busy(wait) if spin else time.sleep(wait)
            timeline.mark_sampled()
            for rid in list(running):
                counts = running[rid]
                counts[0] -= 1
                counts[1] += 1
                emit(Delta(rid, "tok ", 1))
                if counts[0] == 0:
                    del running[rid]
                    emit(Finished(rid, "length", 8, counts[1], 0))
            state["progress"] += 1
        side.flush()


if __name__ == "__main__":
    main()
