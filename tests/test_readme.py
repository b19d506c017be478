"""The README's commands are tests: the Quick start runs as written, with the defaults a new
user gets (the response cache on, no variable the README does not set), and every example
config is a valid spec."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from raycls import schema
from tests.conftest import REPO

DEMO_OUTPUT = REPO / "out" / "demo"
"""Where the demo config writes (`output.path: out/demo`, git-ignored)."""


def quick_start_commands() -> list[str]:
    """The shell commands of the README's Quick start that run the demo, in order."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines()]
    return [c for c in commands if "jobs/configs/demo.yaml" in c]


def test_the_quick_start_names_the_demo_and_a_second_run():
    commands = quick_start_commands()
    assert commands[0] == "bash scripts/setup.sh && .venv/bin/raycls run --config jobs/configs/demo.yaml"
    assert len(commands) == 2 and "--overwrite" in commands[1]


def shell(command: str) -> subprocess.CompletedProcess:
    """`command` in the checkout, as a user's shell runs it: this environment (whose response
    cache lives in the test's own directory, see conftest), output to a pipe."""
    return subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=1500)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """The Quick start's demo, then its second command (the same job again). The checkout's
    own `out/demo`, if any, is set aside and put back, so the README's first command still
    runs as written in a checkout the tests ran in."""
    kept = tmp_path_factory.mktemp("kept") / "demo"
    if DEMO_OUTPUT.exists():
        shutil.move(DEMO_OUTPUT, kept)
    try:
        runs = []
        for command in quick_start_commands():
            proc = shell(command)
            shown = proc.stdout + proc.stderr
            assert proc.returncode == 0, shown[-4000:]
            rows = sorted(pq.read_table(DEMO_OUTPUT / "data").to_pylist(), key=lambda r: r[schema.ID])
            runs.append((shown, rows, json.loads((DEMO_OUTPUT / "metrics.json").read_text())))
        yield runs
    finally:
        shutil.rmtree(DEMO_OUTPUT, ignore_errors=True)
        if kept.exists():
            shutil.move(kept, DEMO_OUTPUT)


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.timeout(3000)
def test_the_demo_labels_24_rows_and_answers_every_label(demo_runs):
    shown, rows, metrics = demo_runs[0]
    assert metrics["rows_written"] == len(rows) == 24 and metrics["rows_failed"] == 0
    assert {r[schema.LABEL] for r in rows} == {"World", "Sports", "Business", "Sci/Tech"}
    assert metrics["accuracy"] >= 0.75
    assert "rows read 24, written 24" in shown


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.timeout(3000)
def test_the_demo_says_what_its_calibration_pass_asked_the_model(demo_runs):
    """The main pass takes the prior sample's answers from the cache: the first run must not
    look free, the second (everything served) must not claim a pass it did not make."""
    (first, _, metrics), (again, _, metrics_again) = demo_runs
    asked = metrics["calibration"]["pass"]
    assert asked["rows"] == 24 and asked["rows_cached"] == 0 and asked["input_tokens"] > 0
    assert f"calibration pass: 24 rows asked, tokens in {asked['input_tokens']}," in first
    assert metrics_again["calibration"]["pass"]["rows_cached"] == 24
    assert "calibration pass:" not in again


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.timeout(3000)
def test_the_demo_again_is_served_from_the_cache_with_the_same_labels_and_probabilities(demo_runs):
    (_, first, _), (shown, again, metrics) = demo_runs
    assert metrics["rows_cached"] == 24 and metrics["input_tokens"] == 0
    assert "24 rows from the response cache" in shown
    same = (schema.ID, schema.LABEL, schema.CONFIDENCE, schema.LABEL_PROBS, schema.LABEL_PROBS_RAW, schema.RAW_OUTPUT)
    assert [{k: r[k] for k in same} for r in again] == [{k: r[k] for k in same} for r in first]


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.timeout(3000)
def test_the_demo_prints_one_screen_without_a_traceback_or_alarming_lines(demo_runs):
    for shown, _, _ in demo_runs:
        shown = shown.split("raycls is set up in .venv\n", 1)[-1]  # what the job printed, after the setup
        assert "Traceback" not in shown
        assert len(shown.splitlines()) <= 40, shown
        # Left: Ray's core_worker.cc line that the vLLM stage's actors keep their constructor
        # arguments in the object store while restartable (ray-project/ray#53727); turning restarts
        # off would cost the engine's recovery from a dead engine, so it stays.
        for alarming in ("Token authentication is enabled", "Triton is installed", "Calling ray.init() again",
                         "Parquet dataset sampling"):
            assert alarming not in shown, shown


CONFIGS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_example_config_is_a_valid_spec(config, tmp_path):
    command = [sys.executable, "-m", "raycls.cli", "validate", "--config", str(config.relative_to(REPO))]
    if config.stem == "lake_fake":  # its input is the lake the README's steps make: one partition of it
        partition = tmp_path / "in" / "dt=2026-11-21"
        partition.mkdir(parents=True)
        shutil.copy(REPO / "jobs" / "data" / "demo_news.jsonl", partition / "part-0.jsonl")
        command += ["--input", str(tmp_path / "in")]
    if config.stem == "lake_iceberg_fake":  # its input is the table docs/lake.md's steps make, here under tmp_path
        import pyarrow.json as pj
        from pyiceberg.catalog.sql import SqlCatalog

        uri, warehouse = f"sqlite:///{tmp_path}/catalog.db", f"file://{tmp_path}/warehouse"
        rows = pj.read_json(REPO / "jobs" / "data" / "demo_news.jsonl")
        catalog = SqlCatalog("lake", uri=uri, warehouse=warehouse)
        catalog.create_namespace("db")
        catalog.create_table("db.news", schema=rows.schema).append(rows.slice(0, 12))
        command += ["--set", f"input.catalog.uri={uri}", "--set", f"input.catalog.warehouse={warehouse}"]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok: ")


def config_commands(config: str) -> list[str]:
    """The shell commands a config's leading comment gives (lines ending in `\\` joined)."""
    commands, pending = [], ""
    for line in (REPO / "jobs" / "configs" / config).read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("#   "):
            pending += line[4:].strip()
            if pending.endswith("\\"):
                pending = pending[:-1]
            else:
                commands.append(pending)
                pending = ""
    return commands


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_the_api_example_runs_against_the_server_its_comment_starts(tmp_path):
    """`jobs/configs/api_fake.yaml` as its comment says: the fault-injection server (on a free
    port here, not 8199), the keys in the environment, then `jobs/classify.py`."""
    import os
    import shlex
    import socket

    server_cmd, export, classify = config_commands("api_fake.yaml")
    assert server_cmd.startswith("python -m raycls.testing.fake_openai --port 8199") and server_cmd.endswith("&")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = shlex.split(server_cmd.rstrip("&").replace("--port 8199", f"--port {port}"))
    server = subprocess.Popen([sys.executable, *argv[1:]], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip().startswith("http://127.0.0.1:")  # it prints its URL once serving
        name, _, value = export.removeprefix("export ").partition("=")
        command = [sys.executable, *shlex.split(classify)[1:], "--set", f"backend.base_url=http://127.0.0.1:{port}/v1",
                   "--output", str(tmp_path / "out")]
        proc = subprocess.run(command, cwd=REPO, env={**os.environ, name: value}, capture_output=True, text=True, timeout=500)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["rows_written"] == 24 and metrics["accuracy"] == 1.0  # the server answers the gold label
