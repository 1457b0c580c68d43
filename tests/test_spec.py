"""The system spec: every error class names the file, line, field and what was expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from podkit.system.spec import SpecError, load_spec, parse_spec

ROOT = Path(__file__).parent.parent

GOOD = """\
name: shop
backends:
  state: redis://127.0.0.1:6379/0
pods:
  - name: web
    replicas: 2
    volumes: [data]
    containers:
      - name: app
        command: [python3, app.py, "$(POD_IP)", 8080]
        env: {MODE: prod, WORKERS: 4}
        ports: {http: 8080}
        volumes: {data: /data}
        readiness: {http: {path: /ready, port: http}, period: 0.5}
        liveness: {tcp: {port: 8080}}
services:
  - name: web
    port: 8000
    pods: web
    target: http
"""


def errors(text: str) -> list[str]:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "spec.yaml")
    return [str(i) for i in info.value.issues]


def test_good_spec_loads_with_numbers_as_text() -> None:
    spec = parse_spec(GOOD)
    app = spec.pods[0].containers[0]
    assert app.command == ["python3", "app.py", "$(POD_IP)", "8080"]
    assert app.env == {"MODE": "prod", "WORKERS": "4"}
    assert spec.pods[0].replicas == 2
    assert app.readiness is not None and app.readiness.http is not None
    assert app.readiness.http.path == "/ready"


def test_bad_yaml_names_line_and_column() -> None:
    errs = errors("name: x\npods:\n  - name: [unclosed\n")
    assert len(errs) == 1
    assert errs[0].startswith("spec.yaml:4:")
    assert "invalid YAML" in errs[0]


def test_duplicate_key_is_an_error() -> None:
    errs = errors("name: x\nname: y\n")
    assert errs == ["spec.yaml:2:1: invalid YAML: duplicate key 'name'"]


def test_unknown_field_suggests_the_right_one() -> None:
    text = GOOD.replace("replicas: 2", "replica: 2")
    (err,) = errors(text)
    assert err.startswith("spec.yaml:6:5: pods[0].replica: unknown field 'replica'")
    assert "did you mean 'replicas'?" in err


def test_wrong_type_names_the_value() -> None:
    (err,) = errors(GOOD.replace("replicas: 2", "replicas: two"))
    assert err.startswith("spec.yaml:6:5: pods[0].replicas: Input should be a valid integer")
    assert "(got 'two')" in err


def test_missing_command() -> None:
    text = GOOD.replace('command: [python3, app.py, "$(POD_IP)", 8080]', "args: [x]")
    (err,) = errors(text)
    assert err.startswith("spec.yaml:9:9: pods[0].containers[0]: container 'app' needs a 'command'")


def test_missing_required_field() -> None:
    (err,) = errors(GOOD.replace("    target: http\n", ""))
    assert err == "spec.yaml:17:5: services[0].target: missing required field 'target'"


def test_every_error_is_reported_at_once() -> None:
    text = GOOD.replace("replicas: 2", "replicas: -1").replace("port: 8000", "port: 70000")
    errs = errors(text)
    assert len(errs) == 2
    assert any("pods[0].replicas" in e and "greater than or equal to 0" in e for e in errs)
    assert any("services[0].port" in e and "less than or equal to 65535" in e for e in errs)


def test_bad_names_and_backend_urls() -> None:
    text = GOOD.replace("- name: web\n    replicas", "- name: Web_1\n    replicas").replace(
        "redis://127.0.0.1:6379/0", "mysql://db"
    )
    errs = errors(text)
    assert any("pods[0].name: 'Web_1' is not a valid name" in e for e in errs)
    assert any("backends" in e and "'mysql://db' is not a backend URL" in e for e in errs)


def test_probe_needs_exactly_one_kind() -> None:
    text = GOOD.replace("liveness: {tcp: {port: 8080}}", "liveness: {period: 2}")
    (err,) = errors(text)
    assert "pods[0].containers[0].liveness: a probe needs exactly one of" in err
    assert "(got none)" in err


def test_references_are_checked() -> None:
    text = (
        GOOD.replace("pods: web", "pods: api")
        .replace("port: http}, period", "port: metrics}, period")
        .replace("volumes: {data: /data}", "volumes: {logs: /logs}")
    )
    errs = errors(text)
    assert len(errs) == 3
    assert any(e.startswith("spec.yaml:19:5: services[0].pods: no pod named 'api'") for e in errs)
    assert any("readiness.http.port: no port named 'metrics'" in e for e in errs)
    assert any("volumes.logs: volume 'logs' is not declared" in e for e in errs)


def test_duplicate_names_and_ports() -> None:
    text = GOOD.replace(
        "services:",
        "  - name: web\n    containers:\n      - {name: a, command: [x], ports: {p: 1}}\n"
        "      - {name: a, command: [y], ports: {q: 1}}\nservices:",
    )
    errs = errors(text)
    assert any("pods[1].name: pod name 'web' is used twice" in e for e in errs)
    assert any("pods[1].containers[1].name: container name 'a' is used twice" in e for e in errs)
    assert any("port 1 is already used by container 'a'" in e for e in errs)


def test_unknown_component() -> None:
    text = GOOD.replace('command: [python3, app.py, "$(POD_IP)", 8080]', "component: sidecar.nope")
    (err,) = errors(text)
    assert "pods[0].containers[0].component: unknown component 'sidecar.nope'" in err


def test_not_a_mapping_and_empty() -> None:
    assert errors("") == [
        "spec.yaml:1:1: a spec is a mapping with 'name' and 'pods', got an empty file"
    ]
    assert "got a list" in errors("- a\n- b\n")[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read spec: No such file"):
        load_spec(tmp_path / "nope.yaml")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_arbitrary_text_never_crashes_the_loader(text: str) -> None:
    try:
        parse_spec(text)
    except SpecError as exc:
        assert exc.issues and all(i.message for i in exc.issues)


keys = st.sampled_from(["name", "pods", "replicas", "containers", "command", "ports", "x", "port"])
values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=5))
def test_arbitrary_structures_give_spec_errors(data: dict[str, object]) -> None:
    import yaml

    try:
        parse_spec(yaml.safe_dump(data))
    except SpecError as exc:
        for issue in exc.issues:
            assert issue.line is not None, issue


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "podkit", *args], capture_output=True, text=True, timeout=60
    )


def test_validate_prints_every_error_and_exits_2(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(GOOD.replace("replicas: 2", "replica: 2").replace("port: 8000", "port: 0"))
    result = run_cli("validate", str(spec))
    assert result.returncode == 2
    assert "2 problems in the spec" in result.stderr
    assert f"{spec}:6:5: pods[0].replica: unknown field" in result.stderr
    assert f"{spec}:18:5: services[0].port:" in result.stderr


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=str)
def test_examples_validate(example: Path) -> None:
    result = run_cli("validate", str(example))
    assert result.returncode == 0, result.stderr
    assert ": ok (" in result.stdout


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("podkit 0.")


WITH_OPTIONS = """\
name: shop
pods:
  - name: web
    replica: 2
    volumes: [conf]
    containers:
      - name: app
        command: [python3, app.py]
        ports: {http: 8080}
      - name: config
        component: sidecar.config
        with: {sorce: /etc/x, path: /tmp/x}
      - name: tls
        component: sidecar.tls
        with: {upstream: "8080", workerz: 2, self-signed: true}
        ports: {https: 8443}
      - name: odd
        component: sidecar.cfg
