"""Rich tables for ``gdpm client``: nodes, services and instances as the master's API returns them.

Every function takes the decoded JSON of the API (``dict`` objects). A missing or null
field is shown as ``-`` instead of raising, so a master that adds or drops an optional
field does not break the tables.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

# Console width when stdout is not a terminal and COLUMNS is not set. Rich would use
# 80, which wraps or crops the tables. Tables do not expand, so a wider limit only
# matters for long rows.
PIPE_WIDTH = 200

# Characters of a command shown in the services table. ``get service ID`` shows the whole command.
COMMAND_WIDTH = 60

MISSING = "-"

STATE_STYLES = {
    "ready": "green",
    "running": "green",
    "down": "red",
    "exited": "red",
    "lost": "red",
    "pending": "yellow",
    "starting": "yellow",
    "stopping": "yellow",
    "backoff": "yellow",
    "failed": "red",
}


def make_console() -> Console:
    """Create a console on the current stdout that prints text as given.

    Markup, emoji codes and highlighting are off, so a command such as
    ``echo [bold]:smile:`` is printed as typed. Rich drops colours when stdout is not a
    terminal, or when NO_COLOR is set.
    """
    console = Console(highlight=False, markup=False, emoji=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = PIPE_WIDTH
    return console


def format_age(timestamp: Any, now: datetime) -> str:
    """Return the time since an ISO-8601 timestamp as ``42s``, ``5m``, ``3h`` or ``2d``.

    Returns ``-`` for null, and the value unchanged when it is not a timestamp. A
    timestamp without a zone is taken as UTC, and one in the future (clock skew
    between hosts) gives ``0s``.
    """
    moment = _parse_time(timestamp)
    if moment is None:
        return MISSING if timestamp is None else str(timestamp)

    seconds = max(0, int((now - moment).total_seconds()))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def format_time(timestamp: Any, now: datetime) -> str:
    """Return an ISO-8601 timestamp followed by its age, as in ``2024-05-01T10:00:00+00:00 (5m ago)``."""
    if timestamp is None:
        return MISSING
    if _parse_time(timestamp) is None:
        return str(timestamp)
    return f"{timestamp} ({format_age(timestamp, now)} ago)"


def state_text(state: Any) -> Text:
    """Return a state name, coloured by how healthy it is."""
    if state is None:
        return Text(MISSING)
    return Text(str(state), style=STATE_STYLES.get(str(state), ""))


def shorten_command(command: Any, width: int = COMMAND_WIDTH) -> str:
    """Return a command on one line, cut to ``width`` characters with ``...`` at the end."""
    if command is None:
        return MISSING
    line = printable(str(command))
    if len(line) <= width:
        return line
    return line[: width - 3] + "..."


def print_table(console: Console, table: Table) -> None:
    """Print a table without the spaces that pad the last column to its width.

    Trailing spaces are noise in piped output and in diffs of it.
    """
    with console.capture() as capture:
        console.print(table)
    lines = capture.get().splitlines()
    # Written to the console's file because the captured lines may already contain
    # colour codes, which console.print would not pass through unchanged.
    console.file.write("".join(line.rstrip(" ") + "\n" for line in lines))
    console.file.flush()


# -- tables ------------------------------------------------------------------------


def nodes_table(nodes: Iterable[Mapping[str, Any]], now: datetime) -> Table:
    """Build the table of ``get nodes``: one row per node, ``instances`` being a count."""
    table = _new_table()
    _add_id_column(table, "ID")
    table.add_column("NAME")
    table.add_column("STATE", no_wrap=True)
    table.add_column("INSTANCES", justify="right", no_wrap=True)
    table.add_column("REGISTERED", no_wrap=True)
    for node in nodes:
        table.add_row(
            _cell(node.get("id")),
            _shrinkable_cell(node.get("name")),
            state_text(node.get("state")),
            _cell(_count(node.get("instances"))),
            Text(format_age(node.get("registered_at"), now)),
        )
    return table


def services_table(services: Iterable[Mapping[str, Any]], now: datetime) -> Table:
    """Build the table of ``get services``, with each command shortened to one line."""
    table = _new_table()
    _add_id_column(table, "ID")
    table.add_column("COMMAND")
    table.add_column("REPLICAS", justify="right", no_wrap=True)
    table.add_column("RUNNING", justify="right", no_wrap=True)
    table.add_column("PENDING", justify="right", no_wrap=True)
    table.add_column("AGE", no_wrap=True)
    for service in services:
        table.add_row(
            _cell(service.get("id")),
            _shrinkable_cell(shorten_command(service.get("command"))),
            _cell(service.get("replicas")),
            _cell(service.get("running")),
            _cell(service.get("pending")),
            Text(format_age(service.get("created_at"), now)),
        )
    return table


def instances_table(instances: list[Mapping[str, Any]], now: datetime, *, parent: str) -> Table:
    """Build the instances table of a service (``parent="service"``) or of a node (``parent="node"``).

    A service's table has a NODE column and a node's table a SERVICE column. EXIT
    shows the name of the signal that ended the last run when there is one, and the
    exit code otherwise. The optional columns RESTARTS and EXITED appear when any
    instance has that field. With the master's 8-character ids, a typical table fits in
    80 columns.
    """

    def has_field(name: str) -> bool:
        return any(name in instance for instance in instances)

    show_service = parent == "node" and has_field("service_id")
    show_node = parent == "service"
    show_restarts = has_field("restarts")
    show_exited = has_field("exited_at")

    table = _new_table()
    _add_id_column(table, "ID")
    if show_service:
        _add_id_column(table, "SERVICE")
    table.add_column("INDEX", justify="right", no_wrap=True)
    if show_node:
        _add_id_column(table, "NODE")
    table.add_column("STATE", no_wrap=True)
    table.add_column("PID", justify="right", no_wrap=True)
    table.add_column("EXIT", justify="right", no_wrap=True)
    if show_restarts:
        table.add_column("RESTARTS", justify="right", no_wrap=True)
    table.add_column("STARTED", no_wrap=True)
    if show_exited:
        table.add_column("EXITED", no_wrap=True)

    for instance in instances:
        row: list[Text] = [_cell(instance.get("id"))]
        if show_service:
            row.append(_cell(instance.get("service_id")))
        row.append(_cell(instance.get("index")))
        if show_node:
            row.append(_cell(instance.get("node_id")))
        row.append(state_text(instance.get("state")))
        row.append(_cell(instance.get("pid")))
        row.append(Text(_exit_text(instance)))
        if show_restarts:
            row.append(_cell(instance.get("restarts")))
        row.append(Text(format_age(instance.get("started_at"), now)))
        if show_exited:
            row.append(Text(format_age(instance.get("exited_at"), now)))
        table.add_row(*row)
    return table


# -- whole outputs -------------------------------------------------------------------


def print_nodes(console: Console, nodes: list[Mapping[str, Any]], now: datetime) -> None:
    if not nodes:
        console.print("no nodes registered")
        return
    print_table(console, nodes_table(nodes, now))


def print_services(console: Console, services: list[Mapping[str, Any]], now: datetime) -> None:
    if not services:
        console.print("no services")
        return
    print_table(console, services_table(services, now))


def print_node(console: Console, node: Mapping[str, Any], now: datetime) -> None:
    """Print a node's fields, one per line, then the table of the instances placed on it."""
    instances = _instance_list(node.get("instances"))
    _print_fields(console, [
        ("node", _cell(node.get("id"))),
        ("name", _cell(node.get("name"))),
        ("state", state_text(node.get("state"))),
        ("registered", Text(format_time(node.get("registered_at"), now))),
        ("instances", _cell(_count(node.get("instances")))),
    ])
    _print_instances(console, instances, now, parent="node")


