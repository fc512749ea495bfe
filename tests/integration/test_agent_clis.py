"""The coding agents people run today, against a real gateway on their DEFAULT settings: Codex CLI (Responses
API), Claude Code (Messages API) and opencode (chat completions). Each completes a turn (`say hi`) and a tool
round trip (it asks for a shell command, runs it, sends the result back, gets the answer).

Only the base URL, a key, the model and telemetry-off variables are set (docs/agents.md gives the same
settings to users). The agents' own first requests (14k to 38k tokens of instructions and tool schemas)
run through the real engine on a one-layer Qwen2.5-template model with a 128k context
(`make_agent_model`), whose prefill ends in seconds on a 2-core CPU. A random model never decides to call a
tool, so the gateway runs with a test-only script (`--test-script`, gateway/test_script.py): a rule whose
text occurs in the newest input makes the engine's sampling spell the rule's reply (a Qwen `<tool_call>` or
a sentence), and everything after the choice of token is real: tokenizer, detokenizer, tool-call parser,
each API's wire, the agent.

Every request the agent makes passes a recording proxy, so a failure shows what the agent sent and what it
got. The CLIs are installed by tests/run.sh into tests/agent_clis/node_modules (pinned in package.json).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.recording_proxy import Exchange, RecordingProxy
from tests.support.server import ServerProcess
from tests.support.tiny_models import make_agent_model

BIN = Path(__file__).parents[1] / "agent_clis" / "node_modules" / ".bin"
MODEL = "agent"
THINKING_MODEL = "agent-qwen3"  # Qwen3's template: <think> reasoning before the reply
KEY = "sk-agent-test"
MARKER = "agent-marker-42"  # what the command prints; the command itself says $((6*7)), so only its output has it
COMMAND = "echo agent-marker-$((6*7))"
CLI_TIMEOUT_S = 240


def _call(name: str, arguments: dict[str, Any]) -> str:
    """A Qwen2.5 tool call, then the end of the turn (the scripted sampling runs free after its text)."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call><|im_end|>"


# The agents' shell tools: Codex's exec_command (cmd), Claude Code's Bash and opencode's bash (command).
SCRIPT = [
    {"when": "say hi", "say": "Hi there!<|im_end|>"},
    {"when": "codex: run the marker command", "say": _call("exec_command", {"cmd": COMMAND})},
    {"when": "claude: run the marker command", "say": _call("Bash", {"command": COMMAND,
                                                                     "description": "Print the marker"})},
    {"when": "opencode: run the marker command", "say": _call("bash", {"command": COMMAND,
                                                                       "description": "Print the marker"})},
    {"when": MARKER, "say": f"The command printed {MARKER}.<|im_end|>"},
    # Codex's sub-agent tools come in a namespace tool (multi_agent_v1); no such agent exists, so Codex's own
    # handler answers that the id is invalid.
    # A thinking model reasons, then calls: the reasoning goes out as a Responses reasoning item or a Messages
    # thinking block, and the agent sends it back with the call in the next request.
    {"when": "codex thinks: run the marker command", "say": "<think>\nThe user wants the marker.\n</think>\n\n"
                                                              + _call("exec_command", {"cmd": COMMAND})},
    {"when": "claude thinks: run the marker command", "say": "<think>\nThe user wants the marker.\n</think>\n\n"
                                                               + _call("Bash", {"command": COMMAND,
                                                                                "description": "Print the marker"})},
    {"when": "codex: close an agent", "say": _call("close_agent", {"target": "agent-x"})},
    {"when": "invalid agent id agent-x", "say": "There is no such agent.<|im_end|>"},
]


@dataclass
class Gateway:
    server: ServerProcess
    proxy: RecordingProxy

    @property
    def url(self) -> str:
        return self.proxy.base_url


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("agent-clis")
    make_agent_model(root / "models" / MODEL)
    make_agent_model(root / "models" / THINKING_MODEL, chat_format="qwen3")
    script = root / "script.json"
    script.write_text(json.dumps(SCRIPT))
    server = ServerProcess(["--models-dir", str(root / "models"), "--api-key", KEY, "--test-faults",
                            "--test-script", str(script)], root / "gateway.log").start()
    try:
        server.wait_ready()
        with RecordingProxy(server.base_url) as proxy:
            yield Gateway(server, proxy)
    finally:
        server.stop()


def _cli(name: str) -> Path:
    path = BIN / name
    if not path.exists() or shutil.which("node") is None:
        pytest.skip(f"{name} is not installed (tests/run.sh installs the agent CLIs: npm ci in tests/agent_clis)")
    return path


