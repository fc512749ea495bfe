"""Tiny model folders that `mlx_lm.load` loads like any checkpoint, made offline in seconds, and helpers
that damage such a folder in the ways real model folders go bad (each one a real file mutation).

The default tokenizer is word-level: special role tokens, single characters, common English words, then
synthetic words (`w123`) up to `vocab_size`, so any vocabulary size from ~100 to 128256 is cheap. It
lowercases and cannot spell everything, so text does not round-trip. Two byte-level BPEs (GPT-2 style, as
real checkpoints have) exist beside it: `tokenizer="bytes"` round-trips any text, as JSON for tool calls
must; `tokenizer="bpe"` is trained on English and JSON text, so JSON tokenizes the way it does for a real
model (`{"`, `":`, ` "`, digits...), and can leave the embedding padded past the vocabulary (see
`_write_bpe_tokenizer`).

`chat_format` dresses the model as a real instruct family: that family's published chat template (from
tests/support/chat_templates, see SOURCES.md), its special tokens under their real names, its BOS/EOS
layout, on a byte-level BPE. The weights stay random and llama-shaped; only the tokenizer side is the
family's.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS = "<|bos|>"
EOS = "<|eos|>"
UNK = "<|unk|>"
END = "<|end|>"  # ends every chat turn; listed in config's eos_token_id so generation stops on it
ROLE_TOKENS = {role: f"<|{role}|>" for role in ("system", "user", "assistant", "tool")}
SPECIAL_TOKENS = [BOS, EOS, UNK, *ROLE_TOKENS.values(), END]

# logit_bias (OpenAI's shape) that bans the word-level tokenizer's stop tokens: a request then runs to its
# max_tokens. A test that acts while a request decodes must not let a random model's early EOS end it first.
NEVER_STOP = {str(SPECIAL_TOKENS.index(EOS)): -100, str(SPECIAL_TOKENS.index(END)): -100}

WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# Split in _vocabulary: one word per vocabulary entry, in this order.
COMMON_WORDS = """
hello model python code function value string return error word words the of and to in is it you that he
was for on are with as his they be at one have this from or had by not word but what some we can out
other were all there when up use your how said an each she which do their time if will way about many
then them write would like so these her long make thing see him two has look more day could go come did
number sound no most people my over know water than call first who may down side been now find any new
work part take get place made live where after back little only round man year came show every good me
give our under name very through just form sentence great think say help low line differ turn cause much
mean before move right boy old too same tell does set three want air well also play small end put home
read hand port large spell add even land here must big high such follow act why ask men change went
light kind off need house picture try us again animal point mother world near build self earth father
head stand own page should country found answer school grow study still learn plant cover food sun four
between state keep eye never last let thought city tree cross farm hard start might story saw far sea
draw left late run while press close night real life few north open seem together next white children
begin got walk example ease paper group always music those both mark often letter until mile river car
feet care second book carry took science eat room friend began idea fish mountain stop once base hear
horse cut sure watch color face wood main enough plain girl usual young ready above ever red list though
feel talk bird soon body dog family direct pose leave song measure door product black short numeral
class wind question happen complete ship area half rock order fire south problem piece told knew pass
since top whole king space heard best hour better true during hundred five remember step early hold west
ground interest reach fast verb sing listen six table travel less morning ten simple several vowel
toward war lay against pattern slow center love person money serve appear road map rain rule govern pull
cold notice voice unit power town fine certain fly fall lead cry dark machine note wait plan figure star
box noun field rest correct able pound done beauty drive stood contain front teach week final gave green
oh quick develop ocean warm free minute strong special mind behind clear tail produce fact street inch
multiply nothing course stay wheel full force blue object decide surface deep moon island foot system
busy test record boat common gold possible plane stead dry wonder laugh thousand ago ran check game
shape equate hot miss brought heat snow tire bring yes distant fill east paint language among
"""


def _vocabulary(vocab_size: int) -> list[str]:
    """Special tokens, single characters, common words, then synthetic words: exactly vocab_size."""
    characters = list(string.ascii_lowercase + string.digits + string.punctuation)
    base = SPECIAL_TOKENS + characters
    if vocab_size < len(base):
        raise ValueError(f"vocab_size must be at least {len(base)}, got {vocab_size}")
    words = list(dict.fromkeys(w for w in COMMON_WORDS.split() if len(w) > 1))  # dedupe, keep order
    vocab = base + words[: vocab_size - len(base)]
    vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
    return vocab


# Role tokens frame each message; tool calls and tool definitions are shown as JSON so templates that
# get them still render (the model is random, so nothing more faithful is needed).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\ntools: {{ tools | tojson }}<|end|>\n{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{% if message.tool_calls %}{{ message['tool_calls'] | tojson }}{% endif %}"
    "<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _write_tokenizer(path: Path, vocab_size: int, context_length: int) -> dict[str, int]:
    vocab = {word: index for index, word in enumerate(_vocabulary(vocab_size))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.normalizer = normalizers.Lowercase()  # the vocabulary is lowercase; "Hello" should not be unknown
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    # WordPiece's decoder joins words with spaces and glues punctuation back ("hello , world" -> "hello,").
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tokenizer.add_special_tokens(SPECIAL_TOKENS)  # registered so the pre-tokenizer never splits them

    _save_tokenizer(path, tokenizer, context_length)
    return vocab


def _save_tokenizer(path: Path, tokenizer: Tokenizer, context_length: int) -> None:
    """The tiny format's tokenizer files: the template goes into tokenizer_config.json (not
    chat_template.jinja), where every loader looks; special_tokens_map.json is written by hand, since
    transformers 5 no longer writes it and older checkpoints all have one."""
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        additional_special_tokens=[*ROLE_TOKENS.values(), END],
        model_max_length=context_length,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(path), save_jinja_files=False)
    special_tokens_map = {
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": EOS,
        "additional_special_tokens": [*ROLE_TOKENS.values(), END],
    }
    (path / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2) + "\n")


def json_corpus(count: int = 400, seed: int = 0) -> list[str]:
    """JSON documents made of the common words (objects, arrays, numbers, booleans, null), compact and
    pretty-printed, plus the words as sentences: what a BPE learns JSON's usual tokens from."""
    rng = random.Random(seed)
    words = COMMON_WORDS.split()

    def value(depth: int) -> object:
        kind = rng.randrange(7 if depth < 3 else 5)
        if kind == 0:
            return rng.randint(-1000, 100000)
        if kind == 1:
            return round(rng.uniform(-100, 100), rng.randint(1, 4))
        if kind == 2:
            return " ".join(rng.choices(words, k=rng.randint(1, 4)))
        if kind == 3:
            return rng.choice([True, False, None])
        if kind == 4:
            return rng.choice(words)
        if kind == 5:
            return [value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {rng.choice(words): value(depth + 1) for _ in range(rng.randint(1, 4))}

    texts = [" ".join(rng.choices(words, k=12)) + "." for _ in range(count)]
    for index in range(count):
        document = {rng.choice(words): value(0) for _ in range(rng.randint(1, 5))}
        texts.append(json.dumps(document, indent=[None, 2, 4][index % 3]))
    return texts


def _write_bpe_tokenizer(path: Path, vocab_size: int, context_length: int) -> dict[str, int]:
    """Byte-level BPE trained on `json_corpus`: at most vocab_size tokens (fewer if the corpus runs out of
    merges, which leaves the embedding padded past the tokenizer, as in many real checkpoints)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(json_corpus(), trainer=trainer)
    vocab = tokenizer.get_vocab()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, vocab[BOS])]
    )
    _save_tokenizer(path, tokenizer, context_length)
    return vocab


# ---- byte-level BPE and real chat formats ----------------------------------------------------------

TokenizerKind = Literal["words", "bytes"]
ChatFormat = Literal["tiny", "qwen2.5", "qwen3", "llama3.1", "mistral", "qwen3-thinking-2507", "deepseek-r1",
                     "gpt-oss", "glm-4.6"]

CHAT_TEMPLATES_DIR = Path(__file__).parent / "chat_templates"


@dataclass(frozen=True)
class _Format:
    """What a family's tokenizer looks like: its template, its special tokens, its BOS/EOS layout."""

    template_file: str | None
    special: tuple[str, ...]  # never split by the pre-tokenizer; first one is token id 0
    bos: str | None
    eos: str  # tokenizer_config's eos_token
    stop: tuple[str, ...]  # config.json's eos_token_id: every token that ends generation
    add_bos: bool  # the post-processor prepends bos (Llama, Mistral); Qwen has no BOS at all
    unk: str | None = None
    pad: str | None = None
    added: tuple[str, ...] = ()  # added tokens that are not special (Qwen2.5's <tool_call> pair)


# DeepSeek's special tokens spell their bars and spaces with FULLWIDTH VERTICAL LINE and LOWER ONE EIGHTH BLOCK.
_R1_BOS, _R1_EOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>"
_R1_USER, _R1_ASSISTANT = "<\uff5cUser\uff5c>", "<\uff5cAssistant\uff5c>"

_FORMATS: dict[str, _Format] = {
    "tiny": _Format(None, tuple(SPECIAL_TOKENS), BOS, EOS, (EOS, END), True, unk=UNK, pad=EOS),
    # Qwen2.5-Instruct: ChatML; <tool_call> and </tool_call> are added tokens with "special": false.
    "qwen2.5": _Format(
        "qwen2.5-instruct.jinja", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
        ("<|im_end|>", "<|endoftext|>"), False, pad="<|endoftext|>", added=("<tool_call>", "</tool_call>"),
    ),
    # Qwen3: the same ChatML and calls, plus <think> reasoning and <tool_response> as added tokens.
    "qwen3": _Format(
        "qwen3.jinja", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
        ("<|im_end|>", "<|endoftext|>"), False, pad="<|endoftext|>",
        added=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
    ),
    # Qwen3-Thinking-2507: Qwen3's tokens; its template always opens <think> in the generation prompt.
    "qwen3-thinking-2507": _Format(
        "qwen3-thinking-2507.jinja", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>",
        ("<|im_end|>", "<|endoftext|>"), False, pad="<|endoftext|>",
        added=("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"),
    ),
    # DeepSeek-R1-Distill-Qwen: fullwidth-bar role tokens, <think> opened in the generation prompt, no tools.
    "deepseek-r1": _Format(
        "deepseek-r1-distill-qwen.jinja", (_R1_BOS, _R1_EOS, _R1_USER, _R1_ASSISTANT), _R1_BOS, _R1_EOS, (_R1_EOS,),
        False, pad=_R1_EOS, added=("<think>", "</think>"),
    ),
    # gpt-oss: OpenAI's harmony format; <|return|> ends a reply, <|call|> a tool call.
    "gpt-oss": _Format(
        "gpt-oss.jinja",
        ("<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>",
         "<|return|>", "<|call|>"),
        None, "<|return|>", ("<|return|>", "<|call|>", "<|endoftext|>"), False, pad="<|endoftext|>",
    ),
    # GLM-4.6 (the GLM-4.5 line): <think> reasoning, <tool_call>name<arg_key>..</arg_key><arg_value>.. calls.
    "glm-4.6": _Format(
        "glm-4.6.jinja",
        ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"),
        None, "<|endoftext|>", ("<|endoftext|>", "<|user|>", "<|observation|>"), False, pad="<|endoftext|>",
        added=("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
               "</arg_value>", "<tool_response>", "</tool_response>"),
    ),
    # Llama-3.1-Instruct: header tokens, <|eot_id|> ends a turn, <|eom_id|> a builtin-tool call, ipython role.
    "llama3.1": _Format(
        "llama3.1-instruct.jinja",
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
         "<|eot_id|>", "<|python_tag|>", "<|finetune_right_pad_id|>"),
        "<|begin_of_text|>", "<|eot_id|>", ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), True,
    ),
    # Mistral-Nemo-Instruct-2407: [INST] turns, tools in [AVAILABLE_TOOLS], calls after [TOOL_CALLS].
    "mistral": _Format(
        "mistral-nemo-instruct-2407.jinja",
        ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
         "[/TOOL_RESULTS]", "[TOOL_CALLS]"),
        "<s>", "</s>", ("</s>",), True, unk="<unk>",
    ),
}

