"""Instance output on the slave: pipes read by the event loop into size-rotated files.

Each instance has one :class:`LogSink` per stream (stdout, stderr), kept for all of
its runs. Before each run, :meth:`LogSink.open_pipe` creates a pipe whose write end
becomes the child's stdout or stderr. The event loop watches the read end (no thread
per pipe) and appends what arrives, byte for byte, to
``{directory}/{instance_id}.{stream}.log``. Nothing is decoded, so output that is not
valid UTF-8 is stored exactly as written.

Rotation: when a chunk would make the current file exceed ``max_bytes``, the file is
renamed ``NAME.log.1``, ``NAME.log.1`` becomes ``NAME.log.2`` and so on up to
``NAME.log.{backups}``, the oldest is dropped, and a new ``NAME.log`` is started. The
chunk is cut after its last newline that still fits, so a rotation usually falls
between two lines. A line that was already partly written when the rotation comes, or
that is longer than ``max_bytes``, is split between two files. The readers below
treat the files as one stream, so they join such a line again.

The file is created at the first byte of output, not at the start of a run, so an
instance that writes nothing costs no file and no file descriptor. Creating a file
costs a write to the file system's inode table: 0.02 to 0.7 ms each, measured on the
ext4 disk of a 2-vCPU VM, which for 1000 instances was a third of the time to start
them. It is written with os.write on an O_APPEND descriptor, in the event loop.
At most MAX_OPEN_FILES files stay open at once: writing to one more closes the one
written least recently, which is opened again at its next write. So a slave needs 2
descriptors per instance (the pipes' read ends), not 4.
NOTE: such a write usually only copies into the page cache, but on a file system that
stalls (a full or hung disk), it stalls the whole slave until it returns.

The readers (:func:`tail_lines`, :func:`follow`) serve the slave's log server. They
read the files with ordinary blocking reads of at most READ_CHUNK bytes, and
:func:`follow` polls the file every FOLLOW_POLL_INTERVAL seconds once it has read
everything, because the standard library has no file-change notification.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import structlog

log = structlog.get_logger("gdpm.slave.logs")

STREAMS = ("stdout", "stderr")

# Defaults for the size of one log file, in bytes, and the number of rotated files kept.
DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_BACKUPS = 5

# Bytes read from a pipe or a log file by one read call.
READ_CHUNK = 64 * 1024

# Chunks read from one pipe per wake-up of the event loop (1 MiB). epoll reports the
# pipe as readable again at once, so a child that writes without pause cannot keep the
# loop from serving the other instances.
MAX_CHUNKS_PER_WAKEUP = 16

# Seconds between two checks of a log file once follow() has read all of it.
FOLLOW_POLL_INTERVAL = 0.2

# Maximum length of a line the readers keep in memory, in bytes. A longer line is
# returned in pieces of this size, each without a newline except the last.
MAX_LINE_BYTES = 1024 * 1024

# Maximum bytes tail_lines() reads back from the end. Lines before that are not returned.
MAX_TAIL_BYTES = 16 * 1024 * 1024

# Seconds between two log lines about failed writes to the same file.
WRITE_ERROR_LOG_INTERVAL = 60.0

# Log files kept open at once by the sinks of one process. Reopening one costs about 3 us.
MAX_OPEN_FILES = 256

_FILE_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_FILE_MODE = 0o644


def log_path(directory: Path, instance_id: str, stream: str) -> Path:
    """Return the path of the current log file of an instance's stream."""
    return Path(directory) / f"{instance_id}.{stream}.log"


