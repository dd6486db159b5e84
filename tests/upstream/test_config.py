"""The servers file: Claude Desktop's format, ${VAR} expansion, errors that name the key and the file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mcp_sse.upstream.config import ConfigError, ServerSpec, load_servers

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, document: Any, name: str = "servers.json") -> Path:
    path = tmp_path / name
    path.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    return path


def servers(**entries: Any) -> dict[str, Any]:
    return {"mcpServers": entries}


def error_of(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_servers(path, {} if environ is None else environ)
    message = str(info.value)
    assert str(path) in message, "every config error names the file"
    return message


# -- the format --------------------------------------------------------------------------------


def test_claude_desktop_file_accepted_unchanged(tmp_path: Path) -> None:
    # Verbatim shape of a claude_desktop_config.json, including a Windows-style path and an empty env.
    document = {
        "mcpServers": {
            "filesystem": {
                "command": "npx",
                "args": [
                    "-y",
                    "@modelcontextprotocol/server-filesystem",
                    "/Users/me/Desktop",
                    "C:\\Users\\me",
                ],
            },
            "github": {
                "command": "docker",
                "args": ["run", "-i", "--rm", "-e", "GITHUB_PERSONAL_ACCESS_TOKEN", "ghcr.io/github/server"],
                "env": {"GITHUB_PERSONAL_ACCESS_TOKEN": "ghp_literal"},
            },
            "time": {"command": "uvx", "args": ["mcp-server-time"], "env": {}, "cwd": "/srv/time"},
            "bare": {"command": "my-server"},
        }
    }
    specs = load_servers(write(tmp_path, document), {})
    assert specs == [
        ServerSpec(
            name="filesystem",
            command="npx",
            args=("-y", "@modelcontextprotocol/server-filesystem", "/Users/me/Desktop", "C:\\Users\\me"),
        ),
        ServerSpec(
            name="github",
            command="docker",
            args=("run", "-i", "--rm", "-e", "GITHUB_PERSONAL_ACCESS_TOKEN", "ghcr.io/github/server"),
            env={"GITHUB_PERSONAL_ACCESS_TOKEN": "ghp_literal"},
        ),
        ServerSpec(name="time", command="uvx", args=("mcp-server-time",), env={}, cwd="/srv/time"),
        ServerSpec(name="bare", command="my-server"),
    ]
    assert [s.timeout for s in specs] == [60.0] * 4


def test_timeout_key(tmp_path: Path) -> None:
    specs = load_servers(write(tmp_path, servers(a={"command": "x", "timeout": 2}, b={"command": "y"})), {})
    assert [s.timeout for s in specs] == [2.0, 60.0]


@pytest.mark.parametrize("timeout", [0, -1, "5", True, None, [5]])
def test_bad_timeout(tmp_path: Path, timeout: Any) -> None:
    assert "mcpServers.a.timeout" in error_of(
        write(tmp_path, servers(a={"command": "x", "timeout": timeout}))
    )


def test_reads_utf8_and_names_with_dots_dashes_underscores(tmp_path: Path) -> None:
    path = write(tmp_path, servers(**{"my.server-1_x": {"command": "x", "args": ["héllo ✓"]}}))
    (spec,) = load_servers(path, {})
    assert spec.name == "my.server-1_x"
    assert spec.args == ("héllo ✓",)


# -- ${VAR} expansion --------------------------------------------------------------------------


def test_expansion_in_command_args_env_cwd(tmp_path: Path) -> None:
    entry = {
        "command": "${BIN}/server",
        "args": ["--token=${TOKEN}", "${MISSING_ARG:-fallback}", "$NOT_EXPANDED", "plain"],
        "env": {"API_KEY": "${TOKEN}", "TZ": "${TZ_UNSET:-UTC}", "EMPTY": "${NOPE:-}", "BOTH": "${A}-${B}"},
        "cwd": "${HOME_DIR:-/tmp}/work",
    }
    environ = {"BIN": "/opt/bin", "TOKEN": "s3cret", "A": "1", "B": "2"}
    (spec,) = load_servers(write(tmp_path, servers(s=entry)), environ)
    assert spec.command == "/opt/bin/server"
    assert spec.args == ("--token=s3cret", "fallback", "$NOT_EXPANDED", "plain")
    assert spec.env == {"API_KEY": "s3cret", "TZ": "UTC", "EMPTY": "", "BOTH": "1-2"}
    assert spec.cwd == "/tmp/work"


def test_set_variable_wins_over_default_even_when_empty(tmp_path: Path) -> None:
    (spec,) = load_servers(write(tmp_path, servers(s={"command": "x", "args": ["${V:-d}"]})), {"V": ""})
    assert spec.args == ("",)


def test_expansion_is_single_pass(tmp_path: Path) -> None:
    # A value from the environment is never expanded again: it cannot pull in other variables.
    path = write(tmp_path, servers(s={"command": "x", "env": {"K": "${OUTER}"}}))
    (spec,) = load_servers(path, {"OUTER": "${SECRET}", "SECRET": "leaked"})
    assert spec.env == {"K": "${SECRET}"}


def test_default_environment_is_os_environ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MCP_SSE_TEST_VAR", "from-os")
    (spec,) = load_servers(write(tmp_path, servers(s={"command": "${MCP_SSE_TEST_VAR}"})))
    assert spec.command == "from-os"


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"command": "${UNSET_CMD}"}, "mcpServers.s.command"),
        ({"command": "x", "args": ["ok", "${UNSET_ARG}"]}, "mcpServers.s.args[1]"),
        ({"command": "x", "env": {"KEY": "pre-${UNSET_ENV}"}}, "mcpServers.s.env.KEY"),
        ({"command": "x", "cwd": "${UNSET_CWD}"}, "mcpServers.s.cwd"),
    ],
)
def test_unset_variable_is_an_error_naming_it(tmp_path: Path, entry: dict[str, Any], where: str) -> None:
    message = error_of(write(tmp_path, servers(s=entry)), {"OTHER": "1"})
    variable = next(v for v in ("UNSET_CMD", "UNSET_ARG", "UNSET_ENV", "UNSET_CWD") if v in json.dumps(entry))
    assert f"${{{variable}}}" in message
    assert where in message


# -- errors ------------------------------------------------------------------------------------


def test_unknown_server_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, servers(s={"command": "x", "argz": ["typo"]}))
    message = error_of(path)
    assert "'argz'" in message
    assert "mcpServers.s" in message


def test_other_top_level_keys_of_a_desktop_config_are_ignored_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, {"mcpServers": {"s": {"command": "x"}}, "globalShortcut": "", "mcpServer": {}})
    assert [s.name for s in load_servers(path)] == ["s"]
    assert "'mcpServer'" in caplog.text and str(path) in caplog.text


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "servers.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"mcpServers": {"s": {"command": "x"}}}).encode())
    assert [s.name for s in load_servers(path)] == ["s"]


@pytest.mark.parametrize("text", ["", "{", "{'mcpServers': {}}", '{"mcpServers": {},}'])
def test_bad_json(tmp_path: Path, text: str) -> None:
    assert "not valid JSON" in error_of(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    message = error_of(tmp_path / "nope.json")
    assert "cannot read" in message


@pytest.mark.parametrize(
    "document",
    [{}, [], '"x"', "null", {"servers": {}}, {"mcpServers": []}, {"mcpServers": None}, {"mcpServers": "x"}],
)
def test_missing_mcp_servers(tmp_path: Path, document: Any) -> None:
    assert "mcpServers" in error_of(write(tmp_path, document))


def test_empty_mcp_servers(tmp_path: Path) -> None:
    assert "empty" in error_of(write(tmp_path, {"mcpServers": {}}))


@pytest.mark.parametrize(
    ("entry", "where"),
    [
        ({"command": "x", "args": ["ok", 1]}, "mcpServers.s.args[1]"),
        ({"command": "x", "args": [None]}, "mcpServers.s.args[0]"),
        ({"command": "x", "args": [["nested"]]}, "mcpServers.s.args[0]"),
        ({"command": "x", "args": "--flag"}, "mcpServers.s.args"),
        ({"command": "x", "args": {"a": "b"}}, "mcpServers.s.args"),
        ({"command": ["x"]}, "mcpServers.s.command"),
        ({"command": 1}, "mcpServers.s.command"),
        ({"command": "x", "env": {"K": 1}}, "mcpServers.s.env.K"),
        ({"command": "x", "env": {"K": None}}, "mcpServers.s.env.K"),
        ({"command": "x", "env": ["K=v"]}, "mcpServers.s.env"),
        ({"command": "x", "cwd": 1}, "mcpServers.s.cwd"),
        ({"args": ["x"]}, "command"),
    ],
)
def test_bad_types_name_the_key(tmp_path: Path, entry: dict[str, Any], where: str) -> None:
    assert where in error_of(write(tmp_path, servers(s=entry)))


@pytest.mark.parametrize("entry", ["npx", ["npx"], None, 1])
def test_entry_not_an_object(tmp_path: Path, entry: Any) -> None:
    assert "mcpServers.s" in error_of(write(tmp_path, servers(s=entry)))


@pytest.mark.parametrize("name", ["", "has space", "-leading", "a/b", "../x", "x" * 65, "é", "a:b"])
def test_bad_names(tmp_path: Path, name: str) -> None:
    assert "server name" in error_of(write(tmp_path, servers(**{name: {"command": "x"}})))


def test_longest_name_allowed(tmp_path: Path) -> None:
    (spec,) = load_servers(write(tmp_path, servers(**{"x" * 64: {"command": "y"}})), {})
    assert spec.name == "x" * 64


# -- the command line --------------------------------------------------------------------------


def run_cli(*args: str, tmp_path: Path, **extra_env: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"AUTH_TOKEN", "MCP_SERVERS_FILE", "HOST", "PORT"}}
    env.update(HOME=str(tmp_path), **extra_env)
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30, check=False
    )


CLI_FORMS = [("-m", "mcp_sse", "check-config"), ("server_secure.py", "--check-config")]


@pytest.mark.parametrize("form", CLI_FORMS, ids=["module", "script"])
def test_cli_check_config_ok(tmp_path: Path, form: tuple[str, ...]) -> None:
    # Commands that exist: --check-config also checks that each child could start.
    path = write(
        tmp_path,
        servers(alpha={"command": "true", "env": {"K": "${MY_KEY}"}}, beta={"command": sys.executable}),
    )
    done = run_cli(*form, "--config", str(path), tmp_path=tmp_path, MY_KEY="v")
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout
    assert "alpha" in done.stdout and "beta" in done.stdout


@pytest.mark.parametrize("form", CLI_FORMS, ids=["module", "script"])
def test_cli_check_config_bad_key(tmp_path: Path, form: tuple[str, ...]) -> None:
    path = write(tmp_path, servers(alpha={"command": "x", "enviroment": {}}))
    done = run_cli(*form, "--config", str(path), tmp_path=tmp_path)
    assert done.returncode != 0
    assert "'enviroment'" in done.stderr
    assert str(path) in done.stderr
    assert "ok" not in done.stdout
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("form", CLI_FORMS, ids=["module", "script"])
def test_cli_check_config_unset_variable(tmp_path: Path, form: tuple[str, ...]) -> None:
    path = write(tmp_path, servers(alpha={"command": "x", "env": {"K": "${MCP_SSE_SURELY_UNSET}"}}))
    done = run_cli(*form, "--config", str(path), tmp_path=tmp_path)
    assert done.returncode != 0
    assert "MCP_SSE_SURELY_UNSET" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "variable", ["PATH", "LD_PRELOAD", "PYTHONPATH", "NODE_OPTIONS", "BASH_ENV", "HTTPS_PROXY", "home"]
)
def test_a_callers_header_cannot_choose_what_the_child_runs(tmp_path: Path, variable: str) -> None:
    # The attacker's side: a header mapped to LD_PRELOAD or PATH would let any caller pick the code
    # a per-session child loads.
    entry = {"command": "x", "isolation": "per-session", "env_from_headers": {"X-Evil": variable}}
    assert "a caller's header may not set it" in error_of(write(tmp_path, servers(iso=entry)))


# -- circuit_breaker -------------------------------------------------------------------------------


def test_circuit_breaker_defaults_false_and_values(tmp_path: Path) -> None:
    from mcp_sse.upstream.config import BreakerSpec

    custom = {"failureThreshold": 2, "volumeThreshold": 4, "timeout": 1.5, "successThreshold": 1}
    path = write(
        tmp_path,
        servers(
            default={"command": "x"},
            off={"command": "x", "circuit_breaker": False},
            custom={"command": "x", "circuit_breaker": custom},
        ),
    )
    specs = {spec.name: spec.breaker for spec in load_servers(path, {})}
    assert specs["default"] == BreakerSpec(True, 5, 10, 60.0, 3)
    assert specs["off"].enabled is False
    assert specs["custom"] == BreakerSpec(True, 2, 4, 1.5, 1)


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("off", "mcpServers.s.circuit_breaker must be false or an object"),
        ({"failures": 3}, "mcpServers.s.circuit_breaker: unknown key 'failures'"),
        ({"failureThreshold": 0}, "mcpServers.s.circuit_breaker.failureThreshold"),
        ({"failureThreshold": 2.5}, "mcpServers.s.circuit_breaker.failureThreshold"),
        ({"volumeThreshold": "10"}, "mcpServers.s.circuit_breaker.volumeThreshold"),
        ({"timeout": -1}, "mcpServers.s.circuit_breaker.timeout"),
        ({"successThreshold": True}, "mcpServers.s.circuit_breaker.successThreshold"),
        ({"failureThreshold": 11}, "failureThreshold cannot exceed volumeThreshold"),
    ],
)
def test_bad_circuit_breaker_names_the_key(tmp_path: Path, value: Any, where: str) -> None:
    path = write(tmp_path, servers(s={"command": "x", "circuit_breaker": value}))
    assert where in error_of(path)
