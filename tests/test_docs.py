"""Every example in README.md and docs/ runs here, as written, so a doc that breaks fails.

What is run (docs/spec.md and docs/cli.md are generated from the code and left out):

- a ```python block: as a script, top-level ``await`` allowed (the block is the body of
  an async main, as in ``python -m asyncio``); a block without ``await`` runs as a plain
  script. Its stderr must hold no traceback and no leak report (``Unclosed ...``, a task
  destroyed while pending, a coroutine never awaited).
- a ```sh or ```bash block: command by command, with bash; ``NAME=value`` lines set
  ``$NAME`` for the rest of the block. Each command must exit 0 and print no traceback.
- a ```console block: its ``$ `` lines are the commands; the lines after each are its
  output, matched line by line in order, ``...`` standing for any text.

Where a block runs: a fresh temp dir as its cwd, holding a copy of ``examples/`` (when
the block names it) and ``.venv``, a link to the virtualenv running the tests, whose
``bin`` is first on PATH (``podkit`` is there). ``PODKIT_RUN_DIR`` points into the temp
dir, so ``podkit status`` sees the block's own systems only.

Substitutions, made in the block, the files it is given and the examples it names (a
failure says which were made):

- an address of the SERVERS table below becomes the address of the real server a fixture
  of conftest.py starts (one per session and test worker);
- a port of the PORTS table (the fixed ports the docs write for what they start) becomes
  a free port, the same one wherever the block writes it. So blocks never collide with
  each other, with other tests (pods of the examples listen on 127.x.y.z:8080) or with
  anything else on the machine.

Commands that serve until stopped (the LONG_RUNNING table) start in the background and
run until they print their ready line (or for SETTLE seconds when they have none), stay
up while the rest of the block runs, then get SIGTERM.

Markers: an HTML comment on the lines just above a block.

- ``<!-- expect: exit N -->``: the block's last command exits N (the others 0).
- ``<!-- expect: runs until stopped -->``: a Python block that serves until stopped. It
  must still be running after SETTLE seconds; then it gets SIGTERM, and must end at once
  with 0 (it handled it) or be killed by it.
- ``<!-- not run: REASON -->``: a block that cannot run here (a cluster, Docker). It is
  reported as skipped with its reason: nothing is left out silently.
- ``<!-- file: NAME -->``: the block (in any language) is written to NAME in the temp
  dir of every block of the same doc, its server addresses replaced too.

Every fenced block names its language; a block in another language (yaml, json, text)
is not a command. `test_the_docs_are_all_read` checks both and counts the examples.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest

ROOT = Path(__file__).resolve().parent.parent
GENERATED = {"docs/spec.md", "docs/cli.md"}  # made from the code, checked where made
VENV = Path(sys.prefix)

# The server addresses the docs write, and the fixture whose real server replaces each.
SERVERS = {
    "redis://127.0.0.1:6379": "redis_server",
    "nats://127.0.0.1:4222": "nats_server",
    "etcd://127.0.0.1:2379": "etcd_server",
}

# The ports the docs write for what their examples start (and the upstreams they name).
PORTS = {4040, 6380, 8000, 8001, 8002, 8003, 8080, 8086, 8087, 8090, 8443, 8444, 9000, 9121}
PORTS |= {9001, 9002, 9187, 9901}
# Ports the docs name for servers the examples only point at (never read in the test).
ELSEWHERE = {80, 2379, 3306, 4222, 5432, 6379}
PORTISH = re.compile(
    r"(?:\d:|localhost:|--port\s+|--listen\s+|--admin-port\s+|port=|port:\s*)(\d{2,5})(?![\d.])"
    r"|\"(\d{4,5})\""  # a quoted number in a command line: a port, as often as not
)

# Commands that serve until stopped (pattern, searched in the command), and the line each
# prints once it serves (None: run it for SETTLE seconds).
LONG_RUNNING: list[tuple[str, str | None]] = [
    (r"\bpodkit up\b", r" is ready: try "),
    (r"\bpodkit lb\b", r"^lb: listening on "),
    (r"\bpodkit elect\b", r"^elect: .* campaigning for "),
    (r"\bpodkit queue work\b(?!.*--drain)", r"^queue: working on "),
    (r"\bpodkit queue source dir\b", r"^queue: watching "),
    (r"\bpodkit queue source http\b", r"^queue: POST .* feeds "),
    (r"\bpodkit queue source every\b", r"^queue: tick "),
    (r"\bpodkit queue source redis-list\b", None),
    (r"\bpodkit queue source kv\b", None),
    (r"\bpodkit queue scaler\b", r"^queue: scaler for "),
    (r"\bpodkit sidecar tls\b", r"^sidecar tls: https://"),
    (r"\bpodkit sidecar config\b(?!.*--once)", r"^sidecar config: syncing "),
    (r"\bpodkit ambassador broker\b", r"^ambassador: listening on "),
    (r"\bpodkit ambassador split\b", r"^ambassador split: splitting "),
    (r"\bpodkit adapter logs\b.*--file", r"^adapter: following "),
    (r"\bpodkit adapter logs\b.*\s--\s", None),
    (r"\bpodkit adapter metrics\b", r"^adapter: metrics of "),
    (r"\bpodkit adapter health\b", r"^adapter: health on "),
]
SETTLE = 2.0  # seconds a server without a ready line runs; the longest wait for one
READY_WAIT = 15.0  # seconds to wait for a ready line
COMMAND_TIMEOUT = 30.0  # seconds a command that finishes may take
STOP_WAIT = 10.0  # seconds from SIGTERM to SIGKILL
RUN_LANGUAGES = {"python": "python", "sh": "shell", "bash": "shell", "console": "console"}
MARKERS = {"expect", "not run", "file"}
LEAKS = re.compile(
    r"Traceback \(most recent call last\)|Unclosed |Task was destroyed but it is pending"
    r"|was never awaited|ResourceWarning"
)
MIN_RUN = 25  # the examples there were when this test was written: fewer means lost ones

FENCE = re.compile(r"^( *)(`{3,}|~{3,})\s*([^`\s]*)")
MARKER = re.compile(r"^\s*<!--\s*([a-z ]+):\s*(.*?)\s*-->\s*$")
ASSIGNMENT = re.compile(r"^(?:export\s+)?([A-Za-z_]\w*)=(\S*)(?:\s+#.*)?$")

# Runs one Python block: the file to run, the name its tracebacks give (the doc).
RUNNER = """\
import ast, asyncio, inspect, pathlib, sys, traceback
source, doc = pathlib.Path(sys.argv[1]).read_text(), sys.argv[2]
code = compile(source, doc, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
space = {"__name__": "__main__"}
try:
    if code.co_flags & inspect.CO_COROUTINE:
        asyncio.run(eval(code, space))
    else:
        exec(code, space)
except Exception as exc:  # the traceback from the doc's frame on
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != doc:
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb or exc.__traceback__)
    sys.exit(1)
