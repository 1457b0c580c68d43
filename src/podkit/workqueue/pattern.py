"""The work-queue pattern as podkit's system sees it: `podkit queue` and `autoscale:`."""

from podkit.contract import Pattern
from podkit.workqueue.hooks import AutoscaleHook

PATTERN = Pattern(
    name="queue",
    cli="podkit.workqueue.component:cli",
    pod_hooks=(AutoscaleHook(),),
)
