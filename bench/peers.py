"""The peers gdpm is compared with: supervisord, circus and PM2.

Each is installed into the scratch folder (``pip install supervisor circus`` into a
venv there, ``npm install pm2`` into a folder there), runs with its own home dir inside
the scratch folder, listens on unix sockets only, and is stopped by its pid.

Every peer is driven through its own command-line client, as a person would:

- start: the start command (``supervisorctl start all``, ``circusctl start --waiting x``,
  ``pm2 start ecosystem.json``) returns once the peer has started them all. Then the
  status command (``supervisorctl status``, ``circusctl list x``, ``pm2 jlist``) is
  polled until it shows N running.
- stop: the stop command (``supervisorctl stop all``, ``circusctl stop --waiting x``,
  ``pm2 delete all``) is timed until no process of the N is alive in /proc.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import procfs
from bench.common import POLL_INTERVAL, BenchError, log, run, start_background, stop_pid, stop_process

# The peers run the same program as gdpm's instances.
SLEEP = "/bin/sleep"
SLEEP_SECONDS = "3600"
# Seconds a daemon may take to respond after it was started.
DAEMON_START_TIMEOUT = 60.0


@dataclass
class StartResult:
    """Seconds from the start command: until it returned, and until the status showed N running."""

    command: float | None
    status: float | None
    pids: list[int]


@dataclass
class StopResult:
    """Seconds from the stop command: until its N processes were gone, and until it returned."""

    gone: float | None
    command: float | None


@dataclass
class PeerInstall:
    """The paths of a peer's programs, or the reason it is missing."""

    name: str
    programs: dict[str, str]
    version: str | None = None
    source: str = ""
    error: str | None = None

    @property
    def available(self) -> bool:
        return self.error is None


# -- installation ----------------------------------------------------------------------


def install_peers(peers_dir: Path, allow_install: bool) -> dict[str, PeerInstall]:
    """Find or install supervisord, circus and PM2 under ``peers_dir``.

    Found first in ``peers_dir`` (a --scratch folder from an earlier run), then on PATH;
    installed only when ``allow_install``. A peer that cannot be had carries the error.
    """
    peers_dir.mkdir(parents=True, exist_ok=True)
    installs = {}
    python_peers = _install_python_peers(peers_dir, allow_install)
    installs.update(python_peers)
    installs["pm2"] = _install_pm2(peers_dir, allow_install)
    return installs


def _install_python_peers(peers_dir: Path, allow_install: bool) -> dict[str, PeerInstall]:
    venv = peers_dir / "venv"
    wanted = {
        "supervisord": ["supervisord", "supervisorctl"],
        "circus": ["circusd", "circusctl"],
    }

    def located(directory: Path | None) -> dict[str, dict[str, str]]:
        found = {}
        for peer, programs in wanted.items():
            paths = {}
            for program in programs:
                path = directory / program if directory else None
                if path is not None and os.access(path, os.X_OK):
                    paths[program] = str(path)
                elif directory is None and shutil.which(program):
                    paths[program] = shutil.which(program)
            if len(paths) == len(programs):
                found[peer] = paths
        return found

    in_scratch = located(venv / "bin")
    error = None
    if len(in_scratch) < len(wanted) and allow_install:
        log(f"installing supervisor and circus into {venv}")
        try:
            if not (venv / "bin" / "python").exists():
                run([sys.executable, "-m", "venv", str(venv)], timeout=300)
            environment = dict(os.environ, PIP_CACHE_DIR=str(peers_dir / "pip-cache"),
                               PIP_DISABLE_PIP_VERSION_CHECK="1")
            run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "supervisor", "circus"],
                timeout=600, env=environment)
        except BenchError as failure:
            error = f"pip install supervisor circus failed: {failure}"
            log(error)
        in_scratch = located(venv / "bin")
    on_path = located(None)
    installs = {}
    for peer in wanted:
        if peer in in_scratch:
            installs[peer] = PeerInstall(peer, in_scratch[peer], source=f"pip, in {venv}")
        elif peer in on_path:
            installs[peer] = PeerInstall(peer, on_path[peer], source="on PATH")
        else:
            reason = error or ("not installed (--smoke installs nothing)" if not allow_install
                               else "not found after pip install")
            installs[peer] = PeerInstall(peer, {}, error=reason)
    for install in installs.values():
        if install.available:
            daemon = install.programs["supervisord" if install.name == "supervisord" else "circusd"]
            try:
                install.version = run([daemon, "--version"], timeout=60).stdout.strip().splitlines()[-1]
            except (BenchError, IndexError) as failure:
                install.version = f"unknown ({failure})"
    return installs


