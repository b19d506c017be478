"""The review queue: the least confident rows again, under `<output>/review/`, for a person to check.

`output.review` picks the rows: confidence below a threshold (`below`), or the least
confident share of the rows (`share`); rows with an error or no confidence come first in
both. Each becomes one line with its id, its text (the input text column, or the
`input.text` template rendered from the kept columns; null when those columns were not
kept), the label written, and the two most probable labels with their probabilities,
sorted most doubtful first (lowest confidence, then smallest lead of the first label over
the second). Written as `review.parquet` and `review.csv`, once, after the main output.

Reduced without a shuffle: each block keeps its own candidates (for `share`, its k least
confident rows, k the share of all rows), the driver merges and keeps the k least confident.
"""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa

from raycls import schema
from raycls.prompting.prompts import row_text, template_columns

REVIEW_DIR = "review"
REVIEW_COLUMNS = ("id", "text", "label", "confidence", "first_label", "first_prob",
                  "second_label", "second_prob", "error")
_TYPES = {"confidence": pa.float64(), "first_prob": pa.float64(), "second_prob": pa.float64()}


def review_schema() -> pa.Schema:
    return pa.schema([pa.field(c, _TYPES.get(c, pa.string())) for c in REVIEW_COLUMNS])


def review_rows(block: pa.Table, text: str, below: float | None, keep: int | None) -> pa.Table:
    """The block's candidates as review lines: under `below`, or among its `keep` most doubtful."""
    lines = []
    for row in block.to_pylist():
        ranked = sorted((row.get(schema.LABEL_PROBS) or {}).items(), key=lambda kv: -(kv[1] or 0.0))
        first, second = (ranked + [(None, None)] * 2)[:2]
        lines.append({
            "id": str(row[schema.ID]), "text": output_text(text, row),
            "label": row.get(schema.LABEL), "confidence": row.get(schema.CONFIDENCE),
            "first_label": first[0], "first_prob": first[1], "second_label": second[0], "second_prob": second[1],
            "error": row.get(schema.ERROR),
        })
    return select(pa.Table.from_pylist(lines, schema=review_schema()), below, keep)


def output_text(template: str, row: dict[str, Any]) -> str | None:
    """A written row's text: `input.text` (a column or a template) over the kept input columns.

    Columns the output did not keep count as empty; None when none of them was kept.
    """
    stored = {c: schema.stored_name(c) for c in template_columns(template)}
    if not any(s in row for s in stored.values()):
        return None
    return row_text(template, {c: row.get(s) for c, s in stored.items()})


def select(table: pa.Table, below: float | None, keep: int | None) -> pa.Table:
    """Review lines sorted most doubtful first, keeping those under `below` or among the first `keep`."""
    lines = sorted(table.to_pylist(), key=_doubt)
    lines = [r for i, r in enumerate(lines) if (keep is not None and i < keep) or (below is not None and _doubt(r)[0] < below)]
    return pa.Table.from_pylist(lines, schema=review_schema())


def _doubt(line: dict[str, Any]) -> tuple[float, float]:
    """Sort key, most doubtful first: no confidence or an error, then low confidence, then small lead."""
    if line["error"] or line["confidence"] is None:
        return (-1.0, 0.0)
    lead = (line["first_prob"] or 0.0) - (line["second_prob"] or 0.0)
    return (line["confidence"], lead)


def write_review(spec, out: str, metrics: dict[str, Any]) -> str | None:
    """Write `<out>/review/review.{parquet,csv}` when `output.review` is set; returns the folder."""
    rule = spec.output.review
    if rule is None:
        return None
    import fsspec
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    import ray.data

    from raycls.inputs.datasource import pyarrow_filesystem

    keep = math.ceil(rule.share * metrics.get("rows_written", 0)) if rule.share is not None else None
    filesystem, data_path = pyarrow_filesystem(f"{out}/data")
    from raycls.job.session import parquet_reads_v1

    with parquet_reads_v1():
        ds = ray.data.read_parquet(data_path, filesystem=filesystem)
    fn_kwargs = {"text": spec.input.text, "below": rule.below, "keep": keep}
    parts = ds.map_batches(review_rows, fn_kwargs=fn_kwargs, batch_format="pyarrow", batch_size=None)
    blocks = [b for b in parts.iter_batches(batch_format="pyarrow", batch_size=None)]
    table = pa.concat_tables(blocks) if blocks else review_schema().empty_table()
    table = select(table, rule.below, keep)
    folder = f"{out.rstrip('/')}/{REVIEW_DIR}"
    fs, _ = fsspec.core.url_to_fs(folder)
    fs.makedirs(folder, exist_ok=True)
    with fsspec.open(f"{folder}/review.parquet", "wb") as f:
        pq.write_table(table, f)
    with fsspec.open(f"{folder}/review.csv", "wb") as f:
        pcsv.write_csv(table, f)
    metrics["review_rows"] = table.num_rows
    return folder
