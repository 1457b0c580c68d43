"""The engine's command-line options, shared by the components built on it.

Each is a parameter type for a typer command: the flag and its help are written here
once, and a component takes the option by annotating a parameter with it; the default
stays with the component (`workers: Workers = 1`). They set the `ProxyConfig` fields of
the same names (`podkit.net.proxy.config.proxy_config` checks them).
"""

from __future__ import annotations

from typing import Annotated

import typer

from podkit.net.listen import LISTEN_HELP

Listen = Annotated[str, typer.Option("--listen", help=f"Address to serve on: {LISTEN_HELP}")]
Workers = Annotated[
    int, typer.Option("--workers", help="Worker processes sharing the port (SO_REUSEPORT).")
]
ReusePort = Annotated[
    bool,
    typer.Option(
        "--reuse-port/--shared-socket",
        help="Workers bind their own SO_REUSEPORT socket, or share one accept queue.",
    ),
]
Tries = Annotated[int, typer.Option("--tries", help="Attempts per request when retrying is safe.")]

# -- timeouts, in seconds --------------------------------------------------------------

ConnectTimeout = Annotated[
    float, typer.Option("--connect-timeout", help="Seconds to connect upstream.")
]
UpstreamTimeout = Annotated[
    float,
    typer.Option(
        "--upstream-timeout",
        help="Seconds an upstream may stay silent while answering, per try (504).",
    ),
]
RequestTimeout = Annotated[
    float,
    typer.Option(
        "--request-timeout",
        help="Seconds from a whole request to its answer, all tries (504; 0: none).",
    ),
]
IdleTimeout = Annotated[
    float,
    typer.Option("--idle-timeout", help="Seconds a keep-alive client may idle between requests."),
]
HeaderTimeout = Annotated[
    float, typer.Option("--header-timeout", help="Seconds to receive a request head (408).")
]
BodyTimeout = Annotated[
    float,
    typer.Option("--body-timeout", help="Seconds a request body may pause while it is read (408)."),
]
SendTimeout = Annotated[
    float,
    typer.Option("--send-timeout", help="Seconds a client may leave its answer unread (closed)."),
]
