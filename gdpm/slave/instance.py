"""One assigned instance on a slave: start it, restart it by its policy, stop it on request."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Protocol, TypeVar

import structlog

from gdpm.common.models import Assignment, InstanceState, InstanceStatus, utc_now
from gdpm.slave.lifecycle import Lifecycle
from gdpm.slave.process import ChildProcess, spawn_shell
from gdpm.slave.logs import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, STREAMS, LogSink
from gdpm.slave.restarts import Action, RestartTracker

log = structlog.get_logger("gdpm.slave.instance")

# Seconds to keep reading an instance's output after its processes are gone.
LOG_DRAIN_TIMEOUT = 1.0


# Seconds of spawning allowed in one pass of the event loop. A burst of assignments
# makes every runner ready at once, and asyncio runs all ready callbacks of a pass
# before it looks at timers and sockets again. In a benchmark, 5000 spawns of about
# 2 ms each held the loop for 10 s, past the fence deadline, so the slave killed them all.
SPAWN_BUDGET_PER_PASS = 0.05

T = TypeVar("T")


class SpawnQueue:
    """Runs the spawns of a burst in order, for at most ``budget`` seconds per pass of the event loop.

    One task takes the queued spawns one after the other. Once a pass has spent its
    budget, it yields, so that timers (the lease refresh) and sockets (etcd, the API)
    run before the next spawn. A runner waits on its own future and wakes only once
    its spawn is done: with 1000 queued, a pass costs the spawns it makes, not a
    wake-up of every runner still waiting.
    """

    def __init__(self, budget: float = SPAWN_BUDGET_PER_PASS) -> None:
        self.budget = budget
        self._queue: deque[tuple[Callable[[], object], asyncio.Future]] = deque()
        self._task: asyncio.Task | None = None

    async def run(self, spawn: Callable[[], T]) -> T:
        """Queue ``spawn``, call it in turn, and return what it returns or raise what it raises.

        If the caller is cancelled before its turn, ``spawn`` is not called.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.append((spawn, future))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain(), name="spawn-queue")
        return await future

    async def _drain(self) -> None:
        while self._queue:
            pass_start = time.monotonic()
            while self._queue and time.monotonic() - pass_start < self.budget:
                spawn, future = self._queue.popleft()
                if future.done():
                    continue  # Its caller was cancelled.
                try:
                    future.set_result(spawn())
                except Exception as error:  # noqa: BLE001 - handed to the caller, who handles it
                    future.set_exception(error)
            await asyncio.sleep(0)


_spawn_queue = SpawnQueue()


class ProcessTracker(Protocol):
    """Records every process group the slave starts, to clean up after a slave crash."""

    def started(self, child: ChildProcess, instance_id: str) -> None: ...

    def ended(self, child: ChildProcess) -> None: ...


@dataclass(frozen=True)
class RunSettings:
    """Slave-wide settings every instance uses."""

    node_id: str
    log_dir: Path
    base_env: dict[str, str]
    tracker: ProcessTracker
    # Receives (service_id, instance_id, event type, message) for the service's history.
    emit: Callable[[str, str, str, str], None]
    # Size at which a log file is rotated, and rotated files kept per stream.
    log_max_bytes: int = DEFAULT_MAX_BYTES
    log_backups: int = DEFAULT_BACKUPS


