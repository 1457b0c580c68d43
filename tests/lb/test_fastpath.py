"""The response fast path's judgement: a chunked answer passes through as received only
when its framing is the plainest kind, and then the full parser agrees with it."""

from __future__ import annotations

import asyncio
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

from podkit.lb.balancer import LoadBalancer
from podkit.net.http import HTTPError, ResponseHead, ResponseParser
from podkit.net.proxy.engine import ProxyConfig
from podkit.net.proxy.upstreamconn import UpstreamConnection, _chunked_end, _judge_head

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked"


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"


class Collect:
    def __init__(self) -> None:
        self.heads: list[ResponseHead] = []
        self.body = b""
        self.ends = 0

    def on_response(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def on_body(self, data: bytes) -> None:
        self.body += data

    def on_response_end(self) -> None:
        self.ends += 1


def full_parse(data: bytes) -> Collect | None:
    """What the full parser makes of an answer: None when it refuses it."""
    c = Collect()
    p = ResponseParser(c)
    p.expect(b"GET")
    try:
        p.feed(data)
    except HTTPError:
        return None
    return c


def test_heads_that_may_pass_chunked() -> None:
    assert _judge_head(HEAD) == (200, -1)
    assert _judge_head(HEAD + b"\r\nConnection: keep-alive") == (200, -1)
    assert _judge_head(b"HTTP/1.1 404 Not Found\r\ntransfer-encoding:  Chunked ") == (404, -1)
    for bad in (
        HEAD + b"\r\nContent-Length: 10",  # both framings: never as is
        HEAD + b"\r\nTransfer-Encoding: chunked",  # twice
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\x0b",
        HEAD + b"\r\nTrailer: X-Sum",  # trailers announced: the full parser handles them
        HEAD + b"\r\nConnection: close",
        HEAD + b"\r\nVary: Transfer-Encoding",  # the name elsewhere: not judged here
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding : chunked\r\nContent-Length: 5",
    ):
        assert _judge_head(bad) == (0, 0), bad


def test_plain_chunked_bodies_are_measured() -> None:
    body = chunked([b"hello", b"x" * 300])
    assert _chunked_end(body, 0) == len(body)
    assert _chunked_end(b"0\r\n\r\n", 0) == 5
    assert _chunked_end(body + b"GET", 0) == len(body)  # the caller compares with len(data)
    for bad in (
        body[:-1],  # not all here yet
        b"5;ext=1\r\nhello\r\n0\r\n\r\n",  # extensions: the full parser's
        b"5 \r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"5\r\nhelloX\r\n0\r\n\r\n",
        b"0\r\nX-Sum: 1\r\n\r\n",  # trailers
        b"\r\n",
        b"1" * 17 + b"\r\n",  # over 16 hex digits
    ):
        assert _chunked_end(bad, 0) == -1, bad


pieces = st.lists(st.binary(min_size=1, max_size=40), max_size=4)
edits = st.lists(
    st.tuples(st.integers(0, 400), st.sampled_from([b"", b"0", b"\r", b"\n", b";", b" ", b"a"])),
    max_size=3,
)


@settings(max_examples=400, deadline=None)
@given(pieces, edits, st.booleans())
def test_whatever_passes_as_is_the_full_parser_reads_the_same(
    body_pieces: list[bytes], changes: list[tuple[int, bytes]], cut: bool
) -> None:
    """Differential: any answer the fast path would forward as received is one the full
    parser reads completely, with the same body and nothing left over."""
    body = chunked(body_pieces)
    for at, what in changes:  # replace one byte, or insert
        at = min(at, len(body))
        body = body[:at] + what + body[at + (1 if what else 0) :]
    if cut and body:
        body = body[: len(body) // 2]
    data = HEAD + b"\r\n\r\n" + body
    if _chunked_end(data, len(HEAD) + 4) != len(data):
        return  # left to the full parser
    seen = full_parse(data)
    assert seen is not None and seen.ends == 1
    if not changes and not cut:
        assert seen.body == b"".join(body_pieces)


@settings(max_examples=100, deadline=None)
@given(pieces)
def test_every_plain_chunked_body_takes_the_fast_path(body_pieces: list[bytes]) -> None:
    body = chunked(body_pieces)
    assert _chunked_end(HEAD + b"\r\n\r\n" + body, len(HEAD) + 4) == len(HEAD) + 4 + len(body)


async def test_chunked_answers_pass_through_unparsed_and_intact() -> None:
    answers = [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\n\r\n",
    ]

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        i = 0
        while True:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            writer.write(answers[i % 2 if i >= 4 else 0])  # 4 plain ones, then alternate
            i += 1
        writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    lb = LoadBalancer(ProxyConfig(upstreams=[f"127.0.0.1:{port}"], port=0))
    await lb.start()
    parsed = 0
    on_response = UpstreamConnection.on_response

    def counting(self: UpstreamConnection, head: ResponseHead) -> None:
        nonlocal parsed
        parsed += 1
        on_response(self, head)

    try:
        with patch.object(UpstreamConnection, "on_response", counting):
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.port)
            got = []
            for _ in range(6):
                writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 5)
                got.append((head, body))
            writer.close()
    finally:
        await lb.close(0.1)
        server.close()
    # the plain ones went through byte for byte; the one with a chunk extension was read
    # by the full parser and re-chunked, with the same content
    assert [h for h, _ in got[:4]] == [answers[0].split(b"\r\n\r\n")[0] + b"\r\n\r\n"] * 4
    assert all(b == b"5\r\nhello\r\n0\r\n\r\n" for _, b in got)
    assert parsed == 1
