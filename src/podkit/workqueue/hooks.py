"""`autoscale:` on a pod of the spec: scale queue workers from the queue's backlog.

`podkit up` runs the loop itself (`control`); on Kubernetes a `podkit queue scaler`
Deployment publishes the replica count, which a HorizontalPodAutoscaler (External
metric) or a KEDA ScaledObject (metrics-api trigger) applies to the pod's workload.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from podkit.contract import KubePod, Loc, LocalPod, PodHook, flag_value, whole_seconds
from podkit.spectypes import Model, Name, PositiveSeconds, Seconds

SCALER_PORT = 9464
METRIC = "podkit_queue_scaler_desired_replicas"


class Autoscale(Model):
    """Scale a pod of queue workers between `min` and `max` replicas from the queue's
    backlog and the workers' rate, to drain it within `target_drain` seconds."""

    queue: str = Field(description="the name of the queue whose backlog sets the replica count")
    backend: Name = Field(
        "state",
        description="the backend holding the queue: a key of `backends:`, or `state`, the "
        "embedded default",
    )
    min: Annotated[int, Field(ge=0, le=250)] = Field(
        1,
        description="the fewest replicas (0: none while the queue is empty; on Kubernetes "
        "only with `--autoscaler keda`)",
    )
    max: Annotated[int, Field(ge=1, le=250)] = Field(
        8,
        description="the most replicas; the pod's `replicas`, kept between the two, is the "
        "count to start with",
    )
    target_drain: PositiveSeconds = Field(
        30.0,
        description="how soon the replicas should work off the backlog, at the rate one "
        "replica has shown",
    )
    cooldown_up: Seconds = Field(
        5.0, description="how long after a change before the count may change again"
    )
    cooldown_down: Seconds = Field(
        30.0,
        description="how long the backlog must ask for fewer replicas before the count goes down",
    )

    @model_validator(mode="after")
    def _bounds(self) -> Autoscale:
        if self.min > self.max:
            raise PydanticCustomError(
                "autoscale_bounds", "autoscale: min ({min}) is above max ({max})",
                {"min": self.min, "max": self.max},
            )  # fmt: skip
        return self


class AutoscaleHook(PodHook):
    key = "autoscale"
    model = Autoscale
    fields = {
        "pods[].autoscale": "a scaler Deployment and Service plus an HPA or KEDA ScaledObject",
        "pods[].autoscale.queue": "the scaler's --name and the metric's queue label",
        "pods[].autoscale.backend": "the scaler's --queue (from the Secret)",
        "pods[].autoscale.min": "minReplicas (HPA: at least 1) / minReplicaCount",
        "pods[].autoscale.max": "maxReplicas / maxReplicaCount",
        "pods[].autoscale.target_drain": "the scaler's --target-drain",
        "pods[].autoscale.cooldown_up": "behavior.scaleUp.stabilizationWindowSeconds",
        "pods[].autoscale.cooldown_down": "behavior.scaleDown.stabilizationWindowSeconds",
    }

    def backends(self, options: Any) -> dict[str, str]:
        return {"backend": options.backend}

    def initial_replicas(self, options: Any, replicas: int) -> int:
        a: Autoscale = options
        return max(a.min, min(a.max, replicas))

    async def control(self, pod: LocalPod, options: Any) -> None:
        """Every second: queue backlog and worker rate in, replica count out."""
        from podkit.backends import open_kv, open_queue
        from podkit.workqueue.scaling import ScalePolicy, Scaler, read_progress

        a: Autoscale = options
        url = pod.backend_url(a.backend)
        scaler = Scaler(ScalePolicy(a.min, a.max, a.target_drain, a.cooldown_up, a.cooldown_down))
        queue = kv = None
        while not pod.stopping:
            try:
                if queue is None or kv is None:
                    queue, kv = await open_queue(url, a.queue), await open_kv(url)
                stats = await queue.stats()
                done, workers = await read_progress(kv, a.queue)
            except Exception as exc:  # the backend is away: keep the count, try again
                pod.event(f"autoscale {pod.name}: cannot read queue '{a.queue}': {exc}")
                await pod.clock.sleep(5)
                continue
            now = pod.clock.now()
            rate = scaler.observe(now, done, workers)
            current = pod.replicas()
            backlog = stats.depth + stats.in_flight
            want = scaler.desired(now, backlog, current)
            if want != current:
                per = f"{scaler.per_replica:.0f}/s" if scaler.per_replica else "unknown"
                pod.event(
                    f"autoscale {pod.name}: {current} -> {want} replicas (backlog {backlog}, "
                    f"rate {rate or 0:.0f}/s, per replica {per})"
                )
            await pod.scale(want)
            await pod.clock.sleep(1.0)

    def cluster_state_user(self, options: Any) -> Loc | None:
        return ("backend",) if options.backend == "state" else None

    def render_before(self, kube: KubePod, options: Any) -> None:
        if kube.kind == "Job":
            kube.refuse(
                (*kube.loc, "autoscale"),
                f"pod '{kube.pod.name}' is a Job (restart: {kube.pod.restart}); autoscale "
                "needs restart: Always",
            )
        else:
            kube.scaled_elsewhere()

    def render_after(self, kube: KubePod, options: Any) -> None:
        """The scaler's Deployment and Service, and what applies its count."""
        a: Autoscale = options
        if kube.kind == "Job" or not kube.has_backend(a.backend):
            return  # refused already
        name = f"{kube.pod.name}-scaler"
        env = kube.backend_env(a.backend)
        argv = [
            "--queue", f"$({env['name']})", "--name", a.queue,
            "--min", str(a.min), "--max", str(a.max), "--target-drain", flag_value(a.target_drain),
            "--host", "0.0.0.0", "--port", str(SCALER_PORT),
        ]  # fmt: skip
        probe = {"httpGet": {"path": "/healthz", "port": "metrics"}, "periodSeconds": 5}
        container = {
            "name": "scaler",
            "image": kube.podkit_image,
            "command": ["podkit", "queue", "scaler"],
            "args": argv,
            "ports": [{"name": "metrics", "containerPort": SCALER_PORT, "protocol": "TCP"}],
            "env": [env],
            "readinessProbe": probe,
            "securityContext": kube.hardened(read_only=True),
        }
        kube.add(kube.workload("Deployment", name, "scaler", container))
        svc_meta = kube.meta(name, "scaler")
        svc_meta["annotations"] = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(SCALER_PORT),
            "prometheus.io/path": "/metrics",
        }
        kube.add(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": svc_meta,
                "spec": {
                    "selector": kube.selector(name),
                    "ports": [{"name": "metrics", "port": SCALER_PORT, "targetPort": "metrics"}],
                },
            }
        )
        if kube.autoscaler == "hpa":
            _hpa(kube, a)
        else:
            _keda(kube, a, name)


