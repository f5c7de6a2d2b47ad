"""The scenarios of the peer benchmarks. Each returns a :class:`Section` of the report.

Every scenario repeats its measurement ``repeat`` times and keeps all values, so that
the report can show the median with the min and max. Where gdpm is compared with its
peers, the managers take turns within each repetition (gdpm, supervisord, circus,
PM2, then again), so that a slow spell of the machine does not fall on one of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import procfs
from bench.common import REPO_ROOT, BenchError, Series, format_seconds, log, poll, ratio, start_background, stop_process
from bench.gdpm_side import GdpmCluster, etcd_metrics, metrics_delta
from bench.load import LoadResult, find_wrk, install_wrk, python_load, wrk_load
from bench.peers import PEER_CLASSES, PeerInstall, install_peers
from bench.spawn import METHODS

from cluster import EtcdProcess, free_port, http_request  # noqa: E402 - on sys.path through bench.gdpm_side

SCENARIOS = ["spawn", "start-one-node", "delete-one-node", "cluster", "api", "scale", "growth"]

# The /bin/sh -c method of the spawn scenario, the baseline of the ratios.
BASELINE_METHOD = "popen-sh"


@dataclass
class Sizes:
    """The sizes of the scenarios: those of the full run, or the small ones of --smoke."""

    instances: int = 1000
    cluster_slaves: int = 4
    cluster_instances: int = 2000
    api_services: int = 1000
    api_service_replicas: int = 10
    api_seconds: float = 5.0
    scale_slaves: int = 20
    scale_instances: int = 5000
    idle_settle: float = 5.0
    idle_window: float = 10.0
    growth: tuple[int, ...] = (100, 1000, 5000)

    @classmethod
    def smoke(cls, instances: int) -> Sizes:
        return cls(instances=instances, cluster_slaves=2, cluster_instances=2 * instances, api_services=20,
                   api_seconds=1.0, scale_slaves=2, scale_instances=2 * instances, idle_settle=0.5,
                   idle_window=1.0, growth=(max(1, instances // 2), instances, 2 * instances))


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class Target:
    """One target: its requirement, the measured values, and whether it was met (None: not measured)."""

    text: str
    measured: str
    met: bool | None


@dataclass
class Section:
    name: str
    title: str
    method: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    raw: dict = field(default_factory=dict)


@dataclass
class Context:
    """The state the scenarios share: options, the etcd, the scratch folder and reused measurements."""

    repeat: int
    sizes: Sizes
    smoke: bool
    scratch: Path
    etcd: EtcdProcess
    selected: list[str]
    installs: dict[str, PeerInstall] | None = None
    wrk: str | None = None
    wrk_checked: bool = False
    # Seconds to start N processes with /bin/sh -c, by N.
    baselines: dict[int | tuple[str, int], Series] = field(default_factory=dict)
    # The start figures of start-one-node, for delete-one-node's section.
    one_node: dict | None = None
    counter: int = 0
    # Counts of telling lines in the gdpm logs (GdpmCluster.diagnostics), by scenario.
    diagnostics: dict[str, dict[str, int]] = field(default_factory=dict)

    def record_diagnostics(self, scenario: str, gdpm: GdpmCluster) -> None:
        found = self.diagnostics.setdefault(scenario, {})
        for label, count in gdpm.diagnostics().items():
            found[label] = found.get(label, 0) + count

    def diagnostic_notes(self, scenario: str) -> list[str]:
        found = self.diagnostics.get(scenario)
        if not found:
            return []
        listed = "; ".join(f"{label}: {count}" for label, count in found.items())
        return [f"Warning and error lines in the gdpm logs of this scenario, by kind: {listed}."]

    def work_dir(self, name: str) -> Path:
        self.counter += 1
        path = self.scratch / "runs" / f"{self.counter:03d}-{name}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def peers(self) -> dict[str, PeerInstall]:
        if self.installs is None:
            self.installs = install_peers(self.scratch / "peers", allow_install=not self.smoke)
        return self.installs

    def load_tool(self) -> str | None:
        if not self.wrk_checked:
            self.wrk_checked = True
            self.wrk = find_wrk()
            if self.wrk is None and not self.smoke:
                self.wrk = install_wrk()
        return self.wrk

    def timeout(self, instances: int) -> float:
        return 60.0 if self.smoke else min(300.0, max(60.0, instances * 0.1))


# -- 1. spawn ----------------------------------------------------------------------------


def spawn_once(method: str, count: int, scratch: Path) -> float | None:
    """Run bench.spawn in a fresh interpreter and return its seconds."""
    result_file = Path(tempfile.mkstemp(prefix="spawn-", suffix=".json", dir=scratch)[1])
    try:
        completed = subprocess.run([sys.executable, "-m", "bench.spawn", method, str(count), str(result_file)],
                                   cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, timeout=600, check=False)
        if completed.returncode != 0:
            log(f"spawn {method} {count}: exit code {completed.returncode}")
            return None
        return json.loads(result_file.read_text())["seconds"]
    except (subprocess.TimeoutExpired, OSError, ValueError) as error:
        log(f"spawn {method} {count}: {error}")
        return None
    finally:
        result_file.unlink(missing_ok=True)


def baseline(context: Context, count: int) -> Series:
    """Seconds to start ``count`` processes with /bin/sh -c, measured once per run and reused."""
    return spawn_series(context, count, BASELINE_METHOD)


def spawn_series(context: Context, count: int, method: str) -> Series:
    """Seconds to start ``count`` processes with a method of bench.spawn, measured once per run and reused."""
    key = count if method == BASELINE_METHOD else (method, count)
    if key not in context.baselines:
        series = Series()
        for _ in range(context.repeat):
            series.add(spawn_once(method, count, context.scratch))
        context.baselines[key] = series
        log(f"spawn {method} x {count}: median {format_seconds(series.median)}")
    return context.baselines[key]


def scenario_spawn(context: Context) -> Section:
    count = context.sizes.instances
    results = {method: Series() for method in METHODS}
    for repetition in range(context.repeat):
        for method in METHODS:
            value = spawn_once(method, count, context.scratch)
            results[method].add(value)
            log(f"spawn {repetition + 1}/{context.repeat} {method}: {format_seconds(value)}")
    context.baselines.setdefault(count, results[BASELINE_METHOD])
    fastest = results["posix_spawn"].median
    table = Table(["method", "call", "median", "min", "max", "per process", "median / posix_spawn"])
    for method, call in METHODS.items():
        series = results[method]
        table.rows.append([method, f"`{call}`", *_spread(series), _per_item(series.median, count),
                           _times(ratio(series.median, fastest))])
    return Section(
        "spawn", f"1. Spawning {count} processes from one Python process",
        f"A fresh Python process (`python -m bench.spawn METHOD {count} FILE`) starts {count} processes "
        f"of `sleep 3600`, one call after the other, and times the loop from the first call until the "
        f"{count}th has returned; then it kills them by pid and reaps them. The `/bin/sh -c` row "
        f"(`{BASELINE_METHOD}`) is the baseline of the ratios below, as the targets ask. It is what a "
        "manager that runs every command through the shell does per instance: two processes, because dash, "
        "Debian's /bin/sh, forks `sleep` rather than exec'ing it. gdpm runs a command of plain words such "
        "as `sleep 3600` without the shell, so a slave's own spawn is the `posix_spawn` row.",
        tables=[table], raw={method: series.to_json() for method, series in results.items()},
    )


# -- 2 and 3. start and delete on one node -------------------------------------------------


def _one_node(context: Context) -> dict:
    """Run start and delete of N instances on one node, for gdpm and each peer, ``repeat`` times."""
    if context.one_node is not None:
        return context.one_node
    count = context.sizes.instances
    timeout = context.timeout(count)
    installs = context.peers()
    managers = ["gdpm", *[name for name in PEER_CLASSES if installs[name].available]]
    figures: dict[str, dict[str, Series]] = {
        manager: {key: Series() for key in ("start", "status", "spawned", "first", "fds", "gone", "stop_command",
                                            "client")}
        for manager in managers
    }
    for repetition in range(context.repeat):
        for manager in managers:
            series = figures[manager]
            label = f"one-node {repetition + 1}/{context.repeat} {manager}"
            try:
                if manager == "gdpm":
                    _gdpm_one_node(context, count, timeout, series)
                else:
                    _peer_one_node(context, manager, installs[manager], count, timeout, series)
            except BenchError as error:
                log(f"{label}: failed: {error}")
                for values in series.values():
                    if len(values.values) <= repetition:
                        values.add(None)
            log(f"{label}: start {format_seconds(series['start'].values[-1])}, "
                f"status {format_seconds(series['status'].values[-1])}, "
                f"gone {format_seconds(series['gone'].values[-1])}")
    context.one_node = {"count": count, "managers": managers, "figures": figures, "installs": installs}
    return context.one_node


def _gdpm_one_node(context: Context, count: int, timeout: float, series: dict[str, Series]) -> None:
    with GdpmCluster(context.etcd, context.work_dir("gdpm-one-node"), 1, count) as gdpm:
        try:
            idle_fds = gdpm.slave_fds()[0]
            service_id, started = gdpm.create(count)
            timing = gdpm.wait_running(service_id, count, started, timeout, detail=True)
            series["start"].add(timing.api)
            series["status"].add(timing.api)
            series["spawned"].add(timing.spawned)
            series["first"].add(timing.first)
            series["fds"].add(gdpm.slave_fds()[0] - idle_fds)
            deletion = gdpm.delete(service_id, timeout)
            # A delete after a failed start would time a part of the instances only.
            series["gone"].add(deletion.gone if timing.failure is None else None)
            series["stop_command"].add(None)
            series["client"].add(None)
        finally:
            context.record_diagnostics("one-node", gdpm)


def _peer_one_node(context: Context, name: str, install: PeerInstall, count: int, timeout: float,
                   series: dict[str, Series]) -> None:
    peer_class = PEER_CLASSES[name]
    with peer_class(install, context.work_dir(name), count) as peer:
        series["client"].add(peer.client_seconds())
        result = peer.start_all(timeout)
        series["start"].add(result.command)
        series["status"].add(result.status)
        series["spawned"].add(None)
        series["first"].add(None)
        series["fds"].add(None)
        pids = result.pids or peer.children_pids()
        if len(pids) != count:
            log(f"{name}: {len(pids)} of {count} processes found before the stop")
        if not pids:
            series["gone"].add(None)
            series["stop_command"].add(None)
            return
        stop = peer.stop_all(pids, timeout)
        series["gone"].add(stop.gone)
        series["stop_command"].add(stop.command)


def _peer_notes(data: dict) -> list[str]:
    notes = []
    for name, install in data["installs"].items():
        if not install.available:
            notes.append(f"{name} was not measured: {install.error}.")
    return notes


def scenario_start_one_node(context: Context) -> Section:
    data = _one_node(context)
    count, figures = data["count"], data["figures"]
    spawn = baseline(context, count)
    gdpm_start = figures["gdpm"]["start"].median
    table = Table(["manager", "from the start request until", "median", "min", "max", "median / gdpm's"])
    table.rows.append(["gdpm", f"the API reports {count} running", *_spread(figures["gdpm"]["start"]), "1.00×"])
    table.rows.append(["gdpm", "/proc shows the first instance process (same runs)",
                       *_spread(figures["gdpm"]["first"]),
                       _times(ratio(figures["gdpm"]["first"].median, gdpm_start))])
    table.rows.append(["gdpm", f"/proc shows {count} instance processes (same runs)",
                       *_spread(figures["gdpm"]["spawned"]),
                       _times(ratio(figures["gdpm"]["spawned"].median, gdpm_start))])
    for manager in data["managers"][1:]:
        peer = figures[manager]
        table.rows.append([manager, "the start command returned", *_spread(peer["start"]),
                           _times(ratio(peer["start"].median, gdpm_start))])
        table.rows.append([manager, f"its status shows {count} running", *_spread(peer["status"]),
                           _times(ratio(peer["status"].median, gdpm_start))])
    table.rows.append(["(machine)", f"`/bin/sh -c` x {count} from one Python process", *_spread(spawn),
                       _times(ratio(spawn.median, gdpm_start))])
    clients = Table(["peer", "one call of its client that does nothing (start-up cost in each command)",
                     "median"])
    for manager in data["managers"][1:]:
        clients.rows.append([manager, _noop_text(manager), format_seconds(figures[manager]["client"].median)])
    tables = [table, clients] if clients.rows else [table]

    peer_starts = {manager: figures[manager]["start"].median for manager in data["managers"][1:]
                   if figures[manager]["start"].median is not None}
    targets = []
    if peer_starts:
        fastest = min(peer_starts, key=peer_starts.get)
        speedup = ratio(peer_starts[fastest], gdpm_start)
        targets.append(Target(f"start {count} on one node at least 2× faster than the fastest peer",
                              f"{fastest} {format_seconds(peer_starts[fastest])} / gdpm "
                              f"{format_seconds(gdpm_start)} = {_times(speedup)}",
                              None if speedup is None else speedup >= 2.0))
    else:
        targets.append(Target(f"start {count} on one node at least 2× faster than the fastest peer",
                              "no peer measured", None))
    spawn_ratio = ratio(gdpm_start, spawn.median)
    targets.append(Target(f"start {count} on one node within 2× of `/bin/sh -c` x {count}",
                          f"gdpm {format_seconds(gdpm_start)} / spawn {format_seconds(spawn.median)} = "
                          f"{_times(spawn_ratio)}", None if spawn_ratio is None else spawn_ratio <= 2.0))
    method = (
        f"Each manager starts {count} instances of `sleep 3600` on this machine, {_repetitions(context)}, and the "
        "managers take turns. Each repetition starts the manager afresh with nothing running. For gdpm that is a "
        "master and one slave on the shared etcd, with a new key prefix. For a peer it is its daemon, with a new "
        "home dir in the scratch folder. The repetition times the start, then the stop (next table), then stops "
        f"the manager by pid. gdpm is timed from `POST /api/v1/services` "
        f"`{{\"command\": \"sleep 3600\", \"replicas\": {count}}}` until `GET /api/v1/services/ID`, polled "
        "every 20 ms, reports every instance `running`. Each poll also counts the slave's children in /proc. A "
        "peer is timed from its start command until the command returned. Then its status command is polled "
        "every 20 ms until it shows every process running. The peers' figures include the start-up of their "
        "command-line client (second table), and gdpm's include no client. The target compares gdpm's API "
        "figure with the peers' start-command figure, the earlier of their two."
    )
    notes = _peer_notes(data)
    fds = figures["gdpm"]["fds"].median
    if fds is not None:
        notes.append(f"With the {count} instances running, the gdpm slave held {fds:.0f} more open file "
                     f"descriptors than before the request ({fds / count:.1f} per instance).")
    notes += context.diagnostic_notes("one-node")
    section = Section("start-one-node", f"2. Starting {count} instances on one node", method,
                      tables=tables, targets=targets, notes=notes,
                      raw={manager: {key: value.to_json() for key, value in series.items()}
                           for manager, series in figures.items()})
    section.raw["baseline"] = spawn.to_json()
    return section


def scenario_delete_one_node(context: Context) -> Section:
    data = _one_node(context)
    count, figures = data["count"], data["figures"]
    gdpm_gone = figures["gdpm"]["gone"].median
    table = Table(["manager", "from the stop request until", "median", "min", "max", "median / gdpm's"])
    table.rows.append(["gdpm", "no process of the service is alive (/proc)", *_spread(figures["gdpm"]["gone"]),
                       "1.00×"])
    for manager in data["managers"][1:]:
        peer = figures[manager]
        table.rows.append([manager, f"none of its {count} processes is alive (/proc)", *_spread(peer["gone"]),
                           _times(ratio(peer["gone"].median, gdpm_gone))])
        table.rows.append([manager, "the stop command returned", *_spread(peer["stop_command"]),
                           _times(ratio(peer["stop_command"].median, gdpm_gone))])
    peer_gone = {manager: figures[manager]["gone"].median for manager in data["managers"][1:]
                 if figures[manager]["gone"].median is not None}
    if peer_gone and gdpm_gone is not None:
        fastest = min(peer_gone, key=peer_gone.get)
        target = Target(f"delete {count} on one node no slower than the fastest peer",
                        f"gdpm {format_seconds(gdpm_gone)}, {fastest} {format_seconds(peer_gone[fastest])} "
                        f"(gdpm / {fastest} = {_times(ratio(gdpm_gone, peer_gone[fastest]))})",
                        gdpm_gone <= peer_gone[fastest])
    else:
        target = Target(f"delete {count} on one node no slower than the fastest peer",
                        "no peer measured" if not peer_gone else "gdpm not measured", None)
    method = (
        f"These are the same runs as in the previous table, with the {count} instances running. gdpm is timed "
        "from `DELETE /api/v1/services/ID` until none of the service's processes is alive in /proc, polled "
        "every 20 ms. Those processes are the members of each instance's process group (its `sleep`), read "
        "before the request. A peer is timed from its stop command until none of the pids it "
        "reported is alive in /proc. gdpm stops each instance with SIGTERM to its process group. supervisord "
        "and circus send SIGTERM to each process, and `pm2 delete all` stops and forgets each app."
    )
    return Section("delete-one-node", f"3. Deleting {count} instances on one node", method, tables=[table],
                   targets=[target], notes=_peer_notes(data))


# -- 4. cluster ----------------------------------------------------------------------------


def scenario_cluster(context: Context) -> Section:
    sizes = context.sizes
    count, slaves = sizes.cluster_instances, sizes.cluster_slaves
    timeout = context.timeout(count)
    start, spawned, first, gone = Series(), Series(), Series(), Series()
    with GdpmCluster(context.etcd, context.work_dir("gdpm-cluster"), slaves, count) as gdpm:
        try:
            for repetition in range(context.repeat):
                service_id, started = gdpm.create(count)
                timing = gdpm.wait_running(service_id, count, started, timeout, detail=False)
                start.add(timing.api)
                spawned.add(timing.spawned)
                first.add(timing.first)
                deletion = gdpm.delete(service_id, timeout)
                gone.add(deletion.gone if timing.failure is None else None)
                log(f"cluster {repetition + 1}/{context.repeat}: running {format_seconds(timing.api)}, "
                    f"spawned {format_seconds(timing.spawned)}, deleted {format_seconds(deletion.gone)}")
        finally:
            context.record_diagnostics("cluster", gdpm)

    spawn = baseline(context, count)
    table = Table(["from the request until", "median", "min", "max", "median / `/bin/sh -c` x " + str(count)])
    table.rows.append([f"the API reports {count} running", *_spread(start), _times(ratio(start.median, spawn.median))])
    table.rows.append(["/proc shows the first instance process", *_spread(first), "-"])
    table.rows.append([f"/proc shows {count} instance processes", *_spread(spawned),
                       _times(ratio(spawned.median, spawn.median))])
    table.rows.append([f"(delete) no process of the service alive", *_spread(gone), "-"])
    table.rows.append([f"(machine) `/bin/sh -c` x {count} from one Python process", *_spread(spawn), "1.00×"])

    spawn_ratio = ratio(start.median, spawn.median)
    target = Target(f"{count} instances on {slaves} slaves within 2.5× of `/bin/sh -c` x {count}",
                    f"{format_seconds(start.median)} / {format_seconds(spawn.median)} = {_times(spawn_ratio)}",
                    None if spawn_ratio is None else spawn_ratio <= 2.5)
    method = (
        f"A master and {slaves} slaves run on the shared etcd, and the measurement runs {_repetitions(context)}. "
        f"One service of {count} replicas of `sleep 3600` ({count // slaves} per slave) is timed from "
        "`POST /api/v1/services` until `GET /api/v1/services` shows them all running. That poll reads the "
        "service's `running` count every 20 ms, and each poll also counts the slaves' children in /proc. Then "
        "the service is deleted and timed until its processes are gone. The slaves share the machine's cores "
        "with the master and etcd, so this measures the cost of the work, not the speed-up of more machines."
    )
    return Section("cluster", f"4. A master and {slaves} slaves: {count} instances in one service", method,
                   tables=[table], targets=[target], notes=context.diagnostic_notes("cluster"),
                   raw={"start": start.to_json(), "spawned": spawned.to_json(), "first": first.to_json(),
                        "gone": gone.to_json(), "baseline": spawn.to_json()})


# -- 5. api --------------------------------------------------------------------------------


def scenario_api(context: Context) -> Section:
    sizes = context.sizes
    wrk = context.load_tool()
    tool_note = ("`wrk -t1 -c32 -d{:g}s URL`".format(sizes.api_seconds) if wrk else
                 f"a Python asyncio client with 32 keep-alive connections for {sizes.api_seconds:g} s "
                 "(wrk is not installed; --smoke installs nothing)")

    def load(url: str) -> LoadResult:
        return wrk_load(wrk, url, sizes.api_seconds) if wrk else python_load(url, sizes.api_seconds)

    results: dict[str, Series] = {}
    latencies: dict[str, Series] = {}
    errors: dict[str, int] = {}
    sizes_bytes: dict[str, int] = {}
    hello_process = None
    timeout = context.timeout(sizes.api_services)
    with GdpmCluster(context.etcd, context.work_dir("gdpm-api"), 1, sizes.api_services) as gdpm:
        try:
            service_id, started = gdpm.create(sizes.api_service_replicas)
            gdpm.wait_running(service_id, sizes.api_service_replicas, started, timeout, detail=True,
                              watch_proc=False)
            log(f"api: creating {sizes.api_services - 1} more services of 1 replica")
            created_at = time.monotonic()
            for _ in range(sizes.api_services - 1):
                gdpm.create(1)
            expected = sizes.api_services - 1 + sizes.api_service_replicas

            def all_running() -> bool:
                status, body = gdpm.api("GET", "/api/v1/services")
                return status == 200 and sum(item["running"] for item in body["services"]) == expected

            done, _ = poll(all_running, timeout=max(120.0, timeout), interval=0.2)
            if not done:
                raise BenchError(f"the {sizes.api_services} services did not all run within the timeout")
            log(f"api: {sizes.api_services} services, {expected} instances running after "
                f"{time.monotonic() - created_at:.1f} s")

            port = free_port()
            hello_process = start_background([sys.executable, "-m", "bench.helloworld", str(port)],
                                             context.work_dir("helloworld") / "helloworld.log", cwd=REPO_ROOT)
            hello_url = f"http://127.0.0.1:{port}/"
            ready, _ = poll(lambda: http_request("GET", hello_url, timeout=2)[0] == 200, timeout=30, interval=0.1)
            if not ready:
                raise BenchError("the hello-world server did not respond within 30 s")
            urls = {
                "hello world (aiohttp, 1 KB JSON)": hello_url,
                "GET /api/v1/nodes": f"{gdpm.url}/api/v1/nodes",
                f"GET /api/v1/services/ID ({sizes.api_service_replicas} instances)":
                    f"{gdpm.url}/api/v1/services/{service_id}",
                f"GET /api/v1/services ({sizes.api_services} services)": f"{gdpm.url}/api/v1/services",
            }
            for label, url in urls.items():
                results[label], latencies[label], errors[label] = Series(), Series(), 0
                status, body = http_request("GET", url, timeout=30)
                sizes_bytes[label] = len(json.dumps(body).encode()) if not isinstance(body, str) else len(body)
            for repetition in range(context.repeat):
                for label, url in urls.items():
                    try:
                        result = load(url)
                    except BenchError as error:
                        log(f"api {label}: {error}")
                        results[label].add(None)
                        continue
                    results[label].add(result.requests_per_second)
                    latencies[label].add(result.latency_ms)
                    errors[label] += result.errors
                    log(f"api {repetition + 1}/{context.repeat} {label}: {result.requests_per_second:.0f} req/s")
        finally:
            if hello_process is not None:
                stop_process(hello_process)
    hello_label = next(iter(results))
    hello = results[hello_label].median
    table = Table(["URL", "response size", "median req/s", "min", "max", "mean latency", "errors",
                   "median / hello world"])
    targets = []
    for label, series in results.items():
        share = ratio(series.median, hello)
        table.rows.append([label, f"{sizes_bytes[label] / 1024:.1f} KB", _rate(series.median), _rate(series.low),
                           _rate(series.high), _ms(latencies[label].median), str(errors[label]),
                           _percent(share)])
        # The targets are for /nodes and /services/ID. The list of every service has none,
        # because its response grows with the number of services.
        if label != hello_label and not label.startswith("GET /api/v1/services ("):
            targets.append(Target(f"{label} at least 50% of hello world's requests/s",
                                  f"{_rate(series.median)} / {_rate(hello)} = {_percent(share)}",
                                  None if share is None else share >= 0.5))
    method = (
        f"A master and one slave. Services: one of {sizes.api_service_replicas} replicas, then "
        f"{sizes.api_services - 1} more of 1 replica each (so {sizes.api_services} services and "
        f"{sizes.api_services - 1 + sizes.api_service_replicas} running `sleep 3600` instances), created "
        f"first and all running before the load. Each URL is loaded with {tool_note}, on 127.0.0.1, "
        f"{_repetitions(context)}, the URLs taking turns. The reference is `bench/helloworld.py`: an aiohttp "
        "app in a process of its own on 127.0.0.1 whose one handler returns a fixed JSON document of about "
        "1 KB, with the access log off as in the master. Response sizes are of the JSON as re-encoded by "
        "the bench. The list of every service is reported with no target, since its response grows with the "
        "number of services."
    )
    return Section("api", "5. API requests/s against a hello-world aiohttp handler", method, tables=[table],
                   targets=targets, raw={label: series.to_json() for label, series in results.items()})


# -- 6. scale ------------------------------------------------------------------------------


def scenario_scale(context: Context) -> Section:
    sizes = context.sizes
    count, slaves = sizes.scale_instances, sizes.scale_slaves
    timeout = context.timeout(count)
    with GdpmCluster(context.etcd, context.work_dir("gdpm-scale"), slaves, count) as gdpm:
        try:
            section = _scale(context, gdpm, count, slaves, timeout)
        finally:
            context.record_diagnostics("scale", gdpm)
    section.notes += context.diagnostic_notes("scale")
    return section


def _scale(context: Context, gdpm: GdpmCluster, count: int, slaves: int, timeout: float) -> Section:
    sizes = context.sizes
    time.sleep(sizes.idle_settle)
    idle_fds = gdpm.slave_fds()
    before = etcd_metrics(context.etcd)
    service_id, started = gdpm.create(count)
    timing = gdpm.wait_running(service_id, count, started, timeout, detail=False)
    log(f"scale: {count} on {slaves} slaves running after {format_seconds(timing.api)}")
    # Status writes trail the API by a batch; let them land before reading the counters.
    time.sleep(sizes.idle_settle)
    after = etcd_metrics(context.etcd)
    placed = metrics_delta(before, after)
    busy_seconds = time.monotonic() - started

    time.sleep(sizes.idle_settle)
    watched = {"master": [gdpm.master_pid], "one slave": [gdpm.slave_pids[0]], "all slaves": gdpm.slave_pids,
               "etcd": [context.etcd.pid]}
    cpu_before = {name: _cpu(pids) for name, pids in watched.items()}
    idle_before = etcd_metrics(context.etcd)
    idle_started = time.monotonic()
    time.sleep(sizes.idle_window)
    idle_elapsed = time.monotonic() - idle_started
    cpu_after = {name: _cpu(pids) for name, pids in watched.items()}
    idle = metrics_delta(idle_before, etcd_metrics(context.etcd))
    rss = {"master": _rss([gdpm.master_pid]), "one slave": _rss([gdpm.slave_pids[0]]),
           "largest slave": max(_rss([pid]) or 0 for pid in gdpm.slave_pids),
           "all slaves": _rss(gdpm.slave_pids), "etcd": _rss([context.etcd.pid])}
    slave_fds = [now - idle for now, idle in zip(gdpm.slave_fds(), idle_fds)]
    deletion = gdpm.delete(service_id, timeout)
    log(f"scale: deleted after {format_seconds(deletion.gone)}")

    cpu = {name: None if cpu_before[name] is None or cpu_after[name] is None
           else 100 * (cpu_after[name] - cpu_before[name]) / idle_elapsed for name in watched}
    usage = Table(["process", "VmRSS", f"CPU at rest over {idle_elapsed:.0f} s (% of one core)"])
    for name in ("master", "one slave", "all slaves", "etcd"):
        usage.rows.append([f"{name} ({slaves})" if name == "all slaves" else name, _mib(rss[name]),
                           _pct(cpu[name])])
    usage.rows.append(["largest slave", _mib(rss["largest slave"]), "-"])

    requests = Table(["etcd counter", f"while placing and starting {count}", "per placed instance",
                      f"at rest, per second ({slaves} slaves)"])
    for key in sorted(set(placed) | set(idle), key=lambda key: (key != "proposals_committed", key)):
        if key == "proposals_committed":
            label = "proposals committed (raft writes)"
        else:
            kind, _, method_name = key.partition(":")
            label = f"gRPC {method_name} ({'unary calls' if kind == 'unary' else 'stream messages'})"
        requests.rows.append([label, f"{placed.get(key, 0):.0f}", f"{placed.get(key, 0) / count:.2f}",
                              f"{idle.get(key, 0) / idle_elapsed:.1f}"])
    unary = sum(value for key, value in placed.items() if key.startswith("unary:"))
    requests.rows.append(["all unary gRPC calls", f"{unary:.0f}", f"{unary / count:.2f}", "-"])

    timing_table = Table(["from the request until", "seconds"])
    timing_table.rows.append([f"the API reports {count} running", format_seconds(timing.api)])
    timing_table.rows.append(["/proc shows the first instance process", format_seconds(timing.first)])
    timing_table.rows.append([f"/proc shows {count} instance processes", format_seconds(timing.spawned)])
    timing_table.rows.append([f"(delete) no process of the service alive", format_seconds(deletion.gone)])
    notes = []
    if timing.failure is not None:
        notes.append(f"The start did not finish: {timing.failure}; the figures after it describe a partial "
                     "placement.")
    if slave_fds:
        notes.append(f"At rest, each slave held {min(slave_fds)} to {max(slave_fds)} more open file descriptors "
                     f"than before the request, for about {count // slaves} instances each.")

    master_cpu = cpu["master"]
    target = Target("idle master below 2% of one core", f"{_pct(master_cpu)} with {count} instances on {slaves} slaves",
                    None if master_cpu is None else master_cpu < 2.0)
    method = (
        f"A master and {slaves} slaves (each a Python process) on the shared etcd; one service of {count} "
        f"replicas of `sleep 3600`, spread over the slaves, timed until `GET /api/v1/services` shows them all "
        f"running (polled every 20 ms). etcd's Prometheus counters (`/metrics`) are read before the request "
        f"and {sizes.idle_settle:g} s after the API showed them running ({busy_seconds:.0f} s in all): "
        "`etcd_server_proposals_committed_total` and `grpc_server_handled_total` of unary calls by method, "
        "and `grpc_server_msg_received_total` of streams (lease keep-alives, watches). Then, after "
        f"{sizes.idle_settle:g} s more, CPU time (utime + stime from /proc/PID/stat) over a "
        f"{sizes.idle_window:g} s window with nothing asked of gdpm, and VmRSS from /proc/PID/status. "
        "One run (no repetition)."
    )
    return Section("scale", f"6. {slaves} slaves and {count} instances: memory, idle CPU, etcd requests", method,
                   tables=[timing_table, usage, requests], targets=[target], notes=notes,
                   raw={"start": timing.api, "spawned": timing.spawned, "gone": deletion.gone, "rss_kib": rss,
                        "cpu_percent": cpu, "etcd_placing": placed, "etcd_idle": idle,
                        "idle_seconds": idle_elapsed})


def _cpu(pids: list[int]) -> float | None:
    values = [procfs.cpu_seconds(pid) for pid in pids]
    return None if any(value is None for value in values) else sum(values)


def _rss(pids: list[int]) -> int | None:
    values = [procfs.rss_kib(pid) for pid in pids]
    return None if any(value is None for value in values) else sum(values)


# -- 7. growth -----------------------------------------------------------------------------


@dataclass
class GrowthFigures:
    """The growth scenario's values by N, and why an N failed."""

    counts: tuple[int, ...]
    start: dict[int, Series]
    spawned: dict[int, Series]
    gone: dict[int, Series]
    fds: dict[int, Series]
    failures: dict[int, str] = field(default_factory=dict)
    fd_limit: int | None = None


