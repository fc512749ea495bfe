"""mlx_backend/engine/rank.py: the control plane between a group's ranks (two real ring ranks on loopback), and the
checks made before a model is sharded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlx_backend.contract import Delta, Failed
from mlx_backend.engine.rank import GroupModels, GroupRegistry, _RankZeroEvents, shard
from mlx_backend.errors import EngineError, EngineErrorCode
from mlx_backend.registry import ModelRegistry
from tests.support.server import free_port_pair
from tests.support.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    port = free_port_pair()
    hostfile = tmp_path_factory.mktemp("ring") / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.support.rank_pair"], stdout=subprocess.PIPE,
                              env={**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile)})
             for rank in (0, 1)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    return [json.loads(out.splitlines()[-1]) for out in outputs]


def test_rank_0s_commands_reach_every_rank_whatever_their_size(ranks: list[dict[str, Any]]) -> None:
    for seen in ranks:
        assert (seen["small"], seen["big"], seen["none"]) == (True, True, True)


def test_every_rank_learns_every_ranks_value(ranks: list[dict[str, Any]]) -> None:
    expected = [[0, 3 * 2**40], [0, 6 * 2**40]]  # 62-bit values survive the int32 sections
    assert ranks[0]["budgets"] == ranks[1]["budgets"] == expected


def test_one_ranks_failure_fails_the_step_on_every_rank_with_its_code(ranks: list[dict[str, Any]]) -> None:
    zero, one = ranks[0]["agree"], ranks[1]["agree"]
    assert zero[0] == one[0] == "model_not_found"
    assert one[1] == "not on this host"  # its own error
    assert "cannot be used on rank 1 of the engine group" in zero[1]
    assert ranks[0]["sizes"] == ranks[1]["sizes"] == [1000, 1001]  # when all succeed, all values


def test_every_rank_takes_rank_0s_tokens(ranks: list[dict[str, Any]]) -> None:
    assert ranks[0]["draws"] == ranks[1]["draws"] == [10, 20]


def test_ranks_that_disagree_stop_rather_than_pair_collectives_wrongly(ranks: list[dict[str, Any]]) -> None:
    for seen in ranks:
        assert "batch states differ (digests [0, 1])" in seen["digests"]
        assert seen["kinds"] == "the ranks are at different rounds: rank 0 at step, rank 1 at load"
        assert seen["after"] is True


class _Group:
    def __init__(self, size: int) -> None:
        self._size = size

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return 0


class _Model:
    def __init__(self) -> None:
        self.sharded = False

    def shard(self, group: object) -> None:
        self.sharded = True


def test_tensor_parallelism_needs_heads_divisible_by_the_group() -> None:
    config = {"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
    model = _Model()
    shard(model, config, _Group(2), "tensor")  # type: ignore[arg-type]
    assert model.sharded
    with pytest.raises(EngineError, match=r"num_key_value_heads \(2\) across the group's 4 ranks") as refused:
        shard(_Model(), config, _Group(4), "tensor")  # type: ignore[arg-type]
    assert refused.value.code == EngineErrorCode.MODEL_UNSUPPORTED


def test_a_model_without_the_split_asked_for_is_unsupported() -> None:
    with pytest.raises(EngineError, match="cannot split model type 'llama' into pipeline stages"):
        shard(_Model(), {"model_type": "llama"}, _Group(2), "pipeline")  # type: ignore[arg-type]
    with pytest.raises(EngineError, match="no tensor-parallel sharding for model type 'x'"):
        shard(object(), {"model_type": "x"}, _Group(2), "tensor")  # type: ignore[arg-type]


class _Sent:
    def __init__(self) -> None:
        self.events: list[object] = []

    def emit(self, event: object) -> None:
        self.events.append(event)

    def flush(self) -> None:
        pass


def test_an_internal_failure_waits_for_the_next_round_to_show_the_group_whole() -> None:
    """A rank that dies mid-step makes rank 0's collectives fail first: those requests must end as the
    engine failing, so rank 0 reports an internal error only once the next round went through."""
    sent = _Sent()
    events = _RankZeroEvents(sent)  # type: ignore[arg-type]
    failed = Failed("r1", EngineErrorCode.INTERNAL.value, "[ring] connection to a peer was lost")
    events.emit(Delta("r2", "x", 1))
    events.emit(failed)
    events.emit(Failed("r3", EngineErrorCode.CONTEXT_LENGTH_EXCEEDED.value, "too long"))
    assert [e.request_id for e in sent.events] == ["r2", "r3"]  # type: ignore[attr-defined]
    events.release()
    assert sent.events[-1] is failed


class _Agreeing:
    def __init__(self, value: int) -> None:
        self.value = value
        self.offered: list[int] = []

    def agree(self, kind: int, model_id: str, error: EngineError | None, value: int = 0) -> list[int]:
        self.offered.append(value)
        return [self.value, value]


def test_every_rank_resolves_a_model_with_rank_0s_fingerprint(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "tiny")
    lockstep = _Agreeing(12345)
    registry = GroupRegistry(lockstep, [tmp_path], None, False)  # type: ignore[arg-type]
    entry = registry.resolve("tiny")
    assert entry.fingerprint == (("rank 0", 12345, 0),)
    assert lockstep.offered[0] > 0  # this rank's own mark went into the round
    (tmp_path / "tiny" / "config.json").touch()  # this host's files changed; rank 0's did not
    lockstep.value = 12345
    assert registry.resolve("tiny").fingerprint == entry.fingerprint


def test_a_model_whose_files_differ_between_hosts_is_refused_on_every_rank(tmp_path: Path) -> None:
    make_tiny_model(tmp_path / "tiny")
    lockstep = _Agreeing(7)  # answers [7, this rank's size]: as if rank 0's copy weighed 7 bytes
    entry = ModelRegistry([tmp_path], None, False).resolve("tiny")
    with pytest.raises(EngineError, match=r"differs between the hosts.*7 bytes on rank 0") as refused:
        GroupModels(lockstep, "tensor").validate(entry)  # type: ignore[arg-type]
    assert refused.value.code == EngineErrorCode.MODEL_LOAD_FAILED
