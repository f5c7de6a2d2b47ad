"""The routes of the original Go gdpm, kept so that its clients keep working.

Paths keep their trailing slash. Request fields are ``Command`` and ``InstanceNum``,
form-encoded (as the Go client sent them) or JSON (as its README showed). Responses
keep the Go shapes: parallel arrays, and the bare service id as text.
"""

from __future__ import annotations

from collections import Counter

from aiohttp import web

from gdpm.master.errors import not_found
from gdpm.master.inputs import parse_command, parse_replicas, read_form_or_json
from gdpm.master.operations import Operations
from gdpm.master.view import ClusterView

routes = web.RouteTableDef()

# Go's time.RFC822 layout, "02 Jan 06 15:04 MST"; gdpm stores times in UTC.
_GO_RFC822 = "%d %b %y %H:%M UTC"


def _view(request: web.Request) -> ClusterView:
    return request.app["view"]


def _operations(request: web.Request) -> Operations:
    return request.app["operations"]


@routes.get("/node/")
async def list_nodes(request: web.Request) -> web.Response:
    view = _view(request)
    nodes = sorted(view.nodes.values(), key=lambda node: (node.registered_at, node.id))
    return web.json_response({
        "Ids": [node.id for node in nodes],
        "ServiceNum": [len({service_id for service_id, _ in view.placed.get(node.id, ())}) for node in nodes],
        "Status": [1 if node.id in view.alive else 0 for node in nodes],
        "Times": [node.registered_at.strftime(_GO_RFC822) for node in nodes],
    })


@routes.get("/node/{node_id}/")
async def get_node(request: web.Request) -> web.Response:
    view = _view(request)
    node_id = request.match_info["node_id"]
    if node_id not in view.nodes:
        raise not_found("node", node_id)
    per_service = Counter(service_id for service_id, _ in view.placed.get(node_id, ()))
    service_ids = sorted(service_id for service_id in per_service if service_id in view.services)
    return web.json_response({
        "Command": [view.services[service_id].command for service_id in service_ids],
        "Ids": service_ids,
        "Number": [per_service[service_id] for service_id in service_ids],
    })


@routes.post("/service/")
async def create_service(request: web.Request) -> web.Response:
    body = await read_form_or_json(request)
    command = parse_command(body.get("Command"), "Command")
    replicas = parse_replicas(body.get("InstanceNum"), request.app["max_replicas"], "InstanceNum", from_text=True)
    spec = await _operations(request).create_service(command, replicas)
    return web.Response(text=spec.id)


@routes.post("/service/{service_id}/")
async def update_service(request: web.Request) -> web.Response:
    service_id = request.match_info["service_id"]
    if service_id not in _view(request).services:
        raise not_found("service", service_id)
    body = await read_form_or_json(request)
    replicas = parse_replicas(body.get("InstanceNum"), request.app["max_replicas"], "InstanceNum", from_text=True)
    spec = await _operations(request).scale_service(service_id, replicas)
    return web.Response(text=spec.id)


@routes.delete("/service/{service_id}/")
async def delete_service(request: web.Request) -> web.Response:
    service_id = request.match_info["service_id"]
    await _operations(request).delete_service(service_id)
    return web.Response(text=service_id)
