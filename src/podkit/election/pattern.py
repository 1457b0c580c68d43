"""The election pattern as podkit's system sees it: `podkit elect` and `election:`."""

from podkit.contract import Component, Pattern
from podkit.election.hooks import ElectionHook

PATTERN = Pattern(
    name="elect",
    cli="podkit.election.component:cli",
    components=(Component("elect", ("elect",)),),
    pod_hooks=(ElectionHook(),),
)
