"""Constrained decoding: whatever a random model prefers, what it samples parses and validates, through mlx-lm's
BatchGenerator and through our solo path alike, and ends with EOS once complete; rows without a constraint
come out exactly as they would alone."""

from __future__ import annotations

import contextlib
import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import mlx.core as mx
import pytest
from mlx_lm import load
from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import greedy_sampler
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel

from mlx_backend.contract import Constraint
from mlx_backend.demo import demo_model_path
from mlx_backend.engine.batcher import constrained_step
from mlx_backend.engine.constrained import (
    ConstraintError,
    ConstraintFailed,
    ConstraintProcessor,
    GrammarCompiler,
    compiler_for,
)
from mlx_backend.engine.joining import join_in_step
from mlx_backend.engine.sampling import PenaltyProcessor, SeededSampler
from mlx_backend.engine.solo import SoloGeneration
from mlx_backend.grammar import json_value_for_lark
from tests.support import tiny_models as tm

pytestmark = pytest.mark.slow

VOCAB = 512  # the BPE's tokens
WIDTH = 576  # the model's embedding rows: logits are wider than the vocabulary, as for Qwen
MAX_TOKENS = 400


class Loaded:
    def __init__(self, path: Path) -> None:
        self.model, tokenizer = load(str(path))[:2]
        self.tokenizer: Any = tokenizer
        self.compiler = compiler_for(self.tokenizer)
        self.eos = set(self.tokenizer.eos_token_ids)

    def prompt(self, text: str = "Answer in JSON.") -> list[int]:
        messages = [{"role": "user", "content": text}]
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True))

    def processor(self, kind: str, source: Any = "", strict: bool = True) -> ConstraintProcessor:
        text = source if isinstance(source, str) else json.dumps(source)
        return self.compiler.processor(Constraint(kind, text, strict=strict))  # type: ignore[arg-type]

    def text(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode([t for t in tokens if t not in self.eos]))


@pytest.fixture(scope="module")
def bpe(tmp_path_factory: pytest.TempPathFactory) -> Loaded:
    path = tmp_path_factory.mktemp("models") / "bpe"
    return Loaded(tm.make_tiny_model(path, tokenizer="bpe", vocab_size=WIDTH, tokenizer_vocab_size=VOCAB))


Request = tuple[list[int], list[Any], Any]  # prompt, logits processors, sampler


def run_batch(loaded: Loaded, requests: list[Request], max_tokens: int = MAX_TOKENS) -> list[tuple[list[int], str]]:
    """Each request's tokens and finish reason, all decoded together in one BatchGenerator."""
    generator: Any = BatchGenerator(loaded.model, stop_tokens=[[t] for t in sorted(loaded.eos)])
    try:
        uids = generator.insert(
            [prompt for prompt, _, _ in requests],
            max_tokens=[max_tokens] * len(requests),
            samplers=[sampler for _, _, sampler in requests],
            logits_processors=[processors for _, processors, _ in requests],
        )
        tokens: dict[int, list[int]] = {uid: [] for uid in uids}
        finished: dict[int, str] = {}
        while len(finished) < len(uids):
            for response in generator.next()[1]:
                tokens[response.uid].append(response.token)
                if response.finish_reason is not None:
                    finished[response.uid] = response.finish_reason
    finally:
        generator.close()
    return [(tokens[uid], finished[uid]) for uid in uids]


def run_solo(loaded: Loaded, request: Request, max_tokens: int = MAX_TOKENS,
             one_pass_tokens: int = 0) -> tuple[list[int], str]:
    """The request decoded alone by SoloGeneration, ended as the batcher ends it."""
    prompt, processors, sampler = request
    generation = SoloGeneration(loaded.model, prompt, None, 0, sampler, processors, prefill_step_size=64,
                                one_pass_tokens=one_pass_tokens)
    tokens: list[int] = []
    while True:
        last = len(tokens) + 1 == max_tokens
        tokens.append(generation.next_token(more=not last))
        if tokens[-1] in loaded.eos:
            return tokens, "stop"
        if last:
            return tokens, "length"


def assert_complete(loaded: Loaded, tokens: list[int], reason: str, processor: ConstraintProcessor) -> str:
    """The output ended with EOS, because the grammar was complete; its text, EOS left out."""
    assert reason == "stop", f"ran to the length limit: {loaded.text(tokens)!r}"
    assert tokens[-1] in loaded.eos
    assert not any(t in loaded.eos for t in tokens[:-1])
    assert processor.is_accepting()
    assert processor.error is None
    processor.raise_if_failed()
    return loaded.text(tokens)


