"""Why the engine could not serve a request: one code per cause, sent over IPC as a string.

The gateway maps each code to an HTTP status in `gateway/errors.py`; keep the two in step.
"""

from __future__ import annotations

import enum


class EngineErrorCode(enum.StrEnum):
    MODEL_NOT_FOUND = "model_not_found"
    MODEL_LOAD_FAILED = "model_load_failed"  # files missing, corrupt, shapes wrong, tokenizer broken
    MODEL_UNSUPPORTED = "model_unsupported"  # model_type mlx-lm has no implementation for
    MODEL_TOO_LARGE = "model_too_large"  # weights exceed the memory budget: refused before loading
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    INVALID_REQUEST = "invalid_request"  # e.g. a chat template that rejects the messages
    ENGINE_UNAVAILABLE = "engine_unavailable"  # engine died, stalled or is restarting
    ENGINE_OVERLOADED = "engine_overloaded"
    MEMORY_BUDGET_EXCEEDED = "memory_budget_exceeded"  # a request whose KV cache could never fit the budget
    MODEL_BUSY = "model_busy"  # an operator's unload of a model that is serving or loading
    REQUEST_TIMEOUT = "request_timeout"  # the request ran past the gateway's request timeout
    INVALID_IMAGE = "invalid_image"  # an image that cannot be decoded or is too large once decoded
    IMAGES_NOT_SUPPORTED = "images_not_supported"  # images sent to a model that takes text only
    INTERNAL = "internal_error"


class EngineError(Exception):
    """A failure the engine reports for one request; carries a stable code and a readable message."""

    def __init__(self, code: EngineErrorCode, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param

    @classmethod
    def from_wire(cls, code: str, message: str, param: str | None = None) -> EngineError:
        """Rebuild an error sent over IPC; an unknown code (a newer engine?) is internal."""
        try:
            return cls(EngineErrorCode(code), message, param)
        except ValueError:
            return cls(EngineErrorCode.INTERNAL, message, param)
