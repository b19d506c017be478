"""The console's quiet default and its `verbose` opposite (in a fresh interpreter each, so the
environment and loggers of the test process are untouched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO

PROBE = """
import json, logging, os, sys
import ray.data
from raycls.job import console
console.configure(sys.argv[1] == "verbose")
ctx = ray.data.DataContext.get_current()
print(json.dumps({"vllm_env": os.environ.get("VLLM_LOGGING_LEVEL"), "vllm_logger": logging.getLogger("vllm").getEffectiveLevel(),
                  "operator_bars": ctx.enable_operator_progress_bars, "bars": ctx.enable_progress_bars,
                  "init": console.ray_init_kwargs(sys.argv[1] == "verbose")}))
"""

def probe(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_LOGGING_LEVEL"}
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])

def test_quiet_by_default():
    got = probe("quiet")
    assert got["vllm_env"] == "WARNING" and got["vllm_logger"] == 30
    assert got["operator_bars"] is False and got["bars"] is True  # one overall progress bar
    assert got["init"]["log_to_driver"] is False

def test_verbose_leaves_everything_on():
    got = probe("verbose")
    assert got["vllm_env"] is None and got["vllm_logger"] == 20
    assert got["init"]["log_to_driver"] is True

# The demo's console, as a user runs it from the README: tests/test_readme.py.

def test_training_lets_its_workers_print_even_when_quiet():
    from raycls.job import console

    assert console.ray_init_kwargs(False, worker_output=True)["log_to_driver"] is True
    assert console.ray_init_kwargs(False)["log_to_driver"] is False
