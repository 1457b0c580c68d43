"""`etcd://host:port?prefix=NS`: the KV Protocol on etcd 3.4+, through its v3 JSON gateway.

    kv = await open_kv("etcd://127.0.0.1:2379?prefix=myapp/")

Transport. Every call is one POST of JSON to etcd's built-in gRPC gateway (`/v3/kv/put`,
`/v3/kv/range`, `/v3/kv/deleterange`, `/v3/kv/txn`, `/v3/lease/*`, `/v3/watch`) over
podkit's own HTTP client (`podkit.net.client.HTTPClient`, keep-alive connections), not
over gRPC, because:
- no grpcio and no generated protobuf stubs: the driver needs nothing beyond podkit;
- the gateway is on by default on the client port and serves `/v3/` from etcd 3.4 on
  (3.3 had `/v3beta`, 3.2 `/v3alpha`); 3.5 serves only `/v3/`;
- a watch is a streamed HTTP response (`HTTPClient.stream()`, with no deadline): one
  JSON object per line, each `{"result": ...}`.
Costs of that choice: keys and values are base64 and int64 fields are strings; a lease
renewal is one request (`/v3/lease/keepalive` with a single message), not a long-lived
stream; and HTTP/1.1 cannot send more on a request body while its response streams, so
each watch holds its own connection (TCP keep-alive probes on it notice a peer that
went silently) and is cancelled by closing it.

Semantics.
- `prefix=` in the URL namespaces every key; keys handed back have it stripped.
- Revisions are etcd's own `mod_revision` / `create_revision`: store-wide and strictly
  increasing, hence usable as fencing tokens. `range(p)` reads from NS+p up to NS+p with
  its last byte incremented (`prefix_end`).
- Compare-and-swap is one `/v3/kv/txn`, as in etcd's client/v3/concurrency: create
  compares `create_revision == 0`; update and delete_if compare `mod_revision == revision`.
- Leases are native. etcd counts them in whole seconds, so `grant(ttl)` asks for
  `ceil(ttl)`; and etcd raises any TTL to its minimum, 1.5 x the election timeout rounded
  up to whole seconds (etcdserver/server.go: `minTTL = (3*ElectionTicks/2) * heartbeat`,
  `MinLeaseTTL = ceil(minTTL)`): 2 s with the defaults
  (`--heartbeat-interval=100 --election-timeout=1000`), 1 s with `--heartbeat-interval=10
  --election-timeout=100`, which the tests use. The lessor looks for expired leases every
  500 ms, so a key goes between TTL and TTL + ~0.5 s after its last renewal. A write naming
  a dead lease raises `LeaseExpired`; `keep_alive` of a dead lease returns False.
- A watch resumes by itself after a lost connection (etcd restarted, socket reset) from
  the last delivered revision + 1, so nothing is missed or repeated. A start revision
  that etcd has compacted away raises `BackendError`.

Failures. Opening makes one round trip (`/v3/maintenance/status`) and raises
`BackendUnavailable` if nothing answers. A request that could not connect was never
sent, so any request is retried, with back-off, for up to `timeout` seconds. A request
lost after it was sent is retried only if repeating it is harmless (reads, lease
renewal, revoke, grant: the way clientv3 retries; a repeated grant can leave one unused
lease that expires after its TTL); a lost write raises `BackendUnavailable` saying its
outcome is unknown, and is never sent again by the client either (`resend=False`), even
on a keep-alive connection that looked idle. etcd answering "unavailable" (gRPC 14) is
retried likewise.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import socket
from collections.abc import AsyncIterator
from typing import Any

from podkit.backends.base import (
    BackendError,
    BackendUnavailable,
    Entry,
    Event,
    LeaseExpired,
    UnsupportedURL,
)
from podkit.backends.url import BackendURL
from podkit.clock import Clock, SystemClock
from podkit.net.client import ClientError, ConnectError, HTTPClient, ProtocolError, StreamResponse

log = logging.getLogger(__name__)

DEFAULT_PORT = 2379
_HEADERS = (("Content-Type", "application/json"),)
_FIRST_DELAY = 0.05  # back-off between retries: doubles up to _MAX_DELAY
_MAX_DELAY = 1.0
_UNAVAILABLE = 14  # gRPC code: a retryable server-side failure (no leader, shutting down)
_WATCH_RETRYABLE = frozenset({1, 2, 4, 10, 13, 14})  # gRPC codes after which a watch resumes

# Raised before the request left this process (ConnectTimeout is one): always retried.
_NOT_SENT = ConnectError
# Raised after it may have reached etcd: retry only what is safe to repeat.
_LOST = (ProtocolError, TimeoutError)


# ---------------------------------------------------------------------------- codec


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


def _encode(key: str) -> bytes:
    return key.encode("utf-8", "surrogateescape")


def prefix_end(prefix: bytes) -> bytes:
    """etcd's `range_end` for every key starting with `prefix` (clientv3.GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if not end:
        return b"\x00"  # no upper bound: every key
    end[-1] += 1
    return bytes(end)


