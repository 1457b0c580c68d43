"""The admin port of `podkit lb`: /metrics, /status, /purge, /healthz and /readyz,
loopback by default, on the admin server every component runs (`podkit.observe.admin`:
keep-alive for scrapers, HEAD, 404 and 405 that name the paths and methods).

- `GET /metrics`: Prometheus text. Requests by upstream and status class, latency
  histograms per upstream, availability and requests in flight per upstream, ejections,
  cache hits, misses and hit ratio, rate-limited requests, breaker overflows, retries.
- `GET /status`: JSON. Each upstream with its state (`healthy`, `unhealthy`, `ejected`,
  `unavailable`), requests in flight and ejections; cache stats; the configuration.
- `POST /purge?url=URL[&prefix=1]` (GET works too): drop cached answers of one URL, or of
  every URL starting with it. URL is the cache key, Host and target
  (`127.0.0.1:8080/products`); a `http://` or `https://` in front is ignored. Answers
  `{"purged": N}`.
- `GET /healthz`: 200 while the worker serves; `GET /readyz`: 200 while some upstream
  takes requests, else 503.

Each worker process has its own proxy and cache (host health and rate limits are
shared), and serves its own admin port: worker i listens on `admin_port + i`. With
several workers, any of these ports answers for all of them: /metrics gathers every
worker's samples (each with a `worker` label, and `podkit_lb_admin_worker_up` saying
which workers answered) and /purge purges every worker's cache (502 naming the workers
that did not answer), asking the others through podkit's pooled client
(`podkit.net.client`), whose connections stay open between scrapes. `?local=1` asks one
worker alone. /status is always the one worker's.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from podkit.lb.policy import Upstream
from podkit.net.client import ClientError, HTTPClient
from podkit.net.server import Request
from podkit.observe import admin
from podkit.observe.admin import Answer, Route

if TYPE_CHECKING:
    from podkit.lb.features import Worker

SIBLING_TIMEOUT = 2.0  # seconds a worker waits for another worker's admin answer
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


_CLASS = ("error", "1xx", "2xx", "3xx", "4xx", "5xx")


class Metrics:
    """One worker's Prometheus registry. Tries are counted in plain dicts on the request
    path (no lock, no label lookup) and turned into metric families when scraped."""

    def __init__(self, worker: Worker) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests: dict[tuple[str, str], int] = {}  # (upstream, class) -> tries
        self.latency: dict[str, list[float]] = {}  # upstream -> bucket counts..., sum
        self.registry.register(_Live(worker, self))

    def record(self, upstream: Upstream, status: int | None, seconds: float) -> None:
        key = (upstream.name, _CLASS[status // 100] if status and status < 600 else "error")
        requests = self.requests
        requests[key] = requests.get(key, 0) + 1
        hist = self.latency.get(upstream.name)
        if hist is None:
            hist = self.latency[upstream.name] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        hist[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        hist[-1] += seconds

    def families(self) -> Iterator[Metric]:
        req = CounterMetricFamily(
            "podkit_lb_requests",
            "Tries sent to each upstream, by status class (error: no answer).",
            labels=["upstream", "code"],
        )
        for (name, code), n in sorted(self.requests.items()):
            req.add_metric([name, code], float(n))
        yield req
        lat = HistogramMetricFamily(
            "podkit_lb_upstream_latency_seconds",
            "Seconds from sending a try to the end of its answer, per upstream.",
            labels=["upstream"],
        )
        for name, hist in sorted(self.latency.items()):
            cumulative: list[tuple[str, float]] = []
            total = 0.0
            for bound, count in zip([*LATENCY_BUCKETS, float("inf")], hist[:-1], strict=True):
                total += count
                cumulative.append((str(bound) if bound != float("inf") else "+Inf", total))
            lat.add_metric([name], cumulative, sum_value=hist[-1])
        yield lat


class _Live(Collector):
    """Gauges and counters kept by the proxy and the filters, read when scraped."""

    def __init__(self, worker: Worker, metrics: Metrics) -> None:
        self.worker = worker
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield from self.metrics.families()
        w = self.worker
        lb = w.lb
        if lb is None:
            return
        avail = GaugeMetricFamily(
            "podkit_lb_upstream_available", "1 when the upstream gets traffic.", labels=["upstream"]
        )
        inflight = GaugeMetricFamily(
            "podkit_lb_upstream_inflight", "Requests in flight.", labels=["upstream"]
        )
        for u in lb.upstreams:
            avail.add_metric([u.name], 1.0 if u.available else 0.0)
            inflight.add_metric([u.name], float(u.inflight))
        yield avail
        yield inflight
        yield CounterMetricFamily(
            "podkit_lb_retries_unbudgeted",
            "Retries not sent because the retry budget was spent.",
            value=lb.retry_rate.refused,
        )
        yield CounterMetricFamily(
            "podkit_lb_upstream_surplus",
            "Upstream connections closed for bytes after a complete answer or while idle.",
            value=lb.surplus,
        )
        if w.health is not None:
            ej = CounterMetricFamily(
                "podkit_lb_ejections", "Outlier ejections per upstream.", labels=["upstream"]
            )
            for name, n in sorted(w.health.ejected.items()):
                ej.add_metric([name], float(n))
            yield ej
            yield CounterMetricFamily(
                "podkit_lb_health_checks", "Active health checks made.", value=w.health.checks
            )
        if w.cache is not None:
            st = w.cache.cache.stats()
            yield CounterMetricFamily("podkit_lb_cache_hits", "Cache hits.", value=st.hits)
            yield CounterMetricFamily("podkit_lb_cache_misses", "Cache misses.", value=st.misses)
            yield CounterMetricFamily(
                "podkit_lb_cache_coalesced", "Misses that waited for another fetch.", st.coalesced
            )
            yield GaugeMetricFamily("podkit_lb_cache_hit_ratio", "Hits / lookups.", st.hit_ratio)
            yield GaugeMetricFamily("podkit_lb_cache_bytes", "Bytes stored.", st.bytes)
            yield GaugeMetricFamily("podkit_lb_cache_entries", "Entries stored.", st.entries)
            yield CounterMetricFamily(
                "podkit_lb_cache_evictions", "Entries evicted for room.", st.evictions
            )
        if w.rate is not None:
            yield CounterMetricFamily(
                "podkit_lb_rate_limited", "Requests answered 429.", value=w.rate.limiter.limited
            )
        if w.breaker is not None:
            over = CounterMetricFamily(
                "podkit_lb_breaker_overflows",
                "Tries refused by a circuit breaker or the retry budget.",
                labels=["upstream", "reason"],
            )
            for name, b in sorted(w.breaker.breakers.items()):
                for reason, n in b.overflows.items():
                    over.add_metric([name, reason], float(n))
            for reason, n in w.breaker.cluster.overflows.items():
                if n:
                    over.add_metric(["*", reason], float(n))
            yield over
        if w.timing is not None:
            yield CounterMetricFamily("podkit_lb_retries", "Retries sent.", value=w.timing.retries)


class _Fixed(Collector):
    """Families gathered already, for `generate_latest`."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def status(worker: Worker) -> dict[str, Any]:
    """The /status document."""
    lb = worker.lb
    ups: list[dict[str, Any]] = []
    health = worker.health.health if worker.health is not None else None
    for u in lb.upstreams if lb is not None else []:
        state = "healthy" if u.available else "unavailable"
        hs = health.state(u.name) if health is not None else None
        if hs is not None:
            if hs.ejected:
                state = "ejected"
            elif not hs.healthy:
                state = "unhealthy"
        ups.append(
            {
                "name": u.name,
                "weight": u.weight,
                "state": state,
                "available": u.available,
                "inflight": u.inflight,
                "ejections": worker.health.ejected.get(u.name, 0) if worker.health else 0,
            }
        )
    doc: dict[str, Any] = {"worker": worker.index, "upstreams": ups, "config": worker.describe()}
    doc["policy"] = getattr(lb.policy, "name", type(lb.policy).__name__) if lb else None
    doc["requests"] = lb.requests if lb is not None else 0
    doc["retries_unbudgeted"] = lb.retry_rate.refused if lb is not None else 0
    if worker.cache is not None:
        st = worker.cache.cache.stats()
        doc["cache"] = {
            "hits": st.hits,
            "misses": st.misses,
            "coalesced": st.coalesced,
            "hit_ratio": round(st.hit_ratio, 4),
            "bytes": st.bytes,
            "entries": st.entries,
            "evictions": st.evictions,
            "max_bytes": st.max_bytes,
        }
    if worker.rate is not None:
        doc["rate_limited"] = worker.rate.limiter.limited
    if worker.breaker is not None:
        doc["breaker_overflows"] = worker.breaker.overflows
    if worker.timing is not None:
        doc["retries"] = worker.timing.retries
    return doc


