"""Work queues: sources, workers, retries, dead letters and scaling over any Queue backend."""

from podkit.workqueue.core import RetryPolicy, WorkerStats, WorkQueue, decode, encode

__all__ = ["RetryPolicy", "WorkQueue", "WorkerStats", "decode", "encode"]
