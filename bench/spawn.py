"""Start N processes of ``sleep 3600`` from one Python process and time it.

    python -m bench.spawn METHOD N RESULT_FILE

METHOD is one of :data:`METHODS`. The time runs from the first spawn call until the
N-th has returned, which is when every process exists. Then every process is killed
by its pid and reaped, and the seconds are written to RESULT_FILE as JSON. The bench
runs this in a fresh interpreter each time, so that the spawning process is small and
the same for every method.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import resource
import signal
import subprocess
import sys
import time

COMMAND = "sleep 3600"
SLEEP = "/bin/sleep"

METHODS = {
    "posix_spawn": "os.posix_spawn('/bin/sleep', ['sleep', '3600'], env)",
    "posix_spawn-pipes": "os.posix_spawn(...) with its stdout and stderr on pipes whose read ends stay open",
    "popen": "subprocess.Popen(['sleep', '3600'])",
    "popen-sh": "subprocess.Popen(['/bin/sh', '-c', 'sleep 3600'])",
    "asyncio-shell": "await asyncio.create_subprocess_shell('sleep 3600')",
}


def _spawn_posix(count: int) -> tuple[float, list[int]]:
    environment = dict(os.environ)
    pids = []
    started = time.perf_counter()
    for _ in range(count):
        pids.append(os.posix_spawn(SLEEP, ["sleep", "3600"], environment))
    elapsed = time.perf_counter() - started
    return elapsed, pids


def _spawn_posix_pipes(count: int) -> tuple[float, list[int], list[int]]:
    """Spawn as a slave does: stdout and stderr on two pipes whose read ends this process keeps.

    Each spawn copies the spawner's descriptor table (clone), and the child's exec
    closes the close-on-exec ones, so a spawn costs more with every pair kept open.
    """
    environment = dict(os.environ)
    pids: list[int] = []
    read_ends: list[int] = []
    started = time.perf_counter()
    for _ in range(count):
        out_read, out_write = os.pipe2(os.O_CLOEXEC)
        err_read, err_write = os.pipe2(os.O_CLOEXEC)
        pids.append(os.posix_spawn(SLEEP, ["sleep", "3600"], environment, file_actions=[
            (os.POSIX_SPAWN_DUP2, out_write, 1), (os.POSIX_SPAWN_DUP2, err_write, 2)]))
        os.close(out_write)
        os.close(err_write)
        read_ends += (out_read, err_read)
    elapsed = time.perf_counter() - started
    return elapsed, pids, read_ends


def _spawn_popen(count: int, arguments: list[str]) -> tuple[float, list[subprocess.Popen]]:
    processes = []
    started = time.perf_counter()
    for _ in range(count):
        processes.append(subprocess.Popen(arguments))
    elapsed = time.perf_counter() - started
    return elapsed, processes


async def _spawn_asyncio(count: int) -> float:
    processes = []
    try:
        started = time.perf_counter()
        for _ in range(count):
            processes.append(await asyncio.create_subprocess_shell(COMMAND))
        return time.perf_counter() - started
    finally:
        _kill_grandchildren()
        for process in processes:
            try:
                process.kill()
            except ProcessLookupError:
                pass
        for process in processes:
            await process.wait()


def _children(pid: int) -> list[int]:
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as children:
                found.extend(int(child) for child in children.read().split())
        except OSError:
            continue
    return found


def _kill_grandchildren() -> None:
    """SIGKILL what the children started: with /bin/sh -c, each sh has its sleep as a child.

    Killed before the children, so that no sleep outlives its shell.
    """
    for child in _children(os.getpid()):
        for grandchild in _children(child):
            try:
                os.kill(grandchild, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _kill_and_reap(pids: list[int]) -> None:
    _kill_grandchildren()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in pids:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def _become_subreaper() -> None:
    """Make this process the reaper of its orphaned descendants (Linux prctl).

    A shell killed between the scan of its children and the kill may just have forked
    its sleep. That sleep is then re-parented to this process, not to PID 1, and
    :func:`_kill_orphans` kills it.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)


def _kill_orphans() -> None:
    """SIGKILL and reap whatever children are left, until none is."""
    while True:
        left = _children(os.getpid())
        if not left:
            return
        for pid in left:
            for grandchild in _children(pid):
                try:
                    os.kill(grandchild, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in left:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def measure(method: str, count: int) -> float:
    if method == "posix_spawn":
        pids: list[int] = []
        try:
            elapsed, pids = _spawn_posix(count)
        finally:
            _kill_and_reap(pids)
        return elapsed
    if method == "posix_spawn-pipes":
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        pids, read_ends = [], []
        try:
            elapsed, pids, read_ends = _spawn_posix_pipes(count)
        finally:
            _kill_and_reap(pids)
            for fd in read_ends:
                os.close(fd)
        return elapsed
    if method in ("popen", "popen-sh"):
        arguments = ["sleep", "3600"] if method == "popen" else ["/bin/sh", "-c", COMMAND]
        processes: list[subprocess.Popen] = []
        try:
            elapsed, processes = _spawn_popen(count, arguments)
        finally:
            _kill_grandchildren()
            for process in processes:
                process.kill()
            for process in processes:
                process.wait()
        return elapsed
    if method == "asyncio-shell":
        return asyncio.run(_spawn_asyncio(count))
    raise SystemExit(f"unknown method {method!r}; one of {', '.join(METHODS)}")


def main() -> int:
    if len(sys.argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    method, count, result_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    _become_subreaper()
    try:
        elapsed = measure(method, count)
    finally:
        _kill_orphans()
    with open(result_file, "w") as output:
        json.dump({"method": method, "count": count, "seconds": elapsed}, output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
