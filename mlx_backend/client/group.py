"""The engine as an MLX distributed group, from the gateway's side: which processes to start where, with the
environment each backend expects, and one object that starts, watches and kills them all. No MLX here.

The ranks get exactly the environment `mlx.launch` (mlx 0.32.4, `mlx/_distributed_utils/launch.py`) gives
them: MLX_RANK, and per backend MLX_HOSTFILE (ring), MLX_JACCL_COORDINATOR + MLX_IBV_DEVICES (jaccl),
NCCL_HOST_IP + NCCL_PORT + MLX_WORLD_SIZE + CUDA_VISIBLE_DEVICES (nccl), or mpirun (mpi); its hostfile format
is read as it reads it. The gateway does not run `mlx.launch` itself: that launcher is made for batch jobs. Its
relay threads select on the ranks' always-writable stdin pipes and never sleep (measured here: ~1.5 cores for
as long as the job lives), and it hides each rank's pid behind a shell. A serving engine lives for weeks, so
the gateway starts the ranks itself: on this machine as its own children, on other hosts through ssh as
mlx.launch does. Each rank connects back to the gateway (TCP, a per-group token read from its stdin):
rank 0's connection carries the usual commands and events, every rank's carries its heartbeats, and a rank
whose connection or stdin closes exits, so a gateway that dies leaves no rank behind on any host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import msgspec

from mlx_backend import __version__
from mlx_backend.client.process import child_setup, describe_exit
from mlx_backend.contract import (
    GROUP_TOKEN_ENV,
    Command,
    EngineConfig,
    Event,
    Heartbeat,
    Hello,
    RankHeartbeat,
    Ready,
    Wake,
)
from mlx_backend.ipc import ConnectionClosed, GatewaySide

log = logging.getLogger("mlx_gateway.engine")

BACKENDS = ("ring", "jaccl", "jaccl-ring", "nccl", "mpi")
PARALLELISMS = ("tensor", "pipeline")
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})  # started here, without ssh
DEFAULT_PORT = 32323  # mlx.launch's: ring ranks listen from here up, jaccl's coordinator, nccl's rendezvous
_HELLO_TIMEOUT_S = 30.0


# -- what the operator describes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One rank's machine, as mlx.launch's hostfile names it."""

    ssh: str  # the name to ssh into (a loopback name: started here, without ssh)
    ips: tuple[str, ...] = ()  # addresses the other ranks reach it on (ring, jaccl's coordinator, nccl)
    rdma: tuple[object, ...] = ()  # jaccl: the RDMA device to each rank (null for itself)

    @property
    def local(self) -> bool:
        return self.ssh in LOCAL_HOSTS


@dataclass(frozen=True)
class GroupSpec:
    hosts: tuple[Host, ...]  # rank i runs on hosts[i]
    backend: str = "ring"
    parallelism: str = "tensor"
    envs: tuple[str, ...] = ()  # NAME=value for every rank (the hostfile's "envs", then --group-env)
    port: int = DEFAULT_PORT
    listen_host: str = "127.0.0.1"  # where the gateway listens for its ranks
    python: str | None = None  # the interpreter on other hosts (default: this one's path)

    @property
    def size(self) -> int:
        return len(self.hosts)

    @property
    def all_local(self) -> bool:
        return all(h.local for h in self.hosts)

    def check(self) -> None:
        """Raise ValueError naming what cannot work, before anything starts."""
        if self.size < 2:
            raise ValueError("a group needs at least two ranks (give two hosts, or one host twice)")
        if self.backend not in BACKENDS:
            raise ValueError(f"group backend {self.backend!r} is not one of {', '.join(BACKENDS)}")
        if self.parallelism not in PARALLELISMS:
            raise ValueError(f"group parallelism {self.parallelism!r} is not one of {', '.join(PARALLELISMS)}")
        for entry in self.envs:
            name = entry.split("=", 1)[0]
            if "=" not in entry or not name or not all(c.isalnum() or c == "_" for c in name):
                raise ValueError(f"group environment entry {entry!r} is not NAME=value")
        if self.listen_host in ("0.0.0.0", "::", ""):
            raise ValueError("--group-listen-host must be the address the ranks reach this machine on, not a "
                             "wildcard (the ranks connect to it)")
        if not self.all_local and self.listen_host in LOCAL_HOSTS:
            raise ValueError("the group has ranks on other hosts, which cannot reach a gateway listening on "
                             f"{self.listen_host}: set --group-listen-host to this machine's address on their network")
        if self.backend == "ring" and any(not h.ips for h in self.hosts):
            raise ValueError("the ring backend needs an IP address for every host (give IPs, or a hostfile with "
                             "'ips')")
        if self.backend in ("jaccl", "jaccl-ring", "nccl") and not self.hosts[0].ips:
            raise ValueError(f"the {self.backend} backend needs an IP address for rank 0, reachable from every rank")
        if self.backend.startswith("jaccl"):
            _check_rdma(self.hosts, ring=self.backend == "jaccl-ring")


