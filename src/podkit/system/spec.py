"""The system spec: pods, containers, probes, services and backends, loaded from YAML.

A wrong spec raises `SpecError`, which lists every problem with the file, line,
field path and what was expected.
"""

from __future__ import annotations

import difflib
import os
import re
import shlex
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from podkit.yamlpos import (
    YAMLSyntaxError,
    format_path,
    load_with_positions,
    nearest_position,
)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
BACKEND_SCHEMES = ("memory", "sqlite", "redis", "rediss", "nats", "etcd", "k8s")


def _scalar_to_str(value: Any) -> Any:
    """Numbers and booleans in commands and env are meant as text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


def _dns_label(value: str) -> str:
    if len(value) > 63 or not DNS_LABEL.match(value):
        raise PydanticCustomError(
            "dns_label",
            "'{value}' is not a valid name: use lower-case letters, digits and '-', "
            "starting and ending with a letter or digit, at most 63 characters",
            {"value": value},
        )
    return value


Text = Annotated[str, BeforeValidator(_scalar_to_str)]
Name = Annotated[str, AfterValidator(_dns_label)]
Port = Annotated[int, Field(ge=1, le=65535)]
PortRef = Port | str
Seconds = Annotated[float, Field(ge=0)]


class Model(BaseModel):
    """Base of every spec model: unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class HTTPProbe(Model):
    path: str = "/"
    port: PortRef
    host: str | None = None


class TCPProbe(Model):
    port: PortRef


class ExecProbe(Model):
    command: list[Text] = Field(min_length=1)


class Probe(Model):
    """Exactly one of http, tcp or exec, with Kubernetes' timing knobs (in seconds)."""

    http: HTTPProbe | None = None
    tcp: TCPProbe | None = None
    exec: ExecProbe | None = None
    initial_delay: Seconds = 0.0
    period: Annotated[float, Field(gt=0)] = 1.0
    timeout: Annotated[float, Field(gt=0)] = 1.0
    success_threshold: Annotated[int, Field(ge=1)] = 1
    failure_threshold: Annotated[int, Field(ge=1)] = 3

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

    name: Name
    image: str | None = None  # on Kubernetes; defaults to the spec's `image`
    command: list[Text] | None = None
    args: list[Text] = []
    component: str | None = None
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    env: dict[str, Text] = {}
    ports: dict[Name, Port] = {}
    volumes: dict[Name, str] = Field(
        default_factory=dict, description="volume name -> mount path (on Kubernetes)"
    )
    workdir: str | None = None
    readiness: Probe | None = None
    liveness: Probe | None = None

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
        return self


class Election(Model):
    """Leader election among a pod's replicas: `podkit elect` runs beside the app."""

    name: Name | None = None  # defaults to the pod's name
    backend: Name = "state"
    ttl: Annotated[float, Field(gt=0)] = 5.0
    port: Port = 4040
    exec: list[Text] | None = None  # run only while leading


class Autoscale(Model):
    """Scale a pod of queue workers between `min` and `max` replicas from the queue's
    backlog and the workers' rate, to drain it within `target_drain` seconds."""

    queue: str
    backend: Name = "state"
    min: Annotated[int, Field(ge=0, le=250)] = 1
    max: Annotated[int, Field(ge=1, le=250)] = 8
    target_drain: Annotated[float, Field(gt=0)] = 30.0
    cooldown_up: Seconds = 5.0
    cooldown_down: Seconds = 30.0

    @model_validator(mode="after")
    def _bounds(self) -> Autoscale:
        if self.min > self.max:
            raise PydanticCustomError(
                "autoscale_bounds", "autoscale: min ({min}) is above max ({max})",
                {"min": self.min, "max": self.max},
            )  # fmt: skip
        return self


class Pod(Model):
    """A group of containers that share an address and volumes, run as `replicas` copies."""

    name: Name
    replicas: Annotated[int, Field(ge=0, le=250)] = 1
    restart: Literal["Always", "OnFailure", "Never"] = "Always"
    grace_period: Seconds = 10.0
    volumes: list[Name] = []
    election: Election | None = None
    autoscale: Autoscale | None = None
    containers: list[Container] = Field(min_length=1)

    def all_containers(self) -> list[Container]:
        """The declared containers, plus the elector when `election` is set."""
        if self.election is None:
            return list(self.containers)
        e = self.election
        options: dict[str, Any] = {
            "backend": f"$(PODKIT_BACKEND_{e.backend.upper().replace('-', '_')})",
            "name": e.name or self.name,
            "identity": "$(POD_NAME)",
            "ttl": e.ttl,
            "host": "$(POD_IP)",
            "port": e.port,
        }
        if e.exec:
            options["exec"] = shlex.join(e.exec)
        elector = Container(
            name="elector",
            component="elect",
            ports={"elector": e.port},
            readiness=Probe(http=HTTPProbe(path="/healthz", port="elector"), period=1.0),
            **{"with": options},
        )
        return [*self.containers, elector]


