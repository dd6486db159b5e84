"""The secure profile as an operator drives it: --check, generate-key, SIGHUP, native TLS."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import signal
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from cryptography import x509
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import launch, next_event, until_eof

REPO = Path(__file__).resolve().parents[2]
STRONG = "Zq3-v9LmT2xW8pR4kN7bY1cH5dF0gJ6sA_eU"  # 36 varied characters


def base_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "PYTHONPATH", "VIRTUAL_ENV")}
    return {**keep, "AUDIT_LOG": str(tmp_path / "audit.log"), **extra}


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "server_secure.py", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_check_passes_a_sound_setup_and_fails_a_weak_one(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(f"AUTH_TOKEN={STRONG}\nSESSION_SECRET={Fernet.generate_key().decode()}\n")
    env_file.chmod(0o600)
    good = run(["--check", "--env-file", str(env_file)], base_env(tmp_path))
    assert good.returncode == 0, good.stdout + good.stderr
    env_file.chmod(0o644)
    loose = run(
        ["--check", "--env-file", str(env_file), "--host", "0.0.0.0"], base_env(tmp_path, ALLOWED_IPS="*")
    )
    assert loose.returncode == 1
    assert "readable by others" in loose.stdout
    assert "any address" in loose.stdout and "no TLS" in loose.stdout
    weak = run(["check"], base_env(tmp_path, AUTH_TOKEN="password123"))
    assert weak.returncode == 1 and "AUTH_TOKEN is weak" in weak.stdout
    assert "password123" not in weak.stdout + weak.stderr  # the audit names problems, never secrets


def test_generate_key_prints_the_secret_once_and_stores_only_its_digest(tmp_path: Path) -> None:
    result = run(["generate-key", "--name", "alice", "--role", "viewer"], base_env(tmp_path))
    assert result.returncode == 0
    secret = re.search(r"^\s+(mcp_\S+)$", result.stdout, re.M)
    entry = json.loads(result.stdout.strip().splitlines()[-1])
    assert secret is not None and result.stdout.count(secret.group(1)) == 1
    assert entry["role"] == "viewer" and entry["name"] == "alice"
    import hashlib

    assert entry["sha256"] == hashlib.sha256(secret.group(1).encode()).hexdigest()
    bad = run(["generate-key", "--name", "x", "--role", "root"], base_env(tmp_path))
    assert bad.returncode == 2 and "role must be one of" in bad.stderr


@asynccontextmanager
async def server(env: dict[str, str], *args: str) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    argv = [sys.executable, "-m", "mcp_sse", "--host", "127.0.0.1", "--port", "0", *args]
    launched = await launch(argv, env=env, cwd=REPO)
    try:
        yield launched.process, launched.url
    finally:
        await launched.stop()


async def test_sighup_revokes_a_key_and_keeps_other_connections(tmp_path: Path) -> None:
    from mcp_sse.security.keys import generate_key

    leaving_secret, leaving = generate_key("leaving", "operator")
    staying_secret, staying = generate_key("staying", "operator")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [leaving, staying]}))
    env = base_env(tmp_path, KEYS_FILE=str(keys), SESSION_SECRET=Fernet.generate_key().decode())
    async with server(env) as (process, url), aiohttp.ClientSession() as http:
        gone = await http.get(url + "/sse", headers={"Authorization": f"Bearer {leaving_secret}"})
        kept = await http.get(url + "/sse", headers={"Authorization": f"Bearer {staying_secret}"})
        assert (await next_event(gone)).event == "endpoint" and (await next_event(kept)).event == "endpoint"
        keys.write_text(json.dumps({"keys": [staying]}))
        process.send_signal(signal.SIGHUP)
        await until_eof(gone, timeout=5)
        assert not kept.content.at_eof()
        ping = await http.get(url + "/health", headers={"Authorization": f"Bearer {staying_secret}"})
        assert ping.status == 200
        refused = await http.get(url + "/health", headers={"Authorization": f"Bearer {leaving_secret}"})
        assert refused.status == 401
        kept.close()
        gone.close()
    audit = (tmp_path / "audit.log").read_text()
    assert '"event": "keys.reload"' in audit and leaving["id"] in audit
    assert leaving_secret not in audit and staying_secret not in audit


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


async def test_native_tls_with_hsts_and_secure_cookies(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    env = base_env(
        tmp_path,
        AUTH_TOKEN=STRONG,
        SESSION_SECRET=Fernet.generate_key().decode(),
        TLS_CERT=str(cert),
        TLS_KEY=str(key),
    )
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    async with server(env) as (_, url), aiohttp.ClientSession() as http:
        assert url.startswith("https://")
        response = await http.get(url + "/health", headers={"Authorization": f"Bearer {STRONG}"}, ssl=context)
        assert response.status == 200
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
        login = await http.post(url + "/auth/login", json={"token": STRONG}, ssl=context)
        cookie = login.headers["Set-Cookie"]
        assert cookie.startswith("__Host-mcp-sse=") and "Secure" in cookie
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname, old.verify_mode = False, ssl.CERT_NONE
        with warnings.catch_warnings():  # setting an old version is itself deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(aiohttp.ClientError):
            await http.get(url + "/health", ssl=old)  # TLS 1.1 and older are refused
        # A request the HTTP parser refuses (bare LF line ends) is answered by the gateway, not the
        # app: it still gets HSTS, and quotes none of its bytes.
        host, port = url.removeprefix("https://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
        writer.write(f"GET /health HTTP/1.1\nHost: x\nAuthorization: Bearer {STRONG}\n\n".encode())
        answer = (await asyncio.wait_for(reader.read(), 10)).decode()
        writer.close()
        assert answer.split(" ", 2)[1] == "400", answer
        assert "Strict-Transport-Security: max-age=" in answer and STRONG not in answer
