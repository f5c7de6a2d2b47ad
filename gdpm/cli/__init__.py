"""The ``gdpm`` command: one entry point for every role."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import typer

from gdpm.cli.client import client_app
from gdpm.common.keys import DEFAULT_NODE_TTL

app = typer.Typer(
    help="gdpm: a distributed process manager. Runs N instances of a shell command across slave nodes.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(client_app, name="client")


def _print_version(value: bool) -> None:
    if value:
        from gdpm import __version__

        typer.echo(f"gdpm {__version__}")
        raise typer.Exit()


@app.callback()
def _main_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """gdpm: a distributed process manager. Runs N instances of a shell command across slave nodes."""

EtcdEndpointsOption = typer.Option(
    "127.0.0.1:2379", "--etcd-endpoints", envvar="GDPM_ETCD_ENDPOINTS",
    help="etcd client endpoints, comma-separated host:port.",
)
PrefixOption = typer.Option("/gdpm", "--prefix", envvar="GDPM_PREFIX", help="Prefix of every gdpm key in etcd.")
LogLevelOption = typer.Option("info", "--log-level", envvar="GDPM_LOG_LEVEL", help="debug, info, warning or error.")
LogJsonOption = typer.Option(False, "--log-json", envvar="GDPM_LOG_JSON", help="Write log lines as JSON.")


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "gdpm" / "slave"


@app.command()
def master(
    host: str = typer.Option("127.0.0.1", "--host", envvar="GDPM_HOST", help="Address the HTTP API listens on."),
    port: int = typer.Option(8989, "--port", envvar="GDPM_PORT", min=1, max=65535,
                             help="Port the HTTP API listens on."),
    etcd_endpoints: str = EtcdEndpointsOption,
    prefix: str = PrefixOption,
    max_replicas: int = typer.Option(
        1000, "--max-replicas", envvar="GDPM_MAX_REPLICAS", min=1,
        help="Largest replica count one service may request.",
    ),
    node_ttl: int = typer.Option(
        DEFAULT_NODE_TTL, "--node-ttl", envvar="GDPM_NODE_TTL", min=2,
        help="Seconds a slave's lease lives without a refresh, sent to every slave that registers; "
             "a dead node's instances move after it.",
    ),
    log_level: str = LogLevelOption,
    log_json: bool = LogJsonOption,
) -> None:
    """Run the master: the HTTP API and the scheduler."""
    from gdpm.common.logs import configure_logging
    from gdpm.master.server import MasterConfig, run_master

    configure_logging("master", level=log_level, json_output=log_json)
    config = MasterConfig(
        host=host, port=port, etcd_endpoints=_endpoints_or_exit(etcd_endpoints),
        prefix=prefix, max_replicas=max_replicas, node_ttl=node_ttl,
    )
    asyncio.run(run_master(config))


@app.command()
def slave(
    master_url: str = typer.Option(
        "http://127.0.0.1:8989", "--master", envvar="GDPM_MASTER", help="URL of the master's HTTP API.",
    ),
    etcd_endpoints: str = EtcdEndpointsOption,
    prefix: str = PrefixOption,
    state_dir: Path = typer.Option(
        None, "--state-dir", envvar="GDPM_STATE_DIR",
        help="Folder for the node id, instance logs and bookkeeping [default: ~/.local/state/gdpm/slave].",
    ),
    name: str = typer.Option(None, "--name", envvar="GDPM_NAME", help="Node name shown in tables [default: host name]."),
    node_ttl: int = typer.Option(
        None, "--node-ttl", envvar="GDPM_NODE_TTL", min=2,
        help="Seconds the node's lease lives without a refresh [default: the master's --node-ttl].",
    ),
    log_host: str = typer.Option(
        "127.0.0.1", "--log-host", envvar="GDPM_LOG_HOST",
        help="Address the instance log server listens on; the master fetches logs from it.",
    ),
    log_port: int = typer.Option(
        0, "--log-port", envvar="GDPM_LOG_PORT", min=0, max=65535,
        help="Port of the instance log server; 0 picks a free one.",
    ),
    log_advertise_host: str = typer.Option(
        None, "--log-advertise-host", envvar="GDPM_LOG_ADVERTISE_HOST",
        help="Host name or address the master uses to reach the log server [default: --log-host].",
    ),
    log_max_bytes: int = typer.Option(
        10 * 1024 * 1024, "--log-max-bytes", envvar="GDPM_LOG_MAX_BYTES", min=4096,
        help="Size in bytes at which an instance's stdout or stderr file is rotated.",
    ),
    log_backups: int = typer.Option(
        5, "--log-backups", envvar="GDPM_LOG_BACKUPS", min=0, max=1000,
        help="Rotated files kept per instance and stream.",
    ),
    log_level: str = LogLevelOption,
    log_json: bool = LogJsonOption,
) -> None:
    """Run a slave: register with the master and run the instances assigned to this node."""
    import socket

    from gdpm.common.logs import configure_logging
    from gdpm.slave.agent import SlaveConfig, run_slave

    configure_logging("slave", level=log_level, json_output=log_json)
    config = SlaveConfig(
        master_url=_master_url_or_exit(master_url),
        etcd_endpoints=_endpoints_or_exit(etcd_endpoints),
        prefix=prefix,
        state_dir=_state_dir_or_exit(state_dir or _default_state_dir()),
        name=name or socket.gethostname(),
        node_ttl=node_ttl,
        log_host=log_host,
        log_port=log_port,
        log_advertise_host=log_advertise_host,
        log_max_bytes=log_max_bytes,
        log_backups=log_backups,
    )
    asyncio.run(run_slave(config))


@app.command()
def dev(
    slaves: int = typer.Option(2, "--slaves", min=1, max=32, help="Number of slaves to start."),
    port: int = typer.Option(8989, "--port", min=1, max=65535, help="Port of the master's HTTP API."),
    etcd_endpoints: str = EtcdEndpointsOption,
    state_dir: Path = typer.Option(
        None, "--state-dir", help="Folder for the slaves' state and the etcd data (default: a new temporary folder).",
    ),
) -> None:
    """Run a whole local cluster in the foreground: etcd (when none answers), a master and slaves.

    Ctrl-C stops everything, instances included.
    """
    from gdpm.dev import run_dev_cluster

    raise typer.Exit(run_dev_cluster(
        slaves=slaves, port=port, etcd_endpoints=_endpoints_or_exit(etcd_endpoints), state_dir=state_dir,
    ))


def _master_url_or_exit(url: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        typer.echo(f"error: invalid --master URL {url!r}: expected http://HOST:PORT, such as http://127.0.0.1:8989",
                   err=True)
        raise typer.Exit(1)
    return url.rstrip("/")


def _state_dir_or_exit(path: Path) -> Path:
    path = path.absolute()
    try:
        (path / "logs").mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        typer.echo(f"error: cannot use {str(path)!r} as --state-dir: {error.strerror}; "
                   "choose a folder this user can write", err=True)
        raise typer.Exit(1) from None
    return path


def _endpoints_or_exit(text: str) -> list[tuple[str, int]]:
    from gdpm.common.etcd import EndpointError, parse_endpoints

    try:
        return parse_endpoints(text)
    except EndpointError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


def main() -> None:
    app()
