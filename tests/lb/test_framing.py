"""Request smuggling and answers mixed between clients (U1, U2, U3 of the security issue),
through `podkit lb`, `podkit sidecar tls` and `podkit ambassador split`, and through nginx
beside them on the same recording backend: the backend never parses a request the client
did not frame, and no client receives bytes of another's answer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from framing import (
    POISON,
    PROXIES,
    SECRET,
    Proxy,
    RecordingBackend,
    answer_body,
    exchange,
    started,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    b = RecordingBackend()
    yield b
    b.close()


@pytest.fixture(scope="module", params=PROXIES)
def proxy(request: pytest.FixtureRequest, backend: RecordingBackend) -> Iterator[Proxy]:
    with started(request.param, backend) as p:
        yield p


@pytest.fixture
def fresh(backend: RecordingBackend, proxy: Proxy) -> Iterator[RecordingBackend]:
    """The backend with an empty record; the proxy still runs after the test."""
    backend.clear()
    yield backend
    assert proxy.proc.poll() is None, proxy.output()


def keys(backend: RecordingBackend) -> list[tuple[bytes, bytes, bytes]]:
    backend.settle()
    return [p.key for p in backend.parsed]


def test_u1_a_connection_token_never_removes_the_request_length(
    proxy: Proxy, fresh: RecordingBackend
) -> None:
    body = b"GET /hijacked HTTP/1.1\r\nX-Swallow: "
    a = exchange(
        proxy,
        [b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Content-Length\r\n"
         b"Content-Length: %d\r\n\r\n%b" % (len(body), body)],
        [b"POST"],
    )  # fmt: skip
    b = exchange(
        proxy, [b"GET /victim HTTP/1.1\r\nHost: x\r\nCookie: session=SECRET\r\n\r\n"], [b"GET"]
    )
    assert keys(fresh) == [(b"POST", b"/a", body), (b"GET", b"/victim", b"")]
    assert fresh.parsed[1].header(b"cookie") == b"session=SECRET"
    assert [x.body for x in a.answers] == [answer_body(b"/a")]
    assert [x.body for x in b.answers] == [answer_body(b"/victim")]
    assert not fresh.errors


def test_u1_a_connection_token_never_removes_the_answer_length(
    proxy: Proxy, fresh: RecordingBackend
) -> None:
    """The upstream's `Connection: Content-Length`: the client still gets a framed answer,
    and its next request on the same connection gets its own."""
    reply = exchange(
        proxy,
        [b"GET /c?a=conncl HTTP/1.1\r\nHost: x\r\n\r\nGET /d HTTP/1.1\r\nHost: x\r\n\r\n"],
        [b"GET", b"GET"],
    )
    assert [x.body for x in reply.answers] == [answer_body(b"/c?a=conncl"), answer_body(b"/d")]
    assert all(x.header(b"content-length") for x in reply.answers)
    assert reply.rest == b"" and not reply.error


def test_u2_an_upgrade_request_with_a_body_is_answered_at_once(
    proxy: Proxy, fresh: RecordingBackend
) -> None:
    """The body goes upstream as a body: a backend that reads it before answering
    answers at once (the body was once held back as tunnel bytes: 504 after 60 s)."""
    reply = exchange(
        proxy,
        [b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
         b"Content-Length: 5\r\n\r\nhello"],
        [b"POST"],
        timeout=5,
    )  # fmt: skip
    assert [(x.status, x.body) for x in reply.answers] == [(200, answer_body(b"/up"))]
    assert keys(fresh) == [(b"POST", b"/up", b"hello")]


def _forwarded_head_size(proxy: Proxy, backend: RecordingBackend, request: bytes) -> int:
    """How long the head the proxy forwards for `request` is (from what the backend saw)."""
    backend.clear()
    exchange(proxy, [request], [b"POST"])
    backend.settle()
    seen = backend.parsed[-1]
    line = b"%b %b HTTP/1.1\r\n" % (seen.method, seen.target)
    return len(line) + sum(len(k) + len(v) + 4 for k, v in seen.headers) + 2


def test_u2_an_answer_before_the_body_does_not_pool_the_connection_for_another_client(
    proxy: Proxy, fresh: RecordingBackend
) -> None:
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (
        len(smuggled),
        smuggled,
    )
    n = _forwarded_head_size(proxy, fresh, second)
    fresh.clear()
    first = exchange(
        proxy,
        [b"POST /early?a=early HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
         b"Upgrade: websocket\r\nContent-Length: %d\r\n\r\n%b" % (n, b"B" * n)],
        [b"POST"],
    )  # fmt: skip
    then = exchange(proxy, [second], [b"POST"])
    assert keys(fresh) == [(b"POST", b"/early?a=early", b"B" * n), (b"POST", b"/x", smuggled)]
    assert [x.body for x in first.answers] == [answer_body(b"/early?a=early")]
    assert [x.body for x in then.answers] == [answer_body(b"/x")]


def test_u3_a_second_answer_in_one_write_never_reaches_a_client(
    proxy: Proxy, fresh: RecordingBackend
) -> None:
    reply = exchange(
        proxy,
        [b"GET /p?a=poison HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n"],
        [b"GET", b"GET"],
    )
    assert [x.body for x in reply.answers] == [answer_body(b"/p?a=poison"), answer_body(b"/next")]
    assert reply.rest == b""
    other = exchange(proxy, [b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n"], [b"GET"])
    assert [x.body for x in other.answers] == [answer_body(b"/other")]
    assert keys(fresh) == [(b"GET", b"/p?a=poison", b""), (b"GET", b"/next", b""),
                           (b"GET", b"/other", b"")]  # fmt: skip
    assert POISON[-7:] not in b"".join(x.body for x in [*reply.answers, *other.answers])
    if proxy.kind != "nginx":  # counted and logged under the component's own name
        who = {"lb": "lb", "sidecar-tls": "sidecar tls", "split": "ambassador split"}
        assert f"{who[proxy.kind]}: upstream 127.0.0.1:" in proxy.output()
        assert "after a complete answer" in proxy.output()
    if proxy.kind == "lb":
        assert proxy.metric("podkit_lb_upstream_surplus_total") >= 1


def test_u3_the_start_of_a_surplus_answer_never_frames_another_clients_answer(
    proxy: Proxy, fresh: RecordingBackend
) -> None:
    a = exchange(proxy, [b"GET /l?a=leak HTTP/1.1\r\nHost: x\r\n\r\n"], [b"GET"])
    b = exchange(proxy, [b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"], [b"GET"])
    assert [x.body for x in a.answers] == [answer_body(b"/l?a=leak")]
    assert [(x.body, x.header(b"x-answer-to")) for x in b.answers] == [(answer_body(b"/b"), b"/b")]
    assert all(SECRET not in v for x in b.answers for _, v in x.headers)
    assert keys(fresh) == [(b"GET", b"/l?a=leak", b""), (b"GET", b"/b", b"")]


@pytest.mark.parametrize("mode", ["nul", "clte"])
def test_an_invalid_answer_is_a_502_and_is_not_retried(
    proxy: Proxy, fresh: RecordingBackend, mode: str
) -> None:
    target = b"/bad?a=%b" % mode.encode()
    reply = exchange(proxy, [b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % target], [b"GET"])
    if proxy.kind == "nginx" and mode == "clte":
        # nginx frames it by Transfer-Encoding alone (RFC 9112 6.3 allows either)
        assert [(x.status, x.body) for x in reply.answers] == [(200, answer_body(target))]
    else:
        assert [x.status for x in reply.answers] == [502]
    assert b"a\x00b" not in reply.rest
    assert keys(fresh) == [(b"GET", target, b"")]  # the backend ran it once
