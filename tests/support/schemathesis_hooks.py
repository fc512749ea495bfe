"""schemathesis hooks (SCHEMATHESIS_HOOKS=tests.support.schemathesis_hooks): fuzzed bodies name a served model.

A random `model` string is a 404 before any other field is judged, so without this the fuzzing never gets past
model lookup. Only a string is replaced: a body made invalid through its `model` (a number, a missing field)
stays invalid, so the negative cases keep their meaning.
"""

from __future__ import annotations

from typing import Any

import schemathesis

SERVED_MODEL = "tiny"


@schemathesis.hook
def map_body(ctx: Any, body: Any) -> Any:
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        return {**body, "model": SERVED_MODEL}
    return body
