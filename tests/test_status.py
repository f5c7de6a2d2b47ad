"""Unit tests of the slave's status writer helpers: merging bursts of events."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from gdpm.common.models import Event
from gdpm.slave.status import MAX_EVENTS_PER_KIND, aggregate_events

START = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)


def event(index: int, event_type: str = "started", service_id: str = "5e7a1c00") -> tuple[str, Event]:
    return service_id, Event(time=START + timedelta(milliseconds=index), type=event_type,
                             message=f"started with pid {1000 + index}", instance_id=f"{service_id}-{index}",
                             node_id="node-1")


def test_few_events_kept_as_they_are() -> None:
    events = [event(index) for index in range(MAX_EVENTS_PER_KIND)] + [event(9, "exited")]
    assert aggregate_events(events) == events


def test_burst_merged_in_place_of_first() -> None:
    events = [event(0, "backoff"), *(event(index) for index in range(1, 1001)), event(1001, "exited"),
              event(1002, "started", service_id="0ther000")]

    merged = aggregate_events(events)

    assert [(service_id, item.type) for service_id, item in merged] == [
        ("5e7a1c00", "backoff"), ("5e7a1c00", "started"), ("5e7a1c00", "exited"), ("0ther000", "started")]
    burst = merged[1][1]
    assert burst.message == ("1000 instances started: 5e7a1c00-1: started with pid 1001; "
                             "5e7a1c00-2: started with pid 1002; 5e7a1c00-3: started with pid 1003; and 997 more")
    assert burst.instance_id is None
    assert burst.node_id == "node-1"
    assert burst.time == START + timedelta(milliseconds=1000)


def test_merged_message_reads_as_verb() -> None:
    events = [event(index, "backoff") for index in range(5)]
    [(_, merged)] = aggregate_events(events)
    assert merged.message.startswith("5 instances backing off: 5e7a1c00-0: ")
