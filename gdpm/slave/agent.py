"""The slave process: registers its node, keeps its lease, and runs its assignments.

Start-up goes in steps: kill what a crashed previous run left behind, read or receive
the node id, grant a lease and mark the node alive, then mirror
``assignments/{node_id}/`` and start what it contains. From then on each change to
that prefix starts or stops one instance. When the lease cannot be renewed the slave
fences itself (see :mod:`gdpm.slave.lease`). SIGTERM or SIGINT stops every instance,
revokes the lease and exits.
"""

from __future__ import annotations

import asyncio
import resource
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aetcd.exceptions
import aiohttp
from aiohttp import web
import pydantic
import structlog

from gdpm.common.etcd import Change, Etcd, PrefixMirror
from gdpm.common.keys import KeyLayout
from gdpm.common.models import Assignment, Event, InstanceStatus, utc_now
from gdpm.common.tasks import cancel_and_wait, start_task
from gdpm.slave.guardian import Guardian
from gdpm.slave.instance import InstanceRunner, RunSettings, slave_environment
from gdpm.slave.journal import ProcessJournal
from gdpm.slave.lease import LeaseKeeper
from gdpm.slave.logs import DEFAULT_BACKUPS, DEFAULT_MAX_BYTES, MAX_OPEN_FILES
from gdpm.slave.logserver import build_log_app, start_log_server
from gdpm.slave.process import ChildProcess, become_subreaper
from gdpm.slave.status import StatusWriter

log = structlog.get_logger("gdpm.slave")

# Seconds to wait for the statuses of stopped instances to reach etcd at shutdown.
SHUTDOWN_FLUSH_TIMEOUT = 3.0


@dataclass(frozen=True)
class SlaveConfig:
    master_url: str
    etcd_endpoints: list[tuple[str, int]]
    prefix: str
    state_dir: Path
    name: str
    # None: use the TTL the master sends at registration.
    node_ttl: int | None
    log_host: str = "127.0.0.1"
    log_port: int = 0
    log_advertise_host: str | None = None
    log_max_bytes: int = DEFAULT_MAX_BYTES
    log_backups: int = DEFAULT_BACKUPS


