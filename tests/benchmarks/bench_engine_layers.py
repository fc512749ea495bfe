"""Where the time goes inside the engine, one layer at a time, in one process and with no HTTP.

    python tests/benchmarks/bench_engine_layers.py --model DIR [--batch-sizes 1,8,32,64] [--max-tokens 128]

Rows, each the best of RUNS: mlx-lm's `stream_generate` (lone request); mlx-lm's `BatchGenerator` driven
directly (the batching ceiling of the library we build on); our `Batcher` (BatchGenerator plus per-request
detokenizing, stop matching and event building; a lone request runs solo) with events collected in memory;
and the same Batcher in the real engine process driven by `EngineClient` over the socket (what the gateway
sees, minus HTTP). The gap between BatchGenerator and our Batcher is our own per-token cost; the next one
is IPC; the gap to the serving benchmark is HTTP and the client.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from anywhere, like the other benches

import mlx.core as mx
from mlx_lm import load, stream_generate
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from mlx_backend.client.engine import EngineClient
from mlx_backend.contract import Delta, EngineConfig, Event, Finished, Generate, Heartbeat, ModelEvent, SamplingParams
from mlx_backend.engine import joining
from mlx_backend.engine.batcher import Batcher
from mlx_backend.engine.residency.residency import Residency
from mlx_backend.registry import ModelRegistry

PROMPT = " ".join(["the"] * 64)
RUNS = 3  # each figure is the best of this many runs: a GPU's first passes over new shapes are slow


def best_of(run: Callable[..., float], *args: Any, **kwargs: Any) -> float:
    return max(run(*args, **kwargs) for _ in range(RUNS))


def timed_stream_generate(model: Any, tokenizer: Any, max_tokens: int) -> float:
    sampler = make_sampler(temp=0.0)
    start = time.perf_counter()
    tokens = sum(1 for _ in stream_generate(model, tokenizer, PROMPT, max_tokens=max_tokens, sampler=sampler))
    return tokens / (time.perf_counter() - start)


def timed_batch_generator(model: Any, tokenizer: Any, batch: int, max_tokens: int) -> float:
    prompt = tokenizer.encode(PROMPT)
    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=max(batch, 1),
                               prefill_batch_size=min(8, batch))
    generator.insert([prompt] * batch, max_tokens=[max_tokens] * batch)
    start = time.perf_counter()
    produced = finished = 0
    while finished < batch:
        _, responses = generator.next()
        produced += len(responses)
        finished += sum(1 for r in responses if r.finish_reason is not None)
    generator.close()
    return produced / (time.perf_counter() - start)


def warm_batcher(model_dir: Path, config: EngineConfig, max_tokens: int) -> tuple[Batcher, list[Event]]:
    """A Batcher on the model, after one request as long as the measured ones (the load, the kernels of every
    cache size); events collect in the list."""
    events: list[Event] = []
    registry = ModelRegistry([model_dir.parent], None, False)
    batcher = Batcher(config, lambda residency_events: Residency(
        registry, 0, 30.0, events=residency_events, prefix_cache_bytes=config.prompt_cache_bytes,
    ), events.append)
    batcher.submit(Generate("warm", model_dir.name, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                            prompt=PROMPT))
    while batcher.has_work():
        batcher.step()
    events.clear()
    return batcher, events


def timed_batcher(model_dir: Path, batch: int, max_tokens: int, prompt_cache_bytes: int = 0) -> float:
    config = EngineConfig(models_dirs=(str(model_dir.parent),), max_running=max(batch, 1),
                          prompt_cache_bytes=prompt_cache_bytes)
    batcher, events = warm_batcher(model_dir, config, max_tokens)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for i in range(batch):
        batcher.submit(Generate(f"r{i}", model_dir.name, params, prompt=PROMPT))
    start = time.perf_counter()
    while batcher.has_work():
        batcher.step()
    elapsed = time.perf_counter() - start
    assert sum(isinstance(e, Finished) for e in events) == batch
    batcher.shutdown()
    return sum(e.tokens for e in events if isinstance(e, Delta)) / elapsed


@contextlib.contextmanager
def counted_passes(model: Any) -> Iterator[list[int]]:
    """Counts the forward passes of every model of `model`'s class while the block runs (one number: on a GPU
    a small model's pass costs about the same whatever it feeds, so passes per token say what a step costs)."""
    model_class = type(model)
    forward = model_class.__call__
    count = [0]

    def counted(self: Any, *args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return forward(self, *args, **kwargs)

    model_class.__call__ = counted
    try:
        yield count
    finally:
        model_class.__call__ = forward


def closed_loop_generator(model: Any, tokenizer: Any, clients: int, max_tokens: int,
                          rounds: int, prefill_batch: int = 8, join: bool = False) -> tuple[float, float, int]:
    """BatchGenerator alone in a closed loop: client i sends its first request at step i (arrivals staggered,
    as HTTP clients' are), then its next one as soon as one ends, `rounds` in all; `join`: new rows join the
    batch's step (engine/joining.py). (tok/s, median ms from insert to first token, forward passes)."""
    prompt = tokenizer.encode(PROMPT)
    generator = BatchGenerator(model, stop_tokens=[], completion_batch_size=max(clients, 1),
                               prefill_batch_size=min(prefill_batch, clients))
    if join:
        joining.join_in_step(generator)
    left = {c: rounds for c in range(clients)}
    owner: dict[int, int] = {}
    asked: dict[int, float] = {}
    ttft: list[float] = []
    produced = started = 0

    def ask(client: int) -> None:
        left[client] -= 1
        (uid,) = generator.insert([prompt], max_tokens=[max_tokens])
        owner[uid], asked[uid] = client, time.perf_counter()

    start = time.perf_counter()
    with counted_passes(model) as passes:
        while owner or started < clients:
            if started < clients:
                ask(started)
                started += 1
            _, responses = generator.next()
            now = time.perf_counter()
            for r in responses:
                produced += 1
                if (when := asked.pop(r.uid, None)) is not None:
                    ttft.append(now - when)
                if r.finish_reason is not None:
                    client = owner.pop(r.uid)
                    if left[client]:
                        ask(client)
    elapsed = time.perf_counter() - start
    generator.close()
    return produced / elapsed, 1000 * statistics.median(ttft), passes[0]


@dataclass
class ClosedLoop:
    """What a closed loop of clients on our Batcher made."""

    tokens: int
    seconds: float
    steps: int
    passes: int  # forward passes of the model
    ttft_s: list[float]  # per request, submit to first token
    ttft_steps: list[int]


def drive_closed_loop(batcher: Batcher, events: list[Event], model_name: str, model: Any, clients: int,
                      max_tokens: int, rounds: int, asks_at: Callable[[int, int], int]) -> ClosedLoop:
    """Clients in a closed loop on `batcher` (no IPC), `rounds` requests each: client c asks first at step
    asks_at(c, rounds), and again asks_at(c, requests left) steps after its last token. `model` is of the class
    whose passes are counted."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    left = {c: rounds for c in range(clients)}
    due: dict[int, list[int]] = collections.defaultdict(list)  # step -> clients asking then
    for client in range(clients):
        due[asks_at(client, rounds)].append(client)
    asked: dict[str, tuple[float, int]] = {}
    result = ClosedLoop(0, 0.0, 0, 0, [], [])
    start = time.perf_counter()
    with counted_passes(model) as passes:
        while batcher.has_work() or any(due.values()):
            for client in due.pop(result.steps, []):
                left[client] -= 1
                rid = f"c{client}-{left[client]}"
                asked[rid] = (time.perf_counter(), result.steps)
                batcher.submit(Generate(rid, model_name, params, prompt=PROMPT))
            batcher.step()
            result.steps += 1
            now = time.perf_counter()
            for event in events:
                if isinstance(event, Delta):
                    result.tokens += event.tokens
                    if (when := asked.pop(event.request_id, None)) is not None:
                        result.ttft_s.append(now - when[0])
                        result.ttft_steps.append(result.steps - when[1])
                elif isinstance(event, Finished):
                    client = int(event.request_id[1:].split("-")[0])
                    if left[client]:
                        due[result.steps + asks_at(client, left[client])].append(client)
            events.clear()
    result.seconds = time.perf_counter() - start
    result.passes = passes[0]
    return result


def closed_loop_batcher(model_dir: Path, model: Any, clients: int, max_tokens: int, rounds: int,
                        gather_steps: int = 0, prefill_batch: int = 0) -> tuple[float, float, int]:
    """Our Batcher in the same closed loop as closed_loop_generator (no IPC): (tok/s, median ms from submit to
    first token, forward passes: `model` is of the class whose passes are counted)."""
    config = EngineConfig(models_dirs=(str(model_dir.parent),), max_running=max(clients, 1), prompt_cache_bytes=0,
                          prefill_gather_steps=gather_steps, prefill_batch=prefill_batch)
    batcher, events = warm_batcher(model_dir, config, max_tokens)
    # the first requests one a step, each next one as soon as the last ended
    loop = drive_closed_loop(batcher, events, model_dir.name, model, clients, max_tokens, rounds,
                             lambda client, left: client if left == rounds else 0)
    batcher.shutdown()
    return loop.tokens / loop.seconds, 1000 * statistics.median(loop.ttft_s), loop.passes


class _Quiet:
    def on_heartbeat(self, heartbeat: Heartbeat) -> None: ...
    def on_restart(self, reason: str) -> None: ...
    def on_cancelled(self, finished: Finished) -> None: ...
    def on_down(self, reason: str) -> None: ...
    def on_model_event(self, event: ModelEvent) -> None: ...


async def timed_engine_process(model_dir: Path, batches: list[int], max_tokens: int) -> dict[int, float]:
    """Our Batcher in its own process, driven over the socket; tok/s per batch size (best of RUNS)."""
    config = EngineConfig(models_dirs=(str(model_dir.parent),), max_running=max(batches), prompt_cache_bytes=0,
                          include_demo_model=False)
    client = EngineClient(config, _Quiet())
    await client.start()
    assert await client.wait_until_up(120), "the engine process did not come up"
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)

    async def one(rid: str) -> int:
        tokens = 0
        request = client.submit(Generate(rid, model_dir.name, params, prompt=PROMPT))
        while not isinstance(event := await request.next(), Finished):
            if isinstance(event, Delta):
                tokens += event.tokens
        return tokens

    try:
        await one("warm")
        results: dict[int, float] = {}
        for batch in batches:
            best = 0.0
            for attempt in range(RUNS):
                start = time.perf_counter()
                produced = await asyncio.gather(*(one(f"b{batch}-{attempt}-{i}") for i in range(batch)))
                rate = sum(produced) / (time.perf_counter() - start)
                print(f"  over IPC, batch {batch}: {rate:.1f} tok/s", file=sys.stderr)
                best = max(best, rate)
            results[batch] = best
        return results
    finally:
        await client.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--closed-loop", action="store_true",
                        help="instead: each batch size as that many clients in a closed loop, arrivals staggered")
    parser.add_argument("--rounds", type=int, default=4, help="requests per client in the closed loop")
    parser.add_argument("--gather-steps", default="0", help="closed loop: prefill_gather_steps values to compare")
    args = parser.parse_args()
    model, tokenizer = load(str(args.model))
    print(f"device {mx.default_device()}; {args.max_tokens} new tokens; greedy")
    timed_stream_generate(model, tokenizer, 16)  # warm-up: kernels, allocator
    timed_batch_generator(model, tokenizer, 8, 16)
    if args.closed_loop:
        for clients in [int(b) for b in args.batch_sizes.split(",")]:
            wave = best_of(timed_batch_generator, model, tokenizer, clients, args.max_tokens)
            tokens = clients * args.rounds * args.max_tokens
            raw, raw_ttft, raw_passes = closed_loop_generator(model, tokenizer, clients, args.max_tokens, args.rounds)
            print(f"clients {clients}: one wave {wave:.1f} tok/s; closed loop: BatchGenerator {raw:.1f} tok/s "
                  f"({raw / wave:.2f}, TTFT p50 {raw_ttft:.1f} ms, {100 * raw_passes / tokens:.1f} passes per "
                  f"100 tokens)", flush=True)
            for gather in [int(g) for g in args.gather_steps.split(",")]:
                ours, ours_ttft, ours_passes = closed_loop_batcher(args.model, model, clients, args.max_tokens,
                                                                   args.rounds, gather)
                print(f"  our Batcher, gathering {gather} steps: {ours:.1f} tok/s ({ours / wave:.2f}, "
                      f"TTFT p50 {ours_ttft:.1f} ms, {100 * ours_passes / tokens:.1f} passes per 100 tokens)",
                      flush=True)
        return
    print(f"{'layer':<28}{'batch':>6}{'tok/s':>10}")
    alone = best_of(timed_stream_generate, model, tokenizer, args.max_tokens)
    print(f"{'mlx_lm.stream_generate':<28}{1:>6}{alone:>10.1f}")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    over_ipc = asyncio.run(timed_engine_process(args.model, batches, args.max_tokens))
    for batch in batches:
        raw = best_of(timed_batch_generator, model, tokenizer, batch, args.max_tokens)
        ours = best_of(timed_batcher, args.model, batch, args.max_tokens)
        print(f"{'mlx_lm BatchGenerator':<28}{batch:>6}{raw:>10.1f}")
        print(f"{'our Batcher (no IPC)':<28}{batch:>6}{ours:>10.1f}  ({ours / raw:.2f} of BatchGenerator)")
        cached = best_of(timed_batcher, args.model, batch, args.max_tokens, prompt_cache_bytes=1 << 30)
        print(f"{'  + prefix cache (1 GiB)':<28}{batch:>6}{cached:>10.1f}  ({cached / raw:.2f} of BatchGenerator)")
        ipc = over_ipc[batch]
        print(f"{'engine process over IPC':<28}{batch:>6}{ipc:>10.1f}  ({ipc / raw:.2f} of BatchGenerator)")


if __name__ == "__main__":
    main()
