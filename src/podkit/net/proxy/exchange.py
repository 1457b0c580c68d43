"""One request and its answer as the engine carries it (`Exchange`), and the engine's
per-request limits."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from podkit.net.http import RequestHead

if TYPE_CHECKING:
    from podkit.net.proxy.clientconn import ClientConnection
    from podkit.net.proxy.hooks import BodyObserver
    from podkit.net.proxy.upstream import Upstream
    from podkit.net.proxy.upstreamconn import UpstreamConnection

PENDING_LIMIT = 256 * 1024  # request bytes held for an upstream before reading pauses
REPLAY_LIMIT = 64 * 1024  # request body bytes kept to send again on a retry
MEMO_HEAD_LIMIT = 2048  # request heads up to this size are remembered by their bytes
MEMO_SIZE = 1024  # remembered request heads (and response head verdicts: 512) per worker
ERROR_HEAD = RequestHead(b"", b"", "1.1", [], keep_alive=False)  # of a request not parsed
WAIVERS = "podkit.waivers"  # Exchange.user keys of Exchange.waive_response
EXTRA_HEAD = "podkit.extra_head"


class Exchange:
    """One request and its answer; also the context the pipeline's filters receive."""

    __slots__ = (
        "client",
        "close_after",
        "conn",
        "done",
        "head",
        "local",
        "observer",
        "pending",
        "pending_size",
        "replay",
        "replay_size",
        "request_done",
        "responded",
        "started",
        "tried",
        "tries",
        "upstream",
        "user",
        "waiting",
    )

    def __init__(self, client: ClientConnection, head: RequestHead) -> None:
        self.client = client
        self.head = head
        self.upstream: Upstream | None = None
        self.conn: UpstreamConnection | None = None
        self.pending: list[bytes] = []  # bytes for the upstream not yet written
        self.pending_size = 0
        self.replay: list[bytes] | None = None  # the body so far, while it may be retried
        self.replay_size = 0
        self.started = 0.0  # the request complete and sent to a first upstream, the later
        self.request_done = False
        self.responded = False  # a response head went to the client
        self.done = False
        self.close_after = False
        self.tries = 0
        self.tried: set[Upstream] | None = None
        self.local: bytes | None = None  # a complete local answer (errors, filters)
        self.observer: BodyObserver | None = None
        self.user: dict[str, Any] | None = None  # free space for filters
        self.waiting = False  # a back-off or a filter's wait will dispatch it again

    @property
    def client_address(self) -> str:
        return self.client.ip

    def admits(self, upstream: Upstream) -> bool:
        """Whether every filter lets this try go to `upstream`."""
        return all(f.admit(self, upstream) for f in self.client.lb.filters)

    def waive_response(self, head_lines: bytes = b"") -> None:
        """For a filter that reads answers: it need not read this one. `head_lines` (whole
        `Name: value\r\n` lines) go into the answer's head instead. When every such filter
        waives, the answer may take the fast path."""
        user = self.user
        if user is None:
            user = self.user = {}
        user[WAIVERS] = user.get(WAIVERS, 0) + 1
        user[EXTRA_HEAD] = user.get(EXTRA_HEAD, b"") + head_lines
