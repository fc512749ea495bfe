"""Every setting of `mlx-gateway serve`: one field, one flag, one `MLX_GATEWAY_*` environment variable.

Precedence: command-line flag > environment variable > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.placement import plan
from mlx_backend import cpu_blas
from mlx_backend.keep_alive import parse_override

ENV_PREFIX = "MLX_GATEWAY_"


@dataclass(frozen=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    port: int = field(default=11435, metadata={"help": "port to bind"})
    models_dirs: tuple[Path, ...] = field(
        default=(), metadata={"help": "folder of model folders (repeatable; env: os.pathsep-separated)"}
    )
    hf_cache: bool = field(default=True, metadata={"help": "also serve models in the local Hugging Face cache"})
    demo_model: bool | None = field(
        default=None, metadata={"help": "offer the bundled models, mlx-gateway-demo and smollm2-135m-instruct "
                                        "(default: only when no models dir)"}
    )
    api_key: str | None = field(
        default=None, metadata={"help": "require 'Authorization: Bearer KEY' (or 'x-api-key: KEY') on every "
                                        "route but /health, /metrics and the docs"}
    )
    allow_public: bool = field(
        default=False, metadata={"help": "allow binding a non-loopback address without an API key"}
    )
    cors_origins: tuple[str, ...] = field(default=(), metadata={"help": "origins allowed by CORS (repeatable)"})
    allowed_hosts: tuple[str, ...] = field(
        default=(), metadata={"help": "Host header values answered, besides loopback names (repeatable; "
                                      "'name', 'name:port', '*.domain', '*' for any; default: the bound "
                                      "address, any host when bound to 0.0.0.0 or ::)"}
    )
    protect_metrics: bool = field(default=False, metadata={"help": "require the API key on /metrics too"})
    protect_docs: bool = field(
        default=False, metadata={"help": "require the API key on /docs and /openapi.json too"}
    )
    memory_budget_gb: float = field(
        default=0.0, metadata={"help": "memory for loaded models, GB (0: derive from the machine)"}
    )
    prompt_cache_gb: float = field(
        default=1.0, metadata={"help": "memory for reusable prompt prefixes (KV cache), GB; 0 turns it off"}
    )
    keep_alive_s: float = field(
        default=1800.0, metadata={"help": "how long an unused model stays loaded, seconds (0: unload when its last "
                                          "request ends; -1: until evicted for another model)"}
    )
    model_keep_alive: tuple[str, ...] = field(
        default=(), metadata={"help": "per-model keep-alive, ID=SECONDS (ID may be a glob such as 'org/*'; "
                                      "repeatable; the first match wins)"}
    )
    allowed_models: tuple[str, ...] = field(
        default=(), metadata={"help": "ids or glob patterns of the models that may be served (repeatable); any "
                                      "other is 404 model_not_found and unlisted, as if absent (default: all)"}
    )
    preload_models: tuple[str, ...] = field(
        default=(), metadata={"help": "models to load at start, in the background (repeatable)"}
    )
    pin_models: tuple[str, ...] = field(
        default=(), metadata={"help": "models to load at start and never unload or evict (repeatable)"}
    )
    model_warmup: bool | None = field(
        default=None, metadata={"help": "run one short generation after each model load, so the first "
                                        "request does not pay for kernel compilation (default: on a GPU only)"}
    )
    max_running: int = field(default=32, metadata={"help": "requests generating at once (one batch)"})
    max_queue: int = field(default=128, metadata={"help": "requests waiting for a batch slot; beyond: 429"})
    prefill_gather_steps: int = field(
        default=2, metadata={"help": "while a batch decodes, an arriving request may wait this many decode steps "
                                     "for others, so their prompts are prefilled in one pass; two or more arrivals, "
                                     "as many as the rows running, start at once (0: start at once)"}
    )
    prefill_batch: int = field(
        default=0, metadata={"help": "prompts prefilled together in one pass while a batch decodes (0: 8 on a CPU, "
                                     "32 on a GPU: a burst of arrivals in fewer passes)"}
    )
    draft_tokens: int = field(
        default=8, metadata={"help": "speculative decoding of a request alone with its model: at most this many "
                                     "tokens a pass guessed from its prompt, its prediction and its output so far, "
                                     "kept where the model agrees (the output is unchanged; off on MLX's reference "
                                     "BLAS; 0: off)"}
    )
    max_tokens_default: int = field(default=4096, metadata={"help": "max_tokens when a request gives none"})
    request_timeout_s: float = field(default=600.0, metadata={"help": "a request running longer is ended"})
    stall_timeout_s: float = field(
        default=30.0, metadata={"help": "engine with work but no progress this long is restarted (an engine "
                                        "group also when idle: it steps every second)"}
    )
    load_timeout_s: float = field(default=600.0, metadata={"help": "a model load taking longer is a stall"})
    drain_timeout_s: float = field(
        default=30.0, metadata={"help": "on SIGTERM, streams may finish for this long"}
    )
    responses_store_mb: float = field(
        default=64.0, metadata={"help": "memory for stored Responses API responses (previous_response_id, "
                                        "GET /v1/responses/{id}), MB, least recently used forgotten first; "
                                        "lost on restart; 0 stores none"}
    )
    max_body_bytes: int = field(default=8 * 1024 * 1024, metadata={"help": "larger request bodies get 413"})
    max_image_bytes: int = field(
        default=5 * 1024 * 1024, metadata={"help": "the largest image a request may carry, bytes once decoded from "
                                                   "base64 (max_body_bytes bounds the whole body too)"}
    )
    max_images: int = field(default=8, metadata={"help": "the most images one request may carry (0: none)"})
    image_dir: Path | None = field(
        default=None, metadata={"help": "file:// image URLs may name files under this folder (symlinks resolved); "
                                        "unset: file:// images are refused (gateway/serving/images.py)"}
    )
    header_timeout_s: float = field(default=10.0, metadata={"help": "a client must send its headers in time"})
    body_timeout_s: float = field(
        default=10.0, metadata={"help": "a client may pause this long while sending its body, else 408 (0: no limit)"}
    )
    engine_cpus: str = field(
        default="", metadata={"help": "Linux: run the engine process on these CPUs ('0-3,8') and the gateway on "
                                      "the others; empty: no pinning (gateway/placement.py says when it helps)"}
    )
    cpu_blas: str = field(
        default="auto", metadata={"help": "Linux, MLX on the CPU: the BLAS the engine multiplies matrices with. "
                                          "auto: the system's OpenBLAS if installed (Debian/Ubuntu: "
                                          "libopenblas0-pthread; prompts about 20x faster than the reference BLAS "
                                          "of MLX's wheel); off: MLX's own; or a BLAS library's path "
                                          "(mlx_backend/cpu_blas.py)"}
    )
    engine_restart_budget: int = field(
        default=10, metadata={"help": "engine restarts allowed per hour before the gateway gives up"}
    )
    log_json: bool = field(default=False, metadata={"help": "log JSON lines"})
    log_level: str = field(default="info", metadata={"help": "debug, info, warning, error"})
    pid_file: Path | None = field(default=None, metadata={"help": "write the server's pid here"})
    watchdog_state_dir: Path | None = field(
        default=None, metadata={"help": "the watchdog's state folder, to export its status as metrics"}
    )
    test_faults: bool = field(
        default=False, metadata={"help": "TEST ONLY: honour fault injection through the 'user' field"}
    )
    test_script: Path | None = field(
        default=None, metadata={"help": "TEST ONLY (with --test-faults): a JSON file of scripted replies "
                                        "(gateway/test_script.py), read again for every request"}
    )
    test_read_delay_s: float = field(
        default=0.0, metadata={"help": "TEST ONLY (with --test-faults): a model load waits this long per 8 MB "
                                       "it reads, as a slow disk would"}
    )
    trace_tokens: Path | None = field(
        default=None, metadata={"help": "BENCHMARKS ONLY: write a per-token timeline (engine and gateway) into "
                                        "this folder (docs/benchmarks.md)"}
    )
    # The engine as an MLX distributed group (docs/operations.md): set hosts or a hostfile to turn it on.
    group_hosts: tuple[str, ...] = field(
        default=(), metadata={"help": "run the engine as one MLX distributed group, rank i on the i-th host "
                                      "(repeatable; mlx.launch's --hosts: IPs for ring; a loopback address runs "
                                      "a rank here, any other host is reached with ssh)"}
    )
    group_hostfile: Path | None = field(
        default=None, metadata={"help": "the group's hosts as an mlx.launch hostfile (JSON: hosts with ssh, ips, "
                                        "rdma; backend; envs)"}
    )
    group_backend: str = field(
        default="", metadata={"help": "ring, jaccl, jaccl-ring, nccl or mpi (default: the hostfile's, else ring)"}
    )
    group_parallelism: str = field(
        default="tensor", metadata={"help": "tensor (each layer split across the ranks) or pipeline (each rank "
                                            "runs a range of layers)"}
    )
    group_envs: tuple[str, ...] = field(
        default=(), metadata={"help": "NAME=value set for every rank (repeatable)"}
    )
    group_port: int = field(
        default=32323, metadata={"help": "first port of the ring backend's ranks (one per rank and IP), "
                                         "jaccl's coordinator port, nccl's rendezvous port"}
    )
    group_listen_host: str = field(
        default="127.0.0.1", metadata={"help": "address the gateway listens on for its ranks (an ephemeral port, "
                                               "a per-start token); must be reachable from every host"}
    )
    group_python: str | None = field(
        default=None, metadata={"help": "the Python with mlx-gateway installed on the other hosts (default: "
                                        "this one's path)"}
    )

    @property
    def memory_budget_bytes(self) -> int:
        return int(self.memory_budget_gb * 1024**3)

    @property
    def offers_demo_model(self) -> bool:
        return self.demo_model if self.demo_model is not None else not self.models_dirs

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(self.host)

    @property
    def has_group(self) -> bool:
        return bool(self.group_hosts) or self.group_hostfile is not None

    def check(self) -> None:
        """Refuse unsafe or impossible combinations before anything starts."""
        if not self.is_loopback and not self.api_key and not self.allow_public:
            raise ValueError(
                f"refusing to bind {self.host} without an API key: set --api-key, or --allow-public "
                "if this server is really meant to be open to the network"
            )
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")
        for name in ("max_running", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.max_queue < 0:
            raise ValueError("max_queue must be 0 or more")
        for name in ("prefill_gather_steps", "prefill_batch", "draft_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more")
        if self.group_hosts and self.group_hostfile is not None:
            raise ValueError("give the group's hosts either as --group-host or as --group-hostfile, not both")
        for item in self.model_keep_alive:
            parse_override(item)  # raises ValueError naming the bad entry
        try:
            plan(self.engine_cpus)
        except ValueError as exc:
            raise ValueError(f"engine_cpus {self.engine_cpus!r}: {exc}") from None
        cpu_blas.choose(self.cpu_blas)  # raises ValueError for a path that is not a file
        for entry in self.allowed_hosts:
            if not entry or "/" in entry or any(c.isspace() for c in entry):
                raise ValueError(f"allowed_hosts entry {entry!r} is not a host name (give 'name', 'name:port', "
                                 "'*.domain' or '*', without scheme or path)")


def is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _kind(f: dataclasses.Field[Any]) -> str:
    return str(f.type).replace(" ", "")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    for f in dataclasses.fields(Settings):
        kind = _kind(f)
        help_text = f.metadata.get("help", "") + f" (env {ENV_PREFIX}{f.name.upper()})"
        if kind.startswith("bool"):
            parser.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif kind.startswith("tuple"):
            names = dict.fromkeys((_flag(f.name.rstrip("s")), _flag(f.name)))  # one name if they are the same
            parser.add_argument(*names, dest=f.name, action="append", default=None, help=help_text)
        else:
            parser.add_argument(_flag(f.name), dest=f.name, default=None, help=help_text)
    return parser


def _parse_value(f: dataclasses.Field[Any], raw: Any) -> Any:
    kind = _kind(f)
    if raw is None:
        return None
    if kind.startswith("bool"):
        if isinstance(raw, bool):
            return raw
        return str(raw).strip().lower() in ("1", "true", "yes", "on")
    if kind.startswith("tuple[Path"):
        parts = raw if isinstance(raw, list) else str(raw).split(os.pathsep)
        return tuple(Path(p).expanduser() for p in parts if p)
    if kind.startswith("tuple"):
        parts = raw if isinstance(raw, list) else str(raw).split(",")
        return tuple(p.strip() for p in parts if p.strip())
    if kind.startswith("int"):
        return int(raw)
    if kind.startswith("float"):
        return float(raw)
    if kind.startswith("Path"):
        return Path(raw).expanduser()
    return str(raw)


def load_settings(args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Merge flags over environment over defaults; raise ValueError naming a bad value."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is None:
            continue
        try:
            values[f.name] = _parse_value(f, raw)
        except ValueError as exc:
            raise ValueError(f"invalid value for {f.name}: {raw!r}") from exc
    return Settings(**values)


def parse_settings(argv: Sequence[str], env: Mapping[str, str] | None = None) -> Settings:
    parser = build_parser(argparse.ArgumentParser(prog="mlx-gateway serve", allow_abbrev=False))
    return load_settings(parser.parse_args(list(argv)), env)
