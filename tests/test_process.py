"""Tests of gdpm.slave.process against real processes, checked through /proc."""

from __future__ import annotations

import asyncio
import errno
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gdpm.slave import process
from gdpm.slave.process import ChildProcess, direct_argv, read_start_time, spawn_shell

TEST_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LC_ALL": "C"}


def stat_fields(pid: int) -> list[str] | None:
    """Fields 3 and later of /proc/PID/stat, or None when the process is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2:].decode().split()


def group_members(pgid: int) -> list[int]:
    """Pids of the processes whose process group is ``pgid``, zombies included."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = stat_fields(int(entry))
        if fields is not None and int(fields[5 - 3]) == pgid:
            members.append(int(entry))
    return members


def comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def signal_bits(pid: int, name: str) -> int:
    """A signal mask line of /proc/PID/status, such as SigIgn, as an integer."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return int(value.strip(), 16)
    raise AssertionError(f"{name} missing from /proc/{pid}/status")


def open_fds(pid: int | str = "self") -> list[int]:
    return sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd"))


async def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)


def sleep_pids(child: ChildProcess) -> list[int]:
    """Pids of the `sleep` processes in the child's group.

    dash 0.5.12 (Debian 12) forks for the last command of `sh -c`, so sleep is not the leader.
    """
    return [pid for pid in group_members(child.pid) if comm(pid) == "sleep"]


def sleep_in_group(child: ChildProcess) -> Callable[[], bool]:
    return lambda: bool(sleep_pids(child))


def no_pidfd_open(pid: int) -> int:
    raise OSError(errno.ENOSYS, "Function not implemented")


@pytest.fixture
async def spawn(tmp_path: Path):
    """Wrap spawn_shell with log files in tmp_path. At teardown, SIGKILL every group it started."""
    children: list[ChildProcess] = []

    def start(command: str, *, env: dict[str, str] | None = None, cwd: str | None = None,
              start_time_now: bool = True) -> ChildProcess:
        index = len(children)
        child = spawn_shell(
            command, env=TEST_ENV if env is None else env, cwd=cwd,
            stdout_path=tmp_path / f"out{index}.log", stderr_path=tmp_path / f"err{index}.log",
            start_time_now=start_time_now,
        )
        # Test-only attributes, so that checks can find the log files.
        child.stdout_path = tmp_path / f"out{index}.log"
        child.stderr_path = tmp_path / f"err{index}.log"
        children.append(child)
        return child

    yield start

    for child in children:
        child.signal_group(signal.SIGKILL)
    for child in children:
        await asyncio.wait_for(child.wait(), 5)
        await wait_until(lambda: not group_members(child.pid), timeout=10)


# Spawning


async def test_spawn_new_session_and_group(spawn):
    child = spawn("sleep 1000")

    fields = stat_fields(child.pid)
    assert fields is not None
    assert int(fields[5 - 3]) == child.pid, "process group id"
    assert int(fields[6 - 3]) == child.pid, "session id"
    assert child.start_time == int(fields[22 - 3])
    assert child.start_time == read_start_time(child.pid)
    assert child.returncode is None


async def test_spawn_environment(spawn):
    value = "two  spaces 'single' \"double\" $HOME"
    child = spawn('printf "%s" "$GDPM_TEST_VALUE"', env={**TEST_ENV, "GDPM_TEST_VALUE": value})

    assert await child.wait() == 0
    assert child.stdout_path.read_text() == value


SHELL_COMMANDS = [
    """echo "a  b" 'c $X' $X""",
    "echo one two three | tr a-z A-Z | rev",
    "echo redirected > note.txt; cat note.txt; echo second >> note.txt; wc -l < note.txt",
    "printf '%s|' \"$#\" \"$@\"; echo \"$0\"",
    "X=inner; echo ${X}-${UNSET:-default}; false; echo $?",
    "for word in 'a b' c; do echo \"[$word]\"; done; echo $(( 6 * 7 ))",
    "echo to-stderr >&2; exit 4",
]


@pytest.mark.parametrize("use_cwd", [False, True], ids=["no-cwd", "cwd"])
@pytest.mark.parametrize("command", SHELL_COMMANDS)
async def test_spawn_matches_sh_c(spawn, tmp_path, command, use_cwd, monkeypatch):
    workdir = tmp_path / "work"
    workdir.mkdir()
    # Without cwd, both shells run in the test process's directory.
    monkeypatch.chdir(workdir)
    env = {**TEST_ENV, "X": "outer value"}
    expected = subprocess.run(["/bin/sh", "-c", command], env=env, capture_output=True, text=True)
    (workdir / "note.txt").unlink(missing_ok=True)

    child = spawn(command, env=env, cwd=str(workdir) if use_cwd else None)

    assert await child.wait() == expected.returncode
    assert child.stdout_path.read_text() == expected.stdout
    assert child.stderr_path.read_text() == expected.stderr


async def test_spawn_log_files_append(spawn, tmp_path):
    (tmp_path / "out0.log").write_text("old out\n")

    child = spawn("echo to-stdout; echo to-stderr >&2")

    assert await child.wait() == 0
    assert child.stdout_path.read_text() == "old out\nto-stdout\n"
    assert child.stderr_path.read_text() == "to-stderr\n"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(child.stderr_path.stat().st_mode) == 0o644 & ~umask


async def test_spawn_shared_log_file(tmp_path):
    log_path = tmp_path / "both.log"
    child = spawn_shell(
        "echo one; echo two >&2; echo three", env=TEST_ENV, cwd=None,
        stdout_path=log_path, stderr_path=log_path,
    )

    assert await child.wait() == 0
    assert log_path.read_text() == "one\ntwo\nthree\n"


async def test_spawn_cwd(spawn, tmp_path):
    workdir = tmp_path / "-dir with 'quotes' $HOME"
    workdir.mkdir()

    child = spawn("pwd -P", cwd=str(workdir))

    assert await child.wait() == 0
    assert child.stdout_path.read_text() == f"{workdir.resolve()}\n"


async def test_spawn_cwd_relative_and_symlink(spawn, tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "a" / "b")
    monkeypatch.chdir(tmp_path)
    # chdir("link/..") follows the symlink first, so it lands in a/, not in tmp_path.
    expected = subprocess.run(["pwd", "-P"], cwd="link/..", capture_output=True, text=True).stdout

    child = spawn("pwd -P", cwd="link/..")

    assert await child.wait() == 0
    assert child.stdout_path.read_text() == expected
    assert expected == f"{(tmp_path / 'a').resolve()}\n"


async def test_spawn_missing_cwd_raises(tmp_path):
    fds_before = open_fds()
    with pytest.raises(FileNotFoundError) as raised:
        spawn_shell(
            "true", env=TEST_ENV, cwd=str(tmp_path / "missing"),
            stdout_path=tmp_path / "out.log", stderr_path=tmp_path / "err.log",
        )
    assert raised.value.filename == str(tmp_path / "missing")
    assert open_fds() == fds_before


async def test_spawn_cwd_not_directory_raises(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError) as raised:
        spawn_shell(
            "true", env=TEST_ENV, cwd=str(tmp_path / "file"),
            stdout_path=tmp_path / "out.log", stderr_path=tmp_path / "err.log",
        )
    assert raised.value.filename == str(tmp_path / "file")


@pytest.mark.parametrize("broken", ["stdout", "stderr"])
async def test_spawn_unopenable_log_raises(tmp_path, broken):
    good = tmp_path / "good.log"
    bad = tmp_path / "missing-dir" / "bad.log"
    paths = {"stdout_path": bad, "stderr_path": good} if broken == "stdout" else {"stdout_path": good, "stderr_path": bad}
    fds_before = open_fds()

    with pytest.raises(FileNotFoundError) as raised:
        spawn_shell("touch started", env=TEST_ENV, cwd=str(tmp_path), **paths)

    assert raised.value.filename == str(bad)
    assert open_fds() == fds_before
    assert not (tmp_path / "started").exists()


def read_pipe_to_eof(read_fd: int) -> bytes:
    """Read what a pipe holds, and fail unless every write end is closed (EOF)."""
    os.set_blocking(read_fd, False)
    data = b""
    while True:
        try:
            chunk = os.read(read_fd, 65536)
        except BlockingIOError:
            raise AssertionError(f"no EOF on the pipe after {data!r}: a copy of the write end is still open")
        if not chunk:
            return data
        data += chunk


@pytest.fixture
def pipe():
    read_fd, write_fd = os.pipe()
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        try:
            os.close(fd)
        except OSError:
            pass  # The test closed it.


async def test_spawn_stdout_to_pipe(tmp_path, pipe):
    read_fd, write_fd = pipe
    child = spawn_shell("echo out; echo err >&2", env=TEST_ENV, cwd=None,
                        stdout=write_fd, stderr=tmp_path / "err.log")
    os.close(write_fd)

    assert await child.wait() == 0
    assert read_pipe_to_eof(read_fd) == b"out\n"
    assert (tmp_path / "err.log").read_text() == "err\n"


async def test_spawn_both_outputs_to_one_pipe(pipe):
    read_fd, write_fd = pipe
    child = spawn_shell("echo one; echo two >&2; echo three", env=TEST_ENV, cwd=None,
                        stdout=write_fd, stderr=write_fd)
    os.close(write_fd)

    assert await child.wait() == 0
    assert read_pipe_to_eof(read_fd) == b"one\ntwo\nthree\n"


@pytest.mark.parametrize("inheritable", [False, True], ids=["cloexec", "inheritable"])
async def test_spawn_pipe_child_fds_only_stdio(spawn, tmp_path, pipe, inheritable):
    read_fd, write_fd = pipe
    os.set_inheritable(write_fd, inheritable)
    child = spawn_shell("sleep 1000", env=TEST_ENV, cwd=None, stdout=write_fd, stderr=write_fd)
    try:
        os.close(write_fd)
        await wait_until(sleep_in_group(child))

        for pid in [child.pid, *sleep_pids(child)]:
            assert open_fds(pid) == [0, 1, 2], f"fds of {comm(pid)}"
            assert os.readlink(f"/proc/{pid}/fd/1").startswith("pipe:")
            assert os.readlink(f"/proc/{pid}/fd/1") == os.readlink(f"/proc/{pid}/fd/2")
    finally:
        child.signal_group(signal.SIGKILL)
        await asyncio.wait_for(child.wait(), 5)
    await wait_until(lambda: not group_members(child.pid))
    assert read_pipe_to_eof(read_fd) == b""


async def test_spawn_output_fd_zero(pipe):
    # The caller's pipe is its fd 0, which the child's own stdin (/dev/null) replaces.
    read_fd, write_fd = pipe
    saved_stdin = os.dup(0)
    try:
        os.dup2(write_fd, 0)
        os.close(write_fd)
        child = spawn_shell("echo out; echo err >&2", env=TEST_ENV, cwd=None, stdout=0, stderr=0)
    finally:
        os.dup2(saved_stdin, 0)
        os.close(saved_stdin)

    assert await child.wait() == 0
    assert read_pipe_to_eof(read_fd) == b"out\nerr\n"


async def test_spawn_closed_fd_raises(tmp_path):
    # Far above every open descriptor, so that the log file that spawn_shell opens cannot take its number.
    closed_fd = max(open_fds()) + 1000
    fds_before = open_fds()

    with pytest.raises(OSError, match=f"invalid stderr file descriptor {closed_fd}"):
        spawn_shell("touch started", env=TEST_ENV, cwd=str(tmp_path),
                    stdout=tmp_path / "out.log", stderr=closed_fd)

    assert open_fds() == fds_before
    assert not (tmp_path / "started").exists()


@pytest.mark.parametrize("arguments, error", [
    ({"stdout": "PATH", "stdout_path": "PATH", "stderr": "PATH"}, TypeError),
    ({"stderr": "PATH"}, TypeError),
    ({"stdout": -1, "stderr": "PATH"}, ValueError),
    ({"stdout": "PATH", "stderr": "PATH", "marker": b"GDPM_INSTANCE_ID"}, ValueError),
    ({"stdout": "PATH", "stderr": "PATH", "marker": b"GDPM_INSTANCE_ID=web-0"}, ValueError),
], ids=["stdout-twice", "stdout-missing", "negative-fd", "marker-without-equals", "marker-not-in-env"])
async def test_spawn_invalid_arguments_raise(tmp_path, arguments, error):
    arguments = {key: tmp_path / "out.log" if value == "PATH" else value for key, value in arguments.items()}

    with pytest.raises(error):
        spawn_shell("touch started", env=TEST_ENV, cwd=str(tmp_path), **arguments)

    assert not (tmp_path / "started").exists()


async def test_spawn_stores_marker(spawn, tmp_path):
    child = spawn_shell("exit 0", env={**TEST_ENV, "GDPM_INSTANCE_ID": "web-0"}, cwd=None,
                        stdout=tmp_path / "out.log", stderr=tmp_path / "err.log",
                        marker=b"GDPM_INSTANCE_ID=web-0")

    assert child.marker == b"GDPM_INSTANCE_ID=web-0"
    assert await child.wait() == 0


async def test_spawn_without_loop_raises(tmp_path):
    def spawn_outside_loop() -> None:
        spawn_shell(
            "touch started", env=TEST_ENV, cwd=str(tmp_path),
            stdout_path=tmp_path / "out.log", stderr_path=tmp_path / "err.log",
        )

    with pytest.raises(RuntimeError):
        await asyncio.to_thread(spawn_outside_loop)
    assert not (tmp_path / "started").exists()


@pytest.mark.parametrize("use_cwd", [False, True], ids=["no-cwd", "cwd"])
async def test_spawn_child_fds_only_stdio(spawn, tmp_path, use_cwd):
    other = spawn("sleep 1000")
    assert other._pidfd is not None, "the first child's pidfd is open while the second starts"

    child = spawn("sleep 1000", cwd=str(tmp_path) if use_cwd else None)
    await wait_until(sleep_in_group(child))

    for pid in [child.pid, *sleep_pids(child)]:
        assert open_fds(pid) == [0, 1, 2], f"fds of {comm(pid)}"
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/1") == str(child.stdout_path)
        assert os.readlink(f"/proc/{pid}/fd/2") == str(child.stderr_path)


async def test_spawn_inherited_fd_not_passed(spawn, tmp_path, monkeypatch):
    # Stands for an fd that the slave's own parent let it inherit.
    inherited_fd = os.open(tmp_path, os.O_RDONLY)
    os.set_inheritable(inherited_fd, True)
    monkeypatch.setattr(process, "_inherited_fds_checked", False)
    try:
        child = spawn("sleep 1000")
        await wait_until(sleep_in_group(child))

        for pid in [child.pid, *sleep_pids(child)]:
            assert open_fds(pid) == [0, 1, 2], f"fds of {comm(pid)}"
        assert os.get_inheritable(inherited_fd) is False
    finally:
        os.close(inherited_fd)


async def test_spawn_resets_signal_state(spawn):
    # Python ignores SIGPIPE and SIGXFSZ. SIGUSR1 is blocked too, in this thread only.
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        child = spawn("sleep 1000")
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
    await wait_until(sleep_in_group(child))

    for pid in [child.pid, *sleep_pids(child)]:
        # Bits 31 and 32 are signals 32 and 33, which glibc reserves and its posix_spawn
        # leaves ignored in the child.
        assert signal_bits(pid, "SigIgn") & ~0x180000000 == 0, f"ignored signals of {comm(pid)}"
    # Only sleep's mask is checked, because dash blocks signals for short spans itself.
    for pid in sleep_pids(child):
        assert signal_bits(pid, "SigBlk") == 0, f"blocked signals of {comm(pid)}"


async def test_spawn_pipe_gets_sigpipe(spawn):
    child = spawn("yes | head -n 1")

    assert await child.wait() == 0
    assert child.stdout_path.read_text() == "y\n"
    assert child.stderr_path.read_text() == "", "yes must die of SIGPIPE, not report EPIPE"


async def test_spawn_with_stdin_closed(spawn, monkeypatch):
    # Without a pidfd, which could take fd 0 and be overwritten when stdin is restored.
    monkeypatch.setattr(os, "pidfd_open", no_pidfd_open)
    saved_stdin = os.dup(0)
    os.close(0)
    try:
        child = spawn("echo out; echo err >&2")
    finally:
        os.dup2(saved_stdin, 0)
        os.close(saved_stdin)

    assert await child.wait() == 0
    assert child.stdout_path.read_text() == "out\n"
    assert child.stderr_path.read_text() == "err\n"


# Waiting


async def test_wait_exit_code(spawn):
    child = spawn("exit 3")

    assert await child.wait() == 3
    assert child.returncode == 3


async def test_wait_killed_by_signal(spawn):
    child = spawn("sleep 1000")
    waiters = [asyncio.ensure_future(child.wait()) for _ in range(3)]
    await asyncio.sleep(0)
    assert not any(waiter.done() for waiter in waiters)

    os.kill(child.pid, signal.SIGKILL)

    assert await asyncio.gather(*waiters) == [-signal.SIGKILL] * 3
    assert child.returncode == -signal.SIGKILL


async def test_wait_cancel_one_waiter(spawn):
    child = spawn("sleep 1000")
    cancelled = asyncio.ensure_future(child.wait())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled

    child.signal_group(signal.SIGTERM)

    assert await asyncio.wait_for(child.wait(), 5) == -signal.SIGTERM


async def test_wait_reaps_without_waiter(spawn):
    child = spawn("exit 0")

    await wait_until(lambda: child.returncode is not None)

    assert stat_fields(child.pid) is None, "reaped: no zombie left"
    assert read_start_time(child.pid) is None


async def test_wait_without_pidfd_open(spawn, monkeypatch):
    monkeypatch.setattr(os, "pidfd_open", no_pidfd_open)
    exits = spawn("exit 7")
    sleeper = spawn("sleep 1000")

    assert await asyncio.wait_for(exits.wait(), 5) == 7
    assert await asyncio.wait_for(sleeper.stop(timeout=5), 5) == -signal.SIGTERM
    assert not group_members(sleeper.pid)


async def test_wait_without_os_pidfd_open(spawn, monkeypatch):
    monkeypatch.delattr(os, "pidfd_open")

    child = spawn("exit 7")

    assert await asyncio.wait_for(child.wait(), 5) == 7


async def test_many_children_reaped_without_leaks(spawn):
    fds_before = open_fds()

    children = [spawn(f"exit {index % 5}") for index in range(200)]
    codes = await asyncio.wait_for(asyncio.gather(*(child.wait() for child in children)), 30)

    assert codes == [index % 5 for index in range(200)]
    assert open_fds() == fds_before
    zombies = [
        pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
        if (fields := stat_fields(pid)) and fields[0] == "Z" and int(fields[4 - 3]) == os.getpid()
    ]
    assert zombies == []


# Signals and stopping


async def test_signal_group_after_exit(spawn):
    child = spawn("exit 0")
    await child.wait()

    assert child.signal_group(signal.SIGTERM) is False
    assert child.group_alive() is False


async def test_stop_sleep_is_quick(spawn):
    child = spawn("sleep 1000")
    started = time.monotonic()

    assert await child.stop(timeout=30) == -signal.SIGTERM

    # dash forks sleep, whose zombie waits for PID 1 to reap it, and some inits reap
    # only every second or two (1.5 s measured in a Firecracker VM).
    assert time.monotonic() - started < 5
    assert stat_fields(child.pid) is None
    assert not group_members(child.pid)
    assert child.group_alive() is False


async def test_stop_ignored_term_kills(spawn):
    child = spawn('trap "" TERM; sleep 1000')
    await wait_until(sleep_in_group(child))
    started = time.monotonic()

    assert await child.stop(timeout=0.5) == -signal.SIGKILL

    assert time.monotonic() - started >= 0.5
    assert not group_members(child.pid)


async def test_stop_member_ignoring_term(spawn):
    child = spawn('(trap "" TERM; sleep 1000) & wait')
    await wait_until(sleep_in_group(child))

    assert await child.stop(timeout=0.5) == -signal.SIGTERM

    assert not group_members(child.pid)


async def test_stop_member_after_leader_exited(spawn):
    child = spawn('(trap "" TERM; sleep 1000) & echo started')
    assert await child.wait() == 0
    await wait_until(sleep_in_group(child))
    assert child.group_alive() is True

    assert await child.stop(timeout=0.3) == 0

    assert not group_members(child.pid)
    assert child.group_alive() is False


ZOMBIE_SCRIPT = """
import os, time
middle = os.fork()
if middle == 0:
    zombie = os.fork()
    if zombie == 0:
        os._exit(0)
    os.setsid()
    print(os.getpid(), zombie, flush=True)
    time.sleep(1000)
    os._exit(0)