"""


@dataclass(frozen=True)
class Block:
    """One fenced block of a doc."""

    doc: str  # its path from the repo root
    line: int  # the line of its opening fence, from 1
    lang: str  # the fence's language, "" when it names none
    text: str  # its content, without the indentation of its fence
    markers: tuple[tuple[str, str], ...]  # the HTML comments just above it

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def kind(self) -> str:
        return RUN_LANGUAGES.get(self.lang, "other")

    def marker(self, name: str) -> str | None:
        return dict(self.markers).get(name)


@dataclass
class Command:
    """One command of a shell or console block."""

    line: int  # its first line in the doc
    text: str
    output: list[str]  # a console block's lines shown after it


def doc_paths() -> list[str]:
    docs = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))
    return ["README.md", *(d for d in docs if d not in GENERATED)]


def parse_doc(doc: str) -> list[Block]:
    """The fenced blocks of a Markdown file, with the markers just above each."""
    lines = (ROOT / doc).read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = len(opening[1]), opening[2], opening[3]
        start, body = i, []
        i += 1
        while i < len(lines) and not _closes(lines[i], fence):
            line = lines[i]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
            i += 1
        i += 1
        markers: list[tuple[str, str]] = []
        j = start - 1
        while j >= 0 and (not lines[j].strip() or MARKER.match(lines[j])):
            if found := MARKER.match(lines[j]):
                markers.insert(0, (found[1], found[2]))
            j -= 1
        text = "\n".join(body) + "\n"
        blocks.append(Block(doc, start + 1, lang.lower(), text, tuple(markers)))
    return blocks


def _closes(line: str, fence: str) -> bool:
    stripped = line.strip()
    return stripped.startswith(fence) and not stripped.strip(fence[0])


ALL_BLOCKS = [block for doc in doc_paths() for block in parse_doc(doc)]
EXAMPLES = [b for b in ALL_BLOCKS if b.kind != "other"]
TO_RUN = [b for b in EXAMPLES if b.marker("not run") is None]
NOT_RUN = [b for b in EXAMPLES if b.marker("not run") is not None]


def commands(block: Block) -> list[Command]:
    """A shell block's commands (continuation lines joined, comments and blanks left
    out), or a console block's ``$`` commands with the output shown after each."""
    found: list[Command] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line, number = lines[i], block.line + 1 + i
        i += 1
        if block.kind == "console":
            if not line.startswith("$ "):
                if found and line.strip():
                    found[-1].output.append(line)
                continue
            line = line[2:]
        elif not line.strip() or line.lstrip().startswith("#"):
            continue
        while line.rstrip().endswith("\\") and i < len(lines):
            line = line.rstrip() + "\n" + lines[i]
            i += 1
        found.append(Command(number, line.strip(), []))
    return found


