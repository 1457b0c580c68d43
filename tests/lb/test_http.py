"""HTTP/1.1 parser rules, without sockets."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podkit.net.http import (
    ClientConnection,
    Data,
    EndOfMessage,
    Event,
    HTTPError,
    RequestHead,
    RequestParser,
    ResponseHead,
    ServerConnection,
    Tunnel,
)
from podkit.net.httpwrite import chunk, last_chunk, simple_response


def events(conn: ServerConnection | ClientConnection) -> list[Event]:
    out = []
    while (e := conn.next_event()) is not None:
        out.append(e)
    return out


def parse(data: bytes, **limits: int) -> list[Event]:
    conn = ServerConnection(**limits)
    conn.receive_data(data)
    return events(conn)


def error(data: bytes, **limits: int) -> HTTPError:
    conn = ServerConnection(**limits)
    with pytest.raises(HTTPError) as info:
        conn.receive_data(data)
    return info.value


def test_simple_get() -> None:
    evs = parse(b"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-Y: z\r\n\r\n")
    head = evs[0]
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.version) == (b"GET", b"/a?b=1", "1.1")
    assert head.headers == [(b"Host", b"x"), (b"X-Y", b"z")]
    assert head.keep_alive and not head.has_body
    assert head.header(b"x-y") == b"z"
    assert isinstance(evs[1], EndOfMessage)


def test_http10_is_not_keep_alive_unless_asked() -> None:
    (head, _) = parse(b"GET / HTTP/1.0\r\n\r\n")
    assert isinstance(head, RequestHead) and not head.keep_alive
    (head, _) = parse(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert isinstance(head, RequestHead) and head.keep_alive
    (head, _) = parse(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert isinstance(head, RequestHead) and not head.keep_alive
    assert head.connection == frozenset({b"close"})


def test_pipelined_requests_in_one_read() -> None:
    data = (
        b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    evs = parse(data)
    kinds = [type(e).__name__ for e in evs]
    assert kinds == [
        "RequestHead",
        "EndOfMessage",
        "RequestHead",
        "Data",
        "EndOfMessage",
        "RequestHead",
        "EndOfMessage",
    ]
    assert [e.target for e in evs if isinstance(e, RequestHead)] == [b"/1", b"/2", b"/3"]


def test_chunked_body_streams_piece_by_piece() -> None:
    conn = ServerConnection()
    conn.receive_data(b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    (head,) = events(conn)
    assert isinstance(head, RequestHead) and head.chunked and head.has_body
    conn.receive_data(b"5\r\nhello\r\n")
    assert events(conn) == [Data(b"hello")]  # handed over before the body ends
    conn.receive_data(b"6\r\n world\r\n0\r\n\r\n")
    assert events(conn) == [Data(b" world"), EndOfMessage()]


def test_content_length_body_split_across_reads() -> None:
    conn = ServerConnection()
    conn.receive_data(b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123")
    evs = events(conn)
    assert evs[1:] == [Data(b"0123")]
    conn.receive_data(b"456789GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    evs = events(conn)
    assert evs[:2] == [Data(b"456789"), EndOfMessage()]
    assert isinstance(evs[2], RequestHead)


def test_head_split_byte_by_byte() -> None:
    conn = ServerConnection()
    data = b"GET /slow HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n"
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
    head, _end = events(conn)
    assert isinstance(head, RequestHead) and head.target == b"/slow"
    assert head.headers == [(b"Host", b"example"), (b"Accept", b"*/*")]


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
        b"G\x00T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
        b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"\r\n\r\n\r\nxx",
    ],
)
def test_malformed_requests_get_400(data: bytes) -> None:
    assert error(data).status == 400


def test_content_length_and_transfer_encoding_is_refused() -> None:
    err = error(
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    assert err.status == 400
    assert "smuggling" in err.detail
    err = error(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n0\r\n\r\n"
    )
    assert err.status == 400


def test_a_version_other_than_1_0_and_1_1_gets_505() -> None:
    err = error(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n")
    assert err.status == 505 and "HTTP/2.0 is not supported" in err.detail
    for version in (b"0.9", b"1.2", b"3.0"):  # the parser knows no such version: 400
        assert error(b"GET / HTTP/" + version + b"\r\nHost: x\r\n\r\n").status in (400, 505)
    (head, _) = parse(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
    assert isinstance(head, RequestHead) and head.version == "1.0"


def test_unknown_transfer_coding_is_refused() -> None:
    assert error(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n").status in (
        400,
        501,
    )


def test_headers_over_the_limit_get_431() -> None:
    big = b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n"
    assert error(big).status == 431
    many = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(150)) + b"\r\n"
    err = error(many)
    assert err.status == 431 and "header fields" in err.detail


def test_a_head_that_never_ends_gets_431_before_it_is_buffered_whole() -> None:
    conn = ServerConnection(max_head=4096)
    conn.receive_data(b"GET / HTTP/1.1\r\nX-Slow: ")
    with pytest.raises(HTTPError) as info:
        for _ in range(100):
            conn.receive_data(b"a" * 100)
    assert info.value.status == 431


def test_long_target_gets_414() -> None:
    assert error(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n").status == 414


def test_connect_is_refused() -> None:
    assert error(b"CONNECT example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n").status == 405


def test_errors_stick() -> None:
    conn = ServerConnection()
    with pytest.raises(HTTPError):
        conn.receive_data(b"BAD\x01\r\n\r\n")
    with pytest.raises(HTTPError):
        conn.receive_data(b"GET / HTTP/1.1\r\n\r\n")


def test_http2_gets_505_whether_by_its_preface_or_its_request_line() -> None:
    for data in (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n"):
        with pytest.raises(HTTPError) as info:
            parse(data)
        assert info.value.status == 505, info.value
        assert info.value.detail.startswith("HTTP/2")


def test_a_host_header_is_required_once_in_http11_and_at_most_once_in_10() -> None:
    assert error(b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n").detail == "no Host header"
    two = b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"
    assert error(two).detail == "more than one Host header"
    assert error(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n").status == 400
    (head, _) = parse(b"GET / HTTP/1.0\r\n\r\n")  # 1.0 may leave it out
    assert isinstance(head, RequestHead) and head.version == "1.0"
    (head, _) = parse(b"GET / HTTP/1.1\r\nHOST: a\r\n\r\n")
    assert isinstance(head, RequestHead)


def test_upgrade_hands_over_the_tunnel_bytes() -> None:
    evs = parse(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"\x81\x05hello"
    )
    head = evs[0]
    assert isinstance(head, RequestHead) and head.upgrade == b"websocket"
    assert evs[-1] == Tunnel(b"\x81\x05hello")
    conn = ServerConnection()
    conn.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\n")
    conn.receive_data(b"GET / HTTP/1.1\r\n\r\n")  # not HTTP any more: tunnel bytes
    assert events(conn)[-2:] == [Tunnel(b""), Tunnel(b"GET / HTTP/1.1\r\n\r\n")]


def test_response_framing() -> None:
    conn = ClientConnection()
    conn.expect(b"GET")
    conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    conn.receive_data(b"lo")
    head, d1, d2, end = events(conn)
    assert isinstance(head, ResponseHead) and head.status == 200 and head.reason == b"OK"
    assert (d1, d2, end) == (Data(b"hel"), Data(b"lo"), EndOfMessage())

    conn.expect(b"GET")
    conn.receive_data(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n")
    conn.receive_data(b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
    interim, head, data, end = events(conn)
    assert isinstance(interim, ResponseHead) and interim.status == 100
    assert isinstance(head, ResponseHead) and head.chunked and head.status == 201
    assert data == Data(b"abc") and end == EndOfMessage()


def test_response_to_head_ends_at_its_head() -> None:
    conn = ClientConnection()
    conn.expect(b"HEAD")
    conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n")
    head, end = events(conn)
    assert isinstance(head, ResponseHead) and head.no_body and not head.keep_alive
    assert end == EndOfMessage()


def test_response_until_close_and_no_body_statuses() -> None:
    conn = ClientConnection()
    conn.expect(b"GET")
    conn.receive_data(b"HTTP/1.1 200 OK\r\n\r\nstream")
    head, data = events(conn)
    assert isinstance(head, ResponseHead) and head.until_close and data == Data(b"stream")
    conn = ClientConnection()
    conn.expect(b"GET")
    conn.receive_data(b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n")
    head, end = events(conn)
    assert isinstance(head, ResponseHead) and head.no_body and end == EndOfMessage()


def test_bad_response_is_a_502() -> None:
    conn = ClientConnection()
    conn.expect(b"GET")
    with pytest.raises(HTTPError) as info:
        conn.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n")
    assert info.value.status == 502


def test_writers() -> None:
    assert chunk(b"hello") == b"5\r\nhello\r\n"
    resp = simple_response(503, b"down\n", close=True)
    assert resp.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Content-Length: 5\r\n" in resp and b"Connection: close\r\n" in resp
    assert resp.endswith(b"\r\n\r\ndown\n")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=8))
def test_arbitrary_bytes_raise_only_http_error(pieces: list[bytes]) -> None:
    conn = ServerConnection(max_head=1024, max_target=256)
    for piece in pieces:
        try:
            conn.receive_data(piece)
        except HTTPError as exc:
            assert 400 <= exc.status < 600
            return
        events(conn)


_token = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS"])
_headers = st.lists(
    st.tuples(
        st.sampled_from(
            [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"X-A", b"Upgrade"]
        ),
        st.sampled_from([b"1", b"0", b"chunked", b"close", b"keep-alive", b"x", b"", b"-1"]),
    ),
    max_size=5,
)


@settings(max_examples=400, deadline=None)
@given(_token, _headers, st.binary(max_size=60), st.integers(min_value=1, max_value=20))
def test_near_valid_requests_raise_only_http_error(
    method: bytes, headers: list[tuple[bytes, bytes]], tail: bytes, cut: int
) -> None:
    data = (
        method
        + b" / HTTP/1.1\r\n"
        + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
        + b"\r\n"
        + tail
    )
    conn = ServerConnection()
    try:
        for i in range(0, len(data), cut):
            conn.receive_data(data[i : i + cut])
            events(conn)
    except HTTPError as exc:
        assert 400 <= exc.status < 600


class _Requests:
    def __init__(self) -> None:
        self.heads: list[RequestHead] = []
        self.trailers_at_end: list[object] = []
        self.parser: RequestParser | None = None

    def on_request(self, head: RequestHead) -> None:
        self.heads.append(head)

    def on_body(self, data: bytes) -> None:
        pass

    def on_request_end(self) -> None:
        assert self.parser is not None
        self.trailers_at_end.append(list(self.parser.trailers))


def test_trailer_fields_stay_apart_from_the_head() -> None:
    """A trailer must never act as a header (it would reach the upstream's head)."""
    h = _Requests()
    p = h.parser = RequestParser(h)
    p.feed(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\nX-Sum: abc\r\nHost: evil\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
    )
    assert h.heads[0].headers == [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")]
    assert h.trailers_at_end == [
        [(b"X-Sum", b"abc"), (b"Host", b"evil"), (b"X-Forwarded-For", b"6.6.6.6")]
    ]
    # what a proxy forwards: routing, framing and forwarding fields are dropped (a
    # trailing X-Forwarded-For would let a client forge the address the proxy vouches for)
    assert last_chunk(p.trailers) == b"0\r\nX-Sum: abc\r\n\r\n"
    assert last_chunk(()) == b"0\r\n\r\n"
    p.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert h.trailers_at_end[-1] == []  # the next message starts without them


def test_trailer_fields_count_toward_the_header_limits() -> None:
    h = _Requests()
    p = h.parser = RequestParser(h, max_headers=4)
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
    with pytest.raises(HTTPError) as info:
        p.feed(head + b"A: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    assert info.value.status == 431 and "trailer" in info.value.detail
    h = _Requests()
    p = h.parser = RequestParser(h, max_head=100)
    with pytest.raises(HTTPError) as info:
        p.feed(head + b"A: " + b"x" * 200 + b"\r\n\r\n")
    assert info.value.status == 431


def test_a_connection_token_never_makes_a_framing_field_hop_by_hop() -> None:
    c = ServerConnection()
    c.receive_data(
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Content-Length, Host, X-Drop, Upgrade\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    head = c.next_event()
    assert isinstance(head, RequestHead)
    assert head.connection == frozenset({b"x-drop"})
    client = ClientConnection()
    client.expect(b"GET")
    client.receive_data(
        b"HTTP/1.1 200 OK\r\nConnection: content-length, transfer-encoding\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    answer = client.next_event()
    assert isinstance(answer, ResponseHead) and answer.connection == frozenset()


def test_an_upgrade_request_with_a_body_is_a_plain_request_with_its_body() -> None:
    """llhttp skips the body of an upgrading request: it must never become tunnel bytes."""
    c = ServerConnection()
    c.receive_data(
        b"POST /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    events = list(iter(c.next_event, None))
    assert [type(e).__name__ for e in events] == [
        "RequestHead", "Data", "EndOfMessage", "RequestHead", "EndOfMessage"
    ]  # fmt: skip
    first, second = events[0], events[3]
    assert isinstance(first, RequestHead) and first.upgrade is None and first.chunked
    assert isinstance(second, RequestHead) and second.target == b"/b"
    # a bad request after it is an HTTPError of its own, not a parser bug
    c = ServerConnection()
    with pytest.raises(HTTPError, match="Content-Length"):
        c.receive_data(
            b"POST /a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: x\r\n"
            b"Content-Length: 1\r\n\r\nzPOST /b HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n"
        )


@pytest.mark.parametrize(
    "surplus",
    [b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nPOISON!", b"HTTP/1.1 200 OK\r\nX-Pad: ", b"zz"],
)
def test_the_response_parser_reads_one_answer_per_expect(surplus: bytes) -> None:
    client = ClientConnection()
    client.expect(b"GET")
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + surplus)
    events = list(iter(client.next_event, None))
    assert [type(e).__name__ for e in events] == ["ResponseHead", "Data", "EndOfMessage"]
    assert client._parser.surplus
    client.expect(b"GET")  # stopped for good: its connection must be closed
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert client.next_event() is None


def test_empty_lines_after_an_answer_are_no_surplus() -> None:
    client = ClientConnection()
    client.expect(b"GET")
    client.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\r\n")
    assert not client._parser.surplus
    client.expect(b"GET")
    client.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert [type(e).__name__ for e in iter(client.next_event, None)] == [
        "ResponseHead", "Data", "EndOfMessage", "ResponseHead", "EndOfMessage"
    ]  # fmt: skip
