"""`podkit queue ...`: work, feed and watch a work queue from the command line.

podkit queue work   --queue URL --name Q --exec 'convert {} out/{name}'
podkit queue source dir IN/ --queue URL --name Q --pattern '*.png'
podkit queue status --queue URL --name Q [--watch]
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from podkit.aio import run_async, stop_event, wait_for
from podkit.backends import BackendError, Message, open_kv
from podkit.clihelp import App, epilog
from podkit.net.listen import ListenError, listening
from podkit.workqueue import sources
from podkit.workqueue.core import RetryPolicy, WorkerStats, WorkQueue
from podkit.workqueue.handlers import ExecHandler, HTTPHandler, Mode
from podkit.workqueue.scaling import ProgressReporter

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from podkit.backends import QueueStats
    from podkit.workqueue.scaling import Demand

DOCS = "docs/workqueue.md"
cli = App(
    help="Work queues: workers, sources and status.",
    no_args_is_help=True,
    epilog=epilog("podkit queue status --queue sqlite:///q.db --name images", docs=DOCS),
)
source_cli = App(
    help="Feed a queue.",
    no_args_is_help=True,
    epilog=epilog("podkit queue source dir in/ --queue sqlite:///q.db --name images", docs=DOCS),
)
cli.add_typer(source_cli, name="source")

QUEUE = "Queue"  # the groups of the queue commands' options
HANDLER = "Handler"
DELIVERY = "Delivery"
ADMIN = "Admin"
QueueURL = Annotated[
    str,
    typer.Option(
        "--queue", help="Queue backend URL.", envvar="PODKIT_BACKEND_STATE", rich_help_panel=QUEUE
    ),
]
QueueName = Annotated[str, typer.Option("--name", help="The queue's name.", rich_help_panel=QUEUE)]


def log(message: str) -> None:
    print(f"queue: {message}", file=sys.stderr, flush=True)


def _run(coro: Any) -> None:
    try:
        run_async(coro)
    except (BackendError, ListenError) as exc:
        log(str(exc))
        raise typer.Exit(1) from None


# -- the options of `queue work` ------------------------------------------------------------

ExecCommand = Annotated[
    str | None,
    typer.Option(
        "--exec", help="Command per item: {} {name} {stem} {file}.", rich_help_panel=HANDLER
    ),
]
ExecMode = Annotated[
    str,
    typer.Option(
        "--mode", help="How the command gets the item: arg, stdin, file.", rich_help_panel=HANDLER
    ),
]
HTTPTarget = Annotated[
    str | None,
    typer.Option("--http", help="POST each item to this URL instead.", rich_help_panel=HANDLER),
]
Concurrency = Annotated[
    int, typer.Option("--concurrency", help="Items in hand at once.", rich_help_panel=DELIVERY)
]
Prefetch = Annotated[
    int,
    typer.Option(
        "--prefetch",
        help="Items leased ahead of free slots (heartbeated, returned on stop).",
        rich_help_panel=DELIVERY,
    ),
]
Visibility = Annotated[
    float,
    typer.Option("--visibility", help="Seconds an item stays hidden.", rich_help_panel=DELIVERY),
]
MaxAttempts = Annotated[
    int,
    typer.Option(
        "--max-attempts", help="Deliveries before dead-lettering.", rich_help_panel=DELIVERY
    ),
]
RetryBase = Annotated[
    float,
    typer.Option(
        "--retry-base", help="Seconds before a first retry, doubling.", rich_help_panel=DELIVERY
    ),
]
ExecTimeout = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        help="Seconds a command may run.",
        show_default="no limit",
        rich_help_panel=HANDLER,
    ),
]
Then = Annotated[
    str | None,
    typer.Option(
        "--then", help="Enqueue each result on this queue: the next step.", rich_help_panel=QUEUE
    ),
]
Drain = Annotated[
    bool,
    typer.Option(
        "--drain/--no-drain", help="Stop when the queue is empty.", rich_help_panel=DELIVERY
    ),
]
Results = Annotated[
    str | None,
    typer.Option(
        "--results",
        help="Keep each result in this KV backend URL, by item id.",
        rich_help_panel=QUEUE,
    ),
]
PrintResults = Annotated[
    bool,
    typer.Option(
        "--print-results/--no-print-results",
        help="Print each result on stdout, a JSON line.",
        rich_help_panel=HANDLER,
    ),
]
ReportProgress = Annotated[
    bool,
    typer.Option(
        "--report/--no-report",
        help="Report progress for autoscaling (needs a KV backend).",
        rich_help_panel=ADMIN,
    ),
]
Grace = Annotated[
    float,
    typer.Option("--grace", help="Seconds to finish items on SIGTERM.", rich_help_panel=DELIVERY),
]
WorkAdminPort = Annotated[
    int | None,
    typer.Option(
        "--admin-port",
        help="Loopback port for /metrics, /healthz, /readyz, /status.",
        rich_help_panel=ADMIN,
    ),
]


@cli.command(
    epilog=epilog(
        "podkit queue work --queue sqlite:///q.db --name images",
        "--exec 'convert {} out/{stem}.webp'",
        docs=DOCS,
    )
)
def work(
    queue: QueueURL,
    name: QueueName = "default",
    exec_: ExecCommand = None,
    mode: ExecMode = "arg",
    http: HTTPTarget = None,
    concurrency: Concurrency = 4,
    prefetch: Prefetch = 0,
    visibility: Visibility = 30.0,
    max_attempts: MaxAttempts = 5,
    retry_base: RetryBase = 1.0,
    timeout: ExecTimeout = None,
    then: Then = None,
    results: Results = None,
    drain: Drain = False,
    print_results: PrintResults = False,
    report: ReportProgress = True,
    grace: Grace = 30.0,
    admin_port: WorkAdminPort = None,
) -> None:
    """Process items with a command (exit 0 acks) or an HTTP endpoint (2xx acks)."""
    if (exec_ is None) == (http is None):
        log("give exactly one of --exec CMD or --http URL")
        raise typer.Exit(2)
    if mode not in ("arg", "stdin", "file"):
        log(f"--mode must be arg, stdin or file, not {mode!r}")
        raise typer.Exit(2)

    async def main() -> None:
        wq = await WorkQueue.open(
            queue, name, max_attempts=max_attempts, visibility=visibility,
            retry=RetryPolicy(base=retry_base), results=results,
        )  # fmt: skip
        handler = _handler(exec_, http, mode_, timeout, print_results)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, wq.stop)
        after = await WorkQueue.open(queue, then) if then else None
        reporter = None
        if report:  # for the autoscaler: how fast this worker goes
            reporter = ProgressReporter(await open_kv(queue), name)
            reporter.start()

        def progress(stats: WorkerStats) -> None:
            if reporter is not None:
                reporter.done = stats.done

        counts = WorkerStats()
        admin = None if admin_port is None else await _work_admin(counts, name, queue, admin_port)
        log(f"working on '{name}' ({queue}) with concurrency {concurrency}")
        stats = await wq.run(
            handler, concurrency=concurrency, drain=drain, grace=grace, then=after,
            on_done=progress, prefetch=prefetch, stats=counts, on_failed=_failed,
        )  # fmt: skip
        log(f"done {stats.done}, failed {stats.failed}, returned {stats.returned}")
        kv = reporter.kv if reporter is not None else None
        await _close(admin, reporter, kv, after, getattr(handler, "inner", handler), wq)

    mode_: Mode = mode  # type: ignore[assignment]
    _run(main())


async def _close(*things: Any) -> None:
    """Close each of `things` that is there and has a `close`."""
    for thing in things:
        close = getattr(thing, "close", None)
        if close is not None:
            await close()


def _handler(
    exec_: str | None, http: str | None, mode: Mode, timeout: float | None, print_results: bool
) -> Any:
    """`queue work`'s handler: the command (`--exec`) or the URL (`--http`); with
    `print_results`, each result is printed on stdout, one JSON line per item."""
    inner: Any = ExecHandler(exec_, mode=mode, timeout=timeout) if exec_ else None
    if inner is None:
        assert http is not None
        inner = HTTPHandler(http)
    if not print_results:
        return inner
    return _Printing(inner)


class _Printing:
    """A handler that prints what the handler it wraps returns."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def __call__(self, item: Any) -> Any:
        result = await self.inner(item)
        print(json.dumps(result, default=str), flush=True)
        return result


