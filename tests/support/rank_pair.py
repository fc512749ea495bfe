"""Run by tests/unit/mlx_backend/engine/test_rank.py as both ranks of a real two-rank ring group on loopback
(`MLX_RANK`, `MLX_HOSTFILE` set as mlx_backend/client/group.py sets them): each control-plane round of
mlx_backend/engine/rank.py, then one JSON line of what this rank saw."""

from __future__ import annotations

import json

import mlx.core as mx

from mlx_backend.contract import Abort, Command, Generate, SamplingParams
from mlx_backend.engine.rank import BUDGET, LOAD, STEP, Diverged, Lockstep, rank_zero_draws
from mlx_backend.errors import EngineError, EngineErrorCode


def main() -> None:
    group = mx.distributed.init(strict=True, backend="ring")
    lockstep = Lockstep(group)
    rank = lockstep.rank
    seen: dict[str, object] = {}
    small: list[Command] = [Generate("a", "tiny", SamplingParams(max_tokens=3), prompt="hi"), Abort("b")]
    big: list[Command] = [Generate("c", "tiny", SamplingParams(max_tokens=3), prompt="word " * 5000)]  # > 4 KiB
    none: list[Command] = []
    for name, commands in (("small", small), ("big", big), ("none", none)):
        got = lockstep.step(commands if rank == 0 else [], digest=7)
        seen[name] = got == commands
    seen["budgets"] = lockstep.round(BUDGET, value=(rank + 1) * 3 * 2**40)[0]
    error = EngineError(EngineErrorCode.MODEL_NOT_FOUND, "not on this host") if rank == 1 else None
    try:
        lockstep.agree(LOAD, "tiny", error)
    except EngineError as exc:
        seen["agree"] = [exc.code.value, exc.message]
    seen["sizes"] = lockstep.agree(LOAD, "tiny", None, 1000 + rank)
    draw = rank_zero_draws(group)(lambda logprobs: mx.array([rank + 10, rank + 20], dtype=mx.uint32))
    seen["draws"] = draw(mx.zeros((2, 4))).tolist()
    for name, digest, kind in (("digests", rank, STEP), ("kinds", 0, STEP if rank == 0 else LOAD)):
        try:
            lockstep.round(kind, digest)
            seen[name] = "agreed"
        except Diverged as exc:
            seen[name] = str(exc)
    seen["after"] = lockstep.step(small if rank == 0 else [], digest=1) == small  # still in step
    print(json.dumps({"rank": rank, **seen}), flush=True)


if __name__ == "__main__":
    main()
