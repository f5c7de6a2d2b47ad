"""One assigned instance on a slave: start it, restart it when it ends, stop it on request."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import structlog

from gdpm.common.models import Assignment, InstanceState, InstanceStatus, utc_now
from gdpm.slave.lifecycle import Lifecycle
from gdpm.slave.process import ChildProcess, spawn_shell

log = structlog.get_logger("gdpm.slave.instance")

# Delay before the first restart of an instance that ended on its own, in seconds. It
# doubles with each quick failure up to RESTART_DELAY_MAX, and resets once a run has
# lasted STABLE_RUN seconds.
RESTART_DELAY_FIRST = 1.0
RESTART_DELAY_MAX = 30.0
STABLE_RUN = 10.0


class ProcessTracker(Protocol):
    """Records every process group the slave starts, to clean up after a slave crash."""

    def started(self, child: ChildProcess, instance_id: str) -> None: ...

    def ended(self, child: ChildProcess) -> None: ...


@dataclass(frozen=True)
class RunSettings:
    """Slave-wide settings every instance uses."""

    node_id: str
    log_dir: Path
    stop_timeout: float
    base_env: dict[str, str]
    tracker: ProcessTracker


class InstanceRunner:
    """Runs one instance until :meth:`request_stop`, restarting it when it ends.

    ``publish`` receives each new status; the slave sends it to etcd.
    """

    def __init__(self, assignment: Assignment, settings: RunSettings,
                 publish: Callable[[InstanceStatus], None]) -> None:
        self.assignment = assignment
        self.settings = settings
        self.publish = publish
        self.lifecycle = Lifecycle()
        self.child: ChildProcess | None = None
        self.restarts = 0
        self.exit_code: int | None = None
        self.exit_signal: int | None = None
        self.started_at: datetime | None = None
        self.exited_at: datetime | None = None
        self._stop_requested = asyncio.Event()
        self.log = log.bind(instance_id=assignment.instance_id, service_id=assignment.service_id)

    @property
    def instance_id(self) -> str:
        return self.assignment.instance_id

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    def request_stop(self) -> None:
        self._stop_requested.set()

    def kill_now(self) -> None:
        """SIGKILL the instance's process group at once and stop restarting it (fencing)."""
        self._stop_requested.set()
        if self.child is not None and self.child.returncode is None:
            self.child.signal_group(signal.SIGKILL)

    def status(self) -> InstanceStatus:
        return InstanceStatus(
            instance_id=self.instance_id, service_id=self.assignment.service_id,
            node_id=self.settings.node_id, state=self.lifecycle.state,
            pid=self.child.pid if self.child and self.child.returncode is None else None,
            exit_code=self.exit_code, exit_signal=self.exit_signal, restarts=self.restarts,
            started_at=self.started_at, exited_at=self.exited_at,
        )

    async def run(self) -> None:
        """Start, wait, restart with backoff, until a stop is requested; then stop."""
        delay = RESTART_DELAY_FIRST
        while not self.stopping:
            ran_for = await self._run_once()
            if self.stopping:
                break
            delay = RESTART_DELAY_FIRST if ran_for >= STABLE_RUN else delay
            pause = delay * random.uniform(0.8, 1.2)
            self.log.info("restarting after backoff", delay=round(pause, 2), restarts=self.restarts)
            if await self._stop_within(pause):
                break
            delay = min(delay * 2, RESTART_DELAY_MAX)
            self.restarts += 1

    async def _run_once(self) -> float:
        """Run the command once; return how long it ran, in seconds."""
        self._move(InstanceState.STARTING)
        try:
            self.child = self._spawn()
        except OSError as error:
            self.log.error("spawn failed", error=str(error))
            self.exit_code, self.exit_signal, self.exited_at = 127, None, utc_now()
            self._move(InstanceState.EXITED)
            return 0.0

        self.settings.tracker.started(self.child, self.instance_id)
        self.started_at = utc_now()
        self.exit_code = self.exit_signal = self.exited_at = None
        self._move(InstanceState.RUNNING)
        self.log.info("spawned", pid=self.child.pid, command=_shorten(self.assignment.command))
        try:
            await self._wait_exit_or_stop()
        finally:
            self.settings.tracker.ended(self.child)
        self._record_exit(self.child.returncode)
        return (self.exited_at - self.started_at).total_seconds()

    async def _wait_exit_or_stop(self) -> None:
        """Wait until the leader exits or a stop is requested; leave no process of the group."""
        exited = asyncio.ensure_future(self.child.wait())
        stop = asyncio.ensure_future(self._stop_requested.wait())
        await asyncio.wait([exited, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not exited.done():
            self._move(InstanceState.STOPPING)
            self.log.info("stopping", pid=self.child.pid, timeout=self.settings.stop_timeout)
        # After the leader exited on its own, this stops what it left in its group, so
        # a restart does not run next to the previous run's children.
        await asyncio.shield(self.child.stop(timeout=self.settings.stop_timeout))
        await exited

    def _spawn(self) -> ChildProcess:
        assignment = self.assignment
        env = dict(self.settings.base_env)
        env.update(
            GDPM_SERVICE_ID=assignment.service_id,
            GDPM_INSTANCE_ID=assignment.instance_id,
            GDPM_INSTANCE_INDEX=str(assignment.index),
            GDPM_NODE_ID=self.settings.node_id,
        )
        log_dir = self.settings.log_dir
        return spawn_shell(
            assignment.command, env=env, cwd=None,
            stdout_path=log_dir / f"{assignment.instance_id}.stdout.log",
            stderr_path=log_dir / f"{assignment.instance_id}.stderr.log",
        )

    def _record_exit(self, returncode: int) -> None:
        self.exited_at = utc_now()
        if returncode < 0:
            self.exit_code, self.exit_signal = None, -returncode
        else:
            self.exit_code, self.exit_signal = returncode, None
        self._move(InstanceState.EXITED)
        self.log.info("exited", pid=self.child.pid if self.child else None,
                      exit_code=self.exit_code, exit_signal=self.exit_signal, stopped=self.stopping)

    async def _stop_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._stop_requested.wait()
            return True
        except TimeoutError:
            return False

    def _move(self, state: InstanceState) -> None:
        self.lifecycle.move(state)
        self.publish(self.status())


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def slave_environment() -> dict[str, str]:
    """Return the environment instances inherit: the slave's own."""
    return dict(os.environ)
