"""A step's grammar masks, all rows at once (mlx_backend/engine/masks.py): the batched path the batcher plans gives
exactly the tokens of the per-row path, for rows with different grammars and samplers side by side, rows with
penalties and rows the closing reserve guides; it masks the whole batch in one op, so mlx-lm's step runs no
per-row processor loop; a row without a grammar is untouched; the bitmask unpacked (on the device, or by numpy
on the CPU) is llguidance's bitmask."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import TokenBuffer
from mlx_lm.sample_utils import greedy_sampler

from mlx_backend.contract import Constraint
from mlx_backend.engine import masks
from mlx_backend.engine.batcher import constrained_step
from mlx_backend.engine.constrained import ConstraintProcessor
from mlx_backend.engine.joining import join_in_step
from mlx_backend.engine.masks import MaskStep, unpacked_on_device, unpacked_on_host
from mlx_backend.engine.sampling import PenaltyProcessor, SeededSampler
from mlx_backend.engine.solo import SoloGeneration
from mlx_backend.grammar import json_value_for_lark
from tests.unit.mlx_backend.engine.test_constrained import SCHEMAS, WIDTH, Loaded, allowed, assert_complete, bpe

__all__ = ["bpe"]  # the model fixture, shared with test_constrained.py

pytestmark = pytest.mark.slow

TOOL_ARGUMENTS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                   "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                  "required": ["city", "days"], "additionalProperties": False}


@pytest.fixture(params=[False, True], ids=["masks after the launch", "masks beside the launch"])
def mask_order(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both orders of a step (masks.MaskStep._compute): the CPU's, and a GPU's (the mask thread)."""
    monkeypatch.setattr(masks, "BESIDE_THE_LAUNCH", request.param)


def rows(loaded: Loaded) -> list[tuple[list[int], list[Any], Any]]:
    """Fresh (prompt, processors, sampler) for five rows: four grammars and samplers, one row without any."""
    return [
        (loaded.prompt(), [loaded.processor("json_schema", SCHEMAS["nested objects"])], greedy_sampler),
        (loaded.prompt("Tell me a story."), [], greedy_sampler),
        (loaded.prompt(), [loaded.processor("json_object")], SeededSampler(0.8, 1.0, seed=3)),
        (loaded.prompt(), [loaded.processor("json_schema", SCHEMAS["array of enums"])],
         SeededSampler(1.0, 1.0, seed=4)),
        (loaded.prompt(), [loaded.processor("lark", f'start: <|tool|> "<call>" {json_value_for_lark(TOOL_ARGUMENTS)} '
                                                    '"</call>"')], greedy_sampler),
    ]


def greedy_rows(loaded: Loaded, max_tokens: int | None = None) -> list[tuple[list[int], list[Any], Any]]:
    """Fresh greedy rows: three grammars alone (a budget of `max_tokens` gives them the closing reserve), a
    plain row, a plain row with penalties, and a grammar after penalties."""
    def grammar(kind: str, source: Any = "") -> ConstraintProcessor:
        text = source if isinstance(source, str) else json.dumps(source)
        return loaded.compiler.processor(Constraint(kind, text, strict=True), max_tokens)  # type: ignore[arg-type]

    def penalties(prompt: list[int]) -> PenaltyProcessor:
        return PenaltyProcessor(presence=1.5, frequency=1.0, prompt_tokens=len(prompt))

    story, answer = loaded.prompt("Tell me a story."), loaded.prompt()
    return [
        (answer, [grammar("json_schema", SCHEMAS["nested objects"])], greedy_sampler),
        (story, [], greedy_sampler),
        (answer, [grammar("json_object")], greedy_sampler),
        (story, [penalties(story)], greedy_sampler),
        (answer, [penalties(answer), grammar("json_schema", SCHEMAS["array of enums"])], greedy_sampler),
        (answer, [grammar("lark", f'start: <|tool|> "<call>" {json_value_for_lark(TOOL_ARGUMENTS)} "</call>"')],
         greedy_sampler),
    ]


