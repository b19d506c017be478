"""The response cache end to end: `run_job` on a real local Ray against the fault-injection
server, whose request counter says how many rows really went to a model."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from raycls import schema
from raycls.config import parse_spec
from raycls.job.pipeline import run_job
from tests.conftest import review_rows

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

KEYS = ["sk-cache"]


def requests(server) -> int:
    return sum(k.accepted for k in server.stats().keys.values())


def variant(spec, tmp_path, name: str, cache: dict | None = None, **backend):
    """The same job into a new output `name`, with `cache` and backend settings changed."""
    data = spec.model_dump()
    data["output"] = {"path": str(tmp_path / name)}
    data["cache"] = {**data["cache"], **(cache or {})}
    data["backend"] = {**data["backend"], **backend}
    return parse_spec(data)


def run(spec, server) -> tuple[list[dict], int]:
    """Rows written (by id) and the requests the server answered for them."""
    before = requests(server)
    result = run_job(spec)
    rows = sorted(pq.read_table(f"{result.output_path}/data").to_pylist(), key=lambda r: r[schema.ID])
    return rows, requests(server) - before


@pytest.fixture
def server(fake_openai):
    return fake_openai(keys=KEYS, labels=["negative", "positive"])


@pytest.fixture
def unique_job(api_job, server, tmp_path):
    """24 distinct texts (one empty: it costs no call), small batches, a cache in tmp_path."""
    spec = api_job(server.base_url, review_rows(24), KEYS, batch_size=5)
    return variant(spec, tmp_path, "first", cache={"path": str(tmp_path / "cache")})


def test_second_run_into_a_new_output_makes_no_calls_and_gives_the_same_labels(unique_job, server, tmp_path):
    first, first_calls = run(unique_job, server)
    second, second_calls = run(variant(unique_job, tmp_path, "second"), server)
    assert first_calls == 23
    assert second_calls == 0
    assert len(second) == len(first) == 24
    assert [r[schema.LABEL] for r in second] == [r[schema.LABEL] for r in first]
    labelled = [r for r in second if r[schema.ERROR] is None]
    assert len(labelled) == 23 and all(r[schema.CACHED] for r in labelled)
    assert all(r[schema.INPUT_TOKENS] == 0 for r in labelled)  # a reused answer costs nothing
    assert not any(r[schema.CACHED] for r in first)
    (empty,) = [r for r in second if r[schema.ERROR] is not None]
    assert empty[schema.ERROR] == schema.EMPTY_TEXT and not empty[schema.CACHED]


def test_changed_prompt_model_or_sampling_miss_the_cache(unique_job, server, tmp_path):
    run(unique_job, server)
    _, hotter = run(variant(unique_job, tmp_path, "hotter", temperature=0.7), server)
    _, other_model = run(variant(unique_job, tmp_path, "model", model="other-model"), server)
    data = variant(unique_job, tmp_path, "json").model_dump()
    data["prompt"] = "json"
    _, other_prompt = run(parse_spec(data), server)
    assert (hotter, other_model, other_prompt) == (23, 23, 23)


def test_a_new_entry_format_misses_the_entries_of_the_old_one(monkeypatch):
    from raycls.backends import cache
    before = cache.namespace({"kind": "vllm", "model": "m"}, "prompt")
    monkeypatch.setattr(cache, "ENTRY_FORMAT", cache.ENTRY_FORMAT + 1)
    assert cache.namespace({"kind": "vllm", "model": "m"}, "prompt") != before


def duplicated_rows(unique: int, copies: int) -> list[dict]:
    """`unique` texts, the first `copies` of them repeated once more, spread over the file."""
    rows = [{"text": f"review {i}: the room was {'clean' if i % 2 else 'dirty'}", "label": "positive" if i % 2 else "negative"}
            for i in range(unique)]
    for n, i in enumerate(range(copies)):
        rows.insert(2 * n + 1 + (n * 7) % 5, dict(rows[i]))
    return rows


def test_duplicates_within_a_run_cost_one_call_per_distinct_text(api_job, server, tmp_path):
    rows = duplicated_rows(40, 30)
    spec = variant(api_job(server.base_url, rows, KEYS, batch_size=4), tmp_path, "dups", cache={"path": str(tmp_path / "cache")})
    out, calls = run(spec, server)
    assert calls == 40
    assert len(out) == len(rows) == 70
    assert len({r[schema.ID] for r in out}) == 70
    assert sum(r[schema.CACHED] for r in out) == 30
    by_text: dict[str, set] = {}
    for r in out:
        assert r[schema.ERROR] is None
        by_text.setdefault(r["text"], set()).add(r[schema.LABEL])
    assert len(by_text) == 40 and all(len(labels) == 1 for labels in by_text.values())


def test_off_switch_sends_every_row(api_job, server, tmp_path):
    rows = duplicated_rows(20, 10)
    spec = variant(api_job(server.base_url, rows, KEYS, batch_size=4), tmp_path, "off",
                   cache={"enabled": False, "path": str(tmp_path / "cache")})
    out, calls = run(spec, server)
    assert calls == 30 and len(out) == 30
    assert not any(r[schema.CACHED] for r in out)
    assert not (tmp_path / "cache").exists()
    metrics = json.loads((tmp_path / "off" / "metrics.json").read_text())
    assert "cache" not in metrics


def test_a_failed_answer_is_not_stored_and_its_duplicates_carry_its_error(fake_openai, api_job, tmp_path):
    server = fake_openai(keys=KEYS, labels=["negative", "positive"], error_rate=1.0)
    rows = duplicated_rows(6, 4)
    spec = variant(api_job(server.base_url, rows, KEYS, batch_size=2, max_retries=0), tmp_path, "failing",
                   cache={"path": str(tmp_path / "cache")})
    out, calls = run(spec, server)
    assert calls == 6  # one per distinct text, whether a duplicate came before its leader failed or after
    assert len(out) == 10
    assert all(r[schema.ERROR] == schema.API_ERROR for r in out)
    assert sum(r[schema.CACHED] for r in out) == 4
    _, again = run(variant(spec, tmp_path, "again"), server)
    assert again == 6  # nothing was stored: the next run asks again


# -- the cache actor's bookkeeping, without Ray ------------------------------------------------


def test_cache_shard_leads_parks_publishes_and_stores(tmp_path):
    from raycls.backends.cache import CacheShard, row_key

    K1, K2, K3 = (row_key("ns", t) for t in ("one", "two", "three"))
    X, Y = '{"label": "x"}', '{"label": "y"}'

    shard = CacheShard(str(tmp_path / "store"), 0, 1)
    assert shard.admit({K1: None, K2: None}) == {K1: ("lead", None), K2: ("lead", None)}
    assert shard.admit({K1: None}) == {K1: ("park", None)}
    assert shard.park({K1: [b"row-a", b"row-b"]}) == {K1: ("park", None)}
    assert shard.publish({K1: (True, X), K2: (True, Y)}) == {K1: [b"row-a", b"row-b"], K2: []}
    assert shard.admit({K1: None}) == {K1: ("hit", X)}
    assert shard.flush() == 2
    reloaded = CacheShard(str(tmp_path / "store"), 0, 1)
    assert reloaded.admit({K1: None, K2: None, K3: None}) == {K1: ("hit", X), K2: ("hit", Y), K3: ("lead", None)}


def test_cache_shard_gives_a_failed_leaders_error_to_every_later_row_of_its_text_and_never_stores_it(tmp_path):
    from raycls.backends.cache import CacheShard, row_key

    K = row_key("ns", "fails")
    FAILURE = '{"label": null, "error": "api_error"}'

    shard = CacheShard(str(tmp_path / "store"), 0, 1)
    assert shard.admit({K: None}) == {K: ("lead", None)}
    assert shard.park({K: [b"parked-before"]}) == {K: ("park", None)}
    assert shard.publish({K: (False, FAILURE)}) == {K: [b"parked-before"]}
    # Rows of the same text that arrive after the failure get it too, in admit and in park alike:
    # the call count of a run cannot depend on which came first.
    assert shard.admit({K: None}) == {K: ("hit", FAILURE)}
    assert shard.park({K: [b"late-1", b"late-2"]}) == {K: ("hit", FAILURE)}
    assert shard.flush() == 0
    assert CacheShard(str(tmp_path / "store"), 0, 1).admit({K: None}) == {K: ("lead", None)}  # a later run asks again


# -- parked rows across blocks, on real cache actors -------------------------------------------


def test_a_parked_row_joins_its_leaders_block_whatever_type_that_block_gave_a_column(ray_local, tmp_path):
    """Seen with the vLLM backend on 2,000 THUCNews titles: the leader's block came back from the
    engine with `_text` as a column of nulls only (Arrow's null type), and the parked duplicate,
    which carries its text, could not join it (ArrowInvalid: Invalid null value)."""
    import pyarrow as pa

    from raycls.backends.cache import CacheShard, lookup_batch, restore_batch

    shard = ray_local.remote(CacheShard).remote(str(tmp_path / "store"), 0, 1)
    result_types = schema.result_schema(["x", "y"])

    def block(ids: list[str], texts: list[str | None]) -> pa.Table:
        errors = [None if t else schema.EMPTY_TEXT for t in texts]
        return pa.table({schema.ID: ids, schema.TEXT: pa.array(texts, pa.string()), schema.ERROR: pa.array(errors, pa.string()),
                         schema.TRUNCATED: [False] * len(ids)})

    leaders = lookup_batch(block(["a", "empty"], ["dup", None]), [shard], "ns")
    assert lookup_batch(block(["b"], ["dup"]), [shard], "ns").num_rows == 0  # b waits for a's answer
    answered = leaders.drop_columns([schema.TEXT]).append_column(schema.TEXT, pa.nulls(2)).append_column(
        schema.LABEL, pa.array(["x", None], pa.string()))

    out = restore_batch(answered, [shard], result_types).to_pylist()

    assert [r[schema.ID] for r in out] == ["a", "empty", "b"]
    parked = out[2]
    assert (parked[schema.LABEL], parked[schema.CACHED], parked[schema.INPUT_TOKENS], parked[schema.TEXT]) == ("x", True, 0, "dup")
    assert out[1][schema.ERROR] == schema.EMPTY_TEXT and out[1][schema.LABEL] is None


# -- a cache actor lost mid-run ----------------------------------------------------------------


def test_a_lost_cache_actor_is_logged_at_close_and_the_others_still_store(ray_local, api_job, server, tmp_path, caplog):
    """A worker node lost with a cache actor on it must not turn the run's close into a second
    failure (it hid the first one in the two-node test): the gone actor's new answers are
    lost and said so; every other actor stores its own."""
    import ray

    from raycls.backends import create_backend
    from raycls.backends.cache import bucket, row_key, wrap
    from raycls.prompting.prompts import build_plan

    spec = variant(api_job(server.base_url, review_rows(4), KEYS), tmp_path, "out",
                   cache={"path": str(tmp_path / "cache"), "actors": 2})
    plan = build_plan(spec)
    backend = wrap(create_backend(spec, plan), spec, plan)
    backend.prepare()
    texts = [f"text {i}" for i in range(20)]
    key_of_shard = {bucket(row_key(backend.ns, t)) % 2: row_key(backend.ns, t) for t in texts}
    for shard, key in key_of_shard.items():
        ray.get(backend.actors[shard].admit.remote({key: None}))
        ray.get(backend.actors[shard].publish.remote({key: (True, '{"label": "positive"}')}))
    ray.kill(backend.actors[0])

    with caplog.at_level("WARNING", logger="raycls.backends.cache"):
        backend.close()

    assert "response cache actor 1 of 2 is gone" in caplog.text
    stored = list((tmp_path / "cache").rglob("*.parquet"))
    assert [pq.read_table(p).column("key").to_pylist() for p in stored] == [[key_of_shard[1]]]
