"""Workers that are not Python functions: a command, or an HTTP endpoint.

A command gets the item as an argument (`{}` in the template; appended when the template
has no placeholder at all), in a file
(`{file}`), or as JSON on stdin; exit code 0 acks it, any other code fails it (retried,
then dead-lettered) with the end of its stderr as the error. Its stdout is its result,
and in a chain the next step's item.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import tempfile
from pathlib import PurePath
from typing import Any, Literal

from podkit.aio import wait_for
from podkit.net.client import ClientError, HTTPClient
from podkit.proc import parent_death_signal, signal_group

Mode = Literal["arg", "stdin", "file"]
PLACEHOLDERS = ("{}", "{name}", "{stem}", "{suffix}", "{parent}", "{file}")


class HandlerFailed(Exception):
    """The command or endpoint refused the item; the message says how."""


def _text(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, bytes):
        return item.decode(errors="replace")
    return json.dumps(item, separators=(",", ":"))


def render(template: list[str], item: Any, file: str | None = None) -> list[str]:
    """Fill `{}` (the item), `{name}`, `{stem}`, `{suffix}`, `{parent}` (the item as a
    path) and `{file}` (a file holding the item) into each word of the command."""
    text = _text(item)
    path = PurePath(text) if text and "\n" not in text else PurePath("item")
    fields = {
        "name": path.name,
        "stem": path.stem,
        "suffix": path.suffix,
        "parent": str(path.parent),
        "file": file or "",
    }
    out = []
    for word in template:
        word = word.replace("{}", text)
        for key, value in fields.items():
            word = word.replace("{" + key + "}", value)
        out.append(word)
    return out


def output(raw: bytes) -> Any:
    """A command's result: its stdout as JSON when it parses, else as stripped text."""
    text = raw.decode(errors="replace").strip()
    try:
        return json.loads(text)
    except ValueError:
        return text


class ExecHandler:
    """Runs a command per item (in its own process group, killed on timeout)."""

    def __init__(
        self,
        command: str | list[str],
        *,
        mode: Mode = "arg",
        timeout: float | None = None,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.template = shlex.split(command) if isinstance(command, str) else list(command)
        if not self.template:
            raise ValueError("the command is empty")
        self.mode = mode
        self.timeout = timeout
        self.env = env
        self.cwd = cwd

    async def __call__(self, item: Any) -> Any:
        """Run the command for `item`; its stdout (JSON when it parses) is the result."""
        tmp: str | None = None
        try:
            if self.mode == "file":
                fd, tmp = tempfile.mkstemp(prefix="podkit-item-")
                with os.fdopen(fd, "wb") as f:
                    f.write(item if isinstance(item, bytes) else _text(item).encode())
            argv = render(self.template, item, tmp)
            if self.mode == "arg" and not any(
                f in w for w in self.template for f in PLACEHOLDERS
            ):  # no placeholder at all: the item goes last, as with xargs
                argv.append(_text(item))
            stdin = json.dumps(item).encode() if self.mode == "stdin" else None
            return await self._run(argv, stdin)
        finally:
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)

    async def _run(self, argv: list[str], stdin: bytes | None) -> Any:
        env = None if self.env is None else {**os.environ, **self.env}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=self.cwd,
                start_new_session=True,
                preexec_fn=parent_death_signal(signal.SIGKILL),
            )
        except OSError as exc:
            raise HandlerFailed(f"cannot run {argv[0]!r}: {exc.strerror}") from None
        try:
            out, err = await wait_for(proc.communicate(stdin), self.timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            signal_group(proc.pid, signal.SIGKILL)
            await proc.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise HandlerFailed(f"{argv[0]} timed out after {self.timeout}s") from None
        if proc.returncode != 0:
            tail = err.decode(errors="replace").strip()[-1000:]
            raise HandlerFailed(f"{argv[0]} exited with {proc.returncode}: {tail}")
        return output(out)


class HTTPHandler:
    """POSTs each item as JSON to `url`; a 2xx status acks it, anything else fails it."""

    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.url = url
        self.timeout = timeout
        self._client = HTTPClient(timeout=timeout)

    async def __call__(self, item: Any) -> Any:
        body = item if isinstance(item, bytes) else json.dumps(item).encode()
        try:
            resp = await self._client.post(
                self.url, body, headers=[(b"Content-Type", b"application/json")]
            )
        except (ClientError, TimeoutError) as exc:
            raise HandlerFailed(f"POST {self.url} failed: {exc}") from None
        text = resp.text()
        if resp.status // 100 != 2:
            raise HandlerFailed(f"POST {self.url} answered {resp.status}: {text[-500:]}")
        try:
            return json.loads(text)
        except ValueError:
            return text

    async def close(self) -> None:
        await self._client.close()
