"""The documents stored in etcd, shared by the master and the slaves.

Each model is stored as JSON under the key that :mod:`gdpm.common.keys` names for it.
Readers ignore fields they do not know, so a newer writer does not break an older
reader.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class InstanceState(str, enum.Enum):
    """The states an instance goes through, as reported by the slave that runs it.

    ``pending`` and ``lost`` are never reported by a slave: the master shows
    ``pending`` for an instance not placed or not yet reported, and ``lost`` for an
    instance placed on a node that is down.
    """

    PENDING = "pending"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    EXITED = "exited"
    LOST = "lost"


class NodeState(str, enum.Enum):
    READY = "ready"
    DOWN = "down"


class _Document(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class ServiceSpec(_Document):
    """The desired state of a service."""

    id: str
    command: str
    replicas: int
    created_at: datetime


class NodeInfo(_Document):
    """A node as registered by the master."""

    id: str
    name: str
    registered_at: datetime
    # Base URL of the slave's log server, such as http://127.0.0.1:41234.
    log_url: str | None = None


class InstanceRecord(_Document):
    """One replica slot of a service and its placement (``node_id`` None: pending)."""

    id: str
    service_id: str
    index: int
    node_id: str | None = None
    created_at: datetime


class Assignment(_Document):
    """What a slave must run for one instance: everything it needs, in one key."""

    instance_id: str
    service_id: str
    index: int
    command: str


class InstanceStatus(_Document):
    """The actual state of an instance, as its slave reports it."""

    instance_id: str
    service_id: str
    node_id: str
    state: InstanceState
    pid: int | None = None
    exit_code: int | None = None
    # The signal number that ended the last run, when a signal ended it.
    exit_signal: int | None = None
    restarts: int = 0
    started_at: datetime | None = None
    exited_at: datetime | None = None


def instance_id_for(service_id: str, index: int) -> str:
    """Return the id of a service's replica slot.

    Deriving the id from the slot keeps one key per slot, so two placements of the
    same slot cannot both exist.
    """
    return f"{service_id}-{index}"
