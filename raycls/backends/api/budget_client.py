"""A caller actor's side of the shared key budgets: request slots out of leases.

Every request needs a slot (a key it may use now). Slots come from leases that the
budget actor (`raycls.backends.api.ratelimit`) grants for several requests at once; when the local
leases run dry, one refill call asks for as many slots as there are requests waiting,
and settles what was sent since the last call in the same round trip.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass

from raycls.errors import BackendError
from raycls.backends.api.ratelimit import Grant, Lease, Released, Used

log = logging.getLogger(__name__)

EXPIRY_MARGIN_S = 0.3
"""Stop starting requests on a lease this long before it expires."""
FLUSH_EVERY_S = 0.5
"""Settlements are sent at least this often, so budgets are freed while nobody asks."""


class Stopped(Exception):
    """No slot will ever come: no key left (`no_keys`), `max_cost` reached, or the budget actor `failed`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Slot:
    """Permission for one request on key `key`."""

    lease_id: int
    key: int
    reserved_tokens: int


class _LocalLease:
    def __init__(self, lease: Lease):
        self.lease = lease
        self.left = lease.requests
        self.tokens_each = lease.tokens // max(1, lease.requests)


@dataclass
class _Waiter:
    tokens: int
    cost: float
    future: asyncio.Future


class BudgetClient:
    """Hands out slots to the coroutines of one caller actor; all methods run on its event loop."""

    def __init__(self, actor):
        self._actor = actor
        self._leases: list[_LocalLease] = []
        self._waiters: deque[_Waiter] = deque()
        self._refill_task: asyncio.Task | None = None
        self._flush_task: asyncio.Task | None = None
        self._used: list[Used] = []
        self._released: list[Released] = []
        self.counters: Counter[str] = Counter()
        self._blocked: dict[int, float] = {}
        self._stopped: Stopped | None = None

    # -- slots ------------------------------------------------------------------------

    async def take(self, tokens: int, cost: float = 0.0) -> Slot:
        """A slot for one request of about `tokens` tokens; waits for budget. Raises Stopped."""
        if self._stopped is not None:
            raise self._stopped
        slot = self._from_leases(tokens)
        if slot is not None:
            return slot
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append(_Waiter(tokens, cost, future))
        if self._refill_task is None or self._refill_task.done():
            self._refill_task = asyncio.create_task(self._refill())
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.create_task(self._flush_loop())
        return await future

    def done(self, slot: Slot, sent_at: float, tokens: int | None, cost: float = 0.0, ok: bool = False) -> None:
        """Report a request that was sent on `slot` and is over (answered or failed)."""
        used = Used(slot.lease_id, sent_at, time.time(), slot.reserved_tokens,
                    slot.reserved_tokens if tokens is None else tokens, cost, ok)
        self._used.append(used)

    def unused(self, slot: Slot) -> None:
        """Give back a slot whose request was never sent."""
        self._released.append(Released(slot.lease_id, 1, slot.reserved_tokens))

    def _from_leases(self, tokens: int) -> Slot | None:
        now = time.time()
        keep = []
        found = None
        for local in self._leases:
            lease = local.lease
            dead = now > lease.expires_at - EXPIRY_MARGIN_S or self._blocked.get(lease.key, 0.0) > now
            if dead or local.left <= 0:
                if local.left > 0:
                    self._released.append(Released(lease.lease_id, local.left, local.left * local.tokens_each))
                continue
            keep.append(local)
            if found is None and local.tokens_each >= tokens:
                local.left -= 1
                found = Slot(lease.lease_id, lease.key, local.tokens_each)
        self._leases = [local for local in keep if local.left > 0]
        return found

    async def _refill(self) -> None:
        """Serve the waiters from leases, asking the budget actor for more while any wait."""
        try:
            while True:
                self._serve_waiters()
                if not self._waiters:
                    return
                want = len(self._waiters)
                tokens_each = max(w.tokens for w in self._waiters)
                cost_each = max(w.cost for w in self._waiters)
                grant: Grant = await self._call("acquire", want, tokens_each, cost_each, *self._drain())
                self._block(grant.blocked)
                if grant.stop is not None:
                    self._stopped = Stopped(grant.stop, grant.message)
                    self._fail_waiters(self._stopped)
                    return
                self._leases.extend(_LocalLease(lease) for lease in grant.leases)
                if not grant.leases:
                    await asyncio.sleep(min(grant.wait_s, 5.0))
        except BackendError as exc:  # the budget actor died or a call to it failed: nothing can go on
            self._stopped = Stopped("failed", str(exc))
            self._fail_waiters(self._stopped)
        except Exception as exc:  # a bug: the rows waiting fail with it, and so does the run
            self._fail_waiters(exc)
            raise

    def _serve_waiters(self) -> None:
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():  # its row was cancelled
                self._waiters.popleft()
                continue
            slot = self._from_leases(waiter.tokens)
            if slot is None:
                return
            self._waiters.popleft()
            waiter.future.set_result(slot)

    def _fail_waiters(self, exc: Exception) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_exception(exc)

    # -- what the server said -------------------------------------------------------------

    async def cooldown(self, key: int, seconds: float | None) -> None:
        """Pause `key` everywhere (a 429, or the server says it has nothing left)."""
        self._blocked[key] = max(self._blocked.get(key, 0.0), time.time() + (seconds if seconds is not None else 1.0))
        await self._call("cooldown", key, seconds)

    async def revoke(self, key: int, status: int) -> None:
        """Take `key` out of rotation everywhere (401/403)."""
        self._blocked[key] = math.inf
        await self._call("revoke", key, status)

    def _block(self, blocked: dict[int, float]) -> None:
        now = time.time()
        self._blocked = {k: v for k, v in self._blocked.items() if v > now}
        for key, until in blocked.items():
            self._blocked[key] = max(self._blocked.get(key, 0.0), until)

    # -- settling -------------------------------------------------------------------------

    def _drain(self) -> tuple[list[Used], list[Released], dict[str, int]]:
        used, released, counters = self._used, self._released, dict(self.counters)
        self._used, self._released = [], []
        self.counters.clear()
        return used, released, counters

    async def flush(self) -> None:
        """Send what is pending now (end of a batch: the counters must not be lost)."""
        if self._used or self._released or self.counters:
            await self._call("report", *self._drain())

    async def _flush_loop(self) -> None:
        while self._stopped is None:
            await asyncio.sleep(FLUSH_EVERY_S)
            try:
                await self.flush()
            except Exception:  # a failed flush is reported by the next acquire
                return

    async def _call(self, method: str, *args):
        try:
            return await getattr(self._actor, method).remote(*args)
        except Exception as exc:
            raise BackendError(f"the API budget actor is gone ({type(exc).__name__}): cannot keep to the rate limits, stopping") from None

    def close(self) -> None:
        for task in (self._refill_task, self._flush_task):
            if task is not None:
                task.cancel()
