"""The IPC contract: the messages between the gateway and the engine process, msgspec (msgpack) over a socket.

Plain data only: this module imports neither MLX nor Litestar. Each message is a tagged Struct so one
decoder per direction handles every kind.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import msgspec

# ---------------------------------------------------------------------------------------------------
# Shared pieces


class SamplingParams(msgspec.Struct, frozen=True, omit_defaults=True):
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # sample among the k most likely tokens; 0: no limit (Anthropic's top_k)
    seed: int | None = None
    stop: tuple[str, ...] = ()  # matched on decoded text, never emitted
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; k >= 0: each token's logprob and its k most likely rivals
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit), OpenAI's logit_bias


class Constraint(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a completion must match, enforced token by token (`mlx_backend/grammar.py` says how).

    kind "json_object": any JSON object (source unused); "json_schema": source is the schema as JSON text;
    "lark": source is a grammar in llguidance's Lark syntax (`%json {...}`, special tokens as `<|name|>`).
    strict (json_schema only): True enforces every keyword and refuses a schema with one we cannot
    enforce; False enforces what can be enforced and ignores unsupported keywords (OpenAI's non-strict
    mode promises no more). The output is valid JSON either way.
    """

    kind: Literal["json_object", "json_schema", "lark"]
    source: str = ""
    strict: bool = False  # OpenAI's default for response_format.json_schema.strict


class ToolCall(msgspec.Struct, frozen=True):
    """A call an assistant message made in an earlier turn (OpenAI's message.tool_calls[i])."""

    id: str
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it ("" is taken as {})


class ImageInput(msgspec.Struct, frozen=True, omit_defaults=True):
    """An image of a user message, as the client sent it (gateway/serving/images.py checked the kind and the size); the
    engine decodes it (mlx_backend/engine/vision.py). `path`: a local file the gateway reads into `data` before the
    command leaves it (never sent to the engine)."""

    data: bytes
    media_type: str  # image/png | image/jpeg | image/gif | image/webp
    path: str | None = None
    detail: str = "auto"  # "low": shrunk to fit 512x512 before the model's processor; "auto" | "high": as is


class ChatMessage(msgspec.Struct, frozen=True, omit_defaults=True):
    role: str  # system | user | assistant | tool
    content: str  # "" for an assistant message that only calls tools (OpenAI's content: null)
    name: str | None = None
    tool_call_id: str | None = None  # role "tool": the call this message answers
    tool_calls: tuple[ToolCall, ...] = ()  # role "assistant": the calls it made
    reasoning: str | None = None  # role "assistant": its reasoning, for templates that render it (or drop it)
    images: tuple[ImageInput, ...] = ()  # role "user": shown to a vision model before the message's text


class ReasoningControl(msgspec.Struct, frozen=True, omit_defaults=True):
    """What a request asks of a reasoning model's thinking; mlx_backend/engine/reasoning.py maps it onto what the
    model's chat template understands. A model that cannot think ignores it."""

    enabled: bool | None = None  # None: the template's default; False: answer without thinking
    effort: str | None = None  # "low" | "medium" | "high": for templates that read reasoning_effort (gpt-oss)
    budget_tokens: int | None = None  # thinking is closed (its end markup forced) after this many tokens


# The environment variable a group's rank reads its connection token from (mpi only: mpirun forwards stdin to
# rank 0 alone); the others read it from stdin.
GROUP_TOKEN_ENV = "MLX_GATEWAY_GROUP_TOKEN"


class GroupConfig(msgspec.Struct, frozen=True, omit_defaults=True):
    """The engine as an MLX distributed group (mlx_backend/client/group.py starts it, mlx_backend/engine/rank.py
    runs each rank). Absent: one engine process, as always."""

    size: int  # ranks
    backend: str  # ring | jaccl | jaccl-ring | nccl | mpi
    parallelism: str = "tensor"  # tensor | pipeline
    seed: int = 0  # MLX's global key on every rank (the gateway draws one when it starts)
    tick_s: float = 1.0  # an idle rank 0 exchanges an empty step this often: the links are shown alive


