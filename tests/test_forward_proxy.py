"""Forward proxies for podkit.net.client.HTTPClient: the settings and the bytes without a
socket, then requests through a real (small) forward proxy to real origins."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from forward_proxy import ForwardProxy, tls_origin
from podkit.net.client import ClientError, ConnectError, HTTPClient
from podkit.net.forward_proxy import (
    ProxySettings,
    bypassed,
    connect_reply,
    connect_request,
    parse_proxy,
)
from support import TinyHTTP


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """An environment without proxy variables, for the test to set its own."""
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name == "REQUEST_METHOD":
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture
async def proxy() -> AsyncIterator[ForwardProxy]:
    server = ForwardProxy()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def origin() -> Iterator[TinyHTTP]:
    server = TinyHTTP(lambda path: (200, f"origin {path}".encode()))
    yield server
    server.close()


# ---------------------------------------------------------------------------- no sockets

BYPASS_CASES = [
    ("example.com", "example.com", 80, True),
    ("example.com", "a.example.com", 443, True),
    (".example.com", "example.com", 80, True),
    (".example.com", "a.b.example.com", 80, True),
    ("example.com", "badexample.com", 80, False),
    ("EXAMPLE.com", "a.Example.COM", 80, True),
    ("example.com:8080", "example.com", 8080, True),
    ("example.com:8080", "example.com", 80, False),
    ("example.com:8080", "a.example.com", 8080, True),
    ("other.org, 127.0.0.1", "127.0.0.1", 9000, True),
    ("127.0.0.1", "127.0.0.10", 9000, False),
    ("*", "anything.at.all", 1, True),
    ("", "example.com", 80, False),
    (" , ,", "example.com", 80, False),
]


@pytest.mark.parametrize(("no_proxy", "host", "port", "expected"), BYPASS_CASES)
def test_no_proxy_matches_hosts_as_urllib_does(
    no_proxy: str, host: str, port: int, expected: bool
) -> None:
    assert bypassed(no_proxy, host, port) is expected
    urllib_says = urllib.request.proxy_bypass_environment(  # type: ignore[attr-defined]
        f"{host}:{port}", {"no": no_proxy} if no_proxy else {}
    )
    assert urllib_says is expected


def test_settings_from_the_environment(no_proxy_env: pytest.MonkeyPatch) -> None:
    no_proxy_env.setenv("http_proxy", "http://plain:3128")
    no_proxy_env.setenv("HTTP_PROXY", "http://ignored:3128")  # lower case comes first
    no_proxy_env.setenv("HTTPS_PROXY", "tunnel:8080")  # no scheme: http://
    no_proxy_env.setenv("NO_PROXY", "localhost,.internal")
    settings = ProxySettings.from_environment()
    plain = settings.proxy_for("http", "example.com", 80)
    assert plain is not None and (plain.host, plain.port) == ("plain", 3128)
    tunnel = settings.proxy_for("https", "example.com", 443)
    assert tunnel is not None and (tunnel.host, tunnel.port, tunnel.source) == (
        "tunnel",
        8080,
        "HTTPS_PROXY",
    )
    assert settings.proxy_for("https", "config.internal", 443) is None
    assert settings.proxy_for("http", "localhost", 8080) is None

    no_proxy_env.delenv("http_proxy")
    no_proxy_env.setenv("REQUEST_METHOD", "GET")  # a CGI script: HTTP_PROXY is the client's
    settings = ProxySettings.from_environment()
    assert settings.proxy_for("http", "example.com", 80) is None
    assert settings.proxy_for("https", "example.com", 443) is not None


def test_proxy_urls_credentials_and_the_ones_refused() -> None:
    proxy = parse_proxy("http://ann:p%40ss@squid:3128", "HTTP_PROXY")
    assert (proxy.host, proxy.port, proxy.authorization) == ("squid", 3128, b"Basic YW5uOnBAc3M=")
    assert "p@ss" not in repr(proxy) and "YW5u" not in repr(proxy)
    assert parse_proxy("squid", "x").port == 80
    with pytest.raises(ValueError, match=r"HTTPS_PROXY=socks5://ann:\*\*\*@s:1080: only http://"):
        parse_proxy("socks5://ann:secret@s:1080", "HTTPS_PROXY")
    settings = ProxySettings(https="https://squid:3128", no_proxy="direct.example")
    with pytest.raises(ValueError, match="the https proxy=https://squid:3128"):
        settings.proxy_for("https", "example.com", 443)
    assert settings.proxy_for("https", "direct.example", 443) is None  # bypassed: no error
    assert settings.proxy_for("http", "example.com", 80) is None  # no http proxy


def test_connect_request_and_reply_bytes() -> None:
    proxy = parse_proxy("http://ann:pw@squid:3128", "p")
    assert connect_request("example.com", 443, proxy) == (
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n"
        b"Proxy-Authorization: Basic YW5uOnB3\r\n\r\n"
    )
    assert connect_request("::1", 8443, parse_proxy("squid", "p")).startswith(
        b"CONNECT [::1]:8443 HTTP/1.1\r\n"
    )
    assert connect_reply(b"HTTP/1.1 200 Connection established\r\n") is None  # not whole yet
    assert connect_reply(b"HTTP/1.0 200 Connection established\r\n\r\n") == (
        200,
        "Connection established",
    )
    assert connect_reply(b"HTTP/1.1 407 Proxy Authentication Required\r\nX: y\r\n\r\n") == (
        407,
        "Proxy Authentication Required",
    )
    with pytest.raises(ValueError, match="not an HTTP answer"):
        connect_reply(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(ValueError, match="longer than"):
        connect_reply(b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 4000)


# ---------------------------------------------------------------------------- through a proxy


async def test_plain_http_goes_to_the_proxy_with_the_absolute_url(
    proxy: ForwardProxy, origin: TinyHTTP
) -> None:
    user = proxy.url.replace("http://", "http://ann:pw@")
    async with HTTPClient(proxies=ProxySettings(http=user)) as client:
        r = await client.get(f"{origin.url}/a?b=1")
        assert (r.status, r.body) == (200, b"origin /a?b=1")
    assert proxy.log == [f"GET {origin.url}/a?b=1"]
    assert proxy.authorizations == ["Basic YW5uOnB3"]


async def test_https_goes_through_a_connect_tunnel_to_a_verified_origin(
    proxy: ForwardProxy, tmp_path: Path, no_proxy_env: pytest.MonkeyPatch
) -> None:
    server, url, cert = tls_origin(lambda path: (200, f"secret {path}".encode()), tmp_path)
    try:
        no_proxy_env.setenv("SSL_CERT_FILE", str(cert))  # the origin's self-signed cert
        async with HTTPClient(proxies=ProxySettings(https=proxy.url)) as client:
            for path in ("/1", "/2"):
                r = await client.get(f"{url}{path}")
                assert (r.status, r.body) == (200, f"secret {path}".encode())
        authority = url.removeprefix("https://")
        assert proxy.log == [f"CONNECT {authority}"]  # one tunnel, kept alive for both
    finally:
        server.close()


async def test_no_proxy_hosts_are_reached_directly(proxy: ForwardProxy, origin: TinyHTTP) -> None:
    settings = ProxySettings(http=proxy.url, no_proxy="localhost,127.0.0.1")
    async with HTTPClient(proxies=settings) as client:
        assert (await client.get(f"{origin.url}/direct")).body == b"origin /direct"
    assert proxy.log == []


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 403 Forbidden\r\n\r\n", "answered CONNECT 127.0.0.1:9 with 403 Forbidden"),
        (b"", "closed the connection before answering CONNECT"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP answer to CONNECT"),
        (b"HTTP/1.1 200 OK\r\n\r\nHTTP/1.1 200 OK\r\n\r\n", "sent bytes after its answer"),
    ],
)
async def test_a_tunnel_that_does_not_open_is_a_connect_error_naming_the_proxy(
    proxy: ForwardProxy, answer: bytes, error: str
) -> None:
    proxy.connect_answer = answer
    async with HTTPClient(proxies=ProxySettings(https=proxy.url)) as client:
        with pytest.raises(ConnectError) as info:
            await client.get("https://127.0.0.1:9/x")
    message = str(info.value)
    assert error in message
    assert f"proxy {proxy.url.removeprefix('http://')} (the https proxy)" in message


async def test_an_unusable_proxy_fails_only_the_requests_it_would_carry(
    origin: TinyHTTP,
) -> None:
    settings = ProxySettings(http="socks5://s:1080", no_proxy="localhost")
    async with HTTPClient(proxies=settings) as client:
        with pytest.raises(ClientError, match=r"/x: the http proxy=socks5://s:1080: only http://"):
            await client.get(f"{origin.url}/x")
        local = origin.url.replace("127.0.0.1", "localhost")
        assert (await client.get(f"{local}/y")).body == b"origin /y"
