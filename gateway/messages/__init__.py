"""Anthropic's Messages API: wire types, conversion, routes (errors in Anthropic's shape)."""