def samplers() -> list[Any]:
    return [greedy_sampler, SeededSampler(1.0, 1.0, seed=1), SeededSampler(0.7, 0.9, seed=2)]


SCHEMAS: dict[str, dict[str, Any]] = {
    "nested objects": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
                "required": ["name", "age"],
                "additionalProperties": False,
            },
            "active": {"type": "boolean"},
        },
        "required": ["user", "active"],
        "additionalProperties": False,
    },
    "array of enums": {
        "type": "object",
        "properties": {
            "colours": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4},
        },
        "required": ["colours"],
        "additionalProperties": False,
    },
    "bounded numbers": {
        "type": "object",
        "properties": {
            "x": {"type": "number"},
            "level": {"type": "integer", "minimum": -5, "maximum": 5},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        },
        "required": ["x", "level", "ratio"],
        "additionalProperties": False,
    },
    "string patterns and optional": {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
            "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
            "when": {"type": "string", "format": "date"},
        },
        "required": ["code", "note", "when"],
        "additionalProperties": False,
    },
    "top-level array": {
        "type": "array",
        "items": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"],
                  "additionalProperties": False},
        "minItems": 2,
        "maxItems": 3,
    },
}


# -- through BatchGenerator and SoloGeneration, several schemas, greedy and sampled ------------------------


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_batch_outputs_validate_against_the_schema(bpe: Loaded, name: str) -> None:
    schema = SCHEMAS[name]
    processors = [bpe.processor("json_schema", schema) for _ in samplers()]
    requests = [(bpe.prompt(), [p], s) for p, s in zip(processors, samplers(), strict=True)]
    for (tokens, reason), processor in zip(run_batch(bpe, requests), processors, strict=True):
        jsonschema.validate(json.loads(assert_complete(bpe, tokens, reason, processor)), schema)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_solo_outputs_validate_against_the_schema(bpe: Loaded, name: str) -> None:
    schema = SCHEMAS[name]
    for sampler in samplers():
        processor = bpe.processor("json_schema", schema)
        tokens, reason = run_solo(bpe, (bpe.prompt(), [processor], sampler))
        jsonschema.validate(json.loads(assert_complete(bpe, tokens, reason, processor)), schema)


def test_json_object_gives_an_object(bpe: Loaded) -> None:
    # Sampled only: greedy, this random model writes one digit forever (see the next test).
    sampled = [SeededSampler(0.8, 1.0, seed=seed) for seed in range(8)]
    processors = [bpe.processor("json_object") for _ in sampled]
    requests = [(bpe.prompt(), [p], s) for p, s in zip(processors, sampled, strict=True)]
    objects = [json.loads(assert_complete(bpe, tokens, reason, processor))
               for (tokens, reason), processor in zip(run_batch(bpe, requests), processors, strict=True)]
    assert all(isinstance(o, dict) for o in objects)
    assert sum(bool(o) for o in objects) >= 3  # not merely "{}"
    processor = bpe.processor("json_object")
    tokens, reason = run_solo(bpe, (bpe.prompt(), [processor], SeededSampler(0.8, 1.0, seed=4)))
    assert isinstance(json.loads(assert_complete(bpe, tokens, reason, processor)), dict)


def test_greedy_json_object_ends_by_itself_because_numbers_are_bounded(bpe: Loaded) -> None:
    # Greedy, this random model writes one digit forever; the grammar holds a number to 16 digits (and a
    # string, a list, an object, the nesting to their limits), so the object closes with no budget at all.
    processor = bpe.processor("json_object")
    tokens, reason = run_solo(bpe, (bpe.prompt(), [processor], greedy_sampler), max_tokens=MAX_TOKENS)
    value = json.loads(assert_complete(bpe, tokens, reason, processor))
    assert isinstance(value, dict)
    digits = re.findall(r"\d+", bpe.text(tokens))
    assert max(map(len, digits)) == 16  # it did run into the bound