class AdminServer(admin.AdminServer):
    """One worker's admin server: the shared one (`podkit.observe.admin`) with the
    balancer's routes, the siblings' answers fetched through a pooled client."""

    def __init__(
        self,
        worker: Worker,
        host: str = "127.0.0.1",
        port: int = 0,
        siblings: dict[int, int] | None = None,
    ) -> None:
        self.worker = worker
        self.metrics = Metrics(worker)
        self.siblings = siblings or {}  # the other workers' admin ports, by worker index
        self._client: HTTPClient | None = None
        routes: dict[str, admin.Handler | Route] = {
            "/metrics": Route(self._all_or_local),
            "/status": lambda: (200, status(worker)),
            "/readyz": self._ready,
            "/purge": Route(self._purge_all, methods=(b"GET", b"POST")),
        }
        super().__init__(routes, host, port, registry=self.metrics.registry, name="podkit lb")

    async def close(self) -> None:
        await super().close()
        if self._client is not None:
            await self._client.close()
            self._client = None

    def _alone(self, query: dict[str, list[str]]) -> bool:
        return not self.siblings or query.get("local", ["0"])[0] in ("1", "true", "yes")

    def _ready(self) -> Answer:
        """200 while some upstream takes requests, else 503."""
        lb = self.worker.lb
        ready = lb is not None and any(u.available for u in lb.upstreams)
        return (200 if ready else 503), {"ok": ready}

    async def _all_or_local(self, req: Request) -> Answer:
        if self._alone(parse_qs(req.query)):
            return self._metrics()
        return 200, await self._all_metrics()

    async def _purge_all(self, req: Request) -> Answer:
        query = parse_qs(req.query)
        code, doc = self._purge(query)
        if self._alone(query) or code != 200:
            return code, doc
        return await self._purge_siblings(req.query, doc["purged"])

    def _purge(self, query: dict[str, list[str]]) -> Answer:
        cache = self.worker.cache
        if cache is None:
            return 404, {"error": "no cache: start with --cache-bytes"}
        urls = query.get("url")
        if not urls or not urls[0]:
            return 400, {"error": "purge needs ?url=HOST/PATH"}
        url = urls[0]
        for scheme in ("http://", "https://"):
            if url.startswith(scheme):
                url = url[len(scheme) :]
        prefix = query.get("prefix", ["0"])[0] in ("1", "true", "yes")
        return 200, {"purged": cache.cache.purge(url.encode("latin-1"), prefix=prefix)}

    async def _from_siblings(self, target: str) -> dict[int, bytes | str]:
        """Each sibling's answer body to GET `target`, or why there is none."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        client = self._client
        if client is None:  # kept: its connections to the siblings stay open between scrapes
            client = self._client = HTTPClient(timeout=SIBLING_TIMEOUT)

        async def ask(port: int) -> bytes:
            resp = await client.get(f"http://{host}:{port}{target}")  # the query as given
            if resp.status != 200:
                raise ClientError(f"answered {resp.status} {resp.reason.decode('latin-1')}")
            return resp.body

        indices = sorted(self.siblings)
        answers = await asyncio.gather(
            *(ask(self.siblings[i]) for i in indices), return_exceptions=True
        )
        out: dict[int, bytes | str] = {}
        for i, a in zip(indices, answers, strict=True):
            if isinstance(a, BaseException):
                reason = str(a) or type(a).__name__
                out[i] = f"worker {i} (port {self.siblings[i]}): {reason}"
            else:
                out[i] = a
        return out

    async def _all_metrics(self) -> bytes:
        """Every worker's samples, labelled with their worker, as one exposition."""
        merged: dict[str, Metric] = {}
        up = GaugeMetricFamily(
            "podkit_lb_admin_worker_up",
            "1 when the worker's samples are in this scrape.",
            labels=["worker"],
        )

        def add(index: int, families: Iterable[Metric]) -> None:
            for fam in families:
                into = merged.get(fam.name)
                if into is None:
                    into = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type)
                for sample in fam.samples:
                    labels = {**sample.labels, "worker": str(index)}
                    into.samples.append(sample._replace(labels=labels))

        add(self.worker.index, self.metrics.registry.collect())
        up.add_metric([str(self.worker.index)], 1.0)
        for i, answer in (await self._from_siblings("/metrics?local=1")).items():
            families: list[Metric] | None = None
            if isinstance(answer, bytes):
                with contextlib.suppress(ValueError):  # parsed whole before any is added
                    families = list(text_string_to_metric_families(answer.decode()))
            if families is not None:
                add(i, families)
            up.add_metric([str(i)], 0.0 if families is None else 1.0)
        merged[up.name] = up
        return generate_latest(_Fixed(list(merged.values())))

    async def _purge_siblings(self, query: str, purged: int) -> Answer:
        failed: list[str] = []
        for answer in (await self._from_siblings(f"/purge?{query}&local=1")).values():
            if isinstance(answer, str):
                failed.append(answer)
                continue
            try:
                purged += int(json.loads(answer)["purged"])
            except (ValueError, KeyError, TypeError):
                failed.append(f"unreadable purge answer {answer[:100]!r}")
        doc: dict[str, Any] = {"purged": purged, "workers": len(self.siblings) + 1}
        if failed:
            doc["failed"] = failed
        return (502 if failed else 200), doc
