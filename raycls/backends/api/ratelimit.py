"""Per-key RPM/TPM budgets shared by every caller actor in the cluster.

One small Ray actor (`BudgetActor`, wrapping `KeyBudgets`) owns the truth about every
key: what it may still send, which keys are cooling down after a 429, which were
revoked. Callers never ask per request: they take *leases* (N requests and T tokens on
one key, valid for a couple of seconds) and spend them locally, reporting what they
actually sent when they come back for more. So the actor sees a few calls per second
whatever the request rate.

Why a sliding-window log and not a token bucket: providers (and our fake server)
count requests over any 60-second window. A token bucket of capacity C refilled at
limit/60 admits up to C + limit in one window, so it cannot promise "never over the
limit". The log can: a grant is made only if every request that could land in the
same window — settled ones by when they were sent, unsettled leases always — fits.
A gentle pacer (GCRA) on top spreads the grants evenly, so the log rarely has to stop
anything and throughput is steady instead of a burst-then-stall saw.

Timestamps: a request is logged at `min(done_at, sent_at + ARRIVAL_SLACK_S)`, which is
no earlier than the moment the server counted it (arrival happens after sending and
before the answer; a request that waited longer than the slack before reaching the
server is the one case not covered). Unsettled leases count in full until settled, or
until they cannot matter any more (expiry + request timeout + window).
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping

log = logging.getLogger(__name__)

LEASE_TTL_S = 2.0
"""A lease's slots must be *sent* within this many seconds of the grant."""
BURST_S = 1.0
"""The pacer lets a key run ahead of its even rate by this much time's worth of budget."""
ARRIVAL_SLACK_S = 1.0
"""Longest assumed delay between sending a request and the server counting it."""
SKEW_S = 0.2
"""Allowance for clock differences between the caller's and the actor's machines."""
TPM_HEADROOM = 0.98
"""Share of `tpm` granted: token counts are estimates until the server reports usage."""


@dataclass(frozen=True)
class Lease:
    """Permission to send `requests` requests using up to `tokens` tokens on key `key`."""

    lease_id: int
    key: int
    requests: int
    tokens: int
    expires_at: float
    """Wall-clock (`time.time()`) deadline for *starting* a request on this lease."""


@dataclass(frozen=True)
class Used:
    """One request sent on a lease, reported back when it is over."""

    lease_id: int
    sent_at: float
    done_at: float
    reserved_tokens: int
    """What the caller set aside for it from the lease."""
    tokens: int
    """Tokens it used (the server's usage; the reservation when the server did not say)."""
    cost_usd: float = 0.0
    ok: bool = False
    """The server answered it (not a 429 or an error): resets the key's 429 streak."""


@dataclass(frozen=True)
class Released:
    """Slots of a lease that were never used and never will be."""

    lease_id: int
    requests: int
    tokens: int


@dataclass(frozen=True)
class Grant:
    """The answer to `acquire`: leases, or a wait, or a stop; plus which keys to avoid."""

    leases: tuple[Lease, ...] = ()
    wait_s: float = 0.0
    stop: Literal["no_keys", "max_cost"] | None = None
    message: str = ""
    blocked: Mapping[int, float] = field(default_factory=dict)
    """Keys callers must not use now: index → until (wall clock; `inf` for revoked)."""


@dataclass
class _Key:
    label: str
    requests: list[tuple[float, int]] = field(default_factory=list)
    """Settled requests as (logged time, tokens), sorted by time."""
    tokens_in_log: int = 0
    open_leases: dict[int, list] = field(default_factory=dict)
    """lease_id → [requests left, tokens left, expires_at] for leases not yet settled."""
    tat_requests: float = 0.0
    tat_tokens: float = 0.0
    cooldown_until: float = 0.0
    strikes: int = 0
    """429s in a row without a success, for backoff when the server gives no delay."""
    revoked: str | None = None
    sent: int = 0


