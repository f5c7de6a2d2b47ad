"""Kill a slave's instances when the slave dies: one small guardian process per slave.

Each instance runs in a session and process group of its own (see process.py), so
nothing stops it when its slave is killed with SIGKILL. The slave therefore starts one
guardian process at start-up and keeps the write end of a pipe to the guardian's
stdin. The kernel closes that write end when the slave exits, however it exits, and
the guardian reads EOF at once and SIGKILLs every process group still recorded.

Protocol: the slave writes one ASCII line per change.

    + PGID START_TIME   an instance started. START_TIME is field 22 of /proc/PGID/stat
                        (clock ticks since boot), or absent when unknown.
    - PGID              the slave has stopped the instance, or it exited and its group
                        is gone. The guardian removes the record.

At EOF the guardian checks each recorded group against /proc and SIGKILLs it only if
it is still the recorded group (see _select_groups). It also SIGKILLs the descendants
of those groups' members that moved to another group or session (setsid), then exits 0.

Limits:

- The guardian takes no part in a normal stop. Whatever is still recorded when the
  pipe closes is killed, including after a clean ``Guardian.close()``, so the slave
  sends ``-`` for each instance it stopped before it closes the pipe.
- A process that left the group and whose parent had already exited before EOF (a
  double-forked daemon) cannot be found: its parent link leads to the slave, which is a
  child subreaper, and after the slave's death to PID 1 or another subreaper. Neither
  can one that left the group between the guardian's first /proc scan and its SIGKILL
  of the group, a window of milliseconds.
- ``kill -9`` of the guardian itself removes the protection until the slave starts a
  new guardian (at once, see ``Guardian``). The guardian ignores SIGINT, SIGTERM,
  SIGHUP and SIGPIPE, but other signals that end a process by default (SIGQUIT,
  SIGUSR1, ...) still do. Being in a session of its own, it receives them only when
  they are sent to its pid or group, or to every process (``kill -1``).
- An instance that the slave spawned but has not recorded yet when it dies is not
  killed. Calling ``guard()`` right after ``spawn_shell()`` keeps that window short.
- Pipe EOF needs every copy of the write end closed. The write end is close-on-exec,
  but a child that the slave forks without exec (multiprocessing's fork start method)
  keeps a copy, and the guardian then waits for that child to exit as well.

The guardian is this file run as a script, ``python -I -S guardian.py``: isolated mode,
no site module, so its start-up imports nothing but the interpreter's core and the
modules named below. For that reason the guardian's code comes first, and the imports
of the slave side (asyncio, structlog, gdpm) come after the ``__main__`` check, which
exits before reaching them. Measured with CPython 3.11.7 on a 2-vCPU VM: the guardian
blocks in its first read about 15 ms after the spawn, with 10.7 MB RSS, of which
libpython's pages are shared with the slave (5 to 7 MB PSS). Every process of four
instances (9 processes) was dead 7 to 13 ms after the slave's SIGKILL. The guardian
scans /proc once before it kills, at about 12 us per process on that VM.
"""

from __future__ import annotations

import os
import signal
import sys
import time

# Signals that the guardian ignores, so that only EOF on its stdin ends it.
GUARDIAN_IGNORED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE)

# Seconds the guardian keeps scanning /proc, after it has SIGKILLed the recorded
# groups, for children that the processes which left those groups forked meanwhile.
_SWEEP_TIMEOUT = 0.5

# Seconds between two of those scans.
_SWEEP_INTERVAL = 0.01

# States (field 3 of /proc/PID/stat) of a process that has exited.
_DEAD_STATES = frozenset({"Z", "X", "x"})

# States of a process stopped by a signal or by a tracer.
_STOPPED_STATES = frozenset({"T", "t"})


def main() -> int:
    """Run the guardian: record groups from stdin until EOF, then kill the recorded ones."""
    for signum in GUARDIAN_IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # The slave spawns the guardian with these signals blocked, so that one arriving
    # during interpreter start-up cannot kill it. Once they are ignored, any that
    # arrived are discarded, and unblocking them is safe.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, GUARDIAN_IGNORED_SIGNALS)
    _set_up_process()

    records = _read_records(0)
    if records:
        _kill_records(records)
    return 0


