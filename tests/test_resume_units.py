"""`resume.reconcile` and `resume.committed_rows` on local folders, without Ray.

The files are laid out the way Ray Data's checkpointed write leaves them: per write task a
checkpoint `<prefix>.pending.parquet` (rows being written) renamed to `<prefix>.parquet`
(committed) once the data file `<output>/data/<prefix>-<n>.parquet` is whole. A kill can
stop that at any point; reconcile must leave what Ray's recovery expects.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycls.errors import ResumeError
from raycls.job.resume import committed_rows, reconcile


@pytest.fixture
def out(tmp_path: Path) -> Path:
    (tmp_path / "_checkpoint").mkdir()
    (tmp_path / "data").mkdir()
    return tmp_path


def checkpoint(out: Path, prefix: str, ids: list[str], pending: bool = False) -> Path:
    path = out / "_checkpoint" / f"{prefix}{'.pending' if pending else ''}.parquet"
    pq.write_table(pa.table({"id": ids}), path)
    return path


def data_file(out: Path, prefix: str, n: int = 0) -> Path:
    path = out / "data" / f"{prefix}-{n}.parquet"
    pq.write_table(pa.table({"id": ["x"], "label": ["World"]}), path)
    return path


def run_reconcile(out: Path) -> None:
    reconcile(str(out / "_checkpoint"), str(out / "data"))


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_data_with_a_committed_checkpoint_is_kept(out):
    checkpoint(out, "ds_w_1", ["a", "b"])
    data_file(out, "ds_w_1", 0)
    data_file(out, "ds_w_1", 1)
    run_reconcile(out)
    assert names(out / "data") == {"ds_w_1-0.parquet", "ds_w_1-1.parquet"}
    assert names(out / "_checkpoint") == {"ds_w_1.parquet"}


def test_data_with_a_pending_checkpoint_is_left_for_ray_to_delete(out):
    """Ray's own recovery deletes it (and relabels its rows): reconcile must not lose the pairing."""
    checkpoint(out, "ds_w_2", ["c"], pending=True)
    data_file(out, "ds_w_2")
    run_reconcile(out)
    assert names(out / "data") == {"ds_w_2-0.parquet"}
    assert names(out / "_checkpoint") == {"ds_w_2.pending.parquet"}


def test_a_checkpoint_both_committed_and_pending_keeps_only_the_committed_one(out):
    """An object-store rename (copy + delete) cut short: the data is whole, so it stays."""
    checkpoint(out, "ds_w_3", ["d"])
    checkpoint(out, "ds_w_3", ["d"], pending=True)
    data_file(out, "ds_w_3")
    run_reconcile(out)
    assert names(out / "_checkpoint") == {"ds_w_3.parquet"}
    assert names(out / "data") == {"ds_w_3-0.parquet"}


def test_a_data_file_matching_no_checkpoint_is_removed(out):
    checkpoint(out, "ds_w_1", ["a"])
    data_file(out, "ds_w_1")
    data_file(out, "ds_w_9")
    run_reconcile(out)
    assert names(out / "data") == {"ds_w_1-0.parquet"}


def test_a_task_prefix_is_matched_whole_not_as_a_string_prefix(out):
    """`ds_w_1` committed says nothing about `ds_w_12`'s data."""
    checkpoint(out, "ds_w_1", ["a"])
    data_file(out, "ds_w_12")
    run_reconcile(out)
    assert names(out / "data") == set()


def test_data_without_any_checkpoint_is_refused(out):
    data_file(out, "ds_w_1")
    with pytest.raises(ResumeError, match=r"1 data file\(s\) but the checkpoint .* is gone.*--overwrite"):
        run_reconcile(out)
    assert names(out / "data") == {"ds_w_1-0.parquet"}  # nothing deleted on a refusal


def test_an_empty_output_needs_nothing(out):
    run_reconcile(out)
    assert names(out / "data") == set() and names(out / "_checkpoint") == set()


def test_a_missing_checkpoint_folder_with_no_data_needs_nothing(tmp_path):
    reconcile(str(tmp_path / "_checkpoint"), str(tmp_path / "data"))
    assert not (tmp_path / "data").exists()


def test_committed_rows_counts_only_committed_checkpoints(out):
    checkpoint(out, "ds_w_1", ["a", "b", "c"])
    checkpoint(out, "ds_w_2", ["d", "e"])
    checkpoint(out, "ds_w_3", ["f"], pending=True)
    assert committed_rows(str(out / "_checkpoint")) == 5


def test_committed_rows_of_no_checkpoint_is_zero(tmp_path):
    assert committed_rows(str(tmp_path / "_checkpoint")) == 0
