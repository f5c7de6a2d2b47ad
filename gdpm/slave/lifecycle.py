"""The instance state machine on a slave: the one place where an instance changes state."""

from __future__ import annotations

from gdpm.common.models import InstanceState

# The states an instance may move to from each state. PENDING is where every
# instance begins. After EXITED the restart policy chooses BACKOFF (a restart is due
# later), FAILED (too many quick failures) or nothing (the policy does not restart).
# EXITED -> STARTING and FAILED -> STARTING happen when an update of the service
# starts a finished instance again.
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    InstanceState.PENDING: frozenset({InstanceState.STARTING}),
    InstanceState.STARTING: frozenset({InstanceState.RUNNING, InstanceState.EXITED}),
    InstanceState.RUNNING: frozenset({InstanceState.STOPPING, InstanceState.EXITED}),
    InstanceState.STOPPING: frozenset({InstanceState.EXITED}),
    InstanceState.EXITED: frozenset({InstanceState.BACKOFF, InstanceState.FAILED, InstanceState.STARTING}),
    InstanceState.BACKOFF: frozenset({InstanceState.STARTING}),
    InstanceState.FAILED: frozenset({InstanceState.STARTING}),
    InstanceState.LOST: frozenset(),
}


class IllegalTransition(RuntimeError):
    """A state change that the lifecycle does not allow: a bug in the caller."""


class Lifecycle:
    """The current state of one instance, changed only through :meth:`move`."""

    def __init__(self) -> None:
        self.state = InstanceState.PENDING

    def move(self, new_state: InstanceState) -> InstanceState:
        """Change state, returning the previous one; raise IllegalTransition if not allowed."""
        if new_state not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"instance cannot go from {self.state.value} to {new_state.value}")
        previous, self.state = self.state, new_state
        return previous
