"""Request bodies decoded strictly: a JSON type that is not the field's is a 400 naming the field.

Litestar decodes `data` with msgspec's `strict=False`, so `"stream": "true"` streams, `"temperature": "0.5"`
samples and `0` passes for a boolean; OpenAI's and Anthropic's servers refuse all of them. This DTO, set once
on the app, reads every route's `data` with `msgspec.json.decode` into the handler's annotated type (strict),
so a route added later is covered without a thought. It never encodes responses (the app sets no return DTO).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

import msgspec
from litestar.dto import AbstractDTO, DTOConfig
from litestar.typing import FieldDefinition

from gateway.errors import ErrorKind, GatewayError
from gateway.serving.convert import invalid_field

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator
    from litestar.dto.data_structures import DTOFieldDefinition
    from litestar.openapi.spec import Reference, Schema

_DECODERS: dict[Any, msgspec.json.Decoder[Any]] = {}


def _integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    return value


class StrictBody(AbstractDTO[Any]):
    config = DTOConfig()

    def decode_bytes(self, value: bytes) -> Any:
        field = self.asgi_connection.route_handler.parsed_data_field
        assert field is not None  # Litestar calls a data DTO only for handlers that take `data`
        decoder = _DECODERS.get(field.annotation)
        if decoder is None:
            decoder = _DECODERS[field.annotation] = msgspec.json.Decoder(field.annotation)
        try:
            return decoder.decode(value)
        except msgspec.ValidationError as exc:
            if "got `float`" not in str(exc):
                raise invalid_field(exc, "") from None
        except msgspec.DecodeError as exc:
            raise GatewayError(ErrorKind.INVALID_JSON, f"The body is not valid JSON: {exc}") from None
        # JSON has one number type and JSON Schema calls 3.0 an integer: so do we (only on this rare path).
        try:
            return msgspec.convert(_integral_floats_as_ints(msgspec.json.decode(value)), field.annotation)
        except msgspec.ValidationError as exc:
            raise invalid_field(exc, "") from None

    def decode_builtins(self, value: dict[str, Any]) -> Any:
        field = self.asgi_connection.route_handler.parsed_data_field
        assert field is not None
        try:
            return msgspec.convert(value, field.annotation)
        except msgspec.ValidationError as exc:
            raise invalid_field(exc, "") from None

    @classmethod
    def create_for_field_definition(cls, field_definition: FieldDefinition, handler_id: str,
                                    backend_cls: Any = None) -> None:
        """Nothing to build: the handler's own type is the decoder's."""

    @classmethod
    def create_openapi_schema(cls, field_definition: FieldDefinition, handler_id: str,
                              schema_creator: SchemaCreator) -> Reference | Schema:
        return schema_creator.for_field_definition(FieldDefinition.from_annotation(field_definition.annotation))

    @classmethod
    def generate_field_definitions(cls, model_type: type[Any]) -> Generator[DTOFieldDefinition, None, None]:
        yield from ()  # never asked: this DTO transfers nothing field by field

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False
