"""One rank of the engine as an MLX distributed group: `python -m mlx_backend.engine.worker --connect HOST:PORT --config
JSON`, started by mlx_backend/client/group.py with the environment its backend needs (MLX_RANK, MLX_HOSTFILE...).

Every rank runs the same Batcher on its shard of the model, and every rank must make the same calls in the
same order, or the collectives inside the model pair up wrongly (garbage, or a hang). So:
- Rank 0 alone reads the gateway's commands. Each loop iteration it hands them to every rank inside one
  all_sum (`Lockstep.step`); then every rank submits, aborts and steps identically.
- Each rank adds a digest of its batch state (`Batcher.digest`) to that same all_sum. Ranks that disagree
  exit at once (EXIT_DIVERGED): the gateway restarts the group, where going on would have hung it.
- The tokens are rank 0's: each sampler's draw is all_summed from rank 0 (the others add zeros), so
  floating-point differences between machines (an M2 and an M4 tile their matmuls differently) cannot split
  a near-tie two ways. Seeded samplers give rank 0's draws from the request's seed, so seeds stay
  reproducible; unseeded ones draw from MLX's global key, seeded the same on every rank.
- A model is loaded only if every rank can: each rank validates and loads, and all learn the outcome
  together, so one host missing a file fails the request, not the group.
- An idle rank 0 waits for commands in Python; the others wait for a Wake (rank 0 -> gateway -> them) on their
  sockets, not inside the collective, where the ring backend would spin a core. Idle, rank 0 still steps
  every GroupConfig.tick_s, so the gateway sees progress while the links between ranks work.
- Only rank 0 tells the gateway about requests; every rank sends heartbeats on its own connection and exits
  when that connection, or its stdin (the gateway's pipe), closes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import queue
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import msgspec
import numpy as np
from mlx.nn.layers.base import Module
from mlx_lm.generate import generation_stream
from mlx_lm.sample_utils import Sampler

from mlx_backend import __version__
from mlx_backend.contract import (
    GROUP_TOKEN_ENV,
    Command,
    EngineConfig,
    Event,
    Failed,
    GroupConfig,
    Heartbeat,
    Hello,
    ModelEvent,
    RankHeartbeat,
    Ready,
    Wake,
)
from mlx_backend.engine import model_check, model_load, sampling
from mlx_backend.engine.channel import (
    Channel,
    exit_process,
    package_version,
    send_heartbeats,
    set_process_name,
    setup_logging,
)
from mlx_backend.engine.commands import apply_command
from mlx_backend.engine.model_check import LoadedArtifacts
from mlx_backend.engine.residency.events import ResidencyEvents
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import Fingerprint, ModelEntry, ModelRegistry

log = logging.getLogger("mlx_gateway.engine.rank")

EXIT_DIVERGED = 70  # the ranks' states differ: going on would pair collectives wrongly
EXIT_GROUP_BROKEN = 71  # a collective failed: a rank or a link between ranks is gone

_INIT_BACKEND = {"ring": "ring", "jaccl": "jaccl", "jaccl-ring": "jaccl", "nccl": "nccl", "mpi": "mpi"}


class Diverged(Exception):
    """The ranks are not at the same point, or not in the same state."""


# -- the control plane: one all_sum per round -----------------------------------------------------------------

STEP, BUDGET, RESOLVE, VALIDATE, LOAD = 1, 2, 3, 4, 5
_KINDS = {STEP: "step", BUDGET: "budget", RESOLVE: "resolve", VALIDATE: "validate", LOAD: "load"}
_ERROR_CODES = list(EngineErrorCode)


class Lockstep:
    """Rounds every rank enters in the same order. One round is one all_sum of a fixed-size int32 buffer: a
    section per rank (what round it is in, its state digest, a status and a value) and rank 0's payload
    (the commands of a step); a payload past the inline room takes one more all_sum of its exact size.
    A round entered by ranks at different points is caught by its kind, not paired blindly."""

    _SECTION = 5  # kind, digest, status, value (low 31 bits), value (the bits above)
    _INLINE = 1024  # int32 words of payload inside the round itself (4 KiB)

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank: int = group.rank()
        self.size: int = group.size()
        self._length_at = self.size * self._SECTION
        self._payload_at = self._length_at + 1

    def round(self, kind: int, digest: int = 0, status: int = 0, value: int = 0,
              payload: bytes = b"") -> tuple[list[tuple[int, int]], bytes]:
        """Every rank's (status, value), and rank 0's payload. Raises Diverged, or RuntimeError when a
        collective fails (a rank died or a link broke)."""
        words = np.zeros(self._payload_at + self._INLINE, dtype=np.int32)
        words[self.rank * self._SECTION:(self.rank + 1) * self._SECTION] = (
            kind, digest, status, value & 0x7FFF_FFFF, value >> 31)
        rest = np.zeros(0, dtype=np.int32)
        if self.rank == 0 and payload:
            body = np.frombuffer(payload + b"\0" * (-len(payload) % 4), dtype=np.int32)
            words[self._length_at] = len(payload)
            words[self._payload_at:self._payload_at + min(body.size, self._INLINE)] = body[:self._INLINE]
            rest = body[self._INLINE:]
        total = np.array(mx.distributed.all_sum(mx.array(words), group=self.group))
        sections = total[:self._length_at].reshape(self.size, self._SECTION)
        kinds = sections[:, 0].tolist()
        if any(k != kind for k in kinds):
            raise Diverged("the ranks are at different rounds: " + ", ".join(
                f"rank {r} at {_KINDS.get(k, k)}" for r, k in enumerate(kinds)))
        digests = sections[:, 1].tolist()
        if len(set(digests)) > 1:
            raise Diverged(f"the ranks' batch states differ (digests {digests})")
        length = int(total[self._length_at])
        count = (length + 3) // 4
        body = total[self._payload_at:self._payload_at + min(count, self._INLINE)]
        if count > self._INLINE:
            mine = rest if self.rank == 0 else np.zeros(count - self._INLINE, dtype=np.int32)
            body = np.concatenate([body, np.array(mx.distributed.all_sum(mx.array(mine), group=self.group))])
        values = [(int(s), int(lo) | (int(hi) << 31)) for s, lo, hi in sections[:, 2:].tolist()]
        return values, body.astype(np.int32).tobytes()[:length]

    def step(self, commands: list[Command], digest: int) -> list[Command]:
        """Rank 0's commands for this step, on every rank."""
        payload = _commands.encode(commands) if self.rank == 0 and commands else b""
        _, data = self.round(STEP, digest, payload=payload)
        return _command_list.decode(data) if data else []

    def agree(self, kind: int, model_id: str, error: EngineError | None, value: int = 0) -> list[int]:
        """Whether every rank succeeded at a step of loading a model; every rank's value if so. Otherwise every
        rank raises an EngineError with the code of the first rank that failed (the model cache remembers
        failures by code: the ranks' caches must stay alike)."""
        status = 0 if error is None else 1 + _ERROR_CODES.index(error.code)
        results = self.round(kind, status=status, value=value)[0]
        failed = [(r, s) for r, (s, _) in enumerate(results) if s]
        if not failed:
            return [v for _, v in results]
        first, code = failed[0][0], _ERROR_CODES[failed[0][1] - 1]
        if error is not None:
            log.warning("model %s, %s: %s", model_id, _KINDS[kind], error.message)
            if error.code == code:
                raise error
        raise EngineError(code, f"The model '{model_id}' cannot be used on rank {first} of the engine group "
                                f"({code.value}); that rank's log says why.")


