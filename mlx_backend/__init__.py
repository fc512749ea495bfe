"""The MLX backend, split by the process each part runs in: `client/` in the gateway process (never imports MLX),
`engine/` in the engine process (MLX), and the modules at this level, which both import and which import no MLX:
the IPC contract (`contract`), its framing (`ipc`), `errors`, `registry`, `grammar`, `keep_alive`, `timeline`,
`cpu_blas`
(tests/contract)."""

__version__ = "0.1.0"
