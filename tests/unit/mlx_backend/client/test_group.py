"""mlx_backend/client/group.py: the group's processes, the environment mlx.launch would give each backend's ranks,
and the group supervised as one engine (against scripted ranks: real processes and sockets, no MLX)."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.serve import group_spec
from gateway.settings import Settings
from mlx_backend.client.engine import EngineClient, EngineState
from mlx_backend.client.group import (
    GroupChannel,
    GroupProcess,
    GroupSpec,
    Host,
    Launch,
    hosts_from_list,
    plan_launches,
    read_hostfile,
)
from mlx_backend.client.supervision import SupervisionPolicy
from mlx_backend.contract import (
    GROUP_TOKEN_ENV,
    EngineConfig,
    Finished,
    Generate,
    GroupConfig,
    Hello,
    SamplingParams,
    Started,
)
from mlx_backend.errors import EngineError
from mlx_backend.ipc import ConnectionClosed, frame
from tests.unit.mlx_backend.client.test_engine_client import Recorder

RANK_ARGV = ("-m", "mlx_backend.engine.worker", "--connect", "127.0.0.1:5000", "--config", "{}")


class Files:
    """A stand-in for the group's private folder: what was written, under a path that names it."""

    def __init__(self) -> None:
        self.written: dict[str, str] = {}

    def __call__(self, name: str, content: str) -> str:
        self.written[name] = content
        return f"/private/{name}"


def plan(spec: GroupSpec) -> tuple[list[Launch], Files]:
    files = Files()
    spec.check()
    return plan_launches(spec, RANK_ARGV, files), files


# -- the launch plans, per backend ----------------------------------------------------------------------------


def test_ring_on_loopback_gives_each_rank_mlx_launchs_hostfile_and_rank() -> None:
    launches, files = plan(GroupSpec(hosts_from_list(["127.0.0.1", "127.0.0.1"]), port=40000))
    assert [launch.rank for launch in launches] == [0, 1]
    for rank, launch in enumerate(launches):
        assert launch.argv == (sys.executable, *RANK_ARGV)
        assert launch.env["MLX_RANK"] == str(rank)
        assert launch.token_on_stdin and not launch.remote
        assert json.loads(files.written[Path(launch.env["MLX_HOSTFILE"]).name]) == [
            ["127.0.0.1:40000"], ["127.0.0.1:40001"]]


def test_a_remote_rank_runs_over_ssh_with_its_environment_and_files_in_the_script() -> None:
    hosts = (Host("127.0.0.1", ("10.0.0.1",)), Host("mac2.local", ("10.0.0.2",)))
    spec = GroupSpec(hosts, envs=("MLX_METAL_FAST_SYNCH=1",), listen_host="10.0.0.1", python="/opt/py/bin/python3")
    launches, files = plan(spec)
    local, remote = launches
    assert not local.remote and local.env["MLX_METAL_FAST_SYNCH"] == "1"
    assert json.loads(next(iter(files.written.values()))) == [["10.0.0.1:32323"], ["10.0.0.2:32324"]]
    assert remote.remote and remote.argv[:-1] == ("ssh", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "mac2.local")
    assert remote.token_on_stdin and remote.env == {}  # nothing secret on any command line
    script = remote.argv[-1]
    assert "export MLX_RANK=1" in script and "export MLX_METAL_FAST_SYNCH=1" in script
    assert shlex.quote('[["10.0.0.1:32323"], ["10.0.0.2:32324"]]') in script and "export MLX_HOSTFILE=" in script
    assert script.endswith("exec " + shlex.join(("/opt/py/bin/python3", *RANK_ARGV)))


def test_jaccl_gets_the_coordinator_and_the_rdma_devices() -> None:
    hosts = (Host("127.0.0.1", ("10.0.0.1",), (None, "rdma_en3")), Host("mac2", ("10.0.0.2",), ("rdma_en3", None)))
    for backend in ("jaccl", "jaccl-ring"):
        launches, files = plan(GroupSpec(hosts, backend=backend, listen_host="10.0.0.1", port=5555))
        assert launches[0].env["MLX_JACCL_COORDINATOR"] == "10.0.0.1:5555"
        assert json.loads(files.written["mlx_ibv_devices-0.json"]) == [[None, "rdma_en3"], ["rdma_en3", None]]
        assert ("MLX_JACCL_RING" in launches[0].env) == (backend == "jaccl-ring")
        assert "export MLX_JACCL_COORDINATOR=10.0.0.1:5555" in launches[1].argv[-1]


