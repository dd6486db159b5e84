"""The OAuth store in Redis (REDIS_URL with OAUTH_SERVER): one authorization server's state shared
by every instance, so a code, a grant or a refresh token issued by one is honoured by all.

The reference is store/sqlite.py; the same tests pass against both (tests/oauth/test_server_store.py).
Each deciding step is one Lua script, which Redis runs alone: a code's first use wins across
instances, a refresh token rotates once, and its reuse revokes the family. Secrets are stored
as the digests the records already carry (hex in key names), never in clear.

Layout, under PREFIX + "oauth:":
  client:<id>  hash      clients      zset by last use      client-grants:<id>  set of grant ids
  code:<hex>   hash      codes        zset by expiry
  grant:<id>   hash      grants       zset by expiry        grants-created      zset by creation
  refresh:<hex> hash     refresh-tokens zset by expiry      grant-refresh:<id>  set of token digests
A revoked grant keeps its hash, revoked_at set, until `remember_until` (a tombstone when it did
not exist yet), so create_grant cannot bring it to life. Nothing expires by TTL: the records'
times come from the server's clock, and prune() (every few minutes, any instance) forgets them.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, Final, cast

from . import AUTH_METHODS, AuthMethod, ClientRecord, CodeRecord, GrantRecord, Pruned, RefreshRecord, Rotation
from .redis import PREFIX
from .redis_faults import SharedState

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

    from ..security.audit import AuditLog

__all__ = ["RedisOAuthStore"]

P: Final = PREFIX + "oauth:"
_GRANT_FIELDS: Final = ("client_id", "key_id", "key_fp", "resource", "scope", "created_at", "expires_at")

_LIB: Final = """
local P = ARGV[1]
local function live(gid, now)
  local g = redis.call('HMGET', P .. 'grant:' .. gid, 'revoked_at', 'expires_at')
  return g[2] ~= false and g[1] == '' and tonumber(g[2]) > now
end
local function grant_row(gid)
  local row = redis.call('HMGET', P .. 'grant:' .. gid,
    'client_id', 'key_id', 'key_fp', 'resource', 'scope', 'created_at', 'expires_at')
  table.insert(row, 1, gid)
  return row
end
local function drop_tokens(gid)
  local gr = P .. 'grant-refresh:' .. gid
  for _, t in ipairs(redis.call('SMEMBERS', gr)) do
    redis.call('DEL', P .. 'refresh:' .. t)
    redis.call('ZREM', P .. 'refresh-tokens', t)
  end
  redis.call('DEL', gr)
end
local function revoke(gid, now, now_s, until_s)
  local was = live(gid, now)
  drop_tokens(gid)
  local g = P .. 'grant:' .. gid
  if redis.call('EXISTS', g) == 1 then
    if redis.call('HGET', g, 'revoked_at') == '' then redis.call('HSET', g, 'revoked_at', now_s) end
    redis.call('HSET', g, 'expires_at', until_s)
  else
    redis.call('HSET', g, 'client_id', '', 'key_id', '', 'key_fp', '', 'resource', '', 'scope', '',
      'created_at', '0', 'expires_at', until_s, 'revoked_at', now_s)
  end
  redis.call('ZADD', P .. 'grants', until_s, gid)
  redis.call('ZREM', P .. 'grants-created', gid)
  return was
end
local function has_live_grant(cid, now)
  for _, gid in ipairs(redis.call('SMEMBERS', P .. 'client-grants:' .. cid)) do
    if live(gid, now) then return true end
  end
  return false
end
local function drop_client(cid)
  redis.call('DEL', P .. 'client:' .. cid, P .. 'client-grants:' .. cid)
  redis.call('ZREM', P .. 'clients', cid)
end
"""

_TOUCH: Final = """
local c = P .. 'client:' .. ARGV[2]
local last = redis.call('HGET', c, 'last_used_at')
if last and tonumber(ARGV[3]) > tonumber(last) then
  redis.call('HSET', c, 'last_used_at', ARGV[3])
  redis.call('ZADD', P .. 'clients', ARGV[3], ARGV[2])
end
return 0
"""

_EVICT: Final = """
local count, now, n = tonumber(ARGV[2]), tonumber(ARGV[3]), 0
for _, cid in ipairs(redis.call('ZRANGE', P .. 'clients', 0, -1)) do
  if n >= count then break end
  if not has_live_grant(cid, now) then drop_client(cid); n = n + 1 end