class StreamDecoder:
    """Splits a streamed gateway response (one JSON object per line) into messages."""

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        """The messages completed by `data`; a partial last line waits for more."""
        *lines, self._tail = (self._tail + data).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


def _grpc_error(status: int, raw: bytes) -> tuple[int | None, str]:
    """(gRPC code, message) of a gateway error answer."""
    try:
        body = json.loads(raw)
        return body.get("code"), str(body.get("message") or body.get("error") or body)
    except (ValueError, AttributeError):
        return None, f"HTTP {status}: {raw[:200].decode('utf-8', 'replace')}"


# ---------------------------------------------------------------------------- KV


class EtcdKV:
    """The etcd KV: one HTTP client, keys under the URL's `prefix`."""

    def __init__(
        self,
        url: BackendURL,
        client: HTTPClient,
        *,
        namespace: str,
        timeout: float,
        clock: Clock,
    ) -> None:
        self.url = url.masked
        self._parsed = url
        self._client = client
        self._base = f"http://{url.address(DEFAULT_PORT)}"
        self._ns = _encode(namespace)
        self._timeout = timeout
        self._clock = clock
        self._closed = False
        self._warned_min_ttl = False
        self._streams: set[StreamResponse] = set()  # open watches, ended by close()

    # ------------------------------------------------------------------ plumbing

    def _key(self, key: str) -> str:
        return _b64(self._ns + _encode(key))

    def _strip(self, raw_key: str) -> str:
        return base64.b64decode(raw_key)[len(self._ns) :].decode("utf-8", "surrogateescape")

    def _entry(self, kv: dict[str, Any]) -> Entry:
        lease = kv.get("lease")
        return Entry(
            self._strip(kv["key"]),
            _unb64(kv.get("value")),
            int(kv["mod_revision"]),
            int(kv["create_revision"]),
            int(lease) if lease else None,
        )

    def _event(self, ev: dict[str, Any]) -> Event:
        kv = ev["kv"]
        key, revision = self._strip(kv["key"]), int(kv["mod_revision"])
        if ev.get("type") == "DELETE":
            return Event("delete", key, None, revision)
        return Event("put", key, _unb64(kv.get("value")), revision)

    def _failed(self, path: str, code: int | None, message: str) -> BackendError:
        if code == 5 and "lease not found" in message:
            return LeaseExpired(f"{self.url}: {message}")
        return BackendError(f"{self.url}: {path} failed: {message}")

    async def _call(self, path: str, body: dict[str, Any], *, repeatable: bool) -> Any:
        """POST `body` to `path`; the decoded answer. Retries as the module docstring says."""
        data = json.dumps(body).encode()
        url = self._base + path
        deadline: float | None = None
        delay = _FIRST_DELAY
        while True:
            if self._closed:
                raise BackendError(f"{self.url}: closed")
            try:
                resp = await self._client.post(url, data, headers=_HEADERS, resend=repeatable)
                if resp.status == 200:
                    return json.loads(resp.body)
                code, message = _grpc_error(resp.status, resp.body)
                if not (repeatable and code == _UNAVAILABLE):
                    raise self._failed(path, code, message)
                why: object = message
            except _NOT_SENT as exc:
                why = exc
            except _LOST as exc:
                if not repeatable:
                    raise BackendUnavailable(
                        f"{self.url}: lost the connection to {self._parsed.address(DEFAULT_PORT)}"
                        f" during {path}; the write may or may not have happened ({exc!r})"
                    ) from exc
                why = exc
            now = self._clock.now()
            if deadline is None:
                deadline = now + self._timeout
            if now >= deadline:
                raise self._parsed.unavailable(DEFAULT_PORT, self._timeout, why)
            log.debug("%s: retrying %s in %.2fs (%s)", self.url, path, delay, why)
            await self._clock.sleep(min(delay, deadline - now))
            delay = min(delay * 2, _MAX_DELAY)

    async def _txn(self, compare: dict[str, Any], op: dict[str, Any]) -> dict[str, Any] | None:
        """One compare-then-op transaction; its answer, or None if the compare failed."""
        answer = await self._call(
            "/v3/kv/txn", {"compare": [compare], "success": [op]}, repeatable=False
        )
        return answer if answer.get("succeeded") else None

    def _put_op(self, key: str, value: bytes, lease: int | None) -> dict[str, Any]:
        op: dict[str, Any] = {"key": self._key(key), "value": _b64(value)}
        if lease is not None:
            op["lease"] = str(lease)
        return op

    # ------------------------------------------------------------------ reads

    async def get(self, key: str) -> Entry | None:
        """The key's entry, or None when absent (or its lease expired)."""
        answer = await self._call("/v3/kv/range", {"key": self._key(key)}, repeatable=True)
        kvs = answer.get("kvs")
        return self._entry(kvs[0]) if kvs else None

    async def range(self, prefix: str) -> list[Entry]:
        """Every live entry whose key starts with `prefix`, sorted by key."""
        start = self._ns + _encode(prefix)
        body = {"key": _b64(start or b"\x00"), "range_end": _b64(prefix_end(start))}
        answer = await self._call("/v3/kv/range", body, repeatable=True)
        return [self._entry(kv) for kv in answer.get("kvs", ())]

    async def revision(self) -> int:
        """The store's revision now (from a count-only read's header)."""
        body = {"key": _b64(b"\x00"), "count_only": True}
        answer = await self._call("/v3/kv/range", body, repeatable=True)
        return int(answer["header"]["revision"])

    # ------------------------------------------------------------------ writes

    async def put(self, key: str, value: bytes, *, lease: int | None = None) -> int:
        """Write unconditionally; the new revision. A dead lease raises LeaseExpired."""
        answer = await self._call("/v3/kv/put", self._put_op(key, value, lease), repeatable=False)
        return int(answer["header"]["revision"])

    async def create(self, key: str, value: bytes, *, lease: int | None = None) -> int | None:
        """Write only if the key is absent (create_revision == 0); new revision or None."""
        compare = {"key": self._key(key), "target": "CREATE", "create_revision": "0"}
        answer = await self._txn(compare, {"request_put": self._put_op(key, value, lease)})
        return None if answer is None else int(answer["header"]["revision"])

    async def update(
        self, key: str, value: bytes, *, revision: int, lease: int | None = None
    ) -> int | None:
        """Write only if the key's mod_revision is `revision`; new revision or None."""
        if revision <= 0:
            return None  # mod_revision 0 would match an absent key
        compare = {"key": self._key(key), "target": "MOD", "mod_revision": str(revision)}
        answer = await self._txn(compare, {"request_put": self._put_op(key, value, lease)})
        return None if answer is None else int(answer["header"]["revision"])

    async def delete(self, key: str) -> bool:
        """Delete; True if the key existed."""
        answer = await self._call("/v3/kv/deleterange", {"key": self._key(key)}, repeatable=False)
        return int(answer.get("deleted", 0)) > 0

    async def delete_if(self, key: str, *, revision: int) -> bool:
        """Delete only if the key's mod_revision is `revision`; True if deleted."""
        if revision <= 0:
            return False
        compare = {"key": self._key(key), "target": "MOD", "mod_revision": str(revision)}
        answer = await self._txn(compare, {"request_delete_range": {"key": self._key(key)}})
        if answer is None:
            return False
        deleted = answer["responses"][0]["response_delete_range"].get("deleted", 0)
        return int(deleted) > 0

    # ------------------------------------------------------------------ leases

    async def grant(self, ttl: float) -> int:
        """A new lease of ceil(ttl) whole seconds (at least etcd's minimum TTL)."""
        asked = max(1, math.ceil(ttl))
        answer = await self._call("/v3/lease/grant", {"TTL": str(asked)}, repeatable=True)
        if answer.get("error"):
            raise BackendError(f"{self.url}: lease grant failed: {answer['error']}")
        granted = int(answer.get("TTL", asked))
        if granted > asked and not self._warned_min_ttl:
            self._warned_min_ttl = True
            log.warning(
                "%s: etcd raised a lease TTL from %ss to its minimum %ss "
                "(1.5 x --election-timeout, rounded up)",
                self.url,
                asked,
                granted,
            )
        return int(answer["ID"])

    async def keep_alive(self, lease: int) -> bool:
        """Renew the lease for another TTL; False if it already expired or is unknown."""
        answer = await self._call("/v3/lease/keepalive", {"ID": str(lease)}, repeatable=True)
        if "error" in answer:
            raise BackendError(f"{self.url}: keep-alive failed: {answer['error']}")
        return int(answer.get("result", {}).get("TTL", 0)) > 0

    async def revoke(self, lease: int) -> None:
        """End the lease now, deleting its keys; an unknown lease is ignored."""
        try:
            await self._call("/v3/lease/revoke", {"ID": str(lease)}, repeatable=True)
        except LeaseExpired:
            pass

    # ------------------------------------------------------------------ watch

    async def watch(
        self, key: str, *, prefix: bool = False, start_revision: int | None = None
    ) -> AsyncIterator[Event]:
        """Changes of `key` (or under it) in revision order, from `start_revision` or now;
        reconnects from the last delivered revision + 1. Ends when the store is closed."""
        full = self._ns + _encode(key)
        create: dict[str, Any] = {"key": _b64(full or b"\x00")}
        if prefix:
            create["range_end"] = _b64(prefix_end(full))
        next_rev = start_revision  # None: "from now", fixed by the first `created` answer
        delay = _FIRST_DELAY
        url = self._base + "/v3/watch"
        while not self._closed:
            request = dict(create)
            if next_rev is not None:
                request["start_revision"] = str(next_rev)
            why: object
            body = json.dumps({"create_request": request}).encode()
            try:
                async with self._client.stream(
                    "POST", url, headers=_HEADERS, body=body, timeout=math.inf
                ) as resp:
                    if resp.status != 200:
                        raw = b"".join([piece async for piece in resp.iter_body()])
                        code, message = _grpc_error(resp.status, raw)
                        if code not in _WATCH_RETRYABLE and resp.status < 500:
                            raise self._failed("/v3/watch", code, message)
                        raise _Resume(message)
                    _keep_probing(resp)
                    self._streams.add(resp)
                    try:
                        if self._closed:  # close() ran while this watch connected
                            return
                        decoder = StreamDecoder()
                        async for chunk in resp.iter_body():
                            for msg in decoder.feed(chunk):
                                next_rev, events = self._watch_answer(msg, next_rev)
                                for event in events:
                                    next_rev = event.revision + 1
                                    delay = _FIRST_DELAY
                                    yield event
                    finally:
                        self._streams.discard(resp)
                why = "stream ended"
            except _Resume as exc:
                why = exc
            except (ClientError, OSError, TimeoutError) as exc:  # close() ends one this way
                why = exc
            if self._closed:
                return
            log.info("%s: watch on %r lost (%s); resuming at %s", self.url, key, why, next_rev)
            await self._clock.sleep(delay)
            delay = min(delay * 2, _MAX_DELAY)

    def _watch_answer(
        self, msg: dict[str, Any], next_rev: int | None
    ) -> tuple[int | None, list[Event]]:
        """One streamed watch answer: (the revision to resume at, its events). Raises
        `_Resume` for a stream error worth resuming after, `BackendError` otherwise."""
        if "error" in msg:
            err = msg["error"]
            code = err.get("grpc_code", err.get("code"))
            if code not in _WATCH_RETRYABLE:
                raise self._failed("/v3/watch", code, str(err.get("message", err)))
            raise _Resume(err.get("message", err))
        result = msg.get("result", {})
        if result.get("created") and next_rev is None:
            next_rev = int(result["header"]["revision"]) + 1
        if result.get("canceled"):
            raise self._canceled(result, next_rev)
        return next_rev, [self._event(ev) for ev in result.get("events", ())]

    def _canceled(self, result: dict[str, Any], next_rev: int | None) -> BackendError:
        compacted = int(result.get("compact_revision", 0))
        if compacted:
            return BackendError(
                f"{self.url}: watch start revision {next_rev} was compacted away; "
                f"the oldest revision still kept is {compacted}"
            )
        return BackendError(f"{self.url}: etcd canceled the watch: {result.get('cancel_reason')}")

    async def close(self) -> None:
        """Close the client; open watches end."""
        self._closed = True
        for stream in self._streams:
            stream.close()  # wakes its reader: closing the client alone does not
        self._streams.clear()
        await self._client.close()


