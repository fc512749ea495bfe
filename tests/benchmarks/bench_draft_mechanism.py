"""Speculative decoding's mechanism on any model, random weights included: its upper bound and its overhead.

Random weights accept no real draft, so the mechanism is measured at its two ends, in process, on the engine's
solo path (mlx_backend/engine/solo.py), greedy:

- one token a pass: no drafts (the baseline);
- every draft right: the drafts are the baseline's own tokens (draft = target), the most drafting can give;
- every draft wrong: each draft is a token the model does not draw, so every pass feeds the drafts and keeps
  none: what drafting costs when it never pays (the extra tokens of each pass, and the wait for each token
  before the next pass is built);

beside mlx-lm's stream_generate (the ceiling of one token a pass). tok/s over the decode (prefill excluded),
median of --runs; the text of every drafting run is checked against the baseline's.

  python tests/benchmarks/bench_draft_mechanism.py --shape llama-3.2-1b [--tokens 128] [--drafts 4,8] [--runs 3]

On Linux CPUs run it as the engine runs (LD_PRELOAD of the system's OpenBLAS, OPENBLAS_NUM_THREADS): the line
"matrix products" says which BLAS this process has.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench_models import DEFAULT_MODEL_DIR, ensure_model

from mlx_backend import cpu_blas
from mlx_backend.engine.lookup import DraftLookup

PROMPT = [(37 * i) % 500 + 10 for i in range(64)]


class WrongDrafts(DraftLookup):
    """Drafts that are never what the model draws: at each place, the baseline's token plus one."""

    def __init__(self, tokens: Iterable[int], expected: list[int], vocab: int) -> None:
        self._expected = expected
        self._vocab = vocab
        self._seen = 0
        super().__init__(tokens)
        self._seen = 0  # the prompt's tokens are not the output's

    def extend(self, tokens: Iterable[int]) -> None:
        added = list(tokens)
        self._seen += len(added)
        super().extend(added)

    def draft(self, limit: int) -> list[int]:
        start = self._seen
        return [(t + 1) % self._vocab for t in self._expected[start:start + limit]] if limit > 0 else []


def decode(model: Any, tokens: int, drafts: DraftLookup | None = None, max_draft: int = 0) -> tuple[list[int], float,
                                                                                                      int, int]:
    """(tokens, decode tok/s, drafted, kept) of one greedy solo generation."""
    from mlx_lm.sample_utils import greedy_sampler

    from mlx_backend.engine.solo import SoloGeneration

    generation = SoloGeneration(model, PROMPT, None, 0, greedy_sampler, None, 2048, drafts=drafts,
                                max_draft_tokens=max_draft)
    out = [generation.next_token(more=True)]  # the prefill's token
    began = time.perf_counter()
    for i in range(tokens - 1):
        out.append(generation.next_token(more=i < tokens - 2))
    return out, (tokens - 1) / (time.perf_counter() - began), generation.drafted, generation.accepted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small", help="a bench_models shape (random weights)")
    parser.add_argument("--model", type=Path, default=None, help="a model folder instead of --shape")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--drafts", default="4,8")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm import load, stream_generate

    folder = args.model or ensure_model(args.shape, DEFAULT_MODEL_DIR)
    model, tokenizer = load(str(folder))
    vocab = int(model.args.vocab_size)
    print(f"{folder.name} on {mx.default_device()}; matrix products: "
          f"{cpu_blas.in_use() if sys.platform == 'linux' else 'platform'}", flush=True)
    decode(model, 8)  # warm-up: kernels of the shapes every run shares
    rows: list[tuple[str, float, str, str]] = []
    baseline, rates = [], []
    for _ in range(args.runs):
        baseline, rate, _, _ = decode(model, args.tokens)
        rates.append(rate)
    one_a_pass = statistics.median(rates)
    rows.append(("one token a pass", one_a_pass, "", ""))
    for limit in (int(d) for d in args.drafts.split(",")):
        for label, lookup in (("every draft right", lambda: DraftLookup(PROMPT, source=baseline)),
                              ("every draft wrong", lambda: WrongDrafts(PROMPT, baseline, vocab))):
            rates, same, kept = [], True, ""
            for _ in range(args.runs):
                out, rate, drafted, accepted = decode(model, args.tokens, lookup(), limit)
                rates.append(rate)
                same = same and out == baseline
                kept = f"{accepted} / {drafted}"
            rows.append((f"{label}, up to {limit} a pass", statistics.median(rates), kept,
                         "yes" if same else "NO"))
    ceiling = []
    for _ in range(args.runs):
        responses = list(stream_generate(model, tokenizer, mx.array(PROMPT), max_tokens=args.tokens))
        ceiling.append(responses[-1].generation_tps)
    rows.append(("mlx-lm stream_generate (ceiling of one a pass)", statistics.median(ceiling), "", ""))

    print(f"\n{args.tokens} tokens greedy after a {len(PROMPT)}-token prompt, median of {args.runs}")
    print("| decoding | tok/s | vs one a pass | drafts kept / fed | same tokens |")
    print("| --- | ---: | ---: | --- | --- |")
    for label, rate, kept, same in rows:
        print(f"| {label} | {rate:.1f} | {rate / one_a_pass:.2f} | {kept} | {same} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
