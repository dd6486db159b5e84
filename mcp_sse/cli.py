"""Command line: `serve` (the default), `check-config`.

python server_secure.py [--host H] [--port P] [--config servers.json] [--env-file .env]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from aiohttp import web

from . import __version__
from .app import build_backends, create_app
from .ops import sd_notify
from .settings import Secret, Settings, SettingsError
from .upstream.config import ConfigError

__all__ = ["main"]

log = logging.getLogger("mcp_sse")
COMMANDS = ("serve", "check-config")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="server_secure.py",
        description="Serve MCP servers over SSE and Streamable HTTP, securely.",
        epilog="Commands: serve (default), check-config. Settings also come from the environment and .env.",
    )
    parser.add_argument("command", nargs="?", choices=COMMANDS, default="serve", help=argparse.SUPPRESS)
    parser.add_argument("--host", help="address to bind (HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind, 0 for any free one (PORT, default 3001)")
    parser.add_argument(
        "--config", type=Path, help="servers file in Claude Desktop format (MCP_SERVERS_FILE)"
    )
    parser.add_argument("--env-file", type=Path, help="settings file (default: ./.env when it exists)")
    parser.add_argument(
        "--check-config", action="store_true", help="validate settings and servers file, then exit"
    )
    parser.add_argument("--version", action="version", version=f"mcp-sse {__version__}")
    return parser


def _env_file(arg: Path | None) -> Path | None:
    if arg is not None:
        return arg
    default = Path(".env")
    return default if default.is_file() else None


def load_settings(args: argparse.Namespace) -> Settings:
    return Settings.load(
        {"host": args.host, "port": args.port, "servers_file": args.config}, env_file=_env_file(args.env_file)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        print(f"mcp-sse: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "check-config" or args.check_config:
        return check_config(settings, _env_file(args.env_file))
    if settings.auth_token is None or not settings.auth_token.reveal():
        if not settings.loopback:
            print(
                f"mcp-sse: refusing to listen on {settings.host} without AUTH_TOKEN. "
                "Run `python setup_secure.py` or set AUTH_TOKEN.",
                file=sys.stderr,
            )
            return 2
        token = secrets.token_urlsafe(32)
        settings = Settings(**{**settings.__dict__, "auth_token": Secret(token), "token_generated": True})
    try:
        asyncio.run(serve(settings, _env_file(args.env_file)))
    except (ConfigError, OSError) as exc:
        print(f"mcp-sse: {exc}", file=sys.stderr)
        return 1
    return 0


def check_config(settings: Settings, env_file: Path | None) -> int:
    try:
        backends = build_backends(settings, os.environ, env_file)
    except ConfigError as exc:
        print(f"mcp-sse: {exc}", file=sys.stderr)
        return 1
    print(f"ok: {len(backends)} backend(s): {', '.join(backends)}")
    return 0


def _print_generated_token(settings: Settings, url: str) -> None:
    assert settings.auth_token is not None
    token = settings.auth_token.reveal()
    desktop = {
        "mcpServers": {
            "mcp-sse": {
                "command": "npx",
                "args": ["mcp-remote", f"{url}/sse", "--header", f"Authorization: Bearer {token}"],
            }
        }
    }
    # Printed once to the terminal, never logged: it is the only copy of a secret that lives for this run.
    print(
        "\n    No AUTH_TOKEN is set, so one was generated for this run (loopback only):\n\n"
        f"        {url}/mcp   (Streamable HTTP)\n"
        f"        {url}/sse   (legacy SSE)\n"
        f"        Authorization: Bearer {token}\n\n"
        "    Claude Desktop through mcp-remote:\n"
        f"        {json.dumps(desktop)}\n\n"
        "    Run `python setup_secure.py` to keep a token across restarts.\n",
        file=sys.stderr,
        flush=True,
    )


async def serve(settings: Settings, env_file: Path | None = None) -> None:
    app = create_app(settings, env_file=env_file)
    # Cancelling a handler when its client goes away is how an SSE stream learns of it at once;
    # work that must outlive a request runs in its own task (transport.common.spawn).
    runner = web.AppRunner(
        app, shutdown_timeout=settings.shutdown_grace, access_log=None, handler_cancellation=True
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, reuse_address=True)
    await site.start()
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}"
    log.info("mcp-sse %s listening on %s", __version__, url)
    if settings.token_generated:
        _print_generated_token(settings, url)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sd_notify.notify("READY=1", f"STATUS=listening on {url}")
    watchdog = None
    if (interval := sd_notify.watchdog_interval()) is not None:
        watchdog = asyncio.create_task(sd_notify.watchdog_loop(interval))
    try:
        await stop.wait()
    finally:
        log.info("shutting down (grace %.0f s)", settings.shutdown_grace)
        sd_notify.notify("STOPPING=1")
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        await runner.cleanup()
