"""The models of the system spec: the spec, its pods, containers, probes and services,
and the fields the patterns' hooks add to pods and services (`election:`, `lb:`...).

Every field has a description: docs/spec.md, the spec reference, is generated from them
(`podkit.system.specdoc`). Loading and checking a spec is `podkit.system.spec`.
"""

from __future__ import annotations

import inspect
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from podkit.contract import (
    Added,
    KubePod,
    PodHook,
    PodInfo,
    ServiceHook,
    patterns,
    pod_hooks,
    service_hooks,
)
from podkit.spectypes import Model, Name, Port, PortRef, PositiveSeconds, Seconds, Text

BACKEND_SCHEMES = ("memory", "sqlite", "redis", "rediss", "nats", "etcd", "k8s")


class HTTPProbe(Model):
    """An HTTP GET; a 2xx or 3xx answer is a success."""

    path: str = Field("/", description="the path to GET")
    port: PortRef = Field(
        description="the port to connect to: a number, or the name of a port of the pod"
    )
    host: str | None = Field(
        None, description="the address to connect to; not set: the replica's own (`POD_IP`)"
    )


class TCPProbe(Model):
    """A TCP connect to the replica's address; a connection that opens is a success."""

    port: PortRef = Field(
        description="the port to connect to: a number, or the name of a port of the pod"
    )


class ExecProbe(Model):
    """A command; an exit with code 0 within the probe's `timeout` is a success."""

    command: list[Text] = Field(
        min_length=1,
        description="the program and its arguments, run with the container's environment "
        "and working directory (`$(VAR)` is not expanded)",
    )