def _set_up_process() -> None:
    # Keep no directory busy, and no descriptor above 2 that the slave may have
    # inherited from its own parent: the guardian outlives the slave.
    os.chdir("/")
    for name in os.listdir("/proc/self/fd"):
        if int(name) > 2:
            try:
                os.close(int(name))
            except OSError:
                pass  # The listing's own descriptor, closed already.
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write("gdpm-guardian")  # The name that ps and top show.
    except OSError:
        pass


def _read_records(fd: int) -> dict[int, int | None]:
    """Apply the lines read from ``fd`` until EOF and return the groups still recorded."""
    records: dict[int, int | None] = {}
    partial = b""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError as error:
            _report(f"reading the pipe from the slave failed ({error}), treating it as EOF")
            break
        if not data:
            break
        lines = (partial + data).split(b"\n")
        # An unterminated last line is kept for the next read. At EOF it is dropped:
        # the slave died while writing it, and a cut "+ 1234" could name another pgid.
        partial = lines.pop()
        for line in lines:
            _apply_line(records, line)
    return records


def _apply_line(records: dict[int, int | None], line: bytes) -> None:
    fields = line.split()
    try:
        if fields[:1] == [b"+"] and len(fields) in (2, 3):
            pgid = _parse_pgid(fields[1])
            records[pgid] = int(fields[2]) if len(fields) == 3 else None
        elif fields[:1] == [b"-"] and len(fields) == 2:
            records.pop(_parse_pgid(fields[1]), None)
        else:
            raise ValueError("expected '+ PGID [START_TIME]' or '- PGID'")
    except ValueError as error:
        _report(f"invalid line from the slave ignored: {line!r}: {error}")


def _parse_pgid(field: bytes) -> int:
    pgid = int(field)
    # killpg(0) would signal the guardian's own group, and killpg(1) the group of PID 1.
    if pgid <= 1 or pgid == os.getpid():
        raise ValueError(f"pgid {pgid} cannot be an instance's")
    return pgid


class _Process:
    """The fields of /proc/PID/stat that the guardian uses."""

    __slots__ = ("state", "ppid", "pgid", "start_time")

    def __init__(self, state: str, ppid: int, pgid: int, start_time: int) -> None:
        self.state = state
        self.ppid = ppid
        self.pgid = pgid
        self.start_time = start_time

    @property
    def dead(self) -> bool:
        return self.state in _DEAD_STATES


def _kill_records(records: dict[int, int | None]) -> None:
    """SIGKILL the recorded groups that still exist, and the processes that left them."""
    processes = _scan_processes()
    groups, skipped = _select_groups(records, processes)
    outsiders = _descendants_outside(groups, processes)

    # Outsiders are descendants of the groups' members that are in none of the
    # groups. They are stopped first: a stopped process cannot fork, and its children
    # keep it as their parent, so the sweep below finds every child it has made.
    for pid in outsiders:
        _signal_process(pid, signal.SIGSTOP)
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # Every member exited since the scan.
        except OSError as error:
            _report(f"killpg({pgid}, SIGKILL) failed: {error}")
    try:
        if outsiders:
            _sweep(groups, outsiders)
    finally:
        # Even if the sweep failed, nothing is left stopped for good.
        for pid in outsiders:
            _signal_process(pid, signal.SIGKILL)

    message = f"the pipe from the slave closed: killed process groups {sorted(groups)}"
    if outsiders:
        message += f" and processes that had left them {sorted(outsiders)}"
    if skipped:
        message += f"; not killed, because gone or no longer the recorded group: {', '.join(skipped)}"
    _report(message)


def _sweep(groups: set[int], outsiders: set[int]) -> None:
    """Stop the new children of ``outsiders`` and add them to it, until all of them are stopped.

    Gives up after _SWEEP_TIMEOUT seconds, such as when a process waits in
    uninterruptible sleep (state D) and cannot stop yet.
    """
    deadline = time.monotonic() + _SWEEP_TIMEOUT
    while True:
        processes = _scan_processes()
        found = _descendants_outside(groups, processes, parents=outsiders) - outsiders
        running = [pid for pid in outsiders
                   if pid in processes and not processes[pid].dead and processes[pid].state not in _STOPPED_STATES]
        if not found and not running:
            return
        if time.monotonic() > deadline:
            _report(f"processes that left the killed groups did not stop within {_SWEEP_TIMEOUT} s: "
                    f"{sorted(running)}; their children made after now are not killed")
            return
        for pid in found:
            _signal_process(pid, signal.SIGSTOP)
        outsiders |= found
        time.sleep(_SWEEP_INTERVAL)


