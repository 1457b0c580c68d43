"""A differential property test of `podkit lb`'s framing, with h11 as the oracle.

Hypothesis writes a client's byte stream (pipelined requests in every framing form, valid
and near-valid, cut at random places) and picks how the backend answers each request
(`framing.ANSWERS`: valid forms, surplus bytes, bad framing). Through the proxy:

- the requests the backend parses are those h11 parses from the client's bytes, in
  order; the proxy may stop earlier only by answering 4xx and closing;
- the client gets one answer per request, the one the backend gave to that request
  (or a 502 for an invalid answer), and no byte more.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from framing import (
    ANSWERS,
    INVALID_ANSWERS,
    POISON,
    SECRET,
    Proxy,
    RecordingBackend,
    answer_body,
    answer_mode,
    exchange,
    started,
)

pytestmark = pytest.mark.timeout(300)

VALID_FRAMINGS = ["none", "cl", "cl-twice", "chunked", "connection-cl", "upgrade-with-body"]
BAD_FRAMINGS = ["cl-te", "cl-differ", "cl-plus", "te-gzip", "no-host", "two-hosts",
                "obs-fold", "bare-lf", "nul", "space-colon"]  # fmt: skip


@dataclass
class Sent:
    method: bytes
    target: bytes
    raw: bytes


@st.composite
def request(draw: st.DrawFn, i: int) -> Sent:
    framing = draw(st.sampled_from(VALID_FRAMINGS + BAD_FRAMINGS))
    bodyless = framing == "none"
    method = draw(st.sampled_from([b"GET", b"HEAD", b"DELETE"] if bodyless else [b"POST", b"PUT"]))
    mode = "cl" if method == b"HEAD" else draw(st.sampled_from(sorted(ANSWERS)))
    target = b"/r%d?a=%b" % (i, mode.encode())
    version = b"1.0" if bodyless and draw(st.integers(0, 9)) == 0 else b"1.1"
    body = b"" if bodyless else draw(st.binary(min_size=1, max_size=48))
    lines = [b"%b %b HTTP/%b" % (method, target, version)]
    if framing != "no-host":
        lines.append(b"Host: x")
    if framing == "two-hosts":
        lines.append(b"Host: y")
    if draw(st.booleans()):
        lines.append(b"X-Note: %d" % i)
    if framing == "connection-cl":
        lines.append(b"Connection: Content-Length")
    if framing == "upgrade-with-body":
        lines += [b"Connection: Upgrade", b"Upgrade: websocket"]
    if framing == "obs-fold":
        lines += [b"X-Fold: a", b" b"]
    if framing == "nul":
        lines.append(b"X-Nul: a\x00b")
    if framing == "space-colon":
        lines.append(b"X-Space : b")
    if draw(st.integers(0, 5)) == 0 and framing not in ("connection-cl", "upgrade-with-body"):
        lines.append(b"Connection: close")
    n = len(body)
    chunked = framing in ("chunked", "cl-te", "te-gzip")
    if framing in ("cl", "cl-twice", "connection-cl", "upgrade-with-body", "cl-te", "no-host",
                   "two-hosts", "obs-fold", "bare-lf", "nul", "space-colon"):  # fmt: skip
        lines.append(b"Content-Length: %d" % n)
    if framing == "cl-twice":
        lines.append(b"Content-Length: %d" % n)
    if framing == "cl-differ":
        lines += [b"Content-Length: %d" % n, b"Content-Length: %d" % (n + 1)]
    if framing == "cl-plus":
        lines.append(b"Content-Length: +%d" % n)
    if chunked:
        lines.append(b"Transfer-Encoding: gzip, chunked" if framing == "te-gzip"
                     else b"Transfer-Encoding: chunked")  # fmt: skip
    head = b"\r\n".join(lines) + b"\r\n\r\n"
    if framing == "bare-lf":
        head = head.replace(b"Host: x\r\n", b"Host: x\n")
    if chunked:
        cuts = sorted(draw(st.lists(st.integers(1, max(1, n - 1)), max_size=3, unique=True)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True) if body[a:b]]
        ext = b";x=1" if draw(st.booleans()) else b""
        payload = b"".join(b"%X%b\r\n%b\r\n" % (len(p), ext, p) for p in pieces)
        trailer = b"X-Sum: 1\r\n" if draw(st.booleans()) else b""
        body = payload + b"0\r\n" + trailer + b"\r\n"
    return Sent(method, target, head + body)


@st.composite
def client(draw: st.DrawFn) -> tuple[list[Sent], list[bytes]]:
    reqs = [draw(request(i)) for i in range(draw(st.integers(1, 4)))]
    stream = b"".join(r.raw for r in reqs)
    cuts = sorted(draw(st.lists(st.integers(1, len(stream) - 1), max_size=3, unique=True)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    return reqs, pieces


def h11_requests(stream: bytes) -> tuple[list[tuple[bytes, bytes, bytes]], bool]:
    """The requests an h11 server parses from `stream` (answering each with a 200), and
    whether it refused what came next."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(stream)
    conn.receive_data(b"")
    parsed: list[tuple[bytes, bytes, bytes]] = []
    method = target = body = b""
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            return parsed, True
        if isinstance(event, h11.Request):
            method, target, body = event.method, event.target, b""
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            parsed.append((method, target, body))
            conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
            conn.send(h11.EndOfMessage())
            if conn.our_state is not h11.DONE:
                return parsed, False
            conn.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed):
            return parsed, False
        else:  # NEED_DATA after EOF: a message cut short
            return parsed, True


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    b = RecordingBackend()
    yield b
    b.close()


