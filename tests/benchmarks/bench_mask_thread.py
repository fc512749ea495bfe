"""Would llguidance's mask hide behind the MLX thread's work on a second thread? (A script, not a test.)

    python tests/benchmarks/bench_mask_thread.py [--vocab 128256] [--steps 2000] [--python-work 300,1500]
        [--gil-free-work 300,1500]

Per step: the matcher consumes a token and computes its next-token bitmask (bench_constrained_serving.py's
grammar, a JSON string that never ends, fed the tokens of a long text), beside some pure-Python work that
stands for what the MLX thread does meanwhile (building the next step's graph, handing out tokens). Either
one after the other on one thread, or the mask on a one-thread pool while this thread does its Python work,
then waiting for it. llguidance releases the GIL while it computes the mask; the question is whether what
remains (taking the GIL to call in and to return) lets the two overlap. Median µs per step of each way.

The second table puts the mask beside work that holds no GIL instead: a call that releases it for the given
µs (a sleep, standing for `mx.async_eval` launching a GPU's kernels, which releases the GIL; a sleep leaves
the mask a core of its own, as the launch does on a GPU host). That is where the engine computes the masks on
a GPU (mlx_backend/engine/masks.py, MaskStep._compute); beside Python work it does not (the first table).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_constrained import fast_tokenizer, synthetic_tokenizer
from bench_constrained_host import SCHEMA, TEXT

from mlx_backend.contract import Constraint
from mlx_backend.engine.constrained import GrammarCompiler
from tests.support import tiny_models as tm


def python_work(rounds: int) -> int:
    total = 0
    for i in range(rounds):
        total += len(str(i))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--python-work", default="300,1500", help="rounds of the stand-in Python work")
    parser.add_argument("--gil-free-work", default="300,1500", help="µs of the stand-in GIL-free work")
    args = parser.parse_args()
    hf = fast_tokenizer(synthetic_tokenizer(args.vocab))
    compiler = GrammarCompiler(hf, [hf.convert_tokens_to_ids(tm.EOS)])
    text = compiler.tokenizer.tokenize_str(TEXT)
    processor = compiler.processor(Constraint("json_schema", json.dumps(SCHEMA), strict=True), max_tokens=10**9)
    matcher = processor._matcher
    bitmask = compiler.bitmask(1)
    at = 0

    def mask() -> None:
        nonlocal at
        at = at + 1 if at + 1 < len(text) else 20  # past the opening: every token inside the string
        matcher.consume_token(text[at])
        matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.shape[1] * 4)

    def timed(step: object) -> float:
        taken = []
        for _ in range(args.steps):
            began = time.perf_counter()
            step()  # type: ignore[operator]
            taken.append(time.perf_counter() - began)
        return 1e6 * statistics.median(taken)

    pool = ThreadPoolExecutor(1)
    print(f"vocab {args.vocab}, {args.steps} steps each; median µs per step")
    print("| Python work (rounds) | Python alone | mask alone | one after the other | mask on a thread |")
    print("|---:|---:|---:|---:|---:|")
    for rounds in (int(r) for r in args.python_work.split(",")):
        alone = timed(lambda rounds=rounds: python_work(rounds))
        masked = timed(mask)
        serial = timed(lambda rounds=rounds: (mask(), python_work(rounds)))

        def threaded(rounds: int = rounds) -> None:
            pending = pool.submit(mask)
            python_work(rounds)
            pending.result()

        print(f"| {rounds} | {alone:.0f} | {masked:.0f} | {serial:.0f} | {timed(threaded):.0f} |", flush=True)
    print()
    print("| GIL-free work (µs) | work alone | mask alone | one after the other | mask on a thread |")
    print("|---:|---:|---:|---:|---:|")
    for micros in (int(m) for m in args.gil_free_work.split(",")):
        alone = timed(lambda micros=micros: time.sleep(micros / 1e6))
        masked = timed(mask)
        serial = timed(lambda micros=micros: (mask(), time.sleep(micros / 1e6)))

        def beside(micros: int = micros) -> None:
            pending = pool.submit(mask)
            time.sleep(micros / 1e6)
            pending.result()

        print(f"| {micros} | {alone:.0f} | {masked:.0f} | {serial:.0f} | {timed(beside):.0f} |", flush=True)
    processor.raise_if_failed()


if __name__ == "__main__":
    main()