def decode(loaded: Loaded, requests: list[tuple[list[int], list[Any], Any]], planned: bool,
           max_tokens: int = 120, one_a_step: bool = False, joining: bool = True) -> list[tuple[list[int], str]]:
    """Each row's tokens and finish reason through one BatchGenerator, each step planned as the batcher plans
    it (`planned`, with rows joining in the step as in the batcher: engine/joining.py, unless not `joining`:
    mlx-lm's own generator), or with every constrained row a step of its own; the rows all at once, or
    `one_a_step`."""
    generator: Any = BatchGenerator(loaded.model, stop_tokens=[[t] for t in sorted(loaded.eos)])
    if planned and joining:
        join_in_step(generator)
    waiting = [[request] for request in requests] if one_a_step else [requests]
    try:
        uids: list[int] = []
        tokens: dict[int, list[int]] = {}
        finished: dict[int, str] = {}
        while waiting or len(finished) < len(uids):
            if waiting:
                arriving = waiting.pop(0)
                uids += generator.insert([p for p, _, _ in arriving], max_tokens=[max_tokens] * len(arriving),
                                         samplers=[s for _, _, s in arriving],
                                         logits_processors=[p for _, p, _ in arriving])
                tokens.update({uid: [] for uid in uids if uid not in tokens})
            if planned:
                with constrained_step(generator):
                    responses = generator.next()[1]
            else:
                responses = generator.next()[1]
            for response in responses:
                tokens[response.uid].append(response.token)
                if response.finish_reason is not None:
                    finished[response.uid] = response.finish_reason
    finally:
        generator.close()
    return [(tokens[uid], finished[uid]) for uid in uids]


def count_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of every MaskStep that computes masks, in order."""
    sizes: list[int] = []
    bitmask: Callable[[MaskStep, list[int] | None], Any] = MaskStep._bitmask
    monkeypatch.setattr(MaskStep, "_bitmask", lambda self, fed: (sizes.append(len(self._rows)), bitmask(self, fed))[1])
    return sizes


@pytest.mark.usefixtures("mask_order")
def test_the_batched_path_gives_the_tokens_of_the_per_row_path(
    bpe: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = count_steps(monkeypatch)
    per_row_requests = rows(bpe)
    per_row = decode(bpe, per_row_requests, planned=False)
    assert set(sizes) == {1}  # nobody planned: each row a step of its own
    sizes.clear()
    batched_requests = rows(bpe)
    batched = decode(bpe, batched_requests, planned=True)
    assert max(sizes) == 4  # the four constrained rows' masks in one computation
    assert batched == per_row
    for (tokens, reason), (_, processors, _) in zip(batched, batched_requests, strict=True):
        if processors:
            assert_complete(bpe, tokens, reason, processors[0])  # each grammar held, to its EOS


@pytest.mark.usefixtures("mask_order")
def test_rows_joining_a_planned_batch_one_a_step_get_the_tokens_of_the_per_row_path(
    bpe: Loaded
) -> None:
    """Each row joins a decoding batch in a step of its own, planned with the running rows there (its grammar
    consumes nothing in that step), beside plain rows and other samplers."""
    per_row = decode(bpe, rows(bpe), planned=False, one_a_step=True)
    assert decode(bpe, rows(bpe), planned=True, one_a_step=True) == per_row


def test_mlx_lm_s_own_generator_planned_before_its_step_gives_the_per_row_tokens(bpe: Loaded) -> None:
    """Its new rows take their first step in a pass of their own (unplanned); every later step is planned."""
    per_row = decode(bpe, rows(bpe), planned=False, one_a_step=True)
    assert decode(bpe, rows(bpe), planned=True, one_a_step=True, joining=False) == per_row


def test_a_row_joining_a_decoding_batch_takes_its_first_step_with_the_batch(
    bpe: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step a constrained row joins in is planned once it has joined: its grammar's first mask is computed
    with the running rows' (consuming nothing: its prompt's last token is fed), and no row is called by
    mlx-lm's per-row loop in that step."""
    calls: list[int] = []
    call = ConstraintProcessor.__call__
    monkeypatch.setattr(ConstraintProcessor, "__call__",
                        lambda self, tokens, logits: (calls.append(1), call(self, tokens, logits))[1])
    sizes = count_steps(monkeypatch)
    requests = [r for r in greedy_rows(bpe) if r[1] and all(isinstance(p, ConstraintProcessor) for p in r[1])]
    decoded = decode(bpe, requests, planned=True, one_a_step=True)
    assert calls == []
    assert sizes[:len(requests)] == list(range(1, len(requests) + 1))  # each join planned in its own step
    for (tokens, reason), (_, processors, _) in zip(decoded, requests, strict=True):
        assert_complete(bpe, tokens, reason, processors[0])


