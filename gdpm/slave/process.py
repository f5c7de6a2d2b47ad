"""Start and stop one instance: a ``/bin/sh -c COMMAND`` process in its own session.

A command that is only words runs without the shell, as the program that the shell
would have run (see "running a simple command without the shell" below).

Why ``os.posix_spawn``: glibc (2.24 and later) implements it with
``clone(CLONE_VM | CLONE_VFORK)``, so the cost of a spawn does not grow with the
slave's memory, and no Python code runs in the child. ``asyncio.create_subprocess_*``
would wait for each child in a thread of its own (ThreadedChildWatcher, the default
in Python 3.11), and ``subprocess.Popen`` cannot use vfork with a preexec_fn.
``setsid=True`` makes the child the leader of a new session and process group
(pgid == pid), so one ``killpg`` reaches every process it starts, unless a process
moves itself to another group or session.

The child's stdin is ``/dev/null``. Its stdout and stderr are log files opened in
append mode, or descriptors that the caller passes, such as the write end of a pipe
that the caller drains.

How exits are seen: in a process that called ``become_subreaper`` (the slave), one
SIGCHLD handler reaps every exited child with ``waitid`` and hands each status to its
ChildProcess, so an instance costs no descriptor and no thread. Elsewhere each child
gets a pidfd (``os.pidfd_open``), which becomes readable when the process exits, so the
event loop watches all children with one epoll set. Either way the child is reaped as
soon as it exits, whether or not anyone awaits it, so no zombie is left behind.

A stop reaches every descendant of the instance, not only its process group: see
``ChildProcess.stop`` and the section "Finding the processes of an instance" below.

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
import re
import signal
import stat
import threading
import time
import weakref
from collections.abc import Awaitable
from pathlib import Path

import structlog

log = structlog.get_logger("gdpm.process")

SHELL = "/bin/sh"

# Seconds stop() waits for the instance's processes to disappear after SIGKILL. Only
# a process in uninterruptible sleep (D state) can outlive SIGKILL this long.
KILL_TIMEOUT = 5.0

# Seconds between two checks while stop() waits: the first interval, doubled after
# each check up to the second. The leader's exit is an event, but the kernel sends no
# event when the last member of a process group or any other descendant exits.
FIRST_POLL_INTERVAL = 0.005
GROUP_POLL_INTERVAL = 0.05

# Seconds stop() keeps scanning /proc, once the stop timeout has passed, for new
# children of the processes it has stopped with SIGSTOP before it kills them, and the
# seconds between two of those scans.
SWEEP_TIMEOUT = 0.5
SWEEP_INTERVAL = 0.01

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


# -- running a simple command without the shell ---------------------------------------
#
# dash forks the last command of `sh -c COMMAND` rather than exec'ing it, so each
# instance would be two processes, a shell waiting for its one child. For a command
# that is only words, running the program itself gives the same result as the shell
# with one spawn and one process fewer. It applies only when the shell would do
# nothing but split the words and search PATH:
#
# - every character is a letter, a digit, a blank or one of _@%+=:,./- (no quote,
#   expansion, redirection, operator, glob, comment or line break);
# - the first word is not an assignment (NAME=VALUE), nor a reserved word or built-in
#   of the shell (`echo` and `kill` behave differently from /bin/echo and /bin/kill);
#   a leading `exec` is dropped, as the shell would exec anyway;
# - the program gets the PWD that dash would have exported (see _with_shell_pwd);
# - the program is found the way the shell finds it. A word that contains a slash is
#   the program itself. Otherwise it is the first executable file of that name in the
#   PATH of the instance's environment, or in dash's default path when it has none.
#
# Any other command, a command with a working directory, and one whose exec fails
# (a script without a #! line, which the shell would run itself) run through the shell.

_SIMPLE_COMMAND = re.compile(r"[A-Za-z0-9_@%+=:,./\- \t]+")

# dash's reserved words and built-in commands (dash 0.5.12).
_SHELL_WORDS = frozenset((
    "! { } case do done elif else esac fi for if in then until while "
    ". : [ alias bg break cd chdir command continue echo eval exec exit export false fc fg "
    "getopts hash jobs kill local printf pwd read readonly return set shift test times trap "
    "true type ulimit umask unalias unset wait"
).split())

# The search path of dash when the environment has no PATH.
_DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def direct_argv(command: str, env: dict[str, str]) -> tuple[str, list[str]] | None:
    """Return the program and argv that ``/bin/sh -c COMMAND`` would exec, or None if it would do more.

    See "running a simple command without the shell" above.
    """
    if not _SIMPLE_COMMAND.fullmatch(command):
        return None
    words = command.split()
    if words[:1] == ["exec"]:
        words = words[1:]
    if not words or "=" in words[0] or words[0].startswith("-") or words[0] in _SHELL_WORDS:
        return None
    program = words[0]
    if "/" in program:
        return (program, words) if _is_executable_file(program) else None
    path = _search_path(program, env.get("PATH", _DEFAULT_PATH))
    return None if path is None else (path, words)


# The recent results of _search_path by (program, PATH), with the time of the search,
# so that a burst of 1000 spawns searches once. A result is reused for
# _SEARCH_CACHE_SECONDS after a check that the file is still executable. A program put
# earlier in PATH is found after that.
_SEARCH_CACHE_SECONDS = 1.0
_search_cache: dict[tuple[str, str], tuple[str, float]] = {}


def _search_path(program: str, search_path: str) -> str | None:
    """Return the first executable file named ``program`` in the directories of ``search_path``, as the shell would."""
    now = time.monotonic()
    cached = _search_cache.get((program, search_path))
    if cached is not None and now - cached[1] < _SEARCH_CACHE_SECONDS and _is_executable_file(cached[0]):
        return cached[0]
    for directory in search_path.split(":"):
        candidate = os.path.join(directory or ".", program)
        if _is_executable_file(candidate):
            if len(_search_cache) >= 1000:
                _search_cache.clear()
            _search_cache[(program, search_path)] = (candidate, now)
            return candidate
    return None


def _with_shell_pwd(env: dict[str, str]) -> dict[str, str]:
    """Return ``env`` with the PWD that dash exports: the given one if it names the working directory, else getcwd()."""
    inherited = env.get("PWD")
    if inherited and inherited.startswith("/"):
        try:
            if os.path.samefile(inherited, "."):
                return env
        except OSError:
            pass
    return {**env, "PWD": os.getcwd()}


def _is_executable_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode) and os.access(path, os.X_OK)
    except OSError:
        return False


def spawn_shell(
    command: str, *, env: dict[str, str], cwd: str | None,
    stdout: Path | int | None = None, stderr: Path | int | None = None,
    stdout_path: Path | None = None, stderr_path: Path | None = None,
    marker: bytes | None = None, start_time_now: bool = True,
) -> ChildProcess:
    """Start ``/bin/sh -c COMMAND`` in a new session and return its ChildProcess.

    ``stdout`` and ``stderr`` are each a path, opened in append mode and created with
    mode 0644 (minus the umask), or an open file descriptor, such as a pipe's write
    end. The child gets a copy of the descriptor as its fd 1 or 2, and the caller
    keeps its own and closes it after the call. ``stdout_path`` and ``stderr_path``
    are older names of the same arguments and take only a path.

    ``marker`` is one ``NAME=VALUE`` entry of ``env``, such as
    ``b"GDPM_INSTANCE_ID=web-0"``. stop() treats an orphan re-parented to this process
    (the subreaper) whose environment contains that exact entry as a process of this
    child, together with its descendants. So it should name one instance only.

    With ``start_time_now`` False, the child's ``start_time`` is None at first and
    read in a worker thread (see _StartTimeReader), and ``start_time_read`` is
    resolved once it is known.

    Must be called from a running event loop, which reaps the child when it exits.
    Raises OSError, naming the path or descriptor, when a log file cannot be opened,
    a descriptor is not open, or ``cwd`` is not a directory. Nothing is started then.
    """
    loop = asyncio.get_running_loop()
    stdout = _pick_output("stdout", stdout, stdout_path)
    stderr = _pick_output("stderr", stderr, stderr_path)
    if marker is not None:
        _check_marker(marker, env)
    global _inherited_fds_checked
    if not _inherited_fds_checked:
        _set_cloexec_on_inherited_fds()
        _inherited_fds_checked = True

    program, argv = SHELL, [SHELL, "-c", command]
    direct = direct_argv(command, env) if cwd is None else None
    if cwd is not None:
        argv = [SHELL, "-c", _CHDIR_SCRIPT, SHELL, _absolute_directory(cwd), command]

    # Descriptors that spawn_shell opened or duplicated itself, closed after the spawn.
    own_fds: list[int] = []
    # The caller's inheritable descriptors, which the child closes after its dup2.
    close_in_child: set[int] = set()
    try:
        stdout_fd = _output_fd("stdout", stdout, own_fds, close_in_child)
        if isinstance(stderr, int) or stderr != stdout:
            stderr_fd = _output_fd("stderr", stderr, own_fds, close_in_child)
        else:
            stderr_fd = stdout_fd  # One log file for both: one open file description, as with 2>&1.
        file_actions = [
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, stdout_fd, 1),
            (os.POSIX_SPAWN_DUP2, stderr_fd, 2),
            *((os.POSIX_SPAWN_CLOSE, fd) for fd in sorted(close_in_child)),
        ]
        pid = None
        if direct is not None:
            try:
                pid = _posix_spawn(*direct, _with_shell_pwd(env), file_actions)
            except OSError as error:
                # glibc reports the exec's error here (ENOEXEC for a script without #!).
                log.debug("exec failed, running the command through the shell", command=command,
                          program=direct[0], error=str(error))
        if pid is None:
            pid = _posix_spawn(program, argv, env, file_actions)
    finally:
        for fd in own_fds:
            os.close(fd)
    return ChildProcess._watch(pid, loop, marker, start_time_now=start_time_now)


def _posix_spawn(program: str, argv: list[str], env: dict[str, str], file_actions: list[tuple]) -> int:
    return os.posix_spawn(
        program, argv, env, file_actions=file_actions, setsid=True,
        # An empty mask: the child must not inherit signals blocked in this thread.
        setsigmask=(), setsigdef=_DEFAULT_SIGNALS,
    )


def watch_child(pid: int, loop: asyncio.AbstractEventLoop, marker: bytes | None = None) -> ChildProcess:
    """Watch and reap a child this process spawned itself, which must lead its own process group.

    ``marker`` is as in spawn_shell.
    """
    return ChildProcess._watch(pid, loop, marker)


def _pick_output(name: str, value: Path | int | None, old_value: Path | None) -> Path | int:
    if value is not None and old_value is not None:
        raise TypeError(f"spawn_shell() got both {name}= and {name}_path=; pass one of them")
    if value is None:
        value = old_value
    if value is None:
        raise TypeError(f"spawn_shell() missing the {name} path or file descriptor")
    if isinstance(value, int) and value < 0:
        raise ValueError(f"invalid {name} file descriptor {value}")
    return value


def _check_marker(marker: bytes, env: dict[str, str]) -> None:
    name, equals, value = os.fsdecode(marker).partition("=")
    if not equals or not name:
        raise ValueError(f"invalid marker {marker!r}: expected an environment entry NAME=VALUE")
    if env.get(name) != value:
        raise ValueError(f"invalid marker {marker!r}: env has {name}={env.get(name)!r}, so no process would carry it")


def _output_fd(name: str, output: Path | int, own_fds: list[int], close_in_child: set[int]) -> int:
    """Return a descriptor above 2 for ``output``.

    Adds it to ``own_fds`` when it was opened here, and adds a caller's inheritable
    descriptor to ``close_in_child``. Otherwise the child would keep that descriptor
    at its own number as well as on fd 1 or 2, and a pipe's reader would see EOF
    only once both copies are closed.
    """
    if not isinstance(output, int):
        fd = _open_log(output)
        own_fds.append(fd)
        return fd
    try:
        inheritable = os.get_inheritable(output)
    except OSError as error:
        raise OSError(error.errno, f"invalid {name} file descriptor {output}: {error.strerror}") from error
    if output <= 2:
        # A copy above 2, because the child's own set-up of 0, 1 and 2 could overwrite it.
        fd = fcntl.fcntl(output, fcntl.F_DUPFD_CLOEXEC, 3)
        own_fds.append(fd)
        return fd
    if inheritable:
        close_in_child.add(output)
    return output


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


# -- finding the processes of an instance ----------------------------------------
#
# A stop must reach every process the instance started, and some leave its process
# group: a child that calls setsid, or a double-forked daemon whose intermediate parent
# has exited. So stop() scans /proc and takes, with their start times:
#
# 1. the members of the instance's session (sid == the leader's pid), which include
#    its process group and any group that a member created with setpgid;
# 2. the orphans re-parented to this process, the subreaper, whose
#    /proc/PID/environ contains the instance's marker entry (GDPM_INSTANCE_ID=...);
# 3. the processes that an earlier scan of the same stop found;
# 4. every descendant of those by parent links, whatever its session or environment.
#
# The process group is signalled with killpg, and every other process one at a time,
# after checking that its pid still has the start time the scan recorded.
#
# A scan reads /proc/PID/stat of every process, about 10 us each in CPython 3.11 on a
# 2-vCPU VM, so about 20 ms with 2000 processes. It runs in a worker thread, and the
# stops that run at the same time share one scan (see _ProcessScanner).

# States (field 3 of /proc/PID/stat) of a process that has exited.
_DEAD_STATES = frozenset({"Z", "X", "x"})

# States of a process stopped by a signal or by a tracer.
_STOPPED_STATES = frozenset({"T", "t"})


class _ProcessInfo:
    """The fields of /proc/PID/stat that stop() uses."""

    __slots__ = ("state", "ppid", "pgid", "sid", "start_time")

    def __init__(self, state: str, ppid: int, pgid: int, sid: int, start_time: int) -> None:
        self.state = state
        self.ppid = ppid
        self.pgid = pgid
        self.sid = sid
        self.start_time = start_time

    @property
    def dead(self) -> bool:
        return self.state in _DEAD_STATES


class _ProcessTable:
    """One scan of /proc: every process by pid, with indexes by parent and by session.

    The stops that share a table also share the work that does not depend on the
    instance: the list of orphans and their environments.
    """

    def __init__(self, processes: dict[int, _ProcessInfo], spawned: frozenset[int] = frozenset()) -> None:
        self.processes = processes
        # The children that spawn_shell had started and not reaped when the scan began.
        self.spawned = spawned
        self.children: dict[int, list[int]] = {}
        self.sessions: dict[int, list[int]] = {}
        for pid, info in processes.items():
            self.children.setdefault(info.ppid, []).append(pid)
            self.sessions.setdefault(info.sid, []).append(pid)
        self._orphans: list[int] | None = None
        self._marker_entries: dict[int, frozenset[bytes]] = {}

    def orphans(self) -> list[int]:
        """Return the live children of this process that it did not spawn, and that no instance's session contains.

        These are the orphans that the subreaper received and that left their
        instance's session, so that only their environment can tell whose they are.
        Computed once per table: with 1000 instances this process has 1000 children.
        A child that was spawned when the scan began is no orphan, even if it has been
        reaped since: otherwise a stop of 1000 instances would read the environment of
        every instance that exited meanwhile.
        """
        if self._orphans is None:
            def spawned(pid: int) -> bool:
                return pid in self.spawned or pid in _children
            self._orphans = [
                pid for pid in self.children.get(os.getpid(), ())
                if not spawned(pid) and not spawned(self.processes[pid].sid) and not self.processes[pid].dead
            ]
            _forget_marker_entries(self._orphans, self.processes)
        return self._orphans

    def marker_entries(self, pid: int) -> frozenset[bytes]:
        """Return the marker entries of an orphan's environment, read once per table."""
        entries = self._marker_entries.get(pid)
        if entries is None:
            entries = self._marker_entries[pid] = _marker_entries(pid, self.processes[pid].start_time)
        return entries


