"""Cut the schemas our routes answer with out of OpenAI's published OpenAPI document.

    git clone https://github.com/openai/openai-openapi
    python3 extract_openai.py openai-openapi/openapi.json COMMIT COMMIT_DATE

Keeps the named roots and every schema they reference, unchanged except that prose (description, title,
examples, x-oaiMeta) is dropped to keep the file small: validation reads none of it.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

ROOTS = [
    "CreateChatCompletionResponse", "CreateChatCompletionStreamResponse", "CreateCompletionResponse",
    "Response", "ResponseStreamEvent", "ListModelsResponse", "Model", "ErrorResponse", "CreateEmbeddingResponse",
]
_PROSE = {"description", "title", "example", "examples", "x-oaiMeta", "x-oaiExpandable", "x-oaiTypeLabel"}


def _strip(node: Any) -> Any:
    if isinstance(node, dict):
        # a property may be *named* like prose ("description", "title"): keep the keys under `properties`
        return {k: (_strip(v) if k != "properties" else {p: _strip(s) for p, s in v.items()})
                for k, v in node.items() if k not in _PROSE}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def extract(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document["components"]["schemas"]
    kept: dict[str, Any] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name not in kept:
            kept[name] = _strip(schemas[name])
            todo += re.findall(r'#/components/schemas/([^"]+)"', json.dumps(schemas[name]))
    return {"components": {"schemas": dict(sorted(kept.items()))}}


if __name__ == "__main__":
    source, commit, date = sys.argv[1:4]
    document = json.loads(Path(source).read_text())
    subset = extract(document)
    subset = {"x-source": {"repository": "https://github.com/openai/openai-openapi", "file": "openapi.json",
                           "commit": commit, "commit_date": date, "info.version": document["info"]["version"],
                           "openapi": document["openapi"], "roots": ROOTS}, **subset}
    out = Path(__file__).with_name("openai-openapi.subset.json")
    out.write_text(json.dumps(subset, indent=1, sort_keys=False) + "\n")
    print(f"{len(subset['components']['schemas'])} schemas -> {out}")
