"""The load-balancer pattern as podkit's system sees it: `podkit lb` and `lb:`."""

from podkit.contract import Pattern
from podkit.lb.hooks import LBHook

PATTERN = Pattern(name="lb", cli="podkit.lb.component:cli", service_hooks=(LBHook(),))