end
return n
"""

_TAKE_CODE: Final = """
local k = P .. 'code:' .. ARGV[2]
if redis.call('EXISTS', k) == 0 then return false end
local uses = redis.call('HINCRBY', k, 'uses', 1)
local row = redis.call('HMGET', k, 'client_id', 'redirect_uri', 'code_challenge', 'resource', 'scope',
  'key_id', 'key_fp', 'grant_id', 'expires_at')
table.insert(row, tostring(uses))
return row
"""

_CREATE_GRANT: Final = """
local gid, cid, tok, texp = ARGV[2], ARGV[3], ARGV[10], ARGV[11]
local g = P .. 'grant:' .. gid
if redis.call('EXISTS', g) == 1 then return 0 end
redis.call('HSET', g, 'client_id', cid, 'key_id', ARGV[4], 'key_fp', ARGV[5], 'resource', ARGV[6],
  'scope', ARGV[7], 'created_at', ARGV[8], 'expires_at', ARGV[9], 'revoked_at', '')
redis.call('ZADD', P .. 'grants', ARGV[9], gid)
redis.call('ZADD', P .. 'grants-created', ARGV[8], gid)
redis.call('SADD', P .. 'client-grants:' .. cid, gid)
redis.call('HSET', P .. 'refresh:' .. tok, 'grant_id', gid, 'expires_at', texp, 'spent', '0')
redis.call('SADD', P .. 'grant-refresh:' .. gid, tok)
redis.call('ZADD', P .. 'refresh-tokens', texp, tok)
return 1
"""

_REVOKE: Final = """
return revoke(ARGV[2], tonumber(ARGV[3]), ARGV[3], ARGV[4]) and 1 or 0
"""

_FIND_REFRESH: Final = """
local now = tonumber(ARGV[3])
local r = redis.call('HMGET', P .. 'refresh:' .. ARGV[2], 'grant_id', 'expires_at')
if not r[1] or tonumber(r[2]) <= now or not live(r[1], now) then return false end
return grant_row(r[1])
"""

_ROTATE: Final = """
local old, new, nexp, now_s = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now = tonumber(now_s)
local rk = P .. 'refresh:' .. old
local r = redis.call('HMGET', rk, 'grant_id', 'expires_at', 'spent')
if not r[1] then return {'gone'} end
local gid = r[1]
if not live(gid, now) or tonumber(r[2]) <= now then return {'gone'} end
local row = grant_row(gid)
if r[3] == '1' then
  -- A spent token presented again: the thief's or the client's, so the family ends for both
  -- (RFC 9700 section 4.14.2).
  revoke(gid, now, now_s, now_s)
  return {'reused', row}
end
redis.call('HSET', rk, 'spent', '1')
redis.call('HSET', P .. 'refresh:' .. new, 'grant_id', gid, 'expires_at', nexp, 'spent', '0')
redis.call('SADD', P .. 'grant-refresh:' .. gid, new)
redis.call('ZADD', P .. 'refresh-tokens', nexp, new)
local g = P .. 'grant:' .. gid
if tonumber(nexp) > tonumber(redis.call('HGET', g, 'expires_at')) then
  redis.call('HSET', g, 'expires_at', nexp)
  redis.call('ZADD', P .. 'grants', nexp, gid)
end
return {'rotated', row}
"""

_PRUNE: Final = """
local now_s, unused_s, codes_s = ARGV[2], ARGV[3], ARGV[4]
local now = tonumber(now_s)
local codes = redis.call('ZRANGEBYSCORE', P .. 'codes', '-inf', '(' .. codes_s)
for _, c in ipairs(codes) do
  redis.call('DEL', P .. 'code:' .. c)
  redis.call('ZREM', P .. 'codes', c)
end
for _, t in ipairs(redis.call('ZRANGEBYSCORE', P .. 'refresh-tokens', '-inf', now_s)) do
  local gid = redis.call('HGET', P .. 'refresh:' .. t, 'grant_id')
  redis.call('DEL', P .. 'refresh:' .. t)
  if gid then redis.call('SREM', P .. 'grant-refresh:' .. gid, t) end
  redis.call('ZREM', P .. 'refresh-tokens', t)
end
local grants = redis.call('ZRANGEBYSCORE', P .. 'grants', '-inf', now_s)
for _, gid in ipairs(grants) do
  local cid = redis.call('HGET', P .. 'grant:' .. gid, 'client_id')
  if cid then redis.call('SREM', P .. 'client-grants:' .. cid, gid) end
  drop_tokens(gid)
  redis.call('DEL', P .. 'grant:' .. gid)
  redis.call('ZREM', P .. 'grants', gid)
  redis.call('ZREM', P .. 'grants-created', gid)
