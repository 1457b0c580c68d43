"""The system spec: pods, containers, probes, services and backends, loaded from YAML.

A wrong spec raises `SpecError`, which lists every problem with the file, line,
field path and what was expected. The models are in `podkit.system.specmodels`; this
module names them too.
"""

from __future__ import annotations

import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from podkit.contract import PodInfo
from podkit.system.specmodels import (
    BACKEND_SCHEMES,
    Container,
    ExecProbe,
    HTTPProbe,
    Pod,
    Probe,
    Service,
    Spec,
    TCPProbe,
    tls_components,
)
from podkit.yamlpos import (
    YAMLSyntaxError,
    did_you_mean,
    format_path,
    load_with_positions,
    nearest_position,
    unknown_field,
)

__all__ = [
    "BACKEND_SCHEMES",
    "Container",
    "ExecProbe",
    "HTTPProbe",
    "Issue",
    "Pod",
    "Probe",
    "Service",
    "Spec",
    "SpecError",
    "TCPProbe",
    "load_spec",
    "parse_spec",
    "tls_components",
]


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


def _describe(err: Any) -> str:
    kind = err["type"]
    loc = tuple(err["loc"])
    if kind == "extra_forbidden":
        return unknown_field(Spec, loc)
    if kind == "missing":
        return f"missing required field '{loc[-1]}'"
    msg = str(err["msg"])
    if kind.startswith(
        ("dns_label", "probe_kind", "missing_command", "backend_url", "autoscale_bounds", "lb_")
    ):
        return msg
    if kind in ("command_and_component", "with_without_component", "args_with_component"):
        return msg
    if "input" in err and not isinstance(err["input"], dict | list):
        return f"{msg} (got {err['input']!r})"
    return msg


Problems = list[tuple[tuple[str | int, ...], str]]


def _check_references(spec: Spec) -> Problems:
    """Cross-field checks: names unique, references resolve, ports do not clash."""
    pods = dict(enumerate(spec.pods))
    services = dict(enumerate(spec.services))
    return _references(pods, services, [p.name for p in spec.pods], list(spec.backends))


def _references(
    pods: dict[int, Pod], services: dict[int, Service], names: list[str], backends: list[str]
) -> Problems:
    """The cross-field checks over the pods and services that validated (by their place
    in the spec); `names` are every pod's name, valid or not, so that a service naming
    a pod with another problem is not also reported as naming none."""
    problems: Problems = []
    pod_names: dict[str, Pod | None] = dict.fromkeys(names)
    seen: set[str] = set()
    for i, pod in sorted(pods.items()):
        if pod.name in seen:
            problems.append((("pods", i, "name"), f"pod name '{pod.name}' is used twice"))
        seen.add(pod.name)
        pod_names[pod.name] = pod
        problems += _check_pod(backends, i, pod)
    svc_ports: dict[tuple[str, int], str] = {}
    svc_names: set[str] = set()
    for k, svc in sorted(services.items()):
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
        problems += _check_target(k, svc, pod_names)
        if (hooked := svc.hook()) is not None:
            hook, options = hooked
            for loc, message in hook.check(svc.port, options):
                problems.append((("services", k, hook.key, *loc), message))
    return problems


M = typing.TypeVar("M", bound=BaseModel)


def _each_valid(model: type[M], items: list[Any]) -> list[M | None]:
    """Each item as a `model`, or None where it does not validate."""
    out: list[M | None] = []
    for item in items:
        try:
            out.append(model.model_validate(item))
        except ValidationError:
            out.append(None)
    return out


def _check_what_validates(data: dict[str, Any]) -> Problems:
    """The cross-field checks over the pods and services that validate on their own, so a
    spec with field errors gets its reference errors in the same pass."""
    raw_pods: list[Any] = data["pods"] if isinstance(data.get("pods"), list) else []
    raw_services: list[Any] = data["services"] if isinstance(data.get("services"), list) else []
    pods = {i: p for i, p in enumerate(_each_valid(Pod, raw_pods)) if p is not None}
    services = {k: s for k, s in enumerate(_each_valid(Service, raw_services)) if s is not None}
    names = [p["name"] for p in raw_pods if isinstance(p, dict) and isinstance(p.get("name"), str)]
    backends = data.get("backends")
    return _references(pods, services, names, list(backends) if isinstance(backends, dict) else [])


def _check_pod(backends: list[str], i: int, pod: Pod) -> Problems:
    """A pod's containers, ports, volumes, probes and hooks."""
    problems: Problems = []
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
    named = ["state", *backends]
    for hook, options in pod.hooks():
        at = ("pods", i, hook.key)
        for field_name, backend in hook.backends(options).items():
            if backend not in named:
                problems.append(
                    (
                        (*at, field_name),
                        f"no backend named '{backend}' (backends: {', '.join(named)})",
                    )
                )
        info = typing.cast(PodInfo, pod)
        for loc, message in hook.check(info, options, port_owner, seen_containers):
            problems.append(((*at, *loc), message))
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
    return problems


def _check_target(k: int, svc: Service, pod_names: dict[str, Pod | None]) -> Problems:
    """A service's pod exists and has the port it targets (when the pod validated)."""
    if svc.pods not in pod_names:
        return [
            (
                ("services", k, "pods"),
                f"no pod named '{svc.pods}' (pods: {', '.join(pod_names) or 'none'})",
            )
        ]
    pod = pod_names[svc.pods]
    if isinstance(svc.target, str) and pod is not None:
        names = [n for c in pod.all_containers() for n in c.ports]
        if svc.target not in names:
            return [
                (
                    ("services", k, "target"),
                    f"pod '{pod.name}' has no port named '{svc.target}' "
                    f"(named ports: {', '.join(names) or 'none'})",
                )
            ]
    return []


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
                hint = did_you_mean(name, known)
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
                hint = did_you_mean(str(key), keys)
                problems.append(
                    (
                        (*base, "with", key if isinstance(key, str) else str(key)),
                        f"unknown option '{key}' of component '{name}'{hint}; "
                        f"known: {', '.join(keys)}",
                    )
                )
            for key, value in given.items():
                option = options.get(flags.get(option_flag(str(key)), ""))
                why = option.problem(value) if option is not None else None
                if why is not None:
                    problems.append(((*base, "with", str(key)), why))
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
        issues += [issue(loc, msg) for loc, msg in _check_what_validates(data)]
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
