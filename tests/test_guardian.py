"""Tests of gdpm.slave.guardian against real processes, checked through /proc.

The end-to-end tests run a fake slave: a Python subprocess that starts a Guardian and
a few instances with spawn_shell, prints their pids as JSON, and then replies to requests
on its stdin. A test kills it with SIGKILL and checks that every process of its
instances is gone within 1 s. The other tests use a Guardian in the test's own event
loop, where ``close()`` ends the pipe the same way as the slave's death.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from gdpm.slave.guardian import GUARDIAN_IGNORED_SIGNALS, GUARDIAN_PATH, Guardian
from gdpm.slave.process import ChildProcess, direct_argv, read_start_time, spawn_shell

TEST_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}

# The time a slave's instances may outlive it.
KILL_LATENCY_LIMIT = 1.0

# Instances with several processes each: dash 0.5.12 forks the last command of
# `sh -c` instead of exec'ing it, so even `sleep 1000` is two processes.
INSTANCE_COMMANDS = [
    "sleep 1000",
    "sleep 1000 & sleep 1000 & wait",
    'trap "" TERM; sleep 1000',
    # A child that leaves the group: found through its parent, which is in the group.
    "setsid sleep 1000 & wait",
]
SLEEPS_PER_COMMAND = [1, 2, 1, 1]

FAKE_SLAVE = r"""
import asyncio, json, os, sys
from pathlib import Path

from gdpm.common.logs import configure_logging
from gdpm.slave.guardian import Guardian
from gdpm.slave.process import become_subreaper, spawn_shell


def reply(message):
    print(json.dumps(message), flush=True)


async def main(log_dir, commands):
    loop = asyncio.get_running_loop()
    become_subreaper(loop)
    guardian = Guardian.start(loop)
    children = []
    for index, command in enumerate(commands):
        child = spawn_shell(command, env={"PATH": os.environ["PATH"]}, cwd=None,
                            stdout_path=Path(log_dir, f"{index}.out"),
                            stderr_path=Path(log_dir, f"{index}.err"))
        guardian.guard(child.pid, child.start_time)
        children.append(child)
    reply({"guardian": guardian.pid, "instances": [child.pid for child in children]})
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        if line.strip() == "guardian":
            reply({"guardian": guardian.pid, "alive": guardian.alive()})


configure_logging("slave")
asyncio.run(main(sys.argv[1], sys.argv[2:]))
"""


# -- /proc helpers -----------------------------------------------------------------


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3 and later of /proc/PID/stat, so that field N is at index N - 3, or None."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2:].decode().split()


def all_processes() -> dict[int, list[str]]:
    processes = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None:
                processes[int(entry)] = fields
    return processes


def identity(pid: int) -> tuple[int, int] | None:
    """(pid, start time), which no later process shares, or None when the process is gone."""
    start_time = read_start_time(pid)
    return None if start_time is None else (pid, start_time)


def is_alive(process: tuple[int, int]) -> bool:
    """Check that the process exists and has not exited: a zombie counts as dead."""
    pid, start_time = process
    fields = stat_fields(pid)
    return fields is not None and int(fields[22 - 3]) == start_time and fields[0] not in ("Z", "X")


def tree(roots: list[int]) -> dict[int, list[str]]:
    """The processes that descend from ``roots``, roots included: pid to stat fields."""
    processes = all_processes()
    found = {pid: processes[pid] for pid in roots if pid in processes}
    grew = True
    while grew:
        grew = False
        for pid, fields in processes.items():
            if pid not in found and int(fields[4 - 3]) in found:
                found[pid] = fields
                grew = True
    return found


def comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def group_members(pgid: int) -> list[int]:
    return [pid for pid, fields in all_processes().items() if int(fields[5 - 3]) == pgid]


def sleeps_in_tree(roots: list[int]) -> list[int]:
    return [pid for pid, fields in tree(roots).items() if comm(pid) == "sleep" and fields[0] != "Z"]


def signal_bits(pid: int, name: str) -> int:
    """A signal mask line of /proc/PID/status, such as SigIgn, as an integer."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.strip(), 16)
    raise AssertionError(f"{name} missing from /proc/{pid}/status")


