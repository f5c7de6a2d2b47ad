"""The spawn queue runs a burst of spawns in order and lets timers run in between."""

import asyncio
import time

import pytest

from gdpm.slave.instance import SpawnQueue


def busy(seconds: float) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass


async def test_timer_runs_during_burst():
    """200 spawns of 2 ms each take 0.4 s; a 20 ms timer must not wait for all of them."""
    queue = SpawnQueue(budget=0.05)
    loop = asyncio.get_running_loop()
    done: list[float] = []
    fired: list[float] = []

    def spawn() -> None:
        busy(0.002)
        done.append(time.monotonic())

    loop.call_later(0.02, lambda: fired.append(time.monotonic()))
    await asyncio.gather(*(queue.run(spawn) for _ in range(200)))

    assert len(done) == 200
    assert fired, "the timer never ran"
    assert sum(1 for moment in done if moment > fired[0]) > 50


async def test_spawns_in_order_with_results_and_errors():
    queue = SpawnQueue(budget=0.001)
    order: list[int] = []

    def spawn(number: int) -> int:
        order.append(number)
        busy(0.0002)
        if number == 7:
            raise OSError(f"spawn {number} failed")
        return number * 10

    results = await asyncio.gather(*(queue.run(lambda number=number: spawn(number)) for number in range(50)),
                                   return_exceptions=True)

    assert order == list(range(50))
    assert [result for result in results if not isinstance(result, OSError)] == [
        number * 10 for number in range(50) if number != 7]
    assert str(results[7]) == "spawn 7 failed"


async def test_cancelled_caller_is_skipped():
    queue = SpawnQueue(budget=10.0)
    called: list[str] = []
    first = asyncio.ensure_future(queue.run(lambda: called.append("first")))
    second = asyncio.ensure_future(queue.run(lambda: called.append("second")))
    await asyncio.sleep(0)  # Both are queued; the queue's task has not run yet.
    second.cancel()

    await first
    with pytest.raises(asyncio.CancelledError):
        await second
    assert called == ["first"]
