"""A port already taken is one line naming the address and the flag, exit 1, for every
listener podkit opens; and the elector's default port does not collide."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request

import pytest

from support import podkit_error, port_in_use


def _argv(case: str, port: int) -> tuple[list[str], str, str]:
    """The command, who logs, and the flag that names `port`."""
    p = str(port)
    if case == "elect --port":
        return ["elect", "--backend", "memory://b", "--name", "n", "--port", p], "elect", "--port"
    if case == "queue scaler --port":
        return ["queue", "scaler", "--queue", "memory://q", "--port", p], "queue", "--port"
    if case == "queue source http --port":
        return ["queue", "source", "http", "--queue", "memory://q", "--port", p], "queue", "--port"
    if case == "lb --admin-port":
        argv = ["lb", "--upstream", "127.0.0.1:1", "--listen", "127.0.0.1:0", "--admin-port", p]
        return argv, "podkit lb", "--admin-port"
    if case == "lb --listen":
        argv = ["lb", "--upstream", "127.0.0.1:1", "--listen", f"127.0.0.1:{p}"]
        return argv, "podkit lb", "--listen"
    raise ValueError(case)


@pytest.mark.parametrize(
    "case",
    ["elect --port", "queue scaler --port", "queue source http --port", "lb --admin-port",
     "lb --listen"],
)  # fmt: skip
def test_a_port_in_use_is_one_line_naming_address_and_flag(case: str) -> None:
    with port_in_use() as port:
        argv, who, flag = _argv(case, port)
        assert podkit_error(argv) == (
            1, f"{who}: cannot listen on 127.0.0.1:{port} ({flag}): Address already in use"
        )  # fmt: skip


def test_two_electors_on_one_machine_each_get_a_port() -> None:
    """With no --port the elector takes a free port and says which."""
    elect = [sys.executable, "-m", "podkit", "elect", "--backend", "memory://one"]
    procs = [
        subprocess.Popen(
            [*elect, "--name", "job", "--identity", f"c{i}"], stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    try:
        urls = []
        for p in procs:
            assert p.stderr is not None
            line = p.stderr.readline()  # "c0 campaigning for 'job' on http://127.0.0.1:PORT"
            assert "campaigning" in line, line
            urls.append(line.rsplit(" ", 1)[1].strip())
        assert len(set(urls)) == 2
        for url in urls:
            deadline = time.monotonic() + 10
            while True:
                try:
                    with urllib.request.urlopen(url + "/me", timeout=2) as r:
                        assert r.status == 200
                        break
                except OSError:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
