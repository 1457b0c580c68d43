"""Work queues: sources, workers, retries, dead letters and scaling over any Queue backend."""

from podkit.workqueue.core import (
    EFFECTS,
    RetryPolicy,
    WorkerStats,
    WorkQueue,
    apply_once,
    decode,
    encode,
)

__all__ = ["EFFECTS", "RetryPolicy", "WorkQueue", "WorkerStats", "apply_once", "decode", "encode"]
