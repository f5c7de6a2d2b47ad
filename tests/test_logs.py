"""Tests of the slave's instance logs: LogSink with real pipes and child processes, and the readers.

The children are started with subprocess in a session of their own, their stdout being
the write end that LogSink.open_pipe returns, as the slave gives it to /bin/sh.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import os
import signal
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gdpm.slave import logs
from gdpm.slave.logs import LogSink, follow, log_path, rotated_paths, tail_lines
from gdpm.slave.process import spawn_shell

INSTANCE = "5e7a1c00-0"
FIFTY_MB = 50_000_000


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen]]:
    """Collect the children a test starts, and SIGKILL their process groups at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for child in started:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait(timeout=10)


def spawn(children: list[subprocess.Popen], command: str, stdout: int, stderr: int | None = None) -> subprocess.Popen:
    child = subprocess.Popen(
        ["/bin/sh", "-c", command], stdin=subprocess.DEVNULL, stdout=stdout,
        stderr=stderr if stderr is not None else subprocess.DEVNULL, start_new_session=True,
    )
    children.append(child)
    return child


async def wait_exit(child: subprocess.Popen, timeout: float = 30.0) -> int:
    return await asyncio.wait_for(asyncio.to_thread(child.wait), timeout)


async def run_through_sink(children: list, sink: LogSink, command: str, drain_timeout: float = 30.0) -> int:
    """Run ``command`` with its stdout on a new pipe of ``sink``; return its exit status once drained."""
    write_fd = sink.open_pipe()
    try:
        child = spawn(children, command, write_fd)
    finally:
        sink.close_write_end()
    status = await wait_exit(child)
    assert await sink.drain(drain_timeout)
    return status


