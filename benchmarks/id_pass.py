"""The duplicate-id pass (`raycls.inputs.ids`) on 1M ids: what it adds before a job starts.

`python benchmarks/id_pass.py [--rows 1000000] [--files 8] [--formats parquet,jsonl,csv]`
writes an input of `--rows` rows (an `id` column, a short `text`) split over `--files` files
in each format, with 0.1% of the ids repeated, then times, in a local Ray of 4 CPUs:

- `id_pass`: `duplicate_renames` with `input.duplicate_ids: suffix` (read every file's ids
  in Ray tasks, count on the driver, plan the renames);
- `error`: the same with the default policy, until the error is raised;

and prints one JSON line per figure. Compare with Ray's own checkpoint load of 1M ids in
BENCHMARKS.md (resume at scale, (a)), the cost the issue set as the bar.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq


def write_input(root: Path, fmt: str, rows: int, files: int) -> None:
    root.mkdir(parents=True)
    ids = [f"doc-{i:08d}" for i in range(rows)]
    for i in range(0, rows, 1000):  # 0.1% repeated
        ids[i + 1] = ids[i]
    per = -(-rows // files)
    for f in range(files):
        part = pa.table({"id": ids[f * per:(f + 1) * per], "text": [f"row {i}" for i in range(f * per, min(rows, (f + 1) * per))]})
        path = root / f"part-{f}.{fmt}"
        if fmt == "parquet":
            pq.write_table(part, path)
        elif fmt == "csv":
            pacsv.write_csv(part, path)
        else:
            path.write_text("".join(json.dumps(r) + "\n" for r in part.to_pylist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--formats", default="parquet,jsonl,csv")
    args = parser.parse_args()

    import ray

    from raycls.config import InputSpec
    from raycls.errors import InputError
    from raycls.inputs.ids import duplicate_renames
    from raycls.inputs.datasource import resolve_input

    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    tmp = Path(tempfile.mkdtemp(prefix="raycls-idpass-"))
    try:
        for fmt in args.formats.split(","):
            root = tmp / fmt
            write_input(root, fmt, args.rows, args.files)
            size = sum(p.stat().st_size for p in root.iterdir())
            for policy in ("suffix", "error"):
                spec = InputSpec(path=str(root), id_column="id", duplicate_ids=policy)
                files = resolve_input(spec)
                started = time.perf_counter()
                try:
                    plan = duplicate_renames(spec, files)
                    renamed = sum(len(r.rows) for r in plan.values())
                except InputError:
                    renamed = None
                elapsed = time.perf_counter() - started
                print(json.dumps({"figure": "id_pass", "format": fmt, "policy": policy, "rows": args.rows, "files": args.files,
                                  "input_mb": round(size / 2**20, 1), "seconds": round(elapsed, 2), "renamed": renamed}), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
