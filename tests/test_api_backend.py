"""The API backend end to end: `run_job` on a real local Ray against the fault-injection server.

The main job meets every fault at once (500s, hung requests, broken bodies, off-label and
blank answers, a key revoked mid-run) under short windows of tight per-key RPM/TPM
limits; the server only counts (it does not enforce), so what it saw is what raycls sent.
The tests then read what the job wrote and what the server counted.
"""

from __future__ import annotations

import json
import threading
import time

import pyarrow.parquet as pq
import pytest

from raycls import schema
from raycls.errors import BackendError
from raycls.job.pipeline import run_job
from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig
from tests.conftest import api_spec, review_rows

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

KEYS = ["sk-test-A", "sk-test-B", "sk-test-C"]
RPM, TPM, WINDOW = 30, 1000, 3.0
CONCURRENCY, ACTORS = 8, 2
ROWS = 300
EXPLICIT_ERRORS = {schema.EMPTY_TEXT, schema.UNPARSEABLE, schema.API_ERROR}


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory, ray_local):
    """300 rows through 3 keys while the server misbehaves; key C is revoked after 15 requests."""
    config = FakeOpenAIConfig(
        keys=KEYS, rpm=RPM, tpm=TPM, window_s=WINDOW, enforce_limits=False, latency_ms=20, jitter_ms=30,
        error_rate=0.05, timeout_rate=0.03, hang_s=3, malformed_rate=0.08, offlabel_rate=0.06,
        labels=["negative", "positive"], seed=7,
    )
    rows = review_rows(ROWS)
    with FakeOpenAI(config) as server:
        spec = api_spec(
            tmp_path_factory.mktemp("faulty"), server.base_url, rows, KEYS,
            rpm=RPM, tpm=TPM, rate_window_s=WINDOW, timeout_s=1.0, max_retries=3, max_reasks=2,
            actors=ACTORS, max_concurrency=CONCURRENCY, batch_size=25, price_in_per_m=3.0, price_out_per_m=15.0,
        )
        revoked = threading.Event()

        def revoke_c_midway() -> None:
            while not revoked.is_set():
                if server.stats().keys[KEYS[2]].accepted >= 15:
                    server.revoke(KEYS[2])
                    revoked.set()
                time.sleep(0.05)

        watcher = threading.Thread(target=revoke_c_midway, daemon=True)
        watcher.start()
        result = run_job(spec)
        revoked.set()
        stats = server.stats()
    table = pq.read_table(f"{result.output_path}/data")
    metrics = json.loads(open(f"{result.output_path}/metrics.json").read())
    return rows, table.to_pylist(), metrics, stats


def test_rows_out_equal_rows_in(faulty_run):
    rows, out, metrics, _ = faulty_run
    assert len(out) == len(rows) == metrics["rows_written"]
    assert len({r[schema.ID] for r in out}) == len(rows)


def test_every_row_is_labelled_or_carries_an_explicit_error(faulty_run):
    _, out, _, _ = faulty_run
    for row in out:
        labelled = row[schema.LABEL] in ("negative", "positive") and row[schema.ERROR] is None
        failed = row[schema.LABEL] is None and row[schema.ERROR] in EXPLICIT_ERRORS
        assert labelled or failed, row


def test_most_rows_get_a_label_despite_the_faults(faulty_run):
    _, out, _, _ = faulty_run
    assert sum(r[schema.LABEL] is not None for r in out) >= 0.9 * len(out)


def test_the_faults_really_happened(faulty_run):
    _, _, metrics, stats = faulty_run
    seen = {name: sum(getattr(k, name) for k in stats.keys.values()) for name in ("server_errors", "timeouts", "malformed", "offlabel")}
    assert all(seen.values()), seen
    assert metrics["api"]["reasks"] > 0 and metrics["api"]["http_500"] > 0 and metrics["api"]["timeouts"] > 0


def test_empty_text_costs_no_call(faulty_run):
    _, out, _, _ = faulty_run
    empty = [r for r in out if r["text"] == ""]
    assert len(empty) == 1 and empty[0][schema.ERROR] == schema.EMPTY_TEXT and empty[0][schema.INPUT_TOKENS] == 0