end
local clients = 0
for _, cid in ipairs(redis.call('ZRANGEBYSCORE', P .. 'clients', '-inf', '(' .. unused_s)) do
  if not has_live_grant(cid, now) then drop_client(cid); clients = clients + 1 end
end
return {clients, #codes, #grants}
"""


def _f(value: float) -> str:
    return repr(float(value))


def _s(value: bytes | None) -> str:
    return value.decode() if value is not None else ""


def _grant(row: list[Any]) -> GrantRecord:
    gid, cid, key_id, key_fp, resource, scope, created, expires = (_s(v) for v in row)
    return GrantRecord(gid, cid, key_id, key_fp, resource, scope, float(created), float(expires))


def _client(client_id: str, fields: dict[bytes, bytes]) -> ClientRecord:
    method: AuthMethod = next((m for m in AUTH_METHODS if m == _s(fields.get(b"auth_method"))), "none")
    uris = _s(fields.get(b"redirect_uris"))
    return ClientRecord(
        client_id=client_id,
        client_name=_s(fields.get(b"client_name")),
        redirect_uris=tuple(uris.split("\n")) if uris else (),
        auth_method=method,
        secret_sha256=fields.get(b"secret_sha256"),
        grant_types=tuple(_s(fields.get(b"grant_types")).split()),
        created_at=float(fields[b"created_at"]),
        last_used_at=float(fields[b"last_used_at"]),
    )


class RedisOAuthStore:
    """`OAuthStore` on the process's Redis pool (app[REDIS]), which it neither opens nor closes."""

    def __init__(self, redis: Redis | None = None, *, audit: AuditLog | None = None) -> None:
        self._redis = redis
        self._call = SharedState("OAuth", audit)
        self._scripts: dict[str, AsyncScript] = {}

    def bind(self, redis: Redis) -> None:
        self._redis = redis

    @property
    def redis(self) -> Redis:
        if self._redis is None:
            raise RuntimeError("RedisOAuthStore used before bind(app[REDIS])")
        return self._redis

    def _script(self, name: str, body: str, *args: str | bytes) -> Awaitable[Any]:
        # redis-py loads a script again by itself when Redis lost it (a restart): NOSCRIPT, then EVAL.
        if (script := self._scripts.get(name)) is None:
            script = self._scripts[name] = self.redis.register_script(_LIB + body)
        return self._call(script(keys=[], args=[P, *args]))

    # -- lifecycle: the pool belongs to store/redis.py --

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    # -- clients --

    async def add_client(self, client: ClientRecord) -> None:
        fields: dict[str, str | bytes] = {
            "client_name": client.client_name,
            "redirect_uris": "\n".join(client.redirect_uris),
            "auth_method": client.auth_method,
            "grant_types": " ".join(client.grant_types),
            "created_at": _f(client.created_at),
            "last_used_at": _f(client.last_used_at),
        }
        if client.secret_sha256 is not None:
            fields["secret_sha256"] = client.secret_sha256
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(P + "client:" + client.client_id, mapping=fields)  # type: ignore[arg-type]
        pipe.zadd(P + "clients", {client.client_id: client.last_used_at})
        await self._call(pipe.execute())

    async def get_client(self, client_id: str) -> ClientRecord | None:
        fields = await self._call(
            cast("Awaitable[dict[bytes, bytes]]", self.redis.hgetall(P + "client:" + client_id))
        )
        return _client(client_id, fields) if fields else None

    async def touch_client(self, client_id: str, now: float) -> None:
        await self._script("touch", _TOUCH, client_id, _f(now))

    async def count_clients(self) -> int:
        return int(await self._call(self.redis.zcard(P + "clients")))

    async def list_clients(self, limit: int) -> list[ClientRecord]:
        found = cast("list[bytes]", await self._call(self.redis.zrevrange(P + "clients", 0, limit - 1)))
        ids = [i.decode() for i in found]
        pipe = self.redis.pipeline(transaction=False)
        for client_id in ids:
            pipe.hgetall(P + "client:" + client_id)
        rows = await self._call(pipe.execute()) if ids else []
        return [_client(i, fields) for i, fields in zip(ids, rows, strict=True) if fields]

    async def evict_clients(self, count: int, now: float) -> int:
        return int(await self._script("evict", _EVICT, str(int(count)), _f(now)))

    # -- codes --

    async def add_code(self, code: CodeRecord) -> None:
        digest = code.code_sha256.hex()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            P + "code:" + digest,
            mapping={
                "client_id": code.client_id,
                "redirect_uri": code.redirect_uri,
                "code_challenge": code.code_challenge,
                "resource": code.resource,
                "scope": code.scope,
                "key_id": code.key_id,
                "key_fp": code.key_fp,
                "grant_id": code.grant_id,
                "expires_at": _f(code.expires_at),
                "uses": 0,
            },
        )
        pipe.zadd(P + "codes", {digest: code.expires_at})
        await self._call(pipe.execute())

    async def take_code(self, code_sha256: bytes) -> tuple[CodeRecord, bool] | None:
        row = await self._script("take_code", _TAKE_CODE, code_sha256.hex())
        if row is None:
            return None
        values = [_s(v) for v in row]
        client_id, redirect_uri, challenge, resource, scope, key_id, key_fp, grant_id = values[:8]
        record = CodeRecord(
            code_sha256,
            client_id,
            redirect_uri,
            challenge,
            resource,
            scope,
            key_id,
            key_fp,
            grant_id,
            float(values[8]),
        )
        return record, int(values[9]) == 1

    # -- grants and refresh tokens --

    async def create_grant(self, grant: GrantRecord, refresh: RefreshRecord) -> bool:
        created = await self._script(
            "create_grant",
            _CREATE_GRANT,
            grant.grant_id,
            grant.client_id,
            grant.key_id,
            grant.key_fp,
            grant.resource,
            grant.scope,
            _f(grant.created_at),
            _f(grant.expires_at),
            refresh.token_sha256.hex(),
            _f(refresh.expires_at),
        )
        return bool(created)

    async def get_grant(self, grant_id: str, now: float) -> GrantRecord | None:
        # Every request with one of our access tokens asks this: one round trip, no script.
        row = await self._call(
            cast(
                "Awaitable[list[bytes | None]]",
                self.redis.hmget(P + "grant:" + grant_id, [*_GRANT_FIELDS, "revoked_at"]),
            )
        )
        if row[-1] is None or row[-1] != b"" or float(_s(row[6])) <= now:
            return None
        return _grant([grant_id.encode(), *row[:7]])

    async def list_grants(self, now: float, limit: int) -> list[GrantRecord]:
        ids = cast("list[bytes]", await self._call(self.redis.zrevrange(P + "grants-created", 0, -1)))
        found: list[GrantRecord] = []
        for start in range(0, len(ids), max(limit, 1)):
            chunk = [i.decode() for i in ids[start : start + max(limit, 1)]]
            pipe = self.redis.pipeline(transaction=False)
            for grant_id in chunk:
                pipe.hmget(P + "grant:" + grant_id, [*_GRANT_FIELDS, "revoked_at"])
            for grant_id, row in zip(chunk, await self._call(pipe.execute()), strict=True):
                if row[-1] == b"" and float(_s(row[6])) > now:
                    found.append(_grant([grant_id.encode(), *row[:7]]))
                    if len(found) >= limit:
                        return found
        return found

    async def revoke_grant(self, grant_id: str, now: float, *, remember_until: float) -> bool:
        return bool(await self._script("revoke", _REVOKE, grant_id, _f(now), _f(max(now, remember_until))))

    async def find_refresh(self, token_sha256: bytes, now: float) -> GrantRecord | None:
        row = await self._script("find_refresh", _FIND_REFRESH, token_sha256.hex(), _f(now))
        return None if row is None else _grant(row)

    async def rotate_refresh(self, old_sha256: bytes, new: RefreshRecord, now: float) -> Rotation:
        answer = await self._script(
            "rotate", _ROTATE, old_sha256.hex(), new.token_sha256.hex(), _f(new.expires_at), _f(now)
        )
        outcome = _s(answer[0])
        if outcome == "rotated":
            return Rotation("rotated", _grant(answer[1]))
        if outcome == "reused":
            return Rotation("reused", _grant(answer[1]))
        return Rotation("gone", None)

    async def prune(self, now: float, *, unused_clients_before: float, codes_before: float) -> Pruned:
        clients, codes, grants = await self._script(
            "prune", _PRUNE, _f(now), _f(unused_clients_before), _f(codes_before)
        )
        return Pruned(clients=int(clients), codes=int(codes), grants=int(grants))
