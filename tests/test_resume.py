"""Resume, refusals and `--overwrite`: `run_job` in-process on a real local Ray against the fake API.

An *interrupted* output here is a real one: a run whose only API key is revoked at the
provider part-way (the fake server answers 401 from then on) writes the rows it labelled,
leaves the rest unwritten and ends with a BackendError, as `raycls.backends.api.backend` says
it must. Its checkpoint is therefore Ray's own. The flow (interrupt, then resume with a
working key, as a user who fixed the key file would) runs once per module; the tests then
read what it left and what the server counted. The server answers "negative" to the first
attempt and "positive" after, so the output shows which attempt labelled each row.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from raycls.config import parse_spec
from raycls.errors import BackendError, ResumeError
from raycls.job.pipeline import run_job
from raycls.job.resume import MANIFEST_FILE
from raycls.testing.crashes import committed_files, output_rows
from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig
from tests.conftest import REPO, review_rows

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

LABELS = ["negative", "positive"]
FILES, ROWS_PER_FILE = 4, 12
ROWS = FILES * ROWS_PER_FILE
LIMIT = 3 * ROWS_PER_FILE
DIES_AFTER = 16
"""Requests the first key serves before it is revoked: about a third of the rows."""
LIVE_KEY = "sk-live"


def write_input(root: Path) -> list[str]:
    """`FILES` JSONL files of `review_rows` (row 3 has empty text); their derived ids, in file order."""
    rows = review_rows(ROWS)
    (root / "in").mkdir()
    ids = []
    for f in range(FILES):
        part = rows[f * ROWS_PER_FILE:(f + 1) * ROWS_PER_FILE]
        (root / "in" / f"part{f}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        ids += [f"part{f}.jsonl:{i}" for i in range(len(part))]
    return ids


def job(root: Path, base_url: str, out: Path, limit: int | None = None, **changes: Any) -> dict[str, Any]:
    """The spec as a dict (YAML for the CLI); `changes` replace top-level or `backend.` keys."""
    spec = {
        "input": {"path": str(root / "in"), "gold_column": "label"},
        "labels": LABELS,
        "output": {"path": str(out)},
        "limit": limit,
        "backend": {"kind": "openai", "base_url": base_url, "model": "fake-model",
                    "api_keys": [f"file:{root / 'keys.txt'}"], "max_concurrency": 2, "batch_size": 6},
    }
    for key, value in changes.items():
        if key.startswith("backend."):
            spec["backend"][key.split(".", 1)[1]] = value
        else:
            spec[key] = value
    return spec


def accepted(server: FakeOpenAI, key: str) -> int:
    stats = server.stats().keys.get(key)
    return stats.accepted if stats else 0


def interrupt(server: FakeOpenAI, root: Path, spec: dict[str, Any], key: str) -> int:
    """Run `spec` with only `key`, revoked at the server after `DIES_AFTER` requests; the run
    must end with a BackendError having committed some rows. Returns the committed rows."""
    (root / "keys.txt").write_text(key + "\n")
    done = threading.Event()

    def revoke_midway() -> None:
        while not done.is_set():
            if accepted(server, key) >= DIES_AFTER:
                server.revoke(key)
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=revoke_midway, daemon=True)
    watcher.start()
    try:
        with pytest.raises(BackendError):
            run_job(parse_spec(spec))
    finally:
        done.set()
        watcher.join()
    committed = sum(len(ids) for ids in committed_files(spec["output"]["path"]).values())
    if not 0 < committed < (spec["limit"] or ROWS):
        pytest.fail(f"the interrupted run committed {committed} rows; the flow needs part of them")
    return committed


class Answer:
    """Fake-server oracle answering one label for every row: the interrupted attempt gets
    "negative", later ones "positive", so the output shows which attempt labelled a row."""

    label = LABELS[0]

    def __call__(self, prompt: str) -> str:
        return self.label


ANSWER = Answer()


@pytest.fixture(scope="module")
def server():
    config = FakeOpenAIConfig(keys=["sk-dies-a", LIVE_KEY], labels=LABELS, latency_ms=30, oracle=ANSWER, seed=3)
    with FakeOpenAI(config) as srv:
        yield srv


@pytest.fixture(scope="module")
def flow(tmp_path_factory, ray_local, server) -> dict[str, Any]:
    """Interrupt a `--limit LIMIT` run, keep a copy of the unfinished output, resume it to the end.

    One flow for all resume tests (CI time): with the limit, "every row" is the first LIMIT."""
    root = tmp_path_factory.mktemp("resume")
    ids = write_input(root)
    out = root / "out"
    spec = job(root, server.base_url, out, limit=LIMIT)
    ANSWER.label = LABELS[0]
    committed = interrupt(server, root, spec, "sk-dies-a")
    before = {prefix: list(rows) for prefix, rows in committed_files(out).items()}
    committed_labels = {i: r["label"] for i, r in ((r["id"], r) for r in output_rows(out))
                        if any(i in rows for rows in before.values())}
    shutil.copytree(out, root / "unfinished")
    (root / "keys.txt").write_text(LIVE_KEY + "\n")  # the user fixes the key file and runs again
    ANSWER.label = LABELS[1]
    asked = accepted(server, LIVE_KEY)
    result = run_job(parse_spec(spec))
    return {"root": root, "ids": ids[:LIMIT], "spec": spec, "committed": committed, "committed_labels": committed_labels,
            "result": result, "requests": accepted(server, LIVE_KEY) - asked}


# --- refusals ---------------------------------------------------------------------------


def test_a_finished_output_is_refused_without_overwrite(flow):
    with pytest.raises(ResumeError) as err:
        run_job(parse_spec(flow["spec"]))
    message = str(err.value)
    assert flow["spec"]["output"]["path"] in message
    assert "finished" in message and "--overwrite" in message


@pytest.mark.parametrize("change, key", [
    ({"backend.model": "other-model"}, "model"),
    ({"prompt": "reason"}, "prompt_id"),
    ({"labels": ["negative", "positive", "neutral"]}, "labels"),
    ({"backend.temperature": 0.7}, "backend.temperature"),
    ({"backend.response_format": "json_object"}, "backend.response_format"),
    ({"backend.endpoint": "completions"}, "backend.endpoint"),
    ({"backend.max_tokens": 5}, "backend.max_tokens"),
])
def test_a_changed_job_is_refused_in_an_unfinished_output(flow, server, change, key):
    root = flow["root"]
    spec = job(root, server.base_url, root / "unfinished", **change)
    with pytest.raises(ResumeError) as err:
        run_job(parse_spec(spec))
    message = str(err.value)
    assert str(root / "unfinished") in message and "unfinished" in message
    assert f"{key}: was" in message
    assert not (root / "unfinished" / "metrics.json").exists()  # refused before touching anything


def test_the_cli_refuses_a_finished_output_with_one_line_and_exit_2(flow):
    config = flow["root"] / "job.yaml"
    config.write_text(yaml.safe_dump({k: v for k, v in flow["spec"].items() if v is not None}))
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "classify.py"), "--config", str(config)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("raycls: error: ") and "--overwrite" in lines[0]
    assert flow["spec"]["output"]["path"] in lines[0]


# --- resuming ---------------------------------------------------------------------------


def test_a_resumed_run_writes_every_row_once(flow):
    ids = [row["id"] for row in output_rows(flow["spec"]["output"]["path"])]
    assert sorted(ids) == sorted(flow["ids"])


def test_a_resumed_run_keeps_the_rows_committed_before(flow):
    out = {row["id"]: row["label"] for row in output_rows(flow["spec"]["output"]["path"])}
    assert set(flow["committed_labels"].values()) <= {LABELS[0], None}  # None: the empty row
    assert flow["committed_labels"] and all(out[i] == label for i, label in flow["committed_labels"].items())


def test_a_resumed_run_labels_the_rest(flow):
    out = {row["id"]: row["label"] for row in output_rows(flow["spec"]["output"]["path"])}
    rest = set(out) - set(flow["committed_labels"]) - {"part0.jsonl:3"}
    assert rest and {out[i] for i in rest} == {LABELS[1]}


def test_a_resumed_run_asks_only_for_the_rows_not_committed(flow):
    # Every input row but the empty one costs one request, and the server injects no faults.
    empty = "part0.jsonl:3"
    committed = set(flow["committed_labels"])
    assert flow["requests"] == len([i for i in flow["ids"] if i not in committed and i != empty])


def test_a_resumed_runs_metrics_cover_every_row(flow):
    metrics = json.loads((Path(flow["spec"]["output"]["path"]) / "metrics.json").read_text())
    assert metrics["rows_written"] == LIMIT
    assert sum(c["support"] for c in metrics["per_class"].values()) == LIMIT
    assert metrics["rows_resumed"] == flow["committed"]
    assert flow["result"].metrics["rows_resumed"] == flow["committed"]


def test_a_resumed_run_marks_the_output_finished_and_drops_the_checkpoint(flow):
    out = Path(flow["spec"]["output"]["path"])
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["finished"] and manifest["rows"] == LIMIT and manifest["attempt_count"] == 2
    assert [a["resumed_rows"] for a in manifest["attempts"]] == [0, flow["committed"]]
    assert not (out / "_checkpoint").exists()


def test_a_resumed_limit_run_finishes_the_same_rows(flow):
    """A limit counted after Ray's checkpoint filter would label LIMIT *more* rows."""
    ids = {row["id"] for row in output_rows(flow["spec"]["output"]["path"])}
    assert ids == {f"part{f}.jsonl:{i}" for f in range(LIMIT // ROWS_PER_FILE) for i in range(ROWS_PER_FILE)}


# --- overwrite --------------------------------------------------------------------------


def test_overwrite_relabels_a_finished_output(flow, server):
    """On a copy of the finished output, without the limit: every row is asked for again."""
    root = flow["root"]
    shutil.copytree(flow["spec"]["output"]["path"], root / "again")
    old_files = {p.name for p in (root / "again" / "data").glob("*.parquet")}
    asked = accepted(server, LIVE_KEY)
    result = run_job(parse_spec(job(root, server.base_url, root / "again")), overwrite=True)
    assert accepted(server, LIVE_KEY) - asked == ROWS - 1  # all rows but the empty one
    labels = [r["label"] for r in output_rows(root / "again") if r["id"] != "part0.jsonl:3"]
    assert set(labels) == {LABELS[1]}  # the copy held rows labelled LABELS[0] by the first attempt
    assert result.metrics["rows_written"] == ROWS and result.metrics["rows_resumed"] == 0
    assert len({r["id"] for r in output_rows(root / "again")}) == len(output_rows(root / "again")) == ROWS
    assert not old_files & {p.name for p in (root / "again" / "data").glob("*.parquet")}
    assert json.loads((root / "again" / MANIFEST_FILE).read_text())["attempt_count"] == 1
