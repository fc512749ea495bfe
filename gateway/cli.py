"""`mlx-gateway` command line: serve, models, watchdog, status, service, export-openapi."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from mlx_backend import __version__

OPENAPI_PATH = Path(__file__).resolve().parent.parent / "openapi" / "openapi.json"


def _serve(argv: Sequence[str]) -> int:
    from gateway.serve import run
    from gateway.settings import build_parser, load_settings

    parser = build_parser(argparse.ArgumentParser(prog="mlx-gateway serve", allow_abbrev=False,
                                                  description="Serve local MLX models over an OpenAI API."))
    try:
        settings = load_settings(parser.parse_args(list(argv)))
    except ValueError as exc:
        parser.error(str(exc))
    code = run(settings)
    # Everything is stopped and flushed by now. Leave without the interpreter's finalization: Granian's Rust
    # threads can still touch it then, and a panic there aborts the process (seen: SIGABRT instead of exit
    # code 3 after the engine's restart budget was spent), which would hide our exit code from launchd/systemd.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def openapi_document() -> bytes:
    """The OpenAPI document of the app as configured by default (no engine is started)."""
    from gateway import openapi
    from gateway.app import create_app
    from gateway.runtime import GatewayRuntime
    from gateway.settings import Settings
    from mlx_backend.client.fake import FakeEngine
    from mlx_backend.registry import ModelRegistry

    settings = Settings(hf_cache=False, demo_model=False)
    app = create_app(GatewayRuntime(settings, FakeEngine(), ModelRegistry((), None, False)))
    return openapi.render(app)


def _export_openapi(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlx-gateway export-openapi")
    parser.add_argument("--out", type=Path, default=OPENAPI_PATH, help="where to write (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the app")
    args = parser.parse_args(list(argv))
    document = openapi_document()
    if args.check:
        current = args.out.read_bytes() if args.out.exists() else b""
        if current != document:
            print(f"{args.out} is out of date: run 'mlx-gateway export-openapi'", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(document)
    print(f"wrote {args.out}")
    return 0


def _watchdog(argv: Sequence[str]) -> int:
    from gateway import watchdog

    return watchdog.main(list(argv))


def _status(argv: Sequence[str]) -> int:
    from gateway import watchdog

    return watchdog.main(["--status", *argv])


def _models(argv: Sequence[str]) -> int:
    from gateway.admin import cli as admin_cli

    return admin_cli.main(argv)


def _service(argv: Sequence[str]) -> int:
    from gateway import service

    return service.main(list(argv))


COMMANDS = {
    "serve": (_serve, "serve models over the OpenAI API"),
    "models": (_models, "list a running server's models; load, unload, pin or unpin one"),
    "watchdog": (_watchdog, "keep a server alive: check, restart, give up after the budget"),
    "status": (_status, "show the watchdog's state and the server's health"),
    "service": (_service, "install, uninstall or print the launchd/systemd service files"),
    "export-openapi": (_export_openapi, "write openapi/openapi.json from the app"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(f"mlx-gateway {__version__}\n\nusage: mlx-gateway COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<16}{text}")
        return 0 if args else 2
    if args[0] == "--version":
        print(__version__)
        return 0
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"mlx-gateway: unknown command {args[0]!r} (try --help)", file=sys.stderr)
        return 2
    return command[0](args[1:])


if __name__ == "__main__":
    sys.exit(main())
