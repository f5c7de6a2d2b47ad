"""Restart decisions: whether and when an instance that ended on its own starts again.

Pure logic, without processes or clocks, so that every rule is unit-tested alone.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass

from gdpm.common.models import RestartPolicy, RunSpec

# Each delay is multiplied by a random factor in this range, so that instances that
# failed together do not all restart at the same moment.
JITTER = (0.8, 1.2)


class Action(enum.Enum):
    RESTART = "restart"
    # The policy does not restart this exit (never, or on-failure after exit code 0).
    DONE = "done"
    # Too many quick failures in a row: stay down until the service is updated.
    FAILED = "failed"


@dataclass(frozen=True)
class Decision:
    action: Action
    delay: float = 0.0
    quick_failures: int = 0


class RestartTracker:
    """Counts quick failures in a row and turns each exit into a Decision.

    A run shorter than ``min_uptime`` is a quick failure, whatever its exit status.
    The delay before restart k of a streak is ``restart_delay * 2**(k-1)``, capped at
    ``restart_delay_max``, with jitter. A run of ``min_uptime`` or more resets the
    streak. After ``max_restarts`` restarts in a streak, the next quick failure makes
    the instance failed; None allows any number.
    """

    def __init__(self, spec: RunSpec, random_factor: Callable[[], float] | None = None) -> None:
        self.spec = spec
        self.quick_failures = 0
        self._random_factor = random_factor or (lambda: random.uniform(*JITTER))

    def after_exit(self, ran_for: float, exit_code: int | None) -> Decision:
        """Decide what follows an exit; ``exit_code`` is None when a signal ended the run."""
        spec = self.spec
        if ran_for >= spec.min_uptime:
            self.quick_failures = 0
        else:
            self.quick_failures += 1

        if spec.restart == RestartPolicy.NEVER:
            return Decision(Action.DONE, quick_failures=self.quick_failures)
        if spec.restart == RestartPolicy.ON_FAILURE and exit_code == 0:
            return Decision(Action.DONE, quick_failures=self.quick_failures)
        if spec.max_restarts is not None and self.quick_failures > spec.max_restarts:
            return Decision(Action.FAILED, quick_failures=self.quick_failures)

        exponent = max(self.quick_failures - 1, 0)
        delay = min(spec.restart_delay * 2 ** min(exponent, 60), spec.restart_delay_max)
        delay = min(delay * self._random_factor(), spec.restart_delay_max)
        return Decision(Action.RESTART, delay=delay, quick_failures=self.quick_failures)