def _select_groups(records: dict[int, int | None], processes: dict[int, _Process]) -> tuple[set[int], list[str]]:
    """Return the recorded pgids that still name the recorded group, and why the others were skipped.

    - The leader (pid == pgid) exists with the recorded start time: it is the same
      process, so the group is the recorded one, even if the leader is a zombie.
    - The leader exists with another start time: the pid was reused, which the kernel
      does only once no process uses the number as a pid, pgid or session id. So the
      recorded group is gone.
    - The leader is gone but processes of that pgid exist: the number cannot have been
      reused while they lived, so they are members of the recorded group.
    - No start time was recorded: the leader, if it exists, must be in group pgid.

    NOTE: the third rule is wrong in one case. If the recorded group emptied, its number
    was reused as a new session and that session's leader exited, all before EOF, the
    new session's processes are killed. The slave sends '-' soon after a group empties,
    and the number would have to come round through the whole pid range in that time.
    """
    groups: set[int] = set()
    skipped: list[str] = []
    for pgid, start_time in records.items():
        leader = processes.get(pgid)
        if leader is not None and start_time is None and leader.pgid != pgid:
            skipped.append(f"{pgid} (start time unknown, pid {pgid} is in group {leader.pgid})")
            continue
        if leader is not None and start_time is not None and leader.start_time != start_time:
            skipped.append(f"{pgid} (start time {leader.start_time}, recorded {start_time})")
            continue
        members = [process for process in processes.values() if process.pgid == pgid]
        if not members:
            skipped.append(f"{pgid} (no process left)")
        elif not all(member.dead for member in members):
            groups.add(pgid)
    return groups, skipped


def _descendants_outside(groups: set[int], processes: dict[int, _Process],
                         parents: set[int] | None = None) -> set[int]:
    """Return the live descendants of the groups' members and of ``parents`` that are in none of ``groups``."""
    children: dict[int, list[int]] = {}
    for pid, process in processes.items():
        children.setdefault(process.ppid, []).append(pid)
    pending = [pid for pid, process in processes.items() if process.pgid in groups]
    pending += parents or ()
    found: set[int] = set()
    while pending:
        for child in children.get(pending.pop(), ()):
            if processes[child].pgid not in groups:
                found.add(child)
            pending.append(child)
    return {pid for pid in found if not processes[pid].dead and pid != os.getpid()}


def _scan_processes() -> dict[int, _Process]:
    """Read /proc/PID/stat of every process."""
    processes = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat_file:
                data = stat_file.read()
        except (FileNotFoundError, ProcessLookupError):
            continue  # The process was reaped since the listing.
        # Field 2, the command name, is in parentheses and may contain spaces and
        # parentheses, so field 3 starts two bytes after the last ')'. Field N is at
        # index N - 3.
        fields = data[data.rindex(b")") + 2:].split()
        processes[int(name)] = _Process(state=fields[0].decode(), ppid=int(fields[1]),
                                        pgid=int(fields[2]), start_time=int(fields[19]))
    return processes


def _signal_process(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass
    except OSError as error:
        _report(f"kill({pid}, {signum}) failed: {error}")


def _report(message: str) -> None:
    # The guardian writes to the stderr it inherited from the slave. After the slave
    # died that may be a pipe with no reader, so a failed write is ignored.
    try:
        os.write(2, f"gdpm guardian[{os.getpid()}]: {message}\n".encode(errors="replace"))
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())


# -- the slave side ------------------------------------------------------------------
# Imported only by the slave: the guardian process exits above before reaching here.

import asyncio  # noqa: E402
import fcntl  # noqa: E402

import structlog  # noqa: E402

from gdpm.slave.process import ChildProcess, watch_child  # noqa: E402

log = structlog.get_logger("gdpm.slave.guardian")

# The guardian's program: this file, run as a script.
GUARDIAN_PATH = os.path.abspath(__file__)

# Delays before starting a new guardian after one exited: none after a guardian that
# ran for RESPAWN_RESET_AFTER seconds or more, then doubling from RESPAWN_DELAY_FIRST
# to RESPAWN_DELAY_MAX while new ones keep exiting early, in seconds.
RESPAWN_DELAY_FIRST = 0.1
RESPAWN_DELAY_MAX = 5.0
RESPAWN_RESET_AFTER = 10.0

