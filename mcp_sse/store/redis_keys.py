"""Key revocations and reloads across instances (REDIS_URL).

An instance whose keys change (SIGHUP, or the admin API's create, delete and rotate, which write
KEYS_FILE) records what it revoked and publishes on PREFIX + "keys"; the others reload their
KEYS_FILE (the SIGHUP path, app.reload_keys) and end the identities that are gone.

A revocation is an entry of the sorted set PREFIX + "revoked": the key id and a fingerprint of
its secret's SHA-256 (not the digest, which the keys file holds), scored by when it may be
forgotten (the key's expiry, else 30 days). So an instance that missed the message, or whose
keys file is an older copy on another host, still refuses the key: every instance keeps the set
in memory, updated from the channel and read again whole when it (re)subscribes and every
RESYNC_SECONDS. Checking a key costs a set lookup, never a Redis round trip.

A key that comes back (put in the keys file again, by this instance's own reload or edit) is
taken off the set: the operator meant it. A stale copy elsewhere never brings one back, since
there the key never went away.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, Final, cast

from aiohttp import web

from ..security.keys import ApiKey, KeyStore
from ..state import AUDIT, KEYS
from .redis import PREFIX

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from ..security.audit import AuditLog

__all__ = ["CHANNEL", "KEY_CHANNEL", "REVOKED", "KeyChannel", "install", "keys_changed"]

log = logging.getLogger("mcp_sse")

CHANNEL: Final = PREFIX + "keys"
REVOKED: Final = PREFIX + "revoked"
REMEMBER_SECONDS: Final = 30 * 86400
RESYNC_SECONDS: Final = 10.0
MAX_BACKOFF: Final = 2.0

Entry = tuple[str, str]  # key id, fingerprint of its digest


def fingerprint(key: ApiKey) -> str:
    """Names the key's secret without being usable as one (nor as the keys file's digest)."""
    return hashlib.sha256(b"mcp-sse-revoked:" + key.sha256).hexdigest()[:32]


def _member(entry: Entry) -> str:
    return json.dumps(list(entry))


def _entry(member: bytes) -> Entry | None:
    try:
        value = json.loads(member)
    except ValueError:
        return None
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return value[0], value[1]
    return None


class KeyChannel:
    """This instance's view of the shared revocations, and its subscription to the keys channel.

    `reload` is app.reload_keys without announcing (a peer's change is not announced again);
    `end` is app.end_identities."""

    def __init__(
        self,
        keys: KeyStore,
        *,
        reload: Callable[[], None],
        end: Callable[[set[str]], int],
        audit: AuditLog,
    ) -> None:
        self.keys = keys
        self._reload = reload
        self._end = end
        self.audit = audit
        self.redis: Redis | None = None
        self.instance = ""  # set at startup, in the process that serves (after any fork)
        self.revoked: set[Entry] = set()
        self._revoked_ids: set[str] = set()
        self._seen: dict[str, ApiKey] = dict(keys.by_id)
        self._pending: list[dict[str, Any]] = []  # changes not yet written (Redis was down)
        self._tasks: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self.resyncs = 0

    # -- the hot path --

    def refuses(self, key: ApiKey) -> bool:
        return key.id in self._revoked_ids and (key.id, fingerprint(key)) in self.revoked

    def _set(self, entries: set[Entry]) -> None:
        self.revoked = entries
        self._revoked_ids = {key_id for key_id, _ in entries}

    # -- this instance's changes --

    def changed(self, *, announce: bool = True) -> None:
        """After the keys changed here: what went away (or got a new secret) is revoked, what came
        back is restored; with `announce`, recorded in Redis and published to the others."""
        now = time.time()
        current = self.keys.by_id
        gone = [
            k for k in self._seen.values() if (new := current.get(k.id)) is None or new.sha256 != k.sha256
        ]
        back = [
            k for k in current.values() if (old := self._seen.get(k.id)) is None or old.sha256 != k.sha256
        ]
        self._seen = dict(current)
        revoke = {
            (k.id, fingerprint(k)): k.expires.timestamp() if k.expires else now + REMEMBER_SECONDS
            for k in gone
        }
        restore = {(k.id, fingerprint(k)) for k in back}
        if not (revoke or restore):
            return
        self._set((self.revoked | set(revoke)) - restore)
        if not announce:
            return
        change = {
            "origin": self.instance,
            "revoke": [[*entry, until] for entry, until in revoke.items()],
            "restore": [list(entry) for entry in restore],
        }
        self._pending.append(change)
        if self.redis is not None and self.connected.is_set():
            task = asyncio.get_running_loop().create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:  # stays pending: sent on reconnect
            log.warning("key revocations: not yet recorded in Redis (%s)", type(exc).__name__)

    async def _flush(self) -> None:
        redis = self.redis
        while self._pending and redis is not None:
            change = self._pending[0]
            pipe = redis.pipeline(transaction=True)
            for key_id, fp, until in change["revoke"]:
                pipe.zadd(REVOKED, {_member((key_id, fp)): until})
            for entry in change["restore"]:
                pipe.zrem(REVOKED, _member((entry[0], entry[1])))
            pipe.expire(REVOKED, REMEMBER_SECONDS)
            pipe.publish(CHANNEL, json.dumps(change))
            await pipe.execute()
            if self._pending and self._pending[0] is change:
                self._pending.pop(0)

    # -- the others' changes --

    async def _resync(self, redis: Redis, *, reload: bool = False) -> None:
        """Read the whole set again (on (re)subscribing and every RESYNC_SECONDS); on subscribing,
        the keys file too (`reload`): whatever was missed while away is caught up with."""
        now = time.time()
        await redis.zremrangebyscore(REVOKED, "-inf", now)
        members = cast("list[bytes]", await redis.zrangebyscore(REVOKED, now, "+inf"))
        entries = {e for m in members if (e := _entry(m)) is not None}
        for change in self._pending:  # this instance's own, not yet written: they hold here meanwhile
            entries = (entries | {(r[0], r[1]) for r in change["revoke"]}) - {
                (r[0], r[1]) for r in change["restore"]
            }
        added = entries - self.revoked
        self._set(entries)
        self.resyncs += 1
        if added or reload:
            self._reload()
            self._end_revoked(added)

    def _heard(self, data: bytes) -> None:
        try:
            change = json.loads(data)
            if not isinstance(change, dict) or change.get("origin") == self.instance:
                return
            revoke = {(str(r[0]), str(r[1])) for r in change.get("revoke", ())}
            restore = {(str(r[0]), str(r[1])) for r in change.get("restore", ())}
        except (ValueError, TypeError, IndexError):
            log.warning("ignored a malformed message on %s", CHANNEL)
            return
        self._set((self.revoked | revoke) - restore)
        self._reload()  # as a SIGHUP here: the keys file (shared on one host) is read again
        self._end_revoked(revoke)

    def _end_revoked(self, entries: set[Entry]) -> None:
        """Keys still in this instance's file (another host's copy) whose secret was revoked elsewhere."""
        ids = {
            key_id for key_id, fp in entries if (k := self.keys.by_id.get(key_id)) and fingerprint(k) == fp
        }
        if ids:  # once per revocation heard; its sessions may have ended already, with the reload
            ended = self._end(ids)
            self.audit.event(
                "keys.revoked_elsewhere", None, key_ids=", ".join(sorted(ids)), sessions_closed=ended
            )

    async def run(self, redis: Redis) -> None:
        """Subscribe, resync, listen; after any failure (Redis restarted, unreachable) again, with
        a short backoff. Runs for the app's life."""
        backoff = 0.1
        while True:
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    # Subscribed before reading the set: nothing published in between is lost.
                    await self._resync(redis, reload=self.resyncs > 0)
                    self.connected.set()
                    await self._flush()
                    backoff = 0.1
                    last = time.monotonic()
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if message is not None and message.get("type") == "message":
                            self._heard(message["data"])
                        if time.monotonic() - last >= RESYNC_SECONDS:
                            await self._resync(redis)
                            await self._flush()
                            last = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # redis-py's ConnectionError, TimeoutError, OSError
                from redis.exceptions import RedisError

                if not isinstance(exc, RedisError | OSError):  # a bug, not an outage: say so, go on
                    log.exception("key revocations: unexpected error; subscribing again")
                elif self.connected.is_set():
                    log.warning("key revocations: Redis lost (%s); reconnecting", type(exc).__name__)
                    self.audit.event(
                        "store.unavailable", None, store="key revocations", error=type(exc).__name__
                    )
                self.connected.clear()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)


KEY_CHANNEL: Final[web.AppKey[KeyChannel | None]] = web.AppKey("key_channel")


def keys_changed(app: web.Application, *, announce: bool = True) -> None:
    """After this instance's keys changed (a reload, an admin API edit): see KeyChannel.changed."""
    if (channel := app.get(KEY_CHANNEL)) is not None:
        channel.changed(announce=announce)


def install(
    app: web.Application,
    redis: Redis | None,
    *,
    reload: Callable[[], None],
    end: Callable[[set[str]], int],
) -> None:
    """app[KEY_CHANNEL] (None without REDIS_URL), and its subscriber for the app's life."""
    if redis is None:
        app[KEY_CHANNEL] = None
        return
    channel = app[KEY_CHANNEL] = KeyChannel(app[KEYS], reload=reload, end=end, audit=app[AUDIT])
    # Every lookup of a key (bearer, cookie login, an OAuth token's approver) asks the channel too.
    app[KEYS].refuses = channel.refuses

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        channel.redis = redis
        channel.instance = secrets.token_hex(8)  # here, not at import: each worker its own after fork
        task = asyncio.create_task(channel.run(redis))
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app.cleanup_ctx.append(lifecycle)
