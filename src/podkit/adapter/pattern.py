"""The adapter pattern as podkit's system sees it: `podkit adapter` and its components."""

from podkit.contract import Component, Pattern

PATTERN = Pattern(
    name="adapter",
    cli="podkit.adapter.component:cli",
    components=(
        Component("adapter.logs", ("adapter", "logs")),
        Component("adapter.health", ("adapter", "health")),
        Component("adapter.metrics", ("adapter", "metrics")),
    ),
)
