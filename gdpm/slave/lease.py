"""The node's etcd lease, and self-fencing when the lease cannot be renewed.

The timing argument. etcd expires a lease TTL seconds after the last refresh *it
received*; the slave measures from the moment it *sent* that refresh, which is
earlier, so its own deadline is never later than etcd's. If no refresh succeeds for
``TTL - FENCE_MARGIN`` seconds, the slave SIGKILLs every instance (it fences itself),
at least FENCE_MARGIN seconds before etcd can expire the lease. The master moves a
node's instances only after the lease has expired and etcd has deleted the node's
``alive`` key. So the old copies are dead before the new ones are placed, as long as
the slave's event loop runs and the clocks of the slave and etcd advance at about the
same rate. etcd also extends every lease when a new leader is elected, which only
widens the margin.

A fenced slave starts nothing until etcd is reachable again. It keeps its old lease if
that is still alive, because the outage was shorter than the TTL as etcd measured it.
Otherwise it grants a new one. Either way it then re-reads its assignments from etcd.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aetcd
import aetcd.exceptions
import structlog

from gdpm.common.etcd import Etcd
from gdpm.common.keys import KeyLayout

log = structlog.get_logger("gdpm.slave.lease")

# Seconds before the lease could expire at which the slave kills its instances.
# SIGKILL takes effect in well under a millisecond; the rest is slack for a busy event
# loop and for clock-rate differences.
FENCE_MARGIN = 1.0

# Refreshes per TTL: several, so that one lost request does not bring the node close
# to its fence deadline.
REFRESHES_PER_TTL = 8


class LeaseKeeper:
    def __init__(
        self,
        etcd: Etcd,
        keys: KeyLayout,
        node_id: str,
        name: str,
        ttl: int,
        *,
        on_new_lease: Callable[[int], None],
        on_fence: Callable[[str], None],
        on_recover: Callable[[], Awaitable[None]],
    ) -> None:
        self.etcd = etcd
        self.keys = keys
        self.node_id = node_id
        self.name = name
        self.ttl = ttl
        self.on_new_lease = on_new_lease
        self.on_fence = on_fence
        self.on_recover = on_recover
        self.lease: aetcd.Lease | None = None
        self.fenced = False
        # time.monotonic() at which the last successful refresh (or the grant) was sent.
        self.last_renewal_sent = 0.0

    @property
    def fence_deadline(self) -> float:
        return self.last_renewal_sent + self.ttl - FENCE_MARGIN

    async def grant(self) -> None:
        """Grant a new lease and tie the node's alive key to it."""
        sent = time.monotonic()
        lease = await self.etcd.client.lease(self.ttl)
        await self.etcd.client.put(self.keys.alive(self.node_id), self.name.encode(), lease=lease)
        self.lease = lease
        self.last_renewal_sent = sent
        self.on_new_lease(lease.id)
        log.info("lease granted", lease_id=lease.id, ttl=self.ttl)

    async def revoke(self) -> None:
        if self.lease is not None:
            await self.etcd.client.revoke_lease(self.lease.id)

    async def run(self) -> None:
        """Refresh the lease until cancelled; fence and recover as the module describes."""
        interval = max(self.ttl / REFRESHES_PER_TTL, 0.2)
        failures = 0
        while True:
            if not self.fenced and time.monotonic() >= self.fence_deadline:
                self._fence(f"no lease renewal for {self.ttl - FENCE_MARGIN:g} s")
            try:
                await self._refresh_once(interval)
                failures = 0
            except (aetcd.exceptions.ClientError, TimeoutError) as error:
                failures += 1
                # One line per failure would flood the log during a long outage.
                if failures == 1 or failures % 20 == 0:
                    log.warning("lease refresh failed", error=str(error) or type(error).__name__,
                                failures=failures, fenced=self.fenced)
            await asyncio.sleep(self._pause(interval))

    async def _refresh_once(self, interval: float) -> None:
        sent = time.monotonic()
        # A refresh that hangs (a partition drops packets) must not hold the loop past
        # the fence deadline.
        timeout = max(min(2 * interval, self.fence_deadline - sent), 0.2) if not self.fenced else 2 * interval
        async with asyncio.timeout(timeout):
            reply = await self.lease.refresh()
        if reply is not None and reply.TTL > 0:
            self.last_renewal_sent = sent
            if self.fenced:
                log.info("etcd reachable again and the lease is still alive", lease_id=self.lease.id)
                await self._recover()
            return

        if not self.fenced:
            self._fence("the lease expired")
        log.warning("lease expired, granting a new one", lease_id=self.lease.id)
        async with asyncio.timeout(2 * interval + 2):
            await self.grant()
        await self._recover()

    def _pause(self, interval: float) -> float:
        if self.fenced:
            return interval
        return max(min(interval, self.fence_deadline - time.monotonic()), 0.0)

    def _fence(self, reason: str) -> None:
        self.fenced = True
        log.error("fencing: killing every instance before the lease can expire", reason=reason,
                  lease_id=self.lease.id if self.lease else None)
        self.on_fence(reason)

    async def _recover(self) -> None:
        await self.on_recover()
        self.fenced = False
        log.info("recovered from fencing: assignments re-read from etcd")