def test_nccl_on_one_host_gives_each_rank_one_gpu_and_keeps_nvls_off() -> None:
    spec = GroupSpec(hosts_from_list(["127.0.0.1"] * 4), backend="nccl", port=12345, envs=("NCCL_DEBUG=WARN",))
    launches, files = plan(spec)
    assert files.written == {}
    for rank, launch in enumerate(launches):
        assert launch.argv == (sys.executable, *RANK_ARGV)
        assert {k: launch.env[k] for k in ("MLX_RANK", "CUDA_VISIBLE_DEVICES", "NCCL_HOST_IP", "NCCL_PORT",
                                            "MLX_WORLD_SIZE", "NCCL_NVLS_ENABLE", "NCCL_DEBUG")} == {
            "MLX_RANK": str(rank), "CUDA_VISIBLE_DEVICES": str(rank), "NCCL_HOST_IP": "127.0.0.1",
            "NCCL_PORT": "12345", "MLX_WORLD_SIZE": "4", "NCCL_NVLS_ENABLE": "0", "NCCL_DEBUG": "WARN"}


def test_nccl_across_hosts_numbers_the_gpus_of_each_host_from_zero() -> None:
    hosts = (Host("127.0.0.1", ("10.0.0.1",)), Host("127.0.0.1", ("10.0.0.1",)), Host("gpu2", ("10.0.0.2",)),
             Host("gpu2", ("10.0.0.2",)))
    launches, _ = plan(GroupSpec(hosts, backend="nccl", listen_host="10.0.0.1"))
    assert [launch.env.get("CUDA_VISIBLE_DEVICES") for launch in launches[:2]] == ["0", "1"]
    assert "export CUDA_VISIBLE_DEVICES=0" in launches[2].argv[-1]
    assert "export CUDA_VISIBLE_DEVICES=1" in launches[3].argv[-1]
    assert all("export NCCL_NVLS_ENABLE=0" in launch.argv[-1] for launch in launches[2:])


def test_mpi_is_one_mpirun_with_a_slots_hostfile_and_the_token_passed_by_name() -> None:
    hosts = (Host("127.0.0.1"), Host("127.0.0.1"), Host("mac2"))
    launches, files = plan(GroupSpec(hosts, backend="mpi", envs=("A=1",), listen_host="10.0.0.1"))
    (launch,) = launches
    assert launch.rank == -1 and launch.new_session and not launch.token_on_stdin
    assert files.written["mpi-hostfile"] == "127.0.0.1 slots=2\nmac2 slots=1\n"
    assert launch.argv == ("mpirun", "--output", ":raw", "--hostfile", "/private/mpi-hostfile", "-x", GROUP_TOKEN_ENV,
                           "-x", "A=1", "--", sys.executable, *RANK_ARGV)


# -- hostfiles and settings ------------------------------------------------------------------------------------


HOSTFILE = {"backend": "jaccl", "envs": ["MLX_METAL_FAST_SYNCH=1"], "hosts": [
    {"ssh": "mac1", "ips": ["10.0.0.1"], "rdma": [None, "rdma_en3"]},
    {"ssh": "mac2", "ips": ["10.0.0.2"], "rdma": ["rdma_en3", None]}]}


@pytest.mark.parametrize("content", [HOSTFILE, HOSTFILE["hosts"]], ids=["object", "list"])
def test_hostfiles_read_as_mlx_launch_reads_them(tmp_path: Path, content: object) -> None:
    from mlx._distributed_utils.common import Hostfile  # mlx.launch's own parser, to catch format drift

    path = tmp_path / "hosts.json"
    path.write_text(json.dumps(content))
    hosts, backend, envs = read_hostfile(path)
    theirs = Hostfile.from_file(str(path))  # type: ignore[no-untyped-call]
    assert [(h.ssh, list(h.ips), list(h.rdma)) for h in hosts] == [(h.ssh_hostname, h.ips, h.rdma)
                                                                   for h in theirs.hosts]
    assert (backend, list(envs)) == (theirs.backend, theirs.envs)