def _isolated_env(home: Path, **settings: str) -> dict[str, str]:
    """A clean HOME (no user config or credentials of the machine), PATH for the shell, and the settings."""
    home.mkdir(parents=True, exist_ok=True)
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "TMPDIR") if k in os.environ}
    return {**keep, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_CACHE_HOME": str(home / ".cache"), "XDG_DATA_HOME": str(home / ".local" / "share"), **settings}


def _workdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q", str(path)], check=True)  # the agents expect a project
    return path


def _run(gateway: Gateway, args: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run an agent to the end; its output, or a failure showing what it sent the gateway and what it got."""
    first = len(gateway.proxy.exchanges)
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                          stdin=subprocess.DEVNULL)
    exchanges = gateway.proxy.exchanges[first:]
    # Claude Code probes the base URL with a bare `HEAD /` (no key) to see that it answers; with an API key
    # set, the status page there answers 401, which is the truth and which Claude Code reads as reachable.
    failed = [e for e in exchanges if (e.status >= 400 or e.status == 0) and (e.method, e.path) != ("HEAD", "/")]
    report = (f"\n--- exit {done.returncode}\n--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
              f"\n--- requests\n{gateway.proxy.report(exchanges)}\n--- gateway log\n{gateway.server.log()[-4000:]}")
    assert done.returncode == 0 and not failed and exchanges, report
    return done.stdout


def _generation(exchanges: list[Exchange], path: str) -> list[dict[str, Any]]:
    return [e.body for e in exchanges if e.method == "POST" and e.path.split("?")[0] == path
            and isinstance(e.body, dict)]


# -- Codex CLI: the Responses API ---------------------------------------------------------------------------


def _codex(gateway: Gateway, tmp_path: Path, prompt: str, model: str = MODEL) -> str:
    # A provider of our own is Codex's way to a server other than OpenAI's (OPENAI_BASE_URL moves the
    # built-in provider, which then wants a ChatGPT login or OpenAI key flow): name, base URL, key variable.
    # wire_api is left out: "responses" is Codex's default and only wire.
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'model = "{model}"\nmodel_provider = "mlx-gateway"\n\n[model_providers.mlx-gateway]\n'
        f'name = "mlx-gateway"\nbase_url = "{gateway.url}/v1"\nenv_key = "MLX_GATEWAY_API_KEY"\n'
    )
    env = _isolated_env(tmp_path / "home", CODEX_HOME=str(home), MLX_GATEWAY_API_KEY=KEY)
    return _run(gateway, [str(_cli("codex")), "exec", prompt], _workdir(tmp_path / "work"), env)


def test_codex_exec_says_hi(gateway: Gateway, tmp_path: Path) -> None:
    first = len(gateway.proxy.exchanges)
    assert "Hi there!" in _codex(gateway, tmp_path, "say hi")
    (request, *_) = _generation(gateway.proxy.exchanges[first:], "/v1/responses")
    # What Codex sends by default, each of which used to be a 400 (issue 20).
    assert {"client_metadata", "reasoning", "include", "prompt_cache_key", "store"} <= set(request)
    kinds = {tool["type"] for tool in request["tools"]}
    assert {"function", "namespace", "web_search"} <= kinds and request["stream"] is True


def test_codex_runs_a_command_and_answers_from_its_output(gateway: Gateway, tmp_path: Path) -> None:
    first = len(gateway.proxy.exchanges)
    output = _codex(gateway, tmp_path, "codex: run the marker command")
    assert f"The command printed {MARKER}." in output
    requests = _generation(gateway.proxy.exchanges[first:], "/v1/responses")
    results = [item for r in requests for item in r["input"] if item.get("type") == "function_call_output"]
    calls = [item for r in requests for item in r["input"] if item.get("type") == "function_call"]
    assert [c["name"] for c in calls] == ["exec_command"] and json.loads(calls[0]["arguments"]) == {"cmd": COMMAND}
    assert len(results) == 1 and MARKER in json.dumps(results[0]["output"])


def test_codex_calls_a_sub_agent_tool_of_its_namespace_and_gets_its_answer(gateway: Gateway, tmp_path: Path) -> None:
    first = len(gateway.proxy.exchanges)
    assert "There is no such agent." in _codex(gateway, tmp_path, "codex: close an agent")
    requests = _generation(gateway.proxy.exchanges[first:], "/v1/responses")
    calls = [item for r in requests for item in r["input"] if item.get("type") == "function_call"]
    results = [item for r in requests for item in r["input"] if item.get("type") == "function_call_output"]
    # The call came back named as OpenAI names a namespace tool's call, and Codex routed it to that tool.
    assert [(c["name"], c.get("namespace")) for c in calls] == [("close_agent", "multi_agent_v1")]
    assert len(results) == 1 and "invalid agent id agent-x" in json.dumps(results[0]["output"])


def test_codex_sends_a_thinking_models_reasoning_back_with_its_call(gateway: Gateway, tmp_path: Path) -> None:
    first = len(gateway.proxy.exchanges)
    output = _codex(gateway, tmp_path, "codex thinks: run the marker command", THINKING_MODEL)
    assert f"The command printed {MARKER}." in output
    requests = _generation(gateway.proxy.exchanges[first:], "/v1/responses")
    kinds = [item.get("type") for item in requests[-1]["input"]]
    reasoning = [item for item in requests[-1]["input"] if item.get("type") == "reasoning"]
    assert kinds[-3:] == ["reasoning", "function_call", "function_call_output"], kinds
    assert "The user wants the marker." in json.dumps(reasoning)


# -- Claude Code: the Messages API ---------------------------------------------------------------------------


def _claude(gateway: Gateway, tmp_path: Path, prompt: str, model: str = MODEL) -> str:
    env = _isolated_env(
        tmp_path / "home", ANTHROPIC_BASE_URL=gateway.url, ANTHROPIC_API_KEY=KEY, ANTHROPIC_MODEL=model,
        ANTHROPIC_SMALL_FAST_MODEL=model, ANTHROPIC_DEFAULT_HAIKU_MODEL=model,  # its side requests, old and new name
        DISABLE_TELEMETRY="1", DISABLE_ERROR_REPORTING="1", DISABLE_AUTOUPDATER="1",
        CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
    )
    return _run(gateway, [str(_cli("claude")), "-p", prompt], _workdir(tmp_path / "work"), env)


def test_claude_code_says_hi(gateway: Gateway, tmp_path: Path) -> None:
    first = len(gateway.proxy.exchanges)
    assert "Hi there!" in _claude(gateway, tmp_path, "say hi")
    exchanges = gateway.proxy.exchanges[first:]
    request = next(r for r in _generation(exchanges, "/v1/messages") if r.get("tools"))
    assert {"thinking", "context_management", "output_config", "metadata"} <= set(request)
    assert any(m["role"] == "system" for m in request["messages"])  # a system message mid-conversation
    assert any(e.path.endswith("?beta=true") for e in exchanges)


def test_claude_code_runs_a_command_and_answers_from_its_output(gateway: Gateway, tmp_path: Path) -> None:
    first = len(gateway.proxy.exchanges)
    # `echo` is a command Claude Code runs without asking, in -p mode too (others need --allowedTools there).
    output = _claude(gateway, tmp_path, "claude: run the marker command")
    assert f"The command printed {MARKER}." in output
    requests = _generation(gateway.proxy.exchanges[first:], "/v1/messages")
    blocks = [b for r in requests for m in r["messages"] if isinstance(m["content"], list) for b in m["content"]]
    uses = [b for b in blocks if b["type"] == "tool_use"]
    results = [b for b in blocks if b["type"] == "tool_result"]
    assert [u["name"] for u in uses] == ["Bash"] and uses[0]["input"]["command"] == COMMAND
    assert len(results) == 1 and MARKER in json.dumps(results[0]["content"]) and not results[0].get("is_error")


def test_claude_code_sends_a_thinking_models_thinking_back_with_its_call(gateway: Gateway, tmp_path: Path) -> None:
    first = len(gateway.proxy.exchanges)
    output = _claude(gateway, tmp_path, "claude thinks: run the marker command", THINKING_MODEL)
    assert f"The command printed {MARKER}." in output
    requests = _generation(gateway.proxy.exchanges[first:], "/v1/messages")
    turns = [m for r in requests for m in r["messages"] if m["role"] == "assistant"]
    blocks = [b["type"] for m in turns if isinstance(m["content"], list) for b in m["content"]]
    assert blocks[:2] == ["thinking", "tool_use"], blocks
    thinking = next(b for m in turns for b in m["content"] if b["type"] == "thinking")
    assert thinking["thinking"] == "The user wants the marker." and thinking["signature"]


# -- opencode: chat completions ------------------------------------------------------------------------------


def _opencode(gateway: Gateway, tmp_path: Path, prompt: str) -> str:
    work = _workdir(tmp_path / "work")
    (work / "opencode.json").write_text(json.dumps({
        "$schema": "https://opencode.ai/config.json",
        "provider": {"mlx-gateway": {"npm": "@ai-sdk/openai-compatible", "name": "mlx-gateway",
                                     "options": {"baseURL": f"{gateway.url}/v1", "apiKey": KEY},
                                     "models": {MODEL: {"name": MODEL}}}},
        "model": f"mlx-gateway/{MODEL}",
    }))
    env = _isolated_env(tmp_path / "home", OPENCODE_DISABLE_AUTOUPDATE="1", OPENCODE_DISABLE_SHARE="1",
                        OPENCODE_DISABLE_MODELS_FETCH="1", OPENCODE_DISABLE_LSP_DOWNLOAD="1")
    return _run(gateway, [str(_cli("opencode")), "run", prompt], work, env)


def test_opencode_says_hi(gateway: Gateway, tmp_path: Path) -> None:
    assert "Hi there!" in _opencode(gateway, tmp_path, "say hi")


def test_opencode_runs_a_command_and_answers_from_its_output(gateway: Gateway, tmp_path: Path) -> None:
    first = len(gateway.proxy.exchanges)
    output = _opencode(gateway, tmp_path, "opencode: run the marker command")
    assert f"The command printed {MARKER}." in output
    requests = _generation(gateway.proxy.exchanges[first:], "/v1/chat/completions")
    results = [m for r in requests for m in r["messages"] if m["role"] == "tool"]
    assert len(results) == 1 and MARKER in json.dumps(results[0]["content"])
