"""The sweeper's decisions on one client connection, as a function of its state.

Every `tick` the sweeper reads each client connection into a `Timing` (its state and the
times the timeouts look at; `ClientConnection.timing`), asks `timeout_verdict(timing,
now, config)` what is due, and the connection acts on the `Verdict`
(`ClientConnection.check`). Nothing here touches a socket or a clock.

The first rule that applies wins, in this order:

| verdict | when | the connection |
|---|---|---|
| KEEP | CLOSED | |
| SEND_STALLED | bytes wait for the client, unmoved for `send_timeout` | aborts |
| KEEP | LINGERING | |
| TUNNEL_IDLE | TUNNEL, no bytes either way for `tunnel_timeout` | aborts |
| HEAD_TIMEOUT | READING_HEAD, `header_timeout` after the head began | answers 408 |
| IDLE_TIMEOUT | IDLE, the client quiet for `idle_timeout` | closes |
| REQUEST_TIMEOUT | WAITING_UPSTREAM, `request_timeout` (0: none) after the first try | 504 |
| BODY_STALLED | READING_BODY, the client quiet for `body_timeout` | answers 408 |
| BODY_STALLED_ANSWERED | the same, its answer already under way | aborts |
| UPSTREAM_TIMEOUT | the try's upstream quiet for `upstream_timeout` | retries, or 504 |

Each limit is a strict "more than": at exactly the limit nothing is due yet. The send
stall applies in every open state: a client that stops reading a streamed answer holds its
writes back (the buffer stops changing) as surely as an idle or lingering one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from podkit.net.proxy.states import State

if TYPE_CHECKING:
    from podkit.net.proxy.config import ProxyConfig


class Verdict(Enum):
    KEEP = "nothing due"
    SEND_STALLED = "the client takes nothing it is sent"
    TUNNEL_IDLE = "the tunnel is idle"
    HEAD_TIMEOUT = "the request head is late"
    IDLE_TIMEOUT = "the keep-alive connection is idle"
    REQUEST_TIMEOUT = "no answer in time, over all tries"
    BODY_STALLED = "the request body stalled"
    BODY_STALLED_ANSWERED = "the request body stalled, its answer under way"
    UPSTREAM_TIMEOUT = "the upstream went quiet"


@dataclass(slots=True)
class Timing:
    """What the timeouts of one client connection look at, read at one sweep (times on
    the engine's clock, in seconds)."""

    state: State
    quiet: float = 0.0  # since when the client has sent nothing
    unsent: int = 0  # bytes waiting for the client to take them
    unsent_since: float = 0.0  # since when that count has not changed
    head_since: float = 0.0  # when the unfinished head was first seen (0: not yet)
    started: float = 0.0  # when the request, read whole, went to its first upstream
    tries: int = 0  # tries sent for the request being answered
    responded: bool = False  # its answer's head went to the client
    peer_quiet: float | None = None  # since when the upstream (or tunnel peer) is quiet


def timeout_verdict(t: Timing, now: float, cfg: ProxyConfig) -> Verdict:
    """What is due on a connection at `now` (see the module's table)."""
    state = t.state
    if state is State.CLOSED:
        return Verdict.KEEP
    if t.unsent and now - t.unsent_since > cfg.send_timeout:
        return Verdict.SEND_STALLED
    if state is State.LINGERING:
        return Verdict.KEEP
    idle = now - t.quiet
    peer = t.peer_quiet
    if state is State.TUNNEL:
        quiet = idle if peer is None else min(idle, now - peer)
        return Verdict.TUNNEL_IDLE if quiet > cfg.tunnel_timeout else Verdict.KEEP
    if state is State.READING_HEAD:
        if t.head_since and now - t.head_since > cfg.header_timeout:
            return Verdict.HEAD_TIMEOUT
        return Verdict.KEEP
    if state is State.IDLE:
        return Verdict.IDLE_TIMEOUT if idle > cfg.idle_timeout else Verdict.KEEP
    if (
        state is State.WAITING_UPSTREAM
        and cfg.request_timeout
        and t.tries
        and now - t.started > cfg.request_timeout
    ):
        return Verdict.REQUEST_TIMEOUT
    if state is State.READING_BODY and idle > cfg.body_timeout:
        return Verdict.BODY_STALLED_ANSWERED if t.responded else Verdict.BODY_STALLED
    if peer is not None and now - peer > cfg.upstream_timeout:
        return Verdict.UPSTREAM_TIMEOUT
    return Verdict.KEEP