class LBHealth(Model):
    """Active HTTP health checks of each replica."""

    path: str = "/healthz"
    interval: Annotated[float, Field(gt=0)] = 5.0
    timeout: Annotated[float, Field(gt=0)] = 1.0
    healthy_threshold: Annotated[int, Field(ge=1)] = 2
    unhealthy_threshold: Annotated[int, Field(ge=1)] = 3


class LBCache(Model):
    """A response cache (Cache-Control, Expires, Vary), bounded in bytes."""

    max_bytes: Annotated[int, Field(ge=1024)] = 64 * 1024 * 1024
    max_entry_bytes: Annotated[int, Field(ge=1)] = 1024 * 1024


class LBRateLimit(Model):
    """Token buckets: `rate` like '100/s burst 200' per client, `global` for everyone."""

    rate: str | None = None
    by: str = "ip"  # ip or header:NAME
    global_: str | None = Field(default=None, alias="global")

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


def flag_value(v: float) -> str:
    """A flag's value as typed: 20 for 20.0, 0.25 as is, never 1e+06."""
    return str(int(v)) if float(v).is_integer() else repr(float(v))


class LBBreaker(Model):
    """Circuit breaking per upstream: over a limit the request goes elsewhere, or gets 503."""

    max_connections: Annotated[int, Field(ge=1)] | None = None
    max_pending: Annotated[int, Field(ge=1)] | None = None
    max_requests: Annotated[int, Field(ge=1)] | None = None


class LBTLS(Model):
    """TLS at the edge: a certificate and key (reloaded when they change), or self-signed."""

    cert: str | None = None
    key: str | None = None
    self_signed: bool = False

    @model_validator(mode="after")
    def _one_source(self) -> LBTLS:
        if self.self_signed == bool(self.cert or self.key) or bool(self.cert) != bool(self.key):
            raise PydanticCustomError(
                "lb_tls", "tls: give 'cert' and 'key', or 'self_signed: true'", {}
            )
        return self


class LBOptions(Model):
    """Run `podkit lb` for this service instead of the plain TCP forwarder."""

    policy: Literal["round-robin", "weighted", "least-requests", "consistent-hash"] = "round-robin"
    hash_on: str | None = None  # header:NAME, cookie:NAME or ip, for consistent-hash
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    tries: Annotated[int, Field(ge=1, le=10)] = 3
    retry_budget: Annotated[float, Field(ge=0, le=100)] | None = None  # percent
    upstream_timeout: Annotated[float, Field(gt=0)] | None = None  # seconds, per try
    request_timeout: Annotated[float, Field(gt=0)] | None = None  # seconds, tries included
    breaker: LBBreaker | None = None
    health: LBHealth | None = None
    cache: LBCache | None = None
    rate_limit: LBRateLimit | None = None
    tls: LBTLS | None = None
    admin_port: Port | None = None

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


class Service(Model):
    """A stable port that balances over the ready replicas of one pod."""

    name: Name
    port: Port
    pods: Name
    target: PortRef
    host: str = "127.0.0.1"
    policy: Literal["round-robin"] = "round-robin"
    lb: LBOptions | None = None  # the HTTP load balancer, with its features


class Spec(Model):
    """A whole system: named backends, pods and services."""

    name: Name
    image: str | None = None  # on Kubernetes: the image holding the spec's own programs
    backends: dict[Name, str] = {}
    pods: list[Pod] = []
    services: list[Service] = []

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
        """Where clients reach `svc`: https:// when it serves TLS, else http://. With `lb:`
        the balancer answers (TLS with `tls:`); without, the target port does (TLS when a
        `sidecar.tls` container has it)."""
        if svc.lb is not None:
            tls = svc.lb.tls is not None
        else:
            pod = next((p for p in self.pods if p.name == svc.pods), None)
            tls = any(
                c.component == "sidecar.tls"
                and svc.target in (c.ports if isinstance(svc.target, str) else c.ports.values())
                for c in (pod.all_containers() if pod is not None else [])
            )
        scheme = "https" if tls else "http"
        return f"{scheme}://{svc.host}:{svc.port}/"


