"""The documents stored in etcd, shared by the master and the slaves.

Each model is stored as JSON under the key that :mod:`gdpm.common.keys` names for it.
Readers ignore fields they do not know, so a newer writer does not break an older
reader.
"""

from __future__ import annotations

import enum
import secrets
import time
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
    BACKOFF = "backoff"
    FAILED = "failed"
    LOST = "lost"


class RestartPolicy(str, enum.Enum):
    """When a slave starts an instance again after it exited on its own."""

    ALWAYS = "always"
    ON_FAILURE = "on-failure"
    NEVER = "never"


class NodeState(str, enum.Enum):
    READY = "ready"
    DOWN = "down"


class _Document(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    def to_json(self) -> bytes:
        return self.model_dump_json().encode()


class RunSpec(_Document):
    """How to run and supervise each instance of a service."""

    command: str
    env: dict[str, str] = {}
    # Absolute working directory; None runs in the slave's own.
    cwd: str | None = None
    restart: RestartPolicy = RestartPolicy.ALWAYS
    # Seconds before the first restart; the delay doubles with each quick failure
    # up to restart_delay_max. A run of min_uptime seconds or more is stable: it
    # resets the delay and the count of quick failures.
    restart_delay: float = 1.0
    restart_delay_max: float = 60.0
    min_uptime: float = 10.0
    # Quick failures in a row allowed before the instance is failed; None: no limit.
    max_restarts: int | None = 10
    stop_signal: str = "SIGTERM"
    stop_timeout: float = 10.0

    def run_spec(self) -> RunSpec:
        """Return just the run settings, to compare two versions of them."""
        return RunSpec.model_validate(self.model_dump(include=set(RunSpec.model_fields)))


class ServiceSpec(RunSpec):
    """The desired state of a service."""

    id: str
    replicas: int
    created_at: datetime
    # Incremented by every update of the run settings; instances whose assignment
    # carries an older generation get the new settings.
    generation: int = 1


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
    # The service generation of the assignment written for this record.
    generation: int = 1


class Assignment(RunSpec):
    """The instructions for one instance on one slave: its ids and run settings, in one key."""

    instance_id: str
    service_id: str
    index: int
    generation: int = 1


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
    # When the next restart is due, while in backoff.
    restart_at: datetime | None = None


class Event(_Document):
    """One entry in a service's event history."""

    time: datetime
    type: str
    message: str
    instance_id: str | None = None
    node_id: str | None = None


def instance_id_for(service_id: str, index: int) -> str:
    """Return the id of a service's replica slot.

    Deriving the id from the slot keeps one key per slot, so two placements of the
    same slot cannot both exist.
    """
    return f"{service_id}-{index}"


def new_event_id() -> str:
    """Return an event id that sorts by creation time: nanoseconds, then a random suffix."""
    return f"{time.time_ns():020d}-{secrets.token_hex(3)}"