def _failed(message: Message, error: str) -> None:
    """One line per failed delivery, with the handler's error (exit code, stderr tail)."""
    log(f"item {message.id} failed (delivery {message.attempts}): {error}")


async def _work_admin(counts: WorkerStats, name: str, queue: str, port: int) -> Any:
    """The admin server of `queue work`: its counts as podkit_queue_work_* metrics."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, Metric
    from prometheus_client.registry import Collector

    from podkit.backends import mask
    from podkit.observe.admin import AdminServer

    class Counts(Collector):
        def collect(self) -> Any:
            out: list[Metric] = []
            for what, value, doc in (
                ("items_done", counts.done, "Items whose handler returned (acked)."),
                ("items_failed", counts.failed, "Handler errors (retried or dead-lettered)."),
                ("items_returned", counts.returned, "Items handed back unfinished on stop."),
                ("backend_outages", counts.outages, "Dequeues the backend did not answer."),
            ):
                family = CounterMetricFamily(f"podkit_queue_work_{what}", doc, labels=["queue"])
                family.add_metric([name], float(value))
                out.append(family)
            return out

    registry = CollectorRegistry()
    registry.register(Counts())

    def status() -> tuple[int, Any]:
        return 200, {"queue": name, "backend": mask(queue), "done": counts.done,
                     "failed": counts.failed, "rate": round(counts.rate, 2)}  # fmt: skip

    admin = AdminServer({"/status": status}, "127.0.0.1", port, registry=registry)
    await listening(admin.start(), "--admin-port", "127.0.0.1", port)
    return admin


@cli.command(
    epilog=epilog(
        "podkit queue enqueue in/cat.png in/dog.png",
        "--queue sqlite:///q.db --name images",
        docs=DOCS,
    )
)
def enqueue(
    items: Annotated[list[str], typer.Argument(help="Items (JSON, or plain text).")],
    queue: QueueURL,
    name: QueueName = "default",
    key: Annotated[str | None, typer.Option(help="Idempotency key (one item).")] = None,
) -> None:
    """Add items to a queue."""

    async def main() -> None:
        wq = await WorkQueue.open(queue, name)
        parsed = [_parse(i) for i in items]
        if key is not None and len(parsed) == 1:
            ids = [await wq.enqueue(parsed[0], key=key)]
        else:
            ids = await wq.enqueue_many(parsed)
        print("\n".join(ids))
        await wq.close()

    _run(main())


def _shown(payload: bytes, limit: int = 500) -> str:
    """An item as text for a person: its JSON or its bytes decoded, cut at `limit`."""
    text = payload.decode("utf-8", "replace")
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _parse(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


@cli.command(
    epilog=epilog("podkit queue status --queue sqlite:///q.db --name images --dead 10", docs=DOCS)
)
def status(
    queue: QueueURL,
    name: QueueName = "default",
    watch: Annotated[bool, typer.Option(help="Keep showing, with a progress bar.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    dead: Annotated[int, typer.Option(help="Also list this many dead letters.")] = 0,
) -> None:
    """Depth, in flight, dead, drain rate and ETA of a queue."""

    async def main() -> None:
        wq = await WorkQueue.open(queue, name, create=False)  # a status makes no queue
        try:
            if watch:
                await _watch(wq)
                return
            a = await wq.stats()
            await asyncio.sleep(1.0)
            b = await wq.stats()
            rate = max(0.0, (a.depth + a.in_flight) - (b.depth + b.in_flight))
            left = b.depth + b.in_flight
            eta = left / rate if rate > 0 else None
            data: dict[str, Any] = {
                "queue": name, "depth": b.depth, "in_flight": b.in_flight, "dead": b.dead,
                "rate": rate, "eta_seconds": eta,
            }  # fmt: skip
            if dead:
                data["dead_letters"] = [
                    {
                        "id": m.id,
                        "attempts": m.attempts,
                        "last_error": m.last_error,
                        "item": _shown(m.payload),
                    }
                    for m in await wq.queue.dead_letters(dead)
                ]
            if as_json:
                print(json.dumps(data))
            else:
                eta_text = f"{eta:.0f}s" if eta is not None else "-"
                print(
                    f"{name}: depth {b.depth}, in flight {b.in_flight}, dead {b.dead}, "
                    f"rate {rate:.0f}/s, ETA {eta_text}"
                )
                for d in data.get("dead_letters", []):
                    print(f"  dead {d['id']} after {d['attempts']} attempts: {d['last_error']}")
                    print(f"    item: {d['item']}")
        finally:
            await wq.close()

    _run(main())


@cli.command(
    epilog=epilog(
        "podkit queue scaler --queue redis://redis:6379 --name images --max 20", docs=DOCS
    )
)
def scaler(
    queue: QueueURL,
    name: QueueName = "default",
    min_: Annotated[int, typer.Option("--min", help="Fewest replicas.")] = 1,
    max_: Annotated[int, typer.Option("--max", help="Most replicas.")] = 8,
    target_drain: Annotated[float, typer.Option(help="Seconds to work off the backlog.")] = 30.0,
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 9464,
    every: Annotated[float, typer.Option(help="Seconds between samples.")] = 2.0,
) -> None:
    """Publish the replicas a queue needs, for an HPA (GET /metrics: gauge
    podkit_queue_scaler_desired_replicas) or KEDA's metrics-api (GET /desired: JSON)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from podkit.observe.admin import AdminServer, Handler
    from podkit.workqueue.scaling import DemandMeter, ScalePolicy, read_progress

    registry = CollectorRegistry()
    show = _scaler_gauges(registry, name)
    meter = DemandMeter(ScalePolicy(min_, max_, target_drain, 0.0, 0.0))
    state: dict[str, Any] = {"demand": None, "at": 0.0, "error": "no sample yet"}

    def desired() -> tuple[int, Any]:
        d: Demand | None = state["demand"]
        if d is None:
            return 503, {"error": state["error"]}
        return 200, {
            "queue": name, "desired": d.desired, "backlog": d.backlog, "workers": d.workers,
            "rate": d.rate, "per_replica": d.per_replica,
        }  # fmt: skip

    def healthz() -> tuple[int, Any]:
        fresh = time.monotonic() - state["at"] < 3 * every + 5
        return (200, {"ok": True}) if fresh else (503, {"error": state["error"]})

    def metrics() -> tuple[int, Any]:
        return 200, generate_latest(registry)

    async def main() -> None:
        wq = await WorkQueue.open(queue, name)
        kv = await open_kv(queue)
        routes: dict[str, Handler] = {"/desired": desired, "/healthz": healthz, "/metrics": metrics}
        server = AdminServer(routes, host, port)
        await listening(server.start(), "--port", host, port)
        log(f"scaler for {name!r} on {server.url}/desired and /metrics")
        stop = stop_event()
        try:
            while not stop.is_set():
                try:
                    s = await wq.stats()
                    done, workers = await read_progress(kv, name)
                except (BackendError, OSError) as exc:
                    state["error"] = f"cannot read the queue: {exc}"
                else:
                    d = meter.update(time.monotonic(), s.depth + s.in_flight, done, workers)
                    state.update(demand=d, at=time.monotonic(), error="")
                    show(s, d)
                try:
                    await wait_for(stop.wait(), every)
                except TimeoutError:
                    pass
        finally:
            await server.close()
            await kv.close()
            await wq.close()

    _run(main())


