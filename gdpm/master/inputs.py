"""Parsing and validation of request bodies.

Every rule raises :class:`~gdpm.master.errors.ApiError` 400 naming the field and the
rule, so a bad request never reaches etcd.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit
from typing import Any

from aiohttp import web

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