class Probe(Model):
    """Exactly one of http, tcp or exec, with Kubernetes' timing knobs (in seconds)."""

    http: HTTPProbe | None = Field(None, description="probe by an HTTP GET")
    tcp: TCPProbe | None = Field(None, description="probe by opening a TCP connection")
    exec: ExecProbe | None = Field(None, description="probe by running a command")
    initial_delay: Seconds = Field(
        0.0, description="how long to wait after the container starts before the first probe"
    )
    period: PositiveSeconds = Field(1.0, description="how long from one probe to the next")
    timeout: PositiveSeconds = Field(
        1.0, description="how long a probe may take before it counts as a failure"
    )
    success_threshold: Annotated[int, Field(ge=1)] = Field(
        1,
        description="successes in a row before a container counts as ready (a liveness "
        "probe must use 1 on Kubernetes)",
    )
    failure_threshold: Annotated[int, Field(ge=1)] = Field(
        3,
        description="failures in a row that make a healthy container unhealthy: not ready "
        "(readiness), or stopped and restarted (liveness)",
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Probe:
        kinds = [k for k in ("http", "tcp", "exec") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise PydanticCustomError(
                "probe_kind",
                "a probe needs exactly one of 'http', 'tcp' or 'exec' (got {got})",
                {"got": ", ".join(kinds) or "none"},
            )
        return self


class Container(Model):
    """One process of a pod: a command of the user's, or a podkit component."""

    name: Name = Field(
        description="the container's name, unique in its pod; the logs show it as "
        "`<replica>/<name>`"
    )
    image: str | None = Field(
        None,
        description="its image on Kubernetes (`podkit up` ignores it); not set: the spec's "
        "`image`, else `podkit k8s --image`; for a component, the podkit image",
    )
    command: list[Text] | None = Field(
        None,
        description="the program and its arguments; `$(VAR)` expands. A container has "
        "either a `command` or a `component`",
    )
    args: list[Text] = Field(
        [],
        description="more arguments after `command` (refused with `component`); `$(VAR)` expands",
    )
    component: str | None = Field(
        None, description="a podkit component to run instead of a command (listed below)"
    )
    with_: dict[str, Any] = Field(
        default_factory=dict,
        alias="with",
        description="the component's options: each key is an option of its command "
        "(`--self-signed` is `self_signed`), each value checked against the option's type; "
        "`true`/`false` set or clear a switch, a list repeats the option, `$(VAR)` expands",
    )
    env: dict[str, Text] = Field(
        {},
        description="environment variables, name to value; set after podkit's own "
        "(`POD_IP`, `PORT_<NAME>`...), so `$(VAR)` in a value may use those",
    )
    ports: dict[Name, Port] = Field(
        {},
        description="the ports it listens on, name to number; each name and number once in "
        "the pod; services and probes may use the name, and it sees `PORT_<NAME>`",
    )
    volumes: dict[Name, str] = Field(
        default_factory=dict,
        description="the pod's volumes it uses, name to the path it is mounted at on "
        "Kubernetes; it finds the directory in `VOLUME_<NAME>` (under `podkit up` a "
        "directory of the replica's own)",
    )
    workdir: str | None = Field(
        None,
        description="the directory it starts in, relative to the spec's directory (on "
        "Kubernetes to `--app-root`) or absolute; not set: the spec's directory",
    )
    readiness: Probe | None = Field(
        None,
        description="when it is ready: a replica gets service traffic only while all its "
        "containers are; not set: ready once started",
    )
    liveness: Probe | None = Field(
        None,
        description="when it is alive: one that fails is stopped and restarted as the "
        "pod's `restart` allows; not set: never restarted for it",
    )

    @model_validator(mode="after")
    def _command_or_component(self) -> Container:
        if self.command is None and self.component is None:
            raise PydanticCustomError(
                "missing_command",
                "container '{name}' needs a 'command' (a program to run) "
                "or a 'component' (a podkit component)",
                {"name": self.name},
            )
        if self.command is not None and self.component is not None:
            raise PydanticCustomError(
                "command_and_component",
                "container '{name}' has both 'command' and 'component': choose one",
                {"name": self.name},
            )
        if self.with_ and self.component is None:
            raise PydanticCustomError(
                "with_without_component",
                "container '{name}': 'with' configures a component, but none is named",
                {"name": self.name},
            )
        if self.args and self.component is not None:
            raise PydanticCustomError(
                "args_with_component",
                "container '{name}': 'args' go with a 'command'; a component is configured "
                "by 'with'",
                {"name": self.name},
            )
        return self


class _PodHead(Model):
    """A group of containers that share an address and volumes, run as `replicas` copies;
    the patterns' pod hooks add fields (`election:`, `autoscale:`)."""

    name: Name = Field(
        description="the pod's name; under `podkit up` replica i is `<name>-<i>` (its `POD_NAME`)"
    )
    replicas: Annotated[int, Field(ge=0, le=250)] = Field(
        1,
        description="how many copies run, each with its own address (`POD_IP`) and number "
        "(`REPLICA`, from 0)",
    )
    restart: Literal["Always", "OnFailure", "Never"] = Field(
        "Always",
        description="whether a container that exits starts again: always, only after a "
        "non-zero exit, or never; restarts back off from 0.25 s, doubling to 30 s",
    )
    grace_period: Seconds = Field(
        10.0,
        description="how long the pod's containers have to stop after SIGTERM before SIGKILL",
    )
    volumes: list[Name] = Field(
        [],
        description="the pod's volumes: empty directories its containers share, each "
        "mounted by the containers' `volumes`",
    )

    def hooks(self) -> list[tuple[PodHook, Any]]:
        """The pod hooks this pod sets, each with its options."""
        return [(h, o) for h in pod_hooks() if (o := getattr(self, h.key, None)) is not None]

    def added(self, kube: KubePod | None = None) -> list[tuple[PodHook, Added, Container]]:
        """The containers the pod's hooks add (for Kubernetes when `kube` is given)."""
        return [
            (hook, a, Container.model_validate(a.spec))
            for hook, options in self.hooks()
            for a in hook.containers(typing.cast(PodInfo, self), options, kube)
        ]

    def all_containers(self) -> list[Container]:
        """The declared containers, plus those the pod's hooks add (an elector...)."""
        declared: list[Container] = getattr(self, "containers")  # noqa: B009
        return [*declared, *(c for _, _, c in self.added())]


class _ServiceFields(Model):
    """A stable port that balances over the ready replicas of one pod; the patterns'
    service hooks add fields (`lb:`) that put a program of theirs in front."""

    name: Name = Field(
        description="the service's name; every container sees `<NAME>_SERVICE_HOST` and "
        "`<NAME>_SERVICE_PORT`"
    )
    port: Port = Field(description="the port clients connect to")
    pods: Name = Field(description="the pod whose ready replicas serve it")
    target: PortRef = Field(
        description="the replicas' port it forwards to: a number, or the name of a port of the pod"
    )
    host: str = Field(
        "127.0.0.1",
        description="the address `podkit up` listens on (a Kubernetes Service has its own)",
    )
    policy: Literal["round-robin"] = Field(
        "round-robin",
        description="how connections are spread over the ready replicas, one connection at "
        "a time; `lb:` balances each request",
    )

    def hook(self) -> tuple[ServiceHook, Any] | None:
        """The service hook this service sets (at most one), with its options."""
        for h in service_hooks():
            if (options := getattr(self, h.key, None)) is not None:
                return h, options
        return None

    @model_validator(mode="after")
    def _one_hook(self) -> _ServiceFields:
        keys = [h.key for h in service_hooks() if getattr(self, h.key, None) is not None]
        if len(keys) > 1:
            raise PydanticCustomError(
                "service_hooks", "a service takes one of {keys}, not several",
                {"keys": ", ".join(repr(k) for k in keys)},
            )  # fmt: skip
        return self


def tls_components() -> set[str]:
    """Components whose ports serve TLS."""
    return {c.name for p in patterns() for c in p.components if c.serves_tls}


def summary(model: type[BaseModel]) -> str:
    """The first paragraph of a model's docstring, on one line."""
    text = inspect.cleandoc(model.__doc__ or "")
    return " ".join(text.split("\n\n")[0].split())


def _optional(model: type[BaseModel]) -> Any:
    """A hook's field: its model, not set by default, described by the model's docstring."""
    text = summary(model).rstrip(".")
    return (model | None, Field(None, description=text[:1].lower() + text[1:]))


if typing.TYPE_CHECKING:

    class Pod(_PodHead):
        containers: list[Container]

    class Service(_ServiceFields):
        pass

else:
    Pod = create_model(
        "Pod",
        __base__=_PodHead,
        __doc__=_PodHead.__doc__,
        **{h.key: _optional(h.model) for h in pod_hooks()},
        containers=(
            list[Container],
            Field(min_length=1, description="the pod's processes; they stop in reverse order"),
        ),
    )
    Service = create_model(
        "Service",
        __base__=_ServiceFields,
        __doc__=_ServiceFields.__doc__,
        **{h.key: _optional(h.model) for h in service_hooks()},
    )


class Spec(Model):
    """A whole system: named backends, pods and services."""

    name: Name = Field(
        description="the system's name: containers see it as `POD_NAMESPACE` under "
        "`podkit up`, which keeps its state in `.podkit/<name>/` beside the spec"
    )
    image: str | None = Field(
        None,
        description="the image holding the spec's own programs, on Kubernetes, for every "
        "container that names none; not set: `podkit k8s --image`",
    )
    backends: dict[Name, str] = Field(
        {},
        description="named backend URLs (see below); `state` is always one, embedded "
        "SQLite unless given here",
    )
    pods: list[Pod] = Field([], description="the pods, each run as `replicas` copies")
    services: list[Service] = Field(
        [], description="stable ports in front of the pods' ready replicas"
    )

    @field_validator("backends")
    @classmethod
    def _backend_urls(cls, value: dict[str, str]) -> dict[str, str]:
        for key, url in value.items():
            scheme = url.split("://", 1)[0] if "://" in url else ""
            if scheme not in BACKEND_SCHEMES:
                raise PydanticCustomError(
                    "backend_url",
                    "backend '{key}': '{url}' is not a backend URL; expected one of {schemes}",
                    {
                        "key": key,
                        "url": url,
                        "schemes": ", ".join(f"{s}://" for s in BACKEND_SCHEMES),
                    },
                )
        return value

    def pod(self, name: str) -> Pod:
        for pod in self.pods:
            if pod.name == name:
                return pod
        raise KeyError(name)

    def service_url(self, svc: Service) -> str:
        """Where clients reach `svc`: https:// when it serves TLS, else http://. With a
        service hook (`lb:`) its program answers; without, the target port does (TLS when
        a component that serves TLS, such as `sidecar.tls`, has it)."""
        if (hooked := svc.hook()) is not None:
            tls = hooked[0].tls(hooked[1])
        else:
            pod = next((p for p in self.pods if p.name == svc.pods), None)
            tls = any(
                c.component in tls_components()
                and svc.target in (c.ports if isinstance(svc.target, str) else c.ports.values())
                for c in (pod.all_containers() if pod is not None else [])
            )
        scheme = "https" if tls else "http"
        return f"{scheme}://{svc.host}:{svc.port}/"
