"""Render a spec to Kubernetes manifests (`podkit k8s SPEC`).

The mapping, field by field, is `FIELDS`; every field of the spec is rendered, or
refused with an error, or (when it only means something to `podkit up`) reported as a
warning. Nothing is dropped without a word.

- A pod with `restart: Always` becomes a Deployment, or a StatefulSet (with a headless
  Service) when a container reads `$(REPLICA)`: stable identity. `OnFailure`/`Never`
  pods become Jobs (Indexed Jobs when `$(REPLICA)` is read).
- podkit components (`component:`, the elector) run from the podkit image; on Kubernetes
  1.29+ they are native sidecars (init containers with `restartPolicy: Always`).
- Backend URLs reach containers from the Secret `<spec>-backends` (one key per backend),
  which is referenced and never written, except with `--with-backends`, where Redis,
  NATS JetStream and etcd StatefulSets are added and the Secret points at them.
- `election:` becomes a Lease with a ServiceAccount, and a Role that may only get and
  update that one Lease (the Lease is rendered, so nobody needs `create`).
- `autoscale:` becomes a `podkit queue scaler` Deployment, which publishes the replica
  count the queue needs, and an HPA on that external metric or a KEDA ScaledObject.
"""

from __future__ import annotations

import math
import re
import shlex
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel

from podkit import __version__
from podkit.system.components import _REGISTRY, to_flags
from podkit.system.spec import (
    Container,
    ExecProbe,
    HTTPProbe,
    Pod,
    Probe,
    Service,
    Spec,
    TCPProbe,
    _model_in,
    flag_value,
)

Loc = tuple[str | int, ...]
Obj = dict[str, Any]

DEFAULT_PODKIT_IMAGE = f"ghcr.io/podkit/podkit:{__version__}"
DEFAULT_KUBE_VERSION = "1.33"
NATIVE_SIDECARS = (1, 29)  # init containers with restartPolicy: Always, on by default
EMBEDDED = ("memory", "sqlite")
UID = 10001  # the podkit image's user
SCALER_PORT = 9464
BUILTIN_GROUPS = ("apps", "batch", "autoscaling", "policy")
METRIC = "podkit_queue_desired_replicas"
SERVER_IMAGES = {
    "redis": "redis:7.4-alpine",
    "nats": "nats:2.10-alpine",
    "etcd": "quay.io/coreos/etcd:v3.5.17",
}