class Slave:
    def __init__(self, config: SlaveConfig) -> None:
        self.config = config
        self.keys = KeyLayout(config.prefix)
        self.etcd = Etcd(config.etcd_endpoints)
        self.node_id = ""
        self.node_ttl = config.node_ttl
        self.log_url: str | None = None
        self.journal = ProcessJournal(config.state_dir / "processes.journal")
        self.guardian: Guardian | None = None
        self.runners: dict[str, InstanceRunner] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        # Assignments that arrived while the previous run of the same instance was stopping.
        self.queued: dict[str, Assignment] = {}
        self.status_writer: StatusWriter | None = None
        self.settings: RunSettings | None = None
        self.lease_keeper: LeaseKeeper | None = None
        self.mirror: PrefixMirror | None = None
        self.mirror_task: asyncio.Task | None = None

    # -- start-up ----------------------------------------------------------------------

    async def register(self) -> None:
        """Get a node id from the master, keeping the one saved by an earlier run."""
        id_file = self.config.state_dir / "node_id"
        saved_id = id_file.read_text().strip() if id_file.exists() else None
        body = {"name": self.config.name, "node_id": saved_id, "log_url": self.log_url}
        url = f"{self.config.master_url}/api/v1/nodes/register"
        node = await _post_with_retry(url, body)
        self.node_id = node["id"]
        if self.node_ttl is None:
            self.node_ttl = int(node["node_ttl"])
        if self.node_id != saved_id:
            id_file.write_text(self.node_id + "\n")
        structlog.contextvars.bind_contextvars(node_id=self.node_id)
        log.info("registered", name=self.config.name, rejoined=saved_id == self.node_id, node_ttl=self.node_ttl)

    def prepare(self, log_dir: Path) -> None:
        self.settings = RunSettings(node_id=self.node_id, log_dir=log_dir, base_env=slave_environment(),
                                    tracker=self, emit=self._emit_event,
                                    log_max_bytes=self.config.log_max_bytes, log_backups=self.config.log_backups)
        self.status_writer = StatusWriter(self.etcd, self.keys, self.node_id)
        self.lease_keeper = LeaseKeeper(
            self.etcd, self.keys, self.node_id, self.config.name, self.node_ttl,
            on_new_lease=self._on_new_lease, on_fence=self.fence, on_recover=self.reload_assignments,
        )

    def start_watching(self) -> None:
        self.mirror = PrefixMirror(self.etcd, self.keys.assignments_of(self.node_id),
                                   self.on_assignment_changes, name="assignments")
        self.mirror_task = start_task(self.mirror.run(), name="assignment-watch")

    def _on_new_lease(self, lease_id: int) -> None:
        self.status_writer.lease_id = lease_id
        self.status_writer.republish_all({iid: runner.status() for iid, runner in self.runners.items()})

    # -- process tracking (ProcessTracker) ----------------------------------------------

    def started(self, child: ChildProcess, instance_id: str) -> None:
        self.guardian.guard(child.pid, child.start_time)
        self.journal.record_start(child.pid, child.start_time, instance_id)
        if child.start_time is None:
            # Recorded at once without its start time, and again once the start time is read.
            child.start_time_read.add_done_callback(lambda _: self._start_time_read(child, instance_id))

    def _start_time_read(self, child: ChildProcess, instance_id: str) -> None:
        if child.start_time is None or child.returncode is not None or child.pid not in self.journal.live:
            return  # Unknown, or the group already ended and was released.
        try:
            self.guardian.guard(child.pid, child.start_time)
        except RuntimeError:
            return  # The guardian is closed: the slave is shutting down.
        self.journal.record_start(child.pid, child.start_time, instance_id)

    def ended(self, child: ChildProcess) -> None:
        self.guardian.release(child.pid)
        self.journal.record_end(child.pid)

    # -- assignments -------------------------------------------------------------------

    def on_assignment_changes(self, changes: list[Change]) -> None:
        if self.lease_keeper.fenced:
            return  # Nothing starts until the assignments are read again after recovery.
        for change in changes:
            instance_id = change.key.rsplit(b"/", 1)[-1].decode(errors="replace")
            if change.value is None:
                self.queued.pop(instance_id, None)
                self._stop(instance_id)
                continue
            try:
                assignment = Assignment.model_validate_json(change.value)
            except pydantic.ValidationError as error:
                log.error("invalid assignment, ignored", instance_id=instance_id,
                          error=str(error).splitlines()[0])
                continue
            self._ensure_running(assignment)

    def _ensure_running(self, assignment: Assignment) -> None:
        runner = self.runners.get(assignment.instance_id)
        if runner is None:
            self._start(assignment)
        elif runner.stopping:
            self.queued[assignment.instance_id] = assignment
        elif assignment.generation == runner.assignment.generation:
            return
        elif assignment.run_spec() == runner.assignment.run_spec():
            runner.rearm(assignment)
        else:
            # New run settings: stop this run, then start with the new ones.
            runner.log.info("run settings changed, restarting", generation=assignment.generation)
            self.queued[assignment.instance_id] = assignment
            runner.request_stop()

    def _start(self, assignment: Assignment) -> None:
        runner = InstanceRunner(assignment, self.settings, self._publish)
        self.runners[assignment.instance_id] = runner
        task = start_task(runner.run(), name=f"instance-{assignment.instance_id}",
                          instance_id=assignment.instance_id)
        task.add_done_callback(lambda _: self._on_runner_done(runner))
        self.tasks[assignment.instance_id] = task

    def _stop(self, instance_id: str) -> None:
        runner = self.runners.get(instance_id)
        if runner is not None:
            runner.request_stop()

    def _on_runner_done(self, runner: InstanceRunner) -> None:
        instance_id = runner.instance_id
        if self.runners.get(instance_id) is runner:
            del self.runners[instance_id]
            self.tasks.pop(instance_id, None)
        queued = self.queued.pop(instance_id, None)
        if queued is not None and not self.lease_keeper.fenced:
            self._start(queued)
        else:
            self.status_writer.publish(instance_id, None)

    def _publish(self, status: InstanceStatus) -> None:
        self.status_writer.publish(status.instance_id, status)

    def _emit_event(self, service_id: str, instance_id: str, event_type: str, message: str) -> None:
        event = Event(time=utc_now(), type=event_type, message=message, instance_id=instance_id, node_id=self.node_id)
        self.status_writer.add_event(service_id, event)

    # -- fencing -----------------------------------------------------------------------

    def fence(self, reason: str) -> None:
        """SIGKILL every instance now and start nothing until recovery."""
        self.queued.clear()
        for runner in self.runners.values():
            runner.kill_now()
        log.error("fenced", reason=reason, killed=len(self.runners))

    async def reload_assignments(self) -> None:
        """Follow the assignments again from a fresh read, after fencing."""
        await cancel_and_wait(self.mirror_task)
        pending = list(self.tasks.values())
        if pending:
            await asyncio.wait(pending, timeout=self._stop_wait())
        self.lease_keeper.fenced = False
        self.start_watching()

    # -- shutdown ----------------------------------------------------------------------

    async def stop_all(self) -> None:
        """Stop every instance in parallel and wait for them."""
        self.queued.clear()
        for runner in list(self.runners.values()):
            runner.request_stop()
        tasks = list(self.tasks.values())
        if tasks:
            log.info("stopping instances", count=len(tasks))
            await asyncio.wait(tasks, timeout=self._stop_wait())

    def _stop_wait(self) -> float:
        """Seconds to wait for every instance to stop: the longest stop timeout, plus SIGKILL's wait."""
        timeouts = [runner.assignment.stop_timeout for runner in self.runners.values()]
        return max(timeouts, default=0.0) + 10.0


