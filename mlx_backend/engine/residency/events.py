"""What residency tells the rest of the engine, passed to it at construction (no hooks assigned later)."""

from __future__ import annotations

from typing import Protocol

from mlx_backend.contract import ModelEvent


class ResidencyEvents(Protocol):
    def model_event(self, event: ModelEvent) -> None:
        """A model was loaded or unloaded: the gateway hears it (it logs and counts it)."""

    def model_dropped(self, model_id: str) -> None:
        """A model is about to be unloaded: whoever decodes with it lets go first, so its arrays go with it."""