def test_non_strict_schema_enforces_what_it_can(bpe: Loaded) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False, "unevaluatedProperties": False}
    with pytest.raises(ConstraintError, match="unevaluatedProperties"):
        bpe.processor("json_schema", schema, strict=True)
    processor = bpe.processor("json_schema", schema, strict=False)
    tokens, reason = run_solo(bpe, (bpe.prompt(), [processor], SeededSampler(1.0, 1.0, seed=3)))
    assert set(json.loads(assert_complete(bpe, tokens, reason, processor))) == {"n"}


def test_a_lark_tool_call_with_special_tokens_and_json(bpe: Loaded) -> None:
    # What a forced tool call looks like: the family's markup (here a special token and text tags) around
    # arguments that follow the tool's schema.
    arguments = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                  "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                 "required": ["city", "days"], "additionalProperties": False}
    grammar = f'start: <|tool|> "<call>" {json_value_for_lark(arguments)} "</call>"'
    tool_token = bpe.tokenizer.convert_tokens_to_ids("<|tool|>")
    for sampler in samplers():
        processor = bpe.processor("lark", grammar)
        tokens, reason = run_solo(bpe, (bpe.prompt(), [processor], sampler))
        assert_complete(bpe, tokens, reason, processor)
        assert tokens[0] == tool_token
        text = str(bpe.tokenizer.decode(tokens[1:-1]))
        assert text.startswith("<call>") and text.endswith("</call>")
        jsonschema.validate(json.loads(text.removeprefix("<call>").removesuffix("</call>")), arguments)


def test_penalties_before_the_constraint_do_not_unmask_anything(bpe: Loaded) -> None:
    schema = SCHEMAS["nested objects"]
    processor = bpe.processor("json_schema", schema)
    penalties = PenaltyProcessor(presence=1.5, frequency=1.0, prompt_tokens=len(bpe.prompt()))
    tokens, reason = run_batch(bpe, [(bpe.prompt(), [penalties, processor], SeededSampler(1.0, 1.0, seed=4))])[0]
    jsonschema.validate(json.loads(assert_complete(bpe, tokens, reason, processor)), schema)


# -- sharing a batch ---------------------------------------------------------------------------------------


def test_an_unconstrained_row_is_untouched_by_a_constrained_neighbour(bpe: Loaded) -> None:
    plain_prompt = bpe.prompt("Tell me a story.")
    alone = run_batch(bpe, [(plain_prompt, [], greedy_sampler)], max_tokens=40)[0]
    constrained = bpe.processor("json_schema", SCHEMAS["nested objects"])
    together = run_batch(bpe, [(bpe.prompt(), [constrained], greedy_sampler), (plain_prompt, [], greedy_sampler)],
                         max_tokens=40)
    assert together[1] == alone
    assert together[0][0] != alone[0]  # the constraint did act on its own row


def test_a_request_alone_whose_prompt_is_one_pass_keeps_its_grammar(bpe: Loaded) -> None:
    """On a GPU a short prompt and the first token are one pass (solo.py): the grammar's first step is that
    pass's, and the tokens are those of a prompt prefilled in pieces."""
    schema = SCHEMAS["nested objects"]
    pieces = run_solo(bpe, (bpe.prompt(), [bpe.processor("json_schema", schema)], greedy_sampler))
    processor = bpe.processor("json_schema", schema)
    one_pass = run_solo(bpe, (bpe.prompt(), [processor], greedy_sampler), one_pass_tokens=10_000)
    assert one_pass == pieces
    jsonschema.validate(json.loads(assert_complete(bpe, *one_pass, processor)), schema)


def test_a_constrained_row_decodes_the_same_alone_and_in_a_batch(bpe: Loaded) -> None:
    schema = SCHEMAS["array of enums"]
    alone = run_batch(bpe, [(bpe.prompt(), [bpe.processor("json_schema", schema)], greedy_sampler)])[0]
    rows = run_batch(bpe, [(bpe.prompt("Tell me a story."), [], greedy_sampler),
                           (bpe.prompt(), [bpe.processor("json_schema", schema)], greedy_sampler),
                           (bpe.prompt(), [bpe.processor("json_object")], SeededSampler(1.0, 1.0, seed=5))])
    assert rows[1] == alone