_commands = msgspec.msgpack.Encoder()
_command_list = msgspec.msgpack.Decoder(list[Command])


# -- models: found by the same registry, validated and loaded by every rank together --------------------------


class GroupRegistry(ModelRegistry):
    """The registry the model cache resolves through on a rank: the local lookup, then an agreement round, so
    a model missing from one host fails its request on every rank alike."""

    def __init__(self, lockstep: Lockstep, models_dirs: list[Path], hf_cache_dir: Path | None,
                 include_demo: bool) -> None:
        super().__init__(models_dirs, hf_cache_dir, include_demo)
        self._lockstep = lockstep

    def resolve(self, model_id: str) -> ModelEntry:
        """The entry, with rank 0's fingerprint on every rank: the cache reloads a model when its files change,
        and every rank must decide that alike (rank 0's files are the reference; each host's have their own
        mtimes, and its listing is refreshed on its own clock)."""
        entry: ModelEntry | None = None
        error: EngineError | None = None
        try:
            entry = super().resolve(model_id)
        except EngineError as exc:
            error = exc
        mark = _fingerprint_mark(entry.fingerprint) if entry is not None else 0
        agreed = self._lockstep.agree(RESOLVE, model_id, error, mark)[0]
        assert entry is not None
        return dataclasses.replace(entry, fingerprint=(("rank 0", agreed, 0),))