def ready_line(command: str) -> tuple[bool, re.Pattern[str] | None]:
    """Whether a command serves until stopped, and the line it prints once it serves."""
    for pattern, ready in LONG_RUNNING:
        if re.search(pattern, command, re.S):
            return True, re.compile(ready, re.M) if ready else None
    return False, None


def test_the_docs_are_all_read() -> None:
    """Every fenced block names its language, every marker is known and says something,
    and the examples found are not fewer than there were."""
    unnamed = [b.id for b in ALL_BLOCKS if not b.lang]
    assert not unnamed, f"fenced blocks without a language (sh, python, yaml, text...): {unnamed}"
    for block in ALL_BLOCKS:
        for name, value in block.markers:
            assert name in MARKERS, f"{block.id}: unknown marker <!-- {name}: -->"
            assert value, f"{block.id}: <!-- {name}: --> says nothing"
        expect = block.marker("expect")
        if expect is not None:
            assert re.fullmatch(r"exit \d+|runs until stopped", expect), f"{block.id}: {expect}"
    assert len(TO_RUN) >= MIN_RUN, f"only {len(TO_RUN)} examples found in {doc_paths()}"
    for block in TO_RUN + [b for b in ALL_BLOCKS if b.marker("file")]:
        texts = [block.text, *((ROOT / n).read_text() for n in examples_named(block.text))]
        for text in texts:
            for port in (int(a or b) for a, b in PORTISH.findall(text)):
                assert port in PORTS | ELSEWHERE, (
                    f"{block.id}: port {port} is in neither PORTS (what the examples start "
                    f"listens there: a free port replaces it) nor ELSEWHERE"
                )


@pytest.mark.parametrize("block", NOT_RUN, ids=[b.id for b in NOT_RUN])
def test_not_run(block: Block) -> None:
    pytest.skip(f"doc example not run: {block.marker('not run')}")