def _install_pm2(peers_dir: Path, allow_install: bool) -> PeerInstall:
    folder = peers_dir / "pm2"
    local = folder / "node_modules" / ".bin" / "pm2"
    error = None
    if not local.exists() and allow_install:
        npm = shutil.which("npm")
        if npm is None:
            error = "npm is not on PATH"
        else:
            log(f"installing pm2 into {folder}")
            folder.mkdir(parents=True, exist_ok=True)
            environment = dict(os.environ, npm_config_cache=str(peers_dir / "npm-cache"),
                               npm_config_update_notifier="false", npm_config_fund="false",
                               npm_config_audit="false")
            try:
                run([npm, "install", "--prefix", str(folder), "--no-save", "pm2"], timeout=600, env=environment)
            except BenchError as failure:
                error = f"npm install pm2 failed: {failure}"
                log(error)
    if local.exists():
        install = PeerInstall("pm2", {"pm2": str(local)}, source=f"npm, in {folder}")
        try:
            package = json.loads((folder / "node_modules" / "pm2" / "package.json").read_text())
            install.version = package.get("version")
        except (OSError, ValueError):
            install.version = "unknown"
    elif shutil.which("pm2") and error is None:
        install = PeerInstall("pm2", {"pm2": shutil.which("pm2")}, source="on PATH", version="on PATH")
    else:
        reason = error or ("not installed (--smoke installs nothing)" if not allow_install
                           else "not found after npm install")
        return PeerInstall("pm2", {}, error=reason)
    node = shutil.which("node")
    if node:
        try:
            node_version = run([node, "--version"], timeout=30).stdout.strip()
            install.version = f"{install.version} (node {node_version})"
        except BenchError:
            pass
    return install


# -- the peers -------------------------------------------------------------------------


