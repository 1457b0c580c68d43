"""What a pattern declares to the rest of podkit: its components and its hooks.

Each pattern package holds a `PATTERN` (a `Pattern`) and names it under the
`podkit.patterns` entry-point group in pyproject.toml. `podkit.system` reads every
registered pattern (`patterns()`) and never names one: a pattern's components become
`component:` names of the spec, its pod hooks become fields of `pods[]` (an elector
beside each replica, an autoscaler loop), its service hooks fields of `services[]` (a
balancer in front of a service). A hook works through the context the system hands it
(`LocalPod`, `KubePod`, `KubeService`): it never imports the system.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel

from podkit.clock import Clock

Loc = tuple[str | int, ...]
Obj = dict[str, Any]
GROUP = "podkit.patterns"


def flag_value(v: float) -> str:
    """A flag's value as typed: 20 for 20.0, 0.25 as is, never 1e+06."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


def podkit_command(*words: str) -> list[str]:
    """The command line that runs `podkit <words...>` with this Python."""
    return [sys.executable, "-m", "podkit", *words]


def whole_seconds(value: float) -> int:
    """Seconds as Kubernetes takes them: whole, rounded up."""
    return math.ceil(value)


@dataclass(frozen=True)
class Component:
    """A program of the pattern that a spec container may run with `component: <name>`.

    Its options are the typed options of its command (`podkit <command...>`): the
    spec's `with:` keys are those options' names, checked against their types."""

    name: str  # as in the spec: "sidecar.tls"
    command: tuple[str, ...]  # the `podkit` subcommand words: ("sidecar", "tls")
    serves_tls: bool = False  # its `ports` serve TLS (a service in front is https://)


@dataclass(frozen=True)
class Added:
    """A container a pod hook adds to every replica, in the spec's own form."""

    spec: dict[str, Any]  # fields of a spec container (`name`, `component`, `with`, ...)
    app_image: bool = False  # it runs a program of the app's: on Kubernetes, the app's image


class PodInfo(Protocol):
    """What a hook may read of a pod of the spec."""

    @property
    def name(self) -> str: ...
    @property
    def replicas(self) -> int: ...
    @property
    def restart(self) -> str: ...


class LocalPod(Protocol):
    """A pod as `podkit up` runs it, for a hook's controller loop."""

    @property
    def name(self) -> str: ...
    @property
    def clock(self) -> Clock: ...
    @property
    def stopping(self) -> bool: ...
    def backend_url(self, name: str) -> str: ...
    def replicas(self) -> int: ...
    async def scale(self, count: int) -> None: ...
    def event(self, text: str) -> None: ...


class Kube(Protocol):
    """The Kubernetes renderer, as hooks see it."""

    @property
    def instance(self) -> str: ...  # the spec's name
    @property
    def namespace(self) -> str | None: ...
    @property
    def podkit_image(self) -> str: ...
    @property
    def autoscaler(self) -> str: ...
    @property
    def secret(self) -> str: ...
    def meta(self, name: str, component: str, app: str | None = None) -> Obj: ...
    def selector(self, app: str) -> dict[str, str]: ...
    def add(self, obj: Obj) -> None: ...
    def refuse(self, loc: Loc, message: str) -> None: ...
    def warn(self, loc: Loc, message: str) -> None: ...
    def spec_backend(self, name: str) -> str | None: ...
    def has_backend(self, name: str) -> bool: ...
    def backend_env(self, name: str) -> Obj: ...
    def workload(self, kind: str, name: str, component: str, container: Obj) -> Obj: ...
    def hardened(self, read_only: bool) -> Obj: ...


class KubePod(Kube, Protocol):
    """One pod being rendered; a hook may set the workload's service account and say
    that something else sets its replica count."""

    @property
    def pod(self) -> PodInfo: ...
    @property
    def loc(self) -> Loc: ...
    @property
    def kind(self) -> str: ...  # Deployment, StatefulSet or Job
    def use_service_account(self, name: str) -> None: ...
    def scaled_elsewhere(self) -> None: ...


