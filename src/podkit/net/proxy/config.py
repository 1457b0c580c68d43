"""A proxy's configuration from a component's flags, checked: `proxy_config`."""

from __future__ import annotations

import math
from typing import Any

from podkit.net.proxy.engine import ProxyConfig
from podkit.net.proxy.upstream import parse_upstream


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