@pytest.mark.parametrize("block", TO_RUN, ids=[b.id for b in TO_RUN])
def test_example(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    stand = Stand(request)
    text = stand.apply(block.text)
    work = prepare(block, text, tmp_path, stand)
    env = dict(
        os.environ,
        PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        PODKIT_RUN_DIR=str(work / ".run"),
        PYTHONUNBUFFERED="1",
    )
    steps = 1 if block.kind == "python" else len(commands(block))
    request.node.user_properties.append(("doc commands", steps))
    failure = None
    try:
        if block.kind == "python":
            run_python(block, text, work, env)
        else:
            run_shell(block, text, work, env)
    except pytest.fail.Exception as exc:
        if not stand.made:
            raise
        failure = f"{exc.msg}\n(substituted here: {stand.said()})"
    if failure is not None:
        fail(failure)


@dataclass
class Stand:
    """What a block gets in place of the servers and ports its doc writes."""

    request: pytest.FixtureRequest
    made: dict[str, str] = field(default_factory=dict)

    def apply(self, text: str) -> str:
        for written, fixture in SERVERS.items():
            if written in text:
                server = self.request.getfixturevalue(fixture)
                address = f"{written.split(':')[0]}://{server.host}:{server.port}"
                text = text.replace(written, self.made.setdefault(written, address))
        for port in sorted(PORTS):
            written = re.compile(rf"(?<!\d){port}(?!\d)")
            if written.search(text):
                free = self.made.setdefault(str(port), str(free_port()))
                text = written.sub(free, text)
        return text

    def said(self) -> str:
        return ", ".join(f"{doc} is {here}" for doc, here in self.made.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # free on every address, as a wildcard listener needs
        return int(s.getsockname()[1])


def prepare(block: Block, text: str, tmp_path: Path, stand: Stand) -> Path:
    """The block's working dir: .venv, a copy of examples/ when the block names it (the
    ones it names substituted), and the files the doc's ``file:`` blocks hold."""
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(VENV)
    if "examples/" in text:
        shutil.copytree(
            ROOT / "examples",
            work / "examples",
            ignore=shutil.ignore_patterns(".podkit", "__pycache__", "in", "out"),
        )
        for name in examples_named(text):
            (work / name).write_text(stand.apply((ROOT / name).read_text()))
    for other in parse_doc(block.doc):
        if name := other.marker("file"):
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(stand.apply(other.text))
    return work


def examples_named(text: str) -> list[str]:
    return [n for n in re.findall(r"examples/[\w./-]+\.yaml", text) if (ROOT / n).is_file()]


def run_python(block: Block, text: str, work: Path, env: dict[str, str]) -> None:
    script = work / "example.py"
    script.write_text("\n" * block.line + text)  # line numbers as in the doc
    argv = [sys.executable, "-W", "default::ResourceWarning", "-c", RUNNER, str(script)]
    argv.append(str(ROOT / block.doc))
    if block.marker("expect") == "runs until stopped":
        running = start(argv, work, env)
        try:
            deadline = time.monotonic() + SETTLE
            while time.monotonic() < deadline and running.proc.poll() is None:
                time.sleep(0.05)
            if running.proc.poll() is not None:
                fail(
                    f"{block.id}: the Python block exited {running.proc.returncode}; it "
                    f"should run until stopped:\n{running.output()}"
                )
        finally:
            stopped = stop(running)
        check_output(block.id, running.output())
        if not stopped:
            fail(f"{block.id}: still running {STOP_WAIT}s after SIGTERM:\n{running.output()}")
        if running.proc.returncode not in (0, -signal.SIGTERM):
            fail(
                f"{block.id}: exited {running.proc.returncode} on SIGTERM (0, or killed by "
                f"it):\n{running.output()}"
            )
        return
    running = start(argv, work, env)
    wait(block.id, "the Python block", running, expected_exit(block))


def run_shell(block: Block, text: str, work: Path, env: dict[str, str]) -> None:
    steps = commands(Block(block.doc, block.line, block.lang, text, block.markers))
    if not steps:
        fail(f"{block.id}: no command in the block")
    servers: list[tuple[str, Running]] = []
    try:
        for n, step in enumerate(steps):
            where = f"{block.doc}:{step.line}"
            if assignment := ASSIGNMENT.match(step.text):
                env[assignment[1]] = assignment[2].strip("'\"")
                continue
            expected = expected_exit(block) if n == len(steps) - 1 else 0
            serves, ready = ready_line(step.text)
            if serves and expected == 0:
                servers.append((where, serve(where, step.text, work, env, ready)))
                continue
            running = start(["bash", "-o", "pipefail", "-c", step.text], work, env)
            said = wait(where, f"`{step.text}`", running, expected)
            if block.kind == "console":
                match_output(where, step, said)
    finally:
        stuck = [where for where, running in reversed(servers) if not stop(running)]
    for where, running in servers:
        check_output(f"{where} (stopped at the end of the block)", running.output())
    if stuck:
        fail(f"{', '.join(stuck)}: still running {STOP_WAIT}s after SIGTERM")


def expected_exit(block: Block) -> int:
    expect = block.marker("expect") or "exit 0"
    return int(expect.removeprefix("exit ")) if expect.startswith("exit ") else 0


@dataclass
class Running:
    """A process in its own process group, its stdout and stderr in one file."""

    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(argv: list[str], work: Path, env: dict[str, str]) -> Running:
    log = work / f".output-{time.monotonic_ns()}"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return Running(proc, log)


def serve(
    where: str, command: str, work: Path, env: dict[str, str], ready: re.Pattern[str] | None
) -> Running:
    """Start a command that serves until stopped; return once it is ready."""
    running = start(["bash", "-c", command], work, env)
    deadline = time.monotonic() + (READY_WAIT if ready else SETTLE)
    while time.monotonic() < deadline and running.proc.poll() is None:
        if ready and ready.search(running.output()):
            return running
        time.sleep(0.05)
    if running.proc.poll() is not None:
        stop(running)  # what it started, if anything
        fail(
            f"{where}: `{command}` exited {running.proc.returncode}; it should serve until "
            f"stopped:\n{running.output()}"
        )
    if ready:
        stop(running)
        fail(
            f"{where}: `{command}` did not print its ready line ({ready.pattern}) within "
            f"{READY_WAIT}s:\n{running.output()}"
        )
    return running


def wait(where: str, what: str, running: Running, expected: int) -> str:
    """Wait for a process to end; check its exit code and output; return the output."""
    try:
        running.proc.wait(COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(running)
        fail(
            f"{where}: {what} did not finish within {COMMAND_TIMEOUT}s (a command that "
            f"serves until stopped belongs in LONG_RUNNING):\n{running.output()}"
        )
    said = running.output()
    code = running.proc.returncode
    if code != expected:
        fail(f"{where}: {what} exited {code} (expected {expected}):\n{said}")
    check_output(where, said)
    return said


def stop(running: Running) -> bool:
    """SIGTERM to the process group, SIGKILL after STOP_WAIT, then SIGKILL to what the
    group left behind; False if SIGTERM did not stop it."""
    proc, stopped = running.proc, True
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(STOP_WAIT)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            stopped = False
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    return stopped


def fail(message: str) -> NoReturn:
    """Fail with the doc's name and line first, and no traceback of this test's code."""
    pytest.fail(message, pytrace=False)


def check_output(where: str, said: str) -> None:
    if leak := LEAKS.search(said):
        fail(f"{where}: the output says {leak[0]!r}:\n{said}")


def match_output(where: str, step: Command, said: str) -> None:
    """Each line shown must match a line of the output, in order; ``...`` is any text."""
    lines = said.splitlines()
    at = 0
    for shown in step.output:
        pattern = re.compile(".*".join(re.escape(part) for part in shown.strip().split("...")))
        while at < len(lines) and not pattern.fullmatch(lines[at].strip()):
            at += 1
        if at == len(lines):
            fail(f"{where}: `{step.text}` printed no line like {shown.strip()!r}:\n{said}")
        at += 1
