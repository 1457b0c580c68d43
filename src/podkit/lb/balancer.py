"""`LoadBalancer`: the proxy engine with `podkit lb`'s policies, chosen by name."""

from __future__ import annotations

from collections.abc import Sequence

from podkit.lb.policy import make_policy
from podkit.net.proxy.config import ProxyConfig
from podkit.net.proxy.engine import Proxy
from podkit.net.proxy.hooks import Filter
from podkit.net.proxy.upstream import Policy, Upstream


class LoadBalancer(Proxy):
    """One worker of `podkit lb`: the engine, with the policy called `policy_name` (and
    `hash_on` for consistent-hash) unless a policy object is given."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        policy: Policy | None = None,
        policy_name: str = "round-robin",
        hash_on: str | None = None,
        filters: Sequence[Filter] = (),
    ) -> None:
        self.policy_name = policy_name
        self.hash_on = hash_on
        super().__init__(config, policy=policy, filters=filters)

    def default_policy(self, upstreams: list[Upstream]) -> Policy:
        return make_policy(self.policy_name, upstreams, self.hash_on)
