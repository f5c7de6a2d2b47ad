"""Start and stop one instance: a ``/bin/sh -c COMMAND`` process in its own session.

Why ``os.posix_spawn``: glibc (2.24 and later) implements it with
``clone(CLONE_VM | CLONE_VFORK)``, so the cost of a spawn does not grow with the
slave's memory, and no Python code runs in the child. ``asyncio.create_subprocess_*``
would wait for each child in a thread of its own (ThreadedChildWatcher, the default
in Python 3.11), and ``subprocess.Popen`` cannot use vfork with a preexec_fn.
``setsid=True`` makes the child the leader of a new session and process group
(pgid == pid), so one ``killpg`` reaches every process it starts, unless a process
moves itself to another group or session.

The child's stdin is ``/dev/null`` and its stdout and stderr are log files opened in
append mode, so there is never a pipe for the slave to drain.

Why a pidfd: ``os.pidfd_open(pid)`` returns a file descriptor that becomes readable
when the process exits, so the event loop watches all children with one epoll set:
no thread per child and no polling timer. The child is reaped with ``waitpid`` as
soon as it exits, whether or not anyone awaits it, so no zombie is left behind.

NOTE: another reaper in the same process (``waitpid(-1)``, or asyncio's
SafeChildWatcher or FastChildWatcher) could collect a child's status first, and the
child's returncode would then be lost.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import signal
import stat
import threading
import time
from pathlib import Path

import structlog

log = structlog.get_logger("gdpm.process")

SHELL = "/bin/sh"

# Seconds stop() waits for the group to disappear after SIGKILL. Only a process in
# uninterruptible sleep (D state) can outlive SIGKILL this long.
KILL_TIMEOUT = 5.0

# Seconds between two group checks while stop() waits. The leader's exit is an event,
# but the kernel sends no event when the last member of a process group exits.
GROUP_POLL_INTERVAL = 0.05

# Whether spawn_shell has made the fds that the slave inherited non-inheritable.
_inherited_fds_checked = False

_LOG_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_LOG_MODE = 0o644

# Every signal is reset to its default action in the child. Otherwise dispositions
# that the slave ignores would be inherited through exec: Python ignores SIGPIPE and
# SIGXFSZ, and a slave started by nohup ignores SIGHUP.
# NOTE: glibc reserves signals 32 and 33, so valid_signals() omits them, and its
# posix_spawn (2.36 checked) leaves them ignored in the child.
_DEFAULT_SIGNALS = tuple(sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}))

# posix_spawn in Python 3.11 has no chdir action, and os.chdir() in the slave would
# change the directory of every thread. So a first shell changes the directory and
# execs a second `/bin/sh -c COMMAND`: COMMAND reaches that shell as one argument,
# unquoted and unevaluated, so it is parsed exactly as by `/bin/sh -c COMMAND`, with
# the same $0 and no positional parameters. `cd -P` resolves `..` after symlinks,
# as chdir() does. On failure, cd prints the reason to stderr and the exit status is
# cd's (2 for dash).
_CHDIR_SCRIPT = 'cd -P -- "$1" || exit; exec /bin/sh -c "$2"'


def spawn_shell(
    command: str, *, env: dict[str, str], cwd: str | None, stdout_path: Path, stderr_path: Path,
) -> ChildProcess:
    """Start ``/bin/sh -c COMMAND`` in a new session and return its ChildProcess.

    Must be called from a running event loop, which reaps the child when it exits.
    Raises OSError, naming the path, when a log file cannot be opened or ``cwd`` is
    not a directory. Nothing is started then.
    """
    loop = asyncio.get_running_loop()
    global _inherited_fds_checked
    if not _inherited_fds_checked:
        _set_cloexec_on_inherited_fds()
        _inherited_fds_checked = True

    argv = [SHELL, "-c", command]
    if cwd is not None:
        argv = [SHELL, "-c", _CHDIR_SCRIPT, SHELL, _absolute_directory(cwd), command]

    stdout_fd = _open_log(stdout_path)
    try:
        stderr_fd = stdout_fd if stderr_path == stdout_path else _open_log(stderr_path)
        try:
            pid = os.posix_spawn(
                SHELL, argv, env,
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, stdout_fd, 1),
                    (os.POSIX_SPAWN_DUP2, stderr_fd, 2),
                ],
                setsid=True,
                # An empty mask: the child must not inherit signals blocked in this thread.
                setsigmask=(),
                setsigdef=_DEFAULT_SIGNALS,
            )
        finally:
            if stderr_fd != stdout_fd:
                os.close(stderr_fd)
    finally:
        os.close(stdout_fd)
    return ChildProcess._watch(pid, loop)


def watch_child(pid: int, loop: asyncio.AbstractEventLoop) -> ChildProcess:
    """Watch and reap a child this process spawned itself, which must lead its own process group."""
    return ChildProcess._watch(pid, loop)


def _set_cloexec_on_inherited_fds() -> None:
    # Python creates its fds non-inheritable, but the slave may have been started with
    # inheritable fds above 2 (a shell or a job runner can leak them), and each child
    # would get a copy. posix_spawn in Python 3.11 has no "close all other fds" action,
    # and listing the fds at every spawn would cost O(open fds) per spawn.
    # NOTE: so an inheritable fd that C code opens after the first spawn still leaks.
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass  # Closed since the listing, such as the listing's own fd.


def _open_log(path: Path) -> int:
    fd = os.open(path, _LOG_FLAGS, _LOG_MODE)
    if fd > 2:
        return fd
    # The slave runs with a standard descriptor closed, and the log file got it. Move
    # it above 2, or the child's own set-up of 0, 1 and 2 could overwrite it.
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def _absolute_directory(cwd: str) -> str:
    # An absolute path keeps the shell's cd from searching CDPATH.
    path = os.path.join(os.getcwd(), cwd)
    if not stat.S_ISDIR(os.stat(path).st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    return path


def read_start_time(pid: int) -> int | None:
    """Read the start time of a process: field 22 of /proc/PID/stat, in clock ticks since boot.

    Returns None when the process does not exist. The pair (pid, start time)
    identifies a process, because a reused pid gets a later start time.
    """
    fields = _read_stat_fields(pid)
    return None if fields is None else int(fields[22 - 3])


def _read_stat_fields(pid: int) -> list[bytes] | None:
    """Read fields 3 and later of /proc/PID/stat, so that field N is at index N - 3."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        data = os.read(fd, 4096)
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)
    # Field 2 is the command name in parentheses, and it may itself contain spaces and
    # parentheses. The last ')' ends it, and field 3 follows after one space.
    return data[data.rindex(b")") + 2:].split()