def _measure_growth(context: Context, counts: tuple[int, ...]) -> GrowthFigures:
    """Start and delete N instances on one slave for each N, ``repeat`` times.

    An N that fails (timeout or stall) is not tried again, and the measurements after
    it run on a new master and slave, because the slave may have fenced itself.
    """
    figures = GrowthFigures(counts, *({count: Series() for count in counts} for _ in range(4)))
    gdpm = None
    idle_fds = 0
    try:
        for repetition in range(context.repeat):
            for count in counts:
                if count in figures.failures:
                    for series in (figures.start, figures.spawned, figures.gone, figures.fds):
                        series[count].add(None)
                    continue
                if gdpm is None:
                    gdpm = GdpmCluster(context.etcd, context.work_dir("gdpm-growth"), 1, max(counts)).start()
                    figures.fd_limit = gdpm.slave_fd_limit()
                    idle_fds = gdpm.slave_fds()[0]

                service_id, started = gdpm.create(count)
                timing = gdpm.wait_running(service_id, count, started, context.timeout(count), detail=False)
                figures.start[count].add(timing.api)
                added_fds = gdpm.slave_fds()[0] - idle_fds
                # After a failed start the delete is not measured, so it gets less time.
                delete_timeout = context.timeout(count) if timing.failure is None else 30.0
                deletion = gdpm.delete(service_id, delete_timeout)
                log(f"growth {repetition + 1}/{context.repeat} N={count}: running "
                    f"{format_seconds(timing.api)}, deleted {format_seconds(deletion.gone)}")
                if deletion.remaining == 0:
                    try:
                        gdpm.wait_settled(context.timeout(count))
                    except BenchError as error:
                        log(f"growth {repetition + 1}/{context.repeat} N={count}: {error}")
                if timing.failure is None:
                    figures.spawned[count].add(timing.spawned)
                    figures.fds[count].add(added_fds)
                    figures.gone[count].add(deletion.gone)
                    continue

                # The /proc count and the delete of a failed start describe a part of the
                # instances only.
                figures.failures[count] = (f"repetition {repetition + 1}: {timing.failure}, with {added_fds} more "
                                           "descriptors open in the slave than before the request")
                if deletion.remaining:
                    figures.failures[count] += (f"; {deletion.remaining} of its {deletion.processes} processes "
                                                f"were still alive {delete_timeout:g} s after the delete request")
                for series in (figures.spawned, figures.fds, figures.gone):
                    series[count].add(None)
                context.record_diagnostics("growth", gdpm)
                gdpm.close()
                gdpm = None
    finally:
        if gdpm is not None:
            context.record_diagnostics("growth", gdpm)
            gdpm.close()
    return figures