# Every spec field, and what it becomes on Kubernetes.
FIELDS: dict[str, str] = {
    "name": "app.kubernetes.io/instance and part-of labels; Secret `<name>-backends`",
    "image": "the image of containers that name none",
    "backends": "keys of the Secret `<name>-backends`, env PODKIT_BACKEND_<NAME>; "
    "memory:// and sqlite:// are refused unless --with-backends",
    "pods": "one workload each",
    "pods[].name": "the workload's name and app.kubernetes.io/name",
    "pods[].replicas": "spec.replicas (a Job's completions and parallelism)",
    "pods[].restart": "Always: Deployment or StatefulSet; OnFailure/Never: a Job's restartPolicy",
    "pods[].grace_period": "terminationGracePeriodSeconds (rounded up)",
    "pods[].volumes": "emptyDir volumes of the pod",
    "pods[].election": "the elector container, a Lease, ServiceAccount, Role, RoleBinding",
    "pods[].election.name": "the Lease's name",
    "pods[].election.backend": "embedded: a Kubernetes Lease; redis/nats/etcd: used as is",
    "pods[].election.ttl": "the elector's --ttl",
    "pods[].election.port": "the elector's containerPort and --port",
    "pods[].election.exec": "the elector's --exec",
    "pods[].autoscale": "a scaler Deployment and Service plus an HPA or KEDA ScaledObject",
    "pods[].autoscale.queue": "the scaler's --name and the metric's queue label",
    "pods[].autoscale.backend": "the scaler's --queue (from the Secret)",
    "pods[].autoscale.min": "minReplicas (HPA: at least 1) / minReplicaCount",
    "pods[].autoscale.max": "maxReplicas / maxReplicaCount",
    "pods[].autoscale.target_drain": "the scaler's --target-drain",
    "pods[].autoscale.cooldown_up": "behavior.scaleUp.stabilizationWindowSeconds",
    "pods[].autoscale.cooldown_down": "behavior.scaleDown.stabilizationWindowSeconds",
    "pods[].containers": "containers (components: native sidecars from 1.29)",
    "pods[].containers[].name": "the container's name",
    "pods[].containers[].image": "the container's image (a component's too: one that reads "
    "files of the spec's directory runs in the app image, which holds podkit)",
    "pods[].containers[].command": "command",
    "pods[].containers[].args": "args",
    "pods[].containers[].component": "the podkit image running `podkit <component>`",
    "pods[].containers[].with": "the component's flags, in args",
    "pods[].containers[].env": "env (after podkit's own variables, so $(VAR) works)",
    "pods[].containers[].ports": "containerPort with its name (at most 15 characters); PORT_*",
    "pods[].containers[].volumes": "volumeMounts; VOLUME_<NAME> is the mount path",
    "pods[].containers[].workdir": "workingDir (relative paths under --app-root)",
    "pods[].containers[].readiness": "readinessProbe",
    "pods[].containers[].liveness": "livenessProbe",
    "probe.http": "httpGet (path, port, host)",
    "probe.tcp": "tcpSocket",
    "probe.exec": "exec",
    "probe.initial_delay": "initialDelaySeconds (rounded up)",
    "probe.period": "periodSeconds (rounded up; at least 1, with a warning)",
    "probe.timeout": "timeoutSeconds (rounded up; at least 1, with a warning)",
    "probe.success_threshold": "successThreshold (a liveness probe must use 1)",
    "probe.failure_threshold": "failureThreshold",
    "services": "one Service each",
    "services[].name": "the Service's name; <NAME>_SERVICE_HOST/PORT in every container",
    "services[].port": "the Service's port",
    "services[].pods": "the Service's selector",
    "services[].target": "the Service's targetPort",
    "services[].host": "local only (the address `podkit up` binds): a warning if set",
    "services[].policy": "round-robin: kube-proxy's balancing",
    "services[].lb": "a `podkit lb` Deployment `<service>-lb` (2 replicas) behind the "
    "Service, following the pod's ready replicas through the headless Service `<pod>-pods`",
    "services[].lb.policy": "--policy",
    "services[].lb.hash_on": "--hash-on",
    "services[].lb.workers": "--workers",
    "services[].lb.tries": "--tries",
    "services[].lb.retry_budget": "--retry-budget",
    "services[].lb.upstream_timeout": "--upstream-timeout",
    "services[].lb.request_timeout": "--request-timeout",
    "services[].lb.breaker": "circuit breaking: --max-connections, --max-pending, --max-requests",
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
    "services[].lb.rate_limit": "token buckets: --rate-limit, --rate-limit-by, --global-rate-limit",
    "services[].lb.rate_limit.rate": "--rate-limit",
    "services[].lb.rate_limit.by": "--rate-limit-by",
    "services[].lb.rate_limit.global": "--global-rate-limit",
    "services[].lb.tls": "TLS at the edge",
    "services[].lb.tls.cert": "the Secret `<service>-tls` (kubernetes.io/tls), referenced and "
    "mounted read-only: --tls-cert",
    "services[].lb.tls.key": "the same Secret: --tls-key",
    "services[].lb.tls.self_signed": "--self-signed",
    "services[].lb.admin_port": "--admin-port on the pod IP, a containerPort named admin",
}


@dataclass(frozen=True)
class RenderOptions:
    """How to render: namespace, target version, images and autoscaler."""

    namespace: str | None = None
    kube_version: str = DEFAULT_KUBE_VERSION
    autoscaler: Literal["hpa", "keda"] = "hpa"
    with_backends: bool = False
    image: str | None = None  # for containers with no image of their own
    podkit_image: str = DEFAULT_PODKIT_IMAGE
    app_root: str = "/app"  # where the app image holds the spec's directory


@dataclass(frozen=True)
class Problem:
    """A spec field that cannot be rendered (or is only meaningful locally)."""

    loc: Loc
    message: str


