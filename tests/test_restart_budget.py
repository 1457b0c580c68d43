"""The worker supervisor's restart budget, on a clock the test moves."""

from __future__ import annotations

from podkit.net.proxy.workers import RestartBudget


def test_restarts_past_the_limit_within_the_window_are_refused() -> None:
    now = [0.0]
    budget = RestartBudget(3, window=10.0, now=lambda: now[0])
    assert [budget.allow() for _ in range(3)] == [True, True, True]
    now[0] = 9.9  # the first three are still inside the window
    assert budget.allow() is False


def test_restarts_spread_wider_than_the_window_go_on_forever() -> None:
    now = [0.0]
    budget = RestartBudget(2, window=10.0, now=lambda: now[0])
    for _ in range(50):
        assert budget.allow()
        now[0] += 5.0  # two per window, never three
