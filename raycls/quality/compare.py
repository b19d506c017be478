"""`raycls compare`: one base spec, several variants, the same rows, one Ray session, one report.

    python jobs/compare.py --config jobs/configs/agnews.yaml --limit 200 --output out/cmp \\
        --variant basic \\
        --variant json prompt=json \\
        --variant batch calibration=batch \\
        --variant words benchmarks/overlays/agnews_words.yaml calibration=batch

A variant is a name followed by overlays applied to the base spec in order: `KEY=VALUE`
(as `--set`, the value parsed as YAML) or a YAML file whose mapping is merged into the
spec (mappings merge key by key; lists, such as `labels`, are replaced whole). Every
variant labels the same rows (the base's input and `--limit`) into `<output>/<name>/`
(a full raycls output: Parquet, metrics.json, review queue when asked), one after the
other in one Ray session; then `raycls.quality.report` writes `<output>/report.html` and its PNGs.
"""

from __future__ import annotations

import argparse
import copy
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from raycls import schema
from raycls.config import JobSpec, parse_spec, set_override
from raycls.errors import SpecError
from raycls.quality.review import output_text

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Variant:
    name: str
    overlays: list[str]


@dataclass
class VariantResult:
    """One variant's run: its spec, its metrics, and its rows (a pandas DataFrame)."""

    name: str
    spec: JobSpec
    metrics: dict[str, Any]
    rows: Any
    wall_s: float


def parse_variant(tokens: list[str]) -> Variant:
    name, *overlays = tokens
    if not _NAME.match(name):
        raise SpecError("--variant", f"a variant name is letters, digits, '_', '.', '-' (it names a folder), got {name!r}")
    return Variant(name, overlays)


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """`overlay` merged into a copy of `base`: mappings key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_yaml(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise SpecError("", f"file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise SpecError("", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise SpecError("", f"{path}: expected a mapping at the top level")
    return data


def variant_spec(base: dict[str, Any], variant: Variant, output: str, limit: int | None) -> JobSpec:
    """The variant's spec: the base, its overlays, its own output folder, the shared limit."""
    data = copy.deepcopy(base)
    for overlay in variant.overlays:
        if "=" in overlay and not overlay.endswith((".yaml", ".yml")):
            set_override(data, overlay)
        else:
            data = merge(data, load_yaml(overlay))
    data.setdefault("output", {})["path"] = f"{output.rstrip('/')}/{variant.name}"
    if limit is not None:
        data["limit"] = limit
    return parse_spec(data, source=f"variant {variant.name}")


def output_rows(spec: JobSpec, path: str):
    """The variant's rows as a DataFrame: id, gold, text, and the result columns the report uses."""
    import pyarrow.parquet as pq

    from raycls.inputs.datasource import pyarrow_filesystem

    filesystem, data_path = pyarrow_filesystem(f"{path}/data")
    table = pq.read_table(data_path, filesystem=filesystem)
    frame = table.to_pandas()
    frame["_text"] = [output_text(spec.input.text, row) for row in table.to_pylist()]
    gold = schema.stored_name(spec.input.gold_column) if spec.input.gold_column else None
    frame["_gold"] = frame[gold] if gold else None
    return frame.sort_values(schema.ID).reset_index(drop=True)


def run_variants(base: dict[str, Any], variants: list[Variant], output: str, limit: int | None) -> list[VariantResult]:
    """Run every variant, one after the other, in this process's Ray session."""
    from raycls.job.pipeline import run_job
    from raycls.job.session import init_ray

    specs = [variant_spec(base, v, output, limit) for v in variants]  # every spec checked before any runs
    init_ray()
    results = []
    for variant, spec in zip(variants, specs):
        print(f"== variant {variant.name}: {' '.join(variant.overlays) or '(base)'}", flush=True)
        started = time.monotonic()
        result = run_job(spec, overwrite=True)
        results.append(VariantResult(variant.name, spec, result.metrics, output_rows(spec, result.output_path),
                                     time.monotonic() - started))
    return results


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `raycls compare`."""
    parser.add_argument("--config", required=True, help="the base job spec (YAML)")
    parser.add_argument("--variant", nargs="+", action="append", required=True, metavar="NAME [OVERLAY ...]",
                        help="a variant: its name, then KEY=VALUE overrides or YAML files merged into the base")
    parser.add_argument("--output", required=True, help="folder for the variants' outputs and report.html")
    parser.add_argument("--limit", type=int, default=None, help="label only the first N rows (the same rows in every variant)")
    parser.add_argument("--input", default=None, help="replace input.path of the base spec")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base spec key")
    parser.add_argument("--title", default=None, help="the report's title (default: the base spec's file name)")


def compare(config: str, variants: list[list[str]], output: str, limit: int | None = None, input_path: str | None = None,
            sets: list[str] = (), title: str | None = None) -> Path:
    """Run every variant over the same rows and write the report; returns the report's path.

    `variants`: each a name, then KEY=VALUE overrides or YAML overlay files (`--variant`)."""
    base = load_yaml(config)
    for assignment in sets:
        set_override(base, assignment)
    if input_path:
        base.setdefault("input", {})["path"] = input_path
    parsed = [parse_variant(tokens) for tokens in variants]
    names = [v.name for v in parsed]
    if len(set(names)) != len(names):
        raise SpecError("--variant", f"variant names must be unique, got {names}")
    results = run_variants(base, parsed, output, limit)
    from raycls.quality.report import write_report

    return write_report(results, output, title=title or Path(config).stem)
