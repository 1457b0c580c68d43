"""A proxy's configuration (`ProxyConfig`), and one made from a component's flags,
checked (`proxy_config`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from podkit.net.proxy.upstream import parse_upstream


@dataclass
class ProxyConfig:
    """Everything one worker needs; the flags of `podkit lb` and the sidecar map onto these."""

    upstreams: list[str]
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    scheme: str = "http"  # what X-Forwarded-Proto says
    name: str = "podkit lb"  # who signs the balancer's own answers (400, 502, ...)
    idle_timeout: float = 60.0  # a keep-alive client between requests
    header_timeout: float = 10.0  # from the first byte of a request head to its end
    body_timeout: float = 30.0  # a pause while a request body is read
    send_timeout: float = 30.0  # a client that does not read its response
    connect_timeout: float = 2.0
    upstream_timeout: float = 60.0  # a pause while an upstream answers (per try)
    request_timeout: float = 0.0  # complete request to answer head, all tries (0: none)
    tunnel_timeout: float = 3600.0  # an Upgrade tunnel with no traffic either way
    pool_idle_timeout: float = 30.0  # idle pooled upstream connections are closed after
    max_idle_per_upstream: int = 128
    tries: int = 3  # attempts per request (retries only when safe, see the module doc)
    retry_percent: float = 20.0  # retry budget: retries per requests over 10 s, in percent,
    retry_per_second: float = 10.0  # plus this many a second (`podkit.net.proxy.retry.RetryRate`)
    tick: float = 0.25  # how often the sweeper checks timeouts
    reuse_port: bool = True
    backlog: int = 1024
    limits: dict[str, int] = field(default_factory=dict)  # RequestParser limits


def parse_listen(value: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `PORT` (loopback then), `[v6]:PORT`."""
    text = value.strip()
    host = "127.0.0.1"
    if text.startswith("["):
        h, _, port = text[1:].partition("]:")
        host = h
    elif ":" in text:
        h, _, port = text.rpartition(":")
        host = h or "0.0.0.0"
    else:
        port = text
    if not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"--listen {value!r}: expected HOST:PORT")
    return host, int(port)


def proxy_config(
    listen: str, upstreams: list[str], workers: int = 1, **options: Any
) -> ProxyConfig:
    """Check `--listen`, the upstreams, `--workers` and the `*_timeout` options, and make
    the configuration; ValueError names the flag that is wrong."""
    host, port = parse_listen(listen)
    for u in upstreams:
        parse_upstream(u)
    if workers < 1:
        raise ValueError("--workers must be at least 1")
    for name, value in options.items():
        if name.endswith("_timeout"):
            off_allowed = name == "request_timeout"  # 0: no overall timeout
            if not (value >= 0 if off_allowed else value > 0) or math.isinf(value):
                need = ">= 0 (0: none)" if off_allowed else "> 0"
                raise ValueError(f"--{name.replace('_', '-')} {value}: must be {need}, in seconds")
    return ProxyConfig(upstreams=list(upstreams), host=host, port=port, workers=workers, **options)