def test_no_key_goes_over_its_rpm_in_any_window(faulty_run):
    _, _, _, stats = faulty_run
    assert {k: s.max_requests_in_window for k, s in stats.keys.items() if s.max_requests_in_window > RPM} == {}


def test_no_key_goes_over_its_tpm_in_any_window(faulty_run):
    _, _, _, stats = faulty_run
    assert {k: s.max_tokens_in_window for k, s in stats.keys.items() if s.max_tokens_in_window > TPM} == {}


def test_a_revoked_key_stops_being_used(faulty_run):
    _, _, metrics, stats = faulty_run
    # Only requests already holding a slot on it when it was revoked can still try it.
    assert 1 <= stats.keys[KEYS[2]].unauthorized <= ACTORS * CONCURRENCY
    assert metrics["api"]["keys_revoked"] == [label for label in metrics["api"]["requests_per_key"] if label.startswith("key#2")]


def test_the_other_keys_carry_the_work(faulty_run):
    _, _, _, stats = faulty_run
    assert stats.keys[KEYS[0]].accepted > 100 and stats.keys[KEYS[1]].accepted > 100


def test_an_answer_naming_two_labels_is_flagged_multi_label(faulty_run):
    _, out, _, _ = faulty_run
    assert any(r[schema.MULTI_LABEL] for r in out)


def test_confidence_comes_from_top_logprobs(faulty_run):
    _, out, _, _ = faulty_run
    labelled = [r for r in out if r[schema.LABEL] is not None]
    assert all(0.5 <= r[schema.CONFIDENCE] <= 1.0 for r in labelled)
    assert all(r[schema.CONFIDENCE] == r[schema.LABEL_PROBS][r[schema.LABEL]] for r in labelled)


def test_tokens_per_row_come_from_the_server_usage(faulty_run):
    _, out, metrics, stats = faulty_run
    assert metrics["input_tokens"] == sum(r[schema.INPUT_TOKENS] for r in out) > 0
    answered = sum(s.tokens for s in stats.keys.values())
    assert metrics["input_tokens"] + metrics["output_tokens"] <= answered


def test_cost_is_tokens_times_prices(faulty_run):
    _, _, metrics, _ = faulty_run
    expected = metrics["input_tokens"] * 3.0 / 1e6 + metrics["output_tokens"] * 15.0 / 1e6
    assert metrics["cost_usd"] == pytest.approx(expected, rel=1e-4) and metrics["cost_usd"] > 0


# -- separate, smaller jobs ---------------------------------------------------------------


def test_429s_are_honoured_and_every_row_still_labelled(fake_openai, api_job, ray_local):
    server = fake_openai(keys=KEYS[:2], rpm=6, window_s=2.0, labels=["negative", "positive"])
    spec = api_job(server.base_url, review_rows(40), KEYS[:2], rpm=60, rate_window_s=2.0, max_concurrency=8)
    metrics = run_job(spec).metrics
    assert metrics["api"]["http_429"] > 0
    assert metrics["failed_by_reason"] == {schema.EMPTY_TEXT: 1}
    assert metrics["api"]["http_429"] <= metrics["api"]["requests_ok"]  # cool-downs, not hammering


def test_unparseable_rows_keep_the_raw_answer(fake_openai, api_job, ray_local):
    """Every answer is prose naming no label (re-asks too): each non-empty row fails with it kept."""
    prose = "Sure! Let me think about which category fits best."  # what the server's "prose" fault writes
    server = fake_openai(keys=KEYS[:1], labels=["negative", "positive"], malformed_rate=1.0, malformed_kinds=["prose"])
    spec = api_job(server.base_url, review_rows(6), KEYS[:1], rpm=6000, max_reasks=1)
    out = pq.read_table(f"{run_job(spec).output_path}/data").to_pylist()
    unparseable = [r for r in out if r[schema.ERROR] == schema.UNPARSEABLE]
    assert len(out) == 6 and len(unparseable) == 5  # row 3 is empty: no call, its own error
    assert all(r[schema.LABEL] is None and prose in r[schema.RAW_OUTPUT] for r in unparseable)


