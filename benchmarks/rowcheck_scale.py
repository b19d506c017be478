"""What the run-time rows-out = rows-in check costs: `raycls.job.rowcheck` at 1M ids.

    python benchmarks/rowcheck_scale.py --rows 1000000

Writes an input (Parquet, `id` + a short `text`, in 10 files) and an output `data/`
directory as a run leaves it (one file per 64-row write batch would be 15,625 files; here
`--files` of them), then times the check the pipeline makes after the write: equal sets
(the common case: one digest pass per side) and a run that lost one batch (the digests
differ in a few buckets; the ids of those buckets are fetched to name the missing rows).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


def write(root: Path, rows: int, input_files: int, output_files: int) -> None:
    ids = [f"doc-{i:09d}" for i in range(rows)]
    (root / "in").mkdir()
    (root / "out").mkdir()
    step = -(-rows // input_files)
    for f in range(input_files):
        part = ids[f * step:(f + 1) * step]
        pq.write_table(pa.table({"id": part, "text": [f"text of {i}" for i in part]}), root / "in" / f"part-{f}.parquet")
    step = -(-rows // output_files)
    for f in range(output_files):
        part = ids[f * step:(f + 1) * step]
        pq.write_table(pa.table({"id": part, "label": ["a"] * len(part)}), root / "out" / f"data-{f}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--output-files", type=int, default=200)
    args = parser.parse_args()

    import ray
    import ray.data

    from raycls.config import parse_spec
    from raycls.errors import RowCountError
    from raycls.inputs.datasource import InputDatasource, resolve_input
    from raycls.job.pipeline import init_ray, parquet_reads_v1
    from raycls.job.rowcheck import check_rows

    root = Path(tempfile.mkdtemp(prefix="rowcheck-"))
    write(root, args.rows, 10, args.output_files)
    spec = parse_spec({"input": {"path": str(root / "in"), "id_column": "id"}, "labels": ["a", "b"],
                       "output": {"path": str(root / "o")}})
    init_ray()
    files = resolve_input(spec.input)

    def timed(out_dir: Path) -> tuple[float, str]:
        started = time.monotonic()
        with parquet_reads_v1():
            read = ray.data.read_datasource(InputDatasource(spec.input, files))
            written = ray.data.read_parquet(str(out_dir), columns=["id"])
            try:
                outcome = f"equal, {check_rows(read, written)} rows"
            except RowCountError as exc:
                outcome = f"mismatch: {len(exc.missing)} missing"
        return time.monotonic() - started, outcome

    equal_s, equal = timed(root / "out")
    lost = pq.read_table(root / "out" / "data-7.parquet")
    pq.write_table(lost.slice(64), root / "out" / "data-7.parquet")  # a lost 64-row batch
    lost_s, mismatch = timed(root / "out")
    print(f"rows {args.rows}, output files {args.output_files}, cpus {ray.cluster_resources().get('CPU')}")
    print(f"check, sets equal:        {equal_s:6.1f} s  ({equal})")
    print(f"check, one batch lost:    {lost_s:6.1f} s  ({mismatch})")


if __name__ == "__main__":
    main()
