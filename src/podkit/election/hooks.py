"""`election:` on a pod of the spec: `podkit elect` beside every replica.

Locally and with a network backend the elector uses the spec's backend. On Kubernetes,
with an embedded backend (or `k8s://`), it campaigns on a Lease instead, and the pod runs
under a ServiceAccount whose Role may only get and update that one Lease.
"""

from __future__ import annotations

import shlex
from typing import Any

from pydantic import Field

from podkit.contract import Added, KubePod, Loc, PodHook, PodInfo
from podkit.spectypes import Model, Name, Port, PositiveSeconds, Text

EMBEDDED = ("memory", "sqlite")


class Election(Model):
    """Leader election among a pod's replicas: `podkit elect` runs beside the app."""

    name: Name | None = Field(
        None,
        description="the election's name (on Kubernetes, the Lease's when it has one); "
        "not set: the pod's name",
    )
    backend: Name = Field(
        "state",
        description="the backend the electors campaign on: a key of `backends:`, or `state`, "
        "the embedded default (on Kubernetes an embedded one becomes a Lease)",
    )
    ttl: PositiveSeconds = Field(
        5.0,
        description="how long the leader's lease lasts unrenewed: how soon another replica "
        "takes over when the leader dies",
    )
    port: Port = Field(
        4040,
        description="the elector's HTTP port on the replica's address: `GET /leader`, "
        "`GET /me`; the container port `elector`",
    )
    exec: list[Text] | None = Field(
        None,
        description="a command the elector runs only while its replica leads, stopped when "
        "it loses; not set: the app asks the elector",
    )


def _lease(kube: KubePod, pod: PodInfo, e: Election) -> str | None:
    """The Lease the elector campaigns on, or None when the backend spans machines."""
    url = kube.spec_backend(e.backend)
    scheme = url.split("://", 1)[0] if url else ""
    if url is not None and scheme not in EMBEDDED and scheme != "k8s":
        return None
    return e.name or pod.name


class ElectionHook(PodHook):
    key = "election"
    model = Election
    fields = {
        "pods[].election": "the elector container, a Lease, ServiceAccount, Role, RoleBinding",
        "pods[].election.name": "the Lease's name",
        "pods[].election.backend": "embedded: a Kubernetes Lease; redis/nats/etcd: used as is",
        "pods[].election.ttl": "the elector's --ttl",
        "pods[].election.port": "the elector's containerPort and --port",
        "pods[].election.exec": "the elector's --exec",
    }

    def backends(self, options: Any) -> dict[str, str]:
        return {"backend": options.backend}

    def check(
        self, pod: PodInfo, options: Any, ports: dict[int, str], names: set[str]
    ) -> list[tuple[Loc, str]]:
        e: Election = options
        problems: list[tuple[Loc, str]] = []
        if e.port in ports:
            problems.append(
                (("port",), f"port {e.port} is already used by container '{ports[e.port]}'")
            )
        if "elector" in names:
            problems.append(((), "a container is named 'elector': rename it"))
        return problems

    def containers(self, pod: PodInfo, options: Any, kube: KubePod | None = None) -> list[Added]:
        e: Election = options
        lease = _lease(kube, pod, e) if kube is not None else None
        with_: dict[str, Any] = {
            "backend": f"$(PODKIT_BACKEND_{e.backend.upper().replace('-', '_')})",
            "name": e.name or pod.name,
            "identity": "$(POD_NAME)",
            "ttl": e.ttl,
            "host": "$(POD_IP)",
            "port": e.port,
        }
        if e.exec:
            with_["exec"] = shlex.join(e.exec)
        if lease is not None:
            with_["backend"] = "k8s://$(POD_NAMESPACE)"
            with_["name"] = lease
        elector = {
            "name": "elector",
            "component": "elect",
            "ports": {"elector": e.port},
            "readiness": {"http": {"path": "/healthz", "port": "elector"}, "period": 1.0},
            "with": with_,
        }
        return [Added(elector, app_image=bool(e.exec))]

    def render_before(self, kube: KubePod, options: Any) -> None:
        """The Lease and its RBAC, when the election needs one."""
        lease = _lease(kube, kube.pod, options)
        if lease is None:
            return
        pod = kube.pod.name
        sa = f"{pod}-elector"
        kube.use_service_account(sa)
        kube.add(
            {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": kube.meta(lease, "election", pod),
                "spec": {},
            }
        )
        kube.add(
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": kube.meta(sa, "election", pod),
                "automountServiceAccountToken": True,
            }
        )
        rule = {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease],
            "verbs": ["get", "update"],
        }
        kube.add(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": kube.meta(sa, "election", pod),
                "rules": [rule],
            }
        )
        subject: dict[str, Any] = {"kind": "ServiceAccount", "name": sa}
        if kube.namespace:
            subject["namespace"] = kube.namespace
        kube.add(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": kube.meta(sa, "election", pod),
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
                "subjects": [subject],
            }
        )
