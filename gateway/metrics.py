"""Every Prometheus metric of the gateway, declared once, on one registry.

Names follow Prometheus conventions (base units, unit suffix, `_total` counters) and vLLM's vocabulary
(`time_to_first_token_seconds`, `e2e_request_latency_seconds`, `num_requests_running`...), prefixed
`mlx_gateway_` so dashboards built for vLLM need only the prefix changed.
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)
for _collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
    REGISTRY.register(_collector)

_P = "mlx_gateway_"
# Latency buckets from 5 ms to 10 min: local generation spans both ends.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

HTTP_REQUESTS = Counter(
    _P + "http_requests_total", "HTTP requests answered, by route template and status.",
    ["route", "method", "status"], registry=REGISTRY,
)
PROMPT_TOKENS = Counter(_P + "prompt_tokens_total", "Prompt tokens processed.", ["model"], registry=REGISTRY)
PROMPT_CACHED_TOKENS = Counter(
    _P + "prompt_cached_tokens_total", "Prompt tokens served from the prefix cache.", ["model"],
    registry=REGISTRY,
)
GENERATION_TOKENS = Counter(
    _P + "generation_tokens_total", "Tokens generated.", ["model"], registry=REGISTRY
)
DRAFT_TOKENS = Counter(
    _P + "draft_tokens_total", "Speculative decoding: draft tokens fed with the next token, by whether the output "
    "kept them (accepted) or they were computed and dropped (rejected).", ["model", "outcome"], registry=REGISTRY,
)
TIME_TO_FIRST_TOKEN = Histogram(
    _P + "time_to_first_token_seconds", "From request arrival to the first generated text.", ["model"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
E2E_LATENCY = Histogram(
    _P + "e2e_request_latency_seconds", "From request arrival to its last token.", ["model"],
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
QUEUE_TIME = Histogram(
    _P + "request_queue_time_seconds", "From admission to joining the running batch.",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
REQUESTS_FINISHED = Counter(
    _P + "requests_finished_total", "Generation requests ended, by finish reason.", ["model", "finish_reason"],
    registry=REGISTRY,
)
EMBEDDING_INPUTS = Counter(
    _P + "embedding_inputs_total", "Inputs embedded by /v1/embeddings (one vector each); their tokens count in "
    "prompt_tokens_total, the requests in requests_finished_total.", ["model"], registry=REGISTRY,
)
REQUESTS_RUNNING = Gauge(_P + "num_requests_running", "Requests in the running batch.", registry=REGISTRY)
REQUESTS_WAITING = Gauge(
    _P + "num_requests_waiting", "Requests admitted, waiting for a batch slot.", registry=REGISTRY
)
REQUESTS_REJECTED = Counter(
    _P + "requests_rejected_total", "Requests refused before generation, by reason.", ["reason"],
    registry=REGISTRY,
)
REQUESTS_CANCELLED = Counter(
    _P + "requests_cancelled_total", "Requests ended because the client went away.", registry=REGISTRY
)
CANCELLED_TOKENS = Counter(
    _P + "cancelled_generation_tokens_total", "Tokens generated for requests whose client went away.",
    registry=REGISTRY,
)
MODELS_LOADED = Gauge(_P + "models_loaded", "Models in the engine's cache.", registry=REGISTRY)
MODELS_AVAILABLE = Gauge(_P + "models_available", "Models found on disk.", registry=REGISTRY)
MODEL_LOAD_FAILURES = Counter(
    _P + "model_load_failures_total", "Model loads that failed, by cause.", ["code"], registry=REGISTRY
)
MODEL_LOADS = Counter(
    _P + "model_loads_total", "Models loaded, by who asked (request, admin, preload).", ["reason"],
    registry=REGISTRY,
)
MODEL_UNLOADS = Counter(
    _P + "model_unloads_total", "Models unloaded, by why (idle, evicted, requested, changed, vanished).",
    ["reason"], registry=REGISTRY,
)
MODEL_LOAD_SECONDS = Histogram(
    _P + "model_load_seconds", "How long a model load took, warm-up included.", buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
MODEL_WARMUP_SECONDS = Histogram(
    _P + "model_warmup_seconds", "The warm-up generation after a load (kernel compilation on a GPU).",
    buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
MODELS_PINNED = Gauge(_P + "models_pinned", "Loaded models that are pinned.", registry=REGISTRY)
MODEL_LOAD_BYTES_READ = Gauge(
    _P + "model_load_read_bytes", "Weight bytes read so far by the load in progress (0: none).", registry=REGISTRY
)
MODEL_LOAD_BYTES_TOTAL = Gauge(  # not "_total": promtool keeps that suffix for counters
    _P + "model_load_size_bytes", "Weight bytes of the load in progress (0: none).", registry=REGISTRY
)
ENGINE_UP = Gauge(_P + "engine_up", "1 while the engine process is up and answering.", registry=REGISTRY)
ENGINE_STALLED = Gauge(
    _P + "engine_stalled", "1 while the engine has work but makes no progress.", registry=REGISTRY
)
ENGINE_RESTARTS = Counter(
    _P + "engine_restarts_total", "Engine process restarts, by reason.", ["reason"], registry=REGISTRY
)
ENGINE_GROUP_UP = Gauge(
    _P + "engine_group_up", "The engine as a distributed group: 1 while every rank is connected and heartbeating.",
    registry=REGISTRY,
)
ENGINE_RANK_UP = Gauge(
    _P + "engine_rank_up", "1 while this rank of the engine group is connected and heartbeating.", ["rank", "host"],
    registry=REGISTRY,
)
ENGINE_RANK_HEARTBEAT_AGE = Gauge(
    _P + "engine_rank_heartbeat_age_seconds", "Seconds since this rank of the engine group last sent a heartbeat.",
    ["rank", "host"], registry=REGISTRY,
)
READY = Gauge(_P + "ready", "1 while the gateway accepts generation requests.", registry=REGISTRY)
DRAINING = Gauge(_P + "draining", "1 while the gateway drains for shutdown.", registry=REGISTRY)
MEMORY_ACTIVE = Gauge(
    _P + "memory_active_bytes", "Memory the engine's MLX arrays hold.", registry=REGISTRY
)
MEMORY_BUDGET = Gauge(
    _P + "memory_budget_bytes", "The engine's memory budget: weights, KV cache and prefix cache.", registry=REGISTRY
)
MEMORY_WEIGHTS = Gauge(
    _P + "memory_weights_bytes", "Budget held by model weights (and the load in progress).", registry=REGISTRY
)
MEMORY_KV_CACHE = Gauge(
    _P + "memory_kv_cache_bytes", "Budget reserved for the KV cache of running requests.", registry=REGISTRY
)
PREFIX_CACHE_BYTES = Gauge(
    _P + "prefix_cache_bytes", "Memory held by the prompt prefix cache.", registry=REGISTRY
)
WATCHDOG_RESTARTS_LAST_HOUR = Gauge(
    _P + "watchdog_restarts_last_hour", "Server restarts the external watchdog made in the last hour.",
    registry=REGISTRY,
)
WATCHDOG_GAVE_UP = Gauge(
    _P + "watchdog_gave_up", "1 when the watchdog spent its restart budget and waits for a human.",
    registry=REGISTRY,
)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
