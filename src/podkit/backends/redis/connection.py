"""What every Redis object stands on: the client, its retries, replayed writes, errors.

Reconnects: commands are retried on connection errors and timeouts (40 times, 0.25 to
0.5 s apart once backed off: 10 to 20 s against a refused connection), so the same
objects ride out a server restart. A command whose reply was lost runs again; a script
whose repetition would act twice takes a random request token and keeps its result
under it for `REPLAY_TTL` seconds, so the retry returns the first result instead.
Ack, extend, keep_alive, revoke and XACK are idempotent as they are. A topic fetch that
is retried leaves the first delivery pending: it comes back after ack_wait.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    RedisError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

from podkit.aio import wait_for
from podkit.backends.base import BackendError
from podkit.backends.url import BackendURL

DEFAULT_PORT = 6379
REPLAY_TTL = 120  # seconds a write's result is kept for a retried request (> retry budget)
BLOCK_MAX = 1.0  # longest blocking read (XREAD, XREADGROUP, BLPOP), seconds

_NET_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
_Arg = bytes | str | int | float  # what a script argument may be

_LUA_COMMON = """
local B = KEYS[1]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function bulk(cmd, key, args)
  for i = 1, #args, 4000 do
    redis.call(cmd, key, unpack(args, i, math.min(i + 3999, #args)))
  end
end
local function replay(tok)
  if tok == '' then return false end
  return redis.call('GET', B .. 'req:' .. tok)
end
local function remember(tok, value)
  redis.call('SET', B .. 'req:' .. tok, value, 'EX', REPLAY_TTL)
end
""".replace("REPLAY_TTL", str(REPLAY_TTL))


def _token() -> str:
    return os.urandom(8).hex()


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _client(url: BackendURL, timeout: float, retries: int) -> Redis:
    db = url.path.strip("/") or "0"
    if not db.isdigit():
        raise BackendError(f"{url.masked}: the path must be a database number, not {url.path!r}")
    backoff = EqualJitterBackoff(cap=0.5, base=0.02) if retries else NoBackoff()
    return Redis(
        host=url.host or "127.0.0.1",
        port=url.port or DEFAULT_PORT,
        db=int(db),
        username=url.username,
        password=url.password,
        ssl=url.scheme == "rediss",
        socket_connect_timeout=timeout,
        socket_timeout=timeout + BLOCK_MAX,
        retry=Retry(backoff, retries),
        decode_responses=False,
        protocol=2,  # reply shapes (XREAD, XREADGROUP) as parsed below
    )


async def _connect(url: BackendURL, timeout: float | None, retries: int) -> tuple[Redis, float]:
    """A client with retries, after one PING without retries answered within `timeout`;
    and that timeout."""
    try:
        wait = float(timeout if timeout is not None else url.query.get("timeout", 5.0))
    except ValueError:
        raise BackendError(f"{url.masked}: timeout must be seconds") from None
    probe = _client(url, wait, 0)
    try:
        await wait_for(probe.ping(), wait)
    except AuthenticationError as exc:
        raise BackendError(f"{url.masked}: {exc}") from None
    except (TimeoutError, *_NET_ERRORS) as exc:
        raise url.unavailable(DEFAULT_PORT, wait, str(exc) or type(exc).__name__) from None
    except RedisError as exc:
        raise BackendError(f"{url.masked}: {exc}") from None
    finally:
        await probe.aclose()
    return _client(url, wait, retries), wait


def _prefix(url: BackendURL, prefix: str | None) -> str:
    return prefix if prefix is not None else url.query.get("prefix", "")


class _Backend:
    """What every object of this driver holds: the client, its URL and timeout."""

    def __init__(self, url: BackendURL, client: Redis, wait: float) -> None:
        self.url = url.masked
        self._where = url
        self._wait = wait
        self._r = client

    def _failed(self, exc: RedisError | OSError) -> BackendError:
        if isinstance(exc, _NET_ERRORS):
            return self._where.unavailable(DEFAULT_PORT, self._wait, exc)
        return BackendError(f"{self.url}: {exc}")


S = TypeVar("S", bound=_Backend)
P = ParamSpec("P")
R = TypeVar("R")


def _guarded(
    method: Callable[Concatenate[S, P], Coroutine[Any, Any, R]],
) -> Callable[Concatenate[S, P], Coroutine[Any, Any, R]]:
    """Report redis-py errors (after its retries) as BackendUnavailable or BackendError."""

    @functools.wraps(method)
    async def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await method(self, *args, **kwargs)
        except (RedisError, OSError) as exc:
            raise self._failed(exc) from exc

    return call