def test_a_broken_hostfile_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "hosts.json"
    path.write_text('{"hosts": [{"ips": ["10.0.0.1"]}]}')
    with pytest.raises(ValueError, match="cannot read the group hostfile"):
        read_hostfile(path)


@pytest.mark.parametrize(("spec", "message"), [
    (GroupSpec(hosts_from_list(["127.0.0.1"])), "at least two ranks"),
    (GroupSpec(hosts_from_list(["127.0.0.1"] * 2), backend="gloo"), "is not one of"),
    (GroupSpec(hosts_from_list(["127.0.0.1"] * 2), parallelism="expert"), "is not one of"),
    (GroupSpec(hosts_from_list(["127.0.0.1", "10.0.0.2"])), "set --group-listen-host"),
    (GroupSpec(hosts_from_list(["127.0.0.1", "10.0.0.2"]), listen_host="0.0.0.0"), "not a wildcard"),
    (GroupSpec(hosts_from_list(["127.0.0.1", "mac2"]), listen_host="10.0.0.1"), "needs an IP address"),
    (GroupSpec(hosts_from_list(["127.0.0.1"] * 2), envs=("NOVALUE",)), "not NAME=value"),
    (GroupSpec(hosts_from_list(["127.0.0.1"] * 2), backend="jaccl"), "one .rdma. entry per host"),
])
def test_impossible_groups_are_refused_before_anything_starts(spec: GroupSpec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        spec.check()


def test_settings_make_the_group_a_hostfile_backend_and_flags_over_it(tmp_path: Path) -> None:
    assert group_spec(Settings()) is None
    path = tmp_path / "hosts.json"
    path.write_text(json.dumps({"backend": "jaccl", "envs": ["A=1"], "hosts": HOSTFILE["hosts"]}))
    spec = group_spec(Settings(group_hostfile=path, group_listen_host="10.0.0.1", group_envs=("B=2",)))
    assert spec is not None and (spec.size, spec.backend, spec.envs) == (2, "jaccl", ("A=1", "B=2"))
    ring = group_spec(Settings(group_hosts=("127.0.0.1", "127.0.0.1"), group_parallelism="pipeline"))
    assert ring is not None and (ring.backend, ring.parallelism, ring.all_local) == ("ring", "pipeline", True)
    with pytest.raises(ValueError, match="not both"):
        Settings(group_hosts=("127.0.0.1",), group_hostfile=path).check()


# -- the group as one engine, against scripted ranks ----------------------------------------------------------


def _config() -> EngineConfig:
    return EngineConfig(heartbeat_interval_s=0.05, group=GroupConfig(2, "ring"))


def _client(env: dict[str, str] | None = None, idle_timeout_s: float | None = None) -> tuple[EngineClient, Recorder]:
    recorder = Recorder()
    policy = SupervisionPolicy(heartbeat_timeout_s=1.0, ready_timeout_s=10.0, shutdown_timeout_s=2.0,
                               idle_progress_timeout_s=idle_timeout_s)
    spec = GroupSpec(hosts_from_list(["127.0.0.1", "127.0.0.1"]))
    client = EngineClient(_config(), recorder, policy, extra_env=env, worker_module="tests.support.scripted_rank",
                          group=spec)
    return client, recorder


@pytest.fixture
async def group() -> AsyncIterator[tuple[EngineClient, Recorder]]:
    client, recorder = _client()
    await client.start()
    assert await client.wait_until_up(20)
    yield client, recorder
    await client.stop()


def _generate(prompt: str) -> Generate:
    return Generate(request_id=f"g-{prompt}-{os.urandom(3).hex()}", model="m", params=SamplingParams(max_tokens=1),
                    prompt=prompt)


async def _until(predicate: object, timeout_s: float) -> None:
    async def poll() -> None:
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.05)

    await asyncio.wait_for(poll(), timeout_s)


