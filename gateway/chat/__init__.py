"""OpenAI chat completions and legacy completions: wire types, conversion to the engine's Generate,
rendering, routes."""