# Names of the markers of every ChildProcess created so far, such as b"GDPM_INSTANCE_ID".
_marker_names: set[bytes] = set()

# The entries of /proc/PID/environ whose names are in _marker_names, by (pid, start
# time), for the orphans of the last table. An orphan's environment is read once, not
# once per scan: an instance that daemonizes leaves one orphan per run.
_marker_entries_cache: dict[tuple[int, int], frozenset[bytes]] = {}


def _marker_entries(pid: int, start_time: int) -> frozenset[bytes]:
    """Return the marker entries of a process's environment, or none when it cannot be read.

    It cannot be read when the process is gone, or belongs to another user, or is not
    dumpable (a setuid program).
    NOTE: the environment is read once per process. One that a process execs later
    (``exec env -i ...``) is not seen, so the process keeps the entries it had.
    """
    key = (pid, start_time)
    entries = _marker_entries_cache.get(key)
    if entries is None:
        try:
            with open(f"/proc/{pid}/environ", "rb") as environ:
                data = environ.read()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            data = b""
        entries = frozenset(entry for entry in data.split(b"\0") if entry.partition(b"=")[0] in _marker_names)
        if read_start_time(pid) == start_time:
            # Cached only if the environment read was that of the process with this start time.
            _marker_entries_cache[key] = entries
    return entries


