"""One backend from one servers-file entry: the only place that knows which class serves which kind."""

from __future__ import annotations

from collections.abc import Mapping

from .backend import Backend, StdioBackend
from .breaker import CircuitBreaker
from .builtin import BuiltinBackend, load_toolset
from .config import ServerSpec
from .isolation import PerSessionBackend
from .remote import RemoteBackend

__all__ = ["build_backend"]


def build_backend(spec: ServerSpec, *, max_line: int, base_env: Mapping[str, str]) -> Backend:
    """`max_line` bounds one message from the backend; `base_env` is what a child inherits.
    Every kind gets its circuit breaker here, unless the entry says `"circuit_breaker": false`."""
    backend = _unguarded(spec, max_line=max_line, base_env=base_env)
    return CircuitBreaker(backend, spec.breaker) if spec.breaker.enabled else backend


def _unguarded(spec: ServerSpec, *, max_line: int, base_env: Mapping[str, str]) -> Backend:
    if spec.module is not None:
        return BuiltinBackend(load_toolset(spec.module), name=spec.name)

    def make(spec: ServerSpec) -> Backend:
        if spec.url is not None:
            return RemoteBackend(spec, max_message=max_line)
        return StdioBackend(spec, max_line=max_line, base_env=base_env)

    if spec.isolation == "per-session":
        # One breaker for the backend as a whole: its children are made (and fail) per session.
        return PerSessionBackend(spec, make=make, base_env=base_env)
    return make(spec)
