"""One error tree and one table from each kind of failure to (HTTP status, OpenAI type, code).

Every non-2xx body of the OpenAI routes is `{"error": {"message", "type", "param", "code"}}`. The OpenAI SDK
maps the status to its exception classes (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError,
429 RateLimitError, 5xx InternalServerError), so the status is the contract and the code is the detail.
The Anthropic routes render the same table in Anthropic's shape, `{"type": "error", "error": {"type",
"message"}}`, with the same status and an Anthropic type read from it (`anthropic_type`), which is what the
Anthropic SDK maps to its exception classes too.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from gateway.chat.wire import ErrorDetail, ErrorResponse
from gateway.messages.wire import AnthropicErrorDetail, AnthropicErrorResponse
from mlx_backend.errors import EngineError, EngineErrorCode


class ErrorSpec(NamedTuple):
    status: int
    type: str
    code: str | None
    retry_after_s: int | None = None


class ErrorKind(enum.Enum):
    INVALID_REQUEST = ErrorSpec(400, "invalid_request_error", "invalid_request")
    INVALID_JSON = ErrorSpec(400, "invalid_request_error", "invalid_json")
    UNSUPPORTED_PARAMETER = ErrorSpec(400, "invalid_request_error", "unsupported_parameter")
    CONTEXT_LENGTH_EXCEEDED = ErrorSpec(400, "invalid_request_error", "context_length_exceeded")
    # The request's KV cache (prompt + max_tokens) could never fit the memory budget beside its model.
    MEMORY_BUDGET_EXCEEDED = ErrorSpec(400, "invalid_request_error", "memory_budget_exceeded")
    INVALID_IMAGE = ErrorSpec(400, "invalid_request_error", "invalid_image")  # gateway/serving/images.py's refusals
    IMAGES_NOT_SUPPORTED = ErrorSpec(400, "invalid_request_error", "images_not_supported")  # a text-only model
    HOST_NOT_ALLOWED = ErrorSpec(400, "invalid_request_error", "host_not_allowed")  # DNS rebinding guard
    UNAUTHORIZED = ErrorSpec(401, "authentication_error", "invalid_api_key")
    ROUTE_NOT_FOUND = ErrorSpec(404, "invalid_request_error", "not_found")
    MODEL_NOT_FOUND = ErrorSpec(404, "invalid_request_error", "model_not_found")
    RESPONSE_NOT_FOUND = ErrorSpec(404, "invalid_request_error", "response_not_found")  # GET /v1/responses/{id}
    PREVIOUS_RESPONSE_NOT_FOUND = ErrorSpec(400, "invalid_request_error", "previous_response_not_found")
    METHOD_NOT_ALLOWED = ErrorSpec(405, "invalid_request_error", "method_not_allowed")
    BODY_TIMEOUT = ErrorSpec(408, "invalid_request_error", "request_body_timeout")
    MODEL_BUSY = ErrorSpec(409, "invalid_request_error", "model_busy")  # admin unload of a model in use
    BODY_TOO_LARGE = ErrorSpec(413, "invalid_request_error", "request_too_large")
    UNSUPPORTED_MEDIA_TYPE = ErrorSpec(415, "invalid_request_error", "unsupported_media_type")
    CLIENT_CLOSED = ErrorSpec(499, "invalid_request_error", "client_closed_request")  # nginx's convention
    OVERLOADED = ErrorSpec(429, "rate_limit_error", "server_overloaded", retry_after_s=1)
    # Model files that cannot be served are the server's problem, not the request's: 500 family.
    MODEL_LOAD_FAILED = ErrorSpec(500, "server_error", "model_load_failed")
    MODEL_UNSUPPORTED = ErrorSpec(500, "server_error", "model_unsupported")
    MODEL_TOO_LARGE = ErrorSpec(500, "server_error", "model_too_large")
    INTERNAL = ErrorSpec(500, "server_error", "internal_error")
    ENGINE_UNAVAILABLE = ErrorSpec(503, "server_error", "engine_unavailable", retry_after_s=2)
    NOT_READY = ErrorSpec(503, "server_error", "not_ready", retry_after_s=2)
    DRAINING = ErrorSpec(503, "server_error", "server_shutting_down", retry_after_s=5)
    TIMEOUT = ErrorSpec(504, "server_error", "request_timeout")


# Anthropic's error types by status (docs.anthropic.com, "Errors"; the anthropic SDK's error classes).
# A drained or not-ready server is "overloaded": retry later, as after Anthropic's 529.
ANTHROPIC_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    499: "invalid_request_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}

_FROM_ENGINE: dict[EngineErrorCode, ErrorKind] = {
    EngineErrorCode.MODEL_NOT_FOUND: ErrorKind.MODEL_NOT_FOUND,
    EngineErrorCode.MODEL_LOAD_FAILED: ErrorKind.MODEL_LOAD_FAILED,
    EngineErrorCode.MODEL_UNSUPPORTED: ErrorKind.MODEL_UNSUPPORTED,
    EngineErrorCode.MODEL_TOO_LARGE: ErrorKind.MODEL_TOO_LARGE,
    EngineErrorCode.CONTEXT_LENGTH_EXCEEDED: ErrorKind.CONTEXT_LENGTH_EXCEEDED,
    EngineErrorCode.INVALID_REQUEST: ErrorKind.INVALID_REQUEST,
    EngineErrorCode.ENGINE_UNAVAILABLE: ErrorKind.ENGINE_UNAVAILABLE,
    EngineErrorCode.ENGINE_OVERLOADED: ErrorKind.OVERLOADED,
    EngineErrorCode.MEMORY_BUDGET_EXCEEDED: ErrorKind.MEMORY_BUDGET_EXCEEDED,
    EngineErrorCode.MODEL_BUSY: ErrorKind.MODEL_BUSY,
    EngineErrorCode.REQUEST_TIMEOUT: ErrorKind.TIMEOUT,
    EngineErrorCode.INVALID_IMAGE: ErrorKind.INVALID_IMAGE,
    EngineErrorCode.IMAGES_NOT_SUPPORTED: ErrorKind.IMAGES_NOT_SUPPORTED,
    EngineErrorCode.INTERNAL: ErrorKind.INTERNAL,
}


class GatewayError(Exception):
    """The one exception the HTTP layer raises on purpose; anything else is an internal error."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None, *, challenge: str = "Bearer") -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.param = param
        self.challenge = challenge  # a 401's WWW-Authenticate

    @property
    def status(self) -> int:
        return self.kind.value.status

    @classmethod
    def from_engine(cls, error: EngineError) -> GatewayError:
        return cls(_FROM_ENGINE[error.code], error.message, error.param)

    def body(self) -> ErrorResponse:
        spec = self.kind.value
        return ErrorResponse(ErrorDetail(message=self.message, type=spec.type, param=self.param, code=spec.code))

    @property
    def anthropic_type(self) -> str:
        return ANTHROPIC_TYPES[self.status]

    def anthropic_body(self, request_id: str | None = None) -> AnthropicErrorResponse:
        """Anthropic's error has no `param`: the message names it instead."""
        message = self.message if not self.param or self.param in self.message else f"{self.param}: {self.message}"
        return AnthropicErrorResponse(AnthropicErrorDetail(self.anthropic_type, message), request_id)

    def headers(self) -> dict[str, str]:
        if self.kind is ErrorKind.UNAUTHORIZED:
            return {"WWW-Authenticate": self.challenge}  # a 401 names its scheme (RFC 9110 11.6.1)
        if self.kind is ErrorKind.BODY_TIMEOUT:
            return {"Connection": "close"}  # the rest of the body may still come: the connection is done
        retry = self.kind.value.retry_after_s
        return {"Retry-After": str(retry)} if retry is not None else {}


def unsupported(param: str, detail: str) -> GatewayError:
    return GatewayError(ErrorKind.UNSUPPORTED_PARAMETER, f"'{param}' is not supported: {detail}", param)


def invalid(param: str | None, message: str) -> GatewayError:
    return GatewayError(ErrorKind.INVALID_REQUEST, message, param)


def internal(request_id: str) -> GatewayError:
    return GatewayError(
        ErrorKind.INTERNAL,
        f"The server had an internal error while processing request {request_id}; "
        "the log holds the details under this id.",
    )