class _Resume(Exception):
    """A watch stream ended in a way that is resumed from the last revision."""


def _keep_probing(resp: StreamResponse) -> None:
    """TCP keep-alive on a watch socket, so a silently dead peer is noticed (~25 s)."""
    sock = resp.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


# ---------------------------------------------------------------------------- opening


async def open_kv(
    url: BackendURL,
    *,
    timeout: float = 5.0,
    clock: Clock | None = None,
    **_: Any,
) -> EtcdKV:
    """Connect and prove that etcd answers; `timeout` bounds the probe and each request
    (with its retries). Each open watch holds a connection of its own."""
    unknown = sorted(set(url.query) - {"prefix"})
    if unknown:
        raise UnsupportedURL(f"{url.masked}: unknown etcd URL option(s): {', '.join(unknown)}")
    if url.path not in ("", "/"):
        raise UnsupportedURL(f"{url.masked}: etcd URLs take no path (use ?prefix= to namespace)")
    if url.username or url.password:
        raise UnsupportedURL(f"{url.masked}: etcd authentication is not supported yet")
    client = HTTPClient(timeout=timeout, connect_timeout=timeout)
    kv = EtcdKV(
        url,
        client,
        namespace=url.query.get("prefix", ""),
        timeout=timeout,
        clock=clock or SystemClock(),
    )
    probe = f"http://{url.address(DEFAULT_PORT)}/v3/maintenance/status"
    try:
        resp = await client.post(probe, b"{}", headers=_HEADERS)
    except (ClientError, OSError, TimeoutError) as exc:
        await client.close()
        raise url.unavailable(DEFAULT_PORT, timeout, exc) from None
    if resp.status != 200 or b'"version"' not in resp.body:
        await client.close()
        raise BackendError(
            f"{url.masked}: {url.address(DEFAULT_PORT)} is not an etcd 3.4+ v3 gateway "
            f"(/v3/maintenance/status answered HTTP {resp.status})"
        )
    return kv
