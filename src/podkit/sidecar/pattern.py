"""The sidecar pattern as podkit's system sees it: `podkit sidecar` and its components."""

from podkit.contract import Component, Pattern

PATTERN = Pattern(
    name="sidecar",
    cli="podkit.sidecar.component:cli",
    components=(
        Component("sidecar.config", ("sidecar", "config")),
        Component("sidecar.tls", ("sidecar", "tls"), serves_tls=True),
    ),
)
