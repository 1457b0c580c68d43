"""The writer side of HTTP/1.1 (`podkit.net.httpwrite`), judged by h11: what it writes
parses in h11, a strict parser, into the same method, target, status, reason, fields (names
as written, in order) and body. The heads podkit sends from other modules are checked
byte for byte, as they were before they came here."""

from __future__ import annotations

import h11
from hypothesis import given
from hypothesis import strategies as st

from podkit.net.httpwrite import (
    NOT_IN_TRAILERS,
    REASONS,
    chunk,
    last_chunk,
    request_head,
    response_head,
    simple_response,
    status_line,
    write_forwarded,
)

TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# fields h11 acts on (framing, Host, Expect): left to the tests that mean them
ACTED_ON = {b"content-length", b"transfer-encoding", b"connection", b"host", b"expect", b"te"}

names = st.text(TOKEN, min_size=1, max_size=20).map(str.encode)
names = names.filter(lambda n: n.lower() not in ACTED_ON)
# visible characters with spaces inside (h11 strips them at either end)
values = st.from_regex(rb"\A([\x21-\x7e]([\x20-\x7e]{0,30}[\x21-\x7e])?)?\Z")
field_lists = st.lists(st.tuples(names, values), max_size=8)


def server_reads(data: bytes) -> list[object]:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    return events(conn)


def client_reads(data: bytes, method: bytes = b"GET") -> list[object]:
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    return events(conn)


def events(conn: h11.Connection) -> list[object]:
    out = []
    while True:
        e = conn.next_event()
        if e is h11.NEED_DATA or e is h11.PAUSED:
            return out
        out.append(e)


@given(
    st.sampled_from([b"GET", b"POST", b"DELETE", b"PURGE"]),
    st.from_regex(rb"\A/[\x21-\x7e]{0,40}\Z"),
    field_lists,
    st.booleans(),
)
def test_a_request_head_reads_back_in_h11_as_written(
    method: bytes, target: bytes, fields: list[tuple[bytes, bytes]], close: bool
) -> None:
    fields = [(b"Host", b"example.test"), *fields]
    req, end = server_reads(request_head(method, target, fields, close=close))
    assert isinstance(end, h11.EndOfMessage)  # no body
    assert isinstance(req, h11.Request)
    assert (req.method, req.target, req.http_version) == (method, target, b"1.1")
    expected = [*fields, (b"Connection", b"close")] if close else fields
    assert list(req.headers.raw_items()) == expected


@given(st.sampled_from(sorted(s for s in REASONS if s >= 200)), field_lists, st.booleans())
def test_a_response_head_reads_back_in_h11_as_written(
    status: int, fields: list[tuple[bytes, bytes]], close: bool
) -> None:
    head = response_head(status, [(b"Content-Length", b"0"), *fields], close=close)
    resp, *_ = client_reads(head)
    assert isinstance(resp, h11.Response)
    assert (resp.status_code, resp.reason) == (status, REASONS[status])
    expected = [(b"Content-Length", b"0"), *fields]
    if close:
        expected.append((b"Connection", b"close"))
    assert list(resp.headers.raw_items()) == expected


def test_a_status_line_takes_its_reason_from_the_table_or_as_given() -> None:
    assert status_line(404) == b"HTTP/1.1 404 Not Found\r\n"
    assert status_line(299) == b"HTTP/1.1 299 Unknown\r\n"
    assert status_line(200, b"Fine") == b"HTTP/1.1 200 Fine\r\n"
    assert status_line(200, b"") == b"HTTP/1.1 200 \r\n"  # an empty reason is valid
    resp, *_ = client_reads(response_head(200, [(b"Content-Length", b"0")], reason=b""))
    assert isinstance(resp, h11.Response) and resp.reason == b""


