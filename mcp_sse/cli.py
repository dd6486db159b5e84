"""Command line: `serve` (the default), `check`, `check-config`, `generate-key`, `selftest`.

python server_secure.py [--host H] [--port P] [--config servers.json] [--env-file .env]
python server_secure.py selftest https://host:port [--token T] [--json] [--rate-limit]
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
import ssl
import stat
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn
from urllib.parse import urlsplit

from aiohttp import web
from cryptography.fernet import Fernet

from . import __version__
from .app import build_backends, create_app, reload_keys, reload_servers, revive_backends
from .cluster import workers
from .ops import sd_notify, selftest
from .ops.connections import BACKLOG, AppRunner, fit_open_file_limit, quiet_accept_errors
from .security.check import Finding, audit_settings
from .security.ipfilter import allows_any, connection_gate
from .security.keys import KeysFileError, generate_key
from .settings import Secret, Settings, SettingsError, attach_option_values, is_loopback
from .state import AUDIT, BACKENDS
from .upstream.backend import Backend, StdioBackend
from .upstream.breaker import unwrap
from .upstream.config import ConfigError, launch_problem
from .upstream.isolation import PerSessionBackend

__all__ = ["main"]

log = logging.getLogger("mcp_sse")
COMMANDS = ("serve", "check", "check-config", "generate-key", "selftest")


class _Parser(argparse.ArgumentParser):
    """Its usage errors never quote a selftest token: `--tokn SECRET` would be "unrecognized"."""

    hidden: tuple[str, ...] = ()

    def error(self, message: str) -> NoReturn:
        for secret in sorted(self.hidden, key=len, reverse=True):
            message = message.replace(secret, "<token>")
        super().error(message)


def _token_like(argv: Sequence[str]) -> tuple[str, ...]:
    """What follows an option that could be (or be a typo of) --token, and its `=value` forms."""
    found = []
    for index, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name.startswith("--t") and name != "--timeout":
            if eq:
                found.append(value)
            elif index + 1 < len(argv):
                found.append(argv[index + 1])
    return tuple(v for v in found if v)


def _parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="server_secure.py",
        description="Serve MCP servers over SSE and Streamable HTTP, securely.",
        epilog="Commands: serve (default), check, check-config, generate-key, "
        "selftest URL (probe a running deployment's security from outside). "
        "Settings also come from the environment and .env (see README).",
    )
    parser.hidden = _token_like(argv)
    parser.add_argument("command", nargs="?", choices=COMMANDS, default="serve", help=argparse.SUPPRESS)
    parser.add_argument("url", nargs="?", help=argparse.SUPPRESS)  # selftest's deployment
    parser.add_argument("--host", help="address to bind (HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind, 0 for any free one (PORT, default 3001)")
    parser.add_argument(
        "--config", type=Path, help="servers file in Claude Desktop format (MCP_SERVERS_FILE)"
    )
    parser.add_argument("--env-file", type=Path, help="settings file (default: ./.env when it exists)")
    parser.add_argument(
        "--check-config", action="store_true", help="validate settings and servers file, then exit"
    )
    parser.add_argument(
        "--check", action="store_true", help="audit the settings for production; exit 1 if critical"
    )
    parser.add_argument("--name", help="generate-key: a name for the new key")
    parser.add_argument("--role", default="operator", help="generate-key: admin, operator or viewer")
    parser.add_argument(
        "--token", help="selftest: the key to test with; - reads it from stdin (default: $AUTH_TOKEN)"
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="selftest: seconds per request (10)")
    parser.add_argument("--json", action="store_true", help="selftest: print the results as JSON")
    parser.add_argument(
        "--rate-limit", action="store_true", help="selftest: spend the budget until a 429 (slow, noisy)"
    )
    parser.add_argument("--ca-file", type=Path, help="selftest: trust only this CA (a private CA)")
    parser.add_argument(
        "--insecure", action="store_true", help="selftest: go on past an untrusted certificate (still a FAIL)"
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
    argv = sys.argv[1:] if argv is None else argv
    parser = _parser(argv)
    args = parser.parse_intermixed_args(
        attach_option_values(parser, argv, "--token")
    )  # `selftest --token T URL` as well as `selftest URL --token T`
    if args.url is not None and args.command != "selftest":
        parser.error(f"unexpected argument {args.url!r}: only selftest takes a URL")
    if args.command == "selftest":  # a client of some deployment: this machine's settings play no part
        return selftest.command(
            args.url,
            token=args.token,
            timeout=args.timeout,
            rate_limit=args.rate_limit,
            ca_file=args.ca_file,
            insecure=args.insecure,
            as_json=args.json,
        )
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        print(f"mcp-sse: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "generate-key":
        return generate_key_command(args.name, args.role)
    if args.command == "check-config" or args.check_config:
        return check_config(settings, _env_file(args.env_file))
    if args.command == "check" or args.check:
        return check_command(settings, _env_file(args.env_file))
    try:
        settings = fail_closed(settings)
        loop_factory = event_loop_factory(settings.event_loop, tls=settings.tls)
    except SettingsError as exc:
        print(f"mcp-sse: {exc}", file=sys.stderr)
        return 2
    if settings.workers > 1 and not workers.is_worker():  # the supervisor of WORKERS=N (cluster/workers.py)

        def announce(url: str) -> None:
            if settings.token_generated:
                _print_generated_token(settings, url)

        return workers.supervise(settings, argv, announce)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings, _env_file(args.env_file)))
    except SettingsError as exc:  # found while building the app (the OAuth state directory)
        print(f"mcp-sse: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, OSError) as exc:
        print(f"mcp-sse: {exc}", file=sys.stderr)
        return 1
    return 0


def event_loop_factory(choice: str, *, tls: bool = False) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when asked for or (auto) installed: 3-16% less CPU per call (bench/README.md).

    Not with native TLS: each connection is screened before its handshake, which needs the
    connection to stay unread until the handshake starts, and uvloop starts reading a connection
    as soon as its protocol has it, whatever the protocol asked (uvloop 0.23)."""
    if choice == "asyncio" or (choice == "auto" and tls):
        return None
    if tls:
        raise SettingsError("EVENT_LOOP=uvloop cannot serve native TLS (TLS_CERT): use auto or asyncio")
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SettingsError(
                "EVENT_LOOP=uvloop but uvloop is not installed: pip install 'mcp-sse[fast]'"
            ) from None
        return None
    return uvloop.new_event_loop


