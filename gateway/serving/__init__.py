"""The one path every generation route goes through (`generation.serve`): admission and drain, the request
owner (`Exchange`), the shared conversion pieces (tools, sampling, structured output, reasoning), a reply of
blocks streamed or folded, SSE framing. No module here imports an API folder (only `GatewayRuntime`, which
holds the model catalog, for `serve`); each API plugs in with an adapter."""
