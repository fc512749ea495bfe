"""One constrained decode step, the way the engine takes it now against the way it took it before, in one
process, the two ways taking turns (a script, not a test).

    python tests/benchmarks/bench_constrained_step.py [--vocab 512,32000] [--rows 8] [--steps 60] [--rounds 3]
        [--hidden 64 --layers 2] [--unpack device] [--ways solo,batch]

A random llama (by default hidden 64, 2 layers: a CPU's step as short as it gets, so what the host adds shows;
on a GPU, `--vocab 152064 --hidden 2048 --layers 16` is about the 1B shape; the synthetic vocabularies of
bench_constrained.py), json_object rows (a random model keeps one going for as many
steps as needed), greedy. Ways:
- `batch, per-row`: the step planned (one mask computation for every row) but each row's processor called by
  mlx-lm's per-row loop (a slice, a token-context update, a `where` per row, then a concatenation): what
  `constrained_step` did before the batch-wide path;
- `batch, batch-wide`: `constrained_step` now: one `where` over the whole batch's logits, no per-row loop;
- `batch, plain`: the same rows without grammars (mlx-lm's own path), the floor;
- `solo, context` / `solo, no context`: a request alone, with the token buffer a grammar used to be passed /
  with only the token its step feeds (now), and `solo, plain`;
- `..., masks beside the launch`: the same step with the masks computed on the mask thread while the forward
  pass is queued (what a GPU runs); the other ways compute them after it, on the MLX thread (the CPU's order).
Per step: wall µs, the process's CPU µs (all threads) and the MLX thread's CPU µs (the thread that builds the
graph and calls llguidance for a row alone; MLX's CPU kernels and llguidance's executor run on other threads):
median over every step of every round. On a CPU the step is mostly the model's compute; on a GPU the step is
short and the MLX thread's host work is what it waits for: the third column is the figure to watch.
`--unpack device` unpacks the bitmask the way a GPU does (masks.unpacked_on_device) instead of numpy's CPU way.
After the table: the MLX primitives a constrained step adds to the graph (the processor's, or the batch-wide
step's, over logits already computed), each a node MLX evaluates and, on CUDA, some a kernel launch.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlx.core as mx
from bench_constrained import synthetic_tokenizer
from bench_constrained_host import primitives
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import TokenBuffer
from mlx_lm.sample_utils import greedy_sampler

from mlx_backend.contract import Constraint
from mlx_backend.engine import constrained, masks
from mlx_backend.engine.batcher import constrained_step
from mlx_backend.engine.masks import plan_rows
from mlx_backend.engine.solo import SoloGeneration
from tests.support import tiny_models as tm

Sample = tuple[float, float, float]  # wall s, process CPU s, MLX thread CPU s


def clock() -> Sample:
    return time.perf_counter(), time.process_time(), time.thread_time()


def since(began: Sample) -> Sample:
    now = clock()
    return now[0] - began[0], now[1] - began[1], now[2] - began[2]


def tiny_model(folder: Path, vocab_size: int, hidden: int = 64, layers: int = 2) -> tuple[Any, Any]:
    width = -(-vocab_size // 128) * 128  # embeddings padded to a multiple of 128, as checkpoints often are
    heads = max(4, hidden // 64)
    tm.make_tiny_model(folder, vocab_size=width, tokenizer="bpe", tokenizer_vocab_size=512, hidden_size=hidden,
                       num_layers=layers, num_heads=heads, num_kv_heads=max(1, heads // 4),
                       intermediate_size=2 * hidden if hidden <= 64 else 4 * hidden, dtype="bfloat16")
    tm._save_tokenizer(folder, synthetic_tokenizer(vocab_size), 512)
    model, wrapper = load(str(folder))[:2]
    return model, wrapper


@contextlib.contextmanager
def planned_per_row(generator: Any) -> Iterator[None]:
    """The step planned, its processors left to mlx-lm's per-row loop (constrained_step before)."""
    batch = generator._generation_batch
    rows = [(row, p) for row, processors in enumerate(batch.logits_processors or ()) for p in processors or ()
            if isinstance(p, constrained.ConstraintProcessor) and p.started]
    if rows:
        plan_rows(rows, batch._next_tokens)
    try:
        yield
    finally:
        for _, processor in rows:
            processor.plan(None)


def batch_steps(model: Any, prompt: list[int], processors: list[list[Any]], steps: int,
                step: Callable[[Any], contextlib.AbstractContextManager[None]]) -> list[Sample]:
    generator: Any = BatchGenerator(model, stop_tokens=[])
    generator.insert([prompt] * len(processors), max_tokens=[steps + 8] * len(processors),
                     samplers=[greedy_sampler] * len(processors), logits_processors=processors)
    for _ in range(4):  # prefill and warm-up
        with step(generator):
            generator.next()
    samples = []
    for _ in range(steps):
        began = clock()
        with step(generator):
            generator.next()
        samples.append(since(began))
    generator.close()
    return samples


