"""``gdpm client``: list, create, change and delete services, and read their logs, through the master's HTTP API.

Each command sends one request to ``/api/v1`` and prints the result as a table or, with
``-o json``, as the JSON the API returned. ``logs`` instead copies the master's stream
of log lines to stdout as it arrives. Every failure ends the command with one
``error: ...`` line on stderr: exit status 1 for a failed request, 2 for invalid input.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NoReturn
from urllib.parse import quote

import aiohttp
import typer
from rich.console import Console
from yarl import URL

from gdpm.cli import render

DEFAULT_MASTER_URL = "http://127.0.0.1:8989"
DEFAULT_TIMEOUT_SECONDS = 10.0

NODES_PATH = "/api/v1/nodes"
SERVICES_PATH = "/api/v1/services"

# Characters of an unexpected response body quoted in an error line.
BODY_EXCERPT_LENGTH = 200

START_HINT = "start one with 'gdpm master' or set --master/GDPM_MASTER"

# Exit statuses of ``logs`` when Ctrl-C or a closed pipe ends it: 128 plus the signal
# number, as a shell reports a program that SIGINT or SIGPIPE ended.
EXIT_INTERRUPTED = 128 + signal.SIGINT
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE

# Largest --tail the master accepts.
MAX_TAIL = 100_000


class OutputFormat(str, enum.Enum):
    TABLE = "table"
    JSON = "json"


class RestartPolicy(str, enum.Enum):
    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


@dataclass(frozen=True)
class ClientSettings:
    """The global options of ``gdpm client``, shared with its sub-commands through the context."""

    master_url: str
    output: OutputFormat
    timeout: float


client_app = typer.Typer(
    help="Query and change the cluster through the master's HTTP API.",
    no_args_is_help=True,
)
get_app = typer.Typer(help="Show nodes and services.", no_args_is_help=True)
client_app.add_typer(get_app, name="get")


@client_app.callback()
def client_options(
    ctx: typer.Context,
    master: str = typer.Option(
        DEFAULT_MASTER_URL, "--master", envvar="GDPM_MASTER", help="URL of the master's HTTP API.",
    ),
    output: OutputFormat = typer.Option(
        OutputFormat.TABLE, "-o", "--output", case_sensitive=False,
        help="Print tables, or the API's JSON as returned.",
    ),
    timeout: float = typer.Option(
        DEFAULT_TIMEOUT_SECONDS, "--timeout", envvar="GDPM_TIMEOUT", min=0.1,
        help="Seconds to wait for each request to the master.",
    ),
) -> None:
    """Query and change the cluster through the master's HTTP API."""
    ctx.obj = ClientSettings(master_url=master, output=output, timeout=timeout)


# -- the HTTP client -----------------------------------------------------------------


@dataclass(frozen=True)
class _Response:
    status: int
    reason: str
    content_type: str
    body: bytes