def test_an_interim_answer_is_a_head_alone() -> None:
    assert response_head(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", "x"), ("Content-Length", "1"), ("Expect", "100-continue")]
    conn.send(h11.Request(method="POST", target="/", headers=headers))
    conn.receive_data(response_head(100))
    (interim,) = events(conn)
    assert isinstance(interim, h11.InformationalResponse) and interim.status_code == 100


@given(st.binary(max_size=300), st.sampled_from([200, 404, 429, 503]), st.booleans())
def test_a_simple_response_reads_back_whole(body: bytes, status: int, close: bool) -> None:
    extra = [(b"Retry-After", b"3")]
    resp, *data, end = client_reads(simple_response(status, body, headers=extra, close=close))
    assert isinstance(resp, h11.Response) and resp.status_code == status
    assert resp.headers.raw_items()[:3] == [
        (b"Content-Type", b"text/plain; charset=utf-8"),
        (b"Content-Length", b"%d" % len(body)),
        (b"Retry-After", b"3"),
    ]
    assert (resp.headers.raw_items()[-1] == (b"Connection", b"close")) is close
    assert b"".join(d.data for d in data if isinstance(d, h11.Data)) == body
    assert isinstance(end, h11.EndOfMessage)


@given(st.lists(st.binary(min_size=1, max_size=50), max_size=5), field_lists)
def test_chunks_and_the_last_chunk_read_back_as_the_body_and_its_trailers(
    pieces: list[bytes], trailers: list[tuple[bytes, bytes]]
) -> None:
    head = response_head(200, [(b"Transfer-Encoding", b"chunked")])
    out = client_reads(head + b"".join(chunk(p) for p in pieces) + last_chunk(trailers))
    assert isinstance(out[0], h11.Response)
    body = b"".join(e.data for e in out if isinstance(e, h11.Data))
    assert body == b"".join(pieces)
    end = out[-1]
    assert isinstance(end, h11.EndOfMessage)
    kept = [(k, v) for k, v in trailers if k.lower() not in NOT_IN_TRAILERS]
    assert list(end.headers.raw_items()) == kept


def test_a_forwarded_head_leaves_out_what_describes_one_hop_only() -> None:
    fields = [
        (b"Content-Type", b"text/plain"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Connection", b"X-Private, keep-alive"),
        (b"X-Private", b"secret"),
        (b"Transfer-Encoding", b"chunked"),
        (b"x-kept", b"1"),
    ]
    parts = [status_line(200)]
    write_forwarded(parts, fields, frozenset({b"x-private"}))
    assert b"".join(parts) == b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nx-kept: 1\r\n"


def test_every_status_a_cache_stores_has_its_reason() -> None:
    from podkit.lb.cache import CACHEABLE_STATUS

    assert REASONS.keys() >= CACHEABLE_STATUS


def test_the_heads_podkit_sends_are_the_same_bytes_as_before() -> None:
    from podkit.net.client import _encode
    from podkit.net.server import CONTINUE, Response, response_bytes
    from podkit.net.tlsconn import PLAIN_HTTP_ANSWER

    assert CONTINUE == b"HTTP/1.1 100 Continue\r\n\r\n"
    resp = Response(201, b"made", b"text/plain", [(b"Location", b"/x")])
    assert response_bytes(resp, close=True, server=b"podkit") == (
        b"HTTP/1.1 201 Created\r\nServer: podkit\r\nContent-Type: text/plain\r\n"
        b"Content-Length: 4\r\nLocation: /x\r\nConnection: close\r\n\r\nmade"
    )
    assert response_bytes(resp, close=False, server=b"s", body=False).endswith(b"/x\r\n\r\n")
    assert PLAIN_HTTP_ANSWER.startswith(
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n"
        b"Content-Length: 61\r\n\r\nThis port speaks HTTPS"
    )
    key, data, method = _encode("post", "http://h:81/p?q=1", [("X-A", "1")], b"hi", None)
    assert (key[:3], method) == (("h", 81, False), b"POST")
    assert data == b"POST /p?q=1 HTTP/1.1\r\nHost: h:81\r\nX-A: 1\r\nContent-Length: 2\r\n\r\nhi"
    _, data, _ = _encode("GET", "http://h/", [], b"", None)
    assert data == b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"
