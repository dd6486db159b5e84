"""The real identity provider (tests/oauth/idp, oidc-provider on Node), a movable clock, and the attacker's
tools: keys of our own, and tokens signed or forged by hand."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.warnings import InsecureKeyLengthWarning

IDP_DIR = Path(__file__).parent / "idp"
OIDC_PROVIDER_VERSION = "9.13.3"  # the pin in idp/package.json
LISTENING = re.compile(r"listening on (\S+)")
CLIENT_ID = "mcp-test"


class Clock:
    """Wall and monotonic time that move only when told: `time` and `monotonic` for JwtVerifier."""

    def __init__(self, start: float | None = None) -> None:
        self.now = time.time() if start is None else start
        self.mono = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += seconds
        self.mono += seconds


def node_or_skip(needed_by: str = "the real identity provider (oidc-provider, tests/oauth/idp)") -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip(f"node is not installed: {needed_by} needs it")
    return node


def ensure_installed(
    directory: Path = IDP_DIR, package: str = "oidc-provider", version: str = OIDC_PROVIDER_VERSION
) -> None:
    """Install `directory`'s pinned npm packages from its lock file when `package` at `version` is
    missing there (a fresh CI machine)."""
    installed = directory / "node_modules" / package / "package.json"
    if installed.exists() and json.loads(installed.read_text())["version"] == version:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise AssertionError(f"node is here but npm is not: cannot install {package} in {directory}")
    result = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"npm ci in {directory} failed:\n{result.stdout}\n{result.stderr}")


@dataclass
class IdP:
    """A running oidc-provider: its issuer, its client's secret, and the harness's admin endpoints."""

    issuer: str
    process: asyncio.subprocess.Process
    client_secret: str
    admin_token: str
    stderr: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        return re.sub(r"^(https?://[^/]+).*$", r"\1", self.issuer)

    async def token_response(self, *, resource: str | None, scope: str) -> tuple[int, dict[str, Any]]:
        form = {
            "grant_type": "client_credentials",
            "client_id": CLIENT_ID,
            "client_secret": self.client_secret,
        }
        form["scope"] = scope
        if resource is not None:
            form["resource"] = resource
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{self.issuer}/token", data=form) as response,
        ):
            return response.status, await response.json()

    async def token(self, *, resource: str, scope: str = "mcp:operator") -> str:
        """A real access token, from a plain POST to the token endpoint (client_credentials, RFC 8707)."""
        status, body = await self.token_response(resource=resource, scope=scope)
        assert status == 200, body
        assert body["token_type"] == "Bearer"
        return str(body["access_token"])

    async def _admin(self, method: str, path: str) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.origin + path, headers={"x-admin-token": self.admin_token}) as r,
        ):
            assert r.status == 200, await r.text()
            return await r.json()

    async def rotate(self, *, keep: bool) -> list[str]:
        """New signing keys at the provider; with `keep` the old ones stay published. Returns the kids."""
        return list((await self._admin("POST", "/_admin/rotate" + ("?keep=1" if keep else "")))["kids"])

    async def jwks_hits(self) -> int:
        """How many times anyone fetched the provider's JWKS."""
        return int((await self._admin("GET", "/_admin/stats"))["jwks_hits"])

    async def jwks(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session, session.get(f"{self.issuer}/jwks") as response:
            return dict(await response.json())


@asynccontextmanager
async def running_idp(*, path: str = "", alg: str = "RS256", ttl: int = 300) -> AsyncIterator[IdP]:
    """Start oidc-provider on 127.0.0.1 (a free port) and wait for its `listening on` line."""
    node = node_or_skip()
    await asyncio.to_thread(ensure_installed)
    client_secret, admin_token = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/tmp"),
        "IDP_CLIENT_SECRET": client_secret,
        "IDP_ADMIN_TOKEN": admin_token,
        "IDP_PATH": path,
        "IDP_ALG": alg,
        "IDP_TTL": str(ttl),
    }
    process = await asyncio.create_subprocess_exec(
        node,
        str(IDP_DIR / "idp.mjs"),
        cwd=IDP_DIR,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    lines: list[str] = []

    async def drain(stream: asyncio.StreamReader) -> None:
        while raw := await stream.readline():
            lines.append(raw.decode(errors="replace").rstrip("\n"))

    drains = [asyncio.create_task(drain(process.stderr))]
    try:
        async with asyncio.timeout(30):  # a bound for a broken install, not a measurement
            while True:
                raw = await process.stdout.readline()
                if not raw:
                    code = await process.wait()
                    await asyncio.gather(*drains)
                    raise AssertionError(
                        f"oidc-provider exited with {code} before listening:\n" + "\n".join(lines)
                    )
                if match := LISTENING.search(raw.decode()):
                    break
        drains.append(asyncio.create_task(drain(process.stdout)))
        yield IdP(match.group(1), process, client_secret, admin_token, lines)
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()
        for task in drains:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# The attacker's side: keys and tokens of our own.


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segments(token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(header))),
        json.loads(base64.urlsafe_b64decode(pad(payload))),
        signature,
    )


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
    """A JWS put together by hand (PyJWT would refuse to make the hostile ones)."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{signature}"


def hmac_signed(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    signing_input = unsigned(header, claims).rstrip(".")
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@dataclass
class Key:
    """A private key of ours and its public JWK."""

    private: Any
    alg: str
    kid: str

    @property
    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        public = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**public, "kid": self.kid, "use": "sig"}

    def sign(self, claims: dict[str, Any], **header: Any) -> str:
        """A token signed with this key; header values of None are left out."""
        headers = {k: v for k, v in {"kid": self.kid, "typ": "at+jwt", **header}.items() if v is not None}
        if "typ" not in headers:
            headers["typ"] = None  # PyJWT would add typ=JWT
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InsecureKeyLengthWarning)  # a weak key is the point of some tests
            return jwt.encode(claims, self.private, algorithm=self.alg, headers=headers)


def make_key(alg: str = "RS256", kid: str | None = None, *, bits: int = 2048) -> Key:
    if alg.startswith(("RS", "PS")):
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    elif alg == "ES384":
        private = ec.generate_private_key(ec.SECP384R1())
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(alg)
    return Key(private, alg, kid or f"test-{secrets.token_hex(4)}")


def public_pem(jwk: dict[str, Any]) -> bytes:
    """The PEM of a published RSA key: what an attacker would use as an HMAC secret."""
    public = jwt.PyJWK(jwk).key
    return bytes(
        public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