@pytest.fixture(scope="module")
def lb(backend: RecordingBackend) -> Iterator[Proxy]:
    with started("lb", backend) as p:
        yield p


# PODKIT_FRAMING_EXAMPLES=5000 for a longer search than CI's
EXAMPLES = int(os.environ.get("PODKIT_FRAMING_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(client())
def test_the_backend_parses_what_h11_parses_and_each_client_gets_its_own_answers(
    lb: Proxy, backend: RecordingBackend, case: tuple[list[Sent], list[bytes]]
) -> None:
    sent, pieces = case
    expected, refused = h11_requests(b"".join(pieces))
    backend.clear()
    methods = [m for m, _, _ in expected] + [b"GET"]
    reply = exchange(lb, pieces, methods, half_close=True)
    backend.settle()
    got = [p.key for p in backend.parsed]
    # the backend parsed a prefix of what h11 parsed, in order (bodies may be cut short
    # only where the backend answered before reading them)
    assert len(got) <= len(expected), (got, expected)
    for (m, t, b), (em, et, eb) in zip(got, expected, strict=False):
        assert (m, t) == (em, et), (got, expected)
        assert b == eb or (answer_mode(t) == "early" and eb.startswith(b)), (got, expected)
    assert not backend.errors, backend.errors
    # one answer per request the backend parsed, its own, in order
    answers = reply.answers
    for (m, t, _), a in zip(got, answers, strict=False):
        mode = answer_mode(t)
        if mode in INVALID_ANSWERS:
            assert a.status == 502, (t, a)
            continue
        assert a.status == (204 if mode == "nobody" else 200), (t, a)
        assert a.header(b"x-answer-to") == t, (t, a)
        assert a.body == (b"" if m == b"HEAD" or mode == "nobody" else answer_body(t)), (t, a)
    assert len(answers) >= len(got), (got, answers, reply)
    stopped = len(got) < len(expected) or refused
    if stopped:  # the proxy refused the next request: a 4xx, then it closed
        assert len(answers) == len(got) + 1, (got, answers, reply)
        assert 400 <= answers[-1].status < 500 or answers[-1].status in (501, 505), answers[-1]
    else:
        assert len(answers) == len(got), (got, answers, reply)
    assert reply.closed and reply.rest == b"" and not reply.error, reply
    everything = b"".join(v for a in answers for _, v in a.headers) + b"".join(
        a.body for a in answers
    )
    assert SECRET not in everything and POISON[-7:] not in everything
    assert [s.target for s in sent][: len(got)] == [t for _, t, _ in got]
