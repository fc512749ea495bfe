"""Thin HTTP handlers: decode -> convert -> engine -> wrap."""
