"""SmolLM2-135M-Instruct wearing a Hermes-style tools template (Qwen2.5-Instruct's, from chat_templates/), so the
real trained model can be asked for tool calls: its own template has no tools. Both are ChatML, so the model
sees the turns it was trained on, plus the tools' system text and `<tool_call>` blocks.

The weights are hard-linked (no copy) into a folder beside the converted model in the same cache.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx

from tests.support.real_model import ensure_smollm2
from tests.support.server import ServerProcess
from tests.support.tiny_models import CHAT_TEMPLATES_DIR

MODEL_ID = "smollm2-135m-hermes"


def ensure_smollm2_with_tools() -> Path:
    """A --models-dir holding only MODEL_ID: the converted SmolLM2 with Qwen2.5's chat template."""
    source = ensure_smollm2()
    models = source.parent.parent / f"{source.parent.name}-hermes"
    folder = models / MODEL_ID
    template = (CHAT_TEMPLATES_DIR / "qwen2.5-instruct.jinja").read_text()
    if (folder / "chat_template.jinja").is_file() and (folder / "chat_template.jinja").read_text() == template:
        return models
    staging = models / f".{MODEL_ID}.{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for item in source.iterdir():
        if item.name == "chat_template.jinja":
            continue
        try:
            os.link(item, staging / item.name)
        except OSError:
            shutil.copy2(item, staging / item.name)
    (staging / "chat_template.jinja").write_text(template)
    config_path = staging / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.unlink()  # hard-linked: write a file of its own
    config_path.write_text(json.dumps(config, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return models


def warm_up(server: ServerProcess) -> None:
    """Load the model with one short request before the tests. On the shared 2-core CPU the first prefill after
    a load has been seen to starve the engine's heartbeat thread past its 3 s limit (the engine is then
    restarted: engine-cpu's issue-20 item, not these tests' subject), so one failed warm-up is tolerated; the
    tests themselves get no retries."""
    reply = None
    for _ in range(2):
        reply = httpx.post(server.base_url + "/v1/chat/completions", timeout=900, json={
            "model": MODEL_ID, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
        if reply.status_code == 200:
            return
    assert reply is not None
    raise AssertionError(f"the warm-up failed twice: {reply.status_code} {reply.text}")
