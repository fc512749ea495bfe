"""LangChain's ChatOpenAI against a real server: invoke, stream, and usage metadata."""

from __future__ import annotations

from langchain_openai import ChatOpenAI

from tests.support.server import ServerProcess


def test_chat_openai_invoke_and_stream(shared_server: ServerProcess) -> None:
    llm = ChatOpenAI(model="tiny", base_url=shared_server.base_url + "/v1", api_key="unused",  # type: ignore[arg-type]
                     max_tokens=12, temperature=0, max_retries=0, stream_usage=True)
    reply = llm.invoke([("system", "Be brief."), ("human", "Hello")])
    assert isinstance(reply.content, str)
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] <= 12
    streamed = list(llm.stream("Hello"))
    assert "".join(str(c.content) for c in streamed) == llm.invoke("Hello").content
    assert any(c.usage_metadata for c in streamed)