def rotated_paths(directory: Path, instance_id: str, stream: str) -> list[Path]:
    """Return the rotated files of an instance's stream that exist, oldest first.

    The oldest is the one with the highest number: ``NAME.log.5`` before ``NAME.log.1``.
    """
    current = log_path(directory, instance_id, stream)
    pattern = re.compile(re.escape(current.name) + r"\.([1-9][0-9]{0,5})")
    numbered = []
    try:
        entries = os.scandir(current.parent)
    except FileNotFoundError:
        return []
    with entries:
        for entry in entries:
            match = pattern.fullmatch(entry.name)
            if match is not None:
                numbered.append((int(match.group(1)), Path(entry.path)))
    return [path for _, path in sorted(numbered, reverse=True)]


class LogSink:
    """One stream (stdout or stderr) of one instance, written to a size-rotated file.

    One sink serves every run of the instance, appending to the same file. Per run:
    :meth:`open_pipe` before the spawn, :meth:`close_write_end` right after it, and
    :meth:`drain` once the process group has exited. :meth:`close` at the end.

    NOTE: rotation assumes that this sink is the only writer of its files. Two sinks
    for the same instance and stream must not be open at the same time.
    """

    def __init__(self, directory: Path, instance_id: str, stream: str, *,
                 max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> None:
        if stream not in STREAMS:
            raise ValueError(f"stream must be one of {', '.join(STREAMS)}, got {stream!r}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must not be negative, got {backups}")
        self.path = log_path(directory, instance_id, stream)
        self.instance_id = instance_id
        self.stream = stream
        self.max_bytes = max_bytes
        self.backups = backups
        # Bytes appended to the files, and bytes lost because a write failed.
        self.bytes_written = 0
        self.bytes_dropped = 0
        self._file_fd: int | None = None
        self._size = 0
        self._read_fd: int | None = None
        self._write_fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._eof: asyncio.Future[None] | None = None
        self._last_error_log = 0.0
        self._log = log.bind(instance_id=instance_id, stream=stream)

    def __repr__(self) -> str:
        return f"<LogSink {self.path} reading={self._read_fd is not None}>"

    # -- one run -------------------------------------------------------------------

    def open_pipe(self) -> int:
        """Create the pipe for the next run and return its write end, for the child.

        Must be called from a running event loop, which reads the pipe from then on.
        Both ends are close-on-exec, so no other child inherits them. posix_spawn's
        dup2 onto fd 1 or 2 clears the flag on the child's copy only. The log file is
        opened at the first output; an error then is logged and that output dropped.
        """
        loop = asyncio.get_running_loop()
        if self._read_fd is not None:
            self._log.warning("previous run's pipe was not drained; it is closed now")
            self._stop_reading()
        self.close_write_end()
        # Opened again at the run's first output, so a file that was deleted or moved
        # meanwhile is created again instead of writing to a file no one can see.
        self._close_file()

        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            read_fd = _above_standard_fds(read_fd)
            write_fd = _above_standard_fds(write_fd)
            # Only the read end is non-blocking: the child gets an ordinary blocking stdout.
            os.set_blocking(read_fd, False)
            loop.add_reader(read_fd, self._on_readable)
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise
        self._loop = loop
        self._read_fd = read_fd
        self._write_fd = write_fd
        self._eof = loop.create_future()
        return write_fd

    def close_write_end(self) -> None:
        """Close this process's copy of the write end, so that EOF comes once the child's copies close."""
        if self._write_fd is not None:
            os.close(self._write_fd)
            self._write_fd = None

    async def drain(self, timeout: float) -> bool:
        """Read the pipe until every writer has closed it, or until ``timeout`` seconds have passed.

        Returns True at EOF. A timeout means that another process still has the write
        end open, such as a daemon that the instance left running with its stdout. Then
        what is in the pipe is read, the read end is closed and False is returned. That process gets
        EPIPE or SIGPIPE at its next write. Closes the write end first if the caller
        has not.
        """
        self.close_write_end()
        if self._read_fd is None:
            return True
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._eof)
            return True
        except TimeoutError:
            self._log.warning("output pipe still open after the instance exited, stopped reading it; "
                              "a process the instance left running has it open", timeout=timeout)
            self._stop_reading()
            return False

    def close(self) -> None:
        """Read what is left in the pipe without waiting, then close the pipe and the file."""
        if self._read_fd is not None:
            self._stop_reading()
        self.close_write_end()
        self._close_file()

    # -- reading the pipe ------------------------------------------------------------

    def _on_readable(self) -> None:
        for _ in range(MAX_CHUNKS_PER_WAKEUP):
            if not self._read_once():
                return

    def _read_once(self) -> bool:
        """Read one chunk and store it; return False at EAGAIN, at EOF or after an error."""
        try:
            data = os.read(self._read_fd, READ_CHUNK)
        except BlockingIOError:
            return False
        except InterruptedError:
            # os.read retries on EINTR itself (PEP 475), so this is only a safeguard.
            return True
        except OSError as error:
            self._log.error("reading the output pipe failed, stopped reading it", error=str(error))
            self._stop_reading(read_rest=False)
            return False
        if not data:
            self._stop_reading(read_rest=False)
            return False
        self._store(data)
        return True

    def _stop_reading(self, *, read_rest: bool = True) -> None:
        """Stop watching the read end and close it, after reading what is buffered when ``read_rest``."""
        if read_rest:
            # A bounded number of chunks: a process that keeps writing could otherwise
            # keep this loop going.
            for _ in range(MAX_CHUNKS_PER_WAKEUP):
                if not self._read_once():
                    break
        if self._read_fd is None:
            return  # _read_once reached EOF and closed it.
        self._loop.remove_reader(self._read_fd)
        os.close(self._read_fd)
        self._read_fd = None
        if self._eof is not None and not self._eof.done():
            self._eof.set_result(None)

    # -- writing the file ------------------------------------------------------------

    def _store(self, data: bytes) -> None:
        """Append ``data`` to the current file, rotating whenever the next piece would not fit."""
        try:
            if self._file_fd is not None and os.fstat(self._file_fd).st_nlink == 0:
                # Deleted while open, such as with its directory: writing on would
                # fill a file that no one can read.
                self._close_file()
            if self._file_fd is None:
                # Opened first, so that the room left below counts what the file contains.
                self._open_file()
        except OSError as error:
            self.bytes_dropped += len(data)
            self._log_write_error(error)
            return
        _open_files.touch(self)
        start, end = 0, len(data)
        while start < end:
            room = self.max_bytes - self._size
            if end - start <= room:
                self._write(data, start, end)
                return
            newline = data.rfind(b"\n", start, start + room) if room > 0 else -1
            if newline >= 0:
                cut = newline + 1
            elif self._size > 0:
                # No line ends within the room left: start a new file for the rest.
                self._rotate()
                continue
            else:
                # A line longer than a whole file: split it.
                cut = start + room
            self._write(data, start, cut)
            start = cut
            self._rotate()

    def _write(self, data: bytes, start: int, stop: int) -> None:
        view = memoryview(data)[start:stop]
        while view:
            try:
                if self._file_fd is None:
                    self._open_file()
                written = os.write(self._file_fd, view)
            except OSError as error:
                # ENOSPC, EDQUOT, EFBIG or EIO: drop the data but keep reading the
                # pipe, or the child would block on its next write.
                self.bytes_dropped += len(view)
                self._log_write_error(error)
                return
            self.bytes_written += written
            self._size += written
            view = view[written:]

    def _log_write_error(self, error: OSError) -> None:
        now = time.monotonic()
        if now - self._last_error_log >= WRITE_ERROR_LOG_INTERVAL:
            self._last_error_log = now
            self._log.error("writing the log file failed, output dropped", path=str(self.path),
                            error=str(error), dropped_bytes=self.bytes_dropped)

    def _open_file(self) -> None:
        """Open the current file, creating it (and its directory), and note its size. Raises OSError."""
        self._close_file()
        try:
            fd = os.open(self.path, _FILE_FLAGS, _FILE_MODE)
        except FileNotFoundError:
            # The log directory was removed while the slave ran.
            os.makedirs(self.path.parent, exist_ok=True)
            fd = os.open(self.path, _FILE_FLAGS, _FILE_MODE)
        fd = _above_standard_fds(fd)
        try:
            self._size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        self._file_fd = fd
        _open_files.add(self)

    def _close_file(self) -> None:
        if self._file_fd is not None:
            _open_files.discard(self)
            os.close(self._file_fd)
            self._file_fd = None

    def _rotate(self) -> None:
        """Rename NAME.log to NAME.log.1, shifting older files up and dropping the oldest, then start a new NAME.log."""
        self._close_file()
        try:
            if self.backups == 0:
                _unlink_if_exists(self.path)
            else:
                for index in range(self.backups - 1, 0, -1):
                    _rename_if_exists(_numbered(self.path, index), _numbered(self.path, index + 1))
                os.rename(self.path, _numbered(self.path, 1))
            # Files above the limit remain when the number of backups was lowered.
            for path in rotated_paths(self.path.parent, self.instance_id, self.stream):
                if int(path.name.rsplit(".", 1)[1]) > self.backups:
                    _unlink_if_exists(path)
        except OSError as error:
            # NOTE: the next writes then go on in the current file, which grows past max_bytes.
            self._log.error("log rotation failed", path=str(self.path), error=str(error))
        try:
            self._open_file()
        except OSError as error:
            self._log_write_error(error)


