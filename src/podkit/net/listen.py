"""A server that cannot listen (its port in use, an address not here) is reported as one
line naming the address and the flag that set it, not as a traceback."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import typer

from podkit.aio import run_async

T = TypeVar("T")
LISTEN_HELP = "HOST:PORT; :PORT is every address, PORT alone is loopback."


class ListenError(Exception):
    """A server could not listen: 'cannot listen on HOST:PORT (FLAG): reason'."""

    @classmethod
    def of(cls, exc: OSError, host: str, port: int, flag: str = "") -> ListenError:
        """The error for `exc`, raised binding `host:port` (set by `flag`, if given)."""
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # a bind error's own text repeats the address; a name lookup's errno is negative
        errno = exc.errno or 0
        reason = os.strerror(errno) if errno > 0 else exc.strerror or str(exc)
        return cls(f"cannot listen on {where}{f' ({flag})' if flag else ''}: {reason}")


async def listening(start: Awaitable[T], flag: str, host: str, port: int) -> T:
    """Await a server's `start`; an OSError from it becomes a ListenError."""
    try:
        return await start
    except OSError as exc:
        raise ListenError.of(exc, host, port, flag) from None


def run_server(main: Coroutine[Any, Any, T], log: Callable[[str], None]) -> T:
    """`run_async(main)`; a ListenError from it is logged and exits 1."""
    try:
        return run_async(main)
    except ListenError as exc:
        log(str(exc))
        raise typer.Exit(1) from None