def solo_steps(model: Any, prompt: list[int], processors: list[Any], steps: int, context: bool) -> list[Sample]:
    generation = SoloGeneration(model, prompt, None, 0, greedy_sampler, processors, prefill_step_size=512)
    if context and processors:
        generation._context = TokenBuffer(list(generation.tokens_in_cache))  # as every processor had it before
    for _ in range(3):
        generation.next_token(more=True)
    samples = []
    for _ in range(steps):
        began = clock()
        generation.next_token(more=True)
        samples.append(since(began))
    return samples


def ordered(beside_the_launch: bool, run: Callable[[], list[Sample]]) -> Callable[[], list[Sample]]:
    """`run` with the step's masks computed after the forward pass is queued (the CPU's order), or beside its
    launch on the mask thread (a GPU's): masks.MaskStep._compute."""
    def measured() -> list[Sample]:
        masks.BESIDE_THE_LAUNCH = beside_the_launch
        try:
            return run()
        finally:
            masks.BESIDE_THE_LAUNCH = None
    return measured


def after(run: Callable[[], list[Sample]]) -> Callable[[], list[Sample]]:
    return ordered(False, run)


def beside(run: Callable[[], list[Sample]]) -> Callable[[], list[Sample]]:
    return ordered(True, run)


def measure(vocab: int, rows: int, steps: int, rounds: int, hidden: int, layers: int,
            kinds: set[str]) -> tuple[dict[str, list[Sample]], dict[str, str]]:
    any_object = Constraint("json_object")
    prompt = list(range(10, 74))
    with tempfile.TemporaryDirectory() as folder:
        model, wrapper = tiny_model(Path(folder), vocab, hidden, layers)
        compiler = constrained.compiler_for(wrapper)

        def grammars(n: int) -> list[list[Any]]:
            return [[compiler.processor(any_object)] for _ in range(n)]

        ways: dict[str, Callable[[], list[Sample]]] = {
            "batch, plain": lambda: batch_steps(model, prompt, [[] for _ in range(rows)], steps, constrained_step),
            "batch, per-row": after(lambda: batch_steps(model, prompt, grammars(rows), steps, planned_per_row)),
            "batch, batch-wide": after(lambda: batch_steps(model, prompt, grammars(rows), steps, constrained_step)),
            "batch, batch-wide, masks beside the launch": beside(
                lambda: batch_steps(model, prompt, grammars(rows), steps, constrained_step)),
            "solo, plain": lambda: solo_steps(model, prompt, [], steps, context=False),
            "solo, context": after(lambda: solo_steps(model, prompt, grammars(1)[0], steps, context=True)),
            "solo, no context": after(lambda: solo_steps(model, prompt, grammars(1)[0], steps, context=False)),
            "solo, no context, masks beside the launch": beside(
                lambda: solo_steps(model, prompt, grammars(1)[0], steps, context=False)),
        }
        ways = {way: run for way, run in ways.items() if way.split(",")[0] in kinds}
        samples: dict[str, list[Sample]] = {way: [] for way in ways}
        for _ in range(rounds):
            for way, run in ways.items():
                samples[way].extend(run())
        added = {f"{kind}, {'1 row' if kind == 'solo' else f'{rows} rows'}": added_ops(
            prompt, [p for [p] in grammars(1 if kind == "solo" else rows)], kind, model.args.vocab_size)
            for kind in sorted(kinds)}
    return samples, added


def added_ops(prompt: list[int], processors: list[Any], kind: str, width: int) -> str:
    """The primitives a constrained step adds to the graph of logits already computed: `solo`, the processor
    called as a request alone calls it; `batch`, the batch-wide step (masks.MaskStep.apply)."""
    logits = mx.random.normal((len(processors), width)).astype(mx.bfloat16)
    fed = mx.array(prompt[:len(processors)])
    mx.eval(logits, fed)
    for processor in processors:  # the first step (the prompt's) consumes nothing: count a later one
        mx.eval(processor(mx.array(prompt[:4]), logits[:1]))
    if kind == "solo":
        out = processors[0](fed[:1], logits)
    else:
        out = masks.plan_rows(list(enumerate(processors)), fed).apply(logits, processors)
    return primitives(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default="512,32000")
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--unpack", choices=["auto", "device"], default="auto")
    parser.add_argument("--ways", default="solo,batch", help="solo, batch or both")
    args = parser.parse_args()
    if args.unpack == "device":
        masks.allowed_tokens = masks.unpacked_on_device  # what a GPU runs
    print(f"mlx {mx.__version__} on {mx.default_device()}; hidden {args.hidden}, {args.layers} layers, bf16; "
          f"{args.rows} rows, {args.steps} steps x {args.rounds} rounds, the ways taking turns; unpack {args.unpack}")
    print("| vocab | way | wall µs/step | process CPU µs/step | MLX thread CPU µs/step |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for vocab in (int(v) for v in args.vocab.split(",")):
        samples, added = measure(vocab, args.rows, args.steps, args.rounds, args.hidden, args.layers,
                                 set(args.ways.split(",")))
        for way, taken in samples.items():
            wall, cpu, thread = (statistics.median(s[k] for s in taken) * 1e6 for k in range(3))
            print(f"| {vocab} | {way} | {wall:.0f} | {cpu:.0f} | {thread:.0f} |", flush=True)
        for step, ops in added.items():
            print(f"MLX primitives a constrained step adds ({vocab}, {step}): {ops}")


if __name__ == "__main__":
    main()
