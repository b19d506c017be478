"""No API key leaks: a real job with recognisable fake keys, then a search of everything it left.

The job runs as a user runs it (`python jobs/classify.py`, keys in environment
variables) in a fresh process with its own Ray, whose whole temp tree (logs, session
files) lands in a directory of the test's. The server repeats the key in its 401
messages, as some providers do, and one key is revoked, so the paths where a key is most
likely to escape (auth errors, retries, logs of a dropped key) all run.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, review_rows

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

CANARIES = ["sk-SECRET-CANARY-1234", "sk-SECRET-CANARY-5678", "sk-SECRET-CANARY-REVOKED-9"]


def files_containing(root: Path, needles: list[str]) -> dict[str, list[str]]:
    """Every regular file under `root` that contains one of `needles` (as bytes, any encoding)."""
    hits: dict[str, list[str]] = {}
    encoded = [n.encode() for n in needles]
    for path in root.rglob("*"):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found = [n.decode() for n in encoded if n in data]
        if found:
            hits[str(path)] = found
    return hits


@pytest.fixture(scope="module")
def canary_job(tmp_path_factory):
    """Runs the job once; returns (completed process, output dir, Ray temp dir, server stats)."""
    from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig

    work = tmp_path_factory.mktemp("secrets")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rcs", dir="/tmp"))  # short: Ray's socket paths are length-limited
    rows = review_rows(30)
    (work / "in.jsonl").write_text("".join(f'{{"text": "{r["text"]}", "label": "{r["label"]}"}}\n' for r in rows))
    config = FakeOpenAIConfig(keys=CANARIES[:2], revoked=CANARIES[2:], echo_keys=True, error_rate=0.1,
                              labels=["negative", "positive"])
    with FakeOpenAI(config) as server:
        spec = {
            "input": {"path": str(work / "in.jsonl"), "gold_column": "label"},
            "labels": ["negative", "positive"],
            "output": {"path": str(work / "out")},
            "backend": {"kind": "openai", "base_url": server.base_url, "model": "fake-model", "rpm": 6000,
                        "api_keys": ["env:RAYCLS_TEST_KEYS", "env:RAYCLS_TEST_KEY_OLD"], "max_retries": 3,
                        "price_in_per_m": 1.0, "price_out_per_m": 2.0},
        }
        (work / "job.yaml").write_text(yaml.safe_dump(spec))
        env = {**os.environ, "RAYCLS_TEST_KEYS": ",".join(CANARIES[:2]), "RAYCLS_TEST_KEY_OLD": CANARIES[2],
               "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)
        started = time.time()
        proc = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "classify.py"), "--config", str(work / "job.yaml"), "--log-level", "DEBUG"],
            cwd=work, env=env, capture_output=True, text=True, timeout=500,
        )
        stats = server.stats()
    yield proc, work / "out", ray_tmp, stats, started
    subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def test_the_job_ran_and_used_every_key(canary_job):
    proc, _, _, stats, _ = canary_job
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert stats.keys[CANARIES[0]].accepted > 0 and stats.keys[CANARIES[1]].accepted > 0
    assert stats.keys[CANARIES[2]].unauthorized > 0  # the server echoed this key in its 401s


def test_no_key_in_stdout_or_stderr(canary_job):
    proc, _, _, _, _ = canary_job
    assert [c for c in CANARIES if c in proc.stdout or c in proc.stderr] == []


def test_no_key_in_any_output_file(canary_job):
    _, out, _, _, _ = canary_job
    assert any(out.rglob("*.parquet")) and (out / "metrics.json").exists()
    assert files_containing(out, CANARIES) == {}


def test_no_key_in_rays_logs_and_session_files(canary_job):
    _, _, ray_tmp, _, _ = canary_job
    assert any(ray_tmp.rglob("*.log")) or any(ray_tmp.rglob("*.out")), "the job's Ray logs should be here"
    assert files_containing(ray_tmp, CANARIES) == {}


def test_no_key_in_the_latest_default_ray_session(canary_job):
    """Whatever else wrote to /tmp/ray/session_latest while the job ran (e.g. this test session's Ray)."""
    _, _, _, _, started = canary_job
    logs = Path("/tmp/ray/session_latest/logs")
    if not logs.exists():
        pytest.skip("no default Ray session on this machine")
    recent = [p for p in logs.rglob("*") if p.is_file() and p.stat().st_mtime >= started]
    assert [str(p) for p in recent if any(c.encode() in p.read_bytes() for c in CANARIES)] == []


def test_the_search_would_find_a_key(tmp_path):
    (tmp_path / "leak.log").write_text(f"oops {CANARIES[0]}")
    assert files_containing(tmp_path, CANARIES) == {str(tmp_path / "leak.log"): [CANARIES[0]]}


@pytest.fixture(scope="module")
def canary_batch_job(tmp_path_factory):
    """The same canaries through batch mode: keys rotate across batches, one is revoked (the
    server echoes it), and the batch state under the output records key labels."""
    from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig

    work = tmp_path_factory.mktemp("secrets_batch")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rcb", dir="/tmp"))
    rows = review_rows(30)
    (work / "in.jsonl").write_text("".join(f'{{"text": "{r["text"]}", "label": "{r["label"]}"}}\n' for r in rows))
    config = FakeOpenAIConfig(keys=CANARIES[:2], revoked=CANARIES[2:], echo_keys=True, labels=["negative", "positive"],
                              batch={"line_errors_every": 5})
    with FakeOpenAI(config) as server:
        spec = {
            "input": {"path": str(work / "in.jsonl"), "gold_column": "label"},
            "labels": ["negative", "positive"],
            "output": {"path": str(work / "out")},
            "backend": {"kind": "openai", "base_url": server.base_url, "model": "fake-model", "mode": "batch",
                        "api_keys": ["env:RAYCLS_TEST_KEY_OLD", "env:RAYCLS_TEST_KEYS"], "batch_max_requests": 8,
                        "poll_interval_s": 0.05},
        }
        (work / "job.yaml").write_text(yaml.safe_dump(spec))
        env = {**os.environ, "RAYCLS_TEST_KEYS": ",".join(CANARIES[:2]), "RAYCLS_TEST_KEY_OLD": CANARIES[2],
               "RAY_TMPDIR": str(ray_tmp), "PYTHONPATH": str(REPO)}
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.run(
            [sys.executable, str(REPO / "jobs" / "classify.py"), "--config", str(work / "job.yaml"), "--log-level", "DEBUG"],
            cwd=work, env=env, capture_output=True, text=True, timeout=500,
        )
        counters = server.batches.counters()
    yield proc, work / "out", ray_tmp, counters
    subprocess.run(["rm", "-rf", str(ray_tmp)], check=False)


def test_batch_mode_leaks_no_key_in_state_logs_or_outputs(canary_batch_job):
    proc, out, ray_tmp, counters = canary_batch_job
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(counters.by_key) == set(CANARIES[:2])  # the revoked key was dropped, the others rotated
    assert any((out / "_raycls_batches" / "batches").glob("*.json"))
    assert [c for c in CANARIES if c in proc.stdout or c in proc.stderr] == []
    assert files_containing(out, CANARIES) == {}
    assert files_containing(ray_tmp, CANARIES) == {}