"""


async def test_stop_only_zombie_left(spawn, tmp_path):
    # The group keeps one zombie, whose parent moved to a session of its own and
    # never reaps it. So killpg(pgid, 0) succeeds for as long as that parent lives.
    script = tmp_path / "zombie.py"
    script.write_text(ZOMBIE_SCRIPT)
    child = spawn(f"exec {shlex.quote(sys.executable)} {shlex.quote(str(script))}")
    await wait_until(lambda: child.stdout_path.read_text().endswith("\n"))
    middle, zombie = map(int, child.stdout_path.read_text().split())
    try:
        assert await child.wait() == 0
        await wait_until(lambda: stat_fields(zombie)[0] == "Z")
        assert group_members(child.pid) == [zombie]

        assert await asyncio.wait_for(child.stop(timeout=0.3), 5) == 0

        # middle left the session, and its parent link leads to PID 1 (no subreaper
        # here) and no marker was given, so stop() cannot tell that it is the instance's.
        assert stat_fields(middle)[0] != "Z", "stop() killed a process it had no way to trace"
    finally:
        os.kill(middle, signal.SIGKILL)


async def test_stop_custom_signal(spawn):
    child = spawn("sleep 1000")
    # dash catches SIGINT. A SIGINT sent before dash had started sleep left the group
    # running in one run, so the test waits for sleep first.
    await wait_until(sleep_in_group(child))

    assert await child.stop(stop_signal=signal.SIGINT, timeout=5) == -signal.SIGINT


async def test_stop_twice(spawn):
    child = spawn("sleep 1000")

    assert await child.stop() == -signal.SIGTERM
    assert await child.stop() == -signal.SIGTERM


async def test_stop_concurrent_sends_one_signal(spawn):
    child = spawn("trap 'echo TERM' TERM; while :; do sleep 1; done")
    await wait_until(sleep_in_group(child))

    codes = await asyncio.gather(*(child.stop(timeout=0.5) for _ in range(3)))

    assert codes == [-signal.SIGKILL] * 3
    assert child.stdout_path.read_text() == "TERM\n"
    assert not group_members(child.pid)


async def test_stop_cancelled_caller_still_stops(spawn):
    child = spawn('trap "" TERM; sleep 1000')
    await wait_until(sleep_in_group(child))
    caller = asyncio.ensure_future(child.stop(timeout=0.2))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller

    assert await asyncio.wait_for(child.wait(), 5) == -signal.SIGKILL
    await wait_until(lambda: not group_members(child.pid))


async def test_stop_after_exit_returns_code(spawn):
    child = spawn("exit 5")
    assert await child.wait() == 5

    assert await child.stop() == 5


async def test_stop_right_after_spawn(spawn):
    child = spawn("exit 5")

    assert await child.stop() in (5, -signal.SIGTERM)
    assert not group_members(child.pid)


async def test_stop_raises_when_group_survives_kill(spawn, monkeypatch):
    child = spawn('trap "" TERM; sleep 1000')
    await wait_until(sleep_in_group(child))
    # Stand-in for a process in D state: the kernel is never asked to kill the group.
    monkeypatch.setattr(process, "KILL_TIMEOUT", 0.2)
    monkeypatch.setattr(child, "signal_group", lambda signum: True)
    monkeypatch.setattr(child, "group_alive", lambda: True)

    with pytest.raises(TimeoutError, match=f"stop of process group {child.pid} timed out"):
        await child.stop(timeout=0.2)


# read_start_time


async def test_read_start_time_odd_command_name(tmp_path):
    odd_name = tmp_path / "a) (b c) 1 2"
    odd_name.symlink_to("/bin/sleep")
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    before = int(time.clock_gettime(time.CLOCK_BOOTTIME) * ticks_per_second)
    sleeper = subprocess.Popen([str(odd_name), "1000"])
    try:
        await wait_until(lambda: comm(sleeper.pid) == odd_name.name)
        after = int(time.clock_gettime(time.CLOCK_BOOTTIME) * ticks_per_second)

        start_time = read_start_time(sleeper.pid)

        assert start_time is not None
        assert before - 1 <= start_time <= after + 1
    finally:
        sleeper.kill()
        sleeper.wait()
    assert read_start_time(sleeper.pid) is None


def test_read_start_time_missing_process():
    # Linux caps pid_max at 2**22, so this pid never exists.
    assert read_start_time(2**22 + 1) is None


# -- subreaper ---------------------------------------------------------------------


@pytest.fixture
async def subreaper():
    loop = asyncio.get_running_loop()
    assert process.become_subreaper(loop)
    yield
    process.stop_being_subreaper(loop)


async def test_subreaper_reaps_orphans_at_once(subreaper, spawn):
    """As a subreaper, a stopped group leaves no zombie: the orphaned child is reaped here."""
    # dash forks `sleep` for the last command instead of exec'ing it: two processes.
    # The comment makes the command more than words, so it runs through the shell.
    child = spawn("sleep 1000 # in a shell")
    await wait_until(sleep_in_group(child))
    [sleeper] = sleep_pids(child)

    os.kill(child.pid, signal.SIGKILL)
    assert await asyncio.wait_for(child.wait(), 5) == -signal.SIGKILL
    # The sleep is now an orphan, re-parented to this process rather than to PID 1.
    await wait_until(lambda: (stat_fields(sleeper) or ["", "0"])[1] == str(os.getpid()))

    started = time.monotonic()
    assert await child.stop(timeout=5.0) == -signal.SIGKILL
    assert time.monotonic() - started < 2.0
    assert stat_fields(sleeper) is None


# -- commands run without the shell ------------------------------------------------------


@pytest.fixture
def programs(tmp_path: Path) -> Path:
    """A directory with an executable `prog`, and a file `data` that is not executable."""
    directory = tmp_path / "bin"
    directory.mkdir()
    (directory / "prog").write_text("#!/bin/sh\necho prog \"$@\"\n")
    (directory / "prog").chmod(0o755)
    (directory / "data").write_text("not a program\n")
    return directory


@pytest.mark.parametrize(("command", "argv"), [
    ("prog", ["prog"]),
    ("  prog\t-x  --name=a,b:c@d%e+f ./g ", ["prog", "-x", "--name=a,b:c@d%e+f", "./g"]),
    ("exec prog 1", ["prog", "1"]),
])
def test_direct_argv_of_words(programs: Path, command: str, argv: list[str]) -> None:
    assert direct_argv(command, {"PATH": f"/nonexistent:{programs}"}) == (str(programs / "prog"), argv)


@pytest.mark.parametrize("command", [
    "prog 'a b'", 'prog "a"', "prog $HOME", "prog `date`", "prog > out", "prog 2>&1", "prog; prog",
    "prog && prog", "prog | prog", "prog &", "prog *", "prog ?", "prog [a]", "prog ~", "prog # comment",
    "prog\nprog", "prog \\n", "(prog)", "A=1 prog", "echo hi", "kill 1", "cd /", "exec", "exec -a x prog",
    "", "   ", "data", "missing", "prog é",
])
def test_direct_argv_leaves_the_rest_to_the_shell(programs: Path, command: str) -> None:
    assert direct_argv(command, {"PATH": str(programs)}) is None


def test_direct_argv_path_rules(programs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A word with a slash is the program itself; an empty PATH entry is the current
    # directory; without PATH, dash's default path is searched.
    assert direct_argv(f"{programs}/prog", {}) == (f"{programs}/prog", [f"{programs}/prog"])
    assert direct_argv(f"{programs}/data", {}) is None
    monkeypatch.chdir(programs)
    assert direct_argv("prog", {"PATH": "/nonexistent:"}) == ("./prog", ["prog"])
    sleep = direct_argv("sleep 1", {})
    assert sleep is not None and sleep[0] in ("/usr/bin/sleep", "/bin/sleep")


async def test_words_run_without_shell(spawn) -> None:
    child = spawn("sleep 1000")

    assert comm(child.pid) == "sleep"
    assert Path(f"/proc/{child.pid}/cmdline").read_bytes() == b"sleep\x001000\x00"
    assert group_members(child.pid) == [child.pid]
    assert await child.stop(timeout=5) == -signal.SIGTERM


async def test_script_without_interpreter_line_runs_in_shell(spawn, programs: Path) -> None:
    # exec fails with ENOEXEC, and the shell runs such a file as a shell script.
    (programs / "plain").write_text("echo plain script $#\n")
    (programs / "plain").chmod(0o755)
    child = spawn("plain a b", env={**TEST_ENV, "PATH": f"{programs}:{TEST_ENV['PATH']}"})

    assert await asyncio.wait_for(child.wait(), 5) == 0
    assert child.stdout_path.read_text() == "plain script 2\n"


# -- the stop signal before or after the first scan ----------------------------------------


@pytest.fixture
def scans_and_signals(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record, in order, each /proc scan that stop() starts and each signal it sends to a group."""
    calls: list[str] = []
    scan, signal_group = process._scan, ChildProcess.signal_group

    def recording_scan(loop):
        calls.append("scan")
        return scan(loop)

    def recording_signal_group(self, signum):
        if signum != 0:
            calls.append(signal.Signals(signum).name)
        return signal_group(self, signum)

    monkeypatch.setattr(process, "_scan", recording_scan)
    monkeypatch.setattr(ChildProcess, "signal_group", recording_signal_group)
    return calls


