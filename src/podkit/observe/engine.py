"""Metrics of one proxy engine worker (`podkit.net.proxy.engine.Proxy`), for a
component's admin server: `registry.register(EngineMetrics(proxy, "sidecar_tls"))`."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from podkit.net.proxy.engine import Proxy


class EngineMetrics(Collector):
    """`podkit_<component>_...`: tries ended, client connections open, upstream
    availability and requests in flight, connections closed for surplus bytes, retries
    the budget refused. Read from the proxy when scraped."""

    def __init__(self, proxy: Proxy, component: str) -> None:
        self.proxy = proxy
        self.prefix = f"podkit_{component}"

    def collect(self) -> Iterator[Metric]:
        p, name = self.proxy, self.prefix
        yield CounterMetricFamily(
            f"{name}_tries", "Tries sent upstream and ended (answered or failed).", p.requests
        )
        yield GaugeMetricFamily(
            f"{name}_client_connections", "Client connections open.", len(p.clients)
        )
        yield CounterMetricFamily(
            f"{name}_upstream_surplus",
            "Upstream connections closed for bytes after a complete answer or while idle.",
            p.surplus,
        )
        yield CounterMetricFamily(
            f"{name}_retries_unbudgeted",
            "Retries not sent because the retry budget was spent.",
            p.retry_rate.refused,
        )
        avail = GaugeMetricFamily(
            f"{name}_upstream_available", "1 when the upstream gets traffic.", labels=["upstream"]
        )
        inflight = GaugeMetricFamily(
            f"{name}_upstream_inflight", "Requests in flight.", labels=["upstream"]
        )
        for u in p.upstreams:
            avail.add_metric([u.name], 1.0 if u.available else 0.0)
            inflight.add_metric([u.name], float(u.inflight))
        yield avail
        yield inflight
