"""Kill real labelling jobs and look at what they left: shared by the crash tests and the
crash benchmark, so the figures in BENCHMARKS.md come from the same harness as CI.

A job runs as `python jobs/classify.py ...` in a session of its own, as a user would start
it. What has been *committed* is read from Ray's checkpoint (`<output>/_checkpoint/*.parquet`
without `.pending`): those rows must survive every later crash unchanged.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[2]
_PENDING = ".pending.parquet"

KILLS = {
    "SIGKILL": (signal.SIGKILL, False),  # `kill -9` of the driver alone; its Ray processes die on their own
    "SIGINT": (signal.SIGINT, True),  # Ctrl-C in a terminal: SIGINT to the whole foreground process group
    "SIGKILL-group": (signal.SIGKILL, True),  # the machine going away: every process of the job at once
}
"""How a job can be interrupted: name -> (signal, to the whole process group?).

The job's process group holds the driver, Ray's GCS, raylet and agents; Ray's worker
processes lead process groups of their own (same session) and exit when their raylet dies."""


def own_ray_env(ray_tmp: str | Path) -> dict[str, str]:
    """Environment for a job that must start a Ray of its own (one that dies with it): no
    `RAY_ADDRESS`, and a Ray temp dir of its own, so `ray.init()` cannot find and join a
    cluster someone else started with `ray start` on this machine.
    Keep `ray_tmp` short: Ray puts Unix sockets under it (about 100 characters at most)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def start_job(config: str | Path, output: str | Path, log: Path, env: dict[str, str] | None = None,
              extra: Sequence[str] = ()) -> subprocess.Popen:
    """Start `jobs/classify.py` in its own session (its own process group), output to `log`.
    `env` replaces the environment when given (see `own_ray_env`)."""
    cmd = [sys.executable, str(REPO / "jobs" / "classify.py"), "--config", str(config), "--output", str(output), *extra]
    out = open(log, "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=env if env is not None else dict(os.environ), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_ctrl_c_as_in_a_terminal)


def _ctrl_c_as_in_a_terminal() -> None:
    """Give the job SIGINT's default disposition, as a terminal does. A test run started in
    the background of a non-interactive shell (CI, `cmd &`) inherits SIGINT *ignored*, the
    job would inherit that too, and then Ctrl-C (our SIGINT) would interrupt nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
    stop_s: float | None = None
    """Seconds from the kill to the driver's exit (None when no kill was sent)."""

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
    """Start an attempt, kill it at a random point once it has committed something new and
    asked the server for a random share of the rows left, wait for it to end; return what it
    did. `start()` returns a Popen; `requests()` the server's admitted-request count so far.

    Progress is read from the server's count, not from the checkpoint: a job that finishes
    deletes its checkpoint, so a watcher of the checkpoint alone can miss the end and kill a
    job that has already finished its work (the next attempt then finds a finished output)."""
    before, asked = _count(output), requests()
    left = total_rows - before
    goal = max(1, int(left * rng.uniform(0.1, 0.4)))  # requests of this attempt before the kill
    started = time.monotonic()
    proc = start()
    sig, group = KILLS[kill]
    while proc.poll() is None and (requests() - asked < goal or _count(output) <= before):
        if time.monotonic() - started > timeout_s:
            break
        time.sleep(0.1)
    time.sleep(rng.uniform(0.0, 0.5))  # land anywhere: mid-request, mid-write, mid-commit
    fired = proc.poll() is None
    fired_at = time.monotonic()
    if fired:
        (os.killpg if group else os.kill)(proc.pid if not group else os.getpgid(proc.pid), sig)
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:  # a Ctrl-C that did not stop it: what a user does next
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    stop_s = time.monotonic() - fired_at if fired else None
    return Attempt(kill if fired else None, time.monotonic() - started, code, before, _count(output), requests() - asked,
                   stop_s)


def run_to_end(start, output: str | Path, requests=lambda: 0, timeout_s: float = 900) -> Attempt:
    """Start an attempt and let it finish."""
    before, asked = _count(output), requests()
    started = time.monotonic()
    proc = start()
    code = proc.wait(timeout=timeout_s)
    rows = len(output_rows(output))
    return Attempt(None, time.monotonic() - started, code, before, rows, requests() - asked)


# --- a series of crashes, then a run to the end: shared by tests/test_crashes.py and the benchmark ---

CRASH_LABELS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
"""Labels of crash-series jobs: more than attempts in a series, so a row's label names its attempt."""
_ROW_TAG = re.compile(r"row (r\d+):")


def crash_rows(n: int) -> list[dict]:
    """`n` input rows with ids `r0..`, whose text carries the id (so the server can tell rows apart)."""
    return [{"rid": f"r{i}", "text": f"row r{i}: the room was {'clean' if i % 2 else 'dirty'}"} for i in range(n)]


class AttemptOracle:
    """A fake-server oracle (`FakeOpenAIConfig(oracle=...)`) that answers, for row i during
    attempt a, `CRASH_LABELS[(i + a) % len]`: in the final output, a row's label says which
    attempt labelled it. It records every request as (attempt, row id)."""

    def __init__(self) -> None:
        self.attempt = 0
        self.seen: list[tuple[int, str]] = []

    def __call__(self, prompt: str) -> str:
        tags = _ROW_TAG.findall(prompt)
        if not tags:
            return CRASH_LABELS[0]
        rid = tags[-1]
        self.seen.append((self.attempt, rid))
        return label_for(rid, self.attempt)

    def asked(self, attempt: int) -> list[str]:
        return [rid for a, rid in list(self.seen) if a == attempt]


def label_for(rid: str, attempt: int) -> str:
    return CRASH_LABELS[(int(rid[1:]) + attempt) % len(CRASH_LABELS)]


@dataclass
class Crash:
    """One killed attempt and what it cost."""

    attempt: Attempt
    committed: dict[str, str]
    """{id: label} of every committed row once the attempt was dead."""
    asked: int
    """Rows this attempt sent to the server."""
    redone: int
    """Of those, rows not committed by it: paid for again by a later attempt."""


def crash_series(start, output: str | Path, kills: list[str], total_rows: int, rng: random.Random,
                 oracle: AttemptOracle, timeout_s: float = 600) -> tuple[list[Crash], Attempt]:
    """Kill `len(kills)` attempts in a row (each once it has committed something new), then
    run one to the end. `start()` returns a Popen of the job; `oracle` serves its server."""
    crashes: list[Crash] = []
    for n, kill in enumerate(kills):
        oracle.attempt = n
        attempt = run_and_kill(start, output, kill, total_rows, rng, requests=lambda: len(oracle.seen),
                               timeout_s=timeout_s)
        committed = {rid: row["label"] for rid, row in committed_rows(output).items()}
        asked = set(oracle.asked(n))
        crashes.append(Crash(attempt, committed, len(asked), len(asked - set(committed))))
        manifest = Path(output) / "_raycls_run.json"
        if manifest.exists() and json.loads(manifest.read_text()).get("finished"):
            raise RuntimeError(f"attempt {n} ({kill}) finished its work before the kill landed; the series "
                               f"interrupted nothing: kill earlier (see run_and_kill's goal)")
    oracle.attempt = len(kills)
    final = run_to_end(start, output, requests=lambda: len(oracle.seen), timeout_s=timeout_s)
    return crashes, final
