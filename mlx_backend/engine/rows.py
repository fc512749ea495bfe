"""What the batcher keeps per request while it runs: the request, one row per choice (a row of its model's
batch, or the solo generation), and per loaded model its BatchGenerator and the rows in it.
mlx-lm has no type hints: its objects are held as Any.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlx_backend.contract import Generate
from mlx_backend.engine.logprobs import TokenText
from mlx_backend.engine.pacing import PrefillPacer
from mlx_backend.engine.plan import ChoicePlan
from mlx_backend.engine.residency.models import CachedModel
from mlx_backend.engine.solo import SoloGeneration
from mlx_backend.engine.vision import VisionGeneration

SOLO_UID = -1  # BatchGenerator's uids start at 0: a request running solo is keyed by this until it joins


@dataclass
class Request:
    command: Generate
    prompt_tokens: int
    cached_tokens: int
    rows: list[Row] = field(default_factory=list)

    @property
    def rid(self) -> str:
        return self.command.request_id

    @property
    def open_rows(self) -> list[Row]:
        return [r for r in self.rows if not r.ended]


@dataclass
class Row:
    """One choice of a request as it is generated: a row of its model's batch, or the solo generation."""

    request: Request
    plan: ChoicePlan
    max_tokens: int
    uid: int = SOLO_UID
    solo: SoloGeneration | VisionGeneration | None = None  # set while the request runs alone, outside the batch
    ended: bool = False
    drafted: int = 0  # speculative decoding's draft tokens while it ran solo, and those it kept
    accepted: int = 0

    @property
    def next_is_last(self) -> bool:
        """Whether the next token uses up the token budget."""
        return self.plan.output.completion_tokens + 1 >= self.max_tokens


@dataclass
class Token:
    """One generated token, shaped like BatchGenerator's Response where `_on_token` reads it."""

    token: int
    finish_reason: str | None
    logprobs: Any = None
    prompt_cache: list[Any] | None = None  # set when finished: the KV cache to keep for the next turn
    all_tokens: list[int] | None = None  # the tokens that cache holds


@dataclass
class ModelState:
    cached: CachedModel
    generator: Any  # BatchGenerator
    token_text: TokenText
    pacer: PrefillPacer  # sizes its prefill pieces, solo or batched (mlx_backend/engine/pacing.py)
    rows: dict[int, Row] = field(default_factory=dict)  # BatchGenerator uid (or SOLO_UID) -> row
    prefilled: dict[int, int] = field(default_factory=dict)  # uid -> its prompt's tokens in, while it prefills

    @property
    def solo_row(self) -> Row | None:
        return self.rows.get(SOLO_UID)

    @property
    def requests(self) -> int:
        return len({id(r.request) for r in self.rows.values()})
