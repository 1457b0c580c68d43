"""Replicated load-balanced services: `podkit lb`, an HTTP/1.1 load balancer.

`LoadBalancer` (one worker's proxy), `ProxyConfig`, the policies (`RoundRobin`,
`Weighted`, `LeastRequests`, `ConsistentHash`) over `Upstream`s, and the per-request
pipeline (`podkit.net.proxy.hooks.Filter`) where caching, rate limits, breakers and health plug in.
"""

from podkit.lb.balancer import LoadBalancer
from podkit.lb.policy import (
    ConsistentHash,
    LeastRequests,
    RoundRobin,
    Upstream,
    Weighted,
    make_policy,
    parse_upstream,
)
from podkit.net.proxy.engine import ProxyConfig

__all__ = [
    "ConsistentHash",
    "LeastRequests",
    "LoadBalancer",
    "ProxyConfig",
    "RoundRobin",
    "Upstream",
    "Weighted",
    "make_policy",
    "parse_upstream",
]