def mask_of(signals) -> int:
    return sum(1 << (signum - 1) for signum in signals)


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, interval: float = 0.005) -> float:
    """Poll ``condition`` until it holds; return the seconds waited. Raises AssertionError on timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - started


async def wait_until_async(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)


async def assert_dead_soon(processes: list[tuple[int, int]], timeout: float = 5.0) -> None:
    """Wait until none of ``processes`` is alive, or fail naming the survivors.

    A process that received SIGKILL still shows as alive until the scheduler runs it
    and it exits, which can take a while on a loaded machine.
    """
    deadline = time.monotonic() + timeout
    while survivors := [process for process in processes if is_alive(process)]:
        if time.monotonic() > deadline:
            raise AssertionError(f"processes (pid, start time) alive {timeout} s after the kill: {survivors}")
        await asyncio.sleep(0.005)


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture
def leftovers():
    """A set of (pid, start time) to SIGKILL at teardown if still alive, so every test cleans up by pid."""
    processes: set[tuple[int, int]] = set()
    yield processes
    for process in processes:
        if is_alive(process):
            os.kill(process[0], signal.SIGKILL)
    wait_until(lambda: not any(is_alive(process) for process in processes), timeout=10)


class FakeSlave:
    """A fake slave subprocess (see FAKE_SLAVE) and the pids it reported."""

    def __init__(self, tmp_path: Path, commands: list[str], leftovers: set[tuple[int, int]]) -> None:
        self.leftovers = leftovers
        self.stderr_path = tmp_path / "slave.stderr"
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-c", FAKE_SLAVE, str(tmp_path), *commands],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
            )
        started = self.read_reply()
        self.guardian_pid: int = started["guardian"]
        self.instances: list[int] = started["instances"]
        leftovers.update(filter(None, map(identity, [self.guardian_pid, *self.instances])))

    def instance_processes(self) -> list[tuple[int, int]]:
        """Return the identities of the processes that descend from the instances now.

        They are added to the leftovers, so that the teardown kills them if the test fails.
        """
        processes = [process for process in map(identity, tree(self.instances)) if process is not None]
        self.leftovers.update(processes)
        return processes

    def read_reply(self) -> dict:
        line = self.process.stdout.readline()
        assert line, f"the fake slave exited; its stderr:\n{self.stderr_path.read_text()}"
        return json.loads(line)

    def guardian_status(self) -> dict:
        """Return the pid of the fake slave's current guardian and whether it runs; add it to the leftovers."""
        self.process.stdin.write("guardian\n")
        self.process.stdin.flush()
        status = self.read_reply()
        self.leftovers.update(filter(None, [identity(status["guardian"])]))
        return status

    def kill(self) -> float:
        """SIGKILL the fake slave and reap it; return time.monotonic() at the kill."""
        os.kill(self.process.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        self.process.wait()
        return killed_at

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self.process.stdin.close()
        self.process.stdout.close()


@pytest.fixture
def fake_slave(tmp_path, leftovers):
    """Start fake slaves with the given commands. At teardown, SIGKILL them and every process they left."""
    slaves: list[FakeSlave] = []

    def start(commands: list[str]) -> FakeSlave:
        slave = FakeSlave(tmp_path, commands, leftovers)
        slaves.append(slave)
        return slave

    yield start

    for slave in slaves:
        # Everything below the slave, found while its tree is still intact.
        leftovers.update(filter(None, map(identity, tree([slave.process.pid]))))
        slave.stop()


@pytest.fixture
async def spawn(tmp_path, leftovers):
    """Wrap spawn_shell with log files in tmp_path. At teardown, kill and reap every group it started."""
    children: list[ChildProcess] = []

    def start(command: str) -> ChildProcess:
        index = len(children)
        child = spawn_shell(command, env=TEST_ENV, cwd=None,
                            stdout_path=tmp_path / f"out{index}.log", stderr_path=tmp_path / f"err{index}.log")
        children.append(child)
        return child

    yield start

    for child in children:
        leftovers.update(filter(None, map(identity, tree([child.pid]))))
        child.signal_group(signal.SIGKILL)
    for child in children:
        await asyncio.wait_for(child.wait(), 5)


@pytest.fixture
async def guardian(tmp_path):
    """A Guardian in the test's event loop, closed at teardown.

    The guardian process writes its reports to ``guardian.stderr_path``: fd 2 of the
    test process points there while it is spawned.
    """
    stderr_path = tmp_path / "guardian.stderr"
    saved_stderr = os.dup(2)
    try:
        with open(stderr_path, "wb") as stderr:
            os.dup2(stderr.fileno(), 2)
        guardian = Guardian.start(asyncio.get_running_loop())
    finally:
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
    guardian.stderr_path = stderr_path  # A test-only attribute.
    yield guardian
    await guardian.close()


async def started_sleeps(child: ChildProcess, count: int = 1) -> list[tuple[int, int]]:
    """Wait until ``count`` sleep processes descend from ``child``; return the identities of its whole tree."""
    await wait_until_async(lambda: len(sleeps_in_tree([child.pid])) >= count)
    return [process for process in map(identity, tree([child.pid])) if process is not None]


# -- slave killed with SIGKILL -----------------------------------------------------


def test_slave_sigkill_kills_instances(fake_slave):
    slave = fake_slave(INSTANCE_COMMANDS)
    wait_until(lambda: len(sleeps_in_tree(slave.instances)) == sum(SLEEPS_PER_COMMAND))
    processes = slave.instance_processes()
    guardian = identity(slave.guardian_pid)
    # Each command is a shell and its sleeps, but for "sleep 1000", which runs without a shell.
    shells = sum(1 for command in INSTANCE_COMMANDS if direct_argv(command, dict(os.environ)) is None)
    assert shells == len(INSTANCE_COMMANDS) - 1
    assert len(processes) >= shells + sum(SLEEPS_PER_COMMAND)
    assert guardian is not None

    killed_at = slave.kill()
    wait_until(lambda: not any(is_alive(process) for process in processes), timeout=5, interval=0.001)
    latency = time.monotonic() - killed_at

    assert latency < KILL_LATENCY_LIMIT, f"instances outlived the slave by {latency:.3f} s"
    wait_until(lambda: not is_alive(guardian))
    report = slave.stderr_path.read_text()
    assert "the pipe from the slave closed: killed process groups" in report
    assert "processes that had left them" in report, "the setsid child"


def test_slave_sigkill_after_guardian_respawn(fake_slave):
    slave = fake_slave(INSTANCE_COMMANDS[:2])
    wait_until(lambda: len(sleeps_in_tree(slave.instances)) == sum(SLEEPS_PER_COMMAND[:2]))
    processes = slave.instance_processes()
    first_guardian = identity(slave.guardian_pid)

    os.kill(slave.guardian_pid, signal.SIGKILL)
    wait_until(lambda: not is_alive(first_guardian))

    def restarted() -> bool:
        status = slave.guardian_status()
        return status["guardian"] != slave.guardian_pid and status["alive"]

    wait_until(restarted)
    killed_at = slave.kill()
    wait_until(lambda: not any(is_alive(process) for process in processes), timeout=5, interval=0.001)
    latency = time.monotonic() - killed_at

    assert latency < KILL_LATENCY_LIMIT, f"instances outlived the slave by {latency:.3f} s"
    assert "guardian exited unexpectedly" in slave.stderr_path.read_text()


# -- close -------------------------------------------------------------------------


async def test_close_kills_only_guarded(guardian, spawn):
    released = spawn("sleep 1000")
    guarded = spawn("sleep 1000 & sleep 1000 & wait")
    released_processes = await started_sleeps(released)
    guarded_processes = await started_sleeps(guarded, 2)
    guardian.guard(released.pid, released.start_time)
    guardian.guard(guarded.pid, guarded.start_time)
    guardian.release(released.pid)

    assert await guardian.close() == 0

    await assert_dead_soon(guarded_processes)
    assert all(is_alive(process) for process in released_processes)
    assert f"killed process groups [{guarded.pid}]" in guardian.stderr_path.read_text()


async def test_close_all_released_kills_nothing(guardian, spawn):
    child = spawn("sleep 1000")
    processes = await started_sleeps(child)
    guardian.guard(child.pid, child.start_time)
    guardian.release(child.pid)
    guardian_process = identity(guardian.pid)

    assert await guardian.close() == 0

    assert all(is_alive(process) for process in processes)
    assert not is_alive(guardian_process)
    assert "gdpm guardian" not in guardian.stderr_path.read_text()


async def test_close_twice_returns_same_code(guardian):
    assert await guardian.close() == 0
    assert await guardian.close() == 0
    with pytest.raises(RuntimeError):
        guardian.guard(12345, None)


async def test_start_time_mismatch_not_signalled(guardian, spawn):
    mismatched = spawn("sleep 1000")
    matched = spawn("sleep 1000")
    mismatched_processes = await started_sleeps(mismatched)
    matched_processes = await started_sleeps(matched)
    guardian.guard(mismatched.pid, mismatched.start_time - 1)
    guardian.guard(matched.pid, matched.start_time)

    assert await guardian.close() == 0

    await assert_dead_soon(matched_processes)  # The guardian acted.
    assert all(is_alive(process) for process in mismatched_processes)
    report = guardian.stderr_path.read_text()
    assert f"{mismatched.pid} (start time {mismatched.start_time}, recorded {mismatched.start_time - 1})" in report


async def test_unknown_start_time_kills_group(guardian, spawn):
    child = spawn("sleep 1000")
    processes = await started_sleeps(child)
    guardian.guard(child.pid, None)

    assert await guardian.close() == 0

    await assert_dead_soon(processes)


async def test_leader_gone_members_killed(guardian, spawn):
    # The leader exits and leaves a member in the group: the group is found by its pgid.
    child = spawn("sleep 1000 & exit 0")
    guardian.guard(child.pid, child.start_time)
    assert await child.wait() == 0
    await wait_until_async(lambda: stat_fields(child.pid) is None)
    # dash forks the background job, which is `sh` until it execs sleep.
    await wait_until_async(lambda: [comm(pid) for pid in group_members(child.pid)] == ["sleep"])
    [member] = [identity(pid) for pid in group_members(child.pid)]

    assert await guardian.close() == 0

    await assert_dead_soon([member])


async def test_double_forked_daemon_not_found(guardian, spawn, tmp_path, leftovers):
    """A known limit: a process that left the group and lost its parent cannot be traced to the instance."""
    pid_file = tmp_path / "daemon.pid"
    child = spawn(f"(setsid sleep 1000 & echo $! > {pid_file}); sleep 1000")
    await started_sleeps(child)
    await wait_until_async(lambda: pid_file.read_text().endswith("\n"))
    daemon = identity(int(pid_file.read_text()))
    leftovers.add(daemon)
    guardian.guard(child.pid, child.start_time)

    assert await guardian.close() == 0

    assert is_alive(daemon)


async def test_outside_descendants_killed(guardian, spawn, leftovers):
    # A child that moved to a session of its own and keeps forking: it and every
    # child it made are found through their parent links and killed.
    child = spawn("setsid sh -c 'while :; do sleep 1000 & sleep 0.01; done' & wait")
    guardian.guard(child.pid, child.start_time)
    await started_sleeps(child, 3)
    [session_leader] = [pid for pid, fields in tree([child.pid]).items()
                        if pid != child.pid and int(fields[6 - 3]) == pid]

    def session() -> list[tuple[int, int]]:
        members = [identity(pid) for pid, fields in all_processes().items() if int(fields[6 - 3]) == session_leader]
        return [process for process in members if process is not None]

    try:
        processes = session()
        assert await guardian.close() == 0
        await assert_dead_soon(processes + session())
    finally:
        # Kill the loop first, or it forks sleeps after the cleanup.
        leader = identity(session_leader)
        if leader is not None and is_alive(leader):
            os.kill(session_leader, signal.SIGKILL)
        leftovers.update(session())


# -- the guardian process ----------------------------------------------------------


async def test_guardian_process_set_up(guardian, spawn):
    child = spawn("sleep 1000")
    await started_sleeps(child)
    await wait_until_async(lambda: comm(guardian.pid) == "gdpm-guardian")

    fields = stat_fields(guardian.pid)
    assert int(fields[6 - 3]) == guardian.pid, "session id"
    assert int(fields[5 - 3]) == guardian.pid, "process group id"
    assert sorted(os.listdir(f"/proc/{guardian.pid}/fd")) == ["0", "1", "2"]
    pipe = os.readlink(f"/proc/{guardian.pid}/fd/0")
    assert pipe.startswith("pipe:")
    assert os.readlink(f"/proc/{guardian.pid}/fd/1") == "/dev/null"
    # The test process has only the write end open, and no instance has either end.
    holders = [fd for fd in os.listdir("/proc/self/fd") if _readlink(f"/proc/self/fd/{fd}") == pipe]
    assert len(holders) == 1
    for pid in tree([child.pid]):
        assert pipe not in [_readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]


def _readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except FileNotFoundError:
        return None


async def test_guardian_ignores_term_int_hup(spawn):
    child = spawn("sleep 1000")
    processes = await started_sleeps(child)
    signals = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
    guardian = Guardian.start(asyncio.get_running_loop())
    first_pid = guardian.pid
    try:
        # At once, while the interpreter is still starting up.
        for signum in signals:
            os.kill(guardian.pid, signum)
        guardian.guard(child.pid, child.start_time)
        ignored = mask_of(GUARDIAN_IGNORED_SIGNALS)
        await wait_until_async(lambda: signal_bits(guardian.pid, "SigIgn") & ignored == ignored
                               and signal_bits(guardian.pid, "SigBlk") == 0)
        # And once it runs.
        for signum in signals:
            os.kill(guardian.pid, signum)

        assert guardian.alive()
        assert guardian.pid == first_pid, "the guardian died and was restarted"
    finally:
        returncode = await guardian.close()

    assert returncode == 0
    await assert_dead_soon(processes)


async def test_guardian_killed_is_restarted(guardian, spawn):
    before = spawn("sleep 1000")
    after = spawn("sleep 1000")
    processes = await started_sleeps(before) + await started_sleeps(after)
    guardian.guard(before.pid, before.start_time)
    first_pid = guardian.pid

    with structlog.testing.capture_logs() as logs:
        os.kill(first_pid, signal.SIGKILL)
        await wait_until_async(lambda: guardian.pid != first_pid and guardian.alive())
    guardian.guard(after.pid, after.start_time)

    assert await guardian.close() == 0

    await assert_dead_soon(processes)  # The records sent to both guardians.
    [event] = [entry for entry in logs if entry["event"] == "guardian exited unexpectedly"]
    assert event["pid"] == first_pid
    assert event["returncode"] == -signal.SIGKILL
    assert event["log_level"] == "error"


async def test_restart_retried_after_spawn_failure(guardian, spawn, monkeypatch):
    child = spawn("sleep 1000")
    processes = await started_sleeps(child)
    guardian.guard(child.pid, child.start_time)
    first_pid = guardian.pid
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")

    with structlog.testing.capture_logs() as logs:
        os.kill(first_pid, signal.SIGKILL)
        await wait_until_async(lambda: any(entry["event"] == "guardian restart failed" for entry in logs))
        monkeypatch.undo()
        await wait_until_async(lambda: guardian.pid != first_pid and guardian.alive())

    assert await guardian.close() == 0
    await assert_dead_soon(processes)
    failure = next(entry for entry in logs if entry["event"] == "guardian restart failed")
    assert "/nonexistent/python" in failure["error"]


async def test_guard_many_lines_without_blocking(guardian, spawn):
    # The guardian is stopped, so the lines fill the pipe (64 KiB) and the rest waits
    # in the buffer until the event loop can write it. The last line must count.
    child = spawn("sleep 1000")
    processes = await started_sleeps(child)
    os.kill(guardian.pid, signal.SIGSTOP)
    for _ in range(5000):
        guardian.guard(child.pid, child.start_time)
        guardian.release(child.pid)
    guardian.guard(child.pid, child.start_time)
    assert guardian._buffer, "the pipe should be full"
    os.kill(guardian.pid, signal.SIGCONT)

    assert await guardian.close() == 0

    await assert_dead_soon(processes)


def test_protocol_invalid_and_cut_lines(tmp_path, leftovers):
    # The guardian program alone, fed by the test.
    targets = [subprocess.Popen(["sleep", "1000"], start_new_session=True) for _ in range(2)]
    leftovers.update(identity(target.pid) for target in targets)
    killed, cut = (identity(target.pid) for target in targets)
    stderr_path = tmp_path / "guardian.stderr"
    with open(stderr_path, "wb") as stderr:
        guardian = subprocess.Popen([sys.executable, "-I", "-S", GUARDIAN_PATH], stdin=subprocess.PIPE,
                                    stderr=stderr, start_new_session=True)
    leftovers.add(identity(guardian.pid))

    lines = [b"garbage", b"+ 1 5", b"+ x 5", b"- 1 2", b"", f"+ {killed[0]} {killed[1]}".encode()]
    guardian.stdin.write(b"\n".join(lines) + b"\n" + f"+ {cut[0]} {cut[1]}".encode())
    guardian.stdin.close()

    assert guardian.wait(timeout=5) == 0
    assert targets[0].wait(timeout=5) == -signal.SIGKILL
    assert is_alive(cut), "a line cut by EOF is dropped"
    report = stderr_path.read_text()
    for bad_line in [b"garbage", b"+ 1 5", b"+ x 5", b"- 1 2", b""]:
        assert f"invalid line from the slave ignored: {bad_line!r}" in report
    targets[1].kill()
    targets[1].wait()