def _forget_marker_entries(orphans: list[int], processes: dict[int, _ProcessInfo]) -> None:
    current = {(pid, processes[pid].start_time) for pid in orphans}
    for key in [key for key in _marker_entries_cache if key not in current]:
        del _marker_entries_cache[key]


def _scan_processes(spawned: frozenset[int] = frozenset()) -> _ProcessTable:
    """Read /proc/PID/stat of every process. Returns an empty table when /proc cannot be listed.

    ``spawned`` is a copy of the pids in ``_children``, taken before the scan.
    """
    processes: dict[int, _ProcessInfo] = {}
    try:
        names = os.listdir("/proc")
    except OSError as error:
        log.warning("cannot list /proc, so stop() finds no process outside the process group",
                    error=str(error))
        return _ProcessTable(processes, spawned)
    for name in names:
        if not name.isdigit():
            continue
        fields = _read_stat_fields(int(name))
        if fields is None:
            continue  # Reaped since the listing.
        processes[int(name)] = _ProcessInfo(
            state=fields[0].decode(), ppid=int(fields[4 - 3]), pgid=int(fields[5 - 3]),
            sid=int(fields[6 - 3]), start_time=int(fields[22 - 3]),
        )
    return _ProcessTable(processes, spawned)


class _ProcessScanner:
    """Shares /proc scans between the stops that run at the same time in one event loop.

    Each caller of scan() gets a table read by a scan that started after the call, so
    a process that existed when scan() was called is in it, unless it exited. The calls
    made before a scan starts share it, and calls made while one runs share the next.
    So with 1000 stops at once, /proc is read a few times, not 1000 times.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._next: asyncio.Future[_ProcessTable] | None = None
        self._running = False

    async def scan(self) -> _ProcessTable:
        if self._next is None:
            self._next = self._loop.create_future()
            if not self._running:
                # Started in the next loop iteration, so that the stops that begin in
                # this one share it.
                self._loop.call_soon(self._start)
        return await asyncio.shield(self._next)

    def _start(self) -> None:
        if self._running or self._next is None:
            return
        waiters, self._next = self._next, None
        self._running = True
        spawned = frozenset(_children)
        try:
            running = self._loop.run_in_executor(None, _scan_processes, spawned)
        except RuntimeError:
            # The default executor is shut down, as when the loop is closing.
            self._finish(waiters, None)
            return
        running.add_done_callback(lambda future: self._finish(waiters, future))

    def _finish(self, waiters: asyncio.Future[_ProcessTable], running: asyncio.Future[_ProcessTable] | None) -> None:
        self._running = False
        if running is None:
            waiters.set_result(_scan_processes())
        elif running.cancelled():
            waiters.cancel()
        elif running.exception() is not None:
            waiters.set_exception(running.exception())
        else:
            waiters.set_result(running.result())
        if self._next is not None:
            self._start()


_scanners: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _ProcessScanner] = weakref.WeakKeyDictionary()


def _scan(loop: asyncio.AbstractEventLoop) -> Awaitable[_ProcessTable]:
    scanner = _scanners.get(loop)
    if scanner is None:
        scanner = _scanners[loop] = _ProcessScanner(loop)
    return scanner.scan()


def _children_of(pid: int) -> list[int] | None:
    """Return the children of every thread of ``pid``, or None when they cannot be read.

    They cannot be read when the process is gone, or the kernel lacks
    CONFIG_PROC_CHILDREN (/proc/PID/task/TID/children).
    """
    children: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as file:
                children += map(int, file.read().split())
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return children


# The result of _has_orphans in the current iteration of each event loop, so that the
# stops that start together share one read of this process's children.
_orphans_seen: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, bool] = weakref.WeakKeyDictionary()


def _has_orphans(loop: asyncio.AbstractEventLoop) -> bool:
    """Check whether this process has a child that spawn_shell did not start (an orphan, or one it cannot tell)."""
    found = _orphans_seen.get(loop)
    if found is None:
        children = _children_of(os.getpid())
        found = children is None or any(pid not in _children for pid in children)
        _orphans_seen[loop] = found
        loop.call_soon(_orphans_seen.pop, loop, None)
    return found


def _is_live(pid: int, start_time: int) -> bool:
    """Check whether ``pid`` is still the process that started at ``start_time`` and has not exited."""
    fields = _read_stat_fields(pid)
    return fields is not None and int(fields[22 - 3]) == start_time and fields[0].decode() not in _DEAD_STATES


def _signal_process(pid: int, start_time: int, signum: int) -> bool:
    """Send ``signum`` to ``pid`` if it is still the process that started at ``start_time``.

    Returns False when that process is gone. With a pidfd there is no race: the
    start time is read after the pidfd is open, so a match proves that the pidfd
    refers to the recorded process.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    except (AttributeError, OSError):
        pidfd = None  # No pidfd_open: see ChildProcess._watch_exit.
    try:
        if read_start_time(pid) != start_time:
            return False
        if pidfd is not None and hasattr(signal, "pidfd_send_signal"):
            signal.pidfd_send_signal(pidfd, signum)
        else:
            # NOTE: without a pidfd, the process can exit and its pid be reused between
            # the check above and this kill, a window of microseconds.
            os.kill(pid, signum)
    except ProcessLookupError:
        return False
    except PermissionError as error:
        log.warning("cannot signal a process of the instance", pid=pid, signal=signum, error=str(error))
    finally:
        if pidfd is not None:
            os.close(pidfd)
    return True