class MasterClient:
    """Sends requests to the master's API and turns every failure into one error line and an exit."""

    def __init__(self, settings: ClientSettings) -> None:
        self.base_url = _base_url_or_exit(settings.master_url)
        self.timeout = settings.timeout

    def request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> Any:
        """Send one request and return its decoded JSON body, or None for an empty 2xx body.

        Exits with status 1 when the master cannot be reached, does not respond in
        time, returns an HTTP error, or returns a body that is not JSON. Exits with
        status 2 when aiohttp rejects the master URL.
        """
        response = self._run(method, path, self._send(method, path, payload))
        return self._decode(method, path, response)

    def stream(self, path: str, params: dict[str, str], write: Callable[[bytes], None], *, follow: bool) -> None:
        """GET ``path`` and pass each chunk of the body to ``write`` as it arrives.

        Without ``follow``, each read must get data within the timeout. With it, the
        stream may stay silent for any time. Exits as :meth:`request` does for an
        error before the body, with status 1 when the stream breaks later, and with
        EXIT_INTERRUPTED on Ctrl-C.
        """
        try:
            response = self._run("GET", path, self._stream(path, params, write, follow))
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if response is not None:
            self._decode("GET", path, response)

    def _run(self, method: str, path: str, coroutine: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coroutine``, turning the failures of aiohttp into one error line and an exit."""
        try:
            return asyncio.run(coroutine)
        except TimeoutError:
            # aiohttp's ServerTimeoutError and ConnectionTimeoutError are TimeoutErrors too.
            _fail(
                f"{method} {path} to the master at {self.base_url} timed out after {self.timeout:g} s "
                "(check that the master is running, or raise --timeout)"
            )
        except aiohttp.ClientConnectorError as error:
            _fail(f"cannot reach the master at {self.base_url}: {_connect_failure_reason(error)} ({START_HINT})")
        except aiohttp.InvalidURL as error:
            _fail(f"invalid master URL {str(error.url)!r}: expected http://HOST:PORT, such as {DEFAULT_MASTER_URL}", 2)
        except aiohttp.ClientError as error:
            _fail(f"{method} {path} to the master at {self.base_url} failed: {_describe(error)}")

    def expect_object(self, method: str, path: str, body: Any) -> dict[str, Any]:
        """Return the body when it is a JSON object, or exit with status 1."""
        if not isinstance(body, dict):
            self.fail_unexpected(method, path, f"expected a JSON object, got {_json_type(body)}")
        return body

    def expect_list(self, method: str, path: str, body: Any, field: str) -> list[dict[str, Any]]:
        """Return ``body[field]`` when it is a list of JSON objects, or exit with status 1."""
        items = self.expect_object(method, path, body).get(field)
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            self.fail_unexpected(method, path, f"expected a JSON object with a {field!r} list of objects")
        return items

    def fail_unexpected(self, method: str, path: str, detail: str) -> NoReturn:
        _fail(
            f"unexpected response from the master at {self.base_url} to {method} {path}: {detail} "
            "(is --master the URL of a gdpm master?)"
        )

    async def _send(self, method: str, path: str, payload: dict[str, Any] | None) -> _Response:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.request(
                method, self.base_url + path, json=payload, headers={"Accept": "application/json"},
            ) as response:
                body = await response.read()
                return _Response(response.status, response.reason or "", response.content_type, body)

    async def _stream(self, path: str, params: dict[str, str], write: Callable[[bytes], None],
                      follow: bool) -> _Response | None:
        """Copy the body to ``write``; return the response instead when its status is not 200."""
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_read=None if follow else self.timeout)
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            async with session.get(self.base_url + path, params=params) as response:
                if response.status != 200:
                    body = await response.read()
                    return _Response(response.status, response.reason or "", response.content_type, body)
                async for chunk in response.content.iter_any():
                    write(chunk)
        return None

    def _decode(self, method: str, path: str, response: _Response) -> Any:
        if response.status >= 400:
            message = _api_error_message(response.body)
            if message is not None:
                _fail(f"{message} (HTTP {response.status})")
            _fail(
                f"the master at {self.base_url} returned HTTP {response.status} {response.reason} "
                f"to {method} {path}{_excerpt_suffix(response.body)}"
            )
        if not 200 <= response.status < 300:
            self.fail_unexpected(method, path, f"HTTP {response.status} {response.reason}")
        if not response.body.strip():
            return None
        try:
            return json.loads(response.body)
        except ValueError:
            self.fail_unexpected(
                method, path,
                f"the body is not JSON (HTTP {response.status}, {response.content_type})"
                f"{_excerpt_suffix(response.body)}",
            )


def _base_url_or_exit(master_url: str) -> str:
    """Return the master URL without a trailing slash, or exit with status 2 if it is not an http(s) URL."""
    try:
        url = URL(master_url.strip())
    except ValueError as error:
        _fail(f"invalid master URL {master_url!r}: {error}; expected http://HOST:PORT, such as {DEFAULT_MASTER_URL}", 2)
    if url.scheme not in ("http", "https") or not url.host:
        _fail(f"invalid master URL {master_url!r}: expected http://HOST:PORT, such as {DEFAULT_MASTER_URL}", 2)
    return str(url.with_query(None).with_fragment(None)).rstrip("/")


def _connect_failure_reason(error: aiohttp.ClientConnectorError) -> str:
    os_error = error.os_error
    if isinstance(os_error, socket.gaierror):
        return f"cannot resolve host {error.host!r}: {os_error.strerror or os_error}"
    # asyncio reports a refused connection as "Connect call failed ('127.0.0.1', 8989)",
    # so the errno's text ("Connection refused") is clearer.
    if os_error.errno and os_error.errno > 0:
        return os.strerror(os_error.errno)
    return str(os_error) or type(os_error).__name__


def _describe(error: Exception) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _api_error_message(body: bytes) -> str | None:
    """Return the message of an ``{"error": {"code", "message"}}`` body, or None for any other body."""
    try:
        decoded = json.loads(body)
    except ValueError:
        return None
    error = decoded.get("error") if isinstance(decoded, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if not isinstance(message, str) or not message.strip():
        return None
    return " ".join(message.split())


def _excerpt_suffix(body: bytes) -> str:
    text = " ".join(body.decode("utf-8", errors="replace").split())
    if not text:
        return ""
    if len(text) > BODY_EXCERPT_LENGTH:
        text = text[:BODY_EXCERPT_LENGTH] + "..."
    return f": {text}"


def _json_type(value: Any) -> str:
    if value is None:
        return "an empty body or null"
    if isinstance(value, list):
        return "a JSON array"
    return f"a JSON {type(value).__name__}"


def _fail(message: str, exit_code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(exit_code)


# -- output --------------------------------------------------------------------------


def _settings(ctx: typer.Context) -> ClientSettings:
    settings = ctx.find_object(ClientSettings)
    if settings is None:
        raise RuntimeError("gdpm client sub-command invoked without the client options")
    return settings


def _print_result(settings: ClientSettings, body: Any, print_table: Callable[[Console, datetime], None]) -> None:
    """Print the API's JSON with ``-o json``, or call ``print_table`` with a console and the current time."""
    if settings.output is OutputFormat.JSON:
        typer.echo(json.dumps(body, indent=2, ensure_ascii=False))
        return
    print_table(render.make_console(), datetime.now(timezone.utc))


def _item_path(collection: str, item_id: str) -> str:
    # quote() with safe="" escapes "/" too, so an id always stays one path segment.
    return f"{collection}/{quote(item_id, safe='')}"


def _validate_id(value: str) -> str:
    if not value.strip():
        raise typer.BadParameter("must not be empty")
    # URL path resolution turns "." and ".." into other paths before the master gets them.
    if value in (".", ".."):
        raise typer.BadParameter(f"{value!r} is not an id; ids look like 3fa2c1b0")
    return value


def _id_argument(kind: str) -> Any:
    return typer.Argument(..., metavar="ID", callback=_validate_id, help=f"Id of the {kind}.")


# -- commands ------------------------------------------------------------------------


@get_app.command("nodes")
def get_nodes(ctx: typer.Context) -> None:
    """List the registered nodes with their state and instance count."""
    settings = _settings(ctx)
    client = MasterClient(settings)
    body = client.request("GET", NODES_PATH)
    nodes = client.expect_list("GET", NODES_PATH, body, "nodes")
    _print_result(settings, body, lambda console, now: render.print_nodes(console, nodes, now))


@get_app.command("node")
def get_node(ctx: typer.Context, node_id: str = _id_argument("node")) -> None:
    """Show a node and the instances placed on it."""
    settings = _settings(ctx)
    client = MasterClient(settings)
    path = _item_path(NODES_PATH, node_id)
    node = client.expect_object("GET", path, client.request("GET", path))
    _print_result(settings, node, lambda console, now: render.print_node(console, node, now))


@get_app.command("services")
def get_services(ctx: typer.Context) -> None:
    """List the services with their replica counts."""
    settings = _settings(ctx)
    client = MasterClient(settings)
    body = client.request("GET", SERVICES_PATH)
    services = client.expect_list("GET", SERVICES_PATH, body, "services")
    _print_result(settings, body, lambda console, now: render.print_services(console, services, now))


@get_app.command("service")
def get_service(ctx: typer.Context, service_id: str = _id_argument("service")) -> None:
    """Show a service and its instances."""
    settings = _settings(ctx)
    client = MasterClient(settings)
    path = _item_path(SERVICES_PATH, service_id)
    service = client.expect_object("GET", path, client.request("GET", path))
    _print_result(settings, service, lambda console, now: render.print_service(console, service, now))


# -- run settings of create and update -------------------------------------------------

_ENV_HELP = "Environment variable for each instance, as KEY=VALUE; repeat for more."
_CWD_HELP = "Absolute working directory of each instance."
_RESTART_HELP = "When an instance that exited on its own is started again."
_RESTART_DELAY_HELP = "Seconds before the first restart; the delay doubles with each quick failure."
_RESTART_DELAY_MAX_HELP = "Longest delay between two restarts, in seconds."
_MIN_UPTIME_HELP = "Seconds a run must last to count as stable, which resets the restart delay."
_MAX_RESTARTS_HELP = "Quick failures in a row before the instance is marked failed, or 'unlimited'."
_STOP_SIGNAL_HELP = "Signal that stops an instance, as a name (SIGTERM, TERM) or a number."
_STOP_TIMEOUT_HELP = "Seconds between the stop signal and SIGKILL."


def _parse_env(entries: list[str] | None) -> dict[str, str] | None:
    """Return the --env entries as a dict (the last value of a repeated KEY wins), or None when none was given."""
    if not entries:
        return None
    env: dict[str, str] = {}
    for entry in entries:
        key, separator, value = entry.partition("=")
        if not separator or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {entry!r}", param_hint="'--env'")
        env[key] = value
    return env


def _parse_max_restarts(value: str) -> int | None:
    """Return the --max-restarts value as an int, or None (JSON null, no limit) for 'unlimited'."""
    if value.strip().lower() == "unlimited":
        return None
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"expected an integer or 'unlimited', got {value!r}",
                                 param_hint="'--max-restarts'") from None