def _fingerprint_mark(fingerprint: Fingerprint) -> int:
    """A fingerprint as 62 bits (every rank then uses rank 0's)."""
    digest = hashlib.blake2b(repr(fingerprint).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 2


class GroupModels:
    """Residency's validate and load (Residency takes both), for a rank: the local step, then an
    agreement round, so every rank's cache makes the same decision."""

    def __init__(self, lockstep: Lockstep, parallelism: str) -> None:
        self._lockstep = lockstep
        self._parallelism = parallelism

    def validate(self, entry: ModelEntry) -> int:
        try:
            size, error = model_check.validate(entry), None
        except EngineError as exc:
            size, error = 0, exc
        sizes = self._lockstep.agree(VALIDATE, entry.id, error, size)
        if len(set(sizes)) > 1:  # every rank sees every size: they all refuse alike
            raise EngineError(EngineErrorCode.MODEL_LOAD_FAILED, f"The model '{entry.id}' differs between the "
                              "hosts of the engine group: its weights are " + ", ".join(
                                  f"{size} bytes on rank {r}" for r, size in enumerate(sizes)) +
                              "; every host needs the same files.")
        return sizes[0]

    def load(self, entry: ModelEntry) -> LoadedArtifacts:
        artifacts: LoadedArtifacts | None = None
        error: EngineError | None = None
        try:
            artifacts = model_load.load(entry, shard=self._shard)
        except EngineError as exc:
            error = exc
        self._lockstep.agree(LOAD, entry.id, error)
        assert artifacts is not None
        return artifacts

    def _shard(self, model: Module, config: dict[str, Any]) -> None:
        shard(model, config, self._lockstep.group, self._parallelism)


def shard(model: Module, config: dict[str, Any], group: Any, parallelism: str) -> None:
    """Cut a lazily built model to this rank's part, as mlx-lm's sharded_load does (strictly loaded here: a
    missing tensor is an error, not a random weight)."""
    size = group.size()
    model_type = config.get("model_type", "?")
    if parallelism == "pipeline":
        inner = getattr(model, "model", None)
        if inner is None or not hasattr(inner, "pipeline"):
            raise EngineError(EngineErrorCode.MODEL_UNSUPPORTED, f"mlx-lm cannot split model type '{model_type}' "
                              "into pipeline stages; run this group with tensor parallelism, or serve it alone.")
        inner.pipeline(group)
        return
    if not hasattr(model, "shard"):
        raise EngineError(EngineErrorCode.MODEL_UNSUPPORTED, f"mlx-lm has no tensor-parallel sharding for model "
                          f"type '{model_type}'; run this group with pipeline parallelism, or serve it alone.")
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = config.get(key)
        if isinstance(value, int) and value % size:
            raise EngineError(EngineErrorCode.MODEL_UNSUPPORTED, f"Tensor parallelism splits {key} ({value}) "
                              f"across the group's {size} ranks; it must be divisible by {size}.")
    model.shard(group)


# -- sampling: rank 0's tokens everywhere ---------------------------------------------------------------------


def rank_zero_draws(group: Any) -> Callable[[Sampler], Sampler]:
    """Wraps a sampler so that every rank gets rank 0's tokens: one all_sum of the (rows,) token ids in the
    step's own graph, to which the other ranks add zeros."""
    mine = 1 if group.rank() == 0 else 0

    def through(sampler: Sampler) -> Sampler:
        def sample(logprobs: mx.array) -> mx.array:
            tokens = sampler(logprobs)
            return mx.distributed.all_sum(tokens * mine, group=group)

        return sample

    return through


# -- the rank process -----------------------------------------------------------------------------------------


class _RankZeroEvents:
    """Rank 0's events to the gateway. A request that failed with an internal error is reported only once the
    next round shows the group whole: when a rank dies mid-step, the collectives fail on rank 0 first, and
    those requests must end as the engine failing (ENGINE_UNAVAILABLE), not as a bug in one of them."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._held: list[Event] = []

    def emit(self, event: Event) -> None:
        if isinstance(event, Failed) and event.code == EngineErrorCode.INTERNAL.value:
            self._held.append(event)
        else:
            self._channel.emit(event)  # out with the rest of this pass's events (flush)

    def release(self) -> None:
        held, self._held = self._held, []
        for event in held:
            self._channel.emit(event)

    def flush(self) -> None:
        self._channel.flush()


class RankLoop:
    def __init__(self, lockstep: Lockstep, batcher: Any, group_config: GroupConfig, inbox: queue.Queue[Command],
                 wakes: queue.Queue[Command], channel: Channel, events: _RankZeroEvents | None) -> None:
        self.lockstep = lockstep
        self.batcher = batcher
        self.rank = lockstep.rank
        self.tick_s = group_config.tick_s
        self.inbox = inbox
        self.wakes = wakes
        self.channel = channel
        self.events = events

    def run(self) -> int:
        # One stream for every op of this thread, the control rounds included. The ranks issue their collectives
        # in the same order, but ops on two streams (BatchGenerator's generation_stream, the default one) run in
        # an order that timing decides, differently on each rank: the ring then pairs one rank's control round
        # with another's step (seen here with four requests in a batch, before this).
        with mx.stream(generation_stream):
            return self._run()

    def _run(self) -> int:
        send: Callable[[Event], None] = self.events.emit if self.events else _drop
        while True:
            idle = not self.batcher.has_work()  # the same on every rank: their batchers are alike
            commands = self._take(idle)
            try:
                commands = self.lockstep.step(commands, self.batcher.digest())
            except Diverged as exc:
                log.error("%s; exiting so the gateway restarts the group", exc)
                exit_process(EXIT_DIVERGED)
            except Exception as exc:
                log.error("the engine group is broken (%s); exiting", exc)
                exit_process(EXIT_GROUP_BROKEN)
            if self.events:
                self.events.release()
            if idle and not commands:
                self.batcher.progress += 1  # an idle tick: the links between ranks work
            try:
                for command in commands:
                    if not apply_command(self.batcher, command, send):
                        return 0
                self.batcher.step()
            except Exception as exc:  # as in worker.serve; a rank that diverges because of it stops at the next round
                log.exception("unexpected error in the MLX loop")
                with contextlib.suppress(Exception):
                    self.batcher.fail_all(f"The engine hit an internal error: {type(exc).__name__}: {exc}")
            finally:
                if self.events:
                    self.events.flush()  # this pass's events, in one write

    def _take(self, idle: bool) -> list[Command]:
        """Rank 0: what came in (waiting for it up to a tick when idle; then it wakes the others). The
        others: nothing (rank 0's commands arrive in the round), after the Wake when idle."""
        if self.rank != 0:
            if idle:
                self.wakes.get()
            return []
        commands: list[Command] = []
        if idle:
            with contextlib.suppress(queue.Empty):
                commands.append(self.inbox.get(timeout=self.tick_s))
        with contextlib.suppress(queue.Empty):
            while True:
                commands.append(self.inbox.get_nowait())
        if idle:
            self.channel.send(Wake())
        return commands


def _drop(event: Event) -> None:
    """The other ranks' events: rank 0 reports every request."""


def _rank_from_env() -> int:
    for name in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(name)
        if value is not None:
            return int(value)
    raise SystemExit("no MLX_RANK in the environment: ranks are started by the gateway (mlx_backend/client/group.py)")


def _token() -> tuple[str, bool]:
    """The group's token, and whether it came on stdin (then stdin's EOF means the gateway is gone)."""
    token = os.environ.pop(GROUP_TOKEN_ENV, None)
    if token:
        return token, False
    return sys.stdin.readline().strip(), True


def _watch_stdin() -> None:
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    log.info("the gateway's pipe closed; exiting")
    exit_process(0)


def _connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    return socket.create_connection((host.strip("[]"), int(port)), timeout=30)


def main(address: str, config_json: str) -> int:
    rank = _rank_from_env()
    setup_logging(f"engine[rank {rank}]")
    set_process_name()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway's to handle, as for one engine process
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    config = msgspec.json.decode(config_json, type=EngineConfig)
    assert config.group is not None
    token, on_stdin = _token()
    sock = _connect(address)
    sock.settimeout(None)
    channel = Channel(sock)
    versions = package_version("mlx"), package_version("mlx-lm")
    channel.send(Hello(rank, token, os.getpid(), socket.gethostname(), *versions, __version__))
    if on_stdin:
        threading.Thread(target=_watch_stdin, name="stdin-watch", daemon=True).start()
    inbox: queue.Queue[Command] = queue.Queue()
    wakes: queue.Queue[Command] = queue.Queue()
    threading.Thread(target=channel.read_forever, args=(inbox if rank == 0 else wakes,), name="ipc-reader",
                     daemon=True).start()
    source: list[Callable[[], Event]] = [
        (lambda: Heartbeat(0, 0, inbox.qsize(), None, (), (), 0, 0, 0)) if rank == 0
        else (lambda: RankHeartbeat(rank, 0, None, 0))
    ]
    threading.Thread(target=send_heartbeats, args=(channel, config.heartbeat_interval_s, source),
                     name="heartbeat", daemon=True).start()

    log.info("joining a group of %d (%s backend, %s parallel)", config.group.size, config.group.backend,
             config.group.parallelism)
    group = mx.distributed.init(strict=True, backend=_INIT_BACKEND[config.group.backend])
    if group.size() != config.group.size or group.rank() != rank:
        log.error("the backend formed a group of %d with this process as rank %d; expected %d and %d",
                  group.size(), group.rank(), config.group.size, rank)
        exit_process(EXIT_GROUP_BROKEN)
    code = serve(channel, config, Lockstep(group), inbox, wakes, source)
    exit_process(code)
    return code


class _GroupResidencyEvents:
    """A group's residency events: the batcher lets go of a model that goes; the models' comings and goings
    are not sent to the gateway (a group never has sent them)."""

    def __init__(self, batcher: ResidencyEvents) -> None:
        self._batcher = batcher

    def model_event(self, event: ModelEvent) -> None:
        return None

    def model_dropped(self, model_id: str) -> None:
        self._batcher.model_dropped(model_id)


def serve(channel: Channel, config: EngineConfig, lockstep: Lockstep, inbox: queue.Queue[Command],
          wakes: queue.Queue[Command], source: list[Callable[[], Event]]) -> int:
    from mlx_backend.engine.batcher import Batcher  # the heavy imports: mlx_lm, transformers
    from mlx_backend.engine.residency.models import default_memory_budget
    from mlx_backend.engine.residency.residency import Residency

    group_config = config.group
    assert group_config is not None
    rank = lockstep.rank
    # The group's budget: its smallest member's, once per rank (the shards are equal), the same on every rank.
    local_budget = config.memory_budget_bytes or default_memory_budget()
    with mx.stream(generation_stream):
        budgets = [value for _, value in lockstep.round(BUDGET, value=local_budget)[0]]
    budget = min(budgets) * lockstep.size
    mx.random.seed(group_config.seed)
    sampling.share_draws(rank_zero_draws(lockstep.group))
    if group_config.parallelism == "pipeline":
        # Stages hold different layers, so their prefix caches weigh differently and would evict differently.
        config = msgspec.structs.replace(config, prompt_cache_bytes=0)
    registry = GroupRegistry(lockstep, [Path(d) for d in config.models_dirs],
                             Path(config.hf_cache_dir) if config.hf_cache_dir else None, config.include_demo_model)
    models = GroupModels(lockstep, group_config.parallelism)
    events = _RankZeroEvents(channel) if rank == 0 else None
    batcher = Batcher(config, lambda batcher_events: Residency(
        registry, budget, config.load_retry_backoff_s, events=_GroupResidencyEvents(batcher_events),
        prefix_cache_bytes=config.prompt_cache_bytes, validate=models.validate, load=models.load,
    ), events.emit if events else _drop)
    if rank == 0:
        source[0] = batcher.heartbeat
    else:
        source[0] = lambda: RankHeartbeat(rank, batcher.progress, batcher.residency.queue.loading,
                                          batcher.active_memory_bytes)
    device = mx.default_device().type.name
    log.info("group of %d ready on %s; memory budget %.2f GB (%d x the smallest rank's %.2f GB)", lockstep.size,
             device, budget / 1e9, lockstep.size, min(budgets) / 1e9)
    if rank == 0:
        channel.send(Ready(pid=os.getpid(), device=device, mlx_version=package_version("mlx"),
                           mlx_lm_version=package_version("mlx-lm")))
    return RankLoop(lockstep, batcher, group_config, inbox, wakes, channel, events).run()