async def wait_for(condition, timeout: float = 10.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def stored_bytes(directory: Path, stream: str = "stdout") -> bytes:
    """Return the content of the rotated files and the current file, oldest first."""
    paths = [*rotated_paths(directory, INSTANCE, stream), log_path(directory, INSTANCE, stream)]
    return b"".join(path.read_bytes() for path in paths if path.exists())


def numbered_lines(first: int, last: int) -> list[bytes]:
    return [f"{number}\n".encode() for number in range(first, last + 1)]


# -- throughput ------------------------------------------------------------------------


async def test_sink_throughput_close_to_plain_file(tmp_path: Path, children: list) -> None:
    # Both runs use the same command through /bin/sh, as the slave starts instances.
    command = f"head -c {FIFTY_MB} /dev/zero"
    plain_file = tmp_path / "plain.out"
    sink_dir = tmp_path / "sink"
    sink_dir.mkdir()

    async def plain_run() -> float:
        plain_file.unlink(missing_ok=True)
        fd = os.open(plain_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            started = time.perf_counter()
            child = spawn(children, command, fd)
        finally:
            os.close(fd)
        assert await wait_exit(child) == 0
        elapsed = time.perf_counter() - started
        assert plain_file.stat().st_size == FIFTY_MB
        return elapsed

    async def sink_run() -> float:
        for path in sink_dir.iterdir():
            path.unlink()
        sink = LogSink(sink_dir, INSTANCE, "stdout", max_bytes=logs.DEFAULT_MAX_BYTES, backups=logs.DEFAULT_BACKUPS)
        try:
            started = time.perf_counter()
            assert await run_through_sink(children, sink, command) == 0
            elapsed = time.perf_counter() - started
        finally:
            sink.close()
        assert sink.bytes_written == FIFTY_MB
        return elapsed

    plain_times, sink_times = [], []
    for _ in range(5):
        plain_times.append(await plain_run())
        sink_times.append(await sink_run())

    plain, piped = statistics.median(plain_times), statistics.median(sink_times)
    print(f"50 MB: plain file median {plain * 1000:.1f} ms {sorted(round(t * 1000, 1) for t in plain_times)}, "
          f"LogSink median {piped * 1000:.1f} ms {sorted(round(t * 1000, 1) for t in sink_times)}, "
          f"ratio {piped / plain:.2f}")
    assert piped <= 2 * plain, f"LogSink took {piped / plain:.2f} times as long as a plain file"

    files = [*rotated_paths(sink_dir, INSTANCE, "stdout"), log_path(sink_dir, INSTANCE, "stdout")]
    # /dev/zero has no newline, so every file but the current one is exactly full.
    assert len(files) == math.ceil(FIFTY_MB / logs.DEFAULT_MAX_BYTES)
    assert sum(path.stat().st_size for path in files) == FIFTY_MB
    assert all(path.stat().st_size <= logs.DEFAULT_MAX_BYTES for path in files)


# -- content ---------------------------------------------------------------------------


@pytest.mark.skipif("stdout" not in inspect.signature(spawn_shell).parameters,
                    reason="this spawn_shell takes log file paths only, not descriptors")
async def test_sinks_with_spawn_shell(tmp_path: Path) -> None:
    out = LogSink(tmp_path, INSTANCE, "stdout")
    err = LogSink(tmp_path, INSTANCE, "stderr")
    try:
        try:
            child = spawn_shell("echo out; printf '\\377 err\\n' >&2; exit 3", env=dict(os.environ), cwd=None,
                                stdout=out.open_pipe(), stderr=err.open_pipe())
        finally:
            out.close_write_end()
            err.close_write_end()
        assert await child.wait() == 3
        await child.stop(timeout=5)  # Nothing is left in the group; this only makes sure.
        assert await out.drain(5)
        assert await err.drain(5)
    finally:
        out.close()
        err.close()

    assert out.path.read_bytes() == b"out\n"
    assert err.path.read_bytes() == b"\xff err\n"


async def test_invalid_utf8_stored_exactly(tmp_path: Path, children: list) -> None:
    sink = LogSink(tmp_path, INSTANCE, "stdout")
    try:
        assert await run_through_sink(children, sink, r"printf '\377\376abc\n'; printf 'cr\rnul\000end'") == 0
    finally:
        sink.close()

    assert log_path(tmp_path, INSTANCE, "stdout").read_bytes() == b"\xff\xfeabc\ncr\rnul\x00end"


async def test_sink_appends_across_runs(tmp_path: Path, children: list) -> None:
    sink = LogSink(tmp_path, INSTANCE, "stdout")
    try:
        await run_through_sink(children, sink, "echo first run")
        await run_through_sink(children, sink, "echo second run")
    finally:
        sink.close()
    # A new sink for the same instance, as after a slave restart, appends too.
    again = LogSink(tmp_path, INSTANCE, "stdout")
    try:
        await run_through_sink(children, again, "echo third run")
    finally:
        again.close()

    assert log_path(tmp_path, INSTANCE, "stdout").read_bytes() == b"first run\nsecond run\nthird run\n"


async def test_stdout_and_stderr_sinks_separate(tmp_path: Path, children: list) -> None:
    out = LogSink(tmp_path, INSTANCE, "stdout")
    err = LogSink(tmp_path, INSTANCE, "stderr")
    try:
        out_fd, err_fd = out.open_pipe(), err.open_pipe()
        try:
            child = spawn(children, "echo to-out; echo to-err >&2", out_fd, err_fd)
        finally:
            out.close_write_end()
            err.close_write_end()
        assert await wait_exit(child) == 0
        assert await out.drain(5)
        assert await err.drain(5)
    finally:
        out.close()
        err.close()

    assert out.path.read_bytes() == b"to-out\n"
    assert err.path.read_bytes() == b"to-err\n"
    assert err.path.name == f"{INSTANCE}.stderr.log"


def test_sink_rejects_invalid_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="stream"):
        LogSink(tmp_path, INSTANCE, "stdin")
    with pytest.raises(ValueError, match="max_bytes"):
        LogSink(tmp_path, INSTANCE, "stdout", max_bytes=0)
    with pytest.raises(ValueError, match="backups"):
        LogSink(tmp_path, INSTANCE, "stdout", backups=-1)


# -- rotation --------------------------------------------------------------------------


async def test_rotation_bounds_files_and_sizes(tmp_path: Path, children: list) -> None:
    sink = LogSink(tmp_path, INSTANCE, "stdout", max_bytes=1000, backups=3)
    try:
        await run_through_sink(children, sink, "seq 1 5000")
    finally:
        sink.close()

    files = [*rotated_paths(tmp_path, INSTANCE, "stdout"), log_path(tmp_path, INSTANCE, "stdout")]
    assert [path.name for path in files] == [f"{INSTANCE}.stdout.log.{n}" for n in (3, 2, 1)] + [
        f"{INSTANCE}.stdout.log"]
    assert len(list(tmp_path.iterdir())) == 4
    for path in files:
        data = path.read_bytes()
        assert 0 < len(data) <= 1000
        # Short lines: every rotation falls between two lines.
        assert data.endswith(b"\n")
        assert data[:1].isdigit()
    expected = b"".join(numbered_lines(1, 5000))
    assert expected.endswith(stored_bytes(tmp_path))
    assert stored_bytes(tmp_path).endswith(b"\n5000\n")


async def test_rotation_splits_line_longer_than_file(tmp_path: Path, children: list) -> None:
    sink = LogSink(tmp_path, INSTANCE, "stdout", max_bytes=1000, backups=5)
    try:
        await run_through_sink(children, sink, "echo short; head -c 2500 /dev/zero | tr '\\0' x; echo; echo end")
    finally:
        sink.close()

    files = [*rotated_paths(tmp_path, INSTANCE, "stdout"), log_path(tmp_path, INSTANCE, "stdout")]
    assert all(path.stat().st_size <= 1000 for path in files)
    assert stored_bytes(tmp_path) == b"short\n" + b"x" * 2500 + b"\nend\n"


async def test_rotation_without_backups(tmp_path: Path, children: list) -> None:
    sink = LogSink(tmp_path, INSTANCE, "stdout", max_bytes=100, backups=0)
    try:
        await run_through_sink(children, sink, "seq 1 1000")
    finally:
        sink.close()

    assert [path.name for path in tmp_path.iterdir()] == [f"{INSTANCE}.stdout.log"]
    data = log_path(tmp_path, INSTANCE, "stdout").read_bytes()
    assert 0 < len(data) <= 100
    assert data.endswith(b"\n1000\n")


async def test_rotation_drops_files_above_lowered_backups(tmp_path: Path, children: list) -> None:
    first = LogSink(tmp_path, INSTANCE, "stdout", max_bytes=100, backups=6)
    try:
        await run_through_sink(children, first, "seq 1 500")
    finally:
        first.close()
    assert len(rotated_paths(tmp_path, INSTANCE, "stdout")) == 6

    second = LogSink(tmp_path, INSTANCE, "stdout", max_bytes=100, backups=2)
    try:
        await run_through_sink(children, second, "seq 501 600")
    finally:
        second.close()

    assert len(rotated_paths(tmp_path, INSTANCE, "stdout")) == 2
    assert stored_bytes(tmp_path).endswith(b"\n600\n")


# -- drain -----------------------------------------------------------------------------


async def test_drain_keeps_output_of_term_handler(tmp_path: Path, children: list) -> None:
    # The handler writes 200 KB, more than a pipe holds, and then its last line: the
    # sink must keep reading while the instance stops, and up to its last byte.
    command = (
        "trap 'head -c 200000 /dev/zero | tr \"\\0\" y; echo; echo last words; exit 0' TERM; "
        "echo ready; while :; do sleep 0.05; done"
    )
    sink = LogSink(tmp_path, INSTANCE, "stdout")
    try:
        write_fd = sink.open_pipe()
        try:
            child = spawn(children, command, write_fd)
        finally:
            sink.close_write_end()
        await wait_for(lambda: stored_bytes(tmp_path).startswith(b"ready\n"))

        os.killpg(child.pid, signal.SIGTERM)
        assert await wait_exit(child) == 0
        assert await sink.drain(5)
    finally:
        sink.close()

    data = sink.path.read_bytes()
    assert data == b"ready\n" + b"y" * 200000 + b"\nlast words\n"


async def test_drain_times_out_when_daemon_holds_pipe(tmp_path: Path, children: list) -> None:
    sink = LogSink(tmp_path, INSTANCE, "stdout")
    try:
        write_fd = sink.open_pipe()
        try:
            # The background sleep keeps a copy of stdout after the shell exits.
            child = spawn(children, "echo before; sleep 30 & echo started", write_fd)
        finally:
            sink.close_write_end()
        assert await wait_exit(child) == 0

        started = time.monotonic()
        assert await sink.drain(0.3) is False
        assert time.monotonic() - started < 5
    finally:
        sink.close()

    assert sink.path.read_bytes() == b"before\nstarted\n"


async def test_file_created_at_first_output(tmp_path: Path) -> None:
    sink = LogSink(tmp_path, INSTANCE, "stdout")
    try:
        write_fd = sink.open_pipe()
        assert not sink.path.exists()
        os.write(write_fd, b"first\n")
        await wait_for(sink.path.exists)
        assert sink.path.read_bytes() == b"first\n"
    finally:
        sink.close()


async def test_removed_log_directory_created_again(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    sink = LogSink(directory, INSTANCE, "stdout")
    try:
        write_fd = sink.open_pipe()
        directory.rmdir()
        os.write(write_fd, b"after rmdir\n")
        await wait_for(sink.path.exists)
    finally:
        sink.close()
    assert sink.path.read_bytes() == b"after rmdir\n"
    assert sink.bytes_dropped == 0


async def test_deleted_open_file_created_again(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    sink = LogSink(directory, INSTANCE, "stdout")
    try:
        write_fd = sink.open_pipe()
        os.write(write_fd, b"before\n")
        await wait_for(lambda: sink.bytes_written == 7)
        sink.path.unlink()
        directory.rmdir()
        os.write(write_fd, b"after\n")
        await wait_for(lambda: sink.bytes_written == 13)
    finally:
        sink.close()
    assert sink.path.read_bytes() == b"after\n"


async def test_open_files_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Five sinks write in turn with room for two open files: each file is closed when
    # two others were written after it, and opened again at its next write.
    monkeypatch.setattr(logs, "_open_files", logs._OpenFiles(2))
    sinks = [LogSink(tmp_path, f"5e7a1c00-{index}", "stdout") for index in range(5)]
    write_fds = [sink.open_pipe() for sink in sinks]
    try:
        for round_number in range(3):
            for index, (sink, write_fd) in enumerate(zip(sinks, write_fds)):
                os.write(write_fd, f"{round_number}\n".encode())
                await wait_for(lambda: sink.bytes_written == 2 * (round_number + 1))
                written_last = {sink} if round_number == index == 0 else {sink, sinks[index - 1]}
                assert {other for other in sinks if other._file_fd is not None} == written_last
    finally:
        for sink in sinks:
            sink.close()
    assert len(logs._open_files) == 0
    for sink in sinks:
        assert sink.path.read_bytes() == b"0\n1\n2\n"


async def test_close_reads_what_is_buffered(tmp_path: Path) -> None:
    sink = LogSink(tmp_path, INSTANCE, "stdout")
    write_fd = sink.open_pipe()
    os.write(write_fd, b"written just before close\n")

    sink.close()

    assert sink.path.read_bytes() == b"written just before close\n"


# -- tail ------------------------------------------------------------------------------


async def test_tail_across_rotated_files(tmp_path: Path, children: list) -> None:
    sink = LogSink(tmp_path, INSTANCE, "stdout", max_bytes=2000, backups=10)
    try:
        await run_through_sink(children, sink, "seq 1 3000")
    finally:
        sink.close()
    current_lines = log_path(tmp_path, INSTANCE, "stdout").read_bytes().count(b"\n")
    assert current_lines < 500  # The tail below needs the rotated files.

    assert tail_lines(tmp_path, INSTANCE, "stdout", 500) == numbered_lines(2501, 3000)
    assert tail_lines(tmp_path, INSTANCE, "stdout", 1) == [b"3000\n"]
    assert tail_lines(tmp_path, INSTANCE, "stdout", 0) == []


def test_tail_returns_what_exists(tmp_path: Path) -> None:
    assert tail_lines(tmp_path, INSTANCE, "stdout", 10) == []
    log_path(tmp_path, INSTANCE, "stdout").write_bytes(b"one\ntwo\r\n\xff three\nunfinished")

    assert tail_lines(tmp_path, INSTANCE, "stdout", 100) == [b"one\n", b"two\r\n", b"\xff three\n", b"unfinished"]
    assert tail_lines(tmp_path, INSTANCE, "stdout", 2) == [b"\xff three\n", b"unfinished"]


def test_tail_cuts_very_long_line(tmp_path: Path) -> None:
    long_line = b"z" * (logs.MAX_LINE_BYTES + 10) + b"\n"
    log_path(tmp_path, INSTANCE, "stdout").write_bytes(b"before\n" + long_line)

    lines = tail_lines(tmp_path, INSTANCE, "stdout", 1)

    assert lines == [b"z" * logs.MAX_LINE_BYTES, b"z" * 10 + b"\n"]


# -- follow ----------------------------------------------------------------------------


async def collect(generator, count: int, timeout: float = 20.0) -> list[bytes]:
    lines: list[bytes] = []
    async with asyncio.timeout(timeout):
        async for line in generator:
            lines.append(line)
            if len(lines) == count:
                break
    return lines


async def test_follow_across_rotation(tmp_path: Path, children: list) -> None:
    sink = LogSink(tmp_path, INSTANCE, "stdout", max_bytes=4000, backups=100)
    try:
        await run_through_sink(children, sink, "echo old line")
        lines = follow(tmp_path, INSTANCE, "stdout")
        collector = asyncio.ensure_future(collect(lines, 20000))
        # About 110 KB in 4000-byte files: some 27 rotations while the follower reads.
        await run_through_sink(children, sink, "seq 1 20000")
        collected = await collector
        await lines.aclose()
    finally:
        sink.close()

    assert len(rotated_paths(tmp_path, INSTANCE, "stdout")) > 20
    assert collected == numbered_lines(1, 20000)


async def test_follow_with_tail_loses_and_repeats_nothing(tmp_path: Path, children: list) -> None:
    sink = LogSink(tmp_path, INSTANCE, "stdout", max_bytes=300, backups=20)
    try:
        await run_through_sink(children, sink, "seq 1 200; printf unfinished")
        lines = follow(tmp_path, INSTANCE, "stdout", tail=150)
        first = await collect(lines, 150)
        await run_through_sink(children, sink, "echo ' line'; seq 201 300")
        rest = await collect(lines, 101)
        await lines.aclose()
    finally:
        sink.close()

    # The unfinished line is held back, then sent once whole.
    assert first == numbered_lines(51, 200)
    assert rest == [b"unfinished line\n", *numbered_lines(201, 300)]


async def test_follow_waits_for_file(tmp_path: Path) -> None:
    lines = follow(tmp_path, INSTANCE, "stderr")
    collector = asyncio.ensure_future(collect(lines, 1, timeout=10))
    await asyncio.sleep(0)  # Let the follower find no file first.
    sink = LogSink(tmp_path, INSTANCE, "stderr")
    try:
        write_fd = sink.open_pipe()
        os.write(write_fd, b"\xfe first\n")
        assert await collector == [b"\xfe first\n"]
    finally:
        sink.close()
        await lines.aclose()


async def test_follow_from_start_and_truncation(tmp_path: Path) -> None:
    path = log_path(tmp_path, INSTANCE, "stdout")
    path.write_bytes(b"a\nb\n")
    lines = follow(tmp_path, INSTANCE, "stdout", from_end=False)
    try:
        assert await collect(lines, 2) == [b"a\n", b"b\n"]
        # Truncated in place, as copytruncate does: reading restarts at offset 0.
        path.write_bytes(b"c\n")
        assert await collect(lines, 1) == [b"c\n"]
    finally:
        await lines.aclose()