class _OpenFiles:
    """The sinks whose log file is open, least recently written first, at most ``limit`` of them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._sinks: dict[LogSink, None] = {}

    def __len__(self) -> int:
        return len(self._sinks)

    def add(self, sink: LogSink) -> None:
        """Record that ``sink`` opened its file, and close the least recently written files above the limit."""
        self._sinks[sink] = None
        while len(self._sinks) > self.limit:
            next(iter(self._sinks))._close_file()

    def touch(self, sink: LogSink) -> None:
        """Record a write of ``sink``: its file becomes the last one to close."""
        if sink in self._sinks:
            del self._sinks[sink]
            self._sinks[sink] = None

    def discard(self, sink: LogSink) -> None:
        self._sinks.pop(sink, None)


_open_files = _OpenFiles(MAX_OPEN_FILES)


def _numbered(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.{index}")


def _rename_if_exists(source: Path, target: Path) -> None:
    try:
        os.rename(source, target)
    except FileNotFoundError:
        pass


def _unlink_if_exists(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _above_standard_fds(fd: int) -> int:
    """Return ``fd``, or a close-on-exec duplicate above 2 when it is 0, 1 or 2.

    A slave started with a standard descriptor closed gets it back from os.open or
    pipe2. As the child's fd 1, a pipe end there would be overwritten by the child's
    own set-up of 0, 1 and 2.
    """
    if fd > 2:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


# -- readers ---------------------------------------------------------------------------


class _Segment:
    """An open log file and the number of its bytes that belong to the stream being read."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.size = size