@pytest.mark.parametrize("engines_way", [False, True], ids=["mlx-lm's generator", "joining, planned, with company"])
def test_joining_the_batch_from_solo_keeps_the_grammar_in_step(bpe: Loaded, engines_way: bool) -> None:
    """As the batcher hands a solo request over: its in-flight token becomes a one-token prompt, and the same
    processor object goes with it (so it consumes that token on its next call). The engine's way: the row joins
    the step (engine/joining.py) of a batch whose steps are planned (batcher.constrained_step), beside another
    grammar row already decoding."""
    schema = SCHEMAS["nested objects"]
    for handed_over_after in (1, 3, 8):
        processor = bpe.processor("json_schema", schema)
        solo = SoloGeneration(bpe.model, bpe.prompt(), None, 0, greedy_sampler, [processor], prefill_step_size=64)
        tokens = [solo.next_token(more=True) for _ in range(handed_over_after - 1)]
        tokens.append(solo.next_token(more=False))
        generator: Any = BatchGenerator(bpe.model, stop_tokens=[[t] for t in sorted(bpe.eos)])
        step: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext
        if engines_way:
            join_in_step(generator)
            step = functools.partial(constrained_step, generator)
            generator.insert([bpe.prompt("Hi")], max_tokens=[MAX_TOKENS], samplers=[greedy_sampler],
                             logits_processors=[[bpe.processor("json_schema", SCHEMAS["array of enums"])]])
            for _ in range(4):
                with step():
                    generator.next()
        (uid,) = generator.insert([[tokens[-1]]], max_tokens=[MAX_TOKENS], caches=[solo.prompt_cache],
                                  all_tokens=[solo.tokens_in_cache], samplers=[greedy_sampler],
                                  logits_processors=[solo.logits_processors])
        reason = None
        while reason is None:
            with step():
                responses = generator.next()[1]
            for response in responses:
                if response.uid == uid:
                    tokens.append(response.token)
                    reason = response.finish_reason
        generator.close()
        jsonschema.validate(json.loads(assert_complete(bpe, tokens, reason, processor)), schema)
        assert tokens == run_solo(bpe, (bpe.prompt(), [bpe.processor("json_schema", schema)], greedy_sampler))[0]


# -- the mask, step by step (no model) ---------------------------------------------------------------------


def allowed(output: mx.array) -> set[int]:
    finite: list[bool] = mx.isfinite(output[0]).tolist()  # type: ignore[assignment]
    return {i for i, ok in enumerate(finite) if ok}


def drive(loaded: Loaded, processor: ConstraintProcessor, text: str, width: int = WIDTH) -> list[set[int]]:
    """Feed `text`'s tokens as if sampled; the allowed set before each token and after the last."""
    prompt = loaded.prompt()
    tokens = loaded.compiler.tokenizer.tokenize_str(text)
    masks = [allowed(processor(mx.array(prompt), mx.zeros((1, width))))]
    for index in range(len(tokens)):
        masks.append(allowed(processor(mx.array(prompt + tokens[: index + 1]), mx.zeros((1, width)))))
    return masks


def test_eos_is_allowed_exactly_when_the_output_is_complete(bpe: Loaded) -> None:
    processor = bpe.processor("json_schema", {"type": "array", "items": {"type": "integer"}})
    text = "[1, 22, 333]"
    masks = drive(bpe, processor, text)
    tokens = bpe.compiler.tokenizer.tokenize_str(text)
    for mask, token in zip(masks, tokens, strict=False):
        assert token in mask  # the text itself is allowed, token by token
        assert not mask & bpe.eos  # and it is not complete before its last token
    assert masks[-1] == bpe.eos  # complete, and nothing can follow: EOS only
    assert processor.is_stopped() and processor.is_accepting()


def test_a_complete_value_that_could_go_on_allows_eos_and_more(bpe: Loaded) -> None:
    processor = bpe.processor("json_schema", {"type": "integer"})
    mask = drive(bpe, processor, "12")[-1]
    assert bpe.eos <= mask and len(mask) > len(bpe.eos)  # "12" may end, or become "123"
    assert processor.is_accepting() and not processor.is_stopped()


def test_json_starts_at_once_with_no_whitespace(bpe: Loaded) -> None:
    first = drive(bpe, bpe.processor("json_object"), "")[0]
    tokenizer = bpe.compiler.tokenizer
    assert first and all(tokenizer.decode_str([t]).startswith("{") for t in first)


def test_whitespace_is_bounded(bpe: Loaded) -> None:
    processor = bpe.processor("json_object")
    masks = drive(bpe, processor, "{" + " " * 24)
    space = bpe.compiler.tokenizer.tokenize_str(" ")[0]
    assert space in masks[-2] and space not in masks[-1]