def _signal_processes(processes: dict[int, int], signum: int) -> None:
    """Send ``signum`` to each process of ``processes`` (pid to start time), and remove those that are gone."""
    for pid, start_time in list(processes.items()):
        if not _signal_process(pid, start_time, signum):
            del processes[pid]


class ChildProcess:
    """A child started by spawn_shell or registered with watch_child, the leader of its own process group.

    ``returncode`` is None while the leader runs, then its exit code, or -SIGNUM
    when a signal ended it (as in subprocess). ``marker`` is the environment entry
    that stop() looks for in orphans (see spawn_shell), or None.
    """

    def __init__(self, pid: int, start_time: int | None, loop: asyncio.AbstractEventLoop,
                 marker: bytes | None = None) -> None:
        self.pid = pid
        self.start_time = start_time
        self.marker = marker
        if marker is not None and marker.partition(b"=")[0] not in _marker_names:
            _marker_names.add(marker.partition(b"=")[0])
            _marker_entries_cache.clear()  # The cached entries lack the new name.
        self.returncode: int | None = None
        self._loop = loop
        self._exited: asyncio.Future[int] = loop.create_future()
        # Resolved with start_time once it is known: None if the child was reaped first.
        self.start_time_read: asyncio.Future[int | None] = loop.create_future()
        self._pidfd: int | None = None
        self._stopping: asyncio.Task[int] | None = None
        # Set once killpg has failed with ESRCH. From then on the pgid may belong to
        # another group, because the number is free for reuse, so it is never signalled.
        self._group_gone = False

    def __repr__(self) -> str:
        return f"<ChildProcess pid={self.pid} start_time={self.start_time} returncode={self.returncode}>"

    @classmethod
    def _watch(cls, pid: int, loop: asyncio.AbstractEventLoop, marker: bytes | None = None, *,
               start_time_now: bool = True) -> ChildProcess:
        try:
            child = cls(pid, read_start_time(pid) if start_time_now else None, loop, marker)
            _children[pid] = child
            child._watch_exit()
            if start_time_now:
                child.start_time_read.set_result(child.start_time)
            else:
                _start_time_reader(loop).add(child)
        except BaseException:
            # Nothing could reap the child later, so kill and reap it now.
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        return child

    def _watch_exit(self) -> None:
        if self._loop in _reaper_loops:
            # The SIGCHLD reaper of become_subreaper reaps this child through the
            # _children registry, so a pidfd would only cost a descriptor per instance.
            return
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
        """Stop every process of the instance and return the leader's returncode.

        Sends ``stop_signal`` to the process group and to each process of the instance
        outside it (see "Finding the processes of an instance" above), and waits up to
        ``timeout`` seconds for all of them to exit. Then it stops all of them with
        SIGSTOP, scans until no new child appears, and sends SIGKILL to every one of
        them. When stop() returns, no process of the instance that it could find is
        alive, though zombies that their parent has not reaped yet may remain. Raises
        TimeoutError when a live process outlives SIGKILL by KILL_TIMEOUT seconds.

        Some processes are not found. One is an orphan that is in no session of the
        instance and whose environment lacks the marker, because it cleared its
        environment or spawn_shell got no marker. Its descendants are not found
        either. When this process is not a subreaper, no orphan is found, because
        orphans then go to PID 1.

        Calls that overlap share one stop, whose arguments are those of the first call
        (of stop or begin_stop). A call after the process has exited stops any
        processes left and returns the leader's returncode.
        """
        return await asyncio.shield(self.begin_stop(stop_signal=stop_signal, timeout=timeout))

    def begin_stop(self, *, stop_signal: int = signal.SIGTERM, timeout: float = 10.0) -> asyncio.Task[int]:
        """Start the stop that stop() waits for, and return its task.

        When the leader is the instance's only process (see _alone), it gets
        ``stop_signal`` before this returns: a slave that stops 1000 instances signals
        each one as it reads the request, not a few loop iterations later.
        """
        if self._stopping is None or self._stopping.done():
            alone = self._alone()
            if alone:
                self.signal_group(stop_signal)
            self._stopping = self._loop.create_task(
                self._stop_all(stop_signal, timeout, alone), name=f"stop-{self.pid}",
            )
        return self._stopping

    async def _stop_all(self, stop_signal: int, timeout: float, alone: bool) -> int:
        deadline = time.monotonic() + timeout
        if alone:
            # Signalled by begin_stop: nothing has to be found first.
            outsiders: dict[int, int] = {}
        else:
            # The scan comes before the signal, while the parent links of the processes
            # that left the group still lead to the group's members.
            outsiders = await self._find_outsiders()
            if outsiders:
                log.info("stopping processes of the instance outside its process group",
                         pid=self.pid, outsiders=sorted(outsiders))
            self.signal_group(stop_signal)
            _signal_processes(outsiders, stop_signal)
        if await self._wait_all_gone(deadline, outsiders, stop_signal, alone=alone):
            return self.returncode

        log.info("processes of the instance outlived the stop signal, sending SIGKILL",
                 pid=self.pid, stop_signal=stop_signal, timeout=timeout, outsiders=sorted(outsiders))
        await self._kill_all(outsiders)
        if await self._wait_all_gone(time.monotonic() + KILL_TIMEOUT, outsiders, signal.SIGKILL):
            return self.returncode

        states = await self._live_states(outsiders)
        raise TimeoutError(
            f"stop of process group {self.pid} timed out: processes still alive {KILL_TIMEOUT} s "
            f"after SIGKILL, pid to state {states}. A process in state D (uninterruptible sleep) "
            f"exits only when the kernel call it waits in returns, such as I/O on a hung file system."
        )

    def _alone(self) -> bool:
        """Check whether the leader is the instance's only process, so that the stop signal needs no scan first.

        True when the leader runs, has no child, and this process, a subreaper, has no
        orphan: then every other process of the instance would have to descend from the
        leader. The scan after the leader's exit still looks for processes that it
        started meanwhile. A process started between this check and the signal, that
        leaves the session and clears its environment before its parent exits, is not
        found: the same limit as for any orphan that does both.
        """
        if self.returncode is not None or self._group_gone or self._loop not in _reaper_loops:
            return False
        children = _children_of(self.pid)
        if children is None or children:
            return False
        return not _has_orphans(self._loop)

    async def _find_outsiders(self, known: dict[int, int] | None = None) -> dict[int, int]:
        """Scan /proc and return the live processes of the instance outside its process group, pid to start time.

        ``known`` are processes found earlier: they and their descendants are included
        while they live, wherever they were re-parented.
        """
        if self._group_gone and self.marker is None and not known:
            return {}  # Nothing left to start from, so no scan.
        table = await _scan(self._loop)
        return self._outsiders_in(table, known or {})

    def _outsiders_in(self, table: _ProcessTable, known: dict[int, int]) -> dict[int, int]:
        processes = table.processes
        roots: list[int] = []
        if self._session_is_ours(table):
            roots += table.sessions.get(self.pid, ())
        if self.marker is not None:
            roots += self._marked_orphans(table)
        roots += [pid for pid, start_time in known.items()
                  if pid in processes and processes[pid].start_time == start_time]

        found: set[int] = set()
        pending = roots
        while pending:
            pid = pending.pop()
            if pid in found:
                continue
            found.add(pid)
            pending += table.children.get(pid, ())

        own_pid = os.getpid()
        return {
            pid: processes[pid].start_time for pid in found
            if processes[pid].pgid != self.pid and not processes[pid].dead
            # Never this process, PID 1, or another child that this process watches
            # (another instance's leader, the guardian).
            and pid != own_pid and pid > 1 and pid not in _children
        }

    def _session_is_ours(self, table: _ProcessTable) -> bool:
        """Check whether the processes whose session id is ``self.pid`` belong to this instance.

        The kernel reuses a pid only once no process uses the number as a pid, process
        group id or session id. So the members belong to this instance while the leader
        lives with its start time, and also once the leader is gone.

        NOTE: wrong in one case, as in the guardian: the session emptied, its number was
        reused by a new session, and that session's leader exited, all before this
        scan. Then the new session's members are taken for this instance's.
        """
        if self._group_gone:
            return False
        leader = table.processes.get(self.pid)
        if leader is None:
            return True
        if self.start_time is not None:
            return leader.start_time == self.start_time
        return leader.sid == self.pid

    def _marked_orphans(self, table: _ProcessTable) -> list[int]:
        """Return the orphans (see _ProcessTable.orphans) whose environment contains the marker."""
        return [pid for pid in table.orphans() if self.marker in table.marker_entries(pid)]

    async def _wait_all_gone(self, deadline: float, outsiders: dict[int, int], signum: int, *,
                             alone: bool = False) -> bool:
        """Wait until the leader has been reaped and no live process of the instance is left.

        Processes that a scan finds meanwhile are sent ``signum`` and added to
        ``outsiders``. Returns False when processes are left at ``deadline``.

        ``alone``: the leader had no child and this subreaper no orphan when the stop
        began. Then a process that the leader started since is in its group, or is an
        orphan of this process, or descends from one of those: with the group gone and
        no orphan, there is nothing to scan for.
        """
        await asyncio.wait([self._exited], timeout=max(deadline - time.monotonic(), 0.0))
        if not self._exited.done():
            return False
        interval = FIRST_POLL_INTERVAL
        while True:
            for pid, start_time in list(outsiders.items()):
                if not _is_live(pid, start_time):
                    del outsiders[pid]
            if not outsiders and not self.group_alive():
                if alone and not _has_orphans(self._loop):
                    return True
                # What seems gone is checked with a new scan, which finds the processes
                # that left the group or the session after the last scan.
                found = await self._find_outsiders()
                if not found:
                    return True
                log.info("found more processes of the instance outside its process group",
                         pid=self.pid, outsiders=sorted(found), signal=signum)
                _signal_processes(found, signum)
                outsiders.update(found)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return await self._only_zombies_left(outsiders)
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * 2, GROUP_POLL_INTERVAL)

    async def _only_zombies_left(self, outsiders: dict[int, int]) -> bool:
        # killpg(pgid, 0) also succeeds for zombies. A member whose parent died waits
        # for PID 1 to reap it, and some inits reap late or never (a container whose
        # PID 1 is not an init). A zombie is dead, so the stop is complete.
        if outsiders:
            return False
        table = await _scan(self._loop)
        if self._outsiders_in(table, {}):
            return False
        members = self._group_members(table)
        if all(table.processes[pid].dead for pid in members):
            if members:
                log.warning("process group has only zombies left, which their parent has not reaped",
                            pid=self.pid, zombies=sorted(members))
            return True
        return False

    def _group_members(self, table: _ProcessTable) -> list[int]:
        if self._group_gone:
            return []
        return [pid for pid in table.sessions.get(self.pid, ()) if table.processes[pid].pgid == self.pid]

    async def _kill_all(self, outsiders: dict[int, int]) -> None:
        """Stop the group and every process of the instance outside it with SIGSTOP, then SIGKILL them all.

        A stopped process cannot fork or exit, so its children keep it as their
        parent, and the scans that follow find every child it has made. killpg
        reaches every member of the group, even one that a member is forking at that
        moment. The processes outside the group are signalled one at a time, so the
        scans go on until they find none of them running and no new one.
        """
        self.signal_group(signal.SIGSTOP)
        try:
            outsiders.update(await self._find_outsiders(outsiders))
            _signal_processes(outsiders, signal.SIGSTOP)
            await self._stop_new_children(outsiders)
        finally:
            # Even if the sweep failed or was cancelled, nothing is left stopped for good.
            self.signal_group(signal.SIGKILL)
            _signal_processes(outsiders, signal.SIGKILL)

    async def _stop_new_children(self, outsiders: dict[int, int]) -> None:
        """Send SIGSTOP to new processes of the instance and add them to ``outsiders``, until all of them are stopped.

        Gives up after SWEEP_TIMEOUT seconds, such as when a process waits in
        uninterruptible sleep (state D) and cannot stop yet.
        """
        deadline = time.monotonic() + SWEEP_TIMEOUT
        while True:
            table = await _scan(self._loop)
            current = self._outsiders_in(table, outsiders)
            new = {pid: start_time for pid, start_time in current.items() if pid not in outsiders}
            running = {pid: start_time for pid, start_time in current.items()
                       if table.processes[pid].state not in _STOPPED_STATES}
            if not new and not running:
                return
            if time.monotonic() > deadline:
                log.warning("processes of the instance did not stop with SIGSTOP within the sweep timeout, "
                            "so children that they fork from now on may survive",
                            pid=self.pid, timeout=SWEEP_TIMEOUT, running=sorted(running))
                outsiders.update(new)
                return
            # A process still running gets SIGSTOP again, in case another process sent it SIGCONT.
            _signal_processes(running, signal.SIGSTOP)
            _signal_processes(new, signal.SIGSTOP)
            outsiders.update(new)
            await asyncio.sleep(SWEEP_INTERVAL)

    async def _live_states(self, outsiders: dict[int, int]) -> dict[int, str]:
        """Return the state of each live process of the group and of ``outsiders``, pid to state."""
        table = await _scan(self._loop)
        pids = set(self._group_members(table))
        pids |= {pid for pid, start_time in outsiders.items()
                 if pid in table.processes and table.processes[pid].start_time == start_time}
        return {pid: table.processes[pid].state for pid in sorted(pids) if not table.processes[pid].dead}


