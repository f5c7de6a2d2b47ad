"""API errors and the middleware that renders every error the same way.

Routes under ``/api/`` and ``/healthz`` answer ``{"error": {"code", "message"}}``; the
routes kept from the Go gdpm answer the message as plain text, with the same status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import aetcd.exceptions
import structlog
from aiohttp import web

from gdpm.common.etcd import UNAVAILABLE_ERRORS

log = structlog.get_logger("gdpm.master.api")

_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    503: "unavailable",
}


class ApiError(Exception):
    """An error a handler returns to the client: a status, a code, a message and headers."""

    def __init__(self, status: int, message: str, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status, "error")
        self.headers = headers or {}


def invalid(message: str) -> ApiError:
    return ApiError(400, message)


def not_found(kind: str, item_id: str) -> ApiError:
    return ApiError(404, f"{kind} {item_id!r} not found")


def error_response(request: web.Request, error: ApiError) -> web.Response:
    if request.path.startswith("/api/") or request.path == "/healthz":
        body = {"error": {"code": error.code, "message": error.message}}
        return web.json_response(body, status=error.status, headers=error.headers)
    return web.Response(status=error.status, text=error.message + "\n", headers=error.headers)


def _from_http_exception(request: web.Request, exception: web.HTTPException) -> ApiError:
    if isinstance(exception, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exception.allowed_methods))
        return ApiError(405, f"method {request.method} is not allowed on {request.path}; allowed: {allowed}",
                        headers={"Allow": allowed})
    if isinstance(exception, web.HTTPNotFound):
        return ApiError(404, f"no route for {request.method} {request.path}")
    if isinstance(exception, web.HTTPRequestEntityTooLarge):
        limit = request.app["max_body_size"]
        return ApiError(413, f"request body too large: the limit is {limit} bytes")
    return ApiError(exception.status, exception.reason)


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error_response(request, error)
    except web.HTTPException as exception:
        if exception.status < 400:
            raise
        return error_response(request, _from_http_exception(request, exception))
    except aetcd.exceptions.ConnectionTimeoutError as error:
        # The request may have reached etcd and been applied. The message states that,
        # because a blind retry of a create would make a second service.
        log.warning("etcd request timed out", method=request.method, path=request.path, error=str(error))
        return error_response(request, ApiError(
            503, "etcd did not respond in time, so the change may or may not have been applied; "
                 "check the current state (GET) before you retry"))
    except UNAVAILABLE_ERRORS as error:
        log.warning("etcd unavailable", method=request.method, path=request.path,
                    error=str(error) or type(error).__name__)
        return error_response(request, ApiError(503, "etcd is unavailable; retry when it is back"))
    except TimeoutError:
        log.warning("request timed out", method=request.method, path=request.path)
        return error_response(request, ApiError(
            503, "the master timed out waiting for etcd; the change may have been applied, "
                 "so check the current state (GET) before you retry"))
    except Exception:
        # NOTE: a bug, not bad input. The master keeps serving and the client gets a 500.
        log.exception("request failed", method=request.method, path=request.path)
        return error_response(request, ApiError(500, "internal error; see the master's log", "internal"))
