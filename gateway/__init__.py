"""The HTTP side of mlx-gateway: OpenAI-compatible routes, errors, metrics, lifecycle, CLI. Never imports MLX."""