# Seconds close() waits for a guardian that ignored its SIGKILL.
_KILL_TIMEOUT = 5.0

# Every signal is reset to its default action in the guardian, as in spawn_shell.
_DEFAULT_SIGNALS = tuple(sorted(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP}))


class Guardian:
    """The slave's handle on its guardian process: records groups and keeps a guardian running.

    ``guard`` and ``release`` never block the event loop. A line is written to the
    non-blocking pipe at once, and only if the pipe is full (64 KiB by default, about
    3000 lines, so only when the guardian stops reading) is it kept in a buffer that
    ``loop.add_writer`` flushes.

    The guardian process is a child of the slave, watched as a ChildProcess, so its
    exit is seen through a pidfd and its status is kept even when the slave's SIGCHLD
    handler reaps it. When it exits before ``close``, the exit is logged as an error
    and a new guardian is started, which receives every current record.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # What the guardian must kill if the pipe closes now: pgid to start time.
        self._records: dict[int, int | None] = {}
        self._process: ChildProcess | None = None
        self._started_at = 0.0
        self._pipe: int | None = None  # The write end.
        self._buffer = bytearray()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing: asyncio.Task[int | None] | None = None
        self._supervisor: asyncio.Task[None] | None = None

    @classmethod
    def start(cls, loop: asyncio.AbstractEventLoop) -> Guardian:
        """Start the guardian process. Raises OSError when it cannot be spawned."""
        guardian = cls(loop)
        guardian._spawn()
        guardian._supervisor = loop.create_task(guardian._supervise(), name="guardian-supervisor")
        guardian._supervisor.add_done_callback(_log_supervisor_crash)
        return guardian

    @property
    def pid(self) -> int:
        """Pid of the current guardian process, or of the last one while a new one is pending."""
        return self._process.pid

    def alive(self) -> bool:
        """Check whether the current guardian process runs, so the instances are protected."""
        return self._process is not None and self._process.returncode is None

    def guard(self, pgid: int, start_time: int | None) -> None:
        """Record a process group to kill if the slave dies. ``start_time`` identifies its leader.

        Raises RuntimeError after close().
        """
        if self._closing is not None:
            raise RuntimeError(f"guard({pgid}) after the guardian was closed: the group would not be protected")
        if pgid <= 1:
            raise ValueError(f"invalid process group id {pgid}")
        self._records[pgid] = start_time
        self._send(_guard_line(pgid, start_time))

    def release(self, pgid: int) -> None:
        """Forget a group, once the slave has stopped it or it is gone. Does nothing if it is not recorded."""
        if self._records.pop(pgid, _MISSING) is not _MISSING:
            self._send(f"- {pgid}\n".encode())

    async def close(self, timeout: float = 5.0) -> int | None:
        """Close the pipe, wait for the guardian to exit, and return its returncode.

        The guardian kills every group still recorded, so the slave releases the
        instances it stopped first. Waits at most ``timeout`` seconds for the buffered
        lines to be written and the guardian to exit, then kills it with SIGKILL.
        Returns None when no guardian was running. Calls after the first wait for it.
        """
        if self._closing is None:
            self._closing = self._loop.create_task(self._close(timeout), name="guardian-close")
        return await asyncio.shield(self._closing)

    async def _close(self, timeout: float) -> int | None:
        deadline = self._loop.time() + timeout
        if self._supervisor is not None:
            self._supervisor.cancel()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            log.warning("guardian did not read its pipe before close, lines lost",
                        pid=self.pid, unwritten_bytes=len(self._buffer))
        self._close_pipe()

        process = self._process
        if process is None:
            return None
        try:
            return await asyncio.wait_for(process.wait(), max(deadline - self._loop.time(), 0.0))
        except TimeoutError:
            log.warning("guardian did not exit after its pipe was closed, sending SIGKILL",
                        pid=process.pid, timeout=timeout)
        process.signal_group(signal.SIGKILL)
        return await asyncio.wait_for(process.wait(), _KILL_TIMEOUT)

    # -- the guardian process ------------------------------------------------------

    def _spawn(self) -> None:
        """Start a guardian process with a new pipe, and send it every current record."""
        if not sys.executable:
            raise OSError("cannot start the guardian: sys.executable is empty, so the Python interpreter is unknown")
        read_fd, write_fd = _pipe_above_stdio()
        try:
            # Only the slave's end: the guardian's stdin is another open file description.
            os.set_blocking(write_fd, False)
            pid = os.posix_spawn(
                sys.executable, [sys.executable, "-I", "-S", GUARDIAN_PATH], os.environ,
                file_actions=[
                    (os.POSIX_SPAWN_DUP2, read_fd, 0),
                    (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
                ],
                # A session of its own: no terminal signal and no signal to the
                # slave's process group reaches the guardian.
                setsid=True,
                # Blocked until the guardian ignores them (see main()).
                setsigmask=GUARDIAN_IGNORED_SIGNALS,
                setsigdef=_DEFAULT_SIGNALS,
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)

        self._pipe = write_fd
        self._buffer.clear()
        self._drained.set()
        self._process = watch_child(pid, self._loop)
        self._started_at = time.monotonic()
        for pgid, start_time in self._records.items():
            self._send(_guard_line(pgid, start_time))
        log.info("guardian started", pid=pid, records=len(self._records))

    async def _supervise(self) -> None:
        """Start a new guardian each time the current one exits, until close()."""
        delay = 0.0
        while True:
            process = self._process
            returncode = await process.wait()
            ran_for = time.monotonic() - self._started_at
            self._close_pipe()
            if ran_for >= RESPAWN_RESET_AFTER:
                delay = 0.0
            log.error("guardian exited unexpectedly", pid=process.pid, returncode=returncode,
                      ran_for=round(ran_for, 3), unprotected_groups=len(self._records), restart_in=delay)
            while True:
                await asyncio.sleep(delay)
                delay = min(max(delay * 2, RESPAWN_DELAY_FIRST), RESPAWN_DELAY_MAX)
                try:
                    self._spawn()
                    break
                except OSError as error:
                    log.error("guardian restart failed", error=str(error), retry_in=delay)

    def _close_pipe(self) -> None:
        if self._pipe is None:
            return
        self._flush()  # A last try: a '-' line lost here makes the guardian check a released group.
        self._loop.remove_writer(self._pipe)
        os.close(self._pipe)
        self._pipe = None
        self._buffer.clear()
        self._drained.set()

    # -- writing lines ---------------------------------------------------------------

    def _send(self, line: bytes) -> None:
        if self._pipe is None:
            return  # No guardian now. The next one receives every record at start.
        self._buffer += line
        if self._drained.is_set():
            # One write at the end of this turn of the event loop rather than one per
            # line: each write wakes the guardian, and 1000 spawns in a burst made
            # these wake-ups the slave's largest cost after posix_spawn itself.
            # NOTE: a group spawned in this turn is unprotected until the write, so a
            # slave SIGKILLed within that turn leaves it to the journal.
            self._drained.clear()
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Write as much of the buffer as the pipe takes; wait for writability if some is left."""
        if self._pipe is None:
            return
        while self._buffer:
            try:
                written = os.write(self._pipe, self._buffer)
            except BlockingIOError:
                break
            except BrokenPipeError:
                # The guardian has exited. _supervise starts a new one, which receives
                # every record, so the buffered lines are not needed.
                self._buffer.clear()
                break
            except OSError as error:
                log.error("writing to the guardian failed, lines lost", pid=self.pid, error=str(error))
                self._buffer.clear()
                break
            del self._buffer[:written]

        if self._buffer:
            self._loop.add_writer(self._pipe, self._flush)
        else:
            self._loop.remove_writer(self._pipe)
            self._drained.set()


_MISSING = object()


def _guard_line(pgid: int, start_time: int | None) -> bytes:
    return (f"+ {pgid}\n" if start_time is None else f"+ {pgid} {start_time}\n").encode()


def _pipe_above_stdio() -> tuple[int, int]:
    """Create a close-on-exec pipe whose two descriptors are above 2.

    A slave started with a standard descriptor closed would otherwise get it for the
    pipe, and the guardian's dup2 of its stdin could overwrite the other end.
    """
    ends = os.pipe()
    moved: list[int] = []
    try:
        for fd in ends:
            moved.append(fd if fd > 2 else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3))
    except BaseException:
        for fd in set(ends) | set(moved):
            os.close(fd)
        raise
    for fd in set(ends) - set(moved):
        os.close(fd)
    return moved[0], moved[1]


def _log_supervisor_crash(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("guardian supervisor crashed, a dead guardian will not be restarted",
                  exc_info=task.exception())
