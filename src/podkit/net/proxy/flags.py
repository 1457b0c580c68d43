"""The engine's command-line options, shared by the components built on it.

Each is a parameter type for a typer command: the flag and its help are written here
once, and a component takes the option by annotating a parameter with it; the default
stays with the component (`workers: Workers = 1`). They set the `ProxyConfig` fields of
the same names (`podkit.net.proxy.config.proxy_config` checks them). In a command's help
they show in the groups LISTENING and TIMEOUTS.
"""

from __future__ import annotations

from typing import Annotated

import typer

from podkit.net.listen import LISTEN_HELP

LISTENING = "Listening"  # the groups of a command's help these options show in
TIMEOUTS = "Timeouts and retries"

Listen = Annotated[str, typer.Option("--listen", help=LISTEN_HELP, rich_help_panel=LISTENING)]
Workers = Annotated[
    int,
    typer.Option("--workers", help="Worker processes sharing the port.", rich_help_panel=LISTENING),
]
ReusePort = Annotated[
    bool,
    typer.Option(
        "--reuse-port/--shared-socket",
        help="Each worker binds its own socket (SO_REUSEPORT), or all share one.",
        rich_help_panel=LISTENING,
    ),
]
Tries = Annotated[
    int,
    typer.Option(
        "--tries", help="Attempts per request, if safe to retry.", rich_help_panel=TIMEOUTS
    ),
]

# -- timeouts, in seconds --------------------------------------------------------------

ConnectTimeout = Annotated[
    float,
    typer.Option(
        "--connect-timeout", help="Seconds to connect upstream.", rich_help_panel=TIMEOUTS
    ),
]
UpstreamTimeout = Annotated[
    float,
    typer.Option(
        "--upstream-timeout",
        help="Seconds of upstream silence, per try.",
        rich_help_panel=TIMEOUTS,
    ),
]
RequestTimeout = Annotated[
    float,
    typer.Option(
        "--request-timeout",
        help="Seconds to answer, all tries (0: none).",
        rich_help_panel=TIMEOUTS,
    ),
]
IdleTimeout = Annotated[
    float,
    typer.Option(
        "--idle-timeout",
        help="Seconds a keep-alive client may idle.",
        rich_help_panel=TIMEOUTS,
    ),
]
HeaderTimeout = Annotated[
    float,
    typer.Option(
        "--header-timeout",
        help="Seconds to read a request head (408).",
        rich_help_panel=TIMEOUTS,
    ),
]
BodyTimeout = Annotated[
    float,
    typer.Option(
        "--body-timeout", help="Seconds a request body may pause.", rich_help_panel=TIMEOUTS
    ),
]
SendTimeout = Annotated[
    float,
    typer.Option(
        "--send-timeout",
        help="Seconds an answer may wait unread.",
        rich_help_panel=TIMEOUTS,
    ),
]
