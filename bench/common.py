"""Shared pieces of the peer benchmarks: the run marker, figures, commands and time."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]

# Every process the benchmarks start carries MARKER=<run id> in its environment (set in
# os.environ at start-up, so children inherit it), and the final sweep SIGKILLs by pid
# whatever still carries it. The name does not start with GDPM_, because the test
# harness strips GDPM_* variables from the environment of the masters and slaves.
MARKER = "BENCH_PEERS_RUN"

# Seconds between two polls, for every manager.
POLL_INTERVAL = 0.02

T = TypeVar("T")


class BenchError(Exception):
    """A measurement that could not be made. The message contains the reason."""


@dataclass
class Series:
    """The values of one figure over the repetitions; None is a repetition that failed or timed out."""

    values: list[float | None] = field(default_factory=list)

    def add(self, value: float | None) -> None:
        self.values.append(value)

    @property
    def measured(self) -> list[float]:
        return sorted(value for value in self.values if value is not None)

    @property
    def missed(self) -> int:
        return len(self.values) - len(self.measured)

    @property
    def median(self) -> float | None:
        return statistics.median(self.measured) if self.measured else None

    @property
    def low(self) -> float | None:
        return self.measured[0] if self.measured else None

    @property
    def high(self) -> float | None:
        return self.measured[-1] if self.measured else None

    def to_json(self) -> dict:
        return {"values": self.values, "median": self.median, "min": self.low, "max": self.high}


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def poll(predicate: Callable[[], T], timeout: float, interval: float = POLL_INTERVAL) -> tuple[T | None, float]:
    """Call ``predicate`` every ``interval`` seconds until it returns a true value.

    Returns that value and the monotonic time of the call that returned it, or
    (None, now) after ``timeout`` seconds. OSError counts as a false value.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except OSError:
            value = None
        now = time.monotonic()
        if value:
            return value, now
        if now >= deadline:
            return None, now
        time.sleep(interval)


def run(arguments: Sequence[str], *, timeout: float = 120.0, env: dict[str, str] | None = None,
        cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command to its end and capture its output; raise BenchError when it fails."""
    try:
        completed = subprocess.run(list(arguments), capture_output=True, text=True, timeout=timeout, env=env,
                                   cwd=cwd, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"{' '.join(arguments)} did not finish within {timeout:g} s") from error
    except OSError as error:
        raise BenchError(f"{' '.join(arguments)} could not be started: {error}") from error
    if check and completed.returncode != 0:
        raise BenchError(f"{' '.join(arguments)} exited with code {completed.returncode}: "
                         f"{(completed.stderr or completed.stdout).strip()[-2000:]}")
    return completed


def start_background(arguments: Sequence[str], log_path: Path, *, env: dict[str, str] | None = None,
                     cwd: Path | None = None) -> subprocess.Popen:
    """Start a long-running process in its own process group, its output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(list(arguments), stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT, env=env, cwd=cwd, process_group=0)


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """SIGTERM a child, wait up to ``timeout`` seconds, then SIGKILL it; always reap it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            process.kill()
    process.wait(10)


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM a process that is not our child, wait until it is gone, then SIGKILL it."""
    from bench.procfs import is_alive, kill_quietly

    kill_quietly(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(pid):
        kill_quietly(pid, signal.SIGKILL)


def format_seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.1:
        return f"{value * 1000:.1f} ms"
    return f"{value:.2f} s"

