"""What the patterns' hooks see of the Kubernetes renderer (`podkit.contract.Kube`), and
the security settings every podkit workload gets."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from podkit.contract import Loc, Obj

if TYPE_CHECKING:
    from podkit.system.k8s import Renderer
    from podkit.system.spec import Pod, Service

UID = 10001  # the podkit image's user


def env_name(name: str) -> str:
    """A name as part of an environment variable: `my-db` -> `MY_DB`."""
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


class Context:
    """The renderer as the patterns' hooks see it (`podkit.contract.Kube`)."""

    def __init__(self, r: Renderer, loc: Loc) -> None:
        self._r = r
        self.loc = loc
        self.instance = r.spec.name
        self.namespace = r.opts.namespace
        self.podkit_image = r.opts.podkit_image
        self.autoscaler = r.opts.autoscaler
        self.secret = r.secret

    def meta(self, name: str, component: str, app: str | None = None) -> Obj:
        return self._r.meta(name, component, app)

    def selector(self, app: str) -> dict[str, str]:
        return self._r.selector(app)

    def add(self, obj: Obj) -> None:
        self._r.add(obj)

    def refuse(self, loc: Loc, message: str) -> None:
        self._r.refuse(loc, message)

    def warn(self, loc: Loc, message: str) -> None:
        self._r.warn(loc, message)

    def spec_backend(self, name: str) -> str | None:
        return self._r.spec.backends.get(name)

    def has_backend(self, name: str) -> bool:
        return name in self._r.backends

    def backend_env(self, name: str) -> Obj:
        ref = {"secretKeyRef": {"name": self.secret, "key": name}}
        return {"name": f"PODKIT_BACKEND_{env_name(name)}", "valueFrom": ref}

    def workload(self, kind: str, name: str, component: str, container: Obj) -> Obj:
        return self._r.one_replica(kind, name, component, container, UID, {})

    def hardened(self, read_only: bool) -> Obj:
        return hardened(read_only)


class PodContext(Context):
    """One pod being rendered (`podkit.contract.KubePod`)."""

    def __init__(self, r: Renderer, pod: Pod, loc: Loc, kind: str) -> None:
        super().__init__(r, loc)
        self.pod = pod
        self.kind = kind
        self.service_account: str | None = None
        self.scaled = False

    def use_service_account(self, name: str) -> None:
        self.service_account = name

    def scaled_elsewhere(self) -> None:
        self.scaled = True


class ServiceContext(Context):
    """One service being rendered (`podkit.contract.KubeService`)."""

    def __init__(self, r: Renderer, k: int, svc: Service) -> None:
        super().__init__(r, ("services", k))
        self._pod = r.spec.pod(svc.pods)
        self.name = svc.name
        self.port = svc.port
        ports = {n: p for c in self._pod.all_containers() for n, p in c.ports.items()}
        self.target_port = ports[svc.target] if isinstance(svc.target, str) else svc.target

    def pod_dns(self) -> str:
        return self._r.headless(self._pod)


def pod_security(uid: int) -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": uid,
        "runAsGroup": uid,
        "fsGroup": uid,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def hardened(read_only: bool) -> Obj:
    """A container's securityContext: no privilege escalation, no capabilities."""
    out: Obj = {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }
    if read_only:
        out["readOnlyRootFilesystem"] = True
    return out
