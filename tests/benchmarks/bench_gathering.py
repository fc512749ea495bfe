"""How our Batcher's gathering rule shapes a closed loop, counted in steps (a script, not a test).

    python tests/benchmarks/bench_gathering.py [--clients 8,32] [--max-tokens 64] [--rounds 4] [--shape tiny]

Clients ask, and ask again a few steps after their last token (HTTP's way back to the client and in again
takes a few of a GPU's steps; `--delays`: the most steps, spread over the clients), through our Batcher in this
process. Two gathering rules: the engine's (arrivals start once there are as many as rows running, two at
least, or after `prefill_gather_steps`) and the one before stop 13 (they waited for a full prefill batch, or
`prefill_gather_steps`). Reported per rule: forward passes per 100 tokens (on a GPU a small model's pass costs
about the same whatever it carries, so this is the cost), TTFT p50 in steps, and the steps the loop took.
Counted in steps, so the figures do not depend on this machine's speed or load.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_engine_layers import drive_closed_loop, warm_batcher
from bench_models import SHAPES, ensure_model
from mlx_lm import load

from mlx_backend.contract import EngineConfig
from mlx_backend.engine.batcher import Batcher


def full_prefill_batch(batcher: Batcher) -> bool:
    """The rule before stop 13: wait for a full prefill batch (or what free slots allow)."""
    company = min(batcher._prefill_batch, batcher.config.max_running - batcher._rows_running())
    return bool(batcher._where) and batcher._waiting.gathering(batcher._steps,
                                                                batcher.config.prefill_gather_steps, company)


def closed_loop(folder: Path, model: Any, clients: int, max_tokens: int, rounds: int, delay: Callable[[int, int], int],
                older_rule: bool, gather_steps: int) -> tuple[float, float, int]:
    config = EngineConfig(models_dirs=(str(folder.parent),), max_running=64, prompt_cache_bytes=0,
                          prefill_gather_steps=gather_steps, prefill_batch=32)
    batcher, events = warm_batcher(folder, config, max_tokens)
    if older_rule:
        batcher._gathering = lambda: full_prefill_batch(batcher)  # type: ignore[method-assign]
    loop = drive_closed_loop(batcher, events, folder.name, model, clients, max_tokens, rounds, delay)
    batcher.shutdown()
    return 100 * loop.passes / loop.tokens, statistics.median(loop.ttft_steps), loop.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "mlx-gateway-bench/models")
    parser.add_argument("--clients", default="8,32")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--delays", default="0,3,7", help="the most steps a client waits before asking again")
    parser.add_argument("--gather-steps", type=int, default=2)
    args = parser.parse_args()
    folder = ensure_model(args.shape, args.model_dir)
    model, _ = load(str(folder))[:2]
    print(f"# {args.shape}, {args.max_tokens} tokens, {args.rounds} requests per client, prefill_gather_steps "
          f"{args.gather_steps}; counted in steps")
    print("| clients | re-ask delay | rule | passes per 100 tokens | TTFT p50 (steps) | steps |")
    print("|---:|---|---|---:|---:|---:|")
    for clients in (int(c) for c in args.clients.split(",")):
        for most in (int(d) for d in args.delays.split(",")):
            def delay(client: int, round_: int, most: int = most) -> int:  # spread, the same for both rules
                return (client * 5 + round_ * 3) % (most + 1)

            for name, older in (("engine's", False), ("full prefill batch (before stop 13)", True)):
                passes, ttft, steps = closed_loop(folder, model, clients, args.max_tokens, args.rounds, delay,
                                                  older, args.gather_steps)
                print(f"| {clients} | 0-{most} steps | {name} | {passes:.1f} | {ttft:.1f} | {steps} |", flush=True)


if __name__ == "__main__":
    main()
