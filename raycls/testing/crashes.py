"""Kill real labelling jobs and look at what they left: shared by the crash tests and the
crash benchmark, so the figures in BENCHMARKS.md come from the same harness as CI.

A job runs as `python jobs/classify.py ...` in a session of its own, as a user would start
it. What has been *committed* is read from Ray's checkpoint (`<output>/_checkpoint/*.parquet`
without `.pending`): those rows must survive every later crash unchanged.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
_PENDING = ".pending.parquet"

KILLS = {
    "SIGKILL": (signal.SIGKILL, False),  # `kill -9` of the driver alone; its Ray processes die on their own
    "SIGINT": (signal.SIGINT, True),  # Ctrl-C in a terminal: SIGINT to the whole foreground process group
    "SIGKILL-group": (signal.SIGKILL, True),  # the machine going away: every process of the job at once
}
"""How a job can be interrupted: name -> (signal, to the whole process group?)."""


def start_job(config: str | Path, output: str | Path, log: Path, env: dict[str, str] | None = None,
              extra: list[str] = ()) -> subprocess.Popen:  # type: ignore[assignment]
    """Start `jobs/classify.py` in its own session (its own process group), output to `log`."""
    cmd = [sys.executable, str(REPO / "jobs" / "classify.py"), "--config", str(config), "--output", str(output), *extra]
    out = open(log, "ab")
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)


def committed_files(output: str | Path) -> dict[str, list[str]]:
    """Committed checkpoint files of a local output: {task prefix: ids}."""
    ckpt = Path(output) / "_checkpoint"
    if not ckpt.is_dir():
        return {}
    found = {}
    for path in ckpt.glob("*.parquet"):
        if path.name.endswith(_PENDING):
            continue
        try:
            found[path.name[: -len(".parquet")]] = pq.read_table(path).column("id").to_pylist()
        except (OSError, ValueError):  # renamed away or removed by a finishing run
            continue
    return found


def committed_rows(output: str | Path) -> dict[str, dict]:
    """Every committed row of a local output: {id: row}, from the data files whose
    checkpoint is committed (the rows no later attempt may change)."""
    prefixes = committed_files(output)
    rows: dict[str, dict] = {}
    for path in sorted((Path(output) / "data").glob("*.parquet")):
        stem = path.name[: -len(".parquet")].rsplit("-", 1)[0]
        if stem in prefixes:
            for row in pq.read_table(path).to_pylist():
                rows[row["id"]] = row
    return rows


def output_rows(output: str | Path) -> list[dict]:
    """All rows in a local output's data files (duplicates kept: that is what we look for)."""
    rows: list[dict] = []
    for path in sorted((Path(output) / "data").glob("*.parquet")):
        rows.extend(pq.read_table(path).to_pylist())
    return rows


@dataclass
class Attempt:
    """One start of the job and how it ended."""

    kill: str | None
    """The kill sent (a key of KILLS), or None when the attempt ran to its end."""
    seconds: float
    exit_code: int | None
    rows_before: int
    """Committed rows when the attempt started."""
    rows_after: int
    """Committed rows when it ended (or rows in the output for a finished attempt)."""
    requests: int = 0
    """Model calls the server admitted during the attempt."""

    @property
    def rows_new(self) -> int:
        return self.rows_after - self.rows_before

    @property
    def redone(self) -> int:
        """Rows this attempt paid for but did not commit: labelled again by a later one."""
        return max(0, self.requests - self.rows_new)


def _count(output: str | Path) -> int:
    return sum(len(ids) for ids in committed_files(output).values())


def run_and_kill(start, output: str | Path, kill: str, total_rows: int, rng: random.Random,
                 requests=lambda: 0, timeout_s: float = 600) -> Attempt:
    """Start an attempt, kill it at a random point once it has committed something new,
    wait for it to end; return what it did. `start()` returns a Popen; `requests()` the
    server's admitted-request count so far."""
    before, asked = _count(output), requests()
    left = total_rows - before
    target = before + max(1, int(left * rng.uniform(0.15, 0.6)))
    started = time.monotonic()
    proc = start()
    sig, group = KILLS[kill]
    while proc.poll() is None and _count(output) < target:
        if time.monotonic() - started > timeout_s:
            break
        time.sleep(0.1)
    time.sleep(rng.uniform(0.0, 1.5))  # land anywhere: mid-request, mid-write, mid-commit
    fired = proc.poll() is None
    if fired:
        (os.killpg if group else os.kill)(proc.pid if not group else os.getpgid(proc.pid), sig)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:  # a Ctrl-C that did not stop it: what a user does next
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    return Attempt(kill if fired else None, time.monotonic() - started, code, before, _count(output), requests() - asked)


def run_to_end(start, output: str | Path, requests=lambda: 0, timeout_s: float = 900) -> Attempt:
    """Start an attempt and let it finish."""
    before, asked = _count(output), requests()
    started = time.monotonic()
    proc = start()
    code = proc.wait(timeout=timeout_s)
    rows = len(output_rows(output))
    return Attempt(None, time.monotonic() - started, code, before, rows, requests() - asked)