def fail_closed(settings: Settings) -> Settings:
    """Refuse a network bind without secrets; on loopback, make this run's secrets instead."""
    has_token = settings.auth_token is not None and bool(settings.auth_token.reveal())
    if not settings.loopback:
        if not has_token and settings.keys_file is None:
            raise SettingsError(
                f"refusing to listen on {settings.host} without AUTH_TOKEN or KEYS_FILE. "
                "Run `python setup_secure.py` or set AUTH_TOKEN."
            )
        if settings.session_secret is None:
            raise SettingsError(
                f"refusing to listen on {settings.host} without SESSION_SECRET (it signs cookie logins). "
                "Run `python setup_secure.py` or set SESSION_SECRET."
            )
        if allows_any(settings.allowed_ips):
            log.warning("ALLOWED_IPS lets any address in while bound to %s", settings.host)
    if not has_token and settings.keys_file is None:
        settings = settings.replace(auth_token=Secret(secrets.token_urlsafe(32)), token_generated=True)
    if settings.session_secret is None:
        settings = settings.replace(session_secret=Secret(Fernet.generate_key().decode()))
    return settings


def generate_key_command(name: str | None, role: str) -> int:
    if not name:
        print("mcp-sse: generate-key needs --name", file=sys.stderr)
        return 2
    try:
        secret, entry = generate_key(name, role)
    except KeysFileError as exc:
        print(f"mcp-sse: {exc}", file=sys.stderr)
        return 2
    print(f"Secret for {name!r} (shown once; only its SHA-256 is stored):\n\n    {secret}\n")
    print('Add this entry to the "keys" list of your KEYS_FILE, then reload (systemctl reload mcp-sse):\n')
    print("    " + json.dumps(entry))
    return 0


