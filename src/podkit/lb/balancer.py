"""`LoadBalancer`: the proxy engine with `podkit lb`'s policies, chosen by name."""

from __future__ import annotations

from podkit.lb.policy import make_policy
from podkit.net.proxy.engine import Proxy
from podkit.net.proxy.upstream import Policy, Upstream


class LoadBalancer(Proxy):
    """One worker of `podkit lb`: the engine, its policy made from `config.policy` and
    `config.hash_on` unless one is given."""

    def default_policy(self, upstreams: list[Upstream]) -> Policy:
        return make_policy(self.config.policy, upstreams, self.config.hash_on)
