"""Runs in the gateway process and never imports MLX: the engine client, its supervision, process spawning."""