"""


def test_with_keys_are_checked_against_the_component_options() -> None:
    errs = errors(
        WITH_OPTIONS.replace("replica: 2", "replicas: 2").replace(
            "      - name: odd\n        component: sidecar.cfg\n", ""
        )
    )
    assert errs == [
        "spec.yaml:12:9: pods[0].containers[1].with: "
        "component 'sidecar.config' needs option 'source' in 'with'",
        "spec.yaml:12:16: pods[0].containers[1].with.sorce: unknown option 'sorce' of component "
        "'sidecar.config' (did you mean 'source'?); known: source, path, key, interval, "
        "validate, signal, pid_file, reload_url, reload_method, on_change, max_backoff, "
        "admin_port, once",
        "spec.yaml:15:34: pods[0].containers[2].with.workerz: unknown option 'workerz' of "
        "component 'sidecar.tls' (did you mean 'workers'?); known: upstream, listen, cert, key, "
        "self_signed, workers, idle_timeout, admin_port",
    ]


def test_validate_and_up_report_every_kind_of_problem_in_one_run(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(WITH_OPTIONS)
    for command in ("validate", "up"):
        result = run_cli(command, str(spec))
        assert result.returncode == 2, result.stderr
        assert "5 problems in the spec" in result.stderr
        lines = result.stderr.splitlines()[1:]
        assert [line.split(": ")[1] for line in lines] == [
            "pods[0].replica",
            "pods[0].containers[1].with",
            "pods[0].containers[1].with.sorce",
            "pods[0].containers[2].with.workerz",
            "pods[0].containers[3].component",
        ]
        assert all(line.startswith(f"  {spec}:") for line in lines)
        assert "No such option" not in result.stderr


LB_SPEC = """\
name: t
pods:
  - name: api
    containers:
      - name: app
        command: [sleep, "100"]
        ports: {http: 8080}