class RenderError(ValueError):
    """The spec cannot be rendered; `problems` names each field and why."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{_path(p.loc)}: {p.message}" for p in problems))


@dataclass
class Rendered:
    """The manifests, the warnings, and the Secret the user must create (if any)."""

    objects: list[Obj]
    warnings: list[Problem] = field(default_factory=list)
    secret: str | None = None  # name of the Secret to create before applying
    secret_keys: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        """All objects as one multi-document YAML stream."""
        return to_yaml(self.objects)

    def write(self, directory: Path) -> list[Path]:
        """One file per object plus a kustomization.yaml; returns the files written."""
        directory.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        names: list[str] = []
        for obj in self.objects:
            name = f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml"
            (directory / name).write_text(to_yaml([obj]), encoding="utf-8")
            names.append(name)
            written.append(directory / name)
        kustomization: Obj = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": names,
        }
        path = directory / "kustomization.yaml"
        path.write_text(yaml.safe_dump(kustomization, sort_keys=False), encoding="utf-8")
        return [*written, path]


def to_yaml(objects: list[Obj]) -> str:
    """Objects as a multi-document YAML stream, keys in insertion order."""
    return "".join(
        "---\n" + yaml.safe_dump(o, sort_keys=False, default_flow_style=False) for o in objects
    )


def render(spec: Spec, options: RenderOptions | None = None) -> Rendered:
    """Render `spec`; raise `RenderError` naming every field that cannot be rendered."""
    return _Renderer(spec, options or RenderOptions()).run()


def kube_version(text: str) -> tuple[int, int]:
    """'1.33' or 'v1.33.2' -> (1, 33); ValueError on anything else."""
    m = re.fullmatch(r"v?(\d+)\.(\d+)(?:\.\d+)?", text.strip())
    if m is None:
        raise ValueError(f"--kube-version {text!r}: expected MAJOR.MINOR such as 1.33")
    return int(m.group(1)), int(m.group(2))


def _path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _env_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def _scheme(url: str) -> str:
    return url.split("://", 1)[0]


def _seconds(value: float) -> int:
    return math.ceil(value)


def _mentions(container: Container, var: str) -> bool:
    texts = [*(container.command or []), *container.args, *container.env.values()]
    texts += [v for v in container.with_.values() if isinstance(v, str)]
    return any(f"$({var})" in t for t in texts)


class _Renderer:
    def __init__(self, spec: Spec, opts: RenderOptions) -> None:
        self.spec = spec
        self.opts = opts
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        self.objects: list[Obj] = []
        self.secret = f"{spec.name}-backends"
        self.backends: dict[str, str] = {}  # backend name -> URL the cluster uses
        self.version = (0, 0)
        self._implicit_state_loc: Loc | None = None
        self._headless: set[str] = set()

    # -- helpers --------------------------------------------------------------------------

    def refuse(self, loc: Loc, message: str) -> None:
        self.problems.append(Problem(loc, message))

    def warn(self, loc: Loc, message: str) -> None:
        self.warnings.append(Problem(loc, message))

    def meta(self, name: str, component: str, app: str | None = None) -> Obj:
        meta: Obj = {"name": name}
        if self.opts.namespace:
            meta["namespace"] = self.opts.namespace
        meta["labels"] = {
            "app.kubernetes.io/name": app or name,
            "app.kubernetes.io/instance": self.spec.name,
            "app.kubernetes.io/component": component,
            "app.kubernetes.io/part-of": self.spec.name,
            "app.kubernetes.io/managed-by": "podkit",
        }
        return meta

    def selector(self, app: str) -> dict[str, str]:
        return {"app.kubernetes.io/name": app, "app.kubernetes.io/instance": self.spec.name}

    def add(self, obj: Obj) -> None:
        self.objects.append(obj)

    # -- the whole spec -------------------------------------------------------------------

    def run(self) -> Rendered:
        try:
            self.version = kube_version(self.opts.kube_version)
        except ValueError as exc:
            raise RenderError([Problem(("--kube-version",), str(exc))]) from None
        self.resolve_backends()
        for i, pod in enumerate(self.spec.pods):
            self.pod(i, pod)
        for k, svc in enumerate(self.spec.services):
            self.service(k, svc)
        if self.opts.with_backends:
            self.servers()
        if self.problems:
            raise RenderError(self.problems)
        rendered = Rendered(self.objects, self.warnings)
        if self.backends and not self.opts.with_backends:
            rendered.secret, rendered.secret_keys = self.secret, sorted(self.backends)
        return rendered

    def resolve_backends(self) -> None:
        """Which backends containers read, and the URL each has on the cluster."""
        urls = dict(self.spec.backends)
        if "state" not in urls:
            user = self._state_user()
            if user is not None:
                urls["state"] = "sqlite:///(the embedded default)"
                self._implicit_state_loc = user
        for name, url in urls.items():
            loc: Loc = ("backends", name)
            if name not in self.spec.backends:
                loc = self._implicit_state_loc or loc
            if _scheme(url) in EMBEDDED:
                if self.opts.with_backends:
                    self.backends[name] = self._cluster_redis(name)
                    continue
                what = "the embedded default backend 'state'" if loc[0] != "backends" else url
                self.refuse(
                    loc,
                    f"{what} cannot span machines: name a real backend in `backends:` "
                    f"(redis://HOST:6379 for KV, queues and topics; nats://HOST:4222; "
                    f"etcd://HOST:2379 for KV), or render with --with-backends",
                )
                continue
            if self.opts.with_backends and urlsplit(url).password:
                self.refuse(
                    loc,
                    "holds a password, which podkit never writes into manifests: create the "
                    f"Secret '{self.secret}' yourself and render without --with-backends",
                )
                continue
            self.backends[name] = url

    def _state_user(self) -> Loc | None:
        """The first field that needs the implicit `state` backend, if any does."""
        for i, pod in enumerate(self.spec.pods):
            if pod.autoscale is not None and pod.autoscale.backend == "state":
                return ("pods", i, "autoscale", "backend")
            for j, c in enumerate(pod.containers):
                if _mentions(c, "PODKIT_BACKEND_STATE"):
                    return ("pods", i, "containers", j)
        return None

    def _cluster_redis(self, name: str) -> str:
        return f"redis://{self.spec.name}-redis:6379/0?prefix={self.spec.name}.{name}."

    # -- pods -----------------------------------------------------------------------------

    def pod(self, i: int, pod: Pod) -> None:
        base: Loc = ("pods", i)
        stable = any(_mentions(c, "REPLICA") for c in pod.containers)
        job = pod.restart != "Always"
        lease = self.election(i, pod)
        template = self.template(i, pod, lease, stable and job)
        meta = self.meta(pod.name, "workload")
        if job:
            if pod.autoscale is not None:
                self.refuse(
                    (*base, "autoscale"),
                    f"pod '{pod.name}' is a Job (restart: {pod.restart}); autoscale needs "
                    "restart: Always",
                )
            spec: Obj = {
                "completions": pod.replicas,
                "parallelism": pod.replicas,
                "backoffLimit": 6,
            }
            if stable:
                spec["completionMode"] = "Indexed"
            spec["template"] = template
            self.add({"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": spec})
            return
        kind = "StatefulSet" if stable else "Deployment"
        spec = {}
        if pod.autoscale is None:
            spec["replicas"] = pod.replicas
        spec["selector"] = {"matchLabels": self.selector(pod.name)}
        if stable:
            spec["serviceName"] = self.headless(pod)
            spec["podManagementPolicy"] = "Parallel"
        spec["template"] = template
        self.add({"apiVersion": "apps/v1", "kind": kind, "metadata": meta, "spec": spec})
        if pod.autoscale is not None:
            self.autoscale(i, pod, kind)

    def template(self, i: int, pod: Pod, lease: str | None, indexed_job: bool) -> Obj:
        base: Loc = ("pods", i)
        sidecars: list[Obj] = []
        main: list[Obj] = []
        for j, c in enumerate(pod.all_containers()):
            loc: Loc = (*base, "election") if c.name == "elector" and pod.election else (
                *base, "containers", j)  # fmt: skip
            rendered = self.container(loc, pod, c, lease, indexed_job)
            (sidecars if c.component is not None else main).append(rendered)
        native = self.version >= NATIVE_SIDECARS and main and sidecars
        spec: Obj = {}
        if native:
            for s in sidecars:
                s["restartPolicy"] = "Always"
            spec["initContainers"] = sidecars
            spec["containers"] = main
        else:
            spec["containers"] = main + sidecars
        spec["restartPolicy"] = pod.restart
        spec["terminationGracePeriodSeconds"] = _seconds(pod.grace_period)
        spec["enableServiceLinks"] = False  # the spec's services are set explicitly
        if lease is not None:
            spec["serviceAccountName"] = f"{pod.name}-elector"
        else:
            spec["automountServiceAccountToken"] = False
        spec["securityContext"] = _pod_security(UID)
        if pod.volumes:
            spec["volumes"] = [{"name": v, "emptyDir": {}} for v in pod.volumes]
        return {"metadata": {"labels": self.selector(pod.name)}, "spec": spec}

    def container(
        self, loc: Loc, pod: Pod, c: Container, lease: str | None, indexed_job: bool
    ) -> Obj:
        out: Obj = {"name": c.name}
        if c.component is not None:
            # an elector that runs a command of the app's needs the app's image
            runs_app = c.name == "elector" and pod.election is not None and pod.election.exec
            if c.image:  # a component that reads files of the spec's directory
                out["image"] = c.image
            else:
                out["image"] = self.image(loc, c) if runs_app else self.opts.podkit_image
            options = dict(c.with_)
            if c.name == "elector" and lease is not None:
                options["backend"] = "k8s://$(POD_NAMESPACE)"
                options["name"] = lease
            out["command"] = ["podkit", *_REGISTRY[c.component]]
            out["args"] = to_flags(options)
        else:
            out["image"] = self.image(loc, c)
            assert c.command is not None
            out["command"] = list(c.command)
            if c.args:
                out["args"] = list(c.args)
        if c.workdir:
            wd = c.workdir if c.workdir.startswith("/") else f"{self.opts.app_root}/{c.workdir}"
            out["workingDir"] = wd
        if c.ports:
            out["ports"] = []
            for name, number in c.ports.items():
                if len(name) > 15:
                    self.refuse(
                        (*loc, "ports", name),
                        f"port name '{name}' is longer than the 15 characters Kubernetes allows",
                    )
                out["ports"].append({"name": name, "containerPort": number, "protocol": "TCP"})
        out["env"] = self.env(pod, c, indexed_job)
        if c.volumes:
            out["volumeMounts"] = [{"name": v, "mountPath": p} for v, p in c.volumes.items()]
        for kind, key in (("readiness", "readinessProbe"), ("liveness", "livenessProbe")):
            probe: Probe | None = getattr(c, kind)
            if probe is not None:
                out[key] = self.probe((*loc, kind), probe, kind)
        # podkit's own code writes nothing to its filesystem
        out["securityContext"] = _hardened(read_only=out["image"] == self.opts.podkit_image)
        return out

    def image(self, loc: Loc, c: Container) -> str:
        image = c.image or self.spec.image or self.opts.image
        if image is None:
            self.refuse(
                (*loc, "image"),
                f"container '{c.name}' has no image on Kubernetes: set `image:` on it or on "
                "the spec, or pass --image",
            )
        return image or ""

    def env(self, pod: Pod, c: Container, indexed_job: bool) -> list[Obj]:
        def field_ref(path: str) -> Obj:
            return {"valueFrom": {"fieldRef": {"fieldPath": path}}}

        env: list[Obj] = [
            {"name": "POD_IP", **field_ref("status.podIP")},
            {"name": "POD_NAME", **field_ref("metadata.name")},
            {"name": "POD_NAMESPACE", **field_ref("metadata.namespace")},
        ]
        if indexed_job:
            index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
            env.append({"name": "REPLICA", **field_ref(index)})
        elif _mentions(c, "REPLICA") or any(_mentions(o, "REPLICA") for o in pod.containers):
            index = "metadata.labels['apps.kubernetes.io/pod-index']"
            env.append({"name": "REPLICA", **field_ref(index)})
        env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
        for name in sorted(self.backends):
            ref = {"secretKeyRef": {"name": self.secret, "key": name}}
            env.append({"name": f"PODKIT_BACKEND_{_env_name(name)}", "valueFrom": ref})
        for svc in self.spec.services:
            env.append({"name": f"{_env_name(svc.name)}_SERVICE_HOST", "value": svc.name})
            env.append({"name": f"{_env_name(svc.name)}_SERVICE_PORT", "value": str(svc.port)})
        for vol, mount in c.volumes.items():
            env.append({"name": f"VOLUME_{_env_name(vol)}", "value": mount})
        for port_name, number in c.ports.items():
            env.append({"name": f"PORT_{_env_name(port_name)}", "value": str(number)})
        for key, value in c.env.items():
            env.append({"name": key, "value": value})
        return env

    def probe(self, loc: Loc, p: Probe, kind: str) -> Obj:
        out: Obj = {}
        if p.http is not None:
            get: Obj = {"path": p.http.path, "port": p.http.port}
            if p.http.host:
                get["host"] = p.http.host
            out["httpGet"] = get
        elif p.tcp is not None:
            out["tcpSocket"] = {"port": p.tcp.port}
        elif p.exec is not None:
            out["exec"] = {"command": list(p.exec.command)}
        if p.initial_delay:
            out["initialDelaySeconds"] = _seconds(p.initial_delay)
        for name, value, key in (("period", p.period, "periodSeconds"),
                                 ("timeout", p.timeout, "timeoutSeconds")):  # fmt: skip
            whole = max(1, _seconds(value))
            if whole != value:
                self.warn(
                    (*loc, name),
                    f"{value:g} s becomes {whole} s: Kubernetes counts probe times in whole "
                    "seconds",
                )
            out[key] = whole
        if kind == "liveness" and p.success_threshold != 1:
            self.refuse(
                (*loc, "success_threshold"),
                "a liveness probe's success_threshold must be 1 on Kubernetes",
            )
        out["successThreshold"] = p.success_threshold
        out["failureThreshold"] = p.failure_threshold
        return out

    # -- election -------------------------------------------------------------------------

    def election(self, i: int, pod: Pod) -> str | None:
        """Render the Lease and its RBAC when the election needs one; return its name."""
        e = pod.election
        if e is None:
            return None
        url = self.spec.backends.get(e.backend)
        if url is not None and _scheme(url) not in EMBEDDED and _scheme(url) != "k8s":
            return None  # a network backend works across machines as it is
        lease = e.name or pod.name
        sa = f"{pod.name}-elector"
        self.add(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": self.meta(lease, "election", pod.name),
                "spec": {},
            }
        )
        self.add(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": self.meta(sa, "election", pod.name),
                "automountServiceAccountToken": True,
            }
        )
        rule = {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease],
            "verbs": ["get", "update"],
        }
        self.add(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": self.meta(sa, "election", pod.name),
                "rules": [rule],
            }
        )
        subject: Obj = {"kind": "ServiceAccount", "name": sa}
        if self.opts.namespace:
            subject["namespace"] = self.opts.namespace
        self.add(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": self.meta(sa, "election", pod.name),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
                "subjects": [subject],
            }
        )
        return lease

    # -- autoscaling ----------------------------------------------------------------------

    def autoscale(self, i: int, pod: Pod, kind: str) -> None:
        a = pod.autoscale
        assert a is not None
        loc: Loc = ("pods", i, "autoscale")
        if a.backend not in self.backends:
            return  # refused in resolve_backends
        name = f"{pod.name}-scaler"
        argv = [
            "--queue", f"$(PODKIT_BACKEND_{_env_name(a.backend)})", "--name", a.queue,
            "--min", str(a.min), "--max", str(a.max), "--target-drain", flag_value(a.target_drain),
            "--host", "0.0.0.0", "--port", str(SCALER_PORT),
        ]  # fmt: skip
        probe = {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 5}
        container: Obj = {
            "name": "scaler",
            "image": self.opts.podkit_image,
            "command": ["podkit", "queue", "scaler"],
            "args": argv,
            "ports": [{"name": "metrics", "containerPort": SCALER_PORT, "protocol": "TCP"}],
            "env": [
                {
                    "name": f"PODKIT_BACKEND_{_env_name(a.backend)}",
                    "valueFrom": {"secretKeyRef": {"name": self.secret, "key": a.backend}},
                }
            ],
            "readinessProbe": probe,
            "securityContext": _hardened(read_only=True),
        }
        self.add(self.one_replica("Deployment", name, "scaler", container, UID, {}))
        svc_meta = self.meta(name, "scaler")
        svc_meta["annotations"] = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(SCALER_PORT),
            "prometheus.io/path": "/metrics",
        }
        self.add(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": svc_meta,
                "spec": {
                    "selector": self.selector(name),
                    "ports": [{"name": "metrics", "port": SCALER_PORT, "targetPort": "metrics"}],
                },
            }
        )
        behavior = {
            "scaleUp": {"stabilizationWindowSeconds": _seconds(a.cooldown_up)},
            "scaleDown": {"stabilizationWindowSeconds": _seconds(a.cooldown_down)},
        }
        target = {"apiVersion": "apps/v1", "kind": kind, "name": pod.name}
        if self.opts.autoscaler == "hpa":
            if a.min < 1:
                self.refuse(
                    (*loc, "min"),
                    "a HorizontalPodAutoscaler cannot scale to 0: set min: 1, or render with "
                    "--autoscaler keda",
                )
            labels = {"queue": a.queue, "app.kubernetes.io/instance": self.spec.name}
            metric = {
                "type": "External",
                "external": {
                    "metric": {"name": METRIC, "selector": {"matchLabels": labels}},
                    "target": {"type": "AverageValue", "averageValue": "1"},
                },
            }
            self.add(
                {
                    "apiVersion": "autoscaling/v2",
                    "kind": "HorizontalPodAutoscaler",
                    "metadata": self.meta(pod.name, "autoscaler"),
                    "spec": {
                        "scaleTargetRef": target,
                        "minReplicas": max(1, a.min),
                        "maxReplicas": a.max,
                        "metrics": [metric],
                        "behavior": behavior,
                    },
                }
            )
            return
        namespace = self.opts.namespace or "default"
        if not self.opts.namespace:
            self.warn(
                loc,
                "KEDA reads the scaler from its own namespace: the URL assumes namespace "
                "'default'; pass --namespace",
            )
        self.add(
            {
                "apiVersion": "keda.sh/v1alpha1",
                "kind": "ScaledObject",
                "metadata": self.meta(pod.name, "autoscaler"),
                "spec": {
                    "scaleTargetRef": target,
                    "minReplicaCount": a.min,
                    "maxReplicaCount": a.max,
                    "pollingInterval": 5,
                    "cooldownPeriod": _seconds(a.cooldown_down),
                    "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior}},
                    "triggers": [
                        {
                            "type": "metrics-api",
                            "metricType": "AverageValue",
                            "metadata": {
                                "url": f"http://{name}.{namespace}.svc:{SCALER_PORT}/desired",
                                "format": "json",
                                "valueLocation": "desired",
                                "targetValue": "1",
                            },
                        }
                    ],
                },
            }
        )

    # -- services -------------------------------------------------------------------------

    def service(self, k: int, svc: Service) -> None:
        if svc.host != "127.0.0.1":
            self.warn(
                ("services", k, "host"),
                f"{svc.host} is where `podkit up` binds; on Kubernetes the Service gets a "
                "cluster IP",
            )
        if svc.lb is not None:
            self.balancer(k, svc)
            return
        self.add(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": self.meta(svc.name, "service", svc.pods),
                "spec": {
                    "selector": self.selector(svc.pods),
                    "ports": [
                        {
                            "name": "tcp",
                            "port": svc.port,
                            "targetPort": svc.target,
                            "protocol": "TCP",
                        }
                    ],
                },
            }
        )

    def headless(self, pod: Pod) -> str:
        """The headless Service `<pod>-pods` (once), whose DNS name lists ready replicas."""
        name = f"{pod.name}-pods"
        if name not in self._headless:
            self._headless.add(name)
            ports = [
                {"name": n, "port": p} for c in pod.all_containers() for n, p in c.ports.items()
            ]
            svc: Obj = {"clusterIP": "None", "selector": self.selector(pod.name)}
            if ports:
                svc["ports"] = ports
            self.add(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": self.meta(name, "workload", pod.name),
                    "spec": svc,
                }
            )
        return name

    def balancer(self, k: int, svc: Service) -> None:
        """A `podkit lb` Deployment in front of the pod's replicas, and the Service."""
        lb = svc.lb
        assert lb is not None
        pod = self.spec.pod(svc.pods)
        port = svc.target
        if isinstance(port, str):
            port = next(p for c in pod.all_containers() for n, p in c.ports.items() if n == port)
        name = f"{svc.name}-lb"
        tls_dir = "/etc/podkit/tls" if lb.tls and lb.tls.cert else None
        members = f"{self.headless(pod)}:{port}"
        args = ["--listen", f"0.0.0.0:{svc.port}", "--members-dns", members]
        args += lb.flags(tls_dir=tls_dir)
        ports = [{"name": "http", "containerPort": svc.port, "protocol": "TCP"}]
        if lb.admin_port:
            args += ["--admin-host", "$(POD_IP)", "--admin-port", str(lb.admin_port)]
            ports.append({"name": "admin", "containerPort": lb.admin_port, "protocol": "TCP"})
        container: Obj = {
            "name": "lb",
            "image": self.opts.podkit_image,
            "command": ["podkit", "lb"],
            "args": args,
            "ports": ports,
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 2},
            "securityContext": _hardened(read_only=True),
        }
        workload = self.one_replica("Deployment", name, "lb", container, UID, {})
        workload["spec"]["replicas"] = 2
        if tls_dir is not None and lb.tls is not None:
            container["volumeMounts"] = [{"name": "tls", "mountPath": tls_dir, "readOnly": True}]
            workload["spec"]["template"]["spec"]["volumes"] = [
                {"name": "tls", "secret": {"secretName": f"{svc.name}-tls"}}
            ]
            self.warn(
                ("services", k, "lb", "tls", "cert"),
                f"the certificate comes from the Secret '{svc.name}-tls' on Kubernetes: "
                f"kubectl create secret tls {svc.name}-tls --cert {lb.tls.cert} "
                f"--key {lb.tls.key}",
            )
        self.add(workload)
        self.add(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": self.meta(svc.name, "service", name),
                "spec": {
                    "selector": self.selector(name),
                    "ports": [
                        {"name": "http", "port": svc.port, "targetPort": "http", "protocol": "TCP"}
                    ],
                },
            }
        )

    # -- --with-backends ------------------------------------------------------------------

    def servers(self) -> None:
        """Redis, NATS JetStream and etcd, one replica each, and the backends' Secret."""
        secret_meta = self.meta(self.secret, "backend")
        self.objects.insert(
            0,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": secret_meta,
                "type": "Opaque",
                "stringData": dict(sorted(self.backends.items())),
            },
        )
        n = self.spec.name
        self.server(
            "redis", 6379, ["redis-server", "--appendonly", "yes", "--dir", "/data"], 999, []
        )
        self.server("nats", 4222, ["nats-server", "-js", "-sd", "/data"], 1000, [])
        client = f"http://{n}-etcd:2379"
        self.server(
            "etcd",
            2379,
            ["etcd", "--data-dir", "/data/etcd", "--listen-client-urls", "http://0.0.0.0:2379",
             "--advertise-client-urls", client],
            1000,
            [],
        )  # fmt: skip

    def server(self, kind: str, port: int, command: list[str], uid: int, env: list[Obj]) -> None:
        name = f"{self.spec.name}-{kind}"
        self.add(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": self.meta(name, "backend"),
                "spec": {
                    "selector": self.selector(name),
                    "ports": [{"name": kind, "port": port, "targetPort": kind}],
                },
            }
        )
        container: Obj = {
            "name": kind,
            "image": SERVER_IMAGES[kind],
            "command": command,
            "ports": [{"name": kind, "containerPort": port, "protocol": "TCP"}],
            "readinessProbe": {"tcpSocket": {"port": kind}, "periodSeconds": 2},
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            "securityContext": _hardened(read_only=True),
        }
        if env:
            container["env"] = env
        claim = {
            "metadata": {"name": "data"},
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        extra = {"serviceName": name, "volumeClaimTemplates": [claim]}
        self.add(self.one_replica("StatefulSet", name, "backend", container, uid, extra))

    def one_replica(
        self, kind: str, name: str, component: str, container: Obj, uid: int, extra: Obj
    ) -> Obj:
        """A one-replica workload of one container (podkit's scaler, a backend server)."""
        template = {
            "metadata": {"labels": self.selector(name)},
            "spec": {
                "containers": [container],
                "automountServiceAccountToken": False,
                "securityContext": _pod_security(uid),
            },
        }
        spec = {
            "replicas": 1,
            "selector": {"matchLabels": self.selector(name)},
            "template": template,
        }
        return {
            "apiVersion": "apps/v1",
            "kind": kind,
            "metadata": self.meta(name, component),
            "spec": {**spec, **extra},
        }


def _pod_security(uid: int) -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _hardened(read_only: bool) -> Obj:
    """A container's securityContext: no privilege escalation, no capabilities."""
    out: Obj = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }
    if read_only:
        out["readOnlyRootFilesystem"] = True
    return out