async def test_lone_leader_signalled_first(subreaper, spawn, scans_and_signals: list[str]) -> None:
    # No child and no orphan: nothing can lose its parent link, so the signal goes first.
    child = spawn("sleep 1000")

    assert await child.stop(timeout=5) == -signal.SIGTERM
    assert scans_and_signals[0] == "SIGTERM"


async def test_leader_with_child_scanned_first(subreaper, spawn, scans_and_signals: list[str]) -> None:
    child = spawn("sleep 1000 # in a shell")
    await wait_until(sleep_in_group(child))

    assert await child.stop(timeout=5) == -signal.SIGTERM
    assert scans_and_signals[:2] == ["scan", "SIGTERM"]


async def test_slave_orphan_means_scan_first(subreaper, spawn, scans_and_signals: list[str]) -> None:
    # An orphan could belong to the instance, and be found only by its own children.
    shell = spawn("sleep 1000 # in a shell")
    await wait_until(sleep_in_group(shell))
    [orphan] = sleep_pids(shell)
    os.kill(shell.pid, signal.SIGKILL)
    await wait_until(lambda: (stat_fields(orphan) or ["", "0"])[1] == str(os.getpid()))
    child = spawn("sleep 1000")

    try:
        assert await child.stop(timeout=5) == -signal.SIGTERM
        assert scans_and_signals[:2] == ["scan", "SIGTERM"]
    finally:
        os.kill(orphan, signal.SIGKILL)


