"""A stand-in engine process that speaks the real IPC protocol without MLX, for supervision tests.

Each Generate answers Started, one Delta per word of the prompt (at `delay` seconds each), then
Finished; each CountPrompt answers the prompt's word count; a ModelControl is done at once (the model "nope"
is not found), and the heartbeat lists the models the process was started pinned as loaded and pinned (so a
restart shows which pins it was given). Prompts starting with a command misbehave on
purpose: "die" exits hard, "stall" stops progress while heartbeats go on, "freeze" stops heartbeats too,
"slowload" says its model loads and then sends no heartbeat for 4 s (a tokenizer parse holding the GIL),
"slowstart" keeps the request waiting for 4 s with no progress while its heartbeats say the engine is still
starting (importing mlx-lm on a busy machine).
"""

from __future__ import annotations

import argparse
import os
import queue
import socket
import threading
import time

import msgspec

from mlx_backend.contract import (
    Abort,
    CountPrompt,
    Delta,
    EngineConfig,
    Finished,
    Generate,
    Heartbeat,
    LoadedModel,
    Loading,
    ModelControl,
    ModelControlDone,
    PromptCount,
    Ready,
    Shutdown,
    Started,
)
from mlx_backend.ipc import ConnectionClosed, EngineSide


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--config", required=True)
    args = parser.parse_args()
    config = msgspec.json.decode(args.config, type=EngineConfig)
    channel = EngineSide(socket.socket(fileno=args.fd))
    inbox: queue.Queue[object] = queue.Queue()
    state = {"progress": 0, "running": 0, "frozen": False, "starting": False}
    delay = float(os.environ.get("SCRIPTED_TOKEN_DELAY", "0.02"))

    def heartbeats() -> None:
        while True:
            if not state["frozen"]:
                pinned = tuple(LoadedModel(m, 1, 0.0, 0, pinned=True) for m in config.pinned)
                channel.send(Heartbeat(progress=state["progress"], running=state["running"],
                                       waiting=int(state["starting"]), loading=None, loaded=pinned, failed=(),
                                       memory_budget_bytes=0, active_memory_bytes=0, prompt_cache_bytes=0,
                                       starting=bool(state["starting"])))
            time.sleep(config.heartbeat_interval_s)

    def reader() -> None:
        try:
            while True:
                inbox.put(channel.receive())
        except (ConnectionClosed, OSError):
            os._exit(0)

    threading.Thread(target=heartbeats, daemon=True).start()
    threading.Thread(target=reader, daemon=True).start()
    channel.send(Ready(pid=os.getpid(), device="scripted", mlx_version="-", mlx_lm_version="-"))
    aborted: set[str] = set()
    while True:
        command = inbox.get()
        if isinstance(command, Shutdown):
            os._exit(0)
        if isinstance(command, Abort):
            aborted.add(command.request_id)
            continue
        if isinstance(command, ModelControl):
            missing = command.model == "nope"
            channel.send(ModelControlDone(command.request_id, "model_not_found" if missing else None,
                                          "The model 'nope' does not exist." if missing else ""))
            continue
        if isinstance(command, CountPrompt):
            words = (command.request.prompt or "").split()
            if words[:1] == ["die"]:
                os._exit(3)
            channel.send(PromptCount(command.request.request_id, len(words)))
            continue
        assert isinstance(command, Generate)
        words = (command.prompt or "").split()
        rid = command.request_id
        if words[:1] == ["die"]:
            os._exit(3)
        if words[:1] == ["freeze"]:
            state["frozen"] = True
        if words[:1] == ["slowload"]:
            channel.send(Loading(rid, command.model))
            state["frozen"] = True
            time.sleep(4.0)
            state["progress"] += 1  # as the real engine counts a load's pieces
            state["frozen"] = False
        if words[:1] == ["slowstart"]:
            state["starting"] = True
            time.sleep(4.0)
            state["starting"] = False
        state["running"] += 1
        channel.send(Started(rid, len(words), 0))
        if words[:1] in (["stall"], ["freeze"]):
            time.sleep(3600)
        produced = 0
        for word in words[: command.params.max_tokens]:
            while not inbox.empty():  # aborts arrive while we "decode"
                pending = inbox.get()
                if isinstance(pending, Abort):
                    aborted.add(pending.request_id)
                else:
                    inbox.put(pending)
                    break
            if rid in aborted:
                break
            time.sleep(delay)
            state["progress"] += 1
            produced += 1
            channel.send(Delta(rid, word + " ", 1))
        state["running"] -= 1
        channel.send(Finished(rid, "abort" if rid in aborted else "stop", len(words), produced, 0))


if __name__ == "__main__":
    main()
