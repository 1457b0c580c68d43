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
- The patterns' hooks add what their fields mean (`election:` a Lease and its RBAC,
  `autoscale:` a scaler and an HPA or KEDA ScaledObject, `lb:` a balancer Deployment),
  through the contexts `PodContext` and `ServiceContext`.
"""

from __future__ import annotations

import re
import shlex
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel

from podkit import __version__
from podkit.contract import Loc, Obj, PodHook, ServiceHook, pod_hooks, service_hooks, whole_seconds
from podkit.system.components import command_words, to_flags
from podkit.system.k8sctx import (
    UID,
    PodContext,
    ServiceContext,
    env_name,
    hardened,
    pod_security,
)
from podkit.system.spec import (
    Container,
    ExecProbe,
    HTTPProbe,
    Pod,
    Probe,
    Service,
    Spec,
    TCPProbe,
)
from podkit.yamlpos import model_in

DEFAULT_PODKIT_IMAGE = f"ghcr.io/podkit/podkit:{__version__}"
DEFAULT_KUBE_VERSION = "1.33"
NATIVE_SIDECARS = (1, 29)  # init containers with restartPolicy: Always, on by default
EMBEDDED = ("memory", "sqlite")
BUILTIN_GROUPS = ("apps", "batch", "autoscaling", "policy")
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
}
# ... and the fields the patterns' hooks add
_HOOKS: list[PodHook | ServiceHook] = [*pod_hooks(), *service_hooks()]
FIELDS |= {k: v for hook in _HOOKS for k, v in hook.fields.items()}


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
    return Renderer(spec, options or RenderOptions()).run()


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


def _scheme(url: str) -> str:
    return url.split("://", 1)[0]


def _mentions(container: Container, var: str) -> bool:
    texts = [*(container.command or []), *container.args, *container.env.values()]
    texts += [v for v in container.with_.values() if isinstance(v, str)]
    return any(f"$({var})" in t for t in texts)


class Renderer:
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
        kind = "Job" if job else "StatefulSet" if stable else "Deployment"
        ctx = PodContext(self, pod, base, kind)
        for hook, options in pod.hooks():
            hook.render_before(ctx, options)
        template = self.template(ctx, stable and job)
        meta = self.meta(pod.name, "workload")
        if job:
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
        spec = {}
        if not ctx.scaled:
            spec["replicas"] = pod.replicas
        spec["selector"] = {"matchLabels": self.selector(pod.name)}
        if stable:
            spec["serviceName"] = self.headless(pod)
            spec["podManagementPolicy"] = "Parallel"
        spec["template"] = template
        self.add({"apiVersion": "apps/v1", "kind": kind, "metadata": meta, "spec": spec})
        for hook, options in pod.hooks():
            hook.render_after(ctx, options)

    def template(self, ctx: PodContext, indexed_job: bool) -> Obj:
        pod = ctx.pod
        sidecars: list[Obj] = []
        main: list[Obj] = []
        for j, c in enumerate(pod.containers):
            rendered = self.container((*ctx.loc, "containers", j), pod, c, indexed_job)
            (sidecars if c.component is not None else main).append(rendered)
        for hook, added, c in pod.added(ctx):
            rendered = self.container((*ctx.loc, hook.key), pod, c, indexed_job, added.app_image)
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
        spec["terminationGracePeriodSeconds"] = whole_seconds(pod.grace_period)
        spec["enableServiceLinks"] = False  # the spec's services are set explicitly
        if ctx.service_account is not None:
            spec["serviceAccountName"] = ctx.service_account
        else:
            spec["automountServiceAccountToken"] = False
        spec["securityContext"] = pod_security(UID)
        if pod.volumes:
            spec["volumes"] = [{"name": v, "emptyDir": {}} for v in pod.volumes]
        return {"metadata": {"labels": self.selector(pod.name)}, "spec": spec}

    def container(
        self, loc: Loc, pod: Pod, c: Container, indexed_job: bool, runs_app: bool = False
    ) -> Obj:
        """One container; a component that `runs_app` (a program of the app's) gets the
        app's image."""
        out: Obj = {"name": c.name}
        if c.component is not None:
            if c.image:  # a component that reads files of the spec's directory
                out["image"] = c.image
            else:
                out["image"] = self.image(loc, c) if runs_app else self.opts.podkit_image
            out["command"] = ["podkit", *command_words(c.component)]
            out["args"] = to_flags(dict(c.with_))
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
        out["securityContext"] = hardened(read_only=out["image"] == self.opts.podkit_image)
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
            env.append({"name": f"PODKIT_BACKEND_{env_name(name)}", "valueFrom": ref})
        for svc in self.spec.services:
            env.append({"name": f"{env_name(svc.name)}_SERVICE_HOST", "value": svc.name})
            env.append({"name": f"{env_name(svc.name)}_SERVICE_PORT", "value": str(svc.port)})
        for vol, mount in c.volumes.items():
            env.append({"name": f"VOLUME_{env_name(vol)}", "value": mount})
        for port_name, number in c.ports.items():
            env.append({"name": f"PORT_{env_name(port_name)}", "value": str(number)})
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
            out["initialDelaySeconds"] = whole_seconds(p.initial_delay)
        for name, value, key in (("period", p.period, "periodSeconds"),
                                 ("timeout", p.timeout, "timeoutSeconds")):  # fmt: skip
            whole = max(1, whole_seconds(value))
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

    # -- services -------------------------------------------------------------------------

    def service(self, k: int, svc: Service) -> None:
        if svc.host != "127.0.0.1":
            self.warn(
                ("services", k, "host"),
                f"{svc.host} is where `podkit up` binds; on Kubernetes the Service gets a "
                "cluster IP",
            )
        hooked = svc.hook()
        if hooked is not None:
            hooked[0].render(ServiceContext(self, k, svc), hooked[1])
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
            "securityContext": hardened(read_only=True),
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
                "securityContext": pod_security(uid),
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


def iter_fields(model: type[BaseModel] = Spec, prefix: str = "") -> Iterator[str]:
    """Every field path of the spec models, spelled as the keys of `FIELDS`; the fields of
    a probe are listed once, under `probe.` (iterate `iter_fields(Probe, "probe.")`)."""
    for name, info in model.model_fields.items():
        path = f"{prefix}{info.alias or name}"
        yield path
        sub = model_in(info.annotation)
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