def print_service(console: Console, service: Mapping[str, Any], now: datetime) -> None:
    """Print a service's fields, one per line, then the table of its instances.

    The run settings (env, cwd, restart policy, delays, stop signal and timeout) are
    printed after the other fields, each only when the service's JSON has it.
    """
    fields = [
        ("service", _cell(service.get("id"))),
        ("command", _cell(service.get("command"))),
        ("replicas", _cell(service.get("replicas"))),
        ("running", _cell(service.get("running"))),
        ("pending", _cell(service.get("pending"))),
        ("created", Text(format_time(service.get("created_at"), now))),
    ]
    for field, label, format_value in _RUN_SETTING_FIELDS:
        if field in service:
            fields.append((label, Text(printable(format_value(service[field])))))
    _print_fields(console, fields)
    if "instances" in service:
        _print_instances(console, _instance_list(service.get("instances")), now, parent="service")


def print_events(console: Console, events: list[Mapping[str, Any]], now: datetime) -> None:
    if not events:
        console.print("no events")
        return
    print_table(console, events_table(events, now))


def events_table(events: Iterable[Mapping[str, Any]], now: datetime) -> Table:
    """Build the table of ``events``: one row per event, with its time in UTC to the second."""
    table = _new_table()
    table.add_column("TIME", no_wrap=True)
    table.add_column("TYPE", no_wrap=True)
    _add_id_column(table, "INSTANCE")
    _add_id_column(table, "NODE")
    table.add_column("MESSAGE")
    for event in events:
        table.add_row(
            Text(format_event_time(event.get("time"))),
            _cell(event.get("type")),
            _cell(event.get("instance_id")),
            _cell(event.get("node_id")),
            _cell(event.get("message")),
        )
    return table