@dataclass(frozen=True)
class Issue:
    """One problem in a spec: where it is and what was expected."""

    file: str
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}:{self.column}"
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(ValueError):
    """A spec that cannot be used; `issues` lists every problem found."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The BaseModel class inside an annotation like `Probe | None` or `list[Pod]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _model_in(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType, list, dict):
        args = typing.get_args(annotation)
        for arg in args[-1:] if origin is dict else args:
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Spec
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = next(
            (f for n, f in model.model_fields.items() if n == part or f.alias == part), None
        )
        if field is None:
            return None
        model = _model_in(field.annotation)
    return model


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _did_you_mean(word: str, choices: list[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `choices`, or '' when none is close."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _describe(err: Any) -> str:
    kind = err["type"]
    loc = tuple(err["loc"])
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        name = loc[-1]
        if model is None:
            return f"unknown field '{name}'"
        known = _field_names(model)
        hint = _did_you_mean(str(name), known)
        return f"unknown field '{name}'{hint}; expected one of: {', '.join(known)}"
    if kind == "missing":
        return f"missing required field '{loc[-1]}'"
    msg = str(err["msg"])
    if kind.startswith(
        ("dns_label", "probe_kind", "missing_command", "backend_url", "autoscale_bounds", "lb_")
    ):
        return msg
    if kind in ("command_and_component", "with_without_component"):
        return msg
    if "input" in err and not isinstance(err["input"], dict | list):
        return f"{msg} (got {err['input']!r})"
    return msg


def _check_references(spec: Spec) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-field checks: names unique, references resolve, ports do not clash."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    pod_names: dict[str, int] = {}
    for i, pod in enumerate(spec.pods):
        if pod.name in pod_names:
            problems.append((("pods", i, "name"), f"pod name '{pod.name}' is used twice"))
        pod_names[pod.name] = i
        seen_containers: set[str] = set()
        port_owner: dict[int, str] = {}
        port_names: dict[str, int] = {}
        for j, c in enumerate(pod.containers):
            base: tuple[str | int, ...] = ("pods", i, "containers", j)
            if c.name in seen_containers:
                problems.append(((*base, "name"), f"container name '{c.name}' is used twice"))
            seen_containers.add(c.name)
            for pname, number in c.ports.items():
                if number in port_owner:
                    problems.append(
                        (
                            (*base, "ports", pname),
                            f"port {number} is already used by container "
                            f"'{port_owner[number]}' of this pod",
                        )
                    )
                if pname in port_names:
                    problems.append(((*base, "ports", pname), f"port name '{pname}' is used twice"))
                port_owner[number] = c.name
                port_names[pname] = number
            for vol in c.volumes:
                if vol not in pod.volumes:
                    problems.append(
                        (
                            (*base, "volumes", vol),
                            f"volume '{vol}' is not declared in the pod's 'volumes' "
                            f"(declared: {', '.join(pod.volumes) or 'none'})",
                        )
                    )
        named = ["state", *spec.backends]
        for field_name in ("autoscale", "election"):
            user = getattr(pod, field_name)
            if user is not None and user.backend not in named:
                problems.append(
                    (
                        ("pods", i, field_name, "backend"),
                        f"no backend named '{user.backend}' (backends: {', '.join(named)})",
                    )
                )
        if pod.election is not None:
            e = pod.election
            if e.port in port_owner:
                problems.append(
                    (
                        ("pods", i, "election", "port"),
                        f"port {e.port} is already used by container '{port_owner[e.port]}'",
                    )
                )
            if "elector" in seen_containers:
                problems.append(
                    (("pods", i, "election"), "a container is named 'elector': rename it")
                )
        for j, c in enumerate(pod.containers):
            for kind in ("readiness", "liveness"):
                probe: Probe | None = getattr(c, kind)
                target = probe.http or probe.tcp if probe else None
                if (
                    target is not None
                    and isinstance(target.port, str)
                    and target.port not in port_names
                ):
                    sub = "http" if probe and probe.http else "tcp"
                    problems.append(
                        (
                            ("pods", i, "containers", j, kind, sub, "port"),
                            f"no port named '{target.port}' in pod '{pod.name}' "
                            f"(named ports: {', '.join(port_names) or 'none'})",
                        )
                    )
    svc_ports: dict[tuple[str, int], str] = {}
    svc_names: set[str] = set()
    for k, svc in enumerate(spec.services):
        if svc.name in svc_names:
            problems.append((("services", k, "name"), f"service name '{svc.name}' is used twice"))
        svc_names.add(svc.name)
        if (svc.host, svc.port) in svc_ports:
            problems.append(
                (
                    ("services", k, "port"),
                    f"port {svc.port} is already used by service '{svc_ports[svc.host, svc.port]}'",
                )
            )
        svc_ports[svc.host, svc.port] = svc.name
        if svc.pods not in pod_names:
            problems.append(
                (
                    ("services", k, "pods"),
                    f"no pod named '{svc.pods}' (pods: {', '.join(pod_names) or 'none'})",
                )
            )
        elif isinstance(svc.target, str):
            pod = spec.pods[pod_names[svc.pods]]
            names = [n for c in pod.all_containers() for n in c.ports]
            if svc.target not in names:
                problems.append(
                    (
                        ("services", k, "target"),
                        f"pod '{pod.name}' has no port named '{svc.target}' "
                        f"(named ports: {', '.join(names) or 'none'})",
                    )
                )
    return problems


def _check_components(data: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """Each container's `component` names a known one and its `with:` keys are options of
    that component (read from its command line). Works on the raw data, so these
    problems are reported with the other ones even when the spec does not validate."""
    from podkit.system.components import component_options, known_components, option_flag

    problems: list[tuple[tuple[str | int, ...], str]] = []
    pods = data.get("pods")
    for i, pod in enumerate(pods if isinstance(pods, list) else []):
        containers = pod.get("containers") if isinstance(pod, dict) else None
        for j, c in enumerate(containers if isinstance(containers, list) else []):
            name = c.get("component") if isinstance(c, dict) else None
            if not isinstance(name, str):
                continue
            base: tuple[str | int, ...] = ("pods", i, "containers", j)
            known = known_components()
            if name not in known:
                hint = _did_you_mean(name, known)
                problems.append(
                    (
                        (*base, "component"),
                        f"unknown component '{name}'{hint}; known: {', '.join(known)}",
                    )
                )
                continue
            options = component_options(name)
            given = c.get("with")
            if options is None or not isinstance(given, dict | None):
                continue
            given = given or {}
            flags = {f: o.key for o in options.values() for f in o.flags}
            keys = list(options)
            for key in given:
                if isinstance(key, str) and option_flag(key) in flags:
                    continue
                hint = _did_you_mean(str(key), keys)
                problems.append(
                    (
                        (*base, "with", key if isinstance(key, str) else str(key)),
                        f"unknown option '{key}' of component '{name}'{hint}; "
                        f"known: {', '.join(keys)}",
                    )
                )
            set_keys = {flags[option_flag(k)] for k in given if option_flag(str(k)) in flags}
            for opt in options.values():
                if opt.required and opt.key not in set_keys:
                    problems.append(
                        (
                            (*base, "with"),
                            f"component '{name}' needs option '{opt.key}' in 'with'",
                        )
                    )
    return problems


def parse_spec(text: str, file: str = "<spec>") -> Spec:
    """Parse and validate spec text; raise `SpecError` naming every problem."""
    try:
        data, positions = load_with_positions(text)
    except YAMLSyntaxError as exc:
        pos = exc.position
        raise SpecError(
            [
                Issue(
                    file,
                    pos.line if pos else None,
                    pos.column if pos else None,
                    "",
                    f"invalid YAML: {exc.message}",
                )
            ]
        ) from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError(
            [Issue(file, 1, 1, "", f"a spec is a mapping with 'name' and 'pods', got {got}")]
        )

    def issue(loc: tuple[str | int, ...], message: str) -> Issue:
        pos = nearest_position(positions, loc)
        return Issue(
            file, pos.line if pos else None, pos.column if pos else None, format_path(loc), message
        )

    issues = [issue(loc, msg) for loc, msg in _check_components(data)]
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        issues += [issue(tuple(e["loc"]), _describe(e)) for e in exc.errors()]
    else:
        issues += [issue(loc, msg) for loc, msg in _check_references(spec)]
    if issues:
        # in the order of the file; those without a place last
        issues.sort(key=lambda i: (i.line is None, i.line or 0, i.column or 0))
        raise SpecError(issues)
    return spec


def load_spec(path: str | os.PathLike[str]) -> Spec:
    """Read and validate a spec file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(
            [Issue(str(p), None, None, "", f"cannot read spec: {exc.strerror}")]
        ) from None
    except UnicodeDecodeError as exc:
        raise SpecError([Issue(str(p), None, None, "", f"not UTF-8 text: {exc.reason}")]) from None
    return parse_spec(text, str(p))
