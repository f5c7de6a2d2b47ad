"""The master process: the HTTP API and the scheduler, over one mirror of etcd."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass

import structlog
from aiohttp import web

from gdpm.common.etcd import Etcd, PrefixMirror
from gdpm.common.keys import DEFAULT_NODE_TTL, KeyLayout
from gdpm.common.tasks import cancel_and_wait, start_task
from gdpm.master import api_compat, api_v1, logs
from gdpm.master.errors import ApiError, error_middleware
from gdpm.master.operations import Operations
from gdpm.master.scheduler import Scheduler
from gdpm.master.view import ClusterView

log = structlog.get_logger("gdpm.master")

# Largest request body accepted, in bytes; larger ones get 413.
MAX_BODY_SIZE = 256 * 1024


@dataclass(frozen=True)
class MasterConfig:
    host: str
    port: int
    etcd_endpoints: list[tuple[str, int]]
    prefix: str
    max_replicas: int
    node_ttl: int = DEFAULT_NODE_TTL


async def healthz(request: web.Request) -> web.Response:
    mirror: PrefixMirror = request.app["mirror"]
    if not mirror.loaded.is_set():
        raise ApiError(503, "the master has not loaded its state from etcd yet")
    if not mirror.connected:
        raise ApiError(503, "the master lost its watch on etcd and is reconnecting; reads may be stale")
    return web.json_response({"status": "ok", "revision": mirror.revision})


def build_app(config: MasterConfig, view: ClusterView, mirror: PrefixMirror, operations: Operations) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_SIZE)
    app["view"] = view
    app["mirror"] = mirror
    app["operations"] = operations
    app["max_replicas"] = config.max_replicas
    app["node_ttl"] = config.node_ttl
    app["max_body_size"] = MAX_BODY_SIZE
    app["response_cache"] = {}
    app.router.add_get("/healthz", healthz)
    app.add_routes(api_v1.routes)
    app.add_routes(logs.routes)
    app.add_routes(api_compat.routes)
    logs.setup_log_client(app)
    return app


async def run_master(config: MasterConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    keys = KeyLayout(config.prefix)
    etcd = Etcd(config.etcd_endpoints)
    view = ClusterView(keys)
    mirror = PrefixMirror(etcd, keys.root, view.apply, name="master")
    scheduler = Scheduler(view, mirror, etcd, keys)
    app = build_app(config, view, mirror, Operations(etcd, keys, view, mirror))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    mirror_task = start_task(mirror.run(), name="etcd-mirror")
    scheduler_task = start_task(scheduler.run(), name="scheduler")
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        try:
            await site.start()
        except OSError as error:
            raise SystemExit(f"error: cannot listen on {config.host}:{config.port}: {error.strerror}; "
                             "choose another --port or stop what uses it") from None
        log.info("master started", url=f"http://{config.host}:{config.port}",
                 etcd=",".join(f"{host}:{port}" for host, port in config.etcd_endpoints), prefix=keys.prefix)
        await _wait_for_stop_or_crash(stop, mirror_task, scheduler_task)
    finally:
        await runner.cleanup()
        await cancel_and_wait(scheduler_task, mirror_task)
        await etcd.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        log.info("master stopped", scheduler_rounds=scheduler.rounds)


async def _wait_for_stop_or_crash(stop: asyncio.Event, *tasks: asyncio.Task) -> None:
    stop_task = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait([stop_task, *tasks], return_when=asyncio.FIRST_COMPLETED)
    stop_task.cancel()
    for task in done:
        if task is not stop_task and not task.cancelled() and task.exception() is not None:
            raise SystemExit(f"master stopped: background task {task.get_name()} crashed")