def format_event_time(timestamp: Any) -> str:
    """Return an ISO-8601 timestamp in UTC to the second, as ``2024-05-01T10:00:03Z``; other values unchanged."""
    moment = _parse_time(timestamp)
    if moment is None:
        return MISSING if timestamp is None else printable(str(timestamp))
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- helpers -------------------------------------------------------------------------


def _new_table() -> Table:
    # No borders and no outer padding: columns separated by two spaces, as in
    # kubectl, so that grep, cut and awk work on the piped output.
    return Table(box=None, pad_edge=False, padding=(0, 2, 0, 0), header_style="bold", show_edge=False)


def _add_id_column(table: Table, header: str) -> None:
    # Rich narrows the columns that may wrap (NAME, COMMAND) first when a table is
    # wider than the console, so an id is cut only when those cannot give enough.
    table.add_column(header, no_wrap=True)


def _cell(value: Any) -> Text:
    return Text(MISSING if value is None else printable(str(value)))


# C0 and C1 control characters and DEL, which a terminal would act on.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """Return ``text`` with control characters escaped, so that it cannot drive the terminal."""
    return _CONTROL.sub(lambda match: _NAMED_ESCAPES.get(match.group(), f"\\x{ord(match.group()):02x}"), text)


def _shrinkable_cell(value: Any) -> Text:
    # Rich narrows the columns that may wrap first when a table is wider than the
    # console. The cell's own no_wrap overrides the column's, so this text is cut
    # with an ellipsis instead of wrapping over several lines.
    text = _cell(value)
    text.no_wrap = True
    text.overflow = "ellipsis"
    return text


def _count(instances: Any) -> Any:
    # ``instances`` is a count in node lists and a list in node details.
    if isinstance(instances, list):
        return len(instances)
    return instances


def _instance_list(instances: Any) -> list[Mapping[str, Any]]:
    if not isinstance(instances, list):
        return []
    return [instance for instance in instances if isinstance(instance, Mapping)]


def _exit_text(instance: Mapping[str, Any]) -> str:
    exit_signal = instance.get("exit_signal")
    if exit_signal is not None:
        return signal_name(exit_signal)
    exit_code = instance.get("exit_code")
    return MISSING if exit_code is None else printable(str(exit_code))


def signal_name(value: Any) -> str:
    """Return a signal's name, such as ``SIGKILL``, from its number (9 or "9") or its name ("SIGKILL", "KILL")."""
    text = str(value).strip()
    if text.lstrip("-").isdigit():
        try:
            return signal.Signals(int(text)).name
        except ValueError:
            return f"signal {text}"
    name = text.upper()
    name = name if name.startswith("SIG") else f"SIG{name}"
    return name if name in signal.Signals.__members__ else printable(text)


def _format_seconds(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}s"
    return MISSING if value is None else str(value)


def _format_env(value: Any) -> str:
    if not isinstance(value, Mapping):
        return MISSING if value is None else str(value)
    if not value:
        return MISSING
    return " ".join(f"{name}={shlex.quote(str(item))}" for name, item in value.items())


def _format_max_restarts(value: Any) -> str:
    return "unlimited" if value is None else str(value)


def _format_plain(value: Any) -> str:
    return MISSING if value is None else str(value)


# The run settings of ``get service``: API field, label, and how the value is shown.
_RUN_SETTING_FIELDS = (
    ("env", "env", _format_env),
    ("cwd", "cwd", _format_plain),
    ("restart", "restart", _format_plain),
    ("restart_delay", "restart delay", _format_seconds),
    ("restart_delay_max", "restart delay max", _format_seconds),
    ("min_uptime", "min uptime", _format_seconds),
    ("max_restarts", "max restarts", _format_max_restarts),
    ("stop_signal", "stop signal", lambda value: MISSING if value is None else signal_name(value)),
    ("stop_timeout", "stop timeout", _format_seconds),
)


def _parse_time(timestamp: Any) -> datetime | None:
    if not isinstance(timestamp, str):
        return None
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment


def _print_fields(console: Console, fields: list[tuple[str, Text]]) -> None:
    label_width = max(len(label) for label, _ in fields) + 2
    for label, value in fields:
        line = Text(f"{label}:".ljust(label_width))
        line.append_text(value)
        # soft_wrap keeps a long command on one line instead of wrapping it at the
        # console width.
        console.print(line, soft_wrap=True)


def _print_instances(console: Console, instances: list[Mapping[str, Any]], now: datetime, *, parent: str) -> None:
    console.print()
    if not instances:
        console.print("no instances")
        return
    print_table(console, instances_table(instances, now, parent=parent))