def _parse_stop_signal(value: str | None) -> str | int | None:
    if value is None:
        return None
    text = value.strip()
    return int(text) if text.isdigit() else text


def _run_settings(
    *, env: list[str] | None, cwd: str | None, restart: RestartPolicy | None, restart_delay: float | None,
    restart_delay_max: float | None, min_uptime: float | None, max_restarts: str | None,
    stop_signal: str | None, stop_timeout: float | None,
) -> dict[str, Any]:
    """Return the API fields of the run-setting options that were given, and only those."""
    settings: dict[str, Any] = {}
    parsed_env = _parse_env(env)
    if parsed_env is not None:
        settings["env"] = parsed_env
    if cwd is not None:
        settings["cwd"] = cwd
    if restart is not None:
        settings["restart"] = restart.value
    for field, value in (("restart_delay", restart_delay), ("restart_delay_max", restart_delay_max),
                         ("min_uptime", min_uptime), ("stop_timeout", stop_timeout)):
        if value is not None:
            settings[field] = value
    if max_restarts is not None:
        settings["max_restarts"] = _parse_max_restarts(max_restarts)
    parsed_signal = _parse_stop_signal(stop_signal)
    if parsed_signal is not None:
        settings["stop_signal"] = parsed_signal
    return settings


@client_app.command()
def create(
    ctx: typer.Context,
    command: list[str] = typer.Argument(
        ..., metavar="COMMAND",
        help=(
            "Shell command to run. Its words are joined with spaces, as ssh does, so quote the whole "
            "command to keep the quotes inside it. Put -- before it when a word starts with '-'."
        ),
    ),
    replicas: int = typer.Option(1, "-r", "--replicas", help="Number of instances to run."),
    env: list[str] = typer.Option(None, "--env", metavar="KEY=VALUE", help=_ENV_HELP),
    cwd: str | None = typer.Option(None, "--cwd", metavar="PATH", help=_CWD_HELP),
    restart: RestartPolicy | None = typer.Option(None, "--restart", case_sensitive=False, help=_RESTART_HELP),
    restart_delay: float | None = typer.Option(None, "--restart-delay", metavar="SECONDS", help=_RESTART_DELAY_HELP),
    restart_delay_max: float | None = typer.Option(
        None, "--restart-delay-max", metavar="SECONDS", help=_RESTART_DELAY_MAX_HELP),
    min_uptime: float | None = typer.Option(None, "--min-uptime", metavar="SECONDS", help=_MIN_UPTIME_HELP),
    max_restarts: str | None = typer.Option(None, "--max-restarts", metavar="N", help=_MAX_RESTARTS_HELP),
    stop_signal: str | None = typer.Option(None, "--stop-signal", metavar="SIGNAL", help=_STOP_SIGNAL_HELP),
    stop_timeout: float | None = typer.Option(None, "--stop-timeout", metavar="SECONDS", help=_STOP_TIMEOUT_HELP),
) -> None:
    """Create a service that runs COMMAND in REPLICAS instances.

    Only the settings given are sent; the master applies its defaults to the others.

    Example: gdpm client create -r 3 --env PORT=8080 --restart on-failure 'exec ./server'
    """
    settings = _settings(ctx)
    run_settings = _run_settings(
        env=env, cwd=cwd, restart=restart, restart_delay=restart_delay, restart_delay_max=restart_delay_max,
        min_uptime=min_uptime, max_restarts=max_restarts, stop_signal=stop_signal, stop_timeout=stop_timeout,
    )
    client = MasterClient(settings)
    payload = {"command": " ".join(command), "replicas": replicas, **run_settings}
    service = client.expect_object("POST", SERVICES_PATH, client.request("POST", SERVICES_PATH, payload))

    def print_table(console: Console, now: datetime) -> None:
        console.print(f"created service {service.get('id', render.MISSING)}")
        render.print_table(console, render.services_table([service], now))

    _print_result(settings, service, print_table)


