"""What constrained decoding costs per token, by vocabulary size, on this machine (a script, not a test).

    python tests/benchmarks/bench_constrained.py [--vocab-sizes 512,32000,128256,152064] [--steps 64]

No real tokenizer can be downloaded here, so each vocabulary is a byte-level BPE trained on Python's bundled
documentation and JSON text, then filled up to its size with synthetic tokens shaped like a large real
vocabulary's (words with and without a leading space, capitalised words, CJK, Cyrillic, digit groups,
punctuation runs, whitespace runs). llguidance's mask cost depends on the vocabulary's shape, so take the
mask figures as indicative; the conversion and apply figures depend only on the size.

Tables:
1. per token, driving a matcher through a JSON document for a pydantic schema: consume the sampled token,
   compute the mask (llguidance), then each way of turning the bitmask into an MLX mask (with eval) and of
   applying it to (1, width) float16 logits; plus one-off costs (llguidance tokenizer, compiling the schema).
2. a decode step of a random model of that vocabulary, alone (SoloGeneration): unconstrained, constrained,
   and constrained without starting the forward pass before the mask (what the overlap buys).
3. a batch of 8 rows in BatchGenerator with 0, 1 and 8 constrained rows (per step), stepped as the batcher
   steps it (`constrained_step`: the constrained rows' masks computed together).
4. masks for N rows one by one vs llguidance's parallel executor.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, like the other benches

import llguidance
import mlx.core as mx
import numpy as np
from llguidance import LLMatcher
from llguidance.numpy import fill_next_token_bitmask_par
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import greedy_sampler
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

import mlx_backend.engine.constrained as constrained
import mlx_backend.engine.masks as masks
from mlx_backend.contract import Constraint
from mlx_backend.engine.batcher import constrained_step
from mlx_backend.engine.constrained import GrammarCompiler
from mlx_backend.engine.solo import SoloGeneration
from mlx_backend.grammar import grammar_for
from tests.support import tiny_models as tm


@functools.cache
def schema() -> Constraint:
    """The strict json_schema constraint of a pydantic model, as the openai client sends it. Imported here, not
    at the top: the GPU machine has no openai package, and bench_constrained_step.py imports this module."""
    from openai.lib._pydantic import to_strict_json_schema
    from pydantic import BaseModel

    class Address(BaseModel):
        street: str
        city: str
        postcode: str | None

    class Person(BaseModel):
        name: str
        age: int
        email: str
        tags: list[str]
        address: Address
        score: float

    return Constraint("json_schema", json.dumps(to_strict_json_schema(Person)), strict=True)


DOCUMENT = json.dumps({
    "name": "Ada Lovelace", "age": 36, "email": "ada@example.org", "tags": ["mathematics", "poetry", "engines"],
    "address": {"street": "12 St James's Square", "city": "London", "postcode": None}, "score": 98.5,
}, indent=2)
TRAINED_VOCAB = 16_000  # what the corpus gives a BPE before synthetic tokens fill the rest


# -- vocabularies ------------------------------------------------------------------------------------------


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> Tokenizer:
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, TRAINED_VOCAB), special_tokens=tm.SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([*topics.values(), *tm.json_corpus()], trainer=trainer)
    return tm.fill_vocabulary(tokenizer, vocab_size, seed)


def fast_tokenizer(tokenizer: Tokenizer) -> Any:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=tm.BOS, eos_token=tm.EOS,  # type: ignore[no-untyped-call]
                                   unk_token=tm.UNK, additional_special_tokens=[*tm.ROLE_TOKENS.values(), tm.END])


# -- timing ------------------------------------------------------------------------------------------------


def median_us(samples: list[float]) -> float:
    # The median: other work on a shared machine lands on a few samples, not on the typical token.
    return statistics.median(samples) * 1e6


def timed(fn: Callable[..., Any], *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def mask_steps(compiler: GrammarCompiler, width: int) -> dict[str, float]:
    """Median microseconds per token of each part, over the document's tokens."""
    matcher = LLMatcher(compiler.tokenizer, grammar_for(schema()), log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    tokens = compiler.tokenizer.tokenize_str(DOCUMENT)
    words = compiler.words
    bitmask = np.zeros((words,), dtype=np.int32)
    logits = mx.random.normal((1, width)).astype(mx.float16)
    mx.eval(logits)
    shifts = mx.arange(32, dtype=mx.uint32)
    index = np.arange(width, dtype=np.int32)
    parts: dict[str, list[float]] = {k: [] for k in (
        "consume", "mask", "A convert", "A apply", "B convert", "B apply", "C convert", "C apply", "D convert+apply",
        "processor")}

    def convert_a() -> mx.array:  # numpy unpack, bool array to MLX (what ConstraintProcessor does)
        return mx.array(np.unpackbits(bitmask.view(np.uint8), count=width, bitorder="little").view(np.bool_))

    def convert_b() -> mx.array:  # 32-bit words to MLX, unpacked on the device with shifts
        bits = (mx.array(bitmask).view(mx.uint32)[:, None] >> shifts) & 1
        flat = bits.reshape(-1)
        if flat.size < width:
            flat = mx.concatenate([flat, mx.zeros((width - flat.size,), dtype=flat.dtype)])
        return flat[:width].astype(mx.bool_)

    def convert_c() -> mx.array:  # indices of the allowed tokens, scattered on the device
        allowed = index[np.unpackbits(bitmask.view(np.uint8), count=width, bitorder="little").view(np.bool_)]
        mask = mx.zeros((width,), dtype=mx.bool_)
        mask[mx.array(allowed)] = True
        return mask

    def convert_apply_d() -> mx.array:  # an additive float bias (0 / -inf) built in numpy
        bits = np.unpackbits(bitmask.view(np.uint8), count=width, bitorder="little")
        return logits + mx.array(np.where(bits, 0.0, -np.inf).astype(np.float16))

    def compute_mask() -> None:
        matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)

    def apply(mask: mx.array) -> None:
        mx.eval(mx.where(mask, logits, -mx.inf))

    for token in tokens:
        parts["mask"].append(timed(compute_mask))
        for name, convert in (("A", convert_a), ("B", convert_b), ("C", convert_c)):
            start = time.perf_counter()
            mask = convert()
            mx.eval(mask)
            parts[f"{name} convert"].append(time.perf_counter() - start)
            parts[f"{name} apply"].append(timed(apply, mask))
        parts["D convert+apply"].append(timed(lambda: mx.eval(convert_apply_d())))
        parts["consume"].append(timed(matcher.consume_token, token))
    assert not matcher.is_error(), matcher.get_error()

    # The whole processor call (consume, mask, convert, apply, eval), as decoding makes it.
    processor = compiler.processor(schema())
    prompt = [1, 2, 3]
    mx.eval(processor(mx.array(prompt), logits))

    def call(context: mx.array) -> None:
        mx.eval(processor(context, logits))

    for count in range(1, len(tokens) + 1):
        parts["processor"].append(timed(call, mx.array(prompt + tokens[:count])))
    return {k: median_us(v) for k, v in parts.items()} | {"tokens": float(len(tokens))}


