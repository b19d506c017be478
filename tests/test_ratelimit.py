"""The shared key budgets, without Ray: leases, windows, pacing, cooldowns, revocation, cost.

A fake clock drives `KeyBudgets`, so the tests are exact and fast.
"""

from __future__ import annotations

import math
import random

import pytest

from raycls.backends.api.ratelimit import (
    TPM_HEADROOM,
    KeyBudgets,
    Released,
    Used,
    exhausted_for_s,
    parse_duration,
    retry_after_s,
)


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def budgets(n_keys: int = 1, rpm: int = 600, tpm: int = 10**9, clock: Clock | None = None, **kw) -> KeyBudgets:
    return KeyBudgets([f"key#{i}" for i in range(n_keys)], rpm, tpm, clock=clock or Clock(), **kw)


def use_all(b: KeyBudgets, clock: Clock, leases, latency: float = 0.1) -> None:
    """Send every slot of `leases` now and settle them as answered after `latency`."""
    used = [
        Used(lease.lease_id, clock.now, clock.now + latency, lease.tokens // lease.requests, lease.tokens // lease.requests)
        for lease in leases
        for _ in range(lease.requests)
    ]
    b.settle(used, [])


def test_a_lease_covers_several_requests_in_one_call():
    grant = budgets(rpm=600).acquire(want=8, tokens_each=10)
    assert sum(lease.requests for lease in grant.leases) == 8


def test_pacing_caps_a_lease_at_one_second_of_the_key_rate():
    grant = budgets(rpm=600).acquire(want=1000, tokens_each=10)
    assert sum(lease.requests for lease in grant.leases) == 10  # 600/min = 10/s


def test_leases_spread_over_keys():
    grant = budgets(n_keys=3, rpm=60).acquire(want=3, tokens_each=10)
    assert sorted(lease.key for lease in grant.leases) == [0, 1, 2]


def test_no_more_than_rpm_in_a_window_even_when_leases_are_not_settled():
    clock = Clock()
    b = budgets(rpm=5, clock=clock)
    granted = 0
    for _ in range(100):
        granted += sum(lease.requests for lease in b.acquire(1, 10).leases)
        clock.now += 1.0
    assert granted == 5  # unsettled leases count until settled (or long stale)


def test_leases_of_a_vanished_caller_are_forgotten_once_they_cannot_matter():
    clock = Clock()
    b = budgets(rpm=5, clock=clock, request_timeout_s=10)
    b.acquire(5, 10)
    clock.now += 2 + 10 + 1 + 60.2 + 1  # expiry + timeout + arrival slack + window
    assert sum(lease.requests for lease in b.acquire(5, 10).leases) >= 1


def test_settled_requests_leave_the_window_after_it_passes():
    clock = Clock()
    b = budgets(rpm=5, clock=clock)
    first = []
    for _ in range(10):
        first += b.acquire(5, 10).leases
        clock.now += 1.0
    use_all(b, clock, first)
    assert b.acquire(1, 10).leases == ()
    clock.now += 61.0
    assert sum(lease.requests for lease in b.acquire(1, 10).leases) == 1


def test_wait_says_when_the_oldest_request_leaves_the_window():
    clock = Clock()
    b = budgets(rpm=2, clock=clock)
    leases = b.acquire(1, 10).leases
    use_all(b, clock, leases, latency=0.0)
    clock.now += 30.0
    use_all(b, clock, b.acquire(1, 10).leases, latency=0.0)
    grant = b.acquire(1, 10)
    assert not grant.leases and grant.wait_s == pytest.approx(30.0 + 0.2, abs=0.05)


def test_released_slots_go_back_to_the_budget():
    clock = Clock()
    b = budgets(rpm=3, clock=clock)
    leases = []
    for _ in range(5):
        leases += b.acquire(3, 10).leases
        clock.now += 20.0
    b.settle([], [Released(lease.lease_id, lease.requests, lease.tokens) for lease in leases])
    assert sum(lease.requests for lease in b.acquire(1, 10).leases) == 1


def test_tokens_per_minute_limit_grants_what_fits_in_the_window_and_no_more():
    clock = Clock()
    b = budgets(rpm=1000, tpm=100, clock=clock)  # 98 tokens granted per window: three 30-token requests
    granted = []
    for _ in range(60):  # one window, leases never settled: each counts in full
        granted.append(sum(lease.requests for lease in b.acquire(want=10, tokens_each=30).leases))
        clock.now += 1.0
    assert granted[0] >= 1  # an idle key sends at once
    assert sum(granted) == int(100 * TPM_HEADROOM) // 30 == 3


def test_cooldown_blocks_a_key_for_the_time_the_server_asked():
    clock = Clock()
    b = budgets(rpm=600, clock=clock)
    b.cooldown(0, 5.0)
    grant = b.acquire(1, 10)
    assert not grant.leases and grant.wait_s == pytest.approx(5.0)
    assert grant.blocked[0] == pytest.approx(clock.now + 5.0)


def test_cooldown_of_one_key_moves_requests_to_the_others():
    b = budgets(n_keys=2, rpm=600)
    b.cooldown(0, 5.0)
    assert {lease.key for lease in b.acquire(4, 10).leases} == {1}


def test_cooldown_without_a_delay_doubles_while_429s_repeat():
    clock = Clock()
    b = budgets(clock=clock)
    waits = []
    for _ in range(3):
        b.cooldown(0, None)
        waits.append(b.keys[0].cooldown_until - clock.now)
    assert waits == [1.0, 2.0, 4.0]


def test_a_success_resets_the_429_streak():
    clock = Clock()
    b = budgets(clock=clock)
    b.cooldown(0, None)
    b.cooldown(0, None)
    clock.now += 10
    lease = b.acquire(1, 10).leases[0]
    b.settle([Used(lease.lease_id, clock.now, clock.now, 10, 10, ok=True)], [])
    b.cooldown(0, None)
    assert b.keys[0].cooldown_until - clock.now == 1.0


def test_a_revoked_key_is_never_leased_again():
    b = budgets(n_keys=2, rpm=600)
    assert b.revoke(0, 401) is True
    leases = [lease for _ in range(5) for lease in b.acquire(10, 10).leases]
    assert leases and {lease.key for lease in leases} == {1}


def test_revoking_twice_reports_the_first_time_only():
    b = budgets(n_keys=2)
    assert [b.revoke(1, 403), b.revoke(1, 403)] == [True, False]


def test_no_key_left_stops_with_a_message_naming_keys_by_label():
    b = budgets(n_keys=2)
    b.revoke(0, 401)
    b.revoke(1, 403)
    grant = b.acquire(1, 10)
    assert grant.stop == "no_keys"
    assert "key#0 (HTTP 401)" in grant.message and "key#1 (HTTP 403)" in grant.message


def test_max_cost_limits_what_is_leased():
    b = budgets(rpm=6000, max_cost=0.05)
    grant = b.acquire(want=100, tokens_each=10, cost_each=0.01)
    assert sum(lease.requests for lease in grant.leases) == 5


def test_max_cost_stops_once_spent():
    clock = Clock()
    b = budgets(rpm=6000, max_cost=0.02, clock=clock)
    leases = b.acquire(2, 10, cost_each=0.01).leases
    b.settle([Used(lease.lease_id, clock.now, clock.now, 10, 10, cost_usd=0.01) for lease in leases for _ in range(lease.requests)], [])
    assert b.acquire(1, 10, cost_each=0.01).stop == "max_cost"


def test_max_cost_waits_while_requests_in_flight_may_cost_less():
    b = budgets(rpm=6000, max_cost=0.02)
    b.acquire(2, 10, cost_each=0.01)
    grant = b.acquire(1, 10, cost_each=0.01)
    assert grant.stop is None and not grant.leases and grant.wait_s > 0


def test_stats_name_keys_by_label():
    b = budgets(n_keys=2)
    b.revoke(1, 401)
    b.count({"http_429": 2})
    stats = b.stats()
    assert stats["keys_revoked"] == ["key#1"] and stats["http_429"] == 2


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_simulated_traffic_never_exceeds_rpm_in_any_window(seed):
    """Random demand, send delays and latencies; every sliding window at the server stays in limit."""
    rng = random.Random(seed)
    clock = Clock(0.0)
    rpm, window = 20, 10.0
    b = budgets(n_keys=2, rpm=rpm, clock=clock, window_s=window)
    arrivals: dict[int, list[float]] = {0: [], 1: []}
    pending: list[tuple[float, Used]] = []
    while clock.now < 120:
        for lease in b.acquire(rng.randint(1, 8), 10).leases:
            for _ in range(lease.requests):
                sent = clock.now + rng.uniform(0, 1.5)  # sent some time within the lease
                arrival = sent + rng.uniform(0, 0.3)
                done = arrival + rng.uniform(0, 3)
                arrivals[lease.key].append(arrival)
                pending.append((done, Used(lease.lease_id, sent, done, 10, 10)))
        clock.now += rng.uniform(0.01, 0.5)
        due = [u for t, u in pending if t <= clock.now]
        pending = [(t, u) for t, u in pending if t > clock.now]
        b.settle(due, [])
    for times in arrivals.values():
        times.sort()
        worst = max(sum(1 for t in times if start <= t < start + window) for start in times)
        assert worst <= rpm
    assert sum(len(t) for t in arrivals.values()) >= 0.8 * 2 * rpm * 120 / window  # and it did not starve


def test_parse_duration_reads_openai_reset_formats():
    assert [parse_duration(v) for v in ("20ms", "1.5s", "6m0s", "2", "1h")] == [0.02, 1.5, 360.0, 2.0, 3600.0]


def test_parse_duration_rejects_garbage():
    assert parse_duration("soon") is None


def test_retry_after_prefers_milliseconds():
    assert retry_after_s({"Retry-After": "2", "retry-after-ms": "1250"}) == pytest.approx(1.25)


def test_retry_after_reads_an_http_date():
    from email.utils import formatdate
    import time

    assert retry_after_s({"retry-after": formatdate(time.time() + 30, usegmt=True)}) == pytest.approx(30, abs=2)


def test_retry_after_falls_back_to_ratelimit_reset():
    assert retry_after_s({"x-ratelimit-reset-requests": "3s", "x-ratelimit-reset-tokens": "500ms"}) == 3.0


def test_retry_after_none_without_headers():
    assert retry_after_s({}) is None


def test_exhausted_when_no_request_remains():
    headers = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "750ms"}
    assert exhausted_for_s(headers, next_tokens=10) == 0.75


def test_not_exhausted_while_requests_remain():
    headers = {"x-ratelimit-remaining-requests": "3", "x-ratelimit-reset-requests": "750ms",
               "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "1s"}
    assert exhausted_for_s(headers, next_tokens=10) is None


def test_exhausted_when_tokens_left_do_not_cover_the_next_request():
    headers = {"x-ratelimit-remaining-tokens": "5", "x-ratelimit-reset-tokens": "2s"}
    assert exhausted_for_s(headers, next_tokens=10) == 2.0


def test_clock_is_not_consulted_for_infinite_blocks():
    b = budgets(n_keys=1)
    b.revoke(0, 401)
    assert math.isinf(b.acquire(1, 1).blocked[0])