@client_app.command()
def update(
    ctx: typer.Context,
    service_id: str = _id_argument("service"),
    replicas: int | None = typer.Option(None, "-r", "--replicas", help="New number of instances."),
    env: list[str] = typer.Option(
        None, "--env", metavar="KEY=VALUE", help=_ENV_HELP + " Replaces the whole environment of the service."),
    cwd: str | None = typer.Option(None, "--cwd", metavar="PATH", help=_CWD_HELP),
    restart: RestartPolicy | None = typer.Option(None, "--restart", case_sensitive=False, help=_RESTART_HELP),
    restart_delay: float | None = typer.Option(None, "--restart-delay", metavar="SECONDS", help=_RESTART_DELAY_HELP),
    restart_delay_max: float | None = typer.Option(
        None, "--restart-delay-max", metavar="SECONDS", help=_RESTART_DELAY_MAX_HELP),
    min_uptime: float | None = typer.Option(None, "--min-uptime", metavar="SECONDS", help=_MIN_UPTIME_HELP),
    max_restarts: str | None = typer.Option(None, "--max-restarts", metavar="N", help=_MAX_RESTARTS_HELP),
    stop_signal: str | None = typer.Option(None, "--stop-signal", metavar="SIGNAL", help=_STOP_SIGNAL_HELP),
    stop_timeout: float | None = typer.Option(None, "--stop-timeout", metavar="SECONDS", help=_STOP_TIMEOUT_HELP),
) -> None:
    """Change the number of instances or the run settings of a service.

    Only the options given are changed. A change of run settings restarts the
    instances with the new settings.
    """
    settings = _settings(ctx)
    payload = _run_settings(
        env=env, cwd=cwd, restart=restart, restart_delay=restart_delay, restart_delay_max=restart_delay_max,
        min_uptime=min_uptime, max_restarts=max_restarts, stop_signal=stop_signal, stop_timeout=stop_timeout,
    )
    if replicas is not None:
        payload = {"replicas": replicas, **payload}
    if not payload:
        _fail("nothing to update: give -r/--replicas or a run setting such as --env or --restart", 2)
    client = MasterClient(settings)
    path = _item_path(SERVICES_PATH, service_id)
    service = client.expect_object("PATCH", path, client.request("PATCH", path, payload))

    def print_table(console: Console, now: datetime) -> None:
        changes = [f"replicas {service.get('replicas', replicas)}" if field == "replicas" else field
                   for field in payload]
        console.print(f"updated service {service.get('id', service_id)}: {', '.join(changes)}")
        render.print_table(console, render.services_table([service], now))

    _print_result(settings, service, print_table)


