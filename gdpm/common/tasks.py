"""Helpers for named background tasks whose crashes are logged, not lost."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

log = structlog.get_logger("gdpm.tasks")


def start_task(coroutine: Coroutine[Any, Any, Any], *, name: str, **log_fields: Any) -> asyncio.Task:
    """Start a named task and log its crash with ``log_fields`` when it fails."""
    task = asyncio.get_running_loop().create_task(coroutine, name=name)
    task.add_done_callback(lambda done: _log_crash(done, log_fields))
    return task


def _log_crash(task: asyncio.Task, log_fields: dict[str, Any]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is not None:
        log.error("task crashed", task=task.get_name(), exc_info=error, **log_fields)


async def cancel_and_wait(*tasks: asyncio.Task | None, timeout: float = 5.0) -> None:
    """Cancel tasks and wait for them to finish, at most ``timeout`` seconds."""
    pending = [task for task in tasks if task is not None and not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=timeout)
