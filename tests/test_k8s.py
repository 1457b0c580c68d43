"""`podkit k8s`: every example renders to objects the official schemas accept; golden
files; every spec field is rendered, refused or warned about; election RBAC is minimal;
containers run as non-root; the queue scaler publishes the replicas a queue needs.

Regenerate the golden files with PODKIT_UPDATE_GOLDEN=1 after a deliberate change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from podkit.system.k8s import (
    FIELDS,
    RenderError,
    RenderOptions,
    iter_fields,
    render,
    validate_objects,
)
from podkit.system.spec import Probe, load_spec, parse_spec
from servers import require_binary
from support import free_port

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
GOLDEN = Path(__file__).parent / "golden" / "k8s"
NEWEST = ["1.35", "1.36", "1.37"]  # the three newest versions kubernetes-validate knows
IMAGE = "registry.example/podkit-examples:1.0"
PODKIT = [sys.executable, "-m", "podkit"]


def options_for(path: Path, **kw: Any) -> RenderOptions:
    """The examples that use the embedded state backend need --with-backends."""
    spec = load_spec(path)
    uses_state = "PODKIT_BACKEND_STATE" in path.read_text() or any(p.autoscale for p in spec.pods)
    return RenderOptions(image=IMAGE, with_backends=uses_state, **kw)


def kinds(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def pod_containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


@pytest.mark.parametrize("version", NEWEST)
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_every_example_passes_the_official_schema(example: Path, version: str) -> None:
    for autoscaler in ("hpa", "keda"):
        opts = options_for(example, kube_version=version, autoscaler=autoscaler, namespace="demo")
        rendered = render(load_spec(example), opts)
        assert rendered.objects, example
        assert validate_objects(rendered.objects, version) == []
        # a Kubernetes-valid object is also valid YAML that reads back the same
        assert list(yaml.safe_load_all(rendered.yaml())) == rendered.objects


def test_the_validator_catches_a_broken_object() -> None:
    rendered = render(load_spec(ROOT / "examples/quickstart.yaml"), RenderOptions(image=IMAGE))
    broken = json.loads(json.dumps(rendered.objects))
    workloads(broken)[0]["spec"]["template"]["spec"]["containers"][0]["ports"][0]["bogus"] = 1
    failures = validate_objects(broken, "1.37")
    assert len(failures) == 1 and "bogus" in failures[0]


GOLDEN_CASES = {
    "quickstart": ("examples/quickstart.yaml", {}),
    "leader": ("examples/leader.yaml", {"namespace": "ops"}),
    "thumbnails-keda": ("examples/thumbnails.yaml", {"autoscaler": "keda", "namespace": "jobs"}),
    "leader-1.28": ("examples/leader.yaml", {"kube_version": "1.28"}),
}


@pytest.mark.parametrize("case", sorted(GOLDEN_CASES))
def test_golden_files(case: str) -> None:
    path, kw = GOLDEN_CASES[case]
    text = render(load_spec(ROOT / path), options_for(ROOT / path, **kw)).yaml()
    golden = GOLDEN / f"{case}.yaml"
    if os.environ.get("PODKIT_UPDATE_GOLDEN"):
        golden.parent.mkdir(parents=True, exist_ok=True)
        golden.write_text(text)
    assert text == golden.read_text(), f"rendering changed; see {golden}"


def test_native_sidecars_only_where_the_version_has_them() -> None:
    spec = load_spec(ROOT / "examples/leader.yaml")
    new = workloads(render(spec, RenderOptions(image=IMAGE, kube_version="1.29")).objects)[0]
    old = workloads(render(spec, RenderOptions(image=IMAGE, kube_version="1.28")).objects)[0]
    sidecar = new["spec"]["template"]["spec"]["initContainers"][0]
    assert (sidecar["name"], sidecar["restartPolicy"]) == ("elector", "Always")
    assert "initContainers" not in old["spec"]["template"]["spec"]
    assert [c["name"] for c in old["spec"]["template"]["spec"]["containers"]] == ["app", "elector"]


# -- every field of the spec ----------------------------------------------------------------

KITCHEN_SINK = """
name: sink
image: registry.example/sink:7
backends: {state: "redis://redis-main:6379/0", locks: "etcd://etcd-main:2379", lease: "k8s://"}
pods:
  - name: api
    replicas: 4
    grace_period: 17
    volumes: [scratch]
    election: {name: api-lead, backend: lease, ttl: 3.5, port: 4041, exec: [python3, lead.py]}
    containers:
      - name: app
        image: registry.example/api:9
        command: [python3, api.py]
        args: [--id, "$(REPLICA)"]
        env: {MODE: blue}
        ports: {http: 8080}
        volumes: {scratch: /var/scratch}
        workdir: srv
        readiness:
          http: {path: /ready, port: http, host: 10.1.2.3}
          initial_delay: 3
          period: 4
          timeout: 2
          success_threshold: 2
          failure_threshold: 5
        liveness: {tcp: {port: 8080}, failure_threshold: 9}
      - name: probe-exec
        command: [sleep, infinity]
        readiness: {exec: {command: [test, -f, /tmp/ok]}}
  - name: crunch
    autoscale: {queue: jobs, backend: state, min: 2, max: 11, target_drain: 45,
                cooldown_up: 6, cooldown_down: 70}
    containers:
      - name: work
        command: [podkit, queue, work]
      - name: lead
        component: elect
        with: {backend: "$(PODKIT_BACKEND_LOCKS)", name: crunch-lead}
  - name: once
    restart: Never
    containers: [{name: run, command: [true]}]