@pytest.mark.usefixtures("mask_order")
@pytest.mark.parametrize("unpack", [unpacked_on_device, unpacked_on_host], ids=["device", "host"])
def test_the_batch_wide_path_gives_the_per_row_tokens_beside_plain_rows_and_penalties(
    bpe: Loaded, unpack: Callable[..., mx.array], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both ways of unpacking the bitmask (a GPU's, and the CPU's), the model's logits wider than the
    vocabulary (the padding: never allowed with a grammar, untouched without)."""
    monkeypatch.setattr(masks, "allowed_tokens", unpack)
    requests = greedy_rows(bpe)
    batch_wide = decode(bpe, requests, planned=True)
    assert batch_wide == decode(bpe, greedy_rows(bpe), planned=False)
    for (tokens, reason), (_, processors, _) in zip(batch_wide, requests, strict=True):
        if processors and isinstance(processors[-1], ConstraintProcessor):
            assert_complete(bpe, tokens, reason, processors[-1])


@pytest.mark.usefixtures("mask_order")
def test_rows_the_closing_reserve_guides_get_the_per_row_tokens(
    bpe: Loaded
) -> None:
    """A budget too short for the random model to close by itself: the last tokens are chosen by the reserve
    (`finish`), which the batch-wide step asks for the rows whose processors stood aside."""
    requests = greedy_rows(bpe, max_tokens=24)
    batch_wide = decode(bpe, requests, planned=True, max_tokens=24)
    assert batch_wide == decode(bpe, greedy_rows(bpe, max_tokens=24), planned=False, max_tokens=24)
    alone = [processors[0] for _, processors, _ in requests if len(processors) == 1
             and isinstance(processors[0], ConstraintProcessor)]
    assert any(p.closed_by_reserve for p in alone)  # the reserve did choose tokens in the batch-wide step


def test_a_planned_step_masks_the_batch_in_one_op_without_a_per_row_loop(
    bpe: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row whose only processor is its grammar is never called row by row, its first step included (its
    prompt's last token is fed as it joins the batch): every step masks it with the whole batch's logits
    (`MaskStep.apply`) and mlx-lm updates no row's token context. A grammar after penalties is still called
    at every step."""
    calls: dict[int, int] = {}
    call = ConstraintProcessor.__call__
    monkeypatch.setattr(ConstraintProcessor, "__call__",
                        lambda self, tokens, logits: (calls.__setitem__(id(self), calls.get(id(self), 0) + 1),
                                                      call(self, tokens, logits))[1])
    applied: list[int] = []
    apply = MaskStep.apply
    monkeypatch.setattr(MaskStep, "apply",
                        lambda self, logits, finishing: (applied.append(logits.shape[0]),
                                                         apply(self, logits, finishing))[1])
    updates: list[int] = []
    update = TokenBuffer.update_and_fetch
    monkeypatch.setattr(TokenBuffer, "update_and_fetch",
                        lambda self, tokens: (updates.append(1), update(self, tokens))[1])
    requests = [r for r in greedy_rows(bpe) if all(isinstance(p, ConstraintProcessor) for p in r[1])]
    decoded = decode(bpe, requests, planned=True)
    constrained = [processors[0] for _, processors, _ in requests if processors]
    assert constrained and [calls.get(id(p), 0) for p in constrained] == [0] * len(constrained)
    assert updates == []
    longest = max(len(tokens) for (tokens, _), (_, processors, _) in zip(decoded, requests, strict=True) if processors)
    # Each step, the whole batch at once: the joining step that samples the first token, then one a token
    # handed out (mlx-lm hands a token out in the step that feeds it).
    assert len(applied) == longest + 1 and applied[0] == len(requests)

    calls.clear()
    mixed = greedy_rows(bpe)
    decoded = decode(bpe, mixed, planned=True)
    after_penalties = mixed[4][1][-1]
    assert calls[id(after_penalties)] == len(decoded[4][0]) + 1  # a call a step: its penalties need their loop


def test_a_planned_step_whose_model_is_never_called_fails_loudly_and_puts_everything_back(bpe: Loaded) -> None:
    """Should mlx-lm's step stop calling the model it is given, the rows set aside would sample unmasked: the
    step fails instead (the batcher then fails its requests), and the batch is left as it was."""
    processor = bpe.compiler.processor(Constraint("json_object"))
    generator: Any = BatchGenerator(bpe.model, stop_tokens=[[t] for t in sorted(bpe.eos)])
    try:
        generator.insert([bpe.prompt()], max_tokens=[50], logits_processors=[[processor]])
        while not generator._generation_batch.uids:
            generator.next()
        batch = generator._generation_batch
        model, processors = batch.model, list(batch.logits_processors)
        with pytest.raises(RuntimeError, match="unmasked"), constrained_step(generator):
            pass  # no step: the model was never called
        assert batch.model is model and batch.logits_processors == processors and processor._step is None
    finally:
        generator.close()


def test_a_request_alone_with_only_a_grammar_keeps_no_token_context(
    bpe: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grammar reads only the token a step feeds: no buffer of every token so far is updated each step, and
    the tokens are the batch's."""
    updates: list[int] = []
    update = TokenBuffer.update_and_fetch
    monkeypatch.setattr(TokenBuffer, "update_and_fetch",
                        lambda self, tokens: (updates.append(1), update(self, tokens))[1])
    request = greedy_rows(bpe)[0]
    generation = SoloGeneration(bpe.model, request[0], None, 0, greedy_sampler, request[1], prefill_step_size=64)
    tokens: list[int] = []
    while not tokens or tokens[-1] not in bpe.eos:
        tokens.append(generation.next_token(more=True))
    assert updates == []
    assert (tokens, "stop") == decode(bpe, [greedy_rows(bpe)[0]], planned=True)[0]


@pytest.mark.usefixtures("mask_order")
def test_in_a_batch_step_a_rejected_token_fails_its_own_row_only(
    bpe: Loaded
) -> None:
    """The rows' matchers consume their tokens in one call: the one whose token its grammar rejects allows only
    EOS from then on, and the others go on as alone."""
    rejecting, going_on, alone = (bpe.processor("json_object") for _ in range(3))
    prompt = bpe.prompt()
    for processor in (rejecting, going_on, alone):
        processor(mx.array(prompt), mx.zeros((1, WIDTH)))  # the first step: the prompt, nothing consumed
    bad, good = bpe.compiler.tokenizer.tokenize_str("x")[0], bpe.compiler.tokenizer.tokenize_str("{")[0]
    masked = MaskStep([rejecting, going_on], mx.array([bad, good]), [0, 1]).apply(mx.zeros((2, WIDTH)), [])
    assert allowed(masked[0:1]) == bpe.eos
    assert allowed(masked[1:2]) == allowed(alone(mx.array([good]), mx.zeros((1, WIDTH)))) != bpe.eos
    assert rejecting.error is not None and going_on.error is None
    assert (rejecting.tokens, going_on.tokens) == (1, 1)


def test_rows_past_the_plan_are_left_unmasked(bpe: Loaded) -> None:
    """Rows after the planned ones (a caller that planned before rows joined) get every token: no mask of
    this step's, and the planned row keeps its own."""
    processor, alone = bpe.processor("json_object"), bpe.processor("json_object")
    for p in (processor, alone):
        p(mx.array(bpe.prompt()), mx.zeros((1, WIDTH)))  # the first step: the prompt, nothing consumed
    brace = bpe.compiler.tokenizer.tokenize_str("{")[0]
    masked = MaskStep([processor], mx.array([brace]), [0]).apply(mx.zeros((2, WIDTH)), [])
    assert allowed(masked[0:1]) == allowed(alone(mx.array([brace]), mx.zeros((1, WIDTH))))
    assert allowed(masked[1:2]) == set(range(WIDTH))


def test_a_row_without_a_grammar_is_untouched(bpe: Loaded) -> None:
    with_neighbours = decode(bpe, rows(bpe), planned=True)
    without = decode(bpe, [(prompt, [], sampler) for prompt, _, sampler in rows(bpe)], planned=True)
    assert with_neighbours[1] == without[1]
    assert with_neighbours[0] != without[0]  # the grammars did act on their own rows


@pytest.mark.parametrize("unpack", [unpacked_on_device, unpacked_on_host], ids=["device", "host"])
@pytest.mark.parametrize("width", [64, 70, 96, 128, 130])
def test_the_bitmask_is_unpacked_bit_for_bit(width: int, unpack: Callable[..., mx.array]) -> None:
    rng = np.random.default_rng(width)
    bitmask = rng.integers(-(2**31), 2**31, size=(3, 3), dtype=np.int64).astype(np.int32)  # 96 tokens a row
    expected = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").astype(bool)[:, :width]
    if width > 96:  # the embedding's padding past the vocabulary: never allowed
        expected = np.concatenate([expected, np.zeros((3, width - 96), dtype=bool)], axis=1)
    assert np.array_equal(np.array(unpack(bitmask, width)), expected)
    plain = np.array([False, True, False])  # a row without a grammar: its words all ones, and every token past
    bitmask[1] = -1
    expected[1] = True
    assert np.array_equal(np.array(unpack(bitmask, width, plain)), expected)


def test_on_a_device_the_unpacked_bitmask_is_one_gather_and_views(tmp_path: Path) -> None:
    """On CUDA each op of the step is a kernel launch the host pays for: the words (a vocabulary a whole
    number of words, as Llama 3's 128256 tokens are) become the step's booleans through one gather, the
    rest being views of its result."""
    bitmask = np.random.default_rng(0).integers(-(2**31), 2**31, size=(2, 4008), dtype=np.int64).astype(np.int32)
    unpacked = unpacked_on_device(bitmask, 128256)
    mx.export_to_dot(str(tmp_path / "unpack.dot"), unpacked)
    ops = sorted(re.findall(r'label ="([^"]+)"', (tmp_path / "unpack.dot").read_text()))
    assert ops == ["Gather", "Squeeze", "View bool"]
    expected = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").astype(bool)
    assert np.array_equal(np.array(unpacked), expected)


def test_a_request_alone_queues_the_token_it_feeds_before_its_forward_pass(
    bpe: Loaded, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So reading that token waits for the previous step only, and the masks are computed while the forward
    pass runs: each step after the first queues the fed token (1 token), then the forward pass (the logits)."""
    import mlx_backend.engine.constrained as constrained

    queued: list[tuple[int, ...]] = []

    def recording(*arrays: mx.array) -> None:
        queued.extend(tuple(a.shape) for a in arrays)
        mx.async_eval(*arrays)

    monkeypatch.setattr(constrained, "_async_eval", recording)
    monkeypatch.setattr(masks, "_async_eval", recording)
    processor = bpe.processor("json_object")
    generation = SoloGeneration(bpe.model, bpe.prompt(), None, 0, greedy_sampler, [processor], prefill_step_size=64)
    for _ in range(6):
        generation.next_token(more=True)
    width = bpe.model.args.vocab_size
    assert queued[0] == (1, width)  # the first step feeds the prompt: nothing to read
    assert queued[1:] == [(1,), (1, width)] * (len(queued[1:]) // 2) and len(queued) >= 7


@pytest.mark.parametrize("beside", [True, False], ids=["on a GPU", "on the CPU"])
def test_on_a_gpu_the_masks_are_computed_on_the_mask_thread_while_the_forward_pass_is_queued(
    bpe: Loaded, beside: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A GPU's step: the grammar's host work hides behind the launch of the forward pass (queueing it releases
    the GIL). The CPU's: the pass is queued first, then the masks are computed on the MLX thread. Queueing is
    made slow here (as a launch of hundreds of kernels is), so which one ends first says which order ran, and
    whether the masks were computed while the launch was under way says they overlapped."""
    monkeypatch.setattr(masks, "BESIDE_THE_LAUNCH", beside)
    events: list[tuple[str, str, bool]] = []  # what, on which thread, whether a launch was under way
    launching = threading.Event()
    bitmask = MaskStep._bitmask

    def recording_bitmask(self: MaskStep, fed: list[int] | None) -> Any:
        if beside:
            launching.wait(timeout=2)  # the launch starts while the masks are computed
        result = bitmask(self, fed)
        events.append(("masks computed", threading.current_thread().name, launching.is_set()))
        return result

    def slow_queue(*arrays: mx.array) -> None:
        if arrays[0].ndim == 2:  # the logits: the forward pass
            launching.set()
            time.sleep(0.05)
            events.append(("forward pass queued", threading.current_thread().name, launching.is_set()))
            launching.clear()
        mx.async_eval(*arrays)

    monkeypatch.setattr(MaskStep, "_bitmask", recording_bitmask)
    monkeypatch.setattr(masks, "_async_eval", slow_queue)
    decoded = decode(bpe, [r for r in greedy_rows(bpe) if r[1]][:3], planned=True, max_tokens=8)
    assert all(len(tokens) == 8 or reason == "stop" for tokens, reason in decoded)
    steps = [events[i:i + 2] for i in range(0, len(events), 2)]
    assert len(steps) >= 7 and len(events) % 2 == 0
    mlx_thread = threading.current_thread().name
    for (first, first_thread, first_launching), (second, second_thread, _) in steps:
        if beside:
            assert (first, second) == ("masks computed", "forward pass queued")
            assert first_launching  # computed while the launch was under way
            assert first_thread.startswith("grammar-masks") and second_thread == mlx_thread
        else:
            assert (first, second) == ("forward pass queued", "masks computed")
            assert first_thread == second_thread == mlx_thread


@pytest.mark.parametrize(("device", "beside"), [(mx.gpu, True), (mx.cpu, False)], ids=["GPU", "CPU"])
def test_the_masks_go_beside_the_launch_on_a_gpu_only(
    device: mx.DeviceType, beside: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(masks, "BESIDE_THE_LAUNCH", None)
    monkeypatch.setattr(masks.mx, "default_device", lambda: mx.Device(device))
    assert masks.beside_the_launch() is beside


def test_on_a_gpu_a_launch_that_fails_leaves_no_mask_work_running(bpe: Loaded, monkeypatch: pytest.MonkeyPatch) -> None:
    """The error reaches the caller once the mask thread is done: no matcher advances behind its back."""
    processor = bpe.processor("json_object")
    processor(mx.array(bpe.prompt()), mx.zeros((1, WIDTH)))  # the first step: the prompt, nothing consumed
    monkeypatch.setattr(masks, "BESIDE_THE_LAUNCH", True)
    done: list[int] = []
    bitmask = MaskStep._bitmask

    def slow_bitmask(self: MaskStep, fed: list[int] | None) -> Any:
        time.sleep(0.05)
        result = bitmask(self, fed)
        done.append(processor.tokens)
        return result

    def failing_launch(*arrays: mx.array) -> None:
        if arrays[0].ndim == 2:
            raise RuntimeError("out of memory")
        mx.async_eval(*arrays)

    monkeypatch.setattr(MaskStep, "_bitmask", slow_bitmask)
    monkeypatch.setattr(masks, "_async_eval", failing_launch)
    token = bpe.compiler.tokenizer.tokenize_str("{")[0]
    with pytest.raises(RuntimeError, match="out of memory"):
        MaskStep([processor], mx.array([token]), [0]).apply(mx.zeros((1, WIDTH)), [])
    assert done == [1]
