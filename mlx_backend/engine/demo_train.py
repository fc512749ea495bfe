"""Make the demo model: a tiny llama trained briefly with MLX on Python's bundled documentation topics.

    python -m mlx_backend.engine.demo_train [--steps N] [--out DIR]

The text is `pydoc_data.topics.topics`, which ships with CPython (PSF license), so the project needs no
downloaded data. Each topic is trained on twice: as plain text, and cut into chat turns (a question about
the topic, a paragraph of it as the answer) rendered with the model's own chat template, so chat
completions follow the format and usually end with `<|end|>`. Deterministic for a given seed and steps.

On Linux, mlx-cpu multiplies matrices with a bundled reference BLAS (a few GFLOPS); preloading OpenBLAS
makes training ~5x faster: `LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 python -m ...`
(Debian/Ubuntu package `libopenblas0-pthread`).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from pydoc_data.topics import topics
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.nn.layers.base import Module
from mlx.nn.utils import value_and_grad as module_value_and_grad
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from mlx_backend.demo import DEMO_MODEL_ID, demo_model_path

SEED = 0
VOCAB_SIZE = 2048
CONTEXT_LENGTH = 512
SEQUENCE_LENGTH = 256  # trained on half the context: twice the steps per minute on two CPU cores
BATCH_SIZE = 16
LEARNING_RATE = 3e-3
WARMUP_STEPS = 50
HELD_OUT_FRACTION = 0.1  # topics kept out of training, to report an honest validation loss

END_OF_TEXT = "<|endoftext|>"
END_OF_TURN = "<|end|>"
ROLES = ("system", "user", "assistant", "tool")
SPECIAL_TOKENS = [END_OF_TEXT, *(f"<|{role}|>" for role in ROLES), END_OF_TURN]

# Chats render as role-token turns. With tools, the Hermes convention (Qwen2.5, Hermes 2/3) the engine reads
# (mlx_backend/engine/tools): the tools in a system turn, each call as <tool_call>{"name", "arguments"}</tool_call>.
# A chat without tools renders exactly as the model was trained on it.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>\nYou may call these tools. To call one, reply with "
    "<tool_call>\n{\"name\": <tool name>, \"arguments\": <arguments as JSON>}\n</tool_call>\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools><|end|>\n{% endif %}"
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
    "{% for call in message['tool_calls'] or [] %}"
    "{% set tool_call = call['function'] if call['function'] is defined else call %}"
    "<tool_call>\n{\"name\": \"{{ tool_call.name }}\", \"arguments\": {{ tool_call.arguments | tojson }}}\n"
    "</tool_call>"
    "{% endfor %}"
    "<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

MODEL_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 192,
    "num_hidden_layers": 4,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "vocab_size": VOCAB_SIZE,
    "max_position_embeddings": CONTEXT_LENGTH,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "float16",
}

QUESTIONS = (
    "Tell me about {subject}.",
    "What is {subject} in Python?",
    "Explain {subject}.",
    "How does {subject} work?",
    "What does the documentation say about {subject}?",
)
FOLLOW_UPS = ("Tell me more.", "Go on.", "What else?", "And then?")
SYSTEM_PROMPTS = ("You are a helpful assistant.", "You answer questions about Python.", "Be concise.")
ANSWER_CHARS = 700  # paragraphs are grouped into answers of about this many characters


def split_topics(rng: random.Random) -> tuple[dict[str, str], dict[str, str]]:
    """Training and held-out topics, by name."""
    names = sorted(topics)
    rng.shuffle(names)
    held_out = max(1, round(len(names) * HELD_OUT_FRACTION))
    return {n: topics[n] for n in sorted(names[held_out:])}, {n: topics[n] for n in sorted(names[:held_out])}


def answers(text: str) -> list[str]:
    """Consecutive paragraphs grouped into chunks of about ANSWER_CHARS."""
    chunks: list[str] = []
    current: list[str] = []
    for paragraph in (p.strip("\n") for p in text.split("\n\n")):
        if not paragraph.strip():
            continue
        current.append(paragraph)
        if sum(len(p) for p in current) >= ANSWER_CHARS:
            chunks.append("\n\n".join(current))
            current = []
    if current:
        chunks.append("\n\n".join(current))
    return chunks


def conversations(name: str, text: str, rng: random.Random) -> list[list[dict[str, str]]]:
    """The topic as short chats: a question, then an answer, sometimes a follow-up and the next answer."""
    subject = name.replace("-", " ")
    chats: list[list[dict[str, str]]] = []
    chunks = answers(text)
    index = 0
    while index < len(chunks):
        chat: list[dict[str, str]] = []
        if rng.random() < 0.3:
            chat.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        chat.append({"role": "user", "content": rng.choice(QUESTIONS).format(subject=subject)})
        chat.append({"role": "assistant", "content": chunks[index]})
        index += 1
        if index < len(chunks) and rng.random() < 0.5:
            chat.append({"role": "user", "content": rng.choice(FOLLOW_UPS)})
            chat.append({"role": "assistant", "content": chunks[index]})
            index += 1
        chats.append(chat)
    return chats


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style): any text round-trips; mlx-lm streams it with its BPE detokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=CONTEXT_LENGTH,
        chat_template=CHAT_TEMPLATE,
    )


def encode_documents(tokenizer: PreTrainedTokenizerFast, texts: dict[str, str], rng: random.Random) -> np.ndarray:
    """Every topic as plain text and as chats, shuffled, each followed by END_OF_TEXT, in one stream."""
    documents: list[list[int]] = []
    for name, text in texts.items():
        documents.append(tokenizer.encode(text))
        for chat in conversations(name, text, rng):
            rendered = str(tokenizer.apply_chat_template(chat, tokenize=False))
            documents.append(tokenizer.encode(rendered, add_special_tokens=False))
    rng.shuffle(documents)
    end = tokenizer.get_vocab()[END_OF_TEXT]
    return np.array([token for doc in documents for token in [*doc, end]], dtype=np.uint16)


def batches(stream: np.ndarray, rng: np.random.Generator) -> tuple[mx.array, mx.array]:
    """Random windows of the stream: inputs and the next-token targets."""
    starts = rng.integers(0, len(stream) - SEQUENCE_LENGTH - 1, size=BATCH_SIZE)
    windows = np.stack([stream[s : s + SEQUENCE_LENGTH + 1] for s in starts]).astype(np.int32)
    return mx.array(windows[:, :-1]), mx.array(windows[:, 1:])


def parameters_of(model: Module) -> dict[str, mx.array]:
    return dict(tree_flatten(model.parameters()))  # type: ignore[no-untyped-call]


def loss_fn(model: Module, inputs: mx.array, targets: mx.array) -> mx.array:
    logits = model(inputs)
    return nn.losses.cross_entropy(logits.astype(mx.float32), targets, reduction="mean")


def learning_rate(steps: int) -> Callable[[mx.array], mx.array]:
    """Linear warmup, then cosine decay to a tenth."""
    warmup = optim.linear_schedule(1e-5, LEARNING_RATE, WARMUP_STEPS)
    decay = optim.cosine_decay(LEARNING_RATE, max(1, steps - WARMUP_STEPS), LEARNING_RATE / 10)
    return optim.join_schedules([warmup, decay], [WARMUP_STEPS])


def train(
    model: Module, train_stream: np.ndarray, val_stream: np.ndarray, steps: int, log_every: int
) -> tuple[float, float]:
    """AdamW on next-token loss; returns (mean train loss of the last log window, validation loss)."""
    optimizer = optim.AdamW(learning_rate=learning_rate(steps), weight_decay=0.01)
    value_and_grad = module_value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs: mx.array, targets: mx.array) -> mx.array:
        loss: mx.array
        loss, grads = value_and_grad(model, inputs, targets)
        grads, _ = optim.clip_grad_norm(grads, 1.0)  # type: ignore[no-untyped-call]
        optimizer.update(model, grads)
        return loss

    # Fixed validation windows, so the figure is comparable between log lines.
    val_batches = [batches(val_stream, np.random.default_rng(SEED + i)) for i in range(4)]

    def validation_loss() -> float:
        return sum(cast(float, loss_fn(model, x, y).item()) for x, y in val_batches) / len(val_batches)

    sampler = np.random.default_rng(SEED)
    window: list[float] = []
    train_loss = val_loss = math.nan
    started = time.monotonic()
    for number in range(1, steps + 1):
        inputs, targets = batches(train_stream, sampler)
        loss = step(inputs, targets)
        mx.eval(state, loss)
        window.append(cast(float, loss.item()))
        if number % log_every == 0 or number == steps:
            train_loss, val_loss = sum(window) / len(window), validation_loss()
            window = []
            elapsed = time.monotonic() - started
            print(
                f"step {number:5d}/{steps}  train loss {train_loss:.3f}  val loss {val_loss:.3f}  {elapsed:5.0f} s",
                flush=True,
            )
    return train_loss, val_loss


def sample_reply(folder: Path, question: str, max_tokens: int = 80) -> str:
    """Load the saved folder the way the server will, and answer one chat question."""
    import mlx_lm
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = mlx_lm.load(str(folder))[:2]
    prompt = tokenizer.apply_chat_template(  # type: ignore[no-untyped-call]
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    mx.random.seed(SEED)
    sampler = make_sampler(temp=0.7, top_p=0.9)
    response = mlx_lm.generate(model, tokenizer, prompt, max_tokens=max_tokens, sampler=sampler)
    return str(response)


README = """# {model_id}: the demo model