def test_padding_past_the_vocabulary_is_never_allowed(bpe: Loaded) -> None:
    processor = bpe.processor("json_schema", {"type": "string"})
    masks = drive(bpe, processor, '"free text', width=WIDTH)
    assert len(masks[-1]) > 300  # inside a string nearly anything goes...
    assert max(masks[-1]) < VOCAB  # ...but never a row past the tokenizer


def test_logits_narrower_than_the_vocabulary_are_masked_as_far_as_they_go(bpe: Loaded) -> None:
    processor = bpe.processor("json_object")
    output = processor(mx.array(bpe.prompt()), mx.zeros((1, 300)))
    assert output.shape == (1, 300)
    assert allowed(output) == {t for t in drive(bpe, bpe.processor("json_object"), "")[0] if t < 300}


def test_the_mask_keeps_the_logits_dtype_and_values(bpe: Loaded) -> None:
    processor = bpe.processor("json_object")
    logits = mx.random.normal((1, WIDTH)).astype(mx.float16)
    output = processor(mx.array(bpe.prompt()), logits)
    assert output.dtype == mx.float16
    keep = sorted(allowed(output))
    assert mx.array_equal(output[0, mx.array(keep)], logits[0, mx.array(keep)])


def test_a_rejected_token_fails_the_request_not_the_step(bpe: Loaded) -> None:
    processor = bpe.processor("json_object")
    prompt = bpe.prompt()
    processor(mx.array(prompt), mx.zeros((1, WIDTH)))
    bad = bpe.compiler.tokenizer.tokenize_str("x")[0]  # not "{": the grammar rejects it
    output = processor(mx.array([*prompt, bad]), mx.zeros((1, WIDTH)))  # no exception inside the step
    assert allowed(output) == bpe.eos  # the request ends at once
    assert processor.error is not None and processor.is_stopped() and not processor.is_accepting()
    with pytest.raises(ConstraintFailed, match="Constrained decoding failed"):
        processor.raise_if_failed()
    assert "\n" not in str(processor.error)  # llguidance's parser dump stays out of the message


# -- compiling ---------------------------------------------------------------------------------------------


def test_an_unknown_special_token_is_a_compile_error_naming_it(bpe: Loaded) -> None:
    with pytest.raises(ConstraintError, match="nope") as raised:
        bpe.processor("lark", 'start: <|nope|> "x"')
    assert raised.value.message.startswith("The grammar is invalid")


def test_an_unsatisfiable_schema_is_a_compile_error(bpe: Loaded) -> None:
    with pytest.raises(ConstraintError, match="minimum"):
        bpe.processor("json_schema", {"type": "integer", "minimum": 5, "maximum": 3})


def test_one_compiler_per_tokenizer(bpe: Loaded, tmp_path: Path) -> None:
    assert compiler_for(bpe.tokenizer) is bpe.compiler
    other = Loaded(tm.make_tiny_model(tmp_path / "other", tokenizer="bpe", vocab_size=VOCAB))
    assert other.compiler is not bpe.compiler
    assert bpe.compiler.eos_token_ids == tuple(sorted(bpe.eos))
    assert bpe.compiler.tokenizer.vocab_size == VOCAB


def test_a_tokenizer_without_eos_cannot_be_constrained(bpe: Loaded) -> None:
    with pytest.raises(ConstraintError, match="no EOS"):
        GrammarCompiler(bpe.tokenizer._tokenizer, [])


# -- the demo model: a real (if tiny) trained BPE ----------------------------------------------------------


class Address(BaseModel):
    city: str
    number: int


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]
    address: Address | None


@pytest.fixture(scope="module")
def demo() -> Iterator[Loaded]:
    yield Loaded(demo_model_path())


@pytest.mark.parametrize("make_sampler", [lambda: greedy_sampler, lambda: SeededSampler(0.8, 1.0, seed=0)])
def test_the_demo_model_fills_a_pydantic_schema(demo: Loaded, make_sampler: Callable[[], Any]) -> None:
    schema = to_strict_json_schema(Person)
    processor = demo.processor("json_schema", schema, strict=True)
    tokens, reason = run_solo(demo, (demo.prompt("Describe a person as JSON."), [processor], make_sampler()))
    person = Person.model_validate_json(assert_complete(demo, tokens, reason, processor))
    jsonschema.validate(person.model_dump(), schema)
