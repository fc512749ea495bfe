"""The MLX engine: model registry and cache, loader, batching loop, and the engine process.

Only `worker`, `batcher`, `cache`, `loader`, `sampling`, `solo` and `constrained` import MLX; they run in the
engine process. The rest (`types`, `errors`, `registry`, `ipc`, `engine`, `process`, `fake`, `grammar`) is
safe to import from the HTTP gateway, which must never touch MLX.
"""

__version__ = "0.1.0"