def _behavior(a: Autoscale) -> dict[str, Any]:
    return {
        "scaleUp": {"stabilizationWindowSeconds": whole_seconds(a.cooldown_up)},
        "scaleDown": {"stabilizationWindowSeconds": whole_seconds(a.cooldown_down)},
    }


def _target(kube: KubePod) -> dict[str, Any]:
    return {"apiVersion": "apps/v1", "kind": kube.kind, "name": kube.pod.name}


def _hpa(kube: KubePod, a: Autoscale) -> None:
    """A HorizontalPodAutoscaler on the scaler's External metric."""
    if a.min < 1:
        kube.refuse(
            (*kube.loc, "autoscale", "min"),
            "a HorizontalPodAutoscaler cannot scale to 0: set min: 1, or render with "
            "--autoscaler keda",
        )
    labels = {"queue": a.queue, "app.kubernetes.io/instance": kube.instance}
    metric = {
        "type": "External",
        "external": {
            "metric": {"name": METRIC, "selector": {"matchLabels": labels}},
            "target": {"type": "AverageValue", "averageValue": "1"},
        },
    }
    kube.add(
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": kube.meta(kube.pod.name, "autoscaler"),
            "spec": {
                "scaleTargetRef": _target(kube),
                "minReplicas": max(1, a.min),
                "maxReplicas": a.max,
                "metrics": [metric],
                "behavior": _behavior(a),
            },
        }
    )


def _keda(kube: KubePod, a: Autoscale, scaler: str) -> None:
    """A KEDA ScaledObject reading the scaler's /desired."""
    namespace = kube.namespace or "default"
    if not kube.namespace:
        kube.warn(
            (*kube.loc, "autoscale"),
            "KEDA reads the scaler from its own namespace: the URL assumes namespace "
            "'default'; pass --namespace",
        )
    trigger = {
        "type": "metrics-api",
        "metricType": "AverageValue",
        "metadata": {
            "url": f"http://{scaler}.{namespace}.svc:{SCALER_PORT}/desired",
            "format": "json",
            "valueLocation": "desired",
            "targetValue": "1",
        },
    }
    kube.add(
        {
            "apiVersion": "keda.sh/v1alpha1",
            "kind": "ScaledObject",
            "metadata": kube.meta(kube.pod.name, "autoscaler"),
            "spec": {
                "scaleTargetRef": _target(kube),
                "minReplicaCount": a.min,
                "maxReplicaCount": a.max,
                "pollingInterval": 5,
                "cooldownPeriod": whole_seconds(a.cooldown_down),
                "advanced": {"horizontalPodAutoscalerConfig": {"behavior": _behavior(a)}},
                "triggers": [trigger],
            },
        }
    )