def check_command(settings: Settings, env_file: Path | None) -> int:
    findings = audit_settings(settings, env_file)
    oauth = _oauth_findings(settings)
    if any(f.level != "OK" for f in oauth):  # audit_settings' "no problems found" no longer holds
        findings = [f for f in findings if f.level != "OK"]
    findings = findings + oauth
    try:
        problems = launch_problems(build_backends(settings, os.environ, env_file))
    except ConfigError as exc:
        problems = [str(exc)]
    if problems:  # a backend that cannot start is as critical as a setting: the server would not serve it
        findings = [f for f in findings if f.level != "OK"] + [Finding("CRITICAL", p) for p in problems]
    for finding in findings:
        print(f"{finding.level}: {finding.message}")
    return 1 if any(f.level == "CRITICAL" for f in findings) else 0


def _oauth_findings(settings: Settings) -> list[Finding]:
    """--check's OAuth part: PUBLIC_URL's scheme, and the built-in server's STATE_DIR.

    With OAuth on, a non-loopback bind without PUBLIC_URL is refused by Settings already."""
    if not settings.oauth:
        return []
    findings: list[Finding] = []
    origin = urlsplit(settings.public_origin)
    if origin.scheme == "http" and not is_loopback(origin.hostname or ""):
        findings.append(
            Finding(
                "CRITICAL",
                f"PUBLIC_URL={settings.public_origin} is plain http with OAuth on: access tokens, "
                "authorization codes and sign-in keys would cross the network in clear text; use https://",
            )
        )
    elif origin.scheme == "http":
        findings.append(Finding("OK", f"PUBLIC_URL {settings.public_origin} is plain http on loopback only"))
    if settings.oauth_server:
        state = settings.state_dir
        existing = state
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent  # the server makes STATE_DIR (and its parents) on start
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            findings.append(
                Finding("WARNING", f"STATE_DIR={state} is not writable by this process (uid {os.getuid()})")
            )
        if state.is_dir():
            loose = sorted(
                str(p)
                for p in state.iterdir()
                if p.is_file() and p.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO)
            )
            if loose:
                findings.append(
                    Finding(
                        "WARNING",
                        f"STATE_DIR={state} has files readable by others: {', '.join(loose)} (chmod 600)",
                    )
                )
    return findings


def launch_problems(backends: dict[str, Backend]) -> list[str]:
    """Why children would not start, each checked with the environment and cwd it will get."""
    problems = []
    for guarded in backends.values():
        backend = unwrap(guarded)  # its kind, not its circuit breaker's
        if isinstance(backend, StdioBackend):
            problem = launch_problem(backend.spec, backend.env)
        elif isinstance(backend, PerSessionBackend) and backend.spec.url is None:
            # What each session's child gets (StdioBackend's merge), less the headers it maps.
            problem = launch_problem(backend.spec, {**backend.base_env, **backend.spec.env})
        else:
            continue  # in-process tools: build_backends has imported them already
        if problem is not None:
            problems.append(problem)
    return problems


def check_config(settings: Settings, env_file: Path | None) -> int:
    try:
        backends = build_backends(settings, os.environ, env_file)
    except ConfigError as exc:
        print(f"mcp-sse: {exc}", file=sys.stderr)
        return 1
    if problems := launch_problems(backends):
        for problem in problems:
            print(f"mcp-sse: {problem}", file=sys.stderr)
        return 1
    print(f"ok: {len(backends)} backend(s): {', '.join(backends)}")
    return 0


