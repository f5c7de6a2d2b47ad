"""Unit tests of the restart rules."""

from gdpm.common.models import RunSpec
from gdpm.slave.restarts import Action, RestartTracker


def tracker(**settings) -> RestartTracker:
    return RestartTracker(RunSpec(command="x", **settings), random_factor=lambda: 1.0)


def test_backoff_doubles_to_cap():
    restarts = tracker(restart_delay=1, restart_delay_max=60, max_restarts=None)
    delays = [restarts.after_exit(0.1, 1).delay for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_stable_run_resets_backoff():
    restarts = tracker(min_uptime=10)
    restarts.after_exit(0.1, 1)
    restarts.after_exit(0.1, 1)
    decision = restarts.after_exit(30, 1)
    assert decision.action is Action.RESTART
    assert decision.delay == 1
    assert restarts.quick_failures == 0


def test_failed_after_max_restarts():
    restarts = tracker(max_restarts=2)
    actions = [restarts.after_exit(0.1, 1).action for _ in range(3)]
    assert actions == [Action.RESTART, Action.RESTART, Action.FAILED]


def test_on_failure_policy():
    restarts = tracker(restart="on-failure")
    assert restarts.after_exit(0.1, 0).action is Action.DONE
    assert restarts.after_exit(0.1, 3).action is Action.RESTART
    assert restarts.after_exit(0.1, None).action is Action.RESTART


def test_never_policy():
    restarts = tracker(restart="never")
    assert restarts.after_exit(0.1, 3).action is Action.DONE
    assert restarts.after_exit(100, 0).action is Action.DONE


def test_jitter_stays_under_cap():
    restarts = RestartTracker(RunSpec(command="x", restart_delay=50, restart_delay_max=60),
                              random_factor=lambda: 1.2)
    assert restarts.after_exit(0.1, 1).delay == 60
