"""Tool-call families: how a model writes a call, and how to tell which one a loaded model uses.

A family is the markup around a call (its start and end markers), the shape of the call inside it, and
what the model's chat template expects back in later turns. Detection reads the loaded tokenizer: the
tool parser mlx-lm chose for it (`tool_parser_type` in tokenizer_config.json, or mlx-lm's inference from
the chat template), then our own signature for Llama 3.x, whose JSON calls mlx-lm has no parser for.
A template that never uses the `tools` variable has no tool support: such a model is refused, never given
a prompt that silently drops the tools.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import jinja2
import jinja2.meta

Body = Literal["json", "args", "delimited"]


@dataclass(frozen=True)
class Family:
    name: str
    start: str  # the marker that opens a call ("" if none: the call is recognised by its JSON)
    end: str  # the marker that closes it ("" when the JSON's own end closes it)
    body: Body  # "json": call objects; "args": name[ARGS]{...}; "delimited": text for an mlx-lm parser
    argument_keys: tuple[str, ...] = ("arguments",)  # keys of a JSON call object that hold the arguments
    bare_json: bool = False  # a bare JSON call object at the very start of the output is a call (Llama)
    list_body: bool = False  # the calls after the marker are a JSON array (Mistral v3)
    max_calls: int | None = None  # the template renders at most this many calls in one assistant turn
    mistral_ids: bool = False  # the template wants 9-character alphanumeric tool-call ids
    mlx_parser: str | None = None  # the mlx_lm.tool_parsers module that reads a "delimited" body
    forceable: bool = True  # False: the model's own markup is not what the parser reads (harmony)

    @property
    def can_force(self) -> bool:
        """Whether a grammar can force a call (tool_choice required or a named function)."""
        return self.forceable and self.body != "delimited"


# Qwen2.5, Qwen3, Hermes 2/3 and other ChatML tool templates: one JSON object per <tool_call> block.
HERMES = Family("hermes", "<tool_call>", "</tool_call>", "json")
# Llama 3.1/3.2/3.3: {"name": ..., "parameters": {...}} as the whole reply, sometimes after <|python_tag|>.
# The template renders one call per assistant turn (it raises on more).
LLAMA3_JSON = Family(
    "llama3_json", "<|python_tag|>", "", "json", argument_keys=("parameters", "arguments"), bare_json=True,
    max_calls=1,
)
# Mistral 7B v0.3, Nemo, Small 3.1 (tokenizer v3): [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]
MISTRAL_JSON = Family("mistral_json", "[TOOL_CALLS]", "", "json", list_body=True, mistral_ids=True)
# Mistral Small 3.2, Magistral, Devstral (tokenizer v11+): [TOOL_CALLS]name[ARGS]{...} for each call.
MISTRAL_ARGS = Family("mistral_args", "[TOOL_CALLS]", "", "args", mistral_ids=True)

# gpt-oss (OpenAI's harmony format): a call is a commentary message to functions.NAME; the reasoning splitter
# (mlx_backend/engine/reasoning.py) hands it on as the JSON call object between HERMES' markers, read as HERMES.
# The template renders one call per assistant message; tools/grammar.py writes harmony's own markup.
HARMONY = Family("harmony", "<tool_call>", "</tool_call>", "json", max_calls=1)

BY_NAME = {f.name: f for f in (HERMES, LLAMA3_JSON, MISTRAL_JSON, MISTRAL_ARGS, HARMONY)}


@dataclass(frozen=True)
class Detection:
    family: Family | None
    reason: str  # why there is no family (empty when there is one), phrased to follow "because"


def detect_family(tokenizer: Any) -> Detection:
    """The tool-call family of a loaded mlx-lm TokenizerWrapper (cached per tokenizer)."""
    try:
        return _cache[tokenizer]
    except (KeyError, TypeError):
        pass
    detection = _detect(tokenizer)
    with contextlib.suppress(TypeError):  # not weak-referenceable (a test double): not cached
        _cache[tokenizer] = detection
    return detection


_cache: weakref.WeakKeyDictionary[Any, Detection] = weakref.WeakKeyDictionary()


def _detect(tokenizer: Any) -> Detection:
    template = tool_template(tokenizer)
    parser_type = _mlx_parser_type(tokenizer)
    custom_renderer = getattr(tokenizer, "_chat_template", None) is not None  # mlx-lm's chat_template_type
    if template is None and not custom_renderer:
        return Detection(None, "it has no chat template")
    if template is not None and not mentions_tools(template):
        return Detection(None, "its chat template does not use tools")
    if template is not None and "<|channel|>" in template and "<|call|>" in template:  # harmony (gpt-oss)
        return Detection(HARMONY, "")
    if parser_type == "json_tools":
        return Detection(HERMES, "")
    if parser_type == "mistral":
        # The template says which layout it renders; without one, the vocabulary (v11+ has an [ARGS] token).
        newer = "[ARGS]" in template if template is not None else "[ARGS]" in tokenizer.get_vocab()
        return Detection(MISTRAL_ARGS if newer else MISTRAL_JSON, "")
    if parser_type is not None:
        module = _mlx_module(parser_type)
        return Detection(
            Family(f"mlx:{parser_type}", module.tool_call_start, module.tool_call_end, "delimited",
                   mlx_parser=parser_type),
            "",
        )
    if template is not None and _is_llama3(template):
        return Detection(LLAMA3_JSON, "")
    return Detection(None, "its chat template's tool-call format is not one this server can read")


def tool_template(tokenizer: Any) -> str | None:
    """The chat template transformers renders when tools are given (a dict of templates has a "tool_use")."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return template if isinstance(template, str) else None


_env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])


def mentions_tools(template: str) -> bool:
    """Whether the template reads the `tools` variable (what apply_chat_template(tools=...) sets)."""
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(_env.parse(template))
    except jinja2.TemplateSyntaxError:  # e.g. transformers' {% generation %} tag: fall back to the text
        return re.search(r"\btools\b", template) is not None


def _is_llama3(template: str) -> bool:
    # Meta's Llama 3.x templates: header tokens, the ipython role for tool results, "parameters" for arguments.
    return "<|start_header_id|>" in template and ("ipython" in template or "<|python_tag|>" in template)


def _mlx_parser_type(tokenizer: Any) -> str | None:
    # mlx_lm.tokenizer_utils.load writes the type it chose (configured or inferred) back into init_kwargs.
    inner = getattr(tokenizer, "_tokenizer", tokenizer)
    kwargs = getattr(inner, "init_kwargs", None)
    value = kwargs.get("tool_parser_type") if isinstance(kwargs, dict) else None
    return value if isinstance(value, str) else None


def _mlx_module(parser_type: str) -> Any:
    return importlib.import_module(f"mlx_lm.tool_parsers.{parser_type}")