A tiny language model that mlx-gateway ships so that `mlx-gateway serve` has something to answer with
when no models are configured. It is a toy: it writes text that *looks* like Python's documentation,
it is often wrong or incoherent, and it is not useful for real work.

- Architecture: llama, hidden size {hidden_size}, {num_hidden_layers} layers, {num_attention_heads} \
attention heads ({num_key_value_heads} key/value heads), MLP {intermediate_size}, context {context} tokens, \
{parameters:,} parameters, float16.
- Tokenizer: byte-level BPE, {vocab_size} tokens, trained on the same text. Role tokens \
`<|system|>`, `<|user|>`, `<|assistant|>`, `<|tool|>` and `<|end|>` are special tokens; a chat turn \
ends with `<|end|>`, which (with `<|endoftext|>`) stops generation.
- Training: {steps} steps of AdamW (batch {batch} x {sequence} tokens, seed {seed}) on a 2-core CPU with \
MLX, {minutes:.1f} minutes. Final training loss {train_loss:.3f}; loss on held-out topics {val_loss:.3f} \
(nats per token).
- Data: the documentation topics bundled with CPython (`pydoc_data.topics.topics`, the text behind \
`help("topics")`), as plain text and cut into question-and-answer chats. That text is part of Python's \
documentation, Copyright Python Software Foundation, under the PSF License Agreement \
(https://docs.python.org/3/license.html). {held_out} topics were held out for the validation loss.
- Made by `python -m mlx_backend.engine.demo_train --steps {steps}`; deterministic for the same seed, steps and \
library versions.