def test_no_key_left_stops_the_run_with_a_clear_error(fake_openai, api_job, ray_local):
    server = fake_openai(keys=[], revoked=KEYS[:2], labels=["negative", "positive"], echo_keys=True)
    spec = api_job(server.base_url, review_rows(20), KEYS[:2], rpm=6000)
    with pytest.raises(BackendError) as err:
        run_job(spec)
    assert "no usable API key" in str(err.value) and "key#1" in str(err.value)
    assert "rows were not labelled" in str(err.value) and "\n" not in str(err.value)  # why rows are missing, in one line
    assert not any(key in str(err.value) for key in KEYS)


def test_json_schema_and_json_mode_rejected_fall_back_to_text(fake_openai, api_job, ray_local):
    server = fake_openai(keys=KEYS[:1], labels=["negative", "positive"], reject_features=["json_schema", "json_object"])
    spec = api_job(server.base_url, review_rows(12), KEYS[:1], prompt="json", rpm=6000)
    metrics = run_job(spec).metrics
    assert metrics["failed_by_reason"] == {schema.EMPTY_TEXT: 1}
    assert metrics["api"]["format_fallback_json_schema"] >= 1 and metrics["api"]["format_fallback_json_object"] >= 1


def test_logprobs_rejected_labels_without_confidence(fake_openai, api_job, ray_local):
    server = fake_openai(keys=KEYS[:1], labels=["negative", "positive"], reject_features=["logprobs"])
    spec = api_job(server.base_url, review_rows(8), KEYS[:1], rpm=6000)
    result = run_job(spec)
    out = pq.read_table(f"{result.output_path}/data").to_pylist()
    labelled = [r for r in out if r[schema.LABEL] is not None]
    assert len(labelled) == 7 and all(r[schema.CONFIDENCE] is None for r in labelled)


def test_max_cost_stops_spending_and_keeps_every_row(fake_openai, api_job, ray_local):
    server = fake_openai(keys=KEYS[:1], labels=["negative", "positive"])
    # About 40 tokens in per request at $1,000 per million: $0.04 a request, so ~10 requests.
    spec = api_job(server.base_url, review_rows(40), KEYS[:1], price_in_per_m=1000.0, max_cost=0.4, rpm=6000)
    result = run_job(spec)
    metrics = result.metrics
    assert metrics["rows_written"] == 40
    assert 20 <= metrics["failed_by_reason"].get(schema.BUDGET_EXHAUSTED, 0) <= 35
    assert metrics["cost_usd"] <= 0.4


def test_completions_with_choice_truncate_long_text_to_the_context(fake_openai, api_job, ray_local):
    server = fake_openai(keys=KEYS[:1])
    rows = review_rows(6)
    rows[5]["text"] = "very long " * 2000
    spec = api_job(server.base_url, rows, KEYS[:1], endpoint="completions", response_format="choice", context_window=256, rpm=6000)
    out = {r["text"][:20]: r for r in pq.read_table(f"{run_job(spec).output_path}/data").to_pylist()}
    long_row = out[rows[5]["text"][:20]]
    assert long_row[schema.TRUNCATED] and long_row[schema.LABEL] in ("negative", "positive")
    assert long_row[schema.INPUT_TOKENS] < 256


def test_dry_run_estimates_tokens_and_cost_and_calls_no_model(fake_openai, api_job, ray_local, capsys):
    from raycls.job.estimate import dry_run

    server = fake_openai(keys=KEYS[:2], labels=["negative", "positive"])
    spec = api_job(server.base_url, review_rows(50), KEYS[:2], price_in_per_m=2.0, price_out_per_m=10.0, rpm=100)
    estimate = dry_run(spec)
    assert (estimate["rows"], estimate["model_calls"], estimate["rows_empty"]) == (50, 49, 1)
    expected = estimate["est_input_tokens"] * 2.0 / 1e6 + estimate["est_output_tokens_max"] * 10.0 / 1e6
    assert estimate["est_input_tokens"] > 49 * 20 and estimate["est_cost_usd_max"] == pytest.approx(expected, rel=1e-4)
    assert estimate["est_minutes_at_limits"] == pytest.approx(49 / (100 * 2), abs=0.01)
    assert "49 model calls" in capsys.readouterr().out
    assert sum(k.accepted + k.unauthorized for k in server.stats().keys.values()) == 0