# -- start times read in a worker thread -------------------------------------------


class _StartTimeReader:
    """Reads the start times of new children in a worker thread, one batch per loop iteration.

    Reading /proc/PID/stat right after the spawn took 0.2 ms per child in the first 1000
    of a start of 5000 on a busy 2-vCPU VM, and 2 ms in the last 1000. That was 4.2 s in
    all, during which the slave spawned nothing. The read probably waits for the
    child's exec, which goes on after posix_spawn has returned.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: list[ChildProcess] = []

    def add(self, child: ChildProcess) -> None:
        self._pending.append(child)
        if len(self._pending) == 1:
            self._loop.call_soon(self._read_batch)

    def _read_batch(self) -> None:
        batch, self._pending = self._pending, []
        try:
            reading = self._loop.run_in_executor(None, _read_start_times, [child.pid for child in batch])
        except RuntimeError:
            # The default executor is shut down, as when the loop is closing.
            self._finish(batch, [None] * len(batch))
            return
        reading.add_done_callback(lambda done: self._read_done(batch, done))

    def _read_done(self, batch: list[ChildProcess], reading: asyncio.Future[list[int | None]]) -> None:
        if reading.cancelled() or reading.exception() is not None:
            self._finish(batch, [None] * len(batch))
        else:
            self._finish(batch, reading.result())

    @staticmethod
    def _finish(batch: list[ChildProcess], start_times: list[int | None]) -> None:
        for child, start_time in zip(batch, start_times):
            # A child reaped before now may have had its pid reused by the time of the
            # read. One that is not reaped yet still had it, so the read is its own.
            if child.returncode is None and child.start_time is None:
                child.start_time = start_time
            if not child.start_time_read.done():
                child.start_time_read.set_result(child.start_time)


def _read_start_times(pids: list[int]) -> list[int | None]:
    return [read_start_time(pid) for pid in pids]


_start_time_readers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _StartTimeReader] = (
    weakref.WeakKeyDictionary())


def _start_time_reader(loop: asyncio.AbstractEventLoop) -> _StartTimeReader:
    reader = _start_time_readers.get(loop)
    if reader is None:
        reader = _start_time_readers[loop] = _StartTimeReader(loop)
    return reader


# -- subreaper ---------------------------------------------------------------------

# The children spawn_shell started that have not been reaped yet, by pid.
_children: dict[int, ChildProcess] = {}

_PR_SET_CHILD_SUBREAPER = 36

# Event loops whose SIGCHLD handler reaps every child (see become_subreaper).
_reaper_loops: set[asyncio.AbstractEventLoop] = set()


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
    _reaper_loops.add(loop)
    # A burst of exits fills asyncio's signal wakeup socket, and CPython then prints a
    # warning for each signal that does not fit. Nothing is lost: the bytes already in
    # the socket run _reap_exited_children, which reaps every child that has exited.
    wakeup_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(wakeup_fd, warn_on_full_buffer=False)
    return True


def stop_being_subreaper(loop: asyncio.AbstractEventLoop) -> None:
    """Undo become_subreaper: orphans go to PID 1 again, SIGCHLD gets its default action."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    loop.remove_signal_handler(signal.SIGCHLD)
    _reaper_loops.discard(loop)
    _reap_exited_children()
    # Children that relied on the SIGCHLD reaper get a pidfd of their own again.
    for child in list(_children.values()):
        if child._loop is loop and child._pidfd is None and child.returncode is None:
            child._watch_exit()


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
