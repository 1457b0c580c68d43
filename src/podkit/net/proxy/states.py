"""The states of a client connection in the proxy engine, and what moves it on.

`ClientConnection.state` names where a connection is. It is read off the connection's
fields when asked (`state_of`), never kept up to date on the request path. The sweeper
decides its timeouts from it (`podkit.net.proxy.timeouts`).

| from | to | on |
|---|---|---|
| IDLE | READING_HEAD | the first bytes of a head |
| IDLE | CLOSED | `idle_timeout`; the client closes |
| READING_HEAD | READING_BODY | the head is read, a body announced |
| READING_HEAD | WAITING_UPSTREAM | the head is read, no body |
| READING_HEAD | LINGERING | a bad head (400, 414, 431, 505); `header_timeout` (408) |
| READING_BODY | WAITING_UPSTREAM | the body's end |
| READING_BODY | STREAMING | the answer starts first (the body is still read) |
| READING_BODY | LINGERING | a malformed body; `body_timeout` (408) |
| WAITING_UPSTREAM | STREAMING | the answer's head goes to the client |
| WAITING_UPSTREAM | IDLE | a local answer (a filter's, 502, 503, 504) |
| STREAMING | IDLE | the answer's end, nothing else asked |
| STREAMING | WAITING_UPSTREAM | the answer's end, a pipelined request next |
| STREAMING | TUNNEL | a 101 answer to an Upgrade |
| STREAMING | LINGERING | the answer's end on a connection that closes |
| TUNNEL | CLOSED | either side closes; `tunnel_timeout` |
| LINGERING | CLOSED | the client closes, or a second has passed |

Every state but CLOSED also ends at `send_timeout` when the client takes none of what it
was sent; an upstream that goes quiet for `upstream_timeout` while a request is being
answered (READING_BODY, WAITING_UPSTREAM, STREAMING) ends its try.
"""

from __future__ import annotations

from enum import Enum


class State(Enum):
    IDLE = "idle"  # kept alive between requests, nothing asked
    READING_HEAD = "reading head"  # a head has begun, no request is being answered
    READING_BODY = "reading body"  # the body is read and passed on as it comes
    # the request is read; an upstream is picked, connected to, sent it, retried or awaited
    WAITING_UPSTREAM = "waiting upstream"
    STREAMING = "streaming answer"  # the answer goes to the client
    TUNNEL = "tunnel"  # bytes relayed both ways after a 101
    LINGERING = "lingering"  # closing after the last answer: FIN sent, the rest dropped
    CLOSED = "closed"  # the transport is gone


def state_of(
    *,
    closed: bool,
    lingering: bool,
    tunnel: bool,
    answering: bool,
    in_head: bool = False,
    request_done: bool = False,
    responded: bool = False,
) -> State:
    """The state of a client connection from its fields: `answering` when a request is
    being answered (`request_done` and `responded` are that exchange's), `in_head` when a
    head is half read."""
    if closed:
        return State.CLOSED
    if lingering:
        return State.LINGERING
    if tunnel:
        return State.TUNNEL
    if not answering:
        return State.READING_HEAD if in_head else State.IDLE
    if not request_done:
        return State.READING_BODY
    return State.STREAMING if responded else State.WAITING_UPSTREAM
