"""Parsing and validation of request bodies.

Every rule raises :class:`~gdpm.master.errors.ApiError` 400 naming the field and the
rule, so a bad request never reaches etcd.
"""

from __future__ import annotations

import json
import re
import signal
from urllib.parse import urlsplit
from typing import Any

from aiohttp import web

from gdpm.common.models import RestartPolicy
from gdpm.master.errors import ApiError, invalid

# Largest command accepted, in bytes of UTF-8.
MAX_COMMAND_BYTES = 64 * 1024
MAX_NODE_NAME_LENGTH = 253

_ID_PATTERN = re.compile(r"[0-9a-f]{8}")
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """Read a JSON object body (an empty body is an empty object)."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise invalid(f"malformed JSON body: {error}") from None
    except ValueError as error:
        # Python refuses integers of more than 4300 digits (CVE-2020-10735).
        raise invalid(f"invalid JSON body: {error}") from None
    except RecursionError:
        raise invalid("invalid JSON body: nested too deeply") from None
    if not isinstance(body, dict):
        raise invalid(f"the JSON body must be an object, not {type(body).__name__}")
    return body


async def read_form_or_json(request: web.Request) -> dict[str, Any]:
    """Read a form-encoded or JSON body, as the Go gdpm's clients sent either."""
    body = await request.read()
    # `curl -d '{...}'` labels a JSON body as a form, so a body starting with "{" is JSON.
    if request.content_type in _FORM_TYPES and not body.lstrip().startswith(b"{"):
        try:
            form = await request.post()
        except ValueError as error:
            raise invalid(f"malformed form data: {error}") from None
        return {name: value for name, value in form.items() if isinstance(value, str)}
    return await read_json_object(request)