def _group_member_states(pgid: int) -> dict[int, str]:
    """Scan /proc for the processes of a group: pid to state (field 3, such as R, S, D or Z).

    This reads every process's stat file, so it runs only when a stop has timed out.
    """
    states = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _read_stat_fields(int(name))
        if fields is not None and int(fields[5 - 3]) == pgid:
            states[int(name)] = fields[0].decode()
    return states


class ChildProcess:
    """A child started by spawn_shell or registered with watch_child, the leader of its own process group.

    ``returncode`` is None while the leader runs, then its exit code, or -SIGNUM
    when a signal ended it (as in subprocess).
    """

    def __init__(self, pid: int, start_time: int | None, loop: asyncio.AbstractEventLoop) -> None:
        self.pid = pid
        self.start_time = start_time
        self.returncode: int | None = None
        self._loop = loop
        self._exited: asyncio.Future[int] = loop.create_future()
        self._pidfd: int | None = None
        self._stopping: asyncio.Task[int] | None = None
        # Set once killpg has failed with ESRCH. From then on the pgid may belong to
        # another group, because the number is free for reuse, so it is never signalled.
        self._group_gone = False

    def __repr__(self) -> str:
        return f"<ChildProcess pid={self.pid} start_time={self.start_time} returncode={self.returncode}>"

    @classmethod
    def _watch(cls, pid: int, loop: asyncio.AbstractEventLoop) -> ChildProcess:
        try:
            child = cls(pid, read_start_time(pid), loop)
            _children[pid] = child
            child._watch_exit()
        except BaseException:
            # Nothing could reap the child later, so kill and reap it now.
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        return child

    def _watch_exit(self) -> None:
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except (AttributeError, OSError) as error:
            # No pidfd: a kernel before 5.3 (ENOSYS), a seccomp filter that rejects the
            # system call, or an os module without pidfd_open. A blocking waitpid in a
            # thread of its own works everywhere. The default executor is not used,
            # because a few dozen long-running children would fill it for good.
            log.debug("pidfd_open unavailable, waiting in a thread", pid=self.pid, error=str(error))
            threading.Thread(
                target=self._wait_in_thread, name=f"waitpid-{self.pid}", daemon=True,
            ).start()
            return
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        if self.returncode is not None:
            return  # The orphan reaper got here first.
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            # Someone else reaped the child (or SIGCHLD is ignored), so its status is lost.
            log.warning("child was reaped by other code, exit status lost, returncode set to 255", pid=self.pid)
            pid, status = self.pid, 255 << 8
        if pid == 0:
            return  # Not expected: a pidfd becomes readable only once the process has exited.
        if self._pidfd is not None:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
        self._set_exit_status(status)

    def _wait_in_thread(self) -> None:
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            log.warning("child was reaped by other code, exit status lost, returncode set to 255", pid=self.pid)
            status = 255 << 8
        try:
            self._loop.call_soon_threadsafe(self._set_exit_status, status)
        except RuntimeError:
            pass  # The loop is closed, so no task can await the result any more.

    def _set_exit_status(self, status: int) -> None:
        _children.pop(self.pid, None)
        if self.returncode is not None:
            return  # Reaped twice: by the orphan reaper, then by the waitpid thread.
        self.returncode = os.waitstatus_to_exitcode(status)
        self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        """Wait for the leader to exit and return its returncode.

        Any number of tasks may wait at once. Cancelling one of them cancels only
        that wait.
        """
        return await asyncio.shield(self._exited)

    def signal_group(self, signum: int) -> bool:
        """Send ``signum`` to every process of the group.

        Returns False when the group no longer exists.

        NOTE: once the leader is reaped and the last member has exited, the kernel may
        give the pgid number to a new session. A call that comes after that, with no
        call in between that found the group gone, would signal the new group.
        """
        if self._group_gone:
            return False
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            self._group_gone = True
            return False
        return True

    def group_alive(self) -> bool:
        """Check whether any process of the group exists, zombies included.

        killpg(pgid, 0) succeeds as long as the group has a member, even a zombie.
        """
        try:
            return self.signal_group(0)
        except PermissionError:
            return True  # A member exists but runs as another user.

    async def stop(self, *, stop_signal: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Stop the whole group and return the leader's returncode.

        Sends ``stop_signal`` to the group and waits up to ``timeout`` seconds for the
        leader to exit and the group to empty, then sends SIGKILL to the group. When
        stop() returns, no process of the group is alive, though zombies that their
        parent has not reaped yet may remain. A process that moved to another group or
        session is not stopped. Raises TimeoutError when a live process of the group
        outlives SIGKILL by KILL_TIMEOUT seconds.

        Calls that overlap share one stop, whose arguments are those of the first call.
        A call after the process has exited stops any members left and returns the
        leader's returncode.
        """
        if self._stopping is None or self._stopping.done():
            self._stopping = self._loop.create_task(
                self._stop_group(stop_signal, timeout), name=f"stop-{self.pid}",
            )
        return await asyncio.shield(self._stopping)

    async def _stop_group(self, stop_signal: int, timeout: float) -> int:
        self.signal_group(stop_signal)
        if await self._wait_group_gone(timeout):
            return self.returncode

        log.info("process group outlived the stop signal, sending SIGKILL",
                 pid=self.pid, stop_signal=stop_signal, timeout=timeout)
        self.signal_group(signal.SIGKILL)
        if await self._wait_group_gone(KILL_TIMEOUT):
            return self.returncode

        states = _group_member_states(self.pid)
        raise TimeoutError(
            f"stop of process group {self.pid} timed out: processes still alive {KILL_TIMEOUT} s "
            f"after SIGKILL, pid to state {states}. A process in state D (uninterruptible sleep) "
            f"exits only when the kernel call it waits in returns, such as I/O on a hung file system."
        )

    async def _wait_group_gone(self, timeout: float) -> bool:
        """Wait until the leader has been reaped and no live process is left in the group.

        Returns False when that has not happened after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        await asyncio.wait([self._exited], timeout=timeout)
        if not self._exited.done():
            return False
        while self.group_alive():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._only_zombies_left()
            await asyncio.sleep(min(GROUP_POLL_INTERVAL, remaining))
        return True

    def _only_zombies_left(self) -> bool:
        # killpg(pgid, 0) also succeeds for zombies. A member whose parent died waits
        # for PID 1 to reap it, and some inits reap late or never (a container whose
        # PID 1 is not an init). A zombie is dead, so the stop is complete.
        states = _group_member_states(self.pid)
        if not states or set(states.values()) <= {"Z", "X"}:
            if states:
                log.warning("process group has only zombies left, which their parent has not reaped",
                            pid=self.pid, zombies=sorted(states))
            return True
        return False


# -- subreaper ---------------------------------------------------------------------

# The children spawn_shell started that have not been reaped yet, by pid.
_children: dict[int, ChildProcess] = {}

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper(loop: asyncio.AbstractEventLoop) -> bool:
    """Make this process the reaper of its orphaned descendants, and reap them on SIGCHLD.

    Without it, a process that an instance forked and left behind (dash forks the last
    command of ``sh -c`` rather than exec'ing it) is re-parented to PID 1 when its
    parent dies. Its zombie then keeps the process group alive until PID 1 reaps it,
    which some container inits do late or never. As a subreaper the slave gets those
    orphans itself, reaps them at once, and can still find them by their process group.

    Returns False, and changes nothing, where prctl is not available.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as error:
        log.warning("cannot become a child subreaper; orphans of instances are left to PID 1",
                    error=str(error))
        return False
    loop.add_signal_handler(signal.SIGCHLD, _reap_exited_children)
    return True


def stop_being_subreaper(loop: asyncio.AbstractEventLoop) -> None:
    """Undo become_subreaper: orphans go to PID 1 again, SIGCHLD gets its default action."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    loop.remove_signal_handler(signal.SIGCHLD)
    _reap_exited_children()


def _reap_exited_children() -> None:
    """Reap every exited child: spawn_shell's through their ChildProcess, orphans directly.

    waitid with WNOWAIT only looks at a child, so a leader's status is collected by its
    own ChildProcess, never lost here.
    """
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        child = _children.get(info.si_pid)
        if child is not None:
            child._reap()
            continue
        try:
            os.waitpid(info.si_pid, os.WNOHANG)
        except ChildProcessError:
            pass