def iter_fields(model: type[BaseModel] = Spec, prefix: str = "") -> Iterator[str]:
    """Every field path of the spec models, spelled as the keys of `FIELDS`; the fields of
    a probe are listed once, under `probe.` (iterate `iter_fields(Probe, "probe.")`)."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        yield path
        sub = _model_in(info.annotation)
        if sub is None or sub is Probe or issubclass(sub, HTTPProbe | TCPProbe | ExecProbe):
            continue
        many = typing.get_origin(info.annotation) in (list, dict)
        yield from iter_fields(sub, f"{path}[]." if many else f"{path}.")


def shell_hint(rendered: Rendered, spec: Spec) -> str:
    """The command that creates the backends' Secret, with the spec's URLs."""
    parts = ["kubectl", "create", "secret", "generic", rendered.secret or ""]
    for key in rendered.secret_keys:
        parts.append(f"--from-literal={key}={spec.backends.get(key, 'redis://HOST:6379')}")
    return shlex.join(parts)


def validate_objects(objects: list[Obj], version: str, *, strict: bool = True) -> list[str]:
    """Check built-in objects against the official schema of `version` (the newest
    kubernetes-validate knows, if it does not know that one); custom resources (KEDA's)
    have no schema there and are skipped. Returns one line per failure."""
    from kubernetes_validate import utils as kv

    major, minor = kube_version(version)
    known = sorted({tuple(int(x) for x in v.split(".")) for v in kv.all_versions()})
    target = max((v for v in known if v[:2] <= (major, minor)), default=known[-1])
    wanted = ".".join(str(x) for x in target)
    failures = []
    for obj in objects:
        group = obj["apiVersion"].rpartition("/")[0]
        if group and not group.endswith(".k8s.io") and group not in BUILTIN_GROUPS:
            continue  # a custom resource
        try:
            kv.validate(obj, wanted, strict=strict)
        except kv.ValidationError as exc:
            at = ".".join(str(p) for p in exc.path)
            failures.append(f"{obj['kind']}/{obj['metadata']['name']} {at}: {exc.message}")
    return failures
