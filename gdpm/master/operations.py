"""Changes to the desired state, shared by the v1 API and the Go-compatible routes.

Each operation is one etcd transaction. It returns once the master's view contains
the change, so a read right after a write sees it.
"""

from __future__ import annotations

import secrets

import structlog

from gdpm.common.etcd import Etcd, PrefixMirror
from gdpm.common.keys import KeyLayout
from gdpm.common.models import NodeInfo, ServiceSpec, utc_now
from gdpm.master.errors import ApiError, not_found
from gdpm.master.inputs import check_delays
from gdpm.master.view import ClusterView

log = structlog.get_logger("gdpm.master")

# Attempts to draw an unused random id before giving up.
_ID_ATTEMPTS = 8


def new_id() -> str:
    return secrets.token_hex(4)


class Operations:
    def __init__(self, etcd: Etcd, keys: KeyLayout, view: ClusterView, mirror: PrefixMirror) -> None:
        self.etcd = etcd
        self.keys = keys
        self.view = view
        self.mirror = mirror

    async def create_service(self, command: str, replicas: int, settings: dict | None = None) -> ServiceSpec:
        ops = self.etcd.ops
        settings = {key: value for key, value in (settings or {}).items() if key != "command"}
        for _ in range(_ID_ATTEMPTS):
            spec = ServiceSpec(id=new_id(), command=command, replicas=replicas, created_at=utc_now(), **settings)
            check_delays(spec.restart_delay, spec.restart_delay_max)
            key = self.keys.service(spec.id)
            created, revision = await self.etcd.txn([ops.version(key) == 0], [ops.put(key, spec.to_json())])
            if created:
                await self.mirror.wait_for_revision(revision)
                log.info("service created", service_id=spec.id, replicas=replicas, command=command)
                return spec
        raise ApiError(409, "could not allocate a service id; retry")

    async def scale_service(self, service_id: str, replicas: int) -> ServiceSpec:
        return await self.update_service(service_id, replicas, {})

    async def update_service(self, service_id: str, replicas: int | None, settings: dict) -> ServiceSpec:
        """Change the replica count and run settings.

        Any run setting in ``settings``, even one equal to the current value, starts a
        new generation: instances get the new settings (restarting if they differ)
        and failed ones are started again.
        """
        spec = self.view.services.get(service_id)
        if spec is None:
            raise not_found("service", service_id)
        changes = dict(settings)
        if replicas is not None:
            changes["replicas"] = replicas
        if settings:
            changes["generation"] = spec.generation + 1
        updated = ServiceSpec.model_validate({**spec.model_dump(), **changes})
        check_delays(updated.restart_delay, updated.restart_delay_max)
        key = self.keys.service(service_id)
        ops = self.etcd.ops
        done, revision = await self.etcd.txn([ops.version(key) > 0], [ops.put(key, updated.to_json())])
        if not done:
            raise not_found("service", service_id)
        await self.mirror.wait_for_revision(revision)
        log.info("service updated", service_id=service_id, replicas=updated.replicas,
                 previous_replicas=spec.replicas, generation=updated.generation, settings=sorted(settings))
        return updated

    async def delete_service(self, service_id: str) -> None:
        """Delete the desired state; the scheduler then removes the instances."""
        key = self.keys.service(service_id)
        ops = self.etcd.ops
        done, revision = await self.etcd.txn([ops.version(key) > 0], [ops.delete(key)])
        if not done:
            raise not_found("service", service_id)
        await self.mirror.wait_for_revision(revision)
        log.info("service deleted", service_id=service_id)

    async def delete_node(self, node_id: str) -> None:
        if node_id not in self.view.nodes:
            raise not_found("node", node_id)
        if node_id in self.view.alive:
            raise ApiError(409, f"node {node_id!r} is ready; stop its slave before deleting it")
        ops = self.etcd.ops
        alive_key = self.keys.alive(node_id)
        done, revision = await self.etcd.txn([ops.version(alive_key) == 0], [ops.delete(self.keys.node(node_id))])
        if not done:
            raise ApiError(409, f"node {node_id!r} came back while being deleted; stop its slave first")
        await self.mirror.wait_for_revision(revision)
        log.info("node deleted", node_id=node_id)

    async def register_node(self, name: str, node_id: str | None, log_url: str | None = None) -> NodeInfo:
        """Register a slave, or re-register it under the id it kept from an earlier run.

        A known id keeps its registration time. An id that etcd does not know (its
        data was wiped) is registered again as given, so the slave keeps its identity.
        """
        if node_id is not None:
            known = self.view.nodes.get(node_id)
            node = NodeInfo(id=node_id, name=name, log_url=log_url,
                            registered_at=known.registered_at if known else utc_now())
            _, revision = await self.etcd.txn([], [self.etcd.ops.put(self.keys.node(node_id), node.to_json())])
            await self.mirror.wait_for_revision(revision)
            log.info("node registered again", node_id=node_id, name=name, known=known is not None)
            return node

        ops = self.etcd.ops
        for _ in range(_ID_ATTEMPTS):
            node = NodeInfo(id=new_id(), name=name, log_url=log_url, registered_at=utc_now())
            key = self.keys.node(node.id)
            created, revision = await self.etcd.txn([ops.version(key) == 0], [ops.put(key, node.to_json())])
            if created:
                await self.mirror.wait_for_revision(revision)
                log.info("node registered", node_id=node.id, name=name)
                return node
        raise ApiError(409, "could not allocate a node id; retry")
