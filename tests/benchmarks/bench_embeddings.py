"""Embeddings per second through the gateway (a real `mlx-gateway serve`, HTTP, the engine process) beside the
same model computed directly in one process (mlx_backend.engine.embeddings: tokenize, padded forward passes, pool,
normalise), for 1, 32 and 256 short inputs per request, one request at a time; and one input per request from
`--clients` concurrent clients (whose requests the engine batches together).

    python tests/benchmarks/bench_embeddings.py [--layers 12] [--hidden 384] [--seconds 10] [--sizes 1,32,256]
        [--clients 16]

The model is random, with bge-small-en-v1.5's shape by default (BERT, 12 layers, 384 wide, 12 heads, 1536 in
the MLP, a 30522-token vocabulary, CLS pooling); inputs are 8 to 14 words.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx

from mlx_backend.embedding_spec import read_spec
from mlx_backend.engine import model_load
from mlx_backend.engine.embeddings import embed, hidden_size, tokenize
from mlx_backend.registry import ModelRegistry
from tests.support.server import ServerProcess
from tests.support.tiny_embedding_models import make_tiny_bert
from tests.support.tiny_models import COMMON_WORDS

MODEL = "bge-small-shape"


def inputs(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = COMMON_WORDS.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 14))) for _ in range(count)]


def rate(run: object, size: int, seconds: float) -> tuple[float, float]:
    """(embeddings per second, median seconds per request) over `seconds` of back-to-back requests."""
    times: list[float] = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 3:
        begun = time.perf_counter()
        run(inputs(size, len(times)))  # type: ignore[operator]
        times.append(time.perf_counter() - begun)
    times.sort()
    return size * len(times) / sum(times), times[len(times) // 2]


def concurrent_rate(base_url: str, clients: int, seconds: float) -> float:
    """Embeddings per second from `clients` threads each sending one input per request, back to back."""
    counts = [0] * clients
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        with httpx.Client(base_url=base_url, timeout=600) as http:
            while time.perf_counter() < stop:
                http.post("/v1/embeddings", json={"model": MODEL, "input": inputs(1, k * 7919 + counts[k])[0],
                                                  "encoding_format": "base64"}).raise_for_status()
                counts[k] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--sizes", default="1,32,256")
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        make_tiny_bert(root / MODEL, layers=args.layers, hidden=args.hidden, heads=args.hidden // 32,
                       intermediate=args.hidden * 4, context=512, vocab_size=30522)
        artifacts = model_load.load(ModelRegistry([root], None, False).resolve(MODEL))
        spec = read_spec(root / MODEL)
        assert spec is not None
        width = hidden_size(artifacts.config)

        def direct(texts: list[str]) -> None:
            embed(artifacts.model, spec, tokenize(artifacts.tokenizer, tuple(texts), 512, MODEL), width)

        server = ServerProcess(["--models-dir", str(root), "--log-level", "warning"], Path(tmp) / "server.log")
        server.start()
        try:
            server.wait_ready()
            with httpx.Client(base_url=server.base_url, timeout=600) as client:
                def gateway(texts: list[str]) -> None:
                    response = client.post("/v1/embeddings", json={"model": MODEL, "input": texts,
                                                                   "encoding_format": "base64"})
                    response.raise_for_status()

                gateway(inputs(4, 99))  # loads the model
                direct(inputs(4, 99))
                rows = []
                for size in sizes:
                    in_process = rate(direct, size, args.seconds)
                    through = rate(gateway, size, args.seconds)
                    rows.append((size, in_process, through))
                concurrent = concurrent_rate(server.base_url, args.clients, args.seconds)
        except Exception:
            print(server.log()[-4000:], file=sys.stderr)
            raise
        finally:
            server.stop()
    print(f"model: random BERT, {args.layers} layers x {args.hidden} wide (bge-small's shape), 8-14 word inputs")
    print("| inputs per request | in one process: embeddings/s (median request) | through the gateway: "
          "embeddings/s (median request) | gateway / direct |")
    print("| ---: | ---: | ---: | ---: |")
    for size, (d_rate, d_median), (g_rate, g_median) in rows:
        print(f"| {size} | {d_rate:.0f} ({d_median * 1000:.1f} ms) | {g_rate:.0f} ({g_median * 1000:.1f} ms) | "
              f"{g_rate / d_rate:.2f} |")
    print(f"| 1, from {args.clients} concurrent clients | - | {concurrent:.0f} | - |")


if __name__ == "__main__":
    main()