class EngineConfig(msgspec.Struct, frozen=True, omit_defaults=True):
    """What the engine process is started with (JSON on its command line)."""

    models_dirs: tuple[str, ...] = ()
    hf_cache_dir: str | None = None  # None: the local Hugging Face cache is not searched
    include_demo_model: bool = True
    memory_budget_bytes: int = 0  # 0: derive from the machine (see mlx_backend.engine.residency.models)
    max_running: int = 32  # requests decoded together in one batch
    prefill_step_size: int = 2048  # the largest prefill piece
    # Prefill pieces are sized to take about this long on this device (mlx_backend/engine/pacing.py), so the stall
    # clock sees progress often; the gateway sets it from its stall limit. 0: pieces of prefill_step_size.
    prefill_piece_s: float = 1.0
    # While a batch decodes, a request that arrives waits up to this many steps for others to arrive, so that
    # their prompts are prefilled in one pass (mlx_backend/engine/batcher.py, `_gathering`); 0: each starts at once.
    prefill_gather_steps: int = 2
    prefill_batch: int = 0  # prompts prefilled together in one pass; 0: the device's default (engine/batcher.py)
    prompt_cache_bytes: int = 1 << 30  # prefix (KV) cache kept for reuse across requests
    # Speculative decoding for a request alone with its model: at most this many tokens drafted a pass from its
    # prompt, its prediction and its output so far (mlx_backend/engine/lookup.py); 0: off.
    max_draft_tokens: int = 8
    heartbeat_interval_s: float = 0.25
    load_retry_backoff_s: float = 30.0  # a failed model is retried after this, or when its files change
    allow_fault_injection: bool = False  # test-only: honours Generate.fault
    # Residency (mlx_backend/keep_alive.py): how long an unused model stays loaded, in seconds (0: unload when
    # its last request ends; -1: until evicted), and per-model overrides as (id or glob, seconds).
    keep_alive_s: float = 1800.0
    model_keep_alive: tuple[tuple[str, float], ...] = ()
    allowed_models: tuple[str, ...] = ()  # ids or globs; empty: any model found
    preload: tuple[str, ...] = ()  # loaded at start, in the background
    pinned: tuple[str, ...] = ()  # loaded at start and never idle-unloaded or evicted
    warmup: bool | None = None  # a short generation after each load, before it serves; None: on a GPU only
    test_read_delay_s: float = 0.0  # test-only (needs allow_fault_injection): a pause per block a load reads
    cpu_affinity: tuple[int, ...] = ()  # Linux: the CPUs the engine process runs on (empty: any)
    trace_tokens: str | None = None  # benchmarks only: a folder for the per-token timeline (mlx_backend/timeline.py)
    group: GroupConfig | None = None


class LoadedModel(msgspec.Struct, frozen=True):
    id: str
    size_bytes: int
    loaded_at: float  # unix time
    running: int  # requests of this model in the batch
    last_used_at: float = 0.0  # unix time its last request started or ended
    expires_at: float | None = None  # unix time it is due to unload; None: pinned, busy or kept forever
    pinned: bool = False
    kv_bytes: int = 0  # KV cache reserved by its running requests
    load_s: float = 0.0  # how long its load took, warm-up included
    warmup_s: float | None = None  # the warm-up generation's share of it; None: no warm-up


class LoadProgress(msgspec.Struct, frozen=True):
    """The load in progress (one at a time): see mlx_backend/engine/model_load.py for the stages."""

    model: str
    stage: str  # queued | reading | building | loading | warming
    bytes_read: int  # weight-file bytes read from disk
    bytes_loaded: int  # tensor bytes in memory
    bytes_total: int  # weight-file bytes
    started_at: float  # unix time
    reason: str  # request | admin | preload


class FailedModel(msgspec.Struct, frozen=True):
    id: str
    code: str  # an EngineErrorCode value
    message: str
    failed_at: float
    retry_after_s: float  # seconds until a new attempt is allowed (unless the files change)