def _check_rdma(hosts: Sequence[Host], ring: bool) -> None:
    """mlx.launch's own checks of a JACCL hostfile: an N x N matrix of devices, null on the diagonal."""
    n = len(hosts)
    if any(len(h.rdma) != n for h in hosts):
        raise ValueError("the hostfile is malformed: each host needs one 'rdma' entry per host")
    if any(h.rdma[i] is not None for i, h in enumerate(hosts)):
        raise ValueError("the hostfile is malformed: a host's RDMA device to itself must be null")
    for i, h in enumerate(hosts):
        peers = ((i - 1) % n, (i + 1) % n) if ring else range(n)
        for j in peers:
            if i != j and h.rdma[j] is None:
                raise ValueError(f"the hostfile is malformed: no RDMA device from {h.ssh} to {hosts[j].ssh}")


class _HostEntry(msgspec.Struct):
    ssh: str
    ips: list[str] = []
    rdma: list[str | list[str] | None] = []


class _Hostfile(msgspec.Struct):
    hosts: list[_HostEntry]
    backend: str = ""
    envs: list[str] = []


def read_hostfile(path: Path) -> tuple[tuple[Host, ...], str, tuple[str, ...]]:
    """mlx.launch's JSON hostfile: {"backend", "envs", "hosts": [{"ssh", "ips", "rdma"}]}, or the hosts list
    alone. Returns (hosts, backend or "", envs). Raises ValueError."""
    try:
        raw = json.loads(Path(path).read_text())
        parsed = msgspec.convert({"hosts": raw} if isinstance(raw, list) else raw, _Hostfile)
    except (OSError, ValueError, msgspec.ValidationError) as exc:
        raise ValueError(f"cannot read the group hostfile {path}: {exc}") from None
    hosts = tuple(Host(h.ssh, tuple(h.ips), tuple(h.rdma)) for h in parsed.hosts)
    return hosts, parsed.backend, tuple(parsed.envs)


def hosts_from_list(names: Sequence[str]) -> tuple[Host, ...]:
    """mlx.launch's --hosts: a name that is an IP address is also the address the other ranks use."""
    import ipaddress

    hosts = []
    for name in names:
        try:
            ipaddress.ip_address(name)
            ips: tuple[str, ...] = (name,)
        except ValueError:
            ips = ()
        hosts.append(Host(name, ips))
    return tuple(hosts)


# -- how each rank is started ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Launch:
    """One process to start: a rank here, a rank over ssh, or mpirun for every rank (rank -1)."""

    rank: int
    host: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # added to the gateway's environment
    token_on_stdin: bool = True  # the first line written to its stdin is the group's token
    new_session: bool = False  # a launcher with children of its own: killed as a process group

    @property
    def remote(self) -> bool:
        return self.argv[0] == "ssh"


WriteFile = Callable[[str, str], str]  # (name, content) -> the path of a private file holding it