class InstanceRunner:
    """Runs one instance until :meth:`request_stop`, restarting it as its restart policy decides.

    ``publish`` receives each new status; the slave sends it to etcd. An instance that
    its policy does not restart, or that failed, waits until :meth:`rearm` (an update
    of the service) or a stop.
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
        self.restart_at: datetime | None = None
        self._stop_requested = asyncio.Event()
        self._rearmed = asyncio.Event()
        # Set by fencing: the stop then SIGKILLs everything at once.
        self._kill = False
        self.sinks = {
            stream: LogSink(settings.log_dir, assignment.instance_id, stream,
                            max_bytes=settings.log_max_bytes, backups=settings.log_backups)
            for stream in STREAMS
        }
        self.log = log.bind(instance_id=assignment.instance_id, service_id=assignment.service_id)

    @property
    def instance_id(self) -> str:
        return self.assignment.instance_id

    @property
    def stopping(self) -> bool:
        return self._stop_requested.is_set()

    def request_stop(self) -> None:
        self._stop_requested.set()
        child = self.child
        if child is not None and child.returncode is None and not self._kill:
            # Begun here rather than in _wait_exit_or_stop, a few loop iterations later,
            # which then waits for this same stop.
            child.begin_stop(stop_signal=signal.Signals[self.assignment.stop_signal],
                             timeout=self.assignment.stop_timeout)

    def rearm(self, assignment: Assignment) -> None:
        """Take a newer assignment with the same run settings.

        An instance that failed, or that its policy did not restart, starts again.
        """
        self.assignment = assignment
        self._rearmed.set()

    def kill_now(self) -> None:
        """SIGKILL the instance's process group at once and stop restarting it (fencing)."""
        self._kill = True
        self._stop_requested.set()
        if self.child is not None and self.child.returncode is None:
            self.child.signal_group(signal.SIGKILL)

    def status(self) -> InstanceStatus:
        return InstanceStatus(
            instance_id=self.instance_id, service_id=self.assignment.service_id,
            node_id=self.settings.node_id, state=self.lifecycle.state,
            pid=self.child.pid if self.child and self.child.returncode is None else None,
            exit_code=self.exit_code, exit_signal=self.exit_signal, restarts=self.restarts,
            started_at=self.started_at, exited_at=self.exited_at, restart_at=self.restart_at,
        )

    # -- the run loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Start, wait, decide by the restart policy, until a stop is requested."""
        try:
            await self._supervise()
        finally:
            for sink in self.sinks.values():
                sink.close()

    async def _supervise(self) -> None:
        tracker = RestartTracker(self.assignment)
        while not self.stopping:
            ran_for = await self._run_once()
            if self.stopping:
                break
            decision = tracker.after_exit(ran_for, self.exit_code)
            if decision.action is Action.RESTART:
                if await self._back_off(decision.delay):
                    break
                self.restarts += 1
                continue

            if decision.action is Action.FAILED:
                self._move(InstanceState.FAILED)
                self.log.error("gave up", quick_failures=decision.quick_failures)
                self._emit("failed", f"failed after {decision.quick_failures} quick failures in a row; "
                                     "update the service to start it again")
            if not await self._wait_for_rearm():
                break
            tracker = RestartTracker(self.assignment)
            self.restarts += 1

    async def _run_once(self) -> float:
        """Run the command once and return how long it ran, in seconds."""
        self.restart_at = None
        # An update that arrives from now on starts the instance again if it finishes.
        self._rearmed.clear()
        self._move(InstanceState.STARTING)
        try:
            # None: a stop came while the spawn was queued.
            self.child = await _spawn_queue.run(lambda: None if self.stopping else self._spawn())
        except OSError as error:
            for sink in self.sinks.values():
                sink.close()
            self.log.error("spawn failed", error=str(error))
            self._emit("spawn-failed", f"spawn failed: {error}")
            self.exit_code, self.exit_signal, self.exited_at = 127, None, utc_now()
            self._move(InstanceState.EXITED)
            return 0.0
        if self.child is None:
            self._move(InstanceState.EXITED)
            return 0.0

        self.settings.tracker.started(self.child, self.instance_id)
        self.started_at = utc_now()
        self.exit_code = self.exit_signal = self.exited_at = None
        self._move(InstanceState.RUNNING)
        self.log.info("spawned", pid=self.child.pid, command=_shorten(self.assignment.command))
        self._emit("started", f"started with pid {self.child.pid}")
        try:
            await self._wait_exit_or_stop()
        finally:
            self.settings.tracker.ended(self.child)
        self._record_exit(self.child.returncode)
        # The group is gone, so the pipes reach EOF at once. A daemon that the stop could
        # not trace may keep them open, so reading stops after LOG_DRAIN_TIMEOUT.
        await asyncio.gather(*(sink.drain(LOG_DRAIN_TIMEOUT) for sink in self.sinks.values()))
        return (self.exited_at - self.started_at).total_seconds()

    async def _wait_exit_or_stop(self) -> None:
        """Wait until the leader exits or a stop is requested; leave no process of the group."""
        exited = asyncio.ensure_future(self.child.wait())
        stop = asyncio.ensure_future(self._stop_requested.wait())
        await asyncio.wait([exited, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        stop_signal = signal.Signals[self.assignment.stop_signal]
        timeout = self.assignment.stop_timeout
        if self._kill:
            stop_signal, timeout = signal.SIGKILL, 0.0
        if not exited.done():
            self._move(InstanceState.STOPPING)
            self.log.info("stopping", pid=self.child.pid, signal=stop_signal.name, timeout=timeout)
        # After the leader exited on its own, this stops what it left in its group, so
        # a restart does not run next to the previous run's children.
        await asyncio.shield(self.child.stop(stop_signal=stop_signal, timeout=timeout))
        await exited

    def _spawn(self) -> ChildProcess:
        assignment = self.assignment
        env = dict(self.settings.base_env)
        env.update(assignment.env)
        env.update(
            GDPM_SERVICE_ID=assignment.service_id,
            GDPM_INSTANCE_ID=assignment.instance_id,
            GDPM_INSTANCE_INDEX=str(assignment.index),
            GDPM_NODE_ID=self.settings.node_id,
        )
        marker = f"GDPM_INSTANCE_ID={assignment.instance_id}".encode()
        stdout = self.sinks["stdout"].open_pipe()
        stderr = self.sinks["stderr"].open_pipe()
        try:
            return spawn_shell(assignment.command, env=env, cwd=assignment.cwd,
                               stdout=stdout, stderr=stderr, marker=marker, start_time_now=False)
        finally:
            for sink in self.sinks.values():
                sink.close_write_end()

    def _record_exit(self, returncode: int) -> None:
        self.exited_at = utc_now()
        if returncode < 0:
            self.exit_code, self.exit_signal = None, -returncode
            how = f"killed by {_signal_name(-returncode)}"
        else:
            self.exit_code, self.exit_signal = returncode, None
            how = f"exited with code {returncode}"
        self._move(InstanceState.EXITED)
        self.log.info("exited", pid=self.child.pid if self.child else None,
                      exit_code=self.exit_code, exit_signal=self.exit_signal, stopped=self.stopping)
        self._emit("stopped" if self.stopping else "exited", f"pid {self.child.pid} {how}")

    # -- waiting between runs ------------------------------------------------------------

    async def _back_off(self, delay: float) -> bool:
        """Wait ``delay`` seconds in BACKOFF; return True if a stop came first."""
        self.restart_at = utc_now() + timedelta(seconds=delay)
        self._move(InstanceState.BACKOFF)
        self.log.info("backing off", delay=round(delay, 2), restarts=self.restarts)
        self._emit("backoff", f"restarting in {delay:.1f} s")
        try:
            async with asyncio.timeout(delay):
                await self._stop_requested.wait()
            return True
        except TimeoutError:
            return False

    async def _wait_for_rearm(self) -> bool:
        """Wait for an update of the service (True) or a stop (False)."""
        rearmed = asyncio.ensure_future(self._rearmed.wait())
        stop = asyncio.ensure_future(self._stop_requested.wait())
        await asyncio.wait([rearmed, stop], return_when=asyncio.FIRST_COMPLETED)
        rearmed.cancel()
        stop.cancel()
        return not self.stopping

    # -- reporting -----------------------------------------------------------------------

    def _move(self, state: InstanceState) -> None:
        self.lifecycle.move(state)
        self.publish(self.status())

    def _emit(self, event_type: str, message: str) -> None:
        self.settings.emit(self.assignment.service_id, self.instance_id, event_type, message)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def slave_environment() -> dict[str, str]:
    """Return the environment instances inherit: the slave's own."""
    return dict(os.environ)