def scenario_growth(context: Context) -> Section:
    counts = context.sizes.growth
    figures = _measure_growth(context, counts)
    start, spawned, gone, fds, failures = (figures.start, figures.spawned, figures.gone, figures.fds,
                                           figures.failures)

    spawn = {count: baseline(context, count) for count in counts}
    piped = {count: spawn_series(context, count, "posix_spawn-pipes") for count in counts}
    table = Table(["N", "until the API reports N running (median, min-max)", "runs without a figure", "per instance",
                   "/proc shows N processes, per instance", "`/bin/sh -c` x N, per process",
                   "posix_spawn x N keeping 2 pipes each, per process", "delete, per instance",
                   "slave's added open fds at the end of the start"])
    for count in counts:
        table.rows.append([str(count),
                           f"{format_seconds(start[count].median)} ({format_seconds(start[count].low)} - "
                           f"{format_seconds(start[count].high)})",
                           f"{start[count].missed} of {len(start[count].values)}",
                           _per_item(start[count].median, count), _per_item(spawned[count].median, count),
                           _per_item(spawn[count].median, count), _per_item(piped[count].median, count),
                           _per_item(gone[count].median, count),
                           "-" if fds[count].median is None else f"{fds[count].median:.0f}"])
    notes = [f"N={count} failed in {reason}. Later repetitions skipped it, and the measurements after the "
             "failure ran on a new master and slave." for count, reason in failures.items()]
    if figures.fd_limit is not None:
        notes.append(f"The slave's limit of open files (its soft RLIMIT_NOFILE, from /proc/PID/limits) was "
                     f"{figures.fd_limit}.")
    notes += context.diagnostic_notes("growth")

    ordered = sorted(counts)
    middle, top = ordered[-2], ordered[-1]
    per_middle = ratio(start[middle].median, middle)
    per_top = ratio(start[top].median, top)
    growth = ratio(per_top, per_middle)
    machine_growth = ratio(ratio(spawn[top].median, top), ratio(spawn[middle].median, middle))
    target = Target(f"linear growth: time per instance at N={top} at most 1.25× that at N={middle}",
                    f"{_per_item(start[top].median, top)} / {_per_item(start[middle].median, middle)} = "
                    f"{_times(growth)} (the machine's `/bin/sh -c`: {_times(machine_growth)})",
                    None if growth is None else growth <= 1.25)
    if top in failures:
        target.measured = f"N={top} did not start: {failures[top]}"
        target.met = False
    method = (
        f"A master and one slave run on the shared etcd, and the measurement runs {_repetitions(context)}. For "
        f"N = {', '.join(map(str, counts))} in turn, one service of N replicas of `sleep 3600` is timed from "
        "`POST /api/v1/services` until `GET /api/v1/services` shows N running, polled every 20 ms. That "
        "response carries only the service's `running` count, so it stays small whatever N. Then the service "
        "is deleted and timed until its processes are gone. The `/bin/sh -c` column is the spawn scenario's "
        "method at the same N. The `posix_spawn` column spawns as a slave does, with stdout and stderr on "
        "pipes whose read ends stay open. Every spawn copies the spawner's descriptor table, and the child's "
        "exec closes the close-on-exec ones, so each costs more than the one before. Linear means a flat time per instance. The target compares the two largest N, "
        "where the fixed costs (one request, one scheduling round) weigh least."
    )
    return Section("growth", "7. Growth: time to place and start N instances on one node", method,
                   tables=[table], targets=[target], notes=notes,
                   raw={str(count): {"start": start[count].to_json(), "spawned": spawned[count].to_json(),
                                     "gone": gone[count].to_json(), "baseline": spawn[count].to_json(),
                                     "posix_spawn_pipes": piped[count].to_json(),
                                     "slave_fds": fds[count].to_json(), "failure": failures.get(count)}
                        for count in counts})


SCENARIO_FUNCTIONS = {
    "spawn": scenario_spawn,
    "start-one-node": scenario_start_one_node,
    "delete-one-node": scenario_delete_one_node,
    "cluster": scenario_cluster,
    "api": scenario_api,
    "scale": scenario_scale,
    "growth": scenario_growth,
}


# -- formatting ------------------------------------------------------------------------------


def _repetitions(context: Context) -> str:
    return "once" if context.repeat == 1 else f"{context.repeat} times"


def _spread(series: Series) -> list[str]:
    return [format_seconds(series.median), format_seconds(series.low), format_seconds(series.high)]


def _per_item(seconds: float | None, count: int) -> str:
    if seconds is None:
        return "-"
    return f"{seconds / count * 1000:.2f} ms"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.0f}%"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}%"


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f} MiB"


def _noop_text(manager: str) -> str:
    return {"supervisord": "`supervisorctl pid`", "circus": "`circusctl status x`", "pm2": "`pm2 ping`"}[manager]
