"""Batch mode at 100,000 rows against the fake server's Batch API: raycls's own overhead.

    python benchmarks/batch_api.py --rows 100000

The server (in this process, on 127.0.0.1) holds every batch `in_progress` until told,
so the two commands a user runs are timed apart from the provider's hours:

1. `raycls run --no-wait` (a subprocess, as a user or cron starts it, with a Ray of its
   own): read, one write pass, build the JSONL files, upload, create, exit.
2. The batches are released and driven to `completed` here (their answers are computed
   by the server then, outside the timing).
3. `raycls run` again: poll, download, parse, a write pass of every row, the rows-out
   check, metrics.

Reported: batch files and batches made, both wall times (each with Ray's start-up), the
driver process's peak RSS (sampled every 0.1 s with psutil), and the cost at the batch
price next to the synchronous price of the same tokens. The response cache is on (its
default), in a fresh directory, so every row is a miss and all of them are submitted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig  # noqa: E402

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
KEYS = ["sk-bench-1", "sk-bench-2"]


def run_cli(args: list[str], env: dict[str, str], log: Path) -> tuple[float, int, int]:
    """Wall seconds, exit code and the driver's peak RSS (bytes) of one `raycls` command."""
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "raycls.cli", *args], cwd=REPO, env=env,
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT)
    handle, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, handle.memory_info().rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    return time.monotonic() - started, proc.returncode, peak


def complete_all(base_url: str, batch_ids: list[str]) -> None:
    """Retrieve each batch until it is completed (the fake server advances one state per retrieval)."""
    for bid in batch_ids:
        for _ in range(10):
            req = urllib.request.Request(f"{base_url}/batches/{bid}", headers={"Authorization": f"Bearer {KEYS[0]}"})
            with urllib.request.urlopen(req) as response:
                if json.load(response)["status"] == "completed":
                    break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=100_000)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="raycls-batch-bench-"))
    source = pq.read_table(REPO.parent / "shared" / "datasets" / "agnews_train.parquet").to_pylist()
    with open(work / "in.jsonl", "w", encoding="utf-8") as f:
        for i in range(args.rows):
            row = source[i % len(source)]
            f.write(json.dumps({"id": f"r{i}", "text": f"{i}: {row['text']}", "label": row["label"]}) + "\n")
    (work / "keys.txt").write_text("\n".join(KEYS) + "\n")
    config = FakeOpenAIConfig(keys=KEYS, labels=LABELS, batch={"hold": True})
    with FakeOpenAI(config) as server:
        spec = {
            "input": {"path": str(work / "in.jsonl"), "id_column": "id", "gold_column": "label"},
            "labels": LABELS, "prompt": "basic", "output": {"path": str(work / "out")},
            "backend": {"kind": "openai", "base_url": server.base_url, "model": "fake-model", "mode": "batch",
                        "api_keys": [f"file:{work / 'keys.txt'}"], "poll_interval_s": 1.0,
                        "price_in_per_m": 0.15, "price_out_per_m": 0.60},
        }
        (work / "job.yaml").write_text(yaml.safe_dump(spec))
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAYCLS_RESPONSE_CACHE=str(work / "cache"), RAY_TMPDIR=tempfile.mkdtemp(prefix="rbb", dir="/tmp"),
                   PYTHONPATH=str(REPO))
        log = work / "driver.log"
        submit_s, code1, peak1 = run_cli(["run", "--config", str(work / "job.yaml"), "--no-wait"], env, log)
        if code1 != 0:
            sys.exit(f"the submit run failed (exit {code1}) after {submit_s:.1f} s: see {log}")
        counters = server.batches.counters()
        ids = list(server.batches.statuses())
        server.batches.release()
        t = time.monotonic()
        complete_all(server.base_url, ids)
        provider_s = time.monotonic() - t
        collect_s, code2, peak2 = run_cli(["run", "--config", str(work / "job.yaml")], env, log)
        after = server.batches.counters()
    metrics = json.loads((work / "out" / "metrics.json").read_text()) if code2 == 0 else {}
    print(json.dumps({
        "rows": args.rows, "files_uploaded": counters.uploads, "batches_created": counters.batches_created,
        "bytes_uploaded": counters.bytes_uploaded, "uploads_after_collect": after.uploads,
        "submit_s": round(submit_s, 1), "collect_s": round(collect_s, 1), "overhead_s": round(submit_s + collect_s, 1),
        "fake_provider_compute_s": round(provider_s, 1), "exit_codes": [code1, code2],
        "driver_peak_rss_mib": round(max(peak1, peak2) / 2**20), "peak_rss_submit_mib": round(peak1 / 2**20),
        "peak_rss_collect_mib": round(peak2 / 2**20), "rows_written": metrics.get("rows_written"),
        "cost_usd_batch": metrics.get("cost_usd"), "cost_usd_sync": metrics.get("cost_usd_sync"),
        "response_cache": "on (fresh directory: all misses)", "log": str(log),
    }, indent=2))


if __name__ == "__main__":
    main()
