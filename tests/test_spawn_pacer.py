"""The spawn pacer lets timers run during a burst of spawns."""

import asyncio
import time

from gdpm.slave.instance import SpawnPacer


async def test_timer_runs_during_burst():
    """200 spawns of 2 ms each take 0.4 s; a 20 ms timer must not wait for all of them."""
    pacer = SpawnPacer(budget=0.05)
    loop = asyncio.get_running_loop()
    done: list[float] = []
    fired: list[float] = []

    async def spawn() -> None:
        await pacer.turn()
        busy_until = time.monotonic() + 0.002
        while time.monotonic() < busy_until:
            pass
        done.append(time.monotonic())

    started = time.monotonic()
    loop.call_later(0.02, lambda: fired.append(time.monotonic()))
    await asyncio.gather(*(spawn() for _ in range(200)))

    assert len(done) == 200
    assert fired, "the timer never ran"
    assert fired[0] - started < 0.2
    assert sum(1 for moment in done if moment > fired[0]) > 50


async def test_no_wait_below_budget():
    pacer = SpawnPacer(budget=10.0)
    started = time.monotonic()
    for _ in range(1000):
        await pacer.turn()
    assert time.monotonic() - started < 0.5
