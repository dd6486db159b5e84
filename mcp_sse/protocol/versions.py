"""MCP protocol revisions the gateway speaks, and how one is negotiated."""

from __future__ import annotations

from typing import Final

__all__ = [
    "ALL_VERSIONS",
    "HANDSHAKE_VERSIONS",
    "LATEST_HANDSHAKE",
    "MODERN_VERSIONS",
    "negotiate",
    "supports_batches",
    "supports_priming",
]

HANDSHAKE_VERSIONS: Final = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
"""Revisions that open a session with `initialize`, oldest first."""

LATEST_HANDSHAKE: Final = HANDSHAKE_VERSIONS[-1]

MODERN_VERSIONS: Final = ("2026-07-28",)
"""Stateless revisions: no initialize, no session; every request carries its version in `_meta`."""

ALL_VERSIONS: Final = HANDSHAKE_VERSIONS + MODERN_VERSIONS


def negotiate(requested: object) -> str:
    """The version to answer `initialize` with: the client's own if we speak it, else our latest."""
    if isinstance(requested, str) and requested in HANDSHAKE_VERSIONS:
        return requested
    return LATEST_HANDSHAKE


def supports_batches(version: str) -> bool:
    # JSON-RPC batching existed only in 2025-03-26; 2025-06-18 removed it.
    return version == "2025-03-26"


def supports_priming(version: str) -> bool:
    # An empty-data priming event with an id came in 2025-11-25; older clients may choke on it.
    return version >= "2025-11-25"