def _scaler_gauges(registry: CollectorRegistry, name: str) -> Callable[[QueueStats, Demand], None]:
    """The gauges `scaler` publishes for queue `name`, in `registry`, and the function
    that sets them from one sample: the queue's stats and the demand they make."""
    from prometheus_client import Gauge

    def gauge(metric: str, text: str) -> Gauge:
        return Gauge(metric, text, ["queue"], registry=registry).labels(queue=name)

    desired = gauge("podkit_queue_scaler_desired_replicas", "Worker replicas the backlog needs.")
    depth = gauge("podkit_queue_scaler_depth", "Items ready to be taken.")
    flight = gauge("podkit_queue_scaler_in_flight", "Items taken and not yet acked.")
    dead = gauge("podkit_queue_scaler_dead", "Dead-lettered items.")
    rate = gauge("podkit_queue_scaler_rate", "Items finished per second by all workers.")
    workers = gauge("podkit_queue_scaler_workers", "Workers reporting progress.")

    def show(s: QueueStats, d: Demand) -> None:
        desired.set(d.desired)
        depth.set(s.depth)
        flight.set(s.in_flight)
        dead.set(s.dead)
        rate.set(d.rate or 0.0)
        workers.set(d.workers)

    return show


async def _watch(wq: WorkQueue) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    stop = stop_event()
    first = await wq.stats()
    total = max(1, first.depth + first.in_flight)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[rate]:.0f}/s dead {task.fields[dead]}"), TimeRemainingColumn(),
    ) as bar:  # fmt: skip
        task = bar.add_task(wq.name, total=total, rate=0.0, dead=first.dead)
        last, last_t = total, time.monotonic()
        while not stop.is_set():
            s = await wq.stats()
            left = s.depth + s.in_flight
            total = max(total, left)
            now = time.monotonic()
            rate = max(0.0, (last - left) / (now - last_t))
            last, last_t = left, now
            bar.update(task, total=total, completed=total - left, rate=rate, dead=s.dead)
            if left == 0:
                break
            try:
                await wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass


def _feed(
    queue: str, name: str, body: Callable[[WorkQueue, asyncio.Event], Awaitable[object]]
) -> None:
    """Open the queue, run a source until it ends or SIGINT/SIGTERM, close the queue."""

    async def main() -> None:
        wq = await WorkQueue.open(queue, name)
        stop = stop_event()
        try:
            await body(wq, stop)
        finally:
            await wq.close()

    _run(main())


@source_cli.command(
    "dir",
    epilog=epilog(
        "podkit queue source dir in/ --pattern '*.png'",
        "--queue sqlite:///q.db --name images",
        docs=DOCS,
    ),
)
def source_dir(
    path: Annotated[str, typer.Argument(help="The directory to watch.")],
    queue: QueueURL,
    name: QueueName = "default",
    pattern: Annotated[str, typer.Option(help="File name pattern.")] = "*",
    poll: Annotated[float, typer.Option(help="Seconds between scans.")] = 1.0,
) -> None:
    """Enqueue the path of each new file in a directory."""
    log(f"watching {path} ({pattern}) for '{name}'")
    _feed(
        queue,
        name,
        lambda wq, stop: sources.directory(
            wq, path, pattern=pattern, poll=poll, stop=stop, log=log
        ),
    )


@source_cli.command(
    "lines",
    epilog=epilog("podkit queue source lines urls.txt --queue sqlite:///q.db", docs=DOCS),
)
def source_lines(
    file: Annotated[str, typer.Argument(help="A text file: one item per line.")],
    queue: QueueURL,
    name: QueueName = "default",
) -> None:
    """Enqueue each line of a file."""
    _feed(queue, name, lambda wq, _stop: sources.lines(wq, file, log=log))