Asked "{question}", it answered (temperature 0.7):

```
{sample}
```

## Serving real models

Point the server at real MLX checkpoints, for example those `mlx-community` publishes on Hugging Face,
downloaded beforehand (e.g. `hf download mlx-community/Llama-3.2-1B-Instruct-4bit`):

- `mlx-gateway serve --models-dir ~/models`: each model folder under it (`config.json`, `*.safetensors`,
  tokenizer files; `org/name` nesting works) is offered under its folder name. With a models dir the demo
  model is no longer offered unless you pass `--demo-model`.
- Models already in the Hugging Face cache (`~/.cache/huggingface/hub`, or `HF_HUB_CACHE`) are offered
  too, under their repository id; `--no-hf-cache` turns that off.

The server never downloads anything itself.
"""


def save(model: Module, tokenizer: PreTrainedTokenizerFast, out: Path, *, eos_ids: list[int]) -> None:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    weights = {name: value.astype(mx.float16) for name, value in parameters_of(model).items()}
    mx.save_safetensors(str(out / "model.safetensors"), weights, {"format": "mlx"})
    config = {**MODEL_CONFIG, "bos_token_id": eos_ids[0], "eos_token_id": eos_ids}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # The chat template goes into tokenizer_config.json, where every loader looks.
    tokenizer.save_pretrained(str(out), save_jinja_files=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--out", type=Path, default=demo_model_path())
    parser.add_argument("--log-every", type=int, default=25)
    args = parser.parse_args(argv)
    transformers_logging.set_verbosity_error()  # type: ignore[no-untyped-call]  # whole topics are longer than the context: that is fine here

    rng = random.Random(SEED)
    mx.random.seed(SEED)
    train_topics, held_out_topics = split_topics(rng)
    tokenizer = build_tokenizer(list(topics[name] for name in sorted(topics)))
    train_stream = encode_documents(tokenizer, train_topics, rng)
    val_stream = encode_documents(tokenizer, held_out_topics, rng)
    print(f"{len(train_stream):,} training tokens, {len(val_stream):,} held-out tokens", flush=True)

    model = llama.Model(llama.ModelArgs.from_dict(MODEL_CONFIG))  # type: ignore[no-untyped-call]
    mx.eval(model.parameters())
    parameters = sum(value.size for value in parameters_of(model).values())
    print(f"{parameters:,} parameters", flush=True)

    started = time.monotonic()
    train_loss, val_loss = train(model, train_stream, val_stream, args.steps, args.log_every)
    minutes = (time.monotonic() - started) / 60

    eos_ids = [tokenizer.get_vocab()[token] for token in (END_OF_TEXT, END_OF_TURN)]
    save(model, tokenizer, args.out, eos_ids=eos_ids)
    question = "What is a generator?"
    sample = sample_reply(args.out, question)
    print(f"{question!r} -> {sample!r}", flush=True)
    readme = README.format(
        model_id=DEMO_MODEL_ID,
        **MODEL_CONFIG,
        context=CONTEXT_LENGTH,
        parameters=parameters,
        steps=args.steps,
        batch=BATCH_SIZE,
        sequence=SEQUENCE_LENGTH,
        seed=SEED,
        minutes=minutes,
        train_loss=train_loss,
        val_loss=val_loss,
        held_out=len(held_out_topics),
        question=question,
        sample=sample.strip(),
    )
    (args.out / "README.md").write_text(readme)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
