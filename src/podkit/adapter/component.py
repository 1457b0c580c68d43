"""`podkit adapter ...`: make an app's logs, stats and health look like everyone else's.

podkit adapter logs   [--file F | -- CMD ...]        JSON lines on stdout
podkit adapter health --sql URL --redis URL ...      /healthz and /readyz
podkit adapter metrics redis|postgres|json ...       Prometheus /metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import sys
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from podkit.aio import stop_event, wait_for
from podkit.clihelp import App, epilog

DOCS = "docs/adapters.md"
cli = App(
    help="Adapters: logs, metrics and health in standard shapes.",
    no_args_is_help=True,
    epilog=epilog("podkit adapter logs -- gunicorn app:app", docs=DOCS),
)


def log(message: str) -> None:
    print(f"adapter: {message}", file=sys.stderr, flush=True)


# -- logs ------------------------------------------------------------------------------------

IDLE_FLUSH = 0.2  # seconds: a Python record waiting for a traceback goes out after this
LINE_LIMIT = 1 << 20  # bytes: a longer line is passed on in pieces


class _Writer:
    """Writes records as JSON lines, and counts the lines read (by `_pump`), the lines
    written (one a record) and the lines no format took (written whole, `raw`)."""

    def __init__(self, out: TextIO, source: str) -> None:
        self.out = out
        self.source = source
        self.read = 0
        self.written = 0
        self.unparsed = 0

    def write(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            r["source"] = self.source
            self.out.write(json.dumps(r, ensure_ascii=False) + "\n")
            self.written += 1
            if not r["parsed"]:
                self.unparsed += 1
        if records:
            self.out.flush()

    def counts(self) -> dict[str, int]:
        return {
            "lines_read": self.read,
            "lines_written": self.written,
            "lines_unparsed": self.unparsed,
        }


async def _pump(lines: asyncio.Queue[str | None], writer: _Writer) -> None:
    """Parse lines from the queue until None; flush a held record when input idles."""
    from podkit.adapter.logs import LogParser

    parser = LogParser()
    while True:
        try:
            line = await wait_for(lines.get(), IDLE_FLUSH)
        except TimeoutError:
            writer.write(parser.flush())
            continue
        if line is None:
            writer.write(parser.flush())
            return
        writer.read += 1
        writer.write(parser.feed(line))


async def _read_stream(stream: asyncio.StreamReader, lines: asyncio.Queue[str | None]) -> None:
    while True:
        try:
            raw = await stream.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                await lines.put(exc.partial.decode("utf-8", "replace"))
            return
        except asyncio.LimitOverrunError as exc:  # a huge line: pass it on in pieces
            raw = await stream.readexactly(exc.consumed)
        await lines.put(raw.decode("utf-8", "replace"))


def _is_stream(fd: int) -> bool:
    """A pipe, socket or terminal: the event loop can watch it (a regular file it cannot)."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or os.isatty(fd)


async def _read_file(fd: int, lines: asyncio.Queue[str | None]) -> None:
    """Read lines from a descriptor that is no stream (a regular file, /dev/null) to its
    end, each read in a thread; a line longer than LINE_LIMIT goes on in pieces."""
    buf = b""
    while chunk := await asyncio.to_thread(os.read, fd, 65536):
        *complete, buf = (buf + chunk).split(b"\n")
        for piece in complete:
            await lines.put(piece.decode("utf-8", "replace"))
        while len(buf) >= LINE_LIMIT:
            await lines.put(buf[:LINE_LIMIT].decode("utf-8", "replace"))
            buf = buf[LINE_LIMIT:]
    if buf:
        await lines.put(buf.decode("utf-8", "replace"))