services:
  - name: api
    port: 18700
    pods: api
    target: http
    lb:
      %s
"""


@pytest.mark.parametrize(
    ("lb", "problem"),
    [
        ("rate_limit: {rate: '10 per second'}",
         "spec.yaml:14:20: services[0].lb.rate_limit.rate: rate '10 per second': expected "
         "'<count>/<s|m|h|d>[ burst <n>]'"),
        ("rate_limit: {global: '5/x'}",
         "spec.yaml:14:20: services[0].lb.rate_limit.global: rate '5/x'"),
        ("health: {path: healthz}",
         "spec.yaml:14:16: services[0].lb.health.path: a path starts with '/' (got 'healthz')"),
        ("admin_port: 18700",
         "spec.yaml:14:7: services[0].lb.admin_port: the admin port would take the service's "
         "port 18700"),
        ("{admin_port: 18699, workers: 2}",
         "services[0].lb.admin_port: the admin ports (2 workers) would take the service's port"),
    ],
)  # fmt: skip
def test_validate_refuses_the_lb_values_the_balancer_would_refuse(lb: str, problem: str) -> None:
    (message,) = errors(LB_SPEC % lb)
    assert problem in message


def test_lb_values_the_balancer_takes_pass() -> None:
    spec = parse_spec(LB_SPEC % "{rate_limit: {rate: '10/s burst 20'}, admin_port: 18701}")
    assert spec.services[0].lb is not None


def test_validate_counts_in_words() -> None:
    result = run_cli("validate", str(ROOT / "examples" / "legacy-https.yaml"))
    assert result.stdout.strip().endswith(": ok (1 pod, 1 replica, 2 services)")


def test_field_and_reference_problems_come_in_one_pass() -> None:
    """A field error (a bad replica count) does not hide the reference errors of the
    parts that are valid: an unknown pod, a missing port name, a service name used
    twice. A service naming the pod with the field error is not also told it names none."""
    problems = errors(
        """\
name: s
pods:
  - name: web
    replicas: -1
    containers: [{name: app, command: [x], ports: {http: 80}}]
  - name: api
    containers: [{name: app, command: [x], ports: {http: 81}}]
services:
  - {name: a, port: 8000, pods: nowhere, target: 80}
  - {name: b, port: 8001, pods: api, target: grpc}
  - {name: b, port: 8002, pods: web, target: http}
"""
    )
    assert [p.split(": ", 2)[1] for p in problems] == [
        "pods[0].replicas",
        "services[0].pods",
        "services[1].target",
        "services[2].name",
    ]
    assert "no pod named 'nowhere' (pods: web, api)" in problems[1]


def test_args_on_a_component_are_refused_not_ignored() -> None:
    (problem,) = errors(
        "name: s\npods:\n  - name: p\n    containers:\n"
        "      - {name: t, component: sidecar.tls, args: [--workers, '2'],"
        " with: {upstream: '1', self_signed: true}}\n"
    )
    assert "container 't': 'args' go with a 'command'; a component is configured by 'with'" in (
        problem
    )
