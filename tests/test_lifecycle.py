"""Unit tests of the instance state machine."""

import pytest

from gdpm.common.models import InstanceState as S
from gdpm.slave.lifecycle import IllegalTransition, Lifecycle


def test_crash_loop_path():
    lifecycle = Lifecycle()
    for state in [S.STARTING, S.RUNNING, S.EXITED, S.BACKOFF, S.STARTING, S.RUNNING, S.EXITED, S.FAILED,
                  S.STARTING, S.RUNNING, S.STOPPING, S.EXITED]:
        lifecycle.move(state)
    assert lifecycle.state is S.EXITED


@pytest.mark.parametrize("start, illegal", [
    ([], S.RUNNING),
    ([S.STARTING, S.RUNNING], S.BACKOFF),
    ([S.STARTING, S.RUNNING, S.STOPPING], S.RUNNING),
    ([S.STARTING, S.RUNNING, S.EXITED, S.FAILED], S.RUNNING),
])
def test_illegal_transition_rejected(start, illegal):
    lifecycle = Lifecycle()
    for state in start:
        lifecycle.move(state)
    with pytest.raises(IllegalTransition):
        lifecycle.move(illegal)
    assert lifecycle.state is (start[-1] if start else S.PENDING)