class Peer:
    """One peer daemon with its home dir; subclasses drive its client."""

    name = ""

    def __init__(self, install: PeerInstall, home: Path, count: int) -> None:
        self.install = install
        self.home = home
        self.count = count
        self.process: subprocess.Popen | None = None
        self.daemon_pid: int | None = None
        self.environment = dict(os.environ, HOME=str(home))

    # Subclasses implement these.
    def start_daemon(self) -> None:
        raise NotImplementedError

    def start_all(self, timeout: float) -> StartResult:
        raise NotImplementedError

    def stop_command(self) -> list[str]:
        raise NotImplementedError

    def noop_command(self) -> list[str]:
        """Return a client command that costs the daemon little, to time the client's start-up."""
        raise NotImplementedError

    def client_seconds(self) -> float | None:
        """Seconds one call of ``noop_command`` takes: the client's share of each command's time."""
        started = time.monotonic()
        try:
            run(self.noop_command(), timeout=60, env=self.environment, cwd=self.home)
        except BenchError as error:
            log(f"{self.name}: {error}")
            return None
        return time.monotonic() - started

    def stop_daemon(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Peer:
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(parents=True)
        try:
            self.start_daemon()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the daemon by its pid, and SIGKILL by pid whatever it left running."""
        left = procfs.descendants(self.daemon_pid) if self.daemon_pid else []
        try:
            self.stop_daemon()
        except BenchError as error:
            log(f"{self.name}: stopping the daemon failed: {error}")
        if self.daemon_pid is not None and procfs.is_alive(self.daemon_pid):
            stop_pid(self.daemon_pid)
        if self.process is not None:
            stop_process(self.process)
        for pid in procfs.alive_among(left):
            procfs.kill_quietly(pid)

    def stop_all(self, pids: list[int], timeout: float) -> StopResult:
        """Run the stop command and poll /proc until none of ``pids`` is alive."""
        started = time.monotonic()
        command = subprocess.Popen(self.stop_command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=self.environment)
        gone = None
        command_done = None
        try:
            remaining = set(pids)
            while True:
                remaining = procfs.alive_among(remaining)
                now = time.monotonic()
                if command_done is None and command.poll() is not None:
                    command_done = now - started
                if not remaining:
                    gone = now - started
                    break
                if now - started > timeout:
                    log(f"{self.name}: {len(remaining)} processes still alive {timeout:g} s after the stop command")
                    break
                time.sleep(POLL_INTERVAL)
            if command_done is None:
                try:
                    command.wait(max(1.0, timeout - (time.monotonic() - started)))
                    command_done = time.monotonic() - started
                except subprocess.TimeoutExpired:
                    log(f"{self.name}: the stop command did not return within {timeout:g} s")
        finally:
            if command.poll() is None:
                command.kill()
                command.wait()
        return StopResult(gone, command_done)

    def _poll_status(self, started: float, timeout: float, count_running) -> tuple[float | None, list[int]]:
        """Poll the status command until it shows ``self.count`` running; return (seconds, pids)."""
        pids: list[int] = []
        while True:
            running, pids = count_running()
            now = time.monotonic()
            if running >= self.count:
                return now - started, pids
            if now - started > timeout:
                log(f"{self.name}: status shows {running} of {self.count} running after {timeout:g} s")
                return None, pids
            time.sleep(POLL_INTERVAL)

    def _wait_daemon(self, ready) -> None:
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise BenchError(f"{self.name} exited with code {self.process.returncode} during start-up; "
                                 f"see {self.home}")
            try:
                if ready():
                    return
            except BenchError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not respond within {DAEMON_START_TIMEOUT:g} s; see the logs in {self.home}")
            time.sleep(0.1)

    def children_pids(self) -> list[int]:
        if self.daemon_pid is None:
            return []
        return [pid for pid in procfs.children(self.daemon_pid) if procfs.command_name(pid) == "sleep"]


class Supervisord(Peer):
    name = "supervisord"

    @property
    def config(self) -> Path:
        return self.home / "supervisord.conf"

    def ctl(self, *arguments: str) -> list[str]:
        return [self.install.programs["supervisorctl"], "-c", str(self.config), *arguments]

    def start_daemon(self) -> None:
        # numprocs=N copies of one program; startsecs=0 makes a process RUNNING as soon as it
        # is spawned, as gdpm reports an instance running once spawned (the default, 1 s,
        # would add a second). minfds raised for the pipes of N children.
        self.config.write_text(f"""\
[unix_http_server]
file={self.home}/supervisor.sock
chmod=0700

[supervisord]
logfile={self.home}/supervisord.log
pidfile={self.home}/supervisord.pid
childlogdir={self.home}/logs
nodaemon=true
minfds={max(1024, 4 * self.count + 256)}
minprocs={max(200, 2 * self.count + 100)}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{self.home}/supervisor.sock

[program:x]
command={SLEEP} {SLEEP_SECONDS}
numprocs={self.count}
process_name=%(program_name)s_%(process_num)05d
autostart=false
autorestart=true
startsecs=0
""")
        (self.home / "logs").mkdir()
        self.process = start_background([self.install.programs["supervisord"], "-c", str(self.config)],
                                        self.home / "daemon.out", env=self.environment, cwd=self.home)
        self.daemon_pid = self.process.pid
        self._wait_daemon(lambda: run(self.ctl("pid"), timeout=30, env=self.environment).stdout.strip()
                          == str(self.daemon_pid))

    def start_all(self, timeout: float) -> StartResult:
        started = time.monotonic()
        try:
            run(self.ctl("start", "all"), timeout=timeout, env=self.environment)
        except BenchError as error:
            log(f"supervisord: {error}")
            return StartResult(None, None, self.children_pids())
        command = time.monotonic() - started

        def count_running() -> tuple[int, list[int]]:
            # Exits non-zero while some process is not RUNNING.
            output = run(self.ctl("status"), timeout=timeout, env=self.environment, check=False).stdout
            pids = [int(line.split("pid ", 1)[1].split(",", 1)[0])
                    for line in output.splitlines() if " RUNNING " in line and "pid " in line]
            return len(pids), pids

        status, pids = self._poll_status(started, timeout, count_running)
        return StartResult(command, status, pids)

    def stop_command(self) -> list[str]:
        return self.ctl("stop", "all")

    def noop_command(self) -> list[str]:
        return self.ctl("pid")

    def stop_daemon(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=30)


class Circus(Peer):
    name = "circus"

    @property
    def config(self) -> Path:
        return self.home / "circus.ini"

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.home}/endpoint.sock"

    def ctl(self, *arguments: str, timeout: float = 30) -> list[str]:
        return [self.install.programs["circusctl"], "--endpoint", self.endpoint, "--timeout", f"{timeout:g}",
                *arguments]

    def start_daemon(self) -> None:
        # ipc:// endpoints only; without a stats_endpoint, circus starts no circusd-stats.
        # copy_env passes the environment (and so the run marker) to the processes.
        self.config.write_text(f"""\
[circus]
endpoint = {self.endpoint}
pubsub_endpoint = ipc://{self.home}/pubsub.sock
check_delay = 5
logoutput = {self.home}/circusd.log

[watcher:x]
cmd = {SLEEP}
args = {SLEEP_SECONDS}
numprocesses = {self.count}
autostart = false
warmup_delay = 0
copy_env = true
""")
        self.process = start_background([self.install.programs["circusd"], str(self.config)],
                                        self.home / "daemon.out", env=self.environment, cwd=self.home)
        self.daemon_pid = self.process.pid
        self._wait_daemon(lambda: run(self.ctl("status", "x"), timeout=30, env=self.environment)
                          .stdout.strip() == "stopped")

    def start_all(self, timeout: float) -> StartResult:
        started = time.monotonic()
        try:
            run(self.ctl("start", "--waiting", "x", timeout=timeout), timeout=timeout + 10, env=self.environment)
        except BenchError as error:
            log(f"circus: {error}")
            return StartResult(None, None, self.children_pids())
        command = time.monotonic() - started

        def count_running() -> tuple[int, list[int]]:
            output = run(self.ctl("--json", "list", "x"), timeout=timeout, env=self.environment).stdout
            pids = json.loads(output).get("pids") or []
            return len(pids), [int(pid) for pid in pids]

        status, pids = self._poll_status(started, timeout, count_running)
        return StartResult(command, status, pids)

    def stop_command(self) -> list[str]:
        # --waiting: returns once circus has finished stopping the watcher. Without it,
        # circusd may still be stopping when SIGTERM comes, and then hangs until SIGKILL.
        return self.ctl("stop", "--waiting", "x", timeout=300)

    def noop_command(self) -> list[str]:
        return self.ctl("status", "x")

    def stop_daemon(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # circusctl quit, then SIGTERM and SIGKILL by pid if circusd is still there.
            run(self.ctl("quit"), timeout=30, env=self.environment, check=False)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                stop_process(self.process, timeout=10)


class Pm2(Peer):
    name = "pm2"

    def __init__(self, install: PeerInstall, home: Path, count: int) -> None:
        super().__init__(install, home, count)
        # PM2_HOME keeps pm2's daemon, sockets and logs inside the scratch folder; a bare
        # pm2 call would use ~/.pm2.
        self.environment["PM2_HOME"] = str(home / "pm2-home")

    def pm2(self, *arguments: str) -> list[str]:
        return [self.install.programs["pm2"], *arguments]

    @property
    def ecosystem(self) -> Path:
        return self.home / "ecosystem.json"

    def start_daemon(self) -> None:
        # N apps of one binary each, run directly (interpreter none), in fork mode.
        apps = [{"name": f"x-{index:05d}", "script": SLEEP, "args": SLEEP_SECONDS, "interpreter": "none",
                 "exec_mode": "fork", "autorestart": True}
                for index in range(self.count)]
        self.ecosystem.write_text(json.dumps({"apps": apps}))
        run(self.pm2("ping"), timeout=DAEMON_START_TIMEOUT, env=self.environment, cwd=self.home)
        pid_file = Path(self.environment["PM2_HOME"]) / "pm2.pid"
        try:
            self.daemon_pid = int(pid_file.read_text().strip())
        except (OSError, ValueError) as error:
            raise BenchError(f"pm2 ping left no readable {pid_file}: {error}") from error

    def start_all(self, timeout: float) -> StartResult:
        started = time.monotonic()
        try:
            run(self.pm2("start", str(self.ecosystem)), timeout=timeout, env=self.environment, cwd=self.home)
        except BenchError as error:
            log(f"pm2: {error}")
            return StartResult(None, None, self.children_pids())
        command = time.monotonic() - started

        def count_running() -> tuple[int, list[int]]:
            output = run(self.pm2("jlist"), timeout=timeout, env=self.environment, cwd=self.home).stdout
            start = output.find("[")
            processes = json.loads(output[start:]) if start >= 0 else []
            pids = [process["pid"] for process in processes
                    if process.get("pm2_env", {}).get("status") == "online" and process.get("pid")]
            return len(pids), pids

        status, pids = self._poll_status(started, timeout, count_running)
        return StartResult(command, status, pids)

    def stop_command(self) -> list[str]:
        return self.pm2("delete", "all")

    def noop_command(self) -> list[str]:
        return self.pm2("ping")

    def stop_daemon(self) -> None:
        if self.daemon_pid is not None and procfs.is_alive(self.daemon_pid):
            run(self.pm2("kill"), timeout=60, env=self.environment, cwd=self.home, check=False)


PEER_CLASSES: dict[str, type[Peer]] = {"supervisord": Supervisord, "circus": Circus, "pm2": Pm2}