def reject_unknown_fields(body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        expected = ", ".join(sorted(known))
        raise invalid(f"unknown field {unknown[0]!r}; expected fields: {expected}")


def parse_command(value: Any, field: str = "command") -> str:
    if value is None:
        raise invalid(f"{field} is missing: give the shell command to run")
    if not isinstance(value, str):
        raise invalid(f"{field} must be a string, not {type(value).__name__}")
    if not value.strip():
        raise invalid(f"{field} must not be empty")
    if "\x00" in value:
        raise invalid(f"{field} must not contain a NUL byte")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise invalid(f"{field} must be valid Unicode text (it contains a lone surrogate)") from None
    if len(value.encode()) > MAX_COMMAND_BYTES:
        raise invalid(f"{field} is longer than {MAX_COMMAND_BYTES} bytes")
    return value


def parse_replicas(value: Any, max_replicas: int, field: str = "replicas", *, from_text: bool = False) -> int:
    """Accept an integer from 0 to ``max_replicas``; a form sends it as decimal text."""
    if value is None:
        raise invalid(f"{field} is missing: give the number of instances, 0 to {max_replicas}")
    if from_text and isinstance(value, str) and re.fullmatch(r"\s*[+-]?[0-9]{1,12}\s*", value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"{field} must be an integer from 0 to {max_replicas}, not {value!r}")
    if value < 0:
        raise invalid(f"{field} must not be negative, got {value}")
    if value > max_replicas:
        raise invalid(f"{field} must be at most {max_replicas} (the master's --max-replicas), got {value}")
    return value


def parse_node_name(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise invalid("name must be a non-empty string")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise invalid("name must be valid Unicode text") from None
    if len(value) > MAX_NODE_NAME_LENGTH or any(ord(char) < 32 for char in value):
        raise invalid(f"name must be at most {MAX_NODE_NAME_LENGTH} printable characters")
    return value.strip()


def is_valid_id(value: str) -> bool:
    return _ID_PATTERN.fullmatch(value) is not None


def parse_optional_id(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not is_valid_id(value):
        raise ApiError(400, f"{field} must be 8 lowercase hex digits, got {value!r}")
    return value


def parse_optional_url(value: Any, field: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 2048:
        raise invalid(f"{field} must be an http URL of at most 2048 characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid(f"{field} must be an http URL such as http://127.0.0.1:8990, got {value!r}")
    return value.rstrip("/")


# -- run settings ----------------------------------------------------------------------

# Fields of a service that PATCH may change besides replicas, each with its parser.
RUN_SETTING_FIELDS = (
    "command", "env", "cwd", "restart", "restart_delay", "restart_delay_max",
    "min_uptime", "max_restarts", "stop_signal", "stop_timeout",
)

MAX_ENV_ENTRIES = 1000
MAX_ENV_BYTES = 64 * 1024
# Maximum delay or timeout accepted, in seconds: one day.
MAX_SECONDS = 86_400.0

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def parse_run_settings(body: dict[str, Any]) -> dict[str, Any]:
    """Validate the run settings present in ``body`` and return them, normalised."""
    settings: dict[str, Any] = {}
    if "command" in body:
        settings["command"] = parse_command(body["command"])
    if "env" in body:
        settings["env"] = parse_env(body["env"])
    if "cwd" in body:
        settings["cwd"] = parse_cwd(body["cwd"])
    if "restart" in body:
        settings["restart"] = parse_restart_policy(body["restart"])
    for field in ("restart_delay", "restart_delay_max", "min_uptime", "stop_timeout"):
        if field in body:
            minimum = 0.1 if field.startswith("restart_delay") else 0.0
            settings[field] = parse_seconds(body[field], field, minimum=minimum)
    if "max_restarts" in body:
        settings["max_restarts"] = parse_max_restarts(body["max_restarts"])
    if "stop_signal" in body:
        settings["stop_signal"] = parse_signal(body["stop_signal"])
    return settings


def check_delays(restart_delay: float, restart_delay_max: float) -> None:
    if restart_delay_max < restart_delay:
        raise invalid(f"restart_delay_max ({restart_delay_max:g}) must not be below restart_delay ({restart_delay:g})")


def parse_env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise invalid(f"env must be an object of NAME: \"value\" strings, not {type(value).__name__}")
    if len(value) > MAX_ENV_ENTRIES:
        raise invalid(f"env has {len(value)} entries; the limit is {MAX_ENV_ENTRIES}")
    size = 0
    for name, item in value.items():
        if not _ENV_NAME.fullmatch(name):
            raise invalid(f"env name {name!r} is invalid: use letters, digits and _, not starting with a digit")
        if not isinstance(item, str):
            raise invalid(f"env value of {name} must be a string, not {type(item).__name__}")
        if "\x00" in item:
            raise invalid(f"env value of {name} must not contain a NUL byte")
        try:
            size += len(name) + len(item.encode()) + 2
        except UnicodeEncodeError:
            raise invalid(f"env value of {name} must be valid Unicode text") from None
    if size > MAX_ENV_BYTES:
        raise invalid(f"env is {size} bytes; the limit is {MAX_ENV_BYTES}")
    return dict(value)


def parse_cwd(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise invalid("cwd must be an absolute path such as /srv/app, or null")
    if not value.startswith("/"):
        raise invalid(f"cwd must be an absolute path, got the relative path {value!r}")
    if "\x00" in value or len(value) > 4096:
        raise invalid("cwd must be a path of at most 4096 characters without NUL bytes")
    return value


def parse_restart_policy(value: Any) -> str:
    choices = [policy.value for policy in RestartPolicy]
    if value not in choices:
        raise invalid(f"restart must be one of {', '.join(choices)}, got {value!r}")
    return value


def parse_seconds(value: Any, field: str, *, minimum: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise invalid(f"{field} must be a number of seconds, not {value!r}")
    if value < minimum or value > MAX_SECONDS:
        raise invalid(f"{field} must be from {minimum:g} to {MAX_SECONDS:g} seconds, got {value!r}")
    return float(value)


def parse_max_restarts(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1_000_000:
        raise invalid(f"max_restarts must be an integer from 0 to 1000000, or null for no limit; got {value!r}")
    return value


def parse_signal(value: Any) -> str:
    """Accept TERM, SIGTERM, sigterm or 15, and return the name: SIGTERM."""
    name = value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            name = signal.Signals(value).name
        except ValueError:
            raise invalid(f"stop_signal {value} is not a signal number") from None
    if isinstance(name, str):
        name = name.strip().upper()
        name = name if name.startswith("SIG") else f"SIG{name}"
        if name == "SIGSTOP":
            raise invalid("stop_signal SIGSTOP would pause the instance rather than stop it; use SIGTERM or SIGINT")
        if name in signal.Signals.__members__:
            return name
    raise invalid(f"stop_signal {value!r} is not a signal name such as SIGTERM or SIGINT")