async def _follow(path: Path, lines: asyncio.Queue[str | None], stop: asyncio.Event,
                  from_start: bool, poll: float = 0.1) -> None:  # fmt: skip
    """Tail `path` like `tail -F`: survives rotation (a new inode) and truncation."""
    handle = None
    inode = None
    buf = b""
    seen = b""  # the last bytes read, to notice a file rewritten in place
    while not stop.is_set():
        if handle is None:
            try:
                handle = open(path, "rb")  # noqa: SIM115, ASYNC230 - a local file, closed below
            except FileNotFoundError:
                await asyncio.sleep(poll)
                continue
            inode = os.fstat(handle.fileno()).st_ino
            if not from_start:
                handle.seek(0, os.SEEK_END)
            log(f"following {path} from {'its start' if from_start else 'the end'}")
            from_start = True  # a rotated-in file is read from its start
        at = handle.tell()
        if at and os.pread(handle.fileno(), len(seen), at - len(seen)) != seen:
            handle.seek(0)  # truncated or rewritten in place: read it again from the start
            seen = buf = b""
        chunk = handle.read(65536)
        if chunk:
            seen = (seen + chunk)[-64:]
            buf += chunk
            *complete, buf = buf.split(b"\n")
            for piece in complete:
                await lines.put(piece.decode("utf-8", "replace"))
            continue
        try:
            inode_now: int | None = os.stat(path).st_ino
        except FileNotFoundError:
            inode_now = None
        if inode_now != inode:  # rotated: the old file is read to its end; open the new one
            if buf:
                await lines.put(buf.decode("utf-8", "replace"))
                buf = b""
            handle.close()
            handle = None
            seen = b""
            continue
        with contextlib.suppress(TimeoutError):
            await wait_for(stop.wait(), poll)
    if buf:
        await lines.put(buf.decode("utf-8", "replace"))
    if handle is not None:
        handle.close()


LOG_COUNTS = {
    "lines_read": "Lines read from the source.",
    "lines_written": "JSON lines written: one a record (a traceback joins the record before it).",
    "lines_unparsed": "Lines no format took, written whole as format raw.",
}


async def _logs_admin(writer: _Writer, port: int) -> Any:
    """The admin server of `adapter logs`: its counts as podkit_adapter_logs_* metrics."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, Metric
    from prometheus_client.registry import Collector

    from podkit.net.listen import listening
    from podkit.observe.admin import AdminServer

    class Counts(Collector):
        def collect(self) -> list[Metric]:
            counts = writer.counts()
            return [
                CounterMetricFamily(f"podkit_adapter_logs_{what}", doc, value=counts[what])
                for what, doc in LOG_COUNTS.items()
            ]

    def status() -> tuple[int, Any]:
        return 200, {"source": writer.source, **writer.counts()}

    registry = CollectorRegistry()
    registry.register(Counts())
    admin = AdminServer({"/status": status}, "127.0.0.1", port, registry=registry)
    await listening(admin.start(), "--admin-port", "127.0.0.1", port)
    log(f"admin on {admin.url}")
    return admin


async def _run_command(
    command: list[str], lines: asyncio.Queue[str | None], stop: asyncio.Event
) -> int:
    """Run the app, its stdout and stderr into `lines`; its exit status (127: not run)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as exc:  # like a shell: 127, the command did not run
        log(f"cannot run {command[0]!r}: {exc.strerror or exc}")
        return 127
    assert proc.stdout is not None
    reader = asyncio.create_task(_read_stream(proc.stdout, lines))
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if waiter in done:  # pass the stop on to the app, then read what it still says
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    await reader
    waiter.cancel()
    return await proc.wait()


async def _read_stdin(lines: asyncio.Queue[str | None], stop: asyncio.Event) -> None:
    """Standard input into `lines`, until its end or a stop."""
    fd = 0  # sys.stdin is None when podkit started with descriptor 0 closed
    if _is_stream(fd):
        loop = asyncio.get_running_loop()
        stream = asyncio.StreamReader(limit=LINE_LIMIT)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream), os.fdopen(fd, "rb")
        )
        source = _read_stream(stream, lines)
    else:
        source = _read_file(fd, lines)
    reader = asyncio.create_task(source)
    waiter = asyncio.create_task(stop.wait())
    await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
    reader.cancel()
    waiter.cancel()