def test_direct_argv_search_cache_checks_the_file(programs: Path) -> None:
    env = {"PATH": str(programs)}
    assert direct_argv("prog", env) == (str(programs / "prog"), ["prog"])
    (programs / "prog").unlink()
    assert direct_argv("prog", env) is None


async def test_start_time_read_later(spawn) -> None:
    child = spawn("sleep 1000", start_time_now=False)
    assert child.start_time is None

    start_time = await asyncio.wait_for(child.start_time_read, 5)

    assert start_time == read_start_time(child.pid)
    assert child.start_time == start_time
    assert await child.stop(timeout=5) == -signal.SIGTERM


@pytest.mark.parametrize("given", [None, "/", "/nonexistent", "relative"])
async def test_words_get_shell_pwd(spawn, given: str | None) -> None:
    # dash keeps an inherited PWD that names the working directory, else exports getcwd().
    env = dict(TEST_ENV) if given is None else {**TEST_ENV, "PWD": given}
    shell = spawn("printenv PWD; :", env=env)  # Not only words: runs in the shell.
    direct = spawn("printenv PWD", env=env)

    assert await asyncio.wait_for(shell.wait(), 5) == 0
    assert await asyncio.wait_for(direct.wait(), 5) == 0
    assert direct.stdout_path.read_text() == shell.stdout_path.read_text()
