"""The ambassador pattern as podkit's system sees it: `podkit ambassador` and its
components."""

from podkit.contract import Component, Pattern

PATTERN = Pattern(
    name="ambassador",
    cli="podkit.ambassador.component:cli",
    components=(
        Component("ambassador.split", ("ambassador", "split")),
        Component("ambassador.broker", ("ambassador", "broker")),
    ),
)
