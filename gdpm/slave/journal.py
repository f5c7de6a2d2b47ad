"""A journal of the process groups a slave started, to clean up after a crash.

Each spawn appends ``+ PGID START_TIME INSTANCE_ID`` and each finished stop or exit
appends ``- PGID``. A slave that starts again replays the journal and kills the groups
of its previous run that are still alive. A group counts as ours only when the leader's
pid and start time both match, or, once the leader is gone, when a process of that
group still carries the instance's ``GDPM_INSTANCE_ID`` in its environment. A pid
alone is never enough, because the kernel reuses pids.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import structlog

from gdpm.slave.process import read_start_time

log = structlog.get_logger("gdpm.slave.journal")

# Rewrite the journal with only the live records once it has this many more lines
# than live records, so a crash-looping instance cannot grow it without bound.
COMPACT_SLACK = 10_000


class ProcessJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.live: dict[int, tuple[int | None, str]] = {}
        self._lines = 0
        self._file = None
        self._flush_scheduled = False

    def open(self) -> None:
        # Buffered: a burst of spawns costs one write, flushed at the end of the
        # event loop's turn (see _append).
        self._file = open(self.path, "a", encoding="utf-8")

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def record_start(self, pgid: int, start_time: int | None, instance_id: str) -> None:
        self.live[pgid] = (start_time, instance_id)
        self._append(f"+ {pgid} {start_time if start_time is not None else '-'} {instance_id}\n")

    def record_end(self, pgid: int) -> None:
        if self.live.pop(pgid, None) is not None:
            self._append(f"- {pgid}\n")

    def _append(self, line: str) -> None:
        self._file.write(line)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        self._lines += 1
        if self._lines > len(self.live) + COMPACT_SLACK:
            self._rewrite()

    def _rewrite(self) -> None:
        temporary = self.path.with_suffix(".tmp")
        with open(temporary, "w", encoding="utf-8") as rewritten:
            for pgid, (start_time, instance_id) in self.live.items():
                rewritten.write(f"+ {pgid} {start_time if start_time is not None else '-'} {instance_id}\n")
        os.replace(temporary, self.path)
        self.close()
        self.open()
        self._lines = len(self.live)

    def kill_leftovers(self) -> int:
        """Kill the groups of a previous run that are still alive, then start a new journal.

        Returns the number of groups killed.
        """
        killed = 0
        for pgid, (start_time, instance_id) in _replay(self.path).items():
            if _kill_group_if_ours(pgid, start_time, instance_id):
                killed += 1
                log.warning("killed leftover instance of a previous run", pgid=pgid, instance_id=instance_id)
        self.path.unlink(missing_ok=True)
        return killed


def _replay(path: Path) -> dict[int, tuple[int | None, str]]:
    live: dict[int, tuple[int | None, str]] = {}
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return live
    for line in lines:
        fields = line.split()
        try:
            if fields[0] == "+" and len(fields) == 4:
                live[int(fields[1])] = (None if fields[2] == "-" else int(fields[2]), fields[3])
            elif fields[0] == "-" and len(fields) == 2:
                live.pop(int(fields[1]), None)
        except (ValueError, IndexError):
            continue  # A line cut short by the crash.
    return live


def _kill_group_if_ours(pgid: int, start_time: int | None, instance_id: str) -> bool:
    if start_time is not None and read_start_time(pgid) == start_time:
        return _killpg(pgid)
    marker = f"GDPM_INSTANCE_ID={instance_id}".encode()
    members = [pid for pid in _group_members(pgid) if marker in _environment(pid)]
    for pid in members:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return bool(members)


def _killpg(pgid: int) -> bool:
    try:
        os.killpg(pgid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


def _group_members(pgid: int) -> list[int]:
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{name}/stat").read_bytes()
        except OSError:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            members.append(int(name))
    return members


def _environment(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return []