def tail_lines(directory: Path, instance_id: str, stream: str, count: int) -> list[bytes]:
    """Return the last ``count`` lines of a stream, oldest first, reading across rotated files.

    Each line keeps its newline. The last one has none when the instance has not
    finished its last line. Returns an empty list when no file exists. Reads at most
    MAX_TAIL_BYTES from the end, and a line longer than MAX_LINE_BYTES comes back in
    pieces.
    """
    if count <= 0:
        return []
    paths = [*rotated_paths(directory, instance_id, stream), log_path(directory, instance_id, stream)]
    segments = []
    try:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # Rotated away since the listing.
            segments.append(_Segment(fd, os.fstat(fd).st_size))
        return _tail_of_segments(segments, count)
    finally:
        for segment in segments:
            os.close(segment.fd)


def _tail_of_segments(segments: list[_Segment], count: int) -> list[bytes]:
    """Return the last ``count`` lines of the segments, read as one stream (oldest segment first)."""
    chunks: list[bytes] = []
    newlines = 0
    total = 0
    reached_start = True
    for segment in reversed(segments):
        position = segment.size
        while position > 0:
            if newlines > count or total >= MAX_TAIL_BYTES:
                break
            size = min(READ_CHUNK, position)
            position -= size
            data = os.pread(segment.fd, size, position)
            chunks.append(data)
            newlines += data.count(b"\n")
            total += len(data)
        if position > 0:
            reached_start = False
            break
    buffer = b"".join(reversed(chunks))
    lines = _split_keeping_newlines(buffer)
    if not reached_start and lines:
        lines.pop(0)  # Its beginning lies before what was read.
    return _limit_line_length(lines[-count:])


