"""The versioned JSON API under ``/api/v1``, used by the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aiohttp import web

from gdpm.common.models import InstanceRecord, InstanceState, NodeInfo, ServiceSpec
from gdpm.master.errors import invalid, not_found
from gdpm.master.inputs import (
    RUN_SETTING_FIELDS,
    parse_run_settings,
    parse_command,
    parse_node_name,
    parse_optional_id,
    parse_optional_url,
    parse_replicas,
    read_json_object,
    reject_unknown_fields,
)
from gdpm.master.operations import Operations
from gdpm.master.view import ClusterView

routes = web.RouteTableDef()


def _view(request: web.Request) -> ClusterView:
    return request.app["view"]


def _operations(request: web.Request) -> Operations:
    return request.app["operations"]


# -- JSON shapes -------------------------------------------------------------------


def node_json(view: ClusterView, node: NodeInfo, *, with_instances: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": node.id,
        "name": node.name,
        "state": view.node_state(node.id).value,
        "registered_at": node.registered_at.isoformat(),
    }
    if with_instances:
        body["instances"] = [instance_json(view, record) for record in view.node_instances(node.id)]
    else:
        body["instances"] = len(view.placed.get(node.id, ()))
    return body


def service_json(view: ClusterView, spec: ServiceSpec, *, with_instances: bool = False) -> dict[str, Any]:
    counts = view.count_states(spec.id)
    body: dict[str, Any] = {
        "id": spec.id,
        "command": spec.command,
        "replicas": spec.replicas,
        "created_at": spec.created_at.isoformat(),
        "running": counts[InstanceState.RUNNING],
        # Slots the scheduler has not created yet count as pending too.
        "pending": counts[InstanceState.PENDING] + max(0, spec.replicas - sum(counts.values())),
        "failed": counts[InstanceState.FAILED],
        "backoff": counts[InstanceState.BACKOFF],
        "generation": spec.generation,
        **spec.run_spec().model_dump(mode="json", exclude={"command"}),
    }
    if with_instances:
        body["instances"] = [instance_json(view, record) for record in view.service_instances(spec.id)]
    return body


def instance_json(view: ClusterView, record: InstanceRecord) -> dict[str, Any]:
    status = view.instance_status(record)
    return {
        "id": record.id,
        "service_id": record.service_id,
        "index": record.index,
        "node_id": record.node_id,
        "state": view.instance_state(record).value,
        "pid": status.pid if status else None,
        "exit_code": status.exit_code if status else None,
        "exit_signal": status.exit_signal if status else None,
        "restarts": status.restarts if status else 0,
        "started_at": _iso(status.started_at) if status else None,
        "exited_at": _iso(status.exited_at) if status else None,
        "restart_at": _iso(status.restart_at) if status else None,
    }


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None


# Cached responses kept at most, across all paths.
_CACHE_ENTRIES = 1024


def _cached_json(request: web.Request, build: Callable[[], Any]) -> web.Response:
    """Return ``build()`` as JSON, encoded once per revision of the view and path.

    The view changes only when the mirror applies etcd changes, and each change
    advances the mirror's revision, so a body encoded at the current revision is
    current. A cluster at rest then serves its largest listings without encoding them.
    """
    cache: dict[str, tuple[int, bytes]] = request.app["response_cache"]
    revision = request.app["mirror"].revision
    entry = cache.get(request.path_qs)
    if entry is None or entry[0] != revision:
        if len(cache) >= _CACHE_ENTRIES:
            cache.clear()
        entry = cache[request.path_qs] = (revision, json.dumps(build()).encode())
    return web.Response(body=entry[1], content_type="application/json")


def _service_or_404(request: web.Request) -> ServiceSpec:
    service_id = request.match_info["service_id"]
    spec = _view(request).services.get(service_id)
    if spec is None:
        raise not_found("service", service_id)
    return spec


# -- routes ------------------------------------------------------------------------


@routes.get("/api/v1/nodes")
async def list_nodes(request: web.Request) -> web.Response:
    view = _view(request)

    def build() -> dict[str, Any]:
        nodes = sorted(view.nodes.values(), key=lambda node: (node.registered_at, node.id))
        return {"nodes": [node_json(view, node) for node in nodes]}

    return _cached_json(request, build)


@routes.get("/api/v1/nodes/{node_id}")
async def get_node(request: web.Request) -> web.Response:
    view = _view(request)
    node_id = request.match_info["node_id"]
    node = view.nodes.get(node_id)
    if node is None:
        raise not_found("node", node_id)
    return _cached_json(request, lambda: node_json(view, node, with_instances=True))


@routes.delete("/api/v1/nodes/{node_id}")
async def delete_node(request: web.Request) -> web.Response:
    """Forget a node that is down; a ready node is rejected with 409."""
    node_id = request.match_info["node_id"]
    await _operations(request).delete_node(node_id)
    return web.Response(status=204)


@routes.post("/api/v1/nodes/register")
async def register_node(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    reject_unknown_fields(body, {"name", "node_id", "log_url"})
    name = parse_node_name(body.get("name"))
    node_id = parse_optional_id(body.get("node_id"), "node_id")
    log_url = parse_optional_url(body.get("log_url"), "log_url")
    node = await _operations(request).register_node(name, node_id, log_url)
    body = node_json(_view(request), node)
    body["node_ttl"] = request.app["node_ttl"]
    return web.json_response(body)


@routes.get("/api/v1/services")
async def list_services(request: web.Request) -> web.Response:
    view = _view(request)

    def build() -> dict[str, Any]:
        specs = sorted(view.services.values(), key=lambda spec: (spec.created_at, spec.id))
        return {"services": [service_json(view, spec) for spec in specs]}

    return _cached_json(request, build)


@routes.post("/api/v1/services")
async def create_service(request: web.Request) -> web.Response:
    body = await read_json_object(request)
    reject_unknown_fields(body, {"replicas", *RUN_SETTING_FIELDS})
    command = parse_command(body.get("command"))
    replicas = parse_replicas(body.get("replicas", 1), request.app["max_replicas"])
    settings = parse_run_settings(body)
    spec = await _operations(request).create_service(command, replicas, settings)
    return web.json_response(service_json(_view(request), spec, with_instances=True), status=201)


@routes.get("/api/v1/services/{service_id}")
async def get_service(request: web.Request) -> web.Response:
    spec = _service_or_404(request)
    return _cached_json(request, lambda: service_json(_view(request), spec, with_instances=True))


@routes.patch("/api/v1/services/{service_id}")
async def update_service(request: web.Request) -> web.Response:
    _service_or_404(request)
    body = await read_json_object(request)
    reject_unknown_fields(body, {"replicas", *RUN_SETTING_FIELDS})
    if not body:
        raise invalid(f"nothing to update: give replicas or any of {', '.join(RUN_SETTING_FIELDS)}")
    replicas = parse_replicas(body["replicas"], request.app["max_replicas"]) if "replicas" in body else None
    settings = parse_run_settings(body)
    spec = await _operations(request).update_service(request.match_info["service_id"], replicas, settings)
    return web.json_response(service_json(_view(request), spec, with_instances=True))


@routes.delete("/api/v1/services/{service_id}")
async def delete_service(request: web.Request) -> web.Response:
    await _operations(request).delete_service(_service_or_404(request).id)
    return web.Response(status=204)


@routes.get("/api/v1/services/{service_id}/events")
async def list_events(request: web.Request) -> web.Response:
    spec = _service_or_404(request)
    events = _view(request).service_events(spec.id)
    return web.json_response({"events": [event.model_dump(mode="json") for event in events]})
