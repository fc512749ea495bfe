"""The MLX thread's host work in one constrained decode step, this checkout against an older one, the two
taking turns step by step in one process (a script, not a test).

    python tests/benchmarks/bench_constrained_host.py --before DIR [--vocab 128256] [--rows 1,8] [--steps 300]
        [--rounds 3]

DIR holds the older revision (`git archive REV | tar -x -C DIR`); its mlx_backend is loaded beside ours under
another name. No model: the logits are computed once, so what is timed is what the host does while a GPU
runs the forward pass (on a GPU whose step is ~2 ms, this is what the MLX thread adds to a CPU-bound step):
each row's matcher consuming its token, llguidance's masks, the MLX graph that unpacks and applies them (the
GPU's way, `masks.unpacked_on_device`), built, not evaluated (on a CPU, evaluating is the CPU computing;
on a GPU it is a launch per kernel: see the primitives). `1` row: the processor called as a request
alone calls it; more: a planned batch step (`plan_rows`, `MaskStep.apply`). The grammar is
bench_constrained_serving.py's (a JSON string of minLength 100000: every step inside the string), the
tokens fed those of a long text. Per step, wall µs and the MLX thread's CPU µs (llguidance's executor runs
several rows on its own threads, outside this figure); the median of each round, then the median of the
rounds; and the MLX primitives the step adds to the graph (each a node MLX evaluates; on CUDA the
non-view ones are kernel launches).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import mlx.core as mx
from bench_constrained import fast_tokenizer, synthetic_tokenizer

from tests.support import tiny_models as tm

SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 100_000}}, "required": ["text"],
          "additionalProperties": False}
TEXT = '{"text": "' + "The quick brown fox jumps over the lazy dog, and then it writes a long essay. " * 200


def load_before(checkout: Path, folder: Path) -> tuple[ModuleType, ModuleType, ModuleType]:
    """The older revision's constrained, masks and contract modules, as package `mlx_backend_before`."""
    package = folder / "mlx_backend_before"
    shutil.copytree(checkout / "mlx_backend", package)
    for source in package.rglob("*.py"):
        source.write_text(re.sub(r"\bmlx_backend\b(?=[.\s])", "mlx_backend_before", source.read_text()))
    sys.path.insert(0, str(folder))
    return tuple(importlib.import_module(f"mlx_backend_before.{m}")  # type: ignore[return-value]
                 for m in ("engine.constrained", "engine.masks", "contract"))


class Way:
    """One revision's rows, stepping through the same text."""

    def __init__(self, constrained: ModuleType, masks: ModuleType, contract: ModuleType, hf: Any, eos: int,
                 rows: int, width: int) -> None:
        masks.allowed_tokens = masks.unpacked_on_device  # the GPU's path
        self.masks = masks
        compiler = constrained.GrammarCompiler(hf, [eos])
        self.document: list[int] = compiler.tokenizer.tokenize_str(TEXT)
        constraint = contract.Constraint("json_schema", json.dumps(SCHEMA), strict=True)
        self.processors = [compiler.processor(constraint, max_tokens=100_000) for _ in range(rows)]
        self.logits = mx.random.normal((rows, width)).astype(mx.bfloat16)
        mx.eval(self.logits)
        for processor in self.processors:  # the first step feeds the prompt: nothing consumed
            mx.eval(processor(mx.array([1, 2, 3]), self.logits[:1]))
        self.at = 0

    def step(self) -> tuple[mx.array, float, float]:
        """One step's masked logits, built (not evaluated); the host's wall and CPU seconds to get there."""
        fed = mx.array([self.document[self.at]] * len(self.processors))
        self.at += 1
        mx.eval(fed)  # the previous step's samples, ready (as on a CPU-bound GPU step)
        began, began_cpu = time.perf_counter(), time.thread_time()
        if len(self.processors) == 1:
            out = self.processors[0](fed, self.logits)
        else:
            out = self.masks.plan_rows(list(enumerate(self.processors)), fed).apply(self.logits, self.processors)
        return out, time.perf_counter() - began, time.thread_time() - began_cpu


def primitives(out: mx.array) -> str:
    with tempfile.TemporaryDirectory() as folder:
        dot = Path(folder) / "step.dot"
        mx.export_to_dot(str(dot), out)
        names = collections.Counter(re.findall(r'label ="([^"]+)"', dot.read_text()))
    return f"{sum(names.values())} ({', '.join(f'{n} {k}' if n > 1 else k for k, n in sorted(names.items()))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import mlx_backend.contract as contract
    import mlx_backend.engine.constrained as constrained
    import mlx_backend.engine.masks as masks

    with tempfile.TemporaryDirectory() as folder:
        before = load_before(args.before, Path(folder))
        hf = fast_tokenizer(synthetic_tokenizer(args.vocab))
        eos = hf.convert_tokens_to_ids(tm.EOS)
        width = -(-args.vocab // 128) * 128
        print(f"mlx {mx.__version__} on {mx.default_device()}; vocab {args.vocab} (logits {width}); {args.steps} "
              f"steps x {args.rounds} rounds, the two revisions taking turns each step; unpack as on a GPU")
        print("| rows | revision | wall µs/step | MLX thread CPU µs/step | rounds (CPU) | MLX primitives added |")
        print("| ---: | --- | ---: | ---: | --- | --- |")
        for rows in (int(r) for r in args.rows.split(",")):
            rounds: dict[str, list[tuple[float, float]]] = {"before": [], "after": []}
            ops = {}
            for _ in range(args.rounds):
                ways = {"before": Way(*before, hf, eos, rows, width),
                        "after": Way(constrained, masks, contract, hf, eos, rows, width)}
                taken: dict[str, list[tuple[float, float]]] = {name: [] for name in ways}
                for step in range(args.steps):
                    for name, way in ways.items():
                        out, wall, cpu = way.step()
                        if step == 0:
                            ops[name] = primitives(out)
                        mx.eval(out)
                        if step >= 10:  # warmed up
                            taken[name].append((wall, cpu))
                for name, samples in taken.items():
                    rounds[name].append((statistics.median(s[0] for s in samples),
                                         statistics.median(s[1] for s in samples)))
                for way in ways.values():
                    for processor in way.processors:
                        processor.raise_if_failed()
            for name, medians in rounds.items():
                wall = statistics.median(m[0] for m in medians) * 1e6
                cpu = statistics.median(m[1] for m in medians) * 1e6
                each = ", ".join(f"{m[1] * 1e6:.0f}" for m in medians)
                print(f"| {rows} | {name} | {wall:.0f} | {cpu:.0f} | {each} | {ops[name]} |", flush=True)


if __name__ == "__main__":
    main()