services:
  - {name: api, port: 9000, pods: api, target: http, host: 127.0.0.9, policy: round-robin}
  - name: edge
    port: 9443
    pods: api
    target: http
    lb:
      policy: consistent-hash
      hash_on: cookie:session
      workers: 3
      tries: 4
      retry_budget: 15
      upstream_timeout: 20
      request_timeout: 45.5
      breaker: {max_connections: 1000000, max_pending: 40, max_requests: 250}
      health: {path: /ping, interval: 2.5, timeout: 0.7, healthy_threshold: 4,
               unhealthy_threshold: 6}
      cache: {max_bytes: 5000000, max_entry_bytes: 70000}
      rate_limit: {rate: 50/s burst 80, by: "header:X-Key", global: 900/s}
      tls: {cert: certs/edge.crt, key: certs/edge.key}
      admin_port: 9901
  - name: dev
    port: 9444
    pods: api
    target: 8080
    lb: {tls: {self_signed: true}}
"""


def sink() -> tuple[list[dict[str, Any]], list[str]]:
    rendered = render(parse_spec(KITCHEN_SINK), RenderOptions(namespace="ns1"))
    warnings = [f"{'.'.join(map(str, w.loc))}: {w.message}" for w in rendered.warnings]
    return rendered.objects, warnings


def obj(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name} not rendered"
    return found[0]


def container(objs: list[dict[str, Any]], kind: str, pod: str, name: str) -> dict[str, Any]:
    return next(c for c in pod_containers(obj(objs, kind, pod)) if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_every_spec_field_has_a_mapping() -> None:
    paths = [*iter_fields(), *iter_fields(Probe, "probe.")]
    assert len(paths) > 40
    assert sorted(set(paths) - set(FIELDS)) == []
    assert sorted(set(FIELDS) - set(paths)) == []  # nothing stale in the table


def test_every_spec_field_appears_in_the_output() -> None:
    objs, warnings = sink()
    sts = "StatefulSet"  # api reads $(REPLICA): stable identity
    app = container(objs, sts, "api", "app")
    probe_exec = container(objs, sts, "api", "probe-exec")
    elector = container(objs, sts, "api", "elector")
    work = container(objs, "Deployment", "crunch", "work")
    lead = container(objs, "Deployment", "crunch", "lead")
    hpa = obj(objs, "HorizontalPodAutoscaler", "crunch")
    scaler = container(objs, "Deployment", "crunch-scaler", "scaler")
    api_pod = obj(objs, sts, "api")["spec"]["template"]["spec"]
    edge_lb = obj(objs, "Deployment", "edge-lb")
    edge_pod = edge_lb["spec"]["template"]["spec"]
    edge_lb_c = container(objs, "Deployment", "edge-lb", "lb")
    lb_args = edge_lb_c["args"]

    def flag(name: str) -> str | None:
        return lb_args[lb_args.index(name) + 1] if name in lb_args else None

    ready, live = app["readinessProbe"], app["livenessProbe"]
    checks: dict[str, bool] = {
        "pods": len(workloads(objs)) == 6,  # api, crunch, once, crunch's scaler, 2 lbs
        "services": len(kinds(objs, "Service")) == 5,  # api, edge, dev, api-pods, scaler
        "name": obj(objs, sts, "api")["metadata"]["labels"]["app.kubernetes.io/instance"] == "sink",
        "image": probe_exec["image"] == "registry.example/sink:7",
        "backends": env_of(work)["PODKIT_BACKEND_LOCKS"]
        == {"secretKeyRef": {"name": "sink-backends", "key": "locks"}},
        "pods[].name": obj(objs, sts, "api")["metadata"]["name"] == "api",
        "pods[].replicas": obj(objs, sts, "api")["spec"]["replicas"] == 4,
        "pods[].restart": obj(objs, "Job", "once")["spec"]["template"]["spec"]["restartPolicy"]
        == "Never",
        "pods[].grace_period": api_pod["terminationGracePeriodSeconds"] == 17,
        "pods[].volumes": api_pod["volumes"] == [{"name": "scratch", "emptyDir": {}}],
        "pods[].election": api_pod["serviceAccountName"] == "api-elector",
        "pods[].election.name": obj(objs, "Lease", "api-lead")["kind"] == "Lease",
        "pods[].election.backend": "k8s://$(POD_NAMESPACE)" in elector["args"],
        "pods[].election.ttl": elector["args"][elector["args"].index("--ttl") + 1] == "3.5",
        "pods[].election.port": elector["ports"][0]["containerPort"] == 4041,
        "pods[].election.exec": "python3 lead.py" in elector["args"],
        "pods[].autoscale": hpa["spec"]["scaleTargetRef"]["name"] == "crunch",
        "pods[].autoscale.queue": hpa["spec"]["metrics"][0]["external"]["metric"]["selector"][
            "matchLabels"
        ]["queue"]
        == "jobs",
        "pods[].autoscale.backend": "$(PODKIT_BACKEND_STATE)" in scaler["args"],
        "pods[].autoscale.min": hpa["spec"]["minReplicas"] == 2,
        "pods[].autoscale.max": hpa["spec"]["maxReplicas"] == 11,
        "pods[].autoscale.target_drain": scaler["args"][scaler["args"].index("--target-drain") + 1]
        == "45",
        "pods[].autoscale.cooldown_up": hpa["spec"]["behavior"]["scaleUp"][
            "stabilizationWindowSeconds"
        ]
        == 6,
        "pods[].autoscale.cooldown_down": hpa["spec"]["behavior"]["scaleDown"][
            "stabilizationWindowSeconds"
        ]
        == 70,
        "pods[].containers": [c["name"] for c in api_pod["containers"]] == ["app", "probe-exec"],
        "pods[].containers[].name": app["name"] == "app",
        "pods[].containers[].image": app["image"] == "registry.example/api:9",
        "pods[].containers[].command": app["command"] == ["python3", "api.py"],
        "pods[].containers[].args": app["args"] == ["--id", "$(REPLICA)"],
        "pods[].containers[].component": lead["command"] == ["podkit", "elect"],
        "pods[].containers[].with": lead["args"]
        == ["--backend", "$(PODKIT_BACKEND_LOCKS)", "--name", "crunch-lead"],
        "pods[].containers[].env": env_of(app)["MODE"] == "blue",
        "pods[].containers[].ports": app["ports"][0]
        == {"name": "http", "containerPort": 8080, "protocol": "TCP"},
        "pods[].containers[].volumes": app["volumeMounts"]
        == [{"name": "scratch", "mountPath": "/var/scratch"}]
        and env_of(app)["VOLUME_SCRATCH"] == "/var/scratch",
        "pods[].containers[].workdir": app["workingDir"] == "/app/srv",
        "pods[].containers[].readiness": "readinessProbe" in app,
        "pods[].containers[].liveness": live["tcpSocket"] == {"port": 8080},
        "probe.http": ready["httpGet"] == {"path": "/ready", "port": "http", "host": "10.1.2.3"},
        "probe.tcp": "tcpSocket" in live,
        "probe.exec": probe_exec["readinessProbe"]["exec"]["command"] == ["test", "-f", "/tmp/ok"],
        "probe.initial_delay": ready["initialDelaySeconds"] == 3,
        "probe.period": ready["periodSeconds"] == 4,
        "probe.timeout": ready["timeoutSeconds"] == 2,
        "probe.success_threshold": ready["successThreshold"] == 2,
        "probe.failure_threshold": live["failureThreshold"] == 9,
        "services[].name": obj(objs, "Service", "api")["spec"]["ports"][0]["port"] == 9000
        and env_of(app)["API_SERVICE_HOST"] == "api",
        "services[].port": env_of(app)["API_SERVICE_PORT"] == "9000",
        "services[].pods": obj(objs, "Service", "api")["spec"]["selector"]
        == {"app.kubernetes.io/name": "api", "app.kubernetes.io/instance": "sink"},
        "services[].target": obj(objs, "Service", "api")["spec"]["ports"][0]["targetPort"]
        == "http",
        "services[].host": any(w.startswith("services.0.host") for w in warnings),
        "services[].lb": edge_lb["spec"]["replicas"] == 2
        and obj(objs, "Service", "edge")["spec"]["selector"]["app.kubernetes.io/name"] == "edge-lb"
        and flag("--members-dns") == "api-pods:8080"
        and flag("--listen") == "0.0.0.0:9443",
        "services[].lb.policy": flag("--policy") == "consistent-hash",
        "services[].lb.hash_on": flag("--hash-on") == "cookie:session",
        "services[].lb.workers": flag("--workers") == "3",
        "services[].lb.tries": flag("--tries") == "4",
        "services[].lb.retry_budget": flag("--retry-budget") == "15",
        "services[].lb.upstream_timeout": flag("--upstream-timeout") == "20",
        "services[].lb.request_timeout": flag("--request-timeout") == "45.5",
        "services[].lb.breaker": "--max-connections" in lb_args,
        "services[].lb.breaker.max_connections": flag("--max-connections") == "1000000",
        "services[].lb.breaker.max_pending": flag("--max-pending") == "40",
        "services[].lb.breaker.max_requests": flag("--max-requests") == "250",
        "services[].lb.health": "--health-path" in lb_args,
        "services[].lb.health.path": flag("--health-path") == "/ping",
        "services[].lb.health.interval": flag("--health-interval") == "2.5",
        "services[].lb.health.timeout": flag("--health-timeout") == "0.7",
        "services[].lb.health.healthy_threshold": flag("--healthy-threshold") == "4",
        "services[].lb.health.unhealthy_threshold": flag("--unhealthy-threshold") == "6",
        "services[].lb.cache": "--cache-bytes" in lb_args,
        "services[].lb.cache.max_bytes": flag("--cache-bytes") == "5000000",
        "services[].lb.cache.max_entry_bytes": flag("--cache-entry-bytes") == "70000",
        "services[].lb.rate_limit": "--rate-limit" in lb_args,
        "services[].lb.rate_limit.rate": flag("--rate-limit") == "50/s burst 80",
        "services[].lb.rate_limit.by": flag("--rate-limit-by") == "header:X-Key",
        "services[].lb.rate_limit.global": flag("--global-rate-limit") == "900/s",
        "services[].lb.tls": edge_pod["volumes"]
        == [{"name": "tls", "secret": {"secretName": "edge-tls"}}],
        "services[].lb.tls.cert": flag("--tls-cert") == "/etc/podkit/tls/tls.crt"
        and any("kubectl create secret tls edge-tls --cert certs/edge.crt" in w for w in warnings),
        "services[].lb.tls.key": flag("--tls-key") == "/etc/podkit/tls/tls.key",
        "services[].lb.tls.self_signed": "--self-signed"
        in container(objs, "Deployment", "dev-lb", "lb")["args"],
        "services[].lb.admin_port": flag("--admin-port") == "9901"
        and edge_lb_c["ports"][1] == {"name": "admin", "containerPort": 9901, "protocol": "TCP"},
        # round-robin without lb: a plain Service straight to the pods, kube-proxy balancing
        "services[].policy": obj(objs, "Service", "api")["spec"]["selector"][
            "app.kubernetes.io/name"
        ]
        == "api"
        and "sessionAffinity" not in obj(objs, "Service", "api")["spec"],
    }
    assert sorted(set(FIELDS) - set(checks)) == [], "a field without a check"
    assert [k for k, ok in checks.items() if not ok] == []
    assert validate_objects(objs, "1.37") == []


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (("backends", "sqlite:///x.db"), "backends.state", "cannot span machines"),
        (("image", None), "pods.1.containers.0.image", "no image"),
        (("hpa-min", 0), "pods.1.autoscale.min", "cannot scale to 0"),
        (("live-success", 2), "pods.0.containers.0.liveness.success_threshold", "must be 1"),
        (("port-name", "a-very-long-port-name"), "pods.0.containers.0.ports", "15 characters"),
    ],
)
def test_fields_that_cannot_be_rendered_are_refused(
    change: tuple[str, Any], field: str, words: str
) -> None:
    data = yaml.safe_load(KITCHEN_SINK)
    what, value = change
    if what == "backends":
        data["backends"]["state"] = value
    elif what == "image":
        data.pop("image")
    elif what == "hpa-min":
        data["pods"][1]["autoscale"]["min"] = value
    elif what == "live-success":
        data["pods"][0]["containers"][0]["liveness"]["success_threshold"] = value
    else:
        c = data["pods"][0]["containers"][0]
        c["ports"] = {value: 8080}
        c["readiness"]["http"]["port"] = value
        for svc in data["services"]:
            if svc["target"] == "http":
                svc["target"] = value
    with pytest.raises(RenderError) as info:
        render(parse_spec(yaml.safe_dump(data)), RenderOptions())
    hits = [p for p in info.value.problems if ".".join(map(str, p.loc)).startswith(field)]
    assert hits and words in hits[0].message, info.value.problems


def test_the_cli_names_file_line_and_field(tmp_path: Path) -> None:
    spec = tmp_path / "s.yaml"
    spec.write_text(KITCHEN_SINK.replace("redis://redis-main:6379/0", "memory://"))
    run = subprocess.run([*PODKIT, "k8s", str(spec)], capture_output=True, text=True)
    assert run.returncode == 2
    assert f"{spec}:4:" in run.stderr and "backends.state" in run.stderr
    assert "cannot span machines" in run.stderr and run.stdout == ""


def test_the_cli_writes_a_kustomization(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.run(
        [*PODKIT, "k8s", str(ROOT / "examples/leader.yaml"), "--image", IMAGE, "-o", str(out),
         "--validate"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    kustomization = yaml.safe_load((out / "kustomization.yaml").read_text())
    files = sorted(p.name for p in out.iterdir() if p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == files
    assert "lease-nightly-report.yaml" in files


def test_kustomize_builds_the_written_directory(tmp_path: Path) -> None:
    kubectl = require_binary("kubectl", "kubectl")  # a failure in CI, a skip elsewhere
    spec = load_spec(ROOT / "examples/thumbnails.yaml")
    rendered = render(spec, options_for(ROOT / "examples/thumbnails.yaml", namespace="jobs"))
    files = rendered.write(tmp_path / "out")
    built = subprocess.run([kubectl, "kustomize", str(tmp_path / "out")], capture_output=True,
                           text=True)  # fmt: skip
    assert built.returncode == 0, built.stderr
    assert list(yaml.safe_load_all(built.stdout)) != []
    assert len(list(yaml.safe_load_all(built.stdout))) == len(files) - 1  # minus kustomization


def test_backend_urls_are_referenced_never_written(tmp_path: Path) -> None:
    text = KITCHEN_SINK.replace("redis://redis-main", "redis://:hunter2@redis-main")
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    run = subprocess.run([*PODKIT, "k8s", str(spec)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "hunter2" not in run.stdout and "kind: Secret" not in run.stdout
    assert "kubectl create secret generic sink-backends" in run.stderr
    with pytest.raises(RenderError, match="password"):
        render(parse_spec(text), RenderOptions(with_backends=True))


# -- election RBAC and security ------------------------------------------------------------


def test_election_rbac_grants_only_the_one_lease() -> None:
    objs = render(load_spec(ROOT / "examples/leader.yaml"), RenderOptions(image=IMAGE)).objects
    (role,) = kinds(objs, "Role")
    (lease,) = kinds(objs, "Lease")
    (binding,) = kinds(objs, "RoleBinding")
    for rule in role["rules"]:
        assert rule["apiGroups"] == ["coordination.k8s.io"]
        assert rule["resources"] == ["leases"]
        assert rule["resourceNames"] == [lease["metadata"]["name"]] == ["nightly-report"]
        assert set(rule["verbs"]) <= {"get", "update", "create"}
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = binding["subjects"][0]["name"]
    (worker,) = workloads(objs)
    assert worker["spec"]["template"]["spec"]["serviceAccountName"] == sa
    assert not kinds(objs, "ClusterRole") and not kinds(objs, "ClusterRoleBinding")


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_containers_run_as_non_root_without_escalation(example: Path) -> None:
    objs = render(load_spec(example), options_for(example)).objects
    assert workloads(objs)
    for w in workloads(objs):
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        for c in pod_containers(w):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["runAsNonRoot"] is True
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}


# -- the queue scaler behind the HPA / KEDA ------------------------------------------------


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_queue_scaler_publishes_the_replicas_the_backlog_needs(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    enq = subprocess.run(
        [*PODKIT, "queue", "enqueue", "--queue", url, "--name", "jobs", *map(str, range(40))],
        capture_output=True, text=True,
    )  # fmt: skip
    assert enq.returncode == 0, enq.stderr
    port = free_port()
    scaler = subprocess.Popen(
        [*PODKIT, "queue", "scaler", "--queue", url, "--name", "jobs", "--min", "1", "--max",
         "6", "--target-drain", "2", "--port", str(port), "--every", "0.2"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                status, body = get(f"http://127.0.0.1:{port}/desired")
                if status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "scaler did not answer"
            time.sleep(0.1)
        demand = json.loads(body)
        assert demand["backlog"] == 40 and demand["workers"] == 0
        assert demand["desired"] == 1  # no worker has reported a rate yet: start one
        status, text = get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert b'podkit_queue_scaler_desired_replicas{queue="jobs"} 1.0' in text
        assert b'podkit_queue_scaler_depth{queue="jobs"} 40.0' in text
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        scaler.terminate()
        scaler.wait(10)
