"""Settings from the environment: every bad value is refused with its name, never a traceback."""

from __future__ import annotations

import pytest

from mcp_sse.settings import Settings, SettingsError


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "1e999"])
@pytest.mark.parametrize("name", ["SSE_WRITE_TIMEOUT_SECONDS", "AUTH_LOCKOUT_SECONDS", "COOKIE_IDLE_SECONDS"])
def test_a_duration_must_be_positive_and_finite(name: str, value: str) -> None:
    # nan compares false with everything, so a `value <= 0` check lets it through as "never".
    with pytest.raises(SettingsError, match=f"{name}=.*positive, finite"):
        Settings.load(environ={name: value})


def test_a_finite_duration_is_taken() -> None:
    assert Settings.load(environ={"SSE_WRITE_TIMEOUT_SECONDS": "2.5"}).write_timeout == 2.5


@pytest.mark.parametrize("url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "memcached://x"])
def test_redis_url_must_name_redis(url: str) -> None:
    with pytest.raises(SettingsError, match="REDIS_URL must be a redis://"):
        Settings.load(environ={"REDIS_URL": url})


def test_a_bad_redis_url_is_not_echoed() -> None:
    # The URL carries Redis's password: the error names the setting, never the value.
    with pytest.raises(SettingsError) as refused:
        Settings.load(environ={"REDIS_URL": "http://:hunter2-secret@127.0.0.1:6379"})
    assert "hunter2" not in str(refused.value)


def test_more_than_one_worker_needs_redis() -> None:
    with pytest.raises(SettingsError, match="WORKERS=2 needs REDIS_URL"):
        Settings.load(environ={"WORKERS": "2"})
    settings = Settings.load(environ={"WORKERS": "2", "REDIS_URL": "rediss://:pw@127.0.0.1:6380/0"})
    assert settings.workers == 2 and "pw" not in repr(settings)
