"""OpenAI requests -> the engine's `Generate`, for chat and legacy completions.

Unsupported parameters are refused here, by name, before any work: a user never gets a silent surprise.
The pieces other APIs reuse (tools, tool_choice, structured output) are small functions of their own.
"""

from __future__ import annotations

from msgspec import UNSET

from gateway.chat.wire import (
    AssistantMessage,
    ChatCompletionRequest,
    CompletionRequest,
    DeveloperMessage,
    ImageUrlPart,
    Message,
    NamedToolChoice,
    ResponseFormat,
    ResponseFormatJsonObject,
    ResponseFormatJsonSchema,
    TextPart,
    Tool,
    ToolMessage,
    UserMessage,
)
from gateway.errors import invalid, unsupported
from gateway.serving import images
from gateway.serving.convert import (
    FunctionTool,
    ToolChoice,
    check_constraint_with_tools,
    fault_of,
    json_constraint,
    sampling_params,
    tool_fields,
)
from gateway.serving.reasoning import effort_control, template_kwargs_of, with_template_switch
from mlx_backend.contract import ChatMessage, Constraint, Generate, ToolCall


def check_chat_supported(req: ChatCompletionRequest) -> None:
    """Raise a 400 naming the first parameter we would otherwise have to ignore."""
    if req.functions is not UNSET and req.functions:
        raise unsupported("functions", "the deprecated functions API is not available; send tools")
    if req.function_call not in (UNSET, None, "none", "auto"):
        raise unsupported("function_call", "the deprecated functions API is not available; send tool_choice")
    if req.audio not in (UNSET, None):
        raise unsupported("audio", "audio output is not available")
    if req.modalities not in (UNSET, None) and list(req.modalities) != ["text"]:
        raise unsupported("modalities", "only text output is available")
    if req.web_search_options is not UNSET:
        raise unsupported("web_search_options", "this server never goes to the network")
    if req.store:
        raise unsupported("store", "completions are never stored")


def check_completion_supported(req: CompletionRequest) -> None:
    if req.best_of not in (None, 1):
        raise unsupported("best_of", "only best_of=1")
    if req.echo:
        raise unsupported("echo", "the prompt is not echoed")
    if req.suffix:
        raise unsupported("suffix", "insertion (suffix) is not available")
    if not isinstance(req.prompt, str):
        if not req.prompt or not all(isinstance(p, str) for p in req.prompt):
            raise unsupported("prompt", "token-id prompts are not accepted; send text")
        if len(req.prompt) != 1:
            raise unsupported("prompt", "only one prompt per request")


# -- chat's shapes of the shared pieces ------------------------------------------------------------------


def function_tools(tools: list[Tool] | None) -> list[FunctionTool]:
    """Chat's function tools; other kinds are a 400."""
    functions = []
    for i, tool in enumerate(tools or ()):
        if tool.type != "function" or tool.function is UNSET:
            raise unsupported(f"tools[{i}].type", f"only function tools are available, not {tool.type!r}")
        f = tool.function
        functions.append(FunctionTool(
            f.name, f.description if f.description is not UNSET else None,
            f.parameters if f.parameters is not UNSET else None, f.strict, f"tools[{i}].function",
        ))
    return functions


def tool_choice_of(choice: str | NamedToolChoice | None) -> ToolChoice:
    if choice is None:
        return ToolChoice("auto")
    if isinstance(choice, str):
        return ToolChoice(choice)  # type: ignore[arg-type]  # the protocol allows only the engine's words
    if choice.type != "function" or choice.function is UNSET:
        raise unsupported("tool_choice", f"tool_choice of type {choice.type!r} is not available; send 'auto', "
                                         "'none', 'required' or a function")
    return ToolChoice("function", choice.function.name, "tool_choice.function.name")


def constraint_of(response_format: ResponseFormat | None) -> Constraint | None:
    """Structured output, checked now: a schema that cannot be enforced is a 400 before any compute."""
    if isinstance(response_format, ResponseFormatJsonObject):
        return json_constraint(None, strict=False, param="response_format")
    if isinstance(response_format, ResponseFormatJsonSchema):
        spec = response_format.json_schema
        schema = spec.schema if spec.schema is not UNSET else None
        return json_constraint(schema, strict=bool(spec.strict), param="response_format.json_schema.schema")
    return None