# -- logs and events -------------------------------------------------------------------


def _stdout_writer() -> Callable[[bytes], None]:
    """Return a function that writes bytes to stdout as they are and flushes them at once."""
    sys.stdout.flush()
    binary = getattr(sys.stdout, "buffer", None)

    def write(data: bytes) -> None:
        if binary is not None:
            binary.write(data)
            binary.flush()
        else:
            # A text-only stdout (some test runners): the bytes that are not UTF-8 are
            # written back as they were by surrogateescape where the stream allows it.
            sys.stdout.write(data.decode("utf-8", errors="surrogateescape"))
            sys.stdout.flush()

    return write


def _quiet_broken_pipe() -> None:
    """Point stdout at /dev/null after the reader of a pipe closed it, so that Python's final flush does not fail."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass  # No real file descriptor behind stdout.


@client_app.command()
def logs(
    ctx: typer.Context,
    service_id: str = typer.Argument(..., metavar="SERVICE", callback=_validate_id, help="Id of the service."),
    instance: str | None = typer.Option(
        None, "--instance", metavar="ID", callback=lambda value: value if value is None else _validate_id(value),
        help="Show only this instance, such as 5e7a1c00-0.",
    ),
    tail: int = typer.Option(
        100, "--tail", "-n", min=0, max=MAX_TAIL, metavar="N", help="Lines to show from the end of each instance's log.",
    ),
    follow: bool = typer.Option(False, "-f", "--follow", help="Keep printing new lines until Ctrl-C."),
    stderr: bool = typer.Option(False, "--stderr", help="Show the instances' stderr instead of their stdout."),
) -> None:
    """Print the output of a service's instances, each line prefixed with [INSTANCE_ID].

    The lines come from the slaves that store them, through the master. Lines
    from gdpm itself, such as a node that cannot be reached, start with \\[gdpm].
    With -f, new lines appear as the instances write them, also across restarts
    and moves to other nodes, until Ctrl-C, which ends the command with exit
    status 130. Bytes are written to stdout as the instances wrote them, so
    output that is not UTF-8 stays as it was, except that every line ends with
    a newline, also a last line that an instance has not finished.
    """
    settings = _settings(ctx)
    client = MasterClient(settings)
    params = {"tail": str(tail), "stream": "stderr" if stderr else "stdout", "follow": "1" if follow else "0"}
    if instance is not None:
        params["instance"] = instance
    try:
        client.stream(_item_path(SERVICES_PATH, service_id) + "/logs", params, _stdout_writer(), follow=follow)
    except BrokenPipeError:
        # The reader of the pipe (head, say) has what it wanted.
        _quiet_broken_pipe()
        raise typer.Exit(EXIT_BROKEN_PIPE) from None


@client_app.command()
def events(ctx: typer.Context, service_id: str = _id_argument("service")) -> None:
    """Show the event history of a service: placements, starts, exits, restarts and failures."""
    settings = _settings(ctx)
    client = MasterClient(settings)
    path = _item_path(SERVICES_PATH, service_id) + "/events"
    body = client.request("GET", path)
    items = client.expect_list("GET", path, body, "events")
    _print_result(settings, body, lambda console, now: render.print_events(console, items, now))


@client_app.command()
def delete(ctx: typer.Context, service_id: str = _id_argument("service")) -> None:
    """Delete a service and stop all of its instances."""
    settings = _settings(ctx)
    client = MasterClient(settings)
    client.request("DELETE", _item_path(SERVICES_PATH, service_id))
    if settings.output is OutputFormat.JSON:
        typer.echo(json.dumps({"deleted": service_id}, indent=2))
    else:
        typer.echo(f"deleted service {service_id}")