def _print_generated_token(settings: Settings, url: str) -> None:
    assert settings.auth_token is not None
    desktop = {
        "mcpServers": {
            "mcp-sse": {
                "command": "npx",
                "args": ["mcp-remote", f"{url}/sse", "--header", "Authorization: Bearer ${AUTH_TOKEN}"],
                "env": {"AUTH_TOKEN": "<the AUTH_TOKEN above>"},
            }
        }
    }
    # The only copy of a secret that lives for this run: printed once, on its own labelled line,
    # to the terminal and never to the log; everything else refers to it by name.
    print(
        "\n    No AUTH_TOKEN is set, so one was generated for this run (loopback only), shown once:\n\n"
        f"        export AUTH_TOKEN={settings.auth_token.reveal()}\n\n"
        f'    Then: curl -H "Authorization: Bearer $AUTH_TOKEN" {url}/health\n'
        f"        {url}/mcp   (Streamable HTTP)\n"
        f"        {url}/sse   (legacy SSE)\n\n"
        "    Claude Desktop through mcp-remote:\n"
        f"        {json.dumps(desktop)}\n\n"
        "    Run `python setup_secure.py` to keep a token across restarts.\n",
        file=sys.stderr,
        flush=True,
    )


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    return context


async def serve(settings: Settings, env_file: Path | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Before anything starts: a stop signal during start-up must still shut down gracefully.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tls = _tls_context(settings)
    app = create_app(settings, env_file=env_file)

    def reload() -> None:
        sd_notify.notify("RELOADING=1", f"MONOTONIC_USEC={sd_notify.monotonic_usec()}")
        reload_keys(app)
        revive_backends(app)  # failed backends start again; READY=1 does not wait for them
        reload_servers(app)  # nor for the servers file's changes, which it starts applying
        sd_notify.notify("READY=1")

    loop.add_signal_handler(signal.SIGHUP, reload)
    # Cancelling a handler when its client goes away is how an SSE stream learns of it at once;
    # work that must outlive a request runs in its own task (transport.common.spawn).
    quiet_accept_errors(loop)
    children = sum(backend.max_children for backend in app[BACKENDS].values())
    runner = AppRunner(
        app,
        max_connections=fit_open_file_limit(settings.connection_limit, children),
        gate=connection_gate(settings.allowed_ips, settings.trusted_proxies),
        tls=tls,
        handshake_timeout=settings.header_timeout,
        audit=app[AUDIT],
        shutdown_timeout=settings.shutdown_grace,
        access_log=None,
        handler_cancellation=True,
        keepalive_timeout=settings.header_timeout,  # also bounds a connection that never finishes its headers
        lingering_time=2.0,  # after an early answer (413, 408), read what is left of the body only this long
    )
    watchdog = None
    try:
        await runner.setup()
        site = web.TCPSite(
            runner,
            settings.host,
            settings.port,
            reuse_address=True,
            reuse_port=True if workers.is_worker() else None,  # WORKERS=N: all on one port
            backlog=BACKLOG,
            # No ssl_context: with TLS_CERT the runner screens each connection, then starts TLS.
        )
        await site.start()
        host, port = runner.addresses[0][:2]
        shown = f"[{host}]" if ":" in host else host
        url = f"{'https' if tls else 'http'}://{shown}:{port}"
        flavour = type(loop).__module__.split(".")[0]  # "uvloop" or "asyncio"
        log.info("mcp-sse %s listening on %s (event loop: %s)", __version__, url, flavour)
        if settings.token_generated:
            _print_generated_token(settings, url)
        sd_notify.notify("READY=1", f"STATUS=listening on {url}")
        if (interval := sd_notify.watchdog_interval()) is not None:
            watchdog = asyncio.create_task(sd_notify.watchdog_loop(interval))
        await stop.wait()
    finally:
        log.info("shutting down (grace %.0f s)", settings.shutdown_grace)
        sd_notify.notify("STOPPING=1")
        if watchdog is not None:
            watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watchdog
        await runner.cleanup()
