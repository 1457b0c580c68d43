"""The writer side of HTTP/1.1, sans-IO: a message's parts in, its bytes out.

Every head podkit sends is serialised here (`podkit.net.http` is the reading side):

- `request_head(method, target, fields, close=False)` and `response_head(status, fields,
  reason=None, close=False)`: a start line, each field as given (names, order and
  repeats kept), `Connection: close` last when asked, the blank line. A response's reason
  comes from `REASONS` unless given.
- `request_line`, `status_line`, `write_forwarded`: the pieces a proxy uses to rewrite a
  head it passes on, leaving out the fields that describe only one hop (`HOP_BY_HOP`,
  and those the Connection header names).
- `chunk(data)`, `LAST_CHUNK`, `last_chunk(trailers)`: the pieces of a chunked body.
- `simple_response(status, body, ...)`: a whole answer with a Content-Length body (error
  pages, local answers).

Nothing is checked here: the fields come from a parser that accepted them or from code
that made them, and a name or value must carry no CR or LF.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

REASONS: dict[int, bytes] = {
    100: b"Continue",
    101: b"Switching Protocols",
    200: b"OK",
    201: b"Created",
    202: b"Accepted",
    203: b"Non-Authoritative Information",
    204: b"No Content",
    206: b"Partial Content",
    300: b"Multiple Choices",
    301: b"Moved Permanently",
    302: b"Found",
    303: b"See Other",
    304: b"Not Modified",
    307: b"Temporary Redirect",
    308: b"Permanent Redirect",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    408: b"Request Timeout",
    409: b"Conflict",
    410: b"Gone",
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
UNKNOWN_REASON = b"Unknown"  # the reason of a status not in REASONS

# Hop-by-hop headers (RFC 9110 7.6.1): they describe one connection, never forwarded as is.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

Fields = Iterable[tuple[bytes, bytes]]


def request_line(method: bytes, target: bytes) -> bytes:
    return b"%b %b HTTP/1.1\r\n" % (method, target)


def status_line(status: int, reason: bytes | None = None) -> bytes:
    if reason is None:
        reason = REASONS.get(status, UNKNOWN_REASON)
    return b"HTTP/1.1 %d %b\r\n" % (status, reason)


def _head(start: bytes, fields: Fields, close: bool) -> bytes:
    parts = [start]
    append = parts.append
    for k, v in fields:
        append(k)
        append(b": ")
        append(v)
        append(b"\r\n")
    append(b"Connection: close\r\n\r\n" if close else b"\r\n")
    return b"".join(parts)


def request_head(
    method: bytes, target: bytes, fields: Fields = (), *, close: bool = False
) -> bytes:
    """`METHOD target HTTP/1.1`, each field, `Connection: close` if `close`, the blank line."""
    return _head(request_line(method, target), fields, close)


def response_head(
    status: int, fields: Fields = (), *, reason: bytes | None = None, close: bool = False
) -> bytes:
    """`HTTP/1.1 status reason` (from REASONS unless given), each field, `Connection:
    close` if `close`, the blank line."""
    return _head(status_line(status, reason), fields, close)


def write_forwarded(
    parts: list[bytes], fields: Sequence[tuple[bytes, bytes]], named: frozenset[bytes]
) -> None:
    """Append the field lines a proxy passes on: all but the hop-by-hop ones and those
    the Connection header names (`named`, lowercase)."""
    append = parts.append
    for k, v in fields:
        lk = k.lower()
        if lk in HOP_BY_HOP or (named and lk in named):
            continue
        append(k)
        append(b": ")
        append(v)
        append(b"\r\n")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
# Fields a proxy does not pass on in a trailer section (RFC 9110 6.5.1): hop-by-hop,
# framing, routing, request modifiers, authentication, and what a proxy vouches for.
NOT_IN_TRAILERS = HOP_BY_HOP | {
    b"content-length",
    b"content-encoding",
    b"content-range",
    b"content-type",
    b"host",
    b"expect",
    b"max-forwards",
    b"range",
    b"if-match",
    b"if-none-match",
    b"if-modified-since",
    b"if-unmodified-since",
    b"if-range",
    b"cache-control",
    b"pragma",
    b"age",
    b"expires",
    b"authorization",
    b"proxy-authorization",
    b"proxy-authenticate",
    b"www-authenticate",
    b"cookie",
    b"set-cookie",
    b"location",
    b"retry-after",
    b"vary",
    b"forwarded",
    b"via",
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-real-ip",
}


def last_chunk(trailers: Sequence[tuple[bytes, bytes]]) -> bytes:
    """The last chunk of a chunked body, carrying the trailer fields a proxy may forward."""
    if not trailers:
        return LAST_CHUNK
    parts = [b"0\r\n"]
    for k, v in trailers:
        if k.lower() not in NOT_IN_TRAILERS:
            parts += (k, b": ", v, b"\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def simple_response(
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
    close: bool = False,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> bytes:
    """A complete response with a Content-Length body (error pages, local answers)."""
    fields = [(b"Content-Type", content_type), (b"Content-Length", b"%d" % len(body))]
    if headers:
        fields += headers
    return response_head(status, fields, close=close) + body