async def _adapt(
    writer: _Writer, file: Path | None, command: list[str], from_start: bool, admin_port: int | None
) -> int:
    """Read the file, the command or stdin through the parser into `writer`; the exit
    status."""
    admin = None if admin_port is None else await _logs_admin(writer, admin_port)
    lines: asyncio.Queue[str | None] = asyncio.Queue(maxsize=10_000)
    stop = stop_event()
    pump = asyncio.create_task(_pump(lines, writer))
    code = 0
    if file is not None:
        await _follow(file, lines, stop, from_start)
    elif command:
        code = await _run_command(command, lines, stop)
    else:
        await _read_stdin(lines, stop)
    await lines.put(None)
    await pump
    if admin is not None:
        await admin.close()
    return code


@cli.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog=epilog("podkit adapter logs --file /var/log/nginx/access.log", docs=DOCS),
)
def logs(
    ctx: typer.Context,
    file: Annotated[Path | None, typer.Option(help="Follow this log file (like tail -F).")] = None,
    from_start: Annotated[bool, typer.Option(help="With --file: read it from the start.")] = False,
    output: Annotated[Path | None, typer.Option(help="Append JSON lines here, not stdout.")] = None,
    admin_port: Annotated[
        int | None,
        typer.Option(help="Loopback port for /metrics, /healthz, /readyz, /status."),
    ] = None,
) -> None:
    """Turn log lines into JSON lines with one schema: from a file, from a command run as
    `podkit adapter logs -- CMD ARGS` (its stdout and stderr), or from stdin."""
    from podkit.net.listen import run_server

    command = list(ctx.args)
    if file is not None and command:
        log("give --file or a command, not both")
        raise typer.Exit(2)
    out = open(output, "a", encoding="utf-8") if output else sys.stdout  # noqa: SIM115
    source = str(file) if file is not None else command[0] if command else "stdin"
    try:
        code = run_server(_adapt(_Writer(out, source), file, command, from_start, admin_port), log)
    finally:
        if out is not sys.stdout:
            out.close()
    raise typer.Exit(code if code >= 0 else 128 - code)


# -- health ----------------------------------------------------------------------------------