@source_cli.command(
    "every",
    epilog=epilog(
        "podkit queue source every 3600 --item report",
        "--queue sqlite:///q.db --name nightly",
        docs=DOCS,
    ),
)
def source_every(
    seconds: Annotated[float, typer.Argument(help="The period.")],
    queue: QueueURL,
    name: QueueName = "default",
    item: Annotated[str, typer.Option(help="The item (JSON or text).")] = "tick",
) -> None:
    """Enqueue an item on a schedule (once per tick across replicas)."""
    _feed(
        queue,
        name,
        lambda wq, stop: sources.schedule(wq, seconds, _parse(item), stop=stop, log=log),
    )


@source_cli.command(
    "http",
    epilog=epilog("podkit queue source http --port 8090 --queue sqlite:///q.db", docs=DOCS),
)
def source_http(
    queue: QueueURL,
    name: QueueName = "default",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port: POST /enqueue.")] = 8090,
) -> None:
    """Accept items over HTTP: POST /enqueue with a JSON body."""

    async def serve(wq: WorkQueue, stop: asyncio.Event) -> None:
        src = sources.HTTPSource(wq, host, port)
        await listening(src.start(), "--port", host, port)
        log(f"POST http://{host}:{src.port}/enqueue feeds '{name}'")
        await stop.wait()
        await src.close()

    _feed(queue, name, serve)


@source_cli.command(
    "kv",
    epilog=epilog(
        "podkit queue source kv uploads/ --kv redis://redis:6379",
        "--queue redis://redis:6379 --name uploads",
        docs=DOCS,
    ),
)
def source_kv(
    prefix: Annotated[str, typer.Argument(help="Key prefix to watch.")],
    kv: Annotated[str, typer.Option(help="KV backend URL.")],
    queue: QueueURL,
    name: QueueName = "default",
) -> None:
    """Enqueue every put under a KV prefix."""
    _feed(queue, name, lambda wq, stop: sources.kv_prefix(wq, kv, prefix, stop=stop, log=log))


@source_cli.command(
    "redis-list",
    epilog=epilog(
        "podkit queue source redis-list jobs --redis redis://redis:6379",
        "--queue sqlite:///q.db --name jobs",
        docs=DOCS,
    ),
)
def source_redis_list(
    key: Annotated[str, typer.Argument(help="The Redis list.")],
    redis: Annotated[str, typer.Option(help="Redis URL.")],
    queue: QueueURL,
    name: QueueName = "default",
) -> None:
    """Move items from a Redis list into the queue, losing none on a crash."""
    _feed(queue, name, lambda wq, stop: sources.redis_list(wq, redis, key, stop=stop, log=log))
