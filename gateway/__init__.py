"""The HTTP side of mlx-gateway: a folder per API, the serving path, health, errors, metrics, CLI. Never imports MLX."""