class KeyBudgets:
    """The budget logic, without Ray, so it can be tested with a fake clock."""

    def __init__(
        self,
        labels: list[str],
        rpm: int,
        tpm: int,
        window_s: float = 60.0,
        request_timeout_s: float = 60.0,
        max_cost: float | None = None,
        clock: Callable[[], float] = time.time,
    ):
        if not labels:
            raise ValueError("at least one key is needed")
        self.keys = [_Key(label) for label in labels]
        self.rpm, self.tpm = rpm, max(1, int(tpm * TPM_HEADROOM))
        self.window = window_s
        self.span = window_s + SKEW_S
        """How far back the log looks when counting a window."""
        self.stale_after = LEASE_TTL_S + request_timeout_s + ARRIVAL_SLACK_S
        self.max_cost = max_cost
        self.spent_usd = 0.0
        self.reserved_usd = 0.0
        self.clock = clock
        self._ids = itertools.count(1)
        self._lease_cost: dict[int, float] = {}
        self.counters: dict[str, int] = {}

    # -- granting ---------------------------------------------------------------------

    def acquire(self, want: int, tokens_each: int, cost_each: float = 0.0) -> Grant:
        """Lease up to `want` requests of `tokens_each` tokens, spread over keys with budget."""
        now = self.clock()
        live = [i for i, k in enumerate(self.keys) if k.revoked is None]
        if not live:
            return Grant(stop="no_keys", message=self._no_keys_message(), blocked=self._blocked(now))
        # A request bigger than a whole window's tokens can never fit; callers fail such rows
        # before asking. Clamped here so that a stray one still goes through, alone.
        tokens_each = max(1, min(tokens_each, self.tpm))
        if self.max_cost is not None and cost_each > 0:
            affordable = math.floor((self.max_cost - self.spent_usd - self.reserved_usd) / cost_each + 1e-9)
            if affordable <= 0:
                if self.reserved_usd > 1e-12:
                    return Grant(wait_s=0.25, blocked=self._blocked(now))  # in-flight work may cost less
                return Grant(stop="max_cost", message=f"backend.max_cost ${self.max_cost:g} reached (spent ${self.spent_usd:.4f})")
            want = min(want, affordable)
        leases, soonest = [], math.inf
        # Most headroom first, and an even share each, so load spreads over the keys.
        order = sorted(live, key=lambda i: self._headroom(i, now), reverse=True)
        for position, i in enumerate(order):
            if want <= 0:
                break
            share = math.ceil(want / (len(order) - position))
            n, wait = self._allowance(i, now, share, tokens_each)
            if n <= 0:
                soonest = min(soonest, wait)
                continue
            leases.append(self._grant(i, now, n, tokens_each, cost_each))
            want -= n
        if leases:
            return Grant(tuple(leases), blocked=self._blocked(now))
        return Grant(wait_s=max(0.005, soonest if math.isfinite(soonest) else 0.25), blocked=self._blocked(now))

    def _grant(self, i: int, now: float, n: int, tokens_each: int, cost_each: float) -> Lease:
        key = self.keys[i]
        lease = Lease(next(self._ids), i, n, n * tokens_each, now + LEASE_TTL_S)
        key.open_leases[lease.lease_id] = [n, n * tokens_each, lease.expires_at]
        key.tat_requests = max(key.tat_requests, now) + n * self.window / self.rpm
        key.tat_tokens = max(key.tat_tokens, now) + n * tokens_each * self.window / self.tpm
        self._lease_cost[lease.lease_id] = cost_each
        self.reserved_usd += n * cost_each
        key.sent += n
        return lease

    def _allowance(self, i: int, now: float, want: int, tokens_each: int) -> tuple[int, float]:
        """How many requests key `i` may be granted now, or how long until it may grant one."""
        key = self.keys[i]
        if key.cooldown_until > now:
            return 0, key.cooldown_until - now
        self._expire(key, now)
        used_req, used_tok = self._window_use(key, now)
        room_req = self.rpm - used_req
        room_tok = self.tpm - used_tok
        # Pacer: a key may be at most BURST_S ahead of its even rate; an idle key may always send one.
        req_rate, tok_rate = self.rpm / self.window, self.tpm / self.window
        pace_req = math.floor((now + BURST_S - max(key.tat_requests, now)) * req_rate + 1e-9)
        pace_tok = math.floor((now + BURST_S - max(key.tat_tokens, now)) * tok_rate / tokens_each + 1e-9)
        if key.tat_requests <= now:
            pace_req = max(pace_req, 1)
        if key.tat_tokens <= now:
            pace_tok = max(pace_tok, 1)
        n = min(want, room_req, room_tok // tokens_each, pace_req, pace_tok)
        if n > 0:
            return n, 0.0
        waits = [
            self._log_wait(key, now, 1 + used_req - self.rpm, by_tokens=False) if room_req < 1 else 0.0,
            self._log_wait(key, now, tokens_each + used_tok - self.tpm, by_tokens=True) if room_tok < tokens_each else 0.0,
            max(0.0, min(key.tat_requests, key.tat_requests + 1 / req_rate - BURST_S) - now) if pace_req < 1 else 0.0,
            max(0.0, min(key.tat_tokens, key.tat_tokens + tokens_each / tok_rate - BURST_S) - now) if pace_tok < 1 else 0.0,
        ]
        return 0, max(waits)

    def _window_use(self, key: _Key, now: float) -> tuple[int, int]:
        """Requests and tokens that count against the window ending now (open leases in full)."""
        cutoff = now - self.span
        drop = bisect.bisect_right(key.requests, (cutoff, math.inf))
        if drop:
            key.tokens_in_log -= sum(t for _, t in key.requests[:drop])
            del key.requests[:drop]
        open_req = sum(lease[0] for lease in key.open_leases.values())
        open_tok = sum(lease[1] for lease in key.open_leases.values())
        return len(key.requests) + open_req, key.tokens_in_log + open_tok

    def _log_wait(self, key: _Key, now: float, excess: int, by_tokens: bool) -> float:
        """Seconds until `excess` requests (or tokens) of the settled log leave the window."""
        freed = 0
        for ts, tokens in key.requests:
            freed += tokens if by_tokens else 1
            if freed >= excess:
                return max(0.0, ts + self.span - now)
        return 0.25  # the rest is held by open leases: they settle soon

    def _expire(self, key: _Key, now: float) -> None:
        """Forget leases whose holder vanished, once nothing they could have sent still counts."""
        for lease_id, (left, _, expires_at) in list(key.open_leases.items()):
            if now > expires_at + self.stale_after + self.span:
                del key.open_leases[lease_id]
                self._unreserve(lease_id, left)

    def _headroom(self, i: int, now: float) -> float:
        key = self.keys[i]
        if key.cooldown_until > now:
            return -math.inf
        return -max(key.tat_requests - now, key.tat_tokens - now)

    # -- settling ---------------------------------------------------------------------

    def settle(self, used: list[Used], released: list[Released]) -> None:
        """Replace open lease reservations with what was really sent (or give them back)."""
        for u in used:
            key = self._lease_key(u.lease_id)
            if key is None:
                continue
            slot = key.open_leases[u.lease_id]
            slot[0] -= 1
            slot[1] -= u.reserved_tokens
            logged_at = min(u.done_at, u.sent_at + ARRIVAL_SLACK_S)
            bisect.insort(key.requests, (logged_at, u.tokens))
            key.tokens_in_log += u.tokens
            # The pacer charged the reservation; give back what the request did not use.
            key.tat_tokens -= max(0, u.reserved_tokens - u.tokens) * self.window / self.tpm
            self.spent_usd += u.cost_usd
            if u.ok:
                key.strikes = 0
            self._unreserve(u.lease_id, 1)
            self._close_if_done(key, u.lease_id)
        for r in released:
            key = self._lease_key(r.lease_id)
            if key is None:
                continue
            slot = key.open_leases[r.lease_id]
            slot[0] -= r.requests
            slot[1] -= r.tokens
            key.sent -= r.requests
            key.tat_requests -= r.requests * self.window / self.rpm
            key.tat_tokens -= r.tokens * self.window / self.tpm
            self._unreserve(r.lease_id, r.requests)
            self._close_if_done(key, r.lease_id)

    def _lease_key(self, lease_id: int) -> _Key | None:
        for key in self.keys:
            if lease_id in key.open_leases:
                return key
        return None

    def _close_if_done(self, key: _Key, lease_id: int) -> None:
        if key.open_leases[lease_id][0] <= 0:
            del key.open_leases[lease_id]
            self._lease_cost.pop(lease_id, None)

    def _unreserve(self, lease_id: int, requests: int) -> None:
        self.reserved_usd = max(0.0, self.reserved_usd - requests * self._lease_cost.get(lease_id, 0.0))

    # -- what the server told us ------------------------------------------------------

    def cooldown(self, i: int, seconds: float | None) -> None:
        """A 429 (or `remaining: 0`): no grants on key `i` for `seconds`, or a growing pause."""
        key, now = self.keys[i], self.clock()
        if seconds is None:
            key.strikes += 1
            seconds = min(60.0, 2.0 ** (key.strikes - 1))
        until = now + max(0.0, seconds)
        key.cooldown_until = max(key.cooldown_until, until)
        key.tat_requests = max(key.tat_requests, until)
        key.tat_tokens = max(key.tat_tokens, until)

    def revoke(self, i: int, status: int) -> bool:
        """Take key `i` out of rotation for the rest of the run; True the first time."""
        key = self.keys[i]
        if key.revoked is not None:
            return False
        key.revoked = f"HTTP {status}"
        log.warning("API %s was rejected (HTTP %d): removed from rotation for the rest of this run", key.label, status)
        return True

    def count(self, counters: Mapping[str, int]) -> None:
        for name, n in counters.items():
            self.counters[name] = self.counters.get(name, 0) + n

    def _blocked(self, now: float) -> dict[int, float]:
        return {
            i: (math.inf if k.revoked else k.cooldown_until)
            for i, k in enumerate(self.keys)
            if k.revoked or k.cooldown_until > now
        }

    def _no_keys_message(self) -> str:
        gone = ", ".join(f"{k.label} ({k.revoked})" for k in self.keys)
        return f"no usable API key left: every key was rejected by the server: {gone}"

    def stats(self) -> dict:
        """Run totals for `metrics.json`; keys appear by label only."""
        live = any(k.revoked is None for k in self.keys)
        return {
            "stopped": None if live else self._no_keys_message(),
            "requests_per_key": {k.label: k.sent for k in self.keys},
            "keys_revoked": [k.label for k in self.keys if k.revoked],
            "cost_usd_reported": round(self.spent_usd, 6),
            **{name: n for name, n in sorted(self.counters.items())},
        }


# -- rate-limit headers --------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | None) -> float | None:
    """OpenAI's reset format (`"20ms"`, `"1.5s"`, `"6m0s"`) or plain seconds, in seconds."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + u for n, u in parts) != value.replace(" ", ""):
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """How long a 429 asks us to wait: `retry-after-ms`, `retry-after`, then `x-ratelimit-reset-*`."""
    lower = {k.lower(): v for k, v in headers.items()}
    if "retry-after-ms" in lower:
        try:
            return max(0.0, float(lower["retry-after-ms"]) / 1000)
        except ValueError:
            pass
    if "retry-after" in lower:
        seconds = parse_duration(lower["retry-after"])
        if seconds is None:
            seconds = _http_date_delay(lower["retry-after"])
        if seconds is not None:
            return seconds
    resets = [parse_duration(lower.get(h)) for h in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")]
    resets = [r for r in resets if r is not None]
    return max(resets) if resets else None


def exhausted_for_s(headers: Mapping[str, str], next_tokens: int) -> float | None:
    """On a success: how long to pause a key the server says has nothing left, else None."""
    lower = {k.lower(): v for k, v in headers.items()}
    waits = []
    if _int(lower.get("x-ratelimit-remaining-requests")) == 0:
        waits.append(parse_duration(lower.get("x-ratelimit-reset-requests")))
    remaining_tokens = _int(lower.get("x-ratelimit-remaining-tokens"))
    if remaining_tokens is not None and remaining_tokens < next_tokens:
        waits.append(parse_duration(lower.get("x-ratelimit-reset-tokens")))
    waits = [w for w in waits if w is not None]
    return max(waits) if waits else None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _http_date_delay(value: str) -> float | None:
    from email.utils import parsedate_to_datetime

    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


# -- the shared actor ----------------------------------------------------------------------


class BudgetService:
    """`KeyBudgets` behind one Ray actor: every caller in the cluster asks this one.

    Each call settles what the caller has finished since its last call, then answers,
    so settling costs no extra round trip.
    """

    def __init__(self, labels: list[str], rpm: int, tpm: int, window_s: float, request_timeout_s: float, max_cost: float | None):
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        self.budgets = KeyBudgets(labels, rpm, tpm, window_s, request_timeout_s, max_cost)

    def acquire(
        self, want: int, tokens_each: int, cost_each: float,
        used: list[Used], released: list[Released], counters: dict[str, int],
    ) -> Grant:
        self.report(used, released, counters)
        return self.budgets.acquire(want, tokens_each, cost_each)

    def report(self, used: list[Used], released: list[Released], counters: dict[str, int]) -> None:
        self.budgets.settle(used, released)
        self.budgets.count(counters)

    def cooldown(self, key: int, seconds: float | None) -> None:
        self.budgets.cooldown(key, seconds)

    def revoke(self, key: int, status: int) -> bool:
        return self.budgets.revoke(key, status)

    def stats(self) -> dict:
        return self.budgets.stats()


def start_budget_actor(name: str, labels: list[str], rpm: int, tpm: int, window_s: float,
                       request_timeout_s: float, max_cost: float | None):
    """The run's budget actor (created once; a second call with the same name gets it).

    No restarts: a restarted actor would have forgotten what was sent, and could then
    let the keys go over their limits. Callers turn its death into a BackendError.
    So it is pinned to the driver's node (`raycls.backends.placement`): on a cluster, losing
    a worker node then costs the callers on it (Ray Data restarts them) but never the budgets.
    """
    import ray

    from raycls.backends.placement import on_driver_node

    actor_cls = ray.remote(num_cpus=0, max_restarts=0, max_concurrency=1)(BudgetService)
    return actor_cls.options(name=name, get_if_exists=True, scheduling_strategy=on_driver_node()).remote(
        labels, rpm, tpm, window_s, request_timeout_s, max_cost)