class RegistrationRejected(Exception):
    """The master rejected the slave's registration: retrying cannot help."""


async def _post_with_retry(url: str, body: dict) -> dict:
    """POST until the master responds; a 4xx is final, anything else is retried."""
    delay = 0.2
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                async with session.post(url, json=body) as response:
                    if response.status < 400:
                        return await response.json()
                    text = await response.text()
                    if response.status < 500:
                        raise RegistrationRejected(
                            f"registration rejected by the master at {url}: HTTP {response.status}: {text.strip()}")
                    reason = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as error:
                reason = str(error) or type(error).__name__
            log.warning("master unreachable, retrying registration", url=url, error=reason, retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def run_slave(config: SlaveConfig) -> None:
    """Run until SIGTERM or SIGINT, then stop every instance and exit."""
    config.state_dir.mkdir(parents=True, exist_ok=True)
    log_dir = config.state_dir / "logs"
    log_dir.mkdir(exist_ok=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    become_subreaper(loop)
    _raise_open_file_limit()
    slave = Slave(config)
    killed = slave.journal.kill_leftovers()
    if killed:
        log.warning("killed instances left by the previous run", count=killed)
    slave.journal.open()
    slave.guardian = Guardian.start(loop)
    tasks: list[asyncio.Task] = []
    log_server = None
    try:
        log_server, slave.log_url = await _start_log_server(config, log_dir, slave.runners.__contains__)
        try:
            await _until_stopped(stop, slave.register())
        except RegistrationRejected as error:
            log.error("registration rejected", error=str(error))
            raise SystemExit(f"error: {error}") from None
        if stop.is_set():
            return
        slave.prepare(log_dir)
        await _until_stopped(stop, _retry_etcd(slave.lease_keeper.grant))
        if stop.is_set():
            return
        tasks += [
            start_task(slave.status_writer.run(), name="status-writer"),
            start_task(slave.lease_keeper.run(), name="lease-keeper"),
        ]
        slave.start_watching()
        log.info("slave started", state_dir=str(config.state_dir))
        await stop.wait()
    finally:
        await asyncio.shield(_shutdown(slave, tasks, log_server))
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


def _raise_open_file_limit() -> None:
    """Raise the soft limit of open files to the hard limit.

    Each instance uses two descriptors in the slave (the read ends of its pipes), and
    at most MAX_OPEN_FILES log files are open at once (see gdpm.slave.logs). The soft
    limit is often 1024, far below the hard one.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as error:
            log.warning("cannot raise the open file limit", soft=soft, hard=hard, error=str(error))
            return
        soft = target
    log.info("open file limit", limit=soft, instances_at_most=max(soft - MAX_OPEN_FILES - 64, 0) // 2)


async def _start_log_server(config: SlaveConfig, log_dir: Path,
                            known_instance: Callable[[str], bool]) -> tuple[web.AppRunner, str]:
    try:
        runner, url = await start_log_server(build_log_app(log_dir, known_instance), config.log_host, config.log_port,
                                             advertise_host=config.log_advertise_host)
    except OSError as error:
        raise SystemExit(f"error: cannot listen on {config.log_host}:{config.log_port} for the log server: "
                         f"{error.strerror}; choose another --log-port") from None
    return runner, url


async def _shutdown(slave: Slave, tasks: list[asyncio.Task], log_server: web.AppRunner | None) -> None:
    """Stop instances, flush their last statuses, revoke the lease, close etcd."""
    lease_tasks = [task for task in tasks if task.get_name() != "status-writer"]
    await cancel_and_wait(slave.mirror_task, *lease_tasks)
    await slave.stop_all()
    if log_server is not None:
        await log_server.cleanup()
    if slave.status_writer is not None:
        try:
            await slave.status_writer.flushed(SHUTDOWN_FLUSH_TIMEOUT)
        except TimeoutError:
            log.warning("statuses not flushed before shutdown")
    await cancel_and_wait(*tasks)
    if slave.guardian is not None:
        await slave.guardian.close()
    if slave.lease_keeper is not None:
        try:
            await slave.lease_keeper.revoke()
        except aetcd.exceptions.ClientError as error:
            log.warning("lease revoke failed", error=str(error) or type(error).__name__)
    await slave.etcd.close()
    slave.journal.close()
    log.info("slave stopped", node_id=slave.node_id)


async def _retry_etcd(operation) -> None:
    delay = 0.2
    while True:
        try:
            return await operation()
        except aetcd.exceptions.ClientError as error:
            log.warning("etcd unavailable, retrying", error=str(error) or type(error).__name__, retry_in=delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def _until_stopped(stop: asyncio.Event, coroutine) -> None:
    """Run ``coroutine`` unless ``stop`` is set first, in which case cancel it."""
    work = asyncio.ensure_future(coroutine)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait([work, waiter], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not work.done():
        await cancel_and_wait(work)
        return
    work.result()