# -- decoding ----------------------------------------------------------------------------------------------


def model_with_tokenizer(folder: Path, vocab_size: int, tokenizer: Tokenizer) -> tuple[Any, Any]:
    width = -(-vocab_size // 128) * 128  # embeddings padded to a multiple of 128, as checkpoints often are
    tm.make_tiny_model(folder, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512,
                       vocab_size=width, tokenizer="bpe", tokenizer_vocab_size=512)
    tm._save_tokenizer(folder, tokenizer, 512)
    model, wrapper = load(str(folder))[:2]
    return model, wrapper


RUNS = 3  # each decode figure is the best of this many runs


def solo_step_ms(model: Any, prompt: list[int], make: Callable[[], list[Any]], steps: int) -> float:
    return min(_solo_step_ms(model, prompt, make(), steps) for _ in range(RUNS))


def batch_step_ms(model: Any, prompt: list[int], make: Callable[[], list[list[Any]]], steps: int) -> float:
    return min(_batch_step_ms(model, prompt, make(), steps) for _ in range(RUNS))


def _solo_step_ms(model: Any, prompt: list[int], processors: list[Any], steps: int) -> float:
    generation = SoloGeneration(model, prompt, None, 0, greedy_sampler, processors, prefill_step_size=512)
    generation.next_token(more=True)  # prefill and first step out of the timing
    start = time.perf_counter()
    for _ in range(steps):
        generation.next_token(more=True)
    return (time.perf_counter() - start) / steps * 1e3


def _batch_step_ms(model: Any, prompt: list[int], processors: list[list[Any]], steps: int) -> float:
    generator: Any = BatchGenerator(model, stop_tokens=[])
    generator.insert([prompt] * len(processors), max_tokens=[steps + 8] * len(processors),
                     samplers=[greedy_sampler] * len(processors), logits_processors=processors)
    for _ in range(4):  # prefill and warm-up
        generator.next()
    start = time.perf_counter()
    for _ in range(steps):
        with constrained_step(generator):  # as the batcher steps it: the rows' masks planned together
            generator.next()
    elapsed = time.perf_counter() - start
    generator.close()
    return elapsed / steps * 1e3


def decode_rows(vocab_size: int, tokenizer: Tokenizer, steps: int) -> dict[str, float]:
    # json_object: a random model keeps it going (a long string or number) for as many steps as needed.
    any_object = Constraint("json_object")
    with tempfile.TemporaryDirectory() as folder:
        model, wrapper = model_with_tokenizer(Path(folder), vocab_size, tokenizer)
        compiler = constrained.compiler_for(wrapper)
        prompt = list(range(10, 74))
        def one() -> list[Any]:
            return [compiler.processor(any_object)]

        rows = {"solo plain": solo_step_ms(model, prompt, list, steps),
                "solo constrained": solo_step_ms(model, prompt, one, steps)}
        real_async_eval = masks._async_eval
        masks._async_eval = lambda *arrays: None  # the mask first, then the forward pass
        try:
            rows["solo constrained, no overlap"] = solo_step_ms(model, prompt, one, steps)
        finally:
            masks._async_eval = real_async_eval
        for constrained_rows in (0, 1, 8):
            def make(n: int = constrained_rows) -> list[list[Any]]:
                return [one() if i < n else [] for i in range(8)]

            rows[f"batch 8, {constrained_rows} constrained"] = batch_step_ms(model, prompt, make, steps)
    return rows


def parallel_masks(compiler: GrammarCompiler, rows: int, repeats: int = 20) -> tuple[float, float]:
    """Median microseconds to compute `rows` masks one by one, and with llguidance's parallel executor. Each
    row is at its own place in the document and consumes one token before each timing: a matcher keeps
    the mask of its current state, so timing the same state twice would time a cache."""
    tokens = compiler.tokenizer.tokenize_str(DOCUMENT)
    executor = llguidance.LLExecutor()
    bitmask = np.zeros((rows, compiler.words), dtype=np.int32)
    starts = [(row * 7) % (len(tokens) - repeats - 1) for row in range(rows)]

    def matchers() -> list[LLMatcher]:
        made = []
        for start in starts:
            matcher = LLMatcher(compiler.tokenizer, grammar_for(schema()), log_level=0)
            matcher.consume_tokens(tokens[:start])
            made.append(matcher)
        return made

    def one_by_one(group: list[LLMatcher]) -> None:
        for row, matcher in enumerate(group):
            matcher.unsafe_compute_mask_ptr(bitmask[row].ctypes.data, bitmask[row].nbytes)

    def parallel(group: list[LLMatcher]) -> None:
        fill_next_token_bitmask_par(executor, [(m, row) for row, m in enumerate(group)], bitmask)

    results = []
    for compute in (one_by_one, parallel):
        group, samples = matchers(), []
        for step in range(repeats):
            for matcher, start in zip(group, starts, strict=True):
                assert matcher.consume_token(tokens[start + step]), matcher.get_error()
            samples.append(timed(compute, group))
        results.append(median_us(samples))
    return results[0], results[1]


# -- report ------------------------------------------------------------------------------------------------


def main() -> None:
    llguidance_version = importlib.metadata.version("llguidance")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab-sizes", default="512,32000,128256,152064")
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed per row of table 2 and 3")
    args = parser.parse_args()
    sizes = [int(v) for v in args.vocab_sizes.split(",")]

    one_off: dict[int, dict[str, float]] = {}
    per_token: dict[int, dict[str, float]] = {}
    decoding: dict[int, dict[str, float]] = {}
    parallel: dict[int, list[tuple[int, float, float]]] = {}
    for size in sizes:
        tokenizer = synthetic_tokenizer(size)
        fast = fast_tokenizer(tokenizer)
        eos = [fast.convert_tokens_to_ids(tm.EOS)]
        build = min(timed(GrammarCompiler, fast, eos) for _ in range(3))
        compiler = GrammarCompiler(fast, eos)
        compile_s = min(timed(compiler.processor, schema()) for _ in range(5))
        one_off[size] = {"tokenizer ms": build * 1e3, "compile ms": compile_s * 1e3}
        width = -(-size // 128) * 128
        per_token[size] = mask_steps(compiler, width)
        decoding[size] = decode_rows(size, tokenizer, args.steps)
        parallel[size] = [(rows, *parallel_masks(compiler, rows)) for rows in (1, 4, 8, 16)]
        print(f"vocab {size}: done", file=sys.stderr, flush=True)

    print(f"\nmlx {importlib.metadata.version('mlx')}, llguidance {llguidance_version}, device {mx.default_device()}\n")
    print("One-off costs (best of runs), milliseconds")
    print("| vocab | build llguidance tokenizer | compile the schema (per request) |")
    print("| ---: | ---: | ---: |")
    for size in sizes:
        print(f"| {size} | {one_off[size]['tokenizer ms']:.1f} | {one_off[size]['compile ms']:.2f} |")

    tokens = int(per_token[sizes[0]]["tokens"])
    print(f"\nPer token, microseconds (median over the {tokens}-token document)")
    columns = ["consume", "mask", "A convert", "A apply", "B convert", "B apply", "C convert", "C apply",
               "D convert+apply", "processor"]
    print("| vocab | " + " | ".join(columns) + " |")
    print("| ---: |" + " ---: |" * len(columns))
    for size in sizes:
        print(f"| {size} | " + " | ".join(f"{per_token[size][c]:.0f}" for c in columns) + " |")

    print(f"\nDecode step, milliseconds, best of {RUNS} (random model: hidden 256, 4 layers; json_object)")
    names = list(decoding[sizes[0]])
    print("| vocab | " + " | ".join(names) + " |")
    print("| ---: |" + " ---: |" * len(names))
    for size in sizes:
        print(f"| {size} | " + " | ".join(f"{decoding[size][n]:.2f}" for n in names) + " |")

    print("\nMasks of N rows, microseconds (median): one by one / llguidance's parallel executor")
    print("| vocab | " + " | ".join(f"{rows} rows" for rows, _, _ in parallel[sizes[0]]) + " |")
    print("| ---: |" + " ---: |" * len(parallel[sizes[0]]))
    for size in sizes:
        print(f"| {size} | " + " | ".join(f"{a:.0f} / {b:.0f}" for _, a, b in parallel[size]) + " |")


if __name__ == "__main__":
    main()