class KubeService(Kube, Protocol):
    """One service being rendered, in front of the pod `pods`."""

    @property
    def name(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def target_port(self) -> int: ...
    @property
    def loc(self) -> Loc: ...
    def pod_dns(self) -> str: ...  # the headless Service listing the pod's ready replicas


class PodHook:
    """A field of `pods[]` that a pattern adds to the spec: `key: <model>`."""

    key: ClassVar[str]
    model: ClassVar[type[BaseModel]]
    fields: ClassVar[dict[str, str]] = {}  # field path -> what it becomes on Kubernetes

    def backends(self, options: Any) -> dict[str, str]:
        """The backends the options name, by the field that names each."""
        return {}

    def check(
        self, pod: PodInfo, options: Any, ports: dict[int, str], names: set[str]
    ) -> list[tuple[Loc, str]]:
        """Problems with the options beside the pod's container `ports` (number -> owner)
        and container `names`; each place is relative to the hook's field."""
        return []

    def containers(self, pod: PodInfo, options: Any, kube: KubePod | None = None) -> list[Added]:
        """Containers added to each replica (`kube` given when rendering for Kubernetes)."""
        return []

    def initial_replicas(self, options: Any, replicas: int) -> int:
        """How many replicas `podkit up` starts with."""
        return replicas

    async def control(self, pod: LocalPod, options: Any) -> None:
        """A loop `podkit up` runs for the pod while it runs (none by default)."""

    def cluster_state_user(self, options: Any) -> Loc | None:
        """The field that needs the `state` backend on the cluster, if one does."""
        return None

    def render_before(self, kube: KubePod, options: Any) -> None:
        """Add Kubernetes objects before the pod's workload."""

    def render_after(self, kube: KubePod, options: Any) -> None:
        """Add Kubernetes objects after the pod's workload."""


@dataclass(frozen=True)
class Process:
    """A program `podkit up` runs for a service, in place of the plain forwarder: it
    reads the ready replicas from a members file and is ready when every one of
    `ready_ports` answers `ready_path` with a 2xx."""

    argv: Callable[[str], list[str]]  # the members file -> the whole command line
    ready_ports: Sequence[int]
    ready_path: str = "/readyz"
    ready_host: str = "127.0.0.1"


class ServiceHook:
    """A field of `services[]` that a pattern adds to the spec: `key: <model>`."""

    key: ClassVar[str]
    model: ClassVar[type[BaseModel]]
    fields: ClassVar[dict[str, str]] = {}

    def tls(self, options: Any) -> bool:
        """Whether clients reach the service over TLS."""
        return False

    def check(self, port: int, options: Any) -> list[tuple[Loc, str]]:
        """Problems with the options beside the service's `port`; each place is relative
        to the hook's field."""
        return []

    def process(
        self, name: str, host: str, port: int, options: Any, free_ports: Callable[[int], int]
    ) -> Process:
        """What `podkit up` runs for the service listening on `host:port`;
        `free_ports(n)` is the first of n consecutive free ports, for its admin endpoints."""
        raise NotImplementedError

    def render(self, kube: KubeService, options: Any) -> None:
        """Add the Kubernetes objects that serve the service (its Service included)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Pattern:
    """One pattern package: its command, its components and its hooks."""

    name: str  # the `podkit` subcommand: "lb"
    cli: str  # "module:attribute" of its typer.Typer
    components: tuple[Component, ...] = ()
    pod_hooks: tuple[PodHook, ...] = field(default=())
    service_hooks: tuple[ServiceHook, ...] = field(default=())


@functools.cache
def patterns() -> tuple[Pattern, ...]:
    """Every registered pattern, in the order of their names."""
    found = []
    for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        pattern = ep.load()
        if not isinstance(pattern, Pattern):
            raise TypeError(f"entry point {GROUP}:{ep.name} is not a podkit Pattern")
        found.append(pattern)
    return tuple(found)


def pod_hooks() -> tuple[PodHook, ...]:
    return tuple(h for p in patterns() for h in p.pod_hooks)


def service_hooks() -> tuple[ServiceHook, ...]:
    return tuple(h for p in patterns() for h in p.service_hooks)
