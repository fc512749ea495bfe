"""The host time of one decode step's grammar masks, for N constrained rows (a script, not a test).

    python tests/benchmarks/bench_mask_stage.py [--rows 1,8,32] [--vocab demo,152064] [--steps 40] [--unpack device]

No model runs: each row is a request at its own place in a JSON document (three grammars in turn: a strict
pydantic schema, json_object, and the same schema as a Lark `%json` rule as forced tool calls have), and
each timed step feeds every row its next token, as decoding does. Per step:
- `host`: the MLX thread's time from the step's start to the masked logits of every row being built (what
  a GPU waits for when it is longer than the forward pass): consume, masks, turning them into MLX arrays;
- `total`: the same plus evaluating the masked logits (on a CPU this also counts what a GPU would do);
- `host CPU`: the process's CPU time over the `host` part (all its threads: llguidance's, MLX's), which a
  busy shared machine inflates less than the wall-clock figures.
Run against another revision (`git archive REV | tar -x -C DIR`) with `--repo DIR`: a revision whose
processors have `begin_step` is driven the way its batcher drove them (the token before the step, masks on
worker threads, each row's mask turned into a bool array on the host); a later one with `plan_rows`
(mlx_backend/masks.py): as `batched`, each row's processor called (a slice, a `where`, and the concatenation
mlx-lm's per-row loop makes), as `batch-wide` (a revision with `MaskStep.apply`) the whole batch's logits
masked in one op as the batcher's planned step does, and, as `per-row`, each row a step of its own (a
processor nobody planned).
`demo` is the demo model's vocabulary (2048 tokens); a number is a synthetic byte-level vocabulary of that
size (bench_constrained.py's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--vocab", default="demo,152064")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--label", default="")
    parser.add_argument("--unpack", choices=["auto", "device"], default="auto",
                        help="device: unpack the bitmask the way a GPU does (masks.unpacked_on_device), on this CPU")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests.support from this checkout
    import mlx.core as mx
    from bench_constrained import DOCUMENT, fast_tokenizer, schema, synthetic_tokenizer

    sys.path.insert(0, str(args.repo))  # mlx_backend from the revision measured (bench_constrained put ours)
    for name in [m for m in sys.modules if m == "mlx_backend" or m.startswith("mlx_backend.")]:
        del sys.modules[name]
    from mlx_backend.demo import demo_model_path
    from mlx_backend.grammar import json_value_for_lark

    try:  # the engine's modules moved under mlx_backend/engine/ (issue 23): either layout can be measured
        import mlx_backend.engine.constrained as constrained
        import mlx_backend.engine.masks as masks

        if args.unpack == "device":
            masks.allowed_tokens = masks.unpacked_on_device
        from mlx_backend.contract import Constraint
    except ImportError:
        import mlx_backend.constrained as constrained  # type: ignore[no-redef]
        from mlx_backend.types import Constraint  # type: ignore[no-redef]
    from tests.support import tiny_models as tm

    planned = hasattr(constrained.ConstraintProcessor, "plan")
    modes = ["batched", "per-row"] if planned else ["before: begin_step"]
    if hasattr(constrained.ConstraintProcessor, "guides"):  # MaskStep.apply: the whole batch in one op
        modes.insert(0, "batch-wide")
    grammars = [schema(), Constraint("json_object"),
                Constraint("lark", "start: " + json_value_for_lark(json.loads(schema().source)))]
    where = Path(constrained.__file__).parents[1]
    print(f"mlx_backend from {where} {args.label}; mlx {mx.__version__} on {mx.default_device()}; unpack {args.unpack}")
    print("| vocab | rows | way | host µs/step (median) | total µs/step (median) | host CPU µs/step (median) |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for vocab in args.vocab.split(","):
        if vocab == "demo":
            from transformers import AutoTokenizer

            hf = AutoTokenizer.from_pretrained(str(demo_model_path()))
            eos = [hf.eos_token_id]
        else:
            hf = fast_tokenizer(synthetic_tokenizer(int(vocab)))
            eos = [hf.convert_tokens_to_ids(tm.EOS)]
        compiler = constrained.GrammarCompiler(hf, eos)
        width = -(-compiler.tokenizer.vocab_size // 128) * 128
        document = compiler.tokenizer.tokenize_str(DOCUMENT)
        assert len(document) > args.steps + 8, "the document is too short for that many steps"
        for rows in (int(r) for r in args.rows.split(",")):
            for mode in modes:
                host, total, cpu = _run(mx, constrained, compiler, grammars, document, rows, width, args.steps, mode)
                print(f"| {vocab} ({compiler.tokenizer.vocab_size}) | {rows} | {mode} | {host:.0f} | {total:.0f} "
                      f"| {cpu:.0f} |", flush=True)


def _run(mx: Any, constrained: Any, compiler: Any, grammars: list[Any], document: list[int], rows: int,
         width: int, steps: int, mode: str) -> tuple[float, float, float]:
    span = len(document) - steps - 1
    starts = [(row * 11) % span for row in range(rows)]
    processors = []
    for row, start in enumerate(starts):
        processor = compiler.processor(grammars[row % len(grammars)])
        assert processor._matcher.consume_tokens(document[:start]), processor._matcher.get_error()
        processor._started = True  # as after its first step
        processors.append(processor)
    logits = mx.random.normal((rows, width)).astype(mx.bfloat16)
    mx.eval(logits)
    context = mx.array(document[:8])  # what mlx-lm passes; a planned step does not read it
    host: list[float] = []
    total: list[float] = []
    cpu: list[float] = []
    for step in range(steps):
        tokens = [document[start + step] for start in starts]
        fed = mx.array(tokens)
        mx.eval(fed)
        began, began_cpu = time.perf_counter(), time.process_time()
        if mode in ("batched", "batch-wide"):
            from mlx_backend.engine.masks import plan_rows

            planned_step = plan_rows(list(enumerate(processors)), fed)
        elif mode.startswith("before"):
            for processor, token in zip(processors, tokens, strict=True):
                processor.begin_step(token)
        if mode == "batch-wide":
            outs = [planned_step.apply(logits, processors)]
        else:
            outs = []
            for row, processor in enumerate(processors):
                ctx = mx.concatenate([context, fed[row:row + 1]]) if mode == "per-row" else context
                outs.append(processor(ctx, logits[row:row + 1]))
            if mode != "per-row":
                outs = [mx.concatenate(outs, axis=0)]  # as mlx-lm's per-row loop ends
        built, built_cpu = time.perf_counter(), time.process_time()
        mx.eval(outs)
        done = time.perf_counter()
        host.append(built - began)
        total.append(done - began)
        cpu.append(built_cpu - began_cpu)
        for processor in processors:
            processor.raise_if_failed()
    return statistics.median(host) * 1e6, statistics.median(total) * 1e6, statistics.median(cpu) * 1e6


if __name__ == "__main__":
    main()
