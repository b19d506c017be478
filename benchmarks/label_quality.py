"""Label quality of the embedded model: one `raycls compare` run per development set.

    python benchmarks/label_quality.py agnews --rows 200
    python benchmarks/label_quality.py chnsenticorp --rows 200
    python benchmarks/label_quality.py thucnews --rows 200

Each set's dev file is shuffled with a fixed seed (THUCNews and ChnSentiCorp dev are
sorted by class) and written to a temp folder; the first `--rows` rows of it are the
rows every variant labels. The report (`report.html` and its PNGs) is copied to
`benchmarks/reports/<set>/`; BENCHMARKS.md holds the figures.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
OVERLAYS = REPO / "benchmarks" / "overlays"
SEED = 9

SETS = {
    "agnews": ("agnews_dev", "jobs/configs/agnews.yaml", [
        ["names", f"{OVERLAYS}/agnews_names.yaml", "calibration=none"],
        ["words", f"{OVERLAYS}/agnews_words.yaml", "calibration=none"],
        ["words-batch", f"{OVERLAYS}/agnews_words.yaml", "calibration=batch"],
    ]),
    "chnsenticorp": ("chnsenticorp_htl_dev", "jobs/configs/chnsenticorp.yaml", [
        ["names", "calibration=none"],
        ["names-batch", "calibration=batch"],
    ]),
    "thucnews": ("thucnews_titles_dev", "jobs/configs/thucnews_zh.yaml", [
        ["names-basic", f"{OVERLAYS}/thucnews_names.yaml", "prompt=basic", "calibration=none"],
        ["words-basic-batch", f"{OVERLAYS}/thucnews_words.yaml", "prompt=basic", "calibration=batch"],
    ]),
}
"""The variants run (each costs one or two engine starts on CPU, minutes on a busy 2-core box)."""


def shuffled_input(dev: str, folder: Path) -> str:
    """The dev file in a fixed random order (seed 9), as Parquet."""
    import pyarrow.parquet as pq

    table = pq.read_table(DATASETS / f"{dev}.parquet")
    order = list(range(table.num_rows))
    random.Random(SEED).shuffle(order)
    path = folder / f"{dev}_shuffled.parquet"
    pq.write_table(table.take(order), path)
    return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", choices=sorted(SETS))
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--only", nargs="*", default=None, help="run only these variants")
    parser.add_argument("--output", default=None, help="where the variants' outputs go (default: a temp folder)")
    args = parser.parse_args()
    dev, config, variants = SETS[args.set]
    out = Path(args.output or tempfile.mkdtemp(prefix=f"raycls-quality-{args.set}-"))
    out.mkdir(parents=True, exist_ok=True)
    chosen = [v for v in variants if args.only is None or v[0] in args.only]
    argv = ["--config", str(REPO / config), "--input", shuffled_input(dev, out), "--limit", str(args.rows),
            "--output", str(out / "compare"), "--title", f"{dev}, {args.rows} rows (seed {SEED})"]
    for variant in chosen:
        argv += ["--variant", *variant]
    from raycls.compare import main as compare

    code = compare(argv)
    if code == 0:
        reports = REPO / "benchmarks" / "reports" / args.set
        shutil.rmtree(reports, ignore_errors=True)
        reports.mkdir(parents=True)
        for item in (out / "compare").iterdir():
            if item.suffix in (".png", ".html"):
                shutil.copy(item, reports / item.name)
    return code


if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    sys.exit(main())