# ---------------------------------------------------------------------------------------------------
class ToolSpec(msgspec.Struct, frozen=True, omit_defaults=True):
    """A function the model may call, checked by the gateway before it is sent (a non-empty name unique
    among the request's tools; parameters a JSON Schema object the grammar can enforce)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None  # None: the function takes no arguments
    strict: bool | None = None  # True: arguments held to the schema even when the model chooses to call


# Gateway -> engine


class Generate(msgspec.Struct, frozen=True, tag="generate", omit_defaults=True):
    request_id: str
    model: str
    params: SamplingParams
    messages: tuple[ChatMessage, ...] | None = None  # chat: rendered with the model's chat template
    prompt: str | None = None  # legacy completions: used as is
    constraint: Constraint | None = None  # response_format / forced tool call, enforced while decoding
    tools: tuple[ToolSpec, ...] = ()  # tool calling (chat messages only); () for none
    tool_choice: str = "auto"  # "auto" | "none" | "required" | "function" (then tool_choice_name names it)
    tool_choice_name: str | None = None
    parallel_tool_calls: bool = True  # False: at most one call
    max_tool_calls: int | None = None  # the most calls a reply may make (Responses' max_tool_calls)
    n: int = 1  # choices, sharing the prompt's prefill
    reasoning: ReasoningControl | None = None  # thinking on/off, effort, budget (reasoning models)
    template_kwargs: str | None = None  # JSON object: extra chat-template variables (chat_template_kwargs)
    prediction: str | None = None  # text the reply likely repeats: speculative decoding drafts from it too
    fault: str | None = None  # test-only: "abort", "stall", "raise" (needs allow_fault_injection)


class CountPrompt(msgspec.Struct, frozen=True, tag="count_prompt"):
    """Render and count `request`'s prompt exactly as running it would, without running it (Anthropic's
    count_tokens). Loads the model if needed (its tokenizer and template decide). Answered with
    PromptCount, or Failed under the same request id."""

    request: Generate


class Abort(msgspec.Struct, frozen=True, tag="abort"):
    """Stop a request; the engine answers with Finished(finish_reason="abort") if it was running."""

    request_id: str


class Shutdown(msgspec.Struct, frozen=True, tag="shutdown"):
    """Clear the model cache and exit 0."""


class Wake(msgspec.Struct, frozen=True, tag="wake"):
    """Groups only. Rank 0, idle, is about to start a step: sent by rank 0 to the gateway, which hands it to
    every other rank. An idle rank waits for it on its socket, where waiting costs nothing, rather than inside
    the collective, where MLX's ring backend spins a core."""



class ModelControl(msgspec.Struct, frozen=True, tag="model_control"):
    """An operator's command (the admin API); answered with ModelControlDone, a load only once it is ready."""

    request_id: str
    action: Literal["load", "unload", "pin", "unpin"]
    model: str


class Embed(msgspec.Struct, frozen=True, tag="embed", omit_defaults=True):
    """Embed texts with an embedding model (mlx_backend/engine/embeddings.py). Answered with Loading (when its model
    loads for it), Started, then Embedded; or Failed. Abort drops it while it waits for its model."""

    request_id: str
    model: str
    inputs: tuple[str, ...]
    dimensions: int | None = None  # None: the model's own; fewer: Matryoshka truncation (where the model allows)
    n: ClassVar[int] = 1  # one answer, as a one-choice generation (not sent: a class constant)


Command = Generate | CountPrompt | Abort | Shutdown | ModelControl | Wake | Embed


# ---------------------------------------------------------------------------------------------------
# Engine -> gateway


class Ready(msgspec.Struct, frozen=True, tag="ready"):
    pid: int
    device: str  # e.g. "cpu", "gpu"
    mlx_version: str
    mlx_lm_version: str


class Loading(msgspec.Struct, frozen=True, tag="loading"):
    """The request's model is being loaded for it (sent only when a load is needed)."""

    request_id: str
    model: str


class Started(msgspec.Struct, frozen=True, tag="started"):
    """The prompt is tokenized, fits the context, and the request has joined the batch."""

    request_id: str
    prompt_tokens: int
    cached_tokens: int


class ToolCallDelta(msgspec.Struct, frozen=True, omit_defaults=True):
    """A piece of a streamed tool call, shaped as OpenAI's delta.tool_calls[i].

    A call's first piece has its id and name and a non-empty start of its arguments; later pieces carry
    only more argument text. The argument pieces of one index join into the call's JSON arguments.
    """

    index: int  # the call's position among this reply's calls, from 0
    id: str | None = None  # "call_" + 24 alphanumerics; first piece only
    name: str | None = None  # first piece only
    arguments: str = ""


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    token: str  # the token's text (may be part of a UTF-8 character: then `token_bytes` is the truth)
    token_bytes: bytes
    logprob: float


class TokenLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One generated token's log probability under the distribution it was sampled from, and the most
    likely alternatives there (SamplingParams.logprobs of them, the sampled token among them if it is)."""

    token: str
    token_bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


def join_pieces(pieces: Iterable[ToolCallDelta]) -> tuple[ToolCallDelta, ...]:
    """The one place tool-call pieces are joined: each run of one call's pieces (a piece that names no new
    call continues the one before it) becomes one piece. The engine joins what one step parsed; a Delta the
    gateway merged from several may hold a run, which each API joins or streams as it sends them."""
    joined: list[tuple[int, str | None, str | None, list[str]]] = []
    for piece in pieces:
        if joined and joined[-1][0] == piece.index and piece.id is None:
            joined[-1][3].append(piece.arguments)
        else:
            joined.append((piece.index, piece.id, piece.name, [piece.arguments]))
    return tuple(ToolCallDelta(index, call_id, name, "".join(parts)) for index, call_id, name, parts in joined)


class Delta(msgspec.Struct, frozen=True, tag="delta", omit_defaults=True):
    request_id: str
    text: str  # content: never holds tool-call or reasoning markup
    tokens: int  # tokens generated since the previous Delta
    tool_calls: tuple[ToolCallDelta, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of `tokens`, when asked for
    index: int = 0  # the choice (n > 1)
    reasoning: str = ""  # the model's thinking, without its markup (reasoning models)


class Finished(msgspec.Struct, frozen=True, tag="finished", omit_defaults=True):
    """One choice ended; a request with n choices ends with its n-th Finished."""

    request_id: str
    finish_reason: str  # "stop" | "length" | "abort" | "tool_calls"
    prompt_tokens: int
    completion_tokens: int  # this choice's
    cached_tokens: int
    index: int = 0
    stop_sequence: str | None = None  # finish_reason "stop" because this stop string matched (not EOS)
    reasoning_tokens: int = 0  # of completion_tokens, those spent thinking
    draft_tokens: int = 0  # speculative decoding: tokens drafted and fed (mlx_backend/engine/solo.py)
    accepted_draft_tokens: int = 0  # of those, kept in the output


class PromptCount(msgspec.Struct, frozen=True, tag="prompt_count"):
    """The answer to CountPrompt."""

    request_id: str
    prompt_tokens: int


class Embedded(msgspec.Struct, frozen=True, tag="embedded"):
    """The answer to Embed: one vector per input, in order."""

    request_id: str
    vectors: bytes  # float32, little-endian, `dimensions` values per input, input after input
    dimensions: int
    prompt_tokens: int  # the model's tokens over all inputs


class Failed(msgspec.Struct, frozen=True, tag="failed", omit_defaults=True):
    request_id: str
    code: str  # an EngineErrorCode value
    message: str
    param: str | None = None


class ModelControlDone(msgspec.Struct, frozen=True, tag="model_control_done", omit_defaults=True):
    request_id: str
    code: str | None = None  # None: done; else an EngineErrorCode value
    message: str = ""


class ModelEvent(msgspec.Struct, frozen=True, tag="model_event", omit_defaults=True):
    """A model came or went: the gateway logs it and counts it."""

    model: str
    kind: Literal["loaded", "unloaded"]
    reason: str  # loaded: request | admin | preload; unloaded: idle | evicted | requested | changed | vanished
    seconds: float = 0.0  # loaded: the load's duration; unloaded: how long it had been idle
    size_bytes: int = 0
    warmup_s: float | None = None


class Heartbeat(msgspec.Struct, frozen=True, tag="heartbeat"):
    """Sent every heartbeat_interval_s by a thread that never touches MLX."""

    progress: int  # bumped by the MLX thread on every decode step, prefill chunk and model load
    running: int
    waiting: int
    loading: str | None  # model id being loaded right now
    loaded: tuple[LoadedModel, ...]
    failed: tuple[FailedModel, ...]
    memory_budget_bytes: int
    active_memory_bytes: int
    prompt_cache_bytes: int
    load: LoadProgress | None = None  # the load in progress
    queued_loads: tuple[str, ...] = ()  # loads waiting for their turn or for memory
    weights_bytes: int = 0  # the budget's parts: weights of the loaded models (+ the load in progress),
    kv_bytes: int = 0  # the KV cache reserved by running requests (the prefix cache is prompt_cache_bytes)
    # Still importing mlx-lm and finding models, after Ready: seconds on a busy machine, judged like a load
    # (a request that waits meanwhile is not a stall).
    starting: bool = False


class Hello(msgspec.Struct, frozen=True, tag="hello"):
    """Groups only: the first frame of every rank on its connection to the gateway (the token proves it was
    started by this gateway)."""

    rank: int
    token: str
    pid: int
    host: str  # the rank's machine, as it names itself
    mlx_version: str
    mlx_lm_version: str
    gateway_version: str


class RankHeartbeat(msgspec.Struct, frozen=True, tag="rank_heartbeat"):
    """Groups only: what a rank other than 0 sends every heartbeat_interval_s (rank 0 sends Heartbeat)."""

    rank: int
    progress: int  # the rank's own batcher steps: it moves with rank 0's
    loading: str | None
    active_memory_bytes: int


Event = (
    Ready | Loading | Started | Delta | Finished | PromptCount | Failed | Heartbeat | ModelControlDone | ModelEvent
    | Hello | RankHeartbeat | Wake | Embedded
)
