"""The command line: bad specs and bad input fail fast with one clear line, before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def classify(*args: str, cwd=REPO, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "jobs" / "classify.py"), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def without_ray_or_vllm(tmp_path: Path) -> dict[str, str]:
    """An environment in which `import ray` and `import vllm` fail loudly: a command that
    gets through without tripping them started no Ray and loaded no engine."""
    blocker = tmp_path / "blocked_imports"
    for name in ("ray", "vllm"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(f"raise ImportError('{name} must not be imported by this command')\n")
    path = os.pathsep.join(p for p in (str(blocker), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


@pytest.fixture
def spec_file(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a goal", "label": "Sports"}\n')
    path = tmp_path / "job.yaml"
    path.write_text(f"input: {{path: {data}, gold_column: label}}\nlabels: [World, Sports]\noutput: {{path: {tmp_path / 'out'}}}\n")
    return path


def test_unknown_key_exits_2_naming_the_key(spec_file):
    proc = classify("--config", str(spec_file), "--set", "backend.engnes=2")
    assert proc.returncode == 2
    assert "raycls: error: backend.engnes: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_key_is_reported_without_importing_ray_or_vllm(spec_file, tmp_path):
    proc = classify("--config", str(spec_file), "--set", "backend.engnes=2", env=without_ray_or_vllm(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("raycls: error: backend.engnes: unknown key")


def test_the_import_blocker_does_stop_a_command_that_starts_ray(spec_file, tmp_path):
    """The check above can fail: a run that gets past the spec does meet the blocker."""
    proc = classify("--config", str(spec_file), env=without_ray_or_vllm(tmp_path))
    assert proc.returncode != 0 and "ray must not be imported by this command" in proc.stderr


def test_missing_input_exits_2_naming_the_path(spec_file, tmp_path):
    proc = classify("--config", str(spec_file), "--input", str(tmp_path / "absent.parquet"))
    assert proc.returncode == 2
    assert "absent.parquet: no such file or directory" in proc.stderr


def test_malformed_jsonl_exits_2_naming_file_and_line(spec_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "World"}\n{"text": oops}\n')
    proc = classify("--config", str(spec_file), "--input", str(bad))
    assert proc.returncode == 2
    assert "bad.jsonl:2: malformed JSON" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_missing_column_exits_2_listing_the_columns(spec_file):
    proc = classify("--config", str(spec_file), "--set", "input.text=body")
    assert proc.returncode == 2
    assert "missing column(s) ['body']; the columns are ['text', 'label']" in proc.stderr


def test_help_of_run_lists_its_flags():
    proc = classify("run", "--help")
    assert proc.returncode == 0
    for flag in ("--config", "--set", "--input", "--output", "--limit", "--overwrite", "--log-level", "--verbose"):
        assert flag in proc.stdout
