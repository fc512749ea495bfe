"""Wire types of the admin API (gateway/admin/routes.py). Its answers are the OpenAI API's Model objects."""

from __future__ import annotations

from msgspec import Struct


class ModelAction(Struct, forbid_unknown_fields=True):
    """The model an admin command acts on: an id as `GET /v1/models` lists it (`org/name` included)."""

    model: str