def _split_keeping_newlines(data: bytes) -> list[bytes]:
    # bytes.splitlines() would also split at \r, \v, \f and \x1c to \x1e.
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _limit_line_length(lines: Iterable[bytes]) -> list[bytes]:
    limited = []
    for line in lines:
        for start in range(0, len(line), MAX_LINE_BYTES):
            limited.append(line[start:start + MAX_LINE_BYTES])
    return limited


async def follow(directory: Path, instance_id: str, stream: str, *, from_end: bool = True,
                 tail: int = 0) -> AsyncIterator[bytes]:
    """Yield the lines of a stream as the instance writes them, forever; newlines are kept.

    ``from_end`` starts after the last complete line of the current file, otherwise at
    its beginning. ``tail`` first yields that many lines before the start, taken across
    rotated files, so that no line is lost or repeated between the two parts. Waits for
    the file when it does not exist yet, and then reads it from its beginning. Follows
    rotation (the path gets a new inode) and truncation (the file shrinks). A line not
    finished yet is held back until its newline arrives, unless it grows beyond
    MAX_LINE_BYTES.
    """
    async for batch in follow_batches(directory, instance_id, stream, from_end=from_end, tail=tail):
        for line in batch:
            yield line


async def follow_batches(directory: Path, instance_id: str, stream: str, *, from_end: bool = True,
                         tail: int = 0) -> AsyncIterator[list[bytes]]:
    """Do what :func:`follow` does, but yield lists of lines: each read's lines, or an empty list at each idle poll.

    The empty lists let a caller check, about every FOLLOW_POLL_INTERVAL seconds,
    whether it should stop (its client has gone, say).
    """
    path = log_path(directory, instance_id, stream)
    fd = None
    try:
        while fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                # Everything the file contains once it appears is new, so it is read from its start.
                from_end, tail = False, 0
                yield []
                await asyncio.sleep(FOLLOW_POLL_INTERVAL)

        position = _start_position(fd) if from_end else 0
        if tail > 0:
            yield await asyncio.to_thread(_tail_before, directory, instance_id, stream, fd, position, tail)

        pending = bytearray()
        while True:
            data = os.pread(fd, READ_CHUNK, position)
            if data:
                position += len(data)
                yield _take_lines(pending, data)
                continue
            if _path_replaced(path, fd):
                # Rotated. The sink closes a file before it renames it, so nothing is
                # added after this read to the end. A line cut by the rotation goes on
                # in the next file, so ``pending`` is kept.
                while data := os.pread(fd, READ_CHUNK, position):
                    position += len(data)
                    yield _take_lines(pending, data)
                newer = _open_newer(directory, instance_id, stream, fd)
                if newer is not None:
                    os.close(fd)
                    fd, position = newer, 0
                    continue
            elif os.fstat(fd).st_size < position:
                position = 0  # Truncated in place.
                pending.clear()
                continue
            yield []
            await asyncio.sleep(FOLLOW_POLL_INTERVAL)
    finally:
        if fd is not None:
            os.close(fd)


