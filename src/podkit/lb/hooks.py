"""`lb:` on a service of the spec: `podkit lb` in front of the pod's ready replicas.

`podkit up` runs the balancer as a supervised process that follows a members file and is
ready when every worker's admin `/readyz` answers 200; on Kubernetes it is a Deployment
`<service>-lb` (2 replicas) behind the Service, following the pod's ready replicas
through the headless Service `<pod>-pods`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, model_validator
from pydantic_core import PydanticCustomError

from podkit.contract import KubeService, Loc, Process, ServiceHook, flag_value, podkit_command
from podkit.spectypes import Model, Port, PositiveSeconds, Unit


def _rate(text: str | None) -> str | None:
    """A rate as `podkit lb` reads it ('100/s burst 200'), checked when the spec loads."""
    if text is not None:
        from podkit.lb.ratelimit import Rate

        try:
            Rate.parse(text)
        except ValueError as exc:
            raise PydanticCustomError("lb_rate", "{why}", {"why": str(exc)}) from None
    return text


def _path(text: str) -> str:
    if not text.startswith("/"):
        raise PydanticCustomError(
            "lb_path", "a path starts with '/' (got '{path}')", {"path": text}
        )  # fmt: skip
    return text


RateText = Annotated[str | None, AfterValidator(_rate)]


class LBHealth(Model):
    """Active HTTP health checks of each replica."""

    path: Annotated[str, AfterValidator(_path)] = Field(
        "/healthz", description="the path to GET on each replica (it starts with `/`)"
    )
    interval: PositiveSeconds = Field(5.0, description="how long from one check to the next")
    timeout: PositiveSeconds = Field(1.0, description="how long a check may take")
    healthy_threshold: Annotated[int, Field(ge=1)] = Field(
        2, description="passes in a row that bring a replica back"
    )
    unhealthy_threshold: Annotated[int, Field(ge=1)] = Field(
        3, description="failures in a row that take a replica out"
    )


class LBCache(Model):
    """A response cache (Cache-Control, Expires, Vary), bounded in bytes."""

    max_bytes: Annotated[int, Field(ge=1024), Unit("bytes")] = Field(
        64 * 1024 * 1024, description="the cache's size (64 MiB)"
    )
    max_entry_bytes: Annotated[int, Field(ge=1), Unit("bytes")] = Field(
        1024 * 1024, description="the largest answer it keeps (1 MiB)"
    )


class LBRateLimit(Model):
    """Token buckets: `rate` like '100/s burst 200' per client, `global` for everyone."""

    rate: RateText = Field(
        None, description="each client's rate, such as `100/s burst 200`; not set: no limit"
    )
    by: str = Field(
        "ip", description="what tells clients apart: `ip`, or `header:NAME` (that header)"
    )
    global_: RateText = Field(
        default=None,
        alias="global",
        description="one rate for all clients together; not set: no limit",
    )

    @model_validator(mode="after")
    def _something_to_limit(self) -> LBRateLimit:
        if self.rate is None and self.global_ is None:
            raise PydanticCustomError(
                "lb_rate", "rate_limit: give 'rate' (per client), 'global', or both", {}
            )
        if self.by != "ip" and not (self.by.startswith("header:") and len(self.by) > 7):
            raise PydanticCustomError(
                "lb_rate", "rate_limit.by: 'ip' or 'header:NAME' (got {by!r})", {"by": self.by}
            )
        return self


class LBBreaker(Model):
    """Circuit breaking per upstream: over a limit the request goes elsewhere, or gets 503."""

    max_connections: Annotated[int, Field(ge=1)] | None = Field(
        None, description="connections to one replica; not set: no limit"
    )
    max_pending: Annotated[int, Field(ge=1)] | None = Field(
        None, description="connections being opened to one replica; not set: no limit"
    )
    max_requests: Annotated[int, Field(ge=1)] | None = Field(
        None, description="requests in flight to one replica; not set: no limit"
    )


class LBTLS(Model):
    """TLS at the edge: a certificate and key (reloaded when they change), or self-signed."""

    cert: str | None = Field(
        None,
        description="the certificate chain file (PEM), relative to the spec's directory; "
        "reloaded when it changes",
    )
    key: str | None = Field(None, description="its private key file (PEM)")
    self_signed: bool = Field(
        False, description="serve a fresh self-signed certificate instead (for development)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> LBTLS:
        if self.self_signed == bool(self.cert or self.key) or bool(self.cert) != bool(self.key):
            raise PydanticCustomError(
                "lb_tls", "tls: give 'cert' and 'key', or 'self_signed: true'", {}
            )
        return self


class LBOptions(Model):
    """Run `podkit lb` for this service instead of the plain TCP forwarder."""

    policy: Literal["round-robin", "weighted", "least-requests", "consistent-hash"] = Field(
        "round-robin", description="how requests are spread over the ready replicas"
    )
    hash_on: str | None = Field(
        None,
        description="the key of `consistent-hash`: `header:NAME`, `cookie:NAME` or `ip`; "
        "with that policy only",
    )
    workers: Annotated[int, Field(ge=1, le=64)] = Field(
        1, description="balancer processes sharing the service's port"
    )
    tries: Annotated[int, Field(ge=1, le=10)] = Field(
        3, description="attempts per request, where trying again is safe"
    )
    retry_budget: Annotated[float, Field(ge=0, le=100), Unit("percent")] | None = Field(
        None,
        description="retries allowed, as a share of the requests of the last 10 s, plus 10 "
        "a second; not set: 20",
    )
    upstream_timeout: PositiveSeconds | None = Field(
        None,
        description="how long a replica may stay silent while answering, per try (then "
        "504); not set: 60",
    )
    request_timeout: PositiveSeconds | None = Field(
        None,
        description="how long from a whole request to its answer, all tries included (then "
        "504); not set: no limit",
    )
    breaker: LBBreaker | None = Field(
        None, description="limits per replica, over which a request goes elsewhere or gets 503"
    )
    health: LBHealth | None = Field(
        None,
        description="active health checks of each replica, with outlier ejection; not set: neither",
    )
    cache: LBCache | None = Field(None, description="a response cache; not set: none")
    rate_limit: LBRateLimit | None = Field(
        None, description="rate limits, per client and for all; not set: none"
    )
    tls: LBTLS | None = Field(None, description="TLS for the service's clients; not set: HTTP")
    admin_port: Port | None = Field(
        None,
        description="the first port of the balancer's admin endpoints (`/metrics`, "
        "`/status`), worker i on this port plus i; not set: free ports under `podkit up`, "
        "none on Kubernetes",
    )

    def flags(self, *, tls_dir: str | None = None) -> list[str]:
        """The `podkit lb` flags for these options (without --listen and membership);
        with `tls_dir`, the certificate is read from there (`tls.crt`, `tls.key`)."""
        argv = ["--policy", self.policy, "--workers", str(self.workers), "--tries", str(self.tries)]
        if self.hash_on:
            argv += ["--hash-on", self.hash_on]
        b = self.breaker or LBBreaker()
        numbers = {
            "--retry-budget": self.retry_budget,
            "--upstream-timeout": self.upstream_timeout,
            "--request-timeout": self.request_timeout,
            "--max-connections": b.max_connections,
            "--max-pending": b.max_pending,
            "--max-requests": b.max_requests,
        }
        argv += [x for flag, v in numbers.items() if v is not None for x in (flag, flag_value(v))]
        if self.health:
            h = self.health
            argv += [
                "--health-path", h.path, "--health-interval", flag_value(h.interval),
                "--health-timeout", flag_value(h.timeout),
                "--healthy-threshold", str(h.healthy_threshold),
                "--unhealthy-threshold", str(h.unhealthy_threshold),
            ]  # fmt: skip
        if self.cache:
            argv += ["--cache-bytes", str(self.cache.max_bytes),
                     "--cache-entry-bytes", str(self.cache.max_entry_bytes)]  # fmt: skip
        if self.rate_limit:
            r = self.rate_limit
            if r.rate:
                argv += ["--rate-limit", r.rate, "--rate-limit-by", r.by]
            if r.global_:
                argv += ["--global-rate-limit", r.global_]
        if self.tls:
            if self.tls.self_signed:
                argv += ["--self-signed"]
            elif tls_dir is not None:
                argv += ["--tls-cert", f"{tls_dir}/tls.crt", "--tls-key", f"{tls_dir}/tls.key"]
            else:
                argv += ["--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key)]
        return argv

    @model_validator(mode="after")
    def _hash_needs_key(self) -> LBOptions:
        if (self.policy == "consistent-hash") != (self.hash_on is not None):
            raise PydanticCustomError(
                "lb_hash", "lb: 'hash_on' goes with policy 'consistent-hash', and only with it",
                {},
            )  # fmt: skip
        return self


TLS_DIR = "/etc/podkit/tls"  # where the certificate's Secret is mounted on Kubernetes


class LBHook(ServiceHook):
    key = "lb"
    model = LBOptions
    fields = {
        "services[].lb": "a `podkit lb` Deployment `<service>-lb` (2 replicas) behind the "
        "Service, following the pod's ready replicas through the headless Service `<pod>-pods`",
        "services[].lb.policy": "--policy",
        "services[].lb.hash_on": "--hash-on",
        "services[].lb.workers": "--workers",
        "services[].lb.tries": "--tries",
        "services[].lb.retry_budget": "--retry-budget",
        "services[].lb.upstream_timeout": "--upstream-timeout",
        "services[].lb.request_timeout": "--request-timeout",
        "services[].lb.breaker": "circuit breaking: --max-connections, --max-pending, "
        "--max-requests",
        "services[].lb.breaker.max_connections": "--max-connections",
        "services[].lb.breaker.max_pending": "--max-pending",
        "services[].lb.breaker.max_requests": "--max-requests",
        "services[].lb.health": "active checks: the --health-* flags",
        "services[].lb.health.path": "--health-path",
        "services[].lb.health.interval": "--health-interval",
        "services[].lb.health.timeout": "--health-timeout",
        "services[].lb.health.healthy_threshold": "--healthy-threshold",
        "services[].lb.health.unhealthy_threshold": "--unhealthy-threshold",
        "services[].lb.cache": "the response cache: --cache-bytes, --cache-entry-bytes",
        "services[].lb.cache.max_bytes": "--cache-bytes",
        "services[].lb.cache.max_entry_bytes": "--cache-entry-bytes",
        "services[].lb.rate_limit": "token buckets: --rate-limit, --rate-limit-by, "
        "--global-rate-limit",
        "services[].lb.rate_limit.rate": "--rate-limit",
        "services[].lb.rate_limit.by": "--rate-limit-by",
        "services[].lb.rate_limit.global": "--global-rate-limit",
        "services[].lb.tls": "TLS at the edge",
        "services[].lb.tls.cert": "the Secret `<service>-tls` (kubernetes.io/tls), referenced "
        "and mounted read-only: --tls-cert",
        "services[].lb.tls.key": "the same Secret: --tls-key",
        "services[].lb.tls.self_signed": "--self-signed",
        "services[].lb.admin_port": "--admin-port on the pod IP, a containerPort named admin",
    }

    def tls(self, options: Any) -> bool:
        return options.tls is not None

    def check(self, port: int, options: Any) -> list[tuple[Loc, str]]:
        lb: LBOptions = options
        if lb.admin_port is None:
            return []
        ports = range(lb.admin_port, lb.admin_port + lb.workers)  # worker i: admin_port + i
        if port in ports:
            what = (
                "the admin port" if lb.workers == 1 else f"the admin ports ({lb.workers} workers)"
            )
            return [(("admin_port",), f"{what} would take the service's port {port}")]
        return []

    def process(
        self, name: str, host: str, port: int, options: Any, free_ports: Callable[[int], int]
    ) -> Process:
        """`podkit lb` on `host:port`, its admin endpoints on the spec's port or on free
        ones (worker i on the port plus i)."""
        lb: LBOptions = options
        admin = lb.admin_port or free_ports(lb.workers)

        def argv(members: str) -> list[str]:
            return podkit_command(
                "lb", "--listen", f"{host}:{port}", "--members-file", members, *lb.flags(),
                "--admin-host", host, "--admin-port", str(admin),
            )  # fmt: skip

        return Process(argv, [admin + i for i in range(lb.workers)], ready_host=host)

    def render(self, kube: KubeService, options: Any) -> None:
        """A `podkit lb` Deployment in front of the pod's replicas, and the Service."""
        lb: LBOptions = options
        name = f"{kube.name}-lb"
        tls_dir = TLS_DIR if lb.tls and lb.tls.cert else None
        members = f"{kube.pod_dns()}:{kube.target_port}"
        args = ["--listen", f"0.0.0.0:{kube.port}", "--members-dns", members]
        args += lb.flags(tls_dir=tls_dir)
        ports = [{"name": "http", "containerPort": kube.port, "protocol": "TCP"}]
        if lb.admin_port:
            args += ["--admin-host", "$(POD_IP)", "--admin-port", str(lb.admin_port)]
            ports.append({"name": "admin", "containerPort": lb.admin_port, "protocol": "TCP"})
        container: dict[str, Any] = {
            "name": "lb",
            "image": kube.podkit_image,
            "command": ["podkit", "lb"],
            "args": args,
            "ports": ports,
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 2},
            "securityContext": kube.hardened(read_only=True),
        }
        workload = kube.workload("Deployment", name, "lb", container)
        workload["spec"]["replicas"] = 2
        if tls_dir is not None and lb.tls is not None:
            container["volumeMounts"] = [{"name": "tls", "mountPath": tls_dir, "readOnly": True}]
            workload["spec"]["template"]["spec"]["volumes"] = [
                {"name": "tls", "secret": {"secretName": f"{kube.name}-tls"}}
            ]
            kube.warn(
                (*kube.loc, "lb", "tls", "cert"),
                f"the certificate comes from the Secret '{kube.name}-tls' on Kubernetes: "
                f"kubectl create secret tls {kube.name}-tls --cert {lb.tls.cert} "
                f"--key {lb.tls.key}",
            )
        kube.add(workload)
        kube.add(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": kube.meta(kube.name, "service", name),
                "spec": {
                    "selector": kube.selector(name),
                    "ports": [
                        {"name": "http", "port": kube.port, "targetPort": "http", "protocol": "TCP"}
                    ],
                },
            }
        )
