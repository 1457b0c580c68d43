"""Forward proxies for podkit's HTTP client (`podkit.net.client`): which one a request
goes through, and the bytes of a tunnel's opening, decided without sockets.

    proxies = ProxySettings.from_environment()     # http_proxy, https_proxy, no_proxy
    proxies = ProxySettings(http="http://squid:3128", https="http://squid:3128",
                            no_proxy="localhost,.internal")
    proxies.proxy_for("https", "config.example.com", 443)   # a ForwardProxy, or None

- **From the environment** as `urllib.request.getproxies()` reads it: `http_proxy` for
  `http://` URLs and `https_proxy` for `https://` ones, lower-case names before upper-case
  ones, and `HTTP_PROXY` ignored when `REQUEST_METHOD` is set (in a CGI script a client
  can set it). `ALL_PROXY` is not used.
- **`no_proxy`** is matched as urllib matches it (`bypassed`): `*` bypasses every host;
  otherwise each comma-separated name matches that host and every name under it
  (`example.com` and `.example.com` both match `a.example.com`, not `badexample.com`),
  `name:port` only that port, whatever the case. No CIDR ranges.
- **How a request goes through.** A plain `http://` request goes to the proxy with its
  absolute URL as the request target; an `https://` one opens a tunnel with `CONNECT
  host:port` (`connect_request`), reads the proxy's answer (`connect_reply`), and then
  speaks TLS with the origin through it, verifying the origin's certificate.
- **Which proxies.** `http://` ones (`host:port` without a scheme is one); `user:password@`
  in the proxy URL is sent as `Proxy-Authorization: Basic`. Any other proxy URL
  (`https://`, `socks5://`) makes the requests it would carry fail with a `ValueError`
  naming the variable; the others still go.
"""

from __future__ import annotations

import base64
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from podkit.net.httpwrite import request_head

MAX_REPLY_HEAD = 16 * 1024  # bytes of a CONNECT answer's head before it is refused


@dataclass(frozen=True, slots=True)
class ForwardProxy:
    """One proxy: where it listens, the `Proxy-Authorization` value to send (if any),
    and where it was set (for messages)."""

    host: str
    port: int
    authorization: bytes | None = field(default=None, repr=False)
    source: str = field(default="proxy", compare=False)

    def __str__(self) -> str:
        return f"proxy {self.host}:{self.port} ({self.source})"


def parse_proxy(url: str, source: str) -> ForwardProxy:
    """The proxy a proxy URL names; ValueError (naming `source`) if it is not one that
    podkit can use."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    shown = f"{source}={_masked(url)}"
    if parts.scheme != "http":
        raise ValueError(f"{shown}: only http:// proxies are supported")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"{shown}: the port is not a number from 0 to 65535") from None
    if not parts.hostname:
        raise ValueError(f"{shown}: no host")
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = b"Basic " + base64.b64encode(pair.encode())
    return ForwardProxy(parts.hostname, port, authorization, source)


def _masked(url: str) -> str:
    """`url` with its password replaced by `***`."""
    scheme, sep, rest = url.rpartition("://")
    userinfo, at, host = rest.rpartition("@")
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{host}"


class ProxySettings:
    """The proxy for `http://` and for `https://` URLs (each a URL, or None for none),
    and the hosts reached directly (`no_proxy`, as the environment variable says it)."""

    def __init__(
        self,
        http: str | None = None,
        https: str | None = None,
        no_proxy: str = "",
        *,
        sources: tuple[str, str] = ("the http proxy", "the https proxy"),
    ) -> None:
        self._proxies: dict[str, ForwardProxy | ValueError | None] = {}
        for scheme, url, source in (("http", http, sources[0]), ("https", https, sources[1])):
            try:
                self._proxies[scheme] = parse_proxy(url, source) if url else None
            except ValueError as exc:
                self._proxies[scheme] = exc  # raised for the requests it would carry
        self.no_proxy = no_proxy
        self._known: dict[tuple[str, str, int], ForwardProxy | None] = {}

    @classmethod
    def from_environment(cls) -> ProxySettings:
        """The settings the environment gives (see the module doc), read now."""
        env = urllib.request.getproxies()
        return cls(
            env.get("http"),
            env.get("https"),
            env.get("no", ""),
            sources=("HTTP_PROXY", "HTTPS_PROXY"),
        )

    def proxy_for(self, scheme: str, host: str, port: int) -> ForwardProxy | None:
        """The proxy a request to `scheme://host:port` goes through, or None to go
        directly; ValueError if that proxy's URL is not one podkit can use."""
        key = (scheme, host, port)
        if key in self._known:
            return self._known[key]
        proxy = self._proxies.get(scheme)
        if proxy is not None:
            if bypassed(self.no_proxy, host, port):
                proxy = None
            elif isinstance(proxy, ValueError):
                raise proxy
        if len(self._known) >= 1024:
            self._known.clear()
        self._known[key] = proxy
        return proxy


def bypassed(no_proxy: str, host: str, port: int) -> bool:
    """Whether `no_proxy` (the variable's value) says to reach `host:port` directly; the
    rules of `urllib.request.proxy_bypass_environment` (see the module doc)."""
    if no_proxy == "*":
        return True
    host = host.lower()
    hosts = (host, f"[{host}]") if ":" in host else (host,)  # an IPv6 address, bare or not
    address = f"{hosts[-1]}:{port}"
    for name in no_proxy.split(","):
        name = name.strip().lstrip(".").lower()
        if not name:
            continue
        if name == address or name in hosts:
            return True
        if address.endswith("." + name) or any(h.endswith("." + name) for h in hosts):
            return True
    return False


def connect_request(host: str, port: int, proxy: ForwardProxy) -> bytes:
    """The head that asks `proxy` for a tunnel to `host:port`."""
    authority = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
    fields = [(b"Host", authority)]
    if proxy.authorization is not None:
        fields.append((b"Proxy-Authorization", proxy.authorization))
    return request_head(b"CONNECT", authority, fields)


def connect_reply(data: bytes) -> tuple[int, str] | None:
    """(status, reason) of a proxy's answer to CONNECT, once its head is whole in `data`
    (None before); ValueError if it is not an HTTP/1.x answer or its head is too large."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) > MAX_REPLY_HEAD:
            raise ValueError(f"an answer to CONNECT longer than {MAX_REPLY_HEAD} bytes")
        return None
    line = data[: data.find(b"\r\n")].decode("latin-1")
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"not an HTTP answer to CONNECT: {line[:80]!r}")
    return int(code), reason