def text_of(content: str | list[TextPart] | None, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content)


# -- chat completions -----------------------------------------------------------------------------------


def _to_engine_message(message: Message, index: int) -> ChatMessage:
    param = f"messages[{index}].content"
    if isinstance(message, DeveloperMessage):  # OpenAI's newer name for the system role
        return ChatMessage(role="system", content=text_of(message.content, param))
    if isinstance(message, ToolMessage):
        return ChatMessage(role="tool", content=text_of(message.content, param), tool_call_id=message.tool_call_id)
    name = message.name if message.name is not UNSET else None
    if isinstance(message, AssistantMessage):
        calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in message.tool_calls or ())
        reasoning = message.reasoning_content or message.reasoning or None
        return ChatMessage(role="assistant", content=text_of(message.content, param), name=name, tool_calls=calls,
                           reasoning=reasoning if isinstance(reasoning, str) else None)
    if isinstance(message, UserMessage):
        if isinstance(message.content, str):
            return ChatMessage(role="user", content=message.content, name=name)
        texts = [p for p in message.content if isinstance(p, TextPart)]
        shown = tuple(images.from_url(p.image_url.url, f"{param}[{j}].image_url", p.image_url.detail)
                      for j, p in enumerate(message.content) if isinstance(p, ImageUrlPart))
        return ChatMessage(role="user", content=text_of(texts, param), name=name, images=shown)
    return ChatMessage(role="system", content=text_of(message.content, param), name=name)


def _logprobs(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    if top_logprobs is not None and not logprobs:
        raise invalid("top_logprobs", "top_logprobs needs logprobs: true")
    return (top_logprobs or 0) if logprobs else None


def chat_to_generate(
    req: ChatCompletionRequest, request_id: str, default_max_tokens: int, allow_faults: bool = False
) -> Generate:
    check_chat_supported(req)
    if req.max_tokens is not None and req.max_completion_tokens is not None and (
        req.max_tokens != req.max_completion_tokens
    ):
        raise invalid("max_completion_tokens", "max_tokens and max_completion_tokens disagree; send one")
    params = sampling_params(
        req.max_completion_tokens or req.max_tokens or default_max_tokens, req.temperature, req.top_p,
        stop=req.stop, seed=req.seed, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, logprobs=_logprobs(req.logprobs, req.top_logprobs),
        logit_bias=req.logit_bias,
    )
    messages = tuple(_to_engine_message(m, i) for i, m in enumerate(req.messages))
    tools, choice = function_tools(req.tools), tool_choice_of(req.tool_choice)
    constraint = constraint_of(req.response_format)
    if constraint is not None:
        check_constraint_with_tools(tools, choice, "response_format")
    effort = req.reasoning_effort if isinstance(req.reasoning_effort, str) else None
    reasoning = with_template_switch(effort_control(effort, "reasoning_effort"), req.chat_template_kwargs)
    return Generate(
        request_id=request_id, model=req.model, params=params, messages=messages, constraint=constraint,
        **tool_fields(tools, choice, req.parallel_tool_calls is not False), n=req.n or 1,
        fault=fault_of(req.user, allow_faults), reasoning=reasoning,
        template_kwargs=template_kwargs_of(req.chat_template_kwargs),
        prediction=text_of(req.prediction.content, "prediction.content") if req.prediction is not None else None,
    )


# -- legacy completions ---------------------------------------------------------------------------------


def completion_to_generate(req: CompletionRequest, request_id: str, allow_faults: bool = False) -> Generate:
    check_completion_supported(req)
    prompt = req.prompt if isinstance(req.prompt, str) else str(req.prompt[0])
    params = sampling_params(
        req.max_tokens or 16, req.temperature, req.top_p, stop=req.stop, seed=req.seed,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, logprobs=req.logprobs,
        logit_bias=req.logit_bias,
    )
    return Generate(request_id=request_id, model=req.model, params=params, prompt=prompt, n=req.n or 1,
                    fault=fault_of(req.user, allow_faults))
