"""A model load in pieces, so other models' streams keep decoding while it happens.

What MLX allows: since 0.31.2 every thread has its own default stream, and a GPU stream is thread-affine: a
graph built on one thread must be evaluated there ("There is no Stream(gpu, N) in current thread"). mlx-lm's
modules keep lazy arrays outside their parameters (RoPE frequencies, for one), so a model built on a loader
thread would leave graph nodes the MLX thread cannot evaluate on a GPU. So every `mx` call stays on the MLX
thread, and only work that touches no MLX runs beside it:

  reading   (loader thread)  config and tokenizer (transformers/tokenizers, no MLX), then every weight file
                             read once, so its pages are in the page cache: the slow part of a cold load is
                             disk I/O, and it happens here, GIL released, while the MLX thread decodes.
  building  (MLX thread)     `load_model(lazy=True)`: the module tree and lazy arrays that point into the
                             files (milliseconds: nothing is read).
  loading   (MLX thread)     the parameters evaluated a few at a time between decode steps: each piece is a
                             copy from the page cache. One tensor is the smallest piece (an embedding table
                             may be hundreds of MB; at Apple-silicon bandwidth that is milliseconds).
  warming   (MLX thread)     one short generation (a 4-token prefill, then two tokens, one per piece), so
                             kernel compilation (seconds on CUDA) is paid here, not by the first request.
                             A kernel compiles inside one evaluation, so on a GPU a piece can take that long;
                             the first request would have paused the same streams for it anyway.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import mlx.core as mx
import numpy as np
from mlx.nn.layers.base import Module
from mlx.utils import tree_flatten

from mlx_backend.engine import model_check
from mlx_backend.engine.model_check import LoadedArtifacts
from mlx_backend.errors import EngineError
from mlx_backend.registry import ModelEntry, context_length_of

if TYPE_CHECKING:  # imported for real by model_check, once the hub is switched off
    from mlx_lm.tokenizer_utils import TokenizerWrapper

log = logging.getLogger("mlx_gateway.engine.loader")

Stage = Literal["reading", "building", "loading", "warming", "done"]

_READ_BLOCK = 8 << 20
_WARMUP_TEXT = "Hello! This short prompt warms the model up before its first request."
_WARMUP_PROMPT_TOKENS = 4
_WARMUP_NEW_TOKENS = 2


@dataclass(frozen=True)
class Progress:
    stage: Stage
    bytes_read: int  # weight-file bytes read from disk so far
    bytes_loaded: int  # tensor bytes in memory so far
    bytes_total: int  # weight-file bytes


class StagedLoad:
    """Load one model; `advance` does the next piece on the MLX thread and returns the artifacts once done."""

    def __init__(self, entry: ModelEntry, size: int, *, warmup: bool = True, prefill_step_size: int = 2048,
                 read_delay_s: float = 0.0) -> None:
        self.entry = entry
        self.size = size  # tensor bytes, from the headers
        self.warmup = warmup
        self.prefill_step_size = prefill_step_size
        self._read_delay_s = read_delay_s  # test-only: a slow disk, so a load can be watched while it reads
        self.stage: Stage = "reading"
        self.started = time.monotonic()
        self.warmup_s: float | None = None
        self.longest_piece: tuple[float, str] = (0.0, "")  # the MLX thread's longest call here, and its stage
        self.bytes_loaded = 0
        self._files = model_check.weight_files(entry)
        self.bytes_total = sum(_file_size(f) for f in self._files)
        self.bytes_read = 0  # written by the loader thread only
        self._cancelled = threading.Event()
        self._error: EngineError | None = None
        self._config: dict[str, Any] | None = None
        self._tokenizer: Any = None
        self._model: Any = None
        self._pending: list[tuple[str, Any]] = []  # parameters not yet evaluated
        self._file_bytes: dict[str, int] = {}  # parameter -> its bytes in the file (progress counts these)
        self._upcast = False  # some parameters were float16 and are now float32
        self.float16_upcast = model_check.upcasts_float16()  # on the CPU (mlx_backend/engine/model_check.py says why)
        self._warm: Any = None  # the warm-up generation (a SoloGeneration), while it runs
        self._warm_tokens = 0
        # Started by the first `advance`, not here: the request that asked for the load has said so to the
        # gateway by then. Parsing a large tokenizer can hold the GIL for seconds, silencing even the
        # heartbeat thread; the gateway allows that silence only once it knows a model loads.
        self._reader = threading.Thread(target=self._read, name=f"load-{entry.id}"[:32], daemon=True)

    @property
    def progress(self) -> Progress:
        return Progress(self.stage, min(self.bytes_read, self.bytes_total), self.bytes_loaded, self.bytes_total)

    def cancel(self) -> None:
        self._cancelled.set()

    # -- the loader thread (no MLX) --------------------------------------------------------------------

    def _read(self) -> None:
        entry = self.entry
        try:
            # Tokenizer first: it is cheap and often the broken part, so it fails before gigabytes are read.
            config = model_check.load_config(entry.path)
            try:
                self._tokenizer = model_check.load_tokenizer(  # type: ignore[no-untyped-call]
                    entry.path, eos_token_ids=config.get("eos_token_id")
                )
            except Exception as exc:
                cause = f"its tokenizer is broken ({model_check.describe_exception(exc)})."
                raise model_check.load_failure(entry, cause) from exc
            if entry.kind != "embedding":  # no generation, so no grammars
                _prepare_grammars(self._tokenizer)
            self._config = config
            buffer = bytearray(_READ_BLOCK)
            for path in self._files:
                with open(path, "rb", buffering=0) as f:
                    while True:
                        if self._read_delay_s:
                            self._cancelled.wait(self._read_delay_s)
                        if self._cancelled.is_set():
                            break
                        n = f.readinto(buffer)
                        if not n:
                            break
                        self.bytes_read += n
        except EngineError as exc:
            self._error = exc
        except OSError as exc:
            cause = f"{exc.filename or 'a file'} cannot be read ({exc.strerror or exc})."
            self._error = model_check.load_failure(entry, cause)
        except Exception as exc:
            log.warning("reading %s from %s failed", entry.id, entry.path, exc_info=True)
            self._error = model_check.load_failure(entry, f"{model_check.describe_exception(exc)}.")

    # -- the MLX thread --------------------------------------------------------------------------------

    def _start_reading(self) -> None:
        if self._reader.ident is None:
            self._reader.start()

    def wait_reading(self, timeout_s: float) -> None:
        """Block up to `timeout_s` while the loader thread reads (for an engine with nothing else to do)."""
        self._start_reading()
        if self.stage == "reading":
            self._reader.join(timeout_s)

    def advance(self, budget_s: float) -> LoadedArtifacts | None:
        """Work for about `budget_s` (at least one piece); the artifacts when the load is complete.
        The first call starts the loader thread. Raises EngineError naming the cause."""
        self._start_reading()
        started, stage = time.monotonic(), self.stage
        try:
            return self._advance(started + budget_s)
        finally:
            took = time.monotonic() - started
            if took > self.longest_piece[0]:
                self.longest_piece = (took, stage)

    def _advance(self, deadline: float) -> LoadedArtifacts | None:
        try:
            if self.stage == "reading":
                if self._reader.is_alive():
                    return None
                if self._error is not None:
                    raise self._error
                self.stage = "building"
            if self.stage == "building":
                self._build()
                self.stage = "loading"
                return None  # the build was this piece
            if self.stage == "loading":
                while self._pending:
                    name, array = self._pending.pop()
                    mx.eval(array)
                    self.bytes_loaded += self._file_bytes.get(name, array.nbytes)  # of bytes_total, file bytes
                    if time.monotonic() >= deadline:
                        return None
                mx.eval(self._model.parameters())  # nothing left to read; checks no parameter was missed
                self.stage = "warming" if self.warmup and self.entry.kind != "embedding" else "done"
                return None
            if self.stage == "warming":
                if not self._warm_up_piece():
                    return None
                self.stage = "done"
        except EngineError:
            self._drop()
            raise
        except Exception as exc:  # shape mismatches, missing tensors, unsupported dtypes, I/O errors...
            log.warning("loading %s from %s failed", self.entry.id, self.entry.path, exc_info=True)
            self._drop()
            raise model_check.load_failure(self.entry, f"{model_check.describe_exception(exc)}.") from exc
        return self._artifacts()

    def run(self) -> LoadedArtifacts:
        """The whole load at once (tests, tools)."""
        while True:
            self.wait_reading(3600)
            artifacts = self.advance(3600)
            if artifacts is not None:
                return artifacts

    def _build(self) -> None:
        if self.entry.kind == "embedding":  # mlx_backend/engine/embeddings.py builds those
            from mlx_backend.engine import embeddings

            model, config = embeddings.load_model(self.entry.path, lazy=True)
        else:
            model, config = model_check.load_model(self.entry.path, lazy=True, trust_remote_code=False)
        self._model, self._config = model, config
        file_params: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
        self._file_bytes = {name: array.nbytes for name, array in file_params}
        self._upcast = self.float16_upcast and any(a.dtype == mx.float16 for _, a in file_params)
        if self._upcast:
            model_check.upcast_float16(model)
        # Popped from the end: reversed so the pieces follow the module order (embeddings, layers, head).
        params: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
        self._pending = list(reversed(params))

    def _warm_up_piece(self) -> bool:
        """One token of the warm-up generation (the first also runs the prefill); True once it is over. A
        prompt of a few tokens and two new ones: the prefill and the decode kernels each run once."""
        from mlx_backend.engine.solo import SoloGeneration  # imports mlx_lm's generation code

        started = time.monotonic()
        try:
            if self._warm is None:
                tokens = list(self._tokenizer.encode(_WARMUP_TEXT))[:_WARMUP_PROMPT_TOKENS] or [0]
                tokens = (tokens * _WARMUP_PROMPT_TOKENS)[:_WARMUP_PROMPT_TOKENS]
                self._warm = SoloGeneration(self._model, tokens, None, 0, _greedy, None, self.prefill_step_size)
            self._warm_tokens += 1
            self._warm.next_token(more=self._warm_tokens < _WARMUP_NEW_TOKENS)
        except Exception as exc:
            cause = f"its warm-up generation failed ({model_check.describe_exception(exc)})."
            raise model_check.load_failure(self.entry, cause) from exc
        finally:
            self.warmup_s = (self.warmup_s or 0.0) + time.monotonic() - started
        if self._warm_tokens < _WARMUP_NEW_TOKENS:
            return False
        self._warm = None
        _warm_up_grammar_masks()
        mx.clear_cache()
        return True

    def _artifacts(self) -> LoadedArtifacts:
        assert self._config is not None
        context = self.entry.context_length or context_length_of(self._config)
        log.info("loaded %s (%.1f MB%s, context %s) in %.1fs%s; longest piece on the MLX thread %.0f ms (%s)",
                 self.entry.id, self.size / 1e6, ", float16 held as float32" if self._upcast else "", context,
                 time.monotonic() - self.started,
                 f", warm-up {self.warmup_s:.2f}s" if self.warmup_s is not None else "",
                 self.longest_piece[0] * 1000, self.longest_piece[1])
        return LoadedArtifacts(self._model, self._tokenizer, self._config, self.size, context, self.float16_upcast)

    def _drop(self) -> None:
        self.cancel()
        self._model = None
        self._pending = []
        self._warm = None


# -- at once -------------------------------------------------------------------------------------------


def load(entry: ModelEntry, shard: Callable[[Module, dict[str, Any]], None] | None = None) -> LoadedArtifacts:
    """Validate, then load the tokenizer and the weights at once (no warm-up); any failure is an EngineError
    naming the cause. The engine loads in pieces instead (`StagedLoad`), through the same steps.

    `shard` (a group's rank: mlx_backend/engine/rank.py) cuts the lazily built model to this rank's part before any
    weight is read, so a rank reads and holds only its shard. A rank loads in one piece: every rank must make
    the same MLX calls in step, and pieces between steps would need the ranks to agree on each."""
    if shard is None:
        return StagedLoad(entry, model_check.validate(entry), warmup=False).run()
    size = model_check.validate(entry)
    path = entry.path
    try:
        # Tokenizer first: it is cheap and often the broken part, so a bad tokenizer fails before gigabytes
        # of weights are read. Custom code is never trusted.
        config = model_check.load_config(path)
        try:
            tokenizer: TokenizerWrapper = model_check.load_tokenizer(  # type: ignore[no-untyped-call]
                path, eos_token_ids=config.get("eos_token_id")
            )
        except Exception as exc:
            cause = f"its tokenizer is broken ({model_check.describe_exception(exc)})."
            raise model_check.load_failure(entry, cause) from exc
        model, config = model_check.load_model(path, lazy=True, trust_remote_code=False)
        shard(model, config)
        upcast = model_check.upcasts_float16()
        if upcast:
            model_check.upcast_float16(model)
        mx.eval(model.parameters())  # lazy loads must fail here, not in the middle of a request
    except EngineError:
        raise
    except Exception as exc:  # shape mismatches, missing tensors, unsupported dtypes, I/O errors...
        log.warning("loading %s from %s failed", entry.id, path, exc_info=True)
        raise model_check.load_failure(entry, f"{model_check.describe_exception(exc)}.") from exc
    context = entry.context_length or context_length_of(config)
    log.info("loaded %s (%.1f MB, context %s)", entry.id, size / 1e6, context)
    return LoadedArtifacts(model, tokenizer, config, size, context, upcast)


def _prepare_grammars(tokenizer: Any) -> None:
    """Build the model's grammar compiler now, inside the load: it reads the whole vocabulary in native code
    that holds the GIL (seconds for a 128k vocabulary with many added tokens, seen on an H200), which the
    first constrained request would otherwise pay on the MLX thread, its heartbeats silenced meanwhile."""
    from mlx_backend.engine.constrained import ConstraintError, compiler_for

    try:
        compiler_for(tokenizer)
    except ConstraintError as exc:  # a tokenizer llguidance cannot read: constrained requests say so (400)
        log.info("no structured output for %s: %s", tokenizer.name_or_path, exc.message)


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def _file_size(path: Any) -> int:
    try:
        return int(path.stat().st_size)
    except OSError:
        return 0


def _warm_up_grammar_masks() -> None:
    """Unpack one grammar mask on the device (engine/masks.py): on CUDA its gather is a kernel compiled on first
    use, which the first constrained request would otherwise wait for. A failure here is only logged: the model
    serves, and a constrained request that meets the same failure gets its own error."""
    from mlx_backend.engine import masks  # imports llguidance

    try:
        mx.eval(masks.unpacked_on_device(np.zeros((1, 1), dtype=np.int32), 32))
    except Exception as exc:
        log.warning("warming up grammar masks failed (constrained requests may fail): %s", exc)