def _start_position(fd: int) -> int:
    """Return the offset just after the last newline of the file, or its size when that is more than MAX_LINE_BYTES back."""
    size = os.fstat(fd).st_size
    position = size
    while position > 0 and size - position < MAX_LINE_BYTES:
        length = min(READ_CHUNK, position)
        data = os.pread(fd, length, position - length)
        newline = data.rfind(b"\n")
        if newline >= 0:
            return position - length + newline + 1
        position -= length
    return 0 if position == 0 else size


def _tail_before(directory: Path, instance_id: str, stream: str, fd: int, position: int, count: int) -> list[bytes]:
    """Return the last ``count`` lines before ``position`` in the open file ``fd``, reading older files as needed."""
    identity = _identity(os.fstat(fd))
    older = []
    # Rotated files newest first. If ``fd`` was rotated since it was opened, it is
    # one of them, and only the files after it are older.
    for path in reversed(rotated_paths(directory, instance_id, stream)):
        try:
            status = os.stat(path)
        except FileNotFoundError:
            continue
        if _identity(status) == identity:
            older.clear()
            continue
        older.append(path)
    segments = []
    try:
        for path in reversed(older):
            try:
                other = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            segments.append(_Segment(other, os.fstat(other).st_size))
        segments.append(_Segment(fd, position))
        return _tail_of_segments(segments, count)
    finally:
        for segment in segments[:-1]:
            os.close(segment.fd)


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


def _path_replaced(path: Path, fd: int) -> bool:
    """Return whether ``path`` now names another file than the one ``fd`` reads."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return True  # Renamed, and the new file is not created yet.
    return _identity(status) != _identity(os.fstat(fd))


def _open_newer(directory: Path, instance_id: str, stream: str, fd: int) -> int | None:
    """Open the file written after the rotated file ``fd`` reads, or return None when it does not exist yet.

    When ``fd`` reads NAME.log.K, that is NAME.log.(K-1), or NAME.log when K is 1.
    Following the numbers, rather than jumping to NAME.log, keeps the files that
    rotations in between produced. A file that is no longer among the rotated ones
    (dropped as the oldest, or deleted) is followed by NAME.log.
    """
    identity = _identity(os.fstat(fd))
    current = log_path(directory, instance_id, stream)
    # Another rotation can renumber the files between the search and the open, so the
    # open is checked and, when it lost that race, tried again.
    for _ in range(3):
        number = None
        for candidate in reversed(rotated_paths(directory, instance_id, stream)):
            try:
                if _identity(os.stat(candidate)) == identity:
                    number = int(candidate.name.rsplit(".", 1)[1])
                    break
            except FileNotFoundError:
                continue
        newer = current if number in (None, 1) else _numbered(current, number - 1)
        try:
            newer_fd = os.open(newer, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if newer == current:
                return None  # Between a rotation's rename and the new file.
            continue
        if number is None or _names_file(_numbered(current, number), identity):
            # The renames of a rotation go from the oldest file to the newest, so while
            # ``fd``'s file still has number K, the file opened as K-1 was the next one.
            return newer_fd
        os.close(newer_fd)
    return None


def _names_file(path: Path, identity: tuple[int, int]) -> bool:
    try:
        return _identity(os.stat(path)) == identity
    except FileNotFoundError:
        return False


def _take_lines(pending: bytearray, data: bytes) -> list[bytes]:
    """Append ``data`` to ``pending`` and remove and return the complete lines, and pieces over MAX_LINE_BYTES."""
    pending += data
    lines = []
    start = 0
    while True:
        newline = pending.find(b"\n", start)
        if newline < 0:
            break
        lines.append(bytes(pending[start:newline + 1]))
        start = newline + 1
    del pending[:start]
    while len(pending) >= MAX_LINE_BYTES:
        lines.append(bytes(pending[:MAX_LINE_BYTES]))
        del pending[:MAX_LINE_BYTES]
    return _limit_line_length(lines)