def plan_launches(spec: GroupSpec, rank_argv: Sequence[str], write_file: WriteFile) -> list[Launch]:
    """The processes that make the group, for `rank_argv` (the worker's `-m ... --connect ... --config ...`,
    without the interpreter)."""
    env = dict(_parse_envs(spec.envs))
    if spec.backend == "mpi":
        return [_mpi_launch(spec, rank_argv, env, write_file)]
    files: dict[str, str] = {}
    if spec.backend == "ring":
        port = spec.port
        ring = []
        for host in spec.hosts:
            ring.append([f"{ip}:{port + i}" for i, ip in enumerate(host.ips)])
            port += len(host.ips)
        files["MLX_HOSTFILE"] = json.dumps(ring)
    elif spec.backend in ("jaccl", "jaccl-ring"):
        env["MLX_JACCL_COORDINATOR"] = f"{spec.hosts[0].ips[0]}:{spec.port}"
        if spec.backend == "jaccl-ring":
            env["MLX_JACCL_RING"] = "1"
        files["MLX_IBV_DEVICES"] = json.dumps([list(h.rdma) for h in spec.hosts])
    elif spec.backend == "nccl":
        env.update(NCCL_HOST_IP=spec.hosts[0].ips[0], NCCL_PORT=str(spec.port), MLX_WORLD_SIZE=str(spec.size))
        # NVLink SHARP multicast needs a fabric manager these hosts may lack; NCCL then fails at init.
        env["NCCL_NVLS_ENABLE"] = "0"
    launches = []
    seen: dict[str, int] = {}
    for rank, host in enumerate(spec.hosts):
        rank_env = {**env, "MLX_RANK": str(rank)}
        if spec.backend == "nccl":  # one GPU per rank: the rank's index among the ranks on its host
            rank_env["CUDA_VISIBLE_DEVICES"] = str(seen.get(host.ssh, 0))
        seen[host.ssh] = seen.get(host.ssh, 0) + 1
        if host.local:
            paths = {name: write_file(f"{name.lower()}-{rank}.json", content) for name, content in files.items()}
            launches.append(Launch(rank, host.ssh, (sys.executable, *rank_argv), {**rank_env, **paths}))
        else:
            script = _remote_script(rank_env, files, (spec.python or sys.executable, *rank_argv))
            argv = ("ssh", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", host.ssh, script)
            launches.append(Launch(rank, host.ssh, argv))
    return launches


def _parse_envs(entries: Sequence[str]) -> list[tuple[str, str]]:
    return [(e.split("=", 1)[0], e.split("=", 1)[1]) for e in entries]


def _remote_script(env: Mapping[str, str], files: Mapping[str, str], argv: Sequence[str]) -> str:
    """What ssh runs on the other host: the same directory if it exists there, the environment, the files
    the backend reads (written with mktemp), then the rank itself (exec: its pid is the shell's)."""
    cwd = shlex.quote(os.getcwd())
    parts = [f"if [ -d {cwd} ]; then cd {cwd}; fi"]
    parts += [f"export {name}={shlex.quote(value)}" for name, value in env.items()]
    for name, content in files.items():
        parts.append(f"f=$(mktemp) && printf '%s' {shlex.quote(content)} > \"$f\" && export {name}=\"$f\"")
    parts.append("exec " + shlex.join(argv))
    return "; ".join(parts)


def _mpi_launch(spec: GroupSpec, rank_argv: Sequence[str], env: Mapping[str, str], write_file: WriteFile) -> Launch:
    """mpirun starts every rank (mlx.launch's launch_mpi): a hostfile of `host slots=n`, the environment
    passed with -x (the token by name only, so it never appears on a command line)."""
    slots: dict[str, int] = {}
    for host in spec.hosts:
        slots[host.ssh] = slots.get(host.ssh, 0) + 1
    hostfile = write_file("mpi-hostfile", "".join(f"{h} slots={n}\n" for h, n in slots.items()))
    exports = [arg for name, value in env.items() for arg in ("-x", f"{name}={value}")]
    argv = ("mpirun", "--output", ":raw", "--hostfile", hostfile, "-x", GROUP_TOKEN_ENV, *exports, "--",
            spec.python or sys.executable, *rank_argv)
    return Launch(-1, spec.hosts[0].ssh, argv, token_on_stdin=False, new_session=True)


# -- what the gateway reports ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankStatus:
    rank: int
    host: str
    pid: int | None
    state: str  # starting (not connected yet) | up | late (heartbeat overdue) | exited
    seconds_since_heartbeat: float | None
    exit: str | None = None


@dataclass(frozen=True)
class GroupStatus:
    size: int
    backend: str
    parallelism: str
    state: str  # forming | up | broken
    ranks: tuple[RankStatus, ...]


# -- the group as one engine process --------------------------------------------------------------------------


@dataclass
class _Rank:
    rank: int
    host: str
    side: GatewaySide | None = None
    hello: Hello | None = None
    last_heartbeat: float | None = None
    pending_wakes: int = 0  # Wakes from rank 0 that came before this rank's Hello
    exit: str | None = None


@dataclass
class _Started:
    launch: Launch
    proc: asyncio.subprocess.Process
    returncode: int | None = None


class GroupChannel:
    """What the engine client reads and writes: rank 0's commands and events. The other ranks' traffic
    (hellos, heartbeats, wakes) stays here; a connection that closes ends `receive` for everyone."""

    def __init__(self, group: GroupProcess) -> None:
        self._group = group
        self._events: asyncio.Queue[Event | ConnectionClosed] = asyncio.Queue()
        self._closed = False

    def send(self, command: Command) -> None:
        side = self._group.ranks[0].side
        if side is None or self._closed:
            raise ConnectionClosed("rank 0 is not connected")
        side.send(command)

    async def receive(self) -> Event:
        item = await self._events.get()
        if isinstance(item, ConnectionClosed):
            self._events.put_nowait(item)  # every later call raises the same
            raise item
        return item

    async def receive_many(self) -> list[Event]:
        """Every event waiting, at least one (GatewaySide's way: one wake-up of the reader per step)."""
        events = [await self.receive()]
        while not self._events.empty():
            item = self._events.get_nowait()
            if isinstance(item, ConnectionClosed):
                self._events.put_nowait(item)  # raised by the next call, after these are handled
                break
            events.append(item)
        return events

    def put(self, item: Event | ConnectionClosed) -> None:
        if not self._closed:
            self._events.put_nowait(item)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._events.put_nowait(ConnectionClosed("the group was closed"))
        self._group.close_connections()


class GroupProcess:
    """Every rank of one group, as `EngineProcess` is one process: spawn, wait, kill, stop; single use. The
    group is one engine: the first rank to exit ends it (the others are killed at once), unless it is
    stopping on request."""

    def __init__(self, config: EngineConfig, spec: GroupSpec, extra_env: dict[str, str] | None = None,
                 worker_module: str = "mlx_backend.engine.worker") -> None:
        assert config.group is not None and config.group.size == spec.size
        self.config = config
        self.spec = spec
        self._extra_env = extra_env or {}
        self._worker_module = worker_module
        self.ranks = [_Rank(r, h.ssh) for r, h in enumerate(spec.hosts)]
        self.channel: GroupChannel | None = None
        self._token = secrets.token_hex(32)
        self._server: asyncio.Server | None = None
        self._dir: Path | None = None
        self._started: list[_Started] = []
        self._watchers: list[asyncio.Task[None]] = []
        self._first_exit: tuple[str, int] | None = None  # (who, returncode)
        self._all_exited = asyncio.Event()
        self._stopping = False
        self._spawned_at = 0.0
        self._ready = False
        self._background: set[asyncio.Task[None]] = set()
        self._versions = (_version("mlx"), _version("mlx-lm"), __version__)

    # -- what EngineClient uses ------------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        """Rank 0's pid where it runs on this machine (the process a last-resort SIGKILL must reach)."""
        local = [s.proc.pid for s in self._started if s.launch.rank == 0 and not s.launch.remote]
        return local[0] if local else None

    @property
    def returncode(self) -> int | None:
        """None until every process of the group is gone; then the first one's exit code."""
        if not self._all_exited.is_set() or self._first_exit is None:
            return None
        return self._first_exit[1]

    async def spawn(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="mlx-gateway-group-"))  # mode 0700: the files are ours
        self._server = await asyncio.start_server(self._accept, self.spec.listen_host, 0)
        port = self._server.sockets[0].getsockname()[1]
        self.channel = GroupChannel(self)
        connect = f"{self.spec.listen_host}:{port}" if ":" not in self.spec.listen_host else \
            f"[{self.spec.listen_host}]:{port}"
        rank_argv = ("-m", self._worker_module, "--connect", connect,
                     "--config", msgspec.json.encode(self.config).decode())
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
               "PYTHONUNBUFFERED": "1", **self._extra_env}
        self._spawned_at = time.monotonic()
        try:
            for launch in plan_launches(self.spec, rank_argv, self._write_file):
                await self._start(launch, env)
        except OSError:
            self.kill()
            raise
        log.info("engine group started: %d ranks, %s backend, %s parallel, gateway listening on %s",
                 self.spec.size, self.spec.backend, self.spec.parallelism, connect)

    async def _start(self, launch: Launch, base_env: dict[str, str]) -> None:
        env = {**base_env, **launch.env}
        if not launch.token_on_stdin:
            env[GROUP_TOKEN_ENV] = self._token
        proc = await asyncio.create_subprocess_exec(
            *launch.argv, stdin=asyncio.subprocess.PIPE, env=env,
            preexec_fn=None if launch.new_session else child_setup(self.config.cpu_affinity),
            start_new_session=launch.new_session,
        )
        assert proc.stdin is not None
        if launch.token_on_stdin:
            proc.stdin.write(self._token.encode() + b"\n")  # the pipe stays open: its EOF tells the rank we are gone
        started = _Started(launch, proc)
        self._started.append(started)
        self._watchers.append(asyncio.create_task(self._watch(started), name=f"group-rank-{launch.rank}"))
        log.info("group rank %s started on %s (pid %d%s)", launch.rank if launch.rank >= 0 else "*", launch.host,
                 proc.pid, ", over ssh" if launch.remote else "")

    def _write_file(self, name: str, content: str) -> str:
        assert self._dir is not None
        path = self._dir / name
        path.write_text(content)
        return str(path)

    async def wait(self) -> int:
        """Until every process of the group is gone (the first exit tears the rest down); the first exit code."""
        await self._all_exited.wait()
        assert self._first_exit is not None
        return self._first_exit[1]

    def describe(self) -> str:
        """How the group ended, naming the rank that went first."""
        if self._first_exit is None:
            return "is still running"
        who, code = self._first_exit
        return f"{who} {describe_exit(code)}"

    def kill(self) -> None:
        """SIGKILL every process of the group (a stopped one too), here and on the other hosts, and close
        every connection (a rank whose connection closes exits by itself)."""
        for started in self._started:
            if started.returncode is not None or started.proc.returncode is not None:
                continue
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if started.launch.new_session:
                    os.killpg(started.proc.pid, signal.SIGKILL)
                else:
                    started.proc.kill()
        for rank in self.ranks:
            host = self.spec.hosts[rank.rank]
            if not host.local and rank.hello is not None and rank.exit is None:
                self._in_background(_remote_kill(host.ssh, rank.hello.pid))
        self.close_connections()

    async def stop(self, timeout_s: float) -> int | None:
        """After Shutdown: wait for every rank to exit, then kill what is left; rank 0's exit code."""
        self._stopping = True
        if not self._started:
            self.close_connections()
            return None
        try:
            await asyncio.wait_for(self._all_exited.wait(), timeout_s)
        except TimeoutError:
            log.warning("engine group did not exit in %.1fs; killing it", timeout_s)
            self.kill()
            await self._all_exited.wait()
        self.close_connections()
        zero = [s.proc.returncode for s in self._started if s.launch.rank in (0, -1)]
        return zero[0] if zero else self.returncode

    def problem(self, heartbeat_timeout_s: float, ready_timeout_s: float) -> str | None:
        """A reason to end the group that no single process exit shows: a rank that never connects, a group
        that never forms, a rank whose heartbeats stopped (SIGSTOP, swap death, a frozen machine)."""
        now = time.monotonic()
        if not self._ready and now - self._spawned_at > ready_timeout_s:
            missing = [f"{r.rank} ({r.host})" for r in self.ranks if r.hello is None]
            detail = f"ranks {', '.join(missing)} never connected" if missing else "every rank connected"
            return f"group did not form within {ready_timeout_s:.0f}s ({detail}; check the hosts, their " \
                   "addresses and the ports between them)"
        for rank in self.ranks:
            if rank.last_heartbeat is not None and now - rank.last_heartbeat > heartbeat_timeout_s:
                return f"rank {rank.rank} ({rank.host}) sent no heartbeat for {now - rank.last_heartbeat:.1f}s " \
                       "(frozen)"
        return None

    def status(self, heartbeat_timeout_s: float) -> GroupStatus:
        now = time.monotonic()
        ranks = []
        for rank in self.ranks:
            age = None if rank.last_heartbeat is None else round(now - rank.last_heartbeat, 3)
            if rank.exit is not None:
                state = "exited"
            elif rank.hello is None:
                state = "starting"
            elif age is not None and age > heartbeat_timeout_s:
                state = "late"
            else:
                state = "up"
            pid = rank.hello.pid if rank.hello else None
            ranks.append(RankStatus(rank.rank, rank.host, pid, state, age, rank.exit))
        if self._first_exit is not None:
            state = "broken"
        else:
            state = "up" if self._ready and all(r.state == "up" for r in ranks) else "forming"
        return GroupStatus(self.spec.size, self.spec.backend, self.spec.parallelism, state, tuple(ranks))

    # -- connections -----------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        side = GatewaySide(reader, writer)
        try:
            hello = await asyncio.wait_for(side.receive(), _HELLO_TIMEOUT_S)
        except (TimeoutError, ConnectionClosed, msgspec.DecodeError, msgspec.ValidationError):
            side.close()
            return
        admitted = self._admit(hello)
        if admitted is None:
            side.close()
            return
        rank, hello = admitted
        rank.side, rank.hello, rank.last_heartbeat = side, hello, time.monotonic()
        log.info("group rank %d connected from %s (pid %d)", hello.rank, hello.host, hello.pid)
        for _ in range(rank.pending_wakes):
            side.send(Wake())
        rank.pending_wakes = 0
        try:
            while True:
                for event in await side.receive_many():
                    self._on_event(rank, event)
        except (ConnectionClosed, msgspec.DecodeError, msgspec.ValidationError):
            pass
        if self.channel is not None:
            self.channel.put(ConnectionClosed(f"rank {rank.rank} ({rank.host}) closed its connection"))

    def _admit(self, hello: Event) -> tuple[_Rank, Hello] | None:
        """The rank a first frame names, if it proves it is ours; None (and a warning) otherwise."""
        if not isinstance(hello, Hello) or not hmac.compare_digest(hello.token.encode(), self._token.encode()):
            log.warning("refused a connection to the engine group's port that did not present this group's token")
            return None
        if not 0 <= hello.rank < self.spec.size or self.ranks[hello.rank].hello is not None:
            log.warning("refused a second connection for group rank %d", hello.rank)
            return None
        versions = (hello.mlx_version, hello.mlx_lm_version, hello.gateway_version)
        if versions != self._versions and self.channel is not None:
            self.channel.put(ConnectionClosed(
                f"rank {hello.rank} ({hello.host}) runs mlx {versions[0]}, mlx-lm {versions[1]}, mlx-gateway "
                f"{versions[2]}; this gateway has mlx {self._versions[0]}, mlx-lm {self._versions[1]}, "
                f"mlx-gateway {self._versions[2]}: every host needs the same versions"))
            return None
        return self.ranks[hello.rank], hello

    def _on_event(self, rank: _Rank, event: Event) -> None:
        if isinstance(event, Heartbeat | RankHeartbeat):
            rank.last_heartbeat = time.monotonic()
        if rank.rank != 0:
            return  # only heartbeats matter from the other ranks
        if isinstance(event, Wake):
            for other in self.ranks[1:]:
                if other.side is None:
                    other.pending_wakes += 1
                else:
                    with contextlib.suppress(ConnectionClosed, OSError):
                        other.side.send(event)
            return
        if isinstance(event, Ready):
            self._ready = True
        if not isinstance(event, Hello | RankHeartbeat) and self.channel is not None:
            self.channel.put(event)

    def close_connections(self) -> None:
        for rank in self.ranks:
            if rank.side is not None:
                rank.side.close()
        if self._server is not None:
            self._server.close()

    # -- processes -------------------------------------------------------------------------------------

    async def _watch(self, started: _Started) -> None:
        code = await started.proc.wait()
        started.returncode = code
        launch = started.launch
        who = f"rank {launch.rank} ({launch.host})" if launch.rank >= 0 else f"mpirun ({launch.host})"
        for rank in self.ranks:
            if rank.rank == launch.rank or launch.rank == -1:
                rank.exit = describe_exit(code)
        if self._first_exit is None:
            self._first_exit = (who, code)
            if not self._stopping:
                log.error("engine group: %s %s; ending the whole group", who, describe_exit(code))
                self.kill()
        if all(s.returncode is not None for s in self._started):
            self._all_exited.set()
            self.close_connections()
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)

    def _in_background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


async def _remote_kill(host: str, pid: int) -> None:
    """SIGKILL a rank on another host by the pid it reported (its ssh session may already be gone)."""
    with contextlib.suppress(OSError):
        proc = await asyncio.create_subprocess_exec(
            "ssh", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5", host, f"kill -9 {pid}",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            proc.kill()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def new_group_seed() -> int:
    """MLX's global key for every rank of one group start (mx.random.seed takes an unsigned 64-bit seed)."""
    return secrets.randbits(63)
