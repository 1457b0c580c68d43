"""The `podkit` command: `up`, `validate`, `status`, and one subcommand per component."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from podkit import __version__
from podkit.aio import run_async
from podkit.clihelp import App, epilog

app = App(
    name="podkit",
    help="Patterns for reliable distributed systems: run a spec locally, or its components.",
    no_args_is_help=True,
    epilog=epilog(
        "podkit up examples/quickstart.yaml",
        docs="README.md; podkit COMMAND --help for a command's options",
    ),
)
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        print(f"podkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """podkit: patterns for reliable distributed systems."""


SpecPath = Annotated[Path, typer.Argument(help="The system spec (YAML).")]


def _print_spec_error(exc: Exception) -> None:
    from podkit.system.spec import SpecError

    assert isinstance(exc, SpecError)
    n = len(exc.issues)
    err.print(f"[bold red]{n} problem{'s' if n != 1 else ''} in the spec:[/]", highlight=False)
    for issue in exc.issues:
        err.print(f"  {issue}", highlight=False, markup=False)


@app.command(epilog=epilog("podkit validate examples/quickstart.yaml", docs="docs/spec.md"))
def validate(spec: SpecPath) -> None:
    """Check a spec; print every problem with its file, line and field, exit 2 if any."""
    from podkit.system.spec import SpecError, load_spec

    try:
        loaded = load_spec(spec)
    except SpecError as exc:
        _print_spec_error(exc)
        raise typer.Exit(2) from None
    replicas = sum(p.replicas for p in loaded.pods)
    counts = [(len(loaded.pods), "pod"), (replicas, "replica"), (len(loaded.services), "service")]
    said = ", ".join(f"{n} {word}{'' if n == 1 else 's'}" for n, word in counts)
    out.print(f"{spec}: ok ({said})", highlight=False)


@app.command(epilog=epilog("podkit up examples/quickstart.yaml", docs="docs/spec.md"))
def up(
    spec: SpecPath,
    subnet: Annotated[
        str | None,
        typer.Option(
            help="Loopback network for pod addresses, e.g. 127.42.0.0/16.",
            show_default="a 127.X.0.0/16 picked by the spec's path and name",
        ),
    ] = None,
    admin_port: Annotated[
        int,
        typer.Option(help="Port of /status, /metrics, /healthz, /readyz (0: any free one)."),
    ] = 0,
    admin_host: Annotated[str, typer.Option(help="Address of the admin port.")] = "127.0.0.1",
) -> None:
    """Run every pod of a spec on this machine until Ctrl-C."""
    from podkit.system.spec import SpecError
    from podkit.system.up import run_up

    try:
        code = run_async(run_up(spec, subnet=subnet, admin=(admin_host, admin_port)))
    except SpecError as exc:
        _print_spec_error(exc)
        raise typer.Exit(2) from None
    except RuntimeError as exc:
        err.print(f"[bold red]podkit up:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


@app.command(epilog=epilog("podkit status quickstart", docs="README.md"))
def status(
    name: Annotated[str | None, typer.Argument(help="A system's name; all when omitted.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print raw JSON.")] = False,
) -> None:
    """Show the pods, replicas, readiness, restarts and ports of running systems."""
    import json

    from podkit.system.control import fetch_status, run_dir, running_systems

    systems = [s for s in running_systems() if name is None or s["name"] == name]
    if not systems:
        err.print(f"no running podkit system{f' named {name}' if name else ''} (in {run_dir()})")
        raise typer.Exit(1)
    for info in systems:
        try:
            data = fetch_status(info["control"])
        except OSError as exc:
            err.print(f"{info['name']}: control endpoint {info['control']} did not answer: {exc}")
            continue
        if as_json:
            print(json.dumps(data, indent=2))
            continue
        table = Table(title=f"{data['name']} (pid {data['pid']})")
        for col in ("pod", "ip", "ports", "container", "state", "ready", "restarts", "pid", "why"):
            table.add_column(col)
        for pod in data["pods"]:
            ports = " ".join(f"{n}:{p}" for n, p in pod.get("ports", {}).items()) or "-"
            for c in pod["containers"]:
                table.add_row(
                    pod["name"],
                    pod["ip"],
                    ports,
                    c["name"],
                    c["state"],
                    "yes" if c["ready"] else "no",
                    str(c["restarts"]),
                    str(c["pid"] or "-"),
                    c.get("message") or "",
                )
        out.print(table)
        for svc in data["services"]:
            eps = ", ".join(svc["endpoints"]) or "no ready endpoint"
            out.print(f"service {svc['name']}: {svc['url']} -> {eps}", highlight=False)


def _where(spec: Path, loc: tuple[str | int, ...]) -> str:
    """'file:line:col: field.path' for a field of a spec file (the field alone if unknown)."""
    from podkit.yamlpos import format_path, load_with_positions, nearest_position

    where = str(spec)
    if loc and loc[0] != "--kube-version":
        try:
            _, positions = load_with_positions(spec.read_text(encoding="utf-8"))
            pos = nearest_position(positions, loc)
        except Exception:
            pos = None
        if pos is not None:
            where += f":{pos.line}:{pos.column}"
    return f"{where}: {format_path(loc)}"


ManifestDir = Annotated[
    Path | None,
    typer.Option("-o", "--output", help="Write one file per object here.", show_default="stdout"),
]
Namespace = Annotated[
    str | None,
    typer.Option(
        "--namespace", help="Namespace of every object.", show_default="kubectl's current one"
    ),
]
AppImage = Annotated[
    str | None,
    typer.Option(
        "--image", help="Image for containers that name none.", show_default="the spec's image"
    ),
]
PodkitImage = Annotated[
    str | None,
    typer.Option(
        "--podkit-image",
        help="Image that runs podkit's components.",
        show_default="podkit's, this version",
    ),
]


@app.command(
    epilog=epilog("podkit k8s examples/quickstart.yaml -o k8s/ --validate", docs="docs/k8s.md")
)
def k8s(
    spec: SpecPath,
    output: ManifestDir = None,
    namespace: Namespace = None,
    kube_version: Annotated[
        str, typer.Option(help="Target Kubernetes version (native sidecars from 1.29).")
    ] = "1.33",
    autoscaler: Annotated[
        str, typer.Option(help="hpa (external metric) or keda (ScaledObject).")
    ] = "hpa",
    with_backends: Annotated[
        bool, typer.Option(help="Add Redis, NATS and etcd StatefulSets and their Secret.")
    ] = False,
    image: AppImage = None,
    podkit_image: PodkitImage = None,
    app_root: Annotated[
        str, typer.Option(help="Where the app image holds the spec's directory.")
    ] = "/app",
    check: Annotated[
        bool, typer.Option("--validate", help="Check every object with kubernetes-validate.")
    ] = False,
) -> None:
    """Render a spec to Kubernetes manifests (YAML on stdout, or files with -o)."""
    from podkit.system.k8s import DEFAULT_PODKIT_IMAGE, RenderError, RenderOptions, render
    from podkit.system.spec import SpecError, load_spec

    if autoscaler not in ("hpa", "keda"):
        err.print(f"--autoscaler {autoscaler!r}: expected hpa or keda", highlight=False)
        raise typer.Exit(2)
    try:
        loaded = load_spec(spec)
    except SpecError as exc:
        _print_spec_error(exc)
        raise typer.Exit(2) from None
    options = RenderOptions(
        namespace=namespace,
        kube_version=kube_version,
        autoscaler="keda" if autoscaler == "keda" else "hpa",
        with_backends=with_backends,
        image=image,
        podkit_image=podkit_image or DEFAULT_PODKIT_IMAGE,
        app_root=app_root,
    )
    try:
        rendered = render(loaded, options)
    except RenderError as exc:
        n = len(exc.problems)
        err.print(f"[bold red]{n} field{'s' if n != 1 else ''} cannot be rendered:[/]")
        for p in exc.problems:
            err.print(f"  {_where(spec, p.loc)}: {p.message}", highlight=False, markup=False)
        raise typer.Exit(2) from None
    for w in rendered.warnings:
        err.print(f"warning: {_where(spec, w.loc)}: {w.message}", highlight=False, markup=False)
    if check:
        from podkit.system.k8s import validate_objects

        failures = validate_objects(rendered.objects, kube_version)
        for failure in failures:
            err.print(f"invalid: {failure}", highlight=False, markup=False)
        if failures:
            raise typer.Exit(1)
    if output is not None:
        files = rendered.write(output)
        err.print(f"wrote {len(files)} files to {output}", highlight=False)
    else:
        print(rendered.yaml(), end="")
    if rendered.secret:
        from podkit.system.k8s import shell_hint

        err.print(
            f"before applying, create the Secret with the backend URLs:\n  "
            f"{shell_hint(rendered, loaded)}",
            highlight=False,
            markup=False,
        )


@functools.cache  # once: `main` and the tests of the help both ask for them
def _register_components() -> None:
    """Mount each pattern's commands: an app of one command and no callback as that
    command (`podkit lb --listen ...`), any other as a group (`podkit queue work ...`)."""
    from podkit.system.components import command_app, commands

    for command, target in commands().items():
        sub = command_app(target)
        if sub.registered_callback is None and len(sub.registered_commands) == 1:
            info = copy.copy(sub.registered_commands[0])
            info.name = command
            app.registered_commands.append(info)
        else:
            app.add_typer(sub, name=command)


def open_standard_fds() -> None:
    """Open /dev/null on each of descriptors 0-2 that was left closed (`cmd <&-`), so
    that no descriptor of podkit's own (an event loop's) takes one of those numbers:
    uvloop aborts the process when it closes such a descriptor."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one


def main() -> None:
    open_standard_fds()
    _register_components()
    app()


if __name__ == "__main__":
    main()
