"""Measure requests/s of one URL on loopback: wrk, or a small Python client without it.

wrk (Debian package ``wrk``) runs as ``wrk -t1 -c32 -dSECONDSs URL``. When wrk is
missing and may not be installed (``--smoke``), :func:`python_load` replaces it: 32
keep-alive connections from one asyncio process. It is much slower than wrk, so its
figures only compare URLs measured with it in the same run.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from bench.common import BenchError, log, run

CONNECTIONS = 32


@dataclass
class LoadResult:
    requests_per_second: float
    requests: int
    errors: int
    # Mean latency in milliseconds.
    latency_ms: float | None
    tool: str


def check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise BenchError(f"refusing to send load to {url}: only loopback addresses are measured")


def find_wrk() -> str | None:
    return shutil.which("wrk")


def install_wrk() -> str | None:
    """Install Debian's wrk with apt-get when running as root; return its path or None."""
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        return None
    log("wrk is missing: apt-get install -y wrk")
    try:
        run([apt_get, "install", "-y", "-q", "wrk"], timeout=300)
    except BenchError as error:
        log(f"apt-get install wrk failed ({error}); running apt-get update once and trying again")
        try:
            run([apt_get, "update", "-q"], timeout=300)
            run([apt_get, "install", "-y", "-q", "wrk"], timeout=300)
        except BenchError as second:
            log(f"cannot install wrk: {second}")
            return None
    return find_wrk()


def wrk_load(wrk: str, url: str, duration: float) -> LoadResult:
    check_loopback(url)
    seconds = max(1, round(duration))
    output = run([wrk, "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", url], timeout=seconds + 60).stdout
    rate = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in", output, re.MULTILINE)
    if rate is None or total is None:
        raise BenchError(f"cannot read wrk's output:\n{output}")
    errors = 0
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non_2xx:
        errors += int(non_2xx.group(1))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if socket_errors:
        errors += sum(int(value) for value in socket_errors.groups())
    latency = re.search(r"^\s*Latency\s+([\d.]+)(us|ms|s)\b", output, re.MULTILINE)
    latency_ms = None
    if latency:
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[latency.group(2)]
        latency_ms = float(latency.group(1)) * scale
    return LoadResult(float(rate.group(1)), int(total.group(1)), errors, latency_ms, "wrk")


def python_load(url: str, duration: float) -> LoadResult:
    check_loopback(url)
    return asyncio.run(_python_load(url, duration))


async def _python_load(url: str, duration: float) -> LoadResult:
    import aiohttp

    counts = {"ok": 0, "errors": 0}
    latencies: list[float] = []
    deadline = time.monotonic() + duration

    async def worker(session: aiohttp.ClientSession) -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                async with session.get(url) as response:
                    await response.read()
                    counts["ok" if 200 <= response.status < 400 else "errors"] += 1
            except aiohttp.ClientError:
                counts["errors"] += 1
            latencies.append(time.monotonic() - started)

    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        started = time.monotonic()
        await asyncio.gather(*(worker(session) for _ in range(CONNECTIONS)))
        elapsed = time.monotonic() - started
    total = counts["ok"] + counts["errors"]
    latency_ms = 1000 * sum(latencies) / len(latencies) if latencies else None
    return LoadResult(total / elapsed, total, counts["errors"], latency_ms, "python")