@pytest.mark.anyio
async def test_a_group_is_up_when_rank_0_is_ready_and_reports_every_rank(group: tuple[EngineClient, Recorder]) -> None:
    client, _ = group
    await _until(lambda: (s := client.status().group) is not None and s.state == "up", 5)
    status = client.status()
    assert status.group is not None and [(r.rank, r.state) for r in status.group.ranks] == [(0, "up"), (1, "up")]
    assert status.pid == status.group.ranks[0].pid
    request = client.submit(_generate("hello"))
    assert isinstance(await request.next(), Started)
    assert isinstance(await request.next(), Finished)


@pytest.mark.anyio
async def test_a_connection_without_the_groups_token_is_refused(group: tuple[EngineClient, Recorder]) -> None:
    client, _ = group
    process = client._process
    assert isinstance(process, GroupProcess) and process._server is not None
    port = process._server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(frame(Hello(1, "not-the-token", 1, "intruder", "?", "?", "?")))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed on us
    writer.close()
    assert client.status().state == EngineState.UP


@pytest.mark.anyio
async def test_a_rank_that_dies_ends_the_requests_in_flight_and_the_whole_group(
    group: tuple[EngineClient, Recorder],
) -> None:
    client, recorder = group
    pids = [r.pid for r in client.status().group.ranks]  # type: ignore[union-attr]
    # "wake": rank 0 sends Wake, which the gateway relays; the scripted rank 1 exits 42 on it. The request
    # is never answered, so it is in flight when rank 1 dies.
    request = client.submit(_generate("wake"))
    with pytest.raises(EngineError, match="Model engine unavailable"):
        await asyncio.wait_for(request.next(), 5)
    await _until(lambda: recorder.restarts, 5)
    assert recorder.restarts[0] in ("rank 1 (127.0.0.1) exited with code 42",
                                    "closed its connection and rank 1 (127.0.0.1) exited with code 42")
    assert all(_gone(pid) for pid in pids if pid)  # rank 0 was killed with it
    assert await client.wait_until_up(20)


@pytest.mark.anyio
async def test_a_rank_whose_heartbeats_stop_is_a_frozen_engine() -> None:
    client, recorder = _client({"SCRIPTED_RANK_FREEZE": "1"})
    await client.start()
    try:
        await _until(lambda: recorder.restarts, 10)
        assert recorder.restarts[0].startswith("rank 1 (127.0.0.1) sent no heartbeat for")
    finally:
        await client.stop()


@pytest.mark.anyio
async def test_an_idle_group_whose_steps_stop_is_stalled() -> None:
    """A group's rank 0 steps every tick while idle; the scripted one never does, like a group whose ranks
    can no longer reach each other."""
    client, recorder = _client(idle_timeout_s=1.0)
    await client.start()
    try:
        await _until(lambda: recorder.restarts, 10)
        assert recorder.restarts[0].startswith("stalled while idle: no progress for")
    finally:
        await client.stop()


@pytest.mark.anyio
async def test_a_rank_with_other_versions_is_an_engine_failure_naming_them() -> None:
    process = GroupProcess(_config(), GroupSpec(hosts_from_list(["127.0.0.1", "mac2"]), listen_host="10.0.0.1"))
    process.channel = GroupChannel(process)
    assert process._admit(Hello(1, process._token, 7, "mac2", "0.31.0", "0.32.2", "0.1.0")) is None
    with pytest.raises(ConnectionClosed, match=r"rank 1 \(mac2\) runs mlx 0.31.0.*every host needs the same"):
        await process.channel.receive()


@pytest.mark.anyio
async def test_stop_shuts_the_group_down_and_leaves_no_rank(group: tuple[EngineClient, Recorder]) -> None:
    client, _ = group
    pids = [r.pid for r in client.status().group.ranks]  # type: ignore[union-attr]
    await client.stop()
    assert all(_gone(pid) for pid in pids if pid)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie not reaped yet is gone too
        return f.read().split(") ")[1].startswith("Z")

