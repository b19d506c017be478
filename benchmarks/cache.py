"""The response cache, measured: model calls and wall time of three runs over 2,000 rows of
`agnews_dev` through the API backend against the fault-injection server (20 ms latency):

1. a first run into a new cache (every row is a call);
2. the same rows again into a new output (every row should come from the cache: 0 calls);
3. a file of the same size where 30% of the rows repeat other rows' texts, into a fresh cache
   (calls should be the distinct texts: 30% fewer), against the same file with the cache off.

    PYTHONPATH=$PWD python benchmarks/cache.py --rows 2000
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from raycls.config import parse_spec
from raycls.job.pipeline import run_job
from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--duplicated", type=float, default=0.3)
    args = p.parse_args()
    rows = pq.read_table(DATASETS / "agnews_dev.parquet", columns=["id", "text", "label"]).to_pylist()[: args.rows]
    rng = random.Random(0)
    n_dup = int(len(rows) * args.duplicated)
    dup_rows = rows[: len(rows) - n_dup] + [dict(r, id=f"dup-{i}") for i, r in enumerate(rng.choices(rows[: len(rows) - n_dup], k=n_dup))]
    rng.shuffle(dup_rows)
    with tempfile.TemporaryDirectory() as tmp, FakeOpenAI(FakeOpenAIConfig(keys=["sk-b"], labels=LABELS, latency_ms=20)) as server:
        root = Path(tmp)
        (root / "keys").write_text("sk-b\n")

        def job(name: str, data: list[dict], cache: dict) -> dict:
            path = root / f"{name}.jsonl"
            if not path.exists():
                path.write_text("".join(json.dumps(r) + "\n" for r in data))
            spec = parse_spec({
                "input": {"path": str(path), "id_column": "id", "gold_column": "label"}, "labels": LABELS,
                "output": {"path": str(root / f"out-{name}-{len(list(root.iterdir()))}")}, "cache": cache,
                "backend": {"kind": "openai", "base_url": server.base_url, "model": "fake-model", "rpm": 1_000_000,
                            "tpm": 100_000_000, "api_keys": [f"file:{root / 'keys'}"]},
            })
            before = sum(k.accepted for k in server.stats().keys.values())
            started = time.monotonic()
            result = run_job(spec)
            took = time.monotonic() - started
            calls = sum(k.accepted for k in server.stats().keys.values()) - before
            cached = sum(pq.read_table(f"{result.output_path}/data", columns=["cached"]).column("cached").to_pylist())
            return {"rows": len(data), "calls": calls, "cached_rows": cached, "seconds": round(took, 1)}

        report = {
            "first_run": job("plain", rows, {"path": str(root / "cache-a")}),
            "second_run_new_output": job("plain", rows, {"path": str(root / "cache-a")}),
            "duplicated_cache_off": job("dups", dup_rows, {"enabled": False}),
            "duplicated_cache_on": job("dups", dup_rows, {"path": str(root / "cache-b")}),
            "distinct_texts_in_duplicated": len({r["text"] for r in dup_rows}),
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