@cli.command(
    epilog=epilog(
        "podkit adapter health --sql postgresql://app@127.0.0.1/app",
        "--http http://127.0.0.1:8080/ping --port 8086",
        docs=DOCS,
    )
)
def health(
    sql: Annotated[list[str], typer.Option(help="postgresql:// or mysql:// URL: SELECT 1.")] = [],  # noqa: B006
    redis: Annotated[list[str], typer.Option(help="redis:// URL: PING + replication.")] = [],  # noqa: B006
    http: Annotated[list[str], typer.Option(help="URL that must answer 2xx.")] = [],  # noqa: B006
    command: Annotated[list[str], typer.Option(help="Command that must exit 0.")] = [],  # noqa: B006
    config: Annotated[Path | None, typer.Option(help="YAML: interval and checks.")] = None,
    interval: Annotated[
        float | None,
        typer.Option(help="Seconds between rounds.", show_default="--config's, else 5"),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8086,
) -> None:
    """Serve /healthz and /readyz (200 or 503 with JSON naming the failed checks)."""
    from pydantic import ValidationError

    from podkit.adapter.health import CheckConfig, HealthConfig, HealthMonitor
    from podkit.net.listen import listening, run_server
    from podkit.observe.admin import AdminServer, Handler
    from podkit.yamlpos import Position, load_yaml_file, validation_problems

    try:
        data: dict[str, Any] = {"checks": []}
        positions: dict[tuple[str | int, ...], Position] = {}
        if config is not None:
            data, positions = load_yaml_file(config)
            data = data or {}
            if not isinstance(data, dict):
                raise ValueError(f"{config}: expected a mapping with 'interval' and 'checks'")
            data.setdefault("checks", [])
        for kind, values in (("sql", sql), ("redis", redis), ("http", http), ("command", command)):
            data["checks"] += [{kind: v} for v in values]
        if interval is not None:
            data["interval"] = interval
        cfg = HealthConfig.model_validate(data)
    except ValidationError as exc:  # checks from flags have no place: the file's name alone
        log(str(validation_problems(exc, str(config or "flags"), positions, HealthConfig)))
        raise typer.Exit(2) from None
    except ValueError as exc:
        log(str(exc))
        raise typer.Exit(2) from None

    async def main() -> None:
        monitor = HealthMonitor(list(cfg.checks), cfg.interval)
        routes: dict[str, Handler] = {
            "/readyz": lambda: monitor.report("ready"),
            "/healthz": lambda: monitor.report("live"),
        }
        server = AdminServer(routes, host, port)
        await listening(server.start(), "--port", host, port)
        monitor.start()
        names = ", ".join(CheckConfig.model_validate(c).label for c in cfg.checks)
        log(f"health on {server.url}/healthz and /readyz every {cfg.interval:g} s: {names}")
        stop = stop_event()
        await stop.wait()
        await server.close()
        await monitor.close()

    run_server(main(), log)


# -- metrics ---------------------------------------------------------------------------------


@cli.command(
    epilog=epilog("podkit adapter metrics --redis redis://127.0.0.1:6379/0 --port 9121", docs=DOCS)
)
def metrics(
    redis: Annotated[str | None, typer.Option(help="redis:// URL: INFO.")] = None,
    postgres: Annotated[str | None, typer.Option(help="postgresql:// URL: stats views.")] = None,
    json_url: Annotated[str | None, typer.Option("--json", help="JSON stats URL.")] = None,
    mapping: Annotated[Path | None, typer.Option(help="YAML mapping for --json.")] = None,
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 9187,
    timeout: Annotated[float, typer.Option(help="Seconds to read the app per scrape.")] = 5.0,
) -> None:
    """Serve an app's native stats as Prometheus metrics on /metrics."""
    from pydantic import ValidationError

    from podkit.adapter.metrics import (
        Exporter,
        JSONMapping,
        JSONSource,
        PostgresSource,
        RedisSource,
        Source,
    )
    from podkit.net.listen import ListenError, listening, run_server
    from podkit.observe.admin import AdminServer, Handler
    from podkit.yamlpos import load_yaml_file, validation_problems

    given = [x for x in (redis, postgres, json_url) if x]
    if len(given) != 1:
        log("give exactly one of --redis, --postgres or --json")
        raise typer.Exit(2)
    if json_url and mapping is None:
        log("--json needs --mapping FILE (which values become which metrics)")
        raise typer.Exit(2)
    loaded: JSONMapping | None = None
    if mapping is not None:
        try:
            data, positions = load_yaml_file(mapping)
            loaded = JSONMapping.model_validate(data)
        except ValidationError as exc:
            log(str(validation_problems(exc, str(mapping), positions, JSONMapping)))
            raise typer.Exit(2) from None
        except ValueError as exc:
            log(str(exc))
            raise typer.Exit(2) from None

    async def main() -> None:
        source: Source
        if redis:
            source = RedisSource(redis, timeout)
        elif postgres:
            source = PostgresSource(postgres, timeout)
        else:
            assert json_url and loaded is not None
            source = JSONSource(json_url, loaded, timeout)
        exporter = Exporter(source, timeout)
        reported: list[str | None] = [None]

        async def scrape() -> tuple[int, Any]:
            text = await exporter.scrape()
            if exporter.last_error != reported[0]:  # say it once, not at every scrape
                reported[0] = exporter.last_error
                log(f"cannot read {source.name}: {exporter.last_error}" if exporter.last_error
                    else f"reading {source.name} again")  # fmt: skip
            return 200, text

        routes: dict[str, Handler] = {"/metrics": scrape}
        server = AdminServer(routes, host, port)
        try:
            await listening(server.start(), "--port", host, port)
        except ListenError:
            await source.close()
            raise
        log(f"metrics of {source.name} on {server.url}/metrics")
        stop = stop_event()
        await stop.wait()
        await server.close()
        await source.close()

    run_server(main(), log)