# Text the byte-level BPE learns its merges from: English and the JSON of tool calls, so common words and
# JSON punctuation become single tokens and a tool call spans tokens of many sizes.
_BPE_CORPUS = [
    *COMMON_WORDS.split(),
    COMMON_WORDS,
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
    '{"name": "search", "parameters": {"query": "tiny models", "limit": 10, "exact": true, "tags": null}}',
    '[{"name": "add", "arguments": {"a": 1.5, "b": -2}}, {"name": "lookup", "arguments": {}}]',
    '{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}',
]


def chat_template(chat_format: ChatFormat) -> str:
    """The chat template a format's tokenizer carries, as its model publishes it."""
    spec = _FORMATS[chat_format]
    if spec.template_file is None:
        return CHAT_TEMPLATE
    return (CHAT_TEMPLATES_DIR / spec.template_file).read_text()


def fill_vocabulary(tokenizer: Tokenizer, vocab_size: int, seed: int = 0) -> Tokenizer:
    """A byte-level BPE grown to vocab_size with synthetic ordinary tokens shaped like a large real
    vocabulary's (words with and without a leading space, CJK, Cyrillic, digits, punctuation, whitespace runs).
    Encoding never produces them (they have no merges), but the model's logits, decoding and a grammar engine
    see a vocabulary of real size and kind: real checkpoints have a few hundred special tokens, not 100k."""
    if tokenizer.get_vocab_size() >= vocab_size:
        return tokenizer
    spec = json.loads(tokenizer.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    rng = random.Random(seed)
    next_id = max(max(vocab.values()), *(t["id"] for t in spec["added_tokens"])) + 1
    while next_id < vocab_size:
        piece = "".join(p for p, _ in byte_level.pre_tokenize_str(_synthetic_piece(rng)))
        if piece and piece not in vocab:
            vocab[piece] = next_id
            next_id += 1
    return Tokenizer.from_str(json.dumps(spec))


def _synthetic_piece(rng: random.Random) -> str:
    kind = rng.random()
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    if kind < 0.55:
        word = "".join(rng.choices(letters, weights=range(26, 0, -1), k=rng.randint(2, 10)))
        word = word.capitalize() if rng.random() < 0.2 else word
        return (" " if rng.random() < 0.6 else "") + word
    if kind < 0.70:
        return "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(1, 3)))
    if kind < 0.78:
        cyrillic = "".join(chr(rng.randint(0x430, 0x44F)) for _ in range(rng.randint(2, 8)))
        return (" " if rng.random() < 0.5 else "") + cyrillic
    if kind < 0.84:
        return "".join(rng.choices(string.digits, k=rng.randint(1, 3)))
    if kind < 0.95:
        return "".join(rng.choices('{}[]()<>:;,."\'=+-*/_!?#@$%&|\\', k=rng.randint(2, 4)))
    return "".join(rng.choices(" \n\t", weights=(8, 2, 1), k=rng.randint(2, 16)))


def _byte_level_bpe(spec: _Format, vocab_size: int) -> Tokenizer:
    """Byte-level BPE of exactly vocab_size tokens: special tokens, the 256 byte symbols, learned merges,
    then synthetic ordinary tokens if the corpus runs out of merges (`fill_vocabulary`), then the family's
    non-special added tokens last."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    learned = vocab_size - len(spec.added)
    minimum = len(spec.special) + 256 + len(spec.added)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size must be at least {minimum} for a byte-level tokenizer, got {vocab_size}")
    trainer = trainers.BpeTrainer(  # type: ignore[call-arg]
        vocab_size=learned,
        special_tokens=list(spec.special),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_BPE_CORPUS * 4, trainer=trainer)
    tokenizer = fill_vocabulary(tokenizer, learned)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.added])
    vocab = tokenizer.get_vocab()
    if spec.add_bos and spec.bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, vocab[spec.bos])]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tokenizer.get_vocab_size() == vocab_size, (tokenizer.get_vocab_size(), vocab_size)
    return tokenizer


def _write_byte_level_tokenizer(
    path: Path, chat_format: ChatFormat, vocab_size: int, context_length: int
) -> dict[str, int]:
    spec = _FORMATS[chat_format]
    tokenizer = _byte_level_bpe(spec, vocab_size)
    named = {spec.bos, spec.eos, spec.unk, spec.pad}
    additional = [t for t in spec.special if t not in named]
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=spec.bos,
        eos_token=spec.eos,
        unk_token=spec.unk,
        pad_token=spec.pad,
        additional_special_tokens=additional,
        model_max_length=context_length,
        chat_template=chat_template(chat_format),
        add_bos_token=spec.add_bos,
    )
    fast.save_pretrained(str(path), save_jinja_files=False)
    special_tokens_map: dict[str, object] = {
        name: token
        for name, token in (("bos_token", spec.bos), ("eos_token", spec.eos), ("unk_token", spec.unk),
                            ("pad_token", spec.pad))
        if token is not None
    }
    special_tokens_map["additional_special_tokens"] = additional
    (path / "special_tokens_map.json").write_text(json.dumps(special_tokens_map, indent=2) + "\n")
    return dict(tokenizer.get_vocab())


# Prime, so a matrix tiled from the block never repeats row for row (rows are powers of two wide).
_RANDOM_BLOCK = 1_000_003


def _random_weights(shapes: dict[str, mx.array], dtype: mx.Dtype, seed: int) -> dict[str, mx.array]:
    """Gaussian weights scaled by 1/sqrt(fan_in) (norms are ones), cut from one random block.

    Drawing 1.2B fresh normals takes ~30 s on two cores; tiling one block takes ~2 s and the numbers
    are just as good for a model whose point is its shape.
    """
    block = mx.random.normal((_RANDOM_BLOCK,), key=mx.random.key(seed))
    scaled_blocks: dict[int, mx.array] = {}  # one per fan_in: scaling the block beats scaling each matrix
    weights: dict[str, mx.array] = {}
    for index, (name, parameter) in enumerate(shapes.items()):
        if parameter.ndim == 1:
            weights[name] = mx.ones(parameter.shape, dtype=dtype)
            continue
        fan_in = parameter.shape[-1]
        if fan_in not in scaled_blocks:
            scaled_blocks[fan_in] = (block * fan_in**-0.5).astype(dtype)
        # Each matrix starts somewhere else in the block; slicing from 0 keeps the result contiguous.
        start = mx.roll(scaled_blocks[fan_in], index * 104_729)
        repeats = parameter.size // _RANDOM_BLOCK + 1
        weights[name] = mx.tile(start, (repeats,))[: parameter.size].reshape(parameter.shape)
    return weights


def make_tiny_model(
    path: Path,
    *,
    model_type: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    context_length: int = 512,
    dtype: str = "float16",
    seed: int = 0,
    tokenizer: Literal["words", "bpe", "bytes"] = "words",
    tokenizer_vocab_size: int | None = None,
    chat_format: ChatFormat = "tiny",
) -> Path:
    """Write a randomly initialised llama-shaped model folder at `path` (created if missing).

    `model_type` is written to config.json as given; the weights are always llama-shaped, so any type
    mlx-lm maps onto llama's layout (e.g. "llama", "mistral") loads. `tokenizer` picks the word-level
    tokenizer or a byte-level BPE (see the module's docstring); the model has `vocab_size` rows either way.
    `tokenizer_vocab_size` ("bpe" only) trains a smaller vocabulary, so the embedding is padded past it (the
    logits are wider than the vocabulary, as for Qwen's checkpoints). A `chat_format` other than "tiny"
    implies the "bytes" tokenizer.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = _FORMATS[chat_format]
    if tokenizer == "bpe":
        if tokenizer_vocab_size is not None and tokenizer_vocab_size > vocab_size:
            raise ValueError("tokenizer_vocab_size must not exceed vocab_size")
        vocab = _write_bpe_tokenizer(path, tokenizer_vocab_size or vocab_size, context_length)
    elif chat_format == "tiny" and tokenizer == "words":
        vocab = _write_tokenizer(path, vocab_size, context_length)
    else:
        vocab = _write_byte_level_tokenizer(path, chat_format, vocab_size, context_length)

    config: dict[str, object] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": model_type,
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "vocab_size": vocab_size,
        "max_position_embeddings": context_length,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": vocab[spec.bos] if spec.bos is not None else None,
        # A list, as Llama 3 checkpoints have: the end of a chat turn also stops generation.
        "eos_token_id": [vocab[t] for t in spec.stop],
        "torch_dtype": dtype,
    }
    # The model is built only for its parameter names and shapes; its own (lazy) init is never run.
    model = llama.Model(llama.ModelArgs.from_dict(config))  # type: ignore[no-untyped-call]
    weights = _random_weights(dict(tree_flatten(model.parameters())), getattr(mx, dtype), seed)
    mx.save_safetensors(str(path / WEIGHTS_FILE), weights, {"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def make_agent_model(path: Path, *, context_length: int = 131_072, chat_format: ChatFormat = "qwen2.5") -> Path:
    """A model for coding agents' requests (10k to 60k tokens of tools and instructions): Qwen2.5's chat
    template and tool calls (or another format's, e.g. Qwen3's with reasoning), a long context, and one layer
    of width 32. One layer is the point: a prefill evaluates only the KV cache, and one layer's keys and
    values come straight from the embeddings, so the attention runs for the last token alone; a 60k-token
    prompt prefills in about a second on a 2-core CPU (with two layers, the first layer's attention over the
    whole prompt takes minutes)."""
    return make_tiny_model(path, chat_format=chat_format, context_length=context_length, hidden_size=32,
                           num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64, vocab_size=2048)


def make_tiny_pipeline_model(path: Path, *, num_layers: int = 4, dtype: str = "float32", seed: int = 3) -> Path:
    """A tiny model that mlx-lm can split into pipeline stages (llama cannot): Ministral 3's text model
    (`ministral3`, llama-like, with `pipeline()` and `shard()`), the tiny tokenizer, random weights."""
    from mlx_lm.models import ministral3

    path = make_tiny_model(path, num_layers=num_layers, dtype=dtype, context_length=256, seed=seed)
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_theta")
    config.update(model_type="ministral3", architectures=["Ministral3ForCausalLM"], rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "llama_4_scaling_beta": 0.1,
        "original_max_position_embeddings": 256})
    model = ministral3.Model(ministral3.ModelArgs.from_dict(config))  # type: ignore[no-untyped-call]
    weights = _random_weights(dict(tree_flatten(model.parameters())), getattr(mx, dtype), seed)
    mx.save_safetensors(str(path / WEIGHTS_FILE), weights, {"format": "mlx"})
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


# ---- ways a model folder goes bad -------------------------------------------------------------------


def weight_files(path: Path) -> list[Path]:
    """The safetensors files mlx-lm would read (it globs `model*.safetensors`)."""
    return sorted(Path(path).glob("model*.safetensors"))


def remove_config(path: Path) -> Path:
    (Path(path) / "config.json").unlink()
    return path


def write_invalid_config_json(path: Path) -> Path:
    (Path(path) / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,,\n')
    return path


def set_model_type(path: Path, model_type: str = "no_such_arch") -> Path:
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    config["model_type"] = model_type
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def mismatch_shapes(path: Path) -> Path:
    """Double hidden_size in config.json so every weight disagrees with the shapes the config implies."""
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    config["hidden_size"] = int(config["hidden_size"]) * 2
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def remove_weights(path: Path) -> Path:
    for weights in weight_files(path):
        weights.unlink()
    (Path(path) / "model.safetensors.index.json").unlink(missing_ok=True)
    return path


def truncate_weights(path: Path) -> Path:
    """Cut each weights file in half, as an interrupted download or copy leaves it."""
    for weights in weight_files(path):
        os.truncate(weights, weights.stat().st_size // 2)
    return path


def corrupt_safetensors_header(path: Path, how: Literal["garbage", "huge_length"] = "garbage") -> Path:
    """Damage the safetensors header: the 8-byte little-endian length, then that many bytes of JSON.

    "garbage" keeps the length but overwrites the JSON; "huge_length" claims a header far past the file.
    """
    for weights in weight_files(path):
        with weights.open("r+b") as f:
            header_length = int.from_bytes(f.read(8), "little")
            if how == "garbage":
                f.write(b"{not json" + b"\xff" * max(0, header_length - 9))
            else:
                f.seek(0)
                f.write((2**62).to_bytes(8, "little"))
    return path


def remove_tokenizer(path: Path) -> Path:
    for name in TOKENIZER_FILES:
        (Path(path) / name).unlink(missing_ok=True)
    return path


def break_tokenizer(path: Path) -> Path:
    """tokenizer.json becomes invalid JSON (a half-written file)."""
    tokenizer_json = Path(path) / "tokenizer.json"
    text = tokenizer_json.read_text()
    tokenizer_json.write_text(text[: len(text) // 2])
    return path


def remove_chat_template(path: Path) -> Path:
    """A base model: loads and completes text, but has no chat template."""
    config_path = Path(path) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    (Path(path) / "chat_template.jinja").unlink(missing_ok=True)
    return path


def replace_weights_with_directory(path: Path) -> Path:
    """The weights path becomes a directory: unreadable as a file, for root too."""
    for weights in weight_files(path):
        weights.unlink()
        weights.mkdir()
    return path


def replace_weights_with_dangling_symlink(path: Path) -> Path:
    """The weights become a symlink to nothing, as a Hugging Face cache with a deleted blob leaves them."""
    for weights in weight_files(path):
        weights.unlink()
        weights.symlink_to(Path(path) / "blobs" / "missing-blob")
    return path


def copy_model(source: Path, destination: Path) -> Path:
    """A fresh copy of a model folder, so a test can damage it without touching a shared one."""
    shutil.copytree(source, destination)
    return destination
