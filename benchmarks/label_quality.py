"""Label quality of the embedded model: one `raycls compare` run per development set.

    python benchmarks/label_quality.py agnews --rows 200
    python benchmarks/label_quality.py chnsenticorp --rows 200
    python benchmarks/label_quality.py thucnews --rows 200

Each set's dev file is shuffled with a fixed seed (THUCNews and ChnSentiCorp dev are
sorted by class) and written to a temp folder; the first `--rows` rows of it are the
rows every variant labels. The report (`report.html` and its PNGs) is copied to
`benchmarks/reports/<set>/`; BENCHMARKS.md holds the figures.

    python benchmarks/label_quality.py effect OUTPUT_DIR

reads one calibrated run's output and prints accuracy and macro-F1 of the raw argmax,
argmax(p / prior) and argmax(p - prior) over the same engine outputs (`label_probs_raw`).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from raycls.testing.bench import fresh_response_cache  # noqa: E402

fresh_response_cache()
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
        ["words-batch", f"{OVERLAYS}/chnsenticorp_words.yaml", "calibration=batch"],
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


def calibration_effect(output: str) -> dict:
    """From one calibrated run's output: accuracy and macro-F1 of three decisions on the same
    engine outputs: the raw argmax (what `calibration: none` labels, for the bare-label prompt),
    argmax(p / prior) (raycls) and argmax(p - prior) (as Zhou et al. write batch calibration)."""
    import json

    import pyarrow.parquet as pq
    from sklearn.metrics import accuracy_score, f1_score

    rows = [r for r in pq.read_table(f"{output}/data").to_pylist() if r["label_probs_raw"]]
    prior = json.loads(open(f"{output}/metrics.json").read())["calibration"]["prior"]
    gold = [r["input_label"] for r in rows]
    decisions = {
        "raw": lambda p: max(p, key=p.get),
        "divide": lambda p: max(p, key=lambda k: p[k] / max(prior[k], 1e-6)),
        "subtract": lambda p: max(p, key=lambda k: p[k] - prior[k]),
    }
    out = {"rows": len(rows)}
    for name, decide in decisions.items():
        pred = [decide(r["label_probs_raw"]) for r in rows]
        out[name] = {"accuracy": round(accuracy_score(gold, pred), 4),
                     "macro_f1": round(f1_score(gold, pred, average="macro", zero_division=0), 4)}
    return out


def main() -> int:
    if sys.argv[1:2] == ["effect"]:  # python benchmarks/label_quality.py effect OUTPUT_DIR
        import json

        print(json.dumps(calibration_effect(sys.argv[2])))
        return 0
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
    argv = ["compare", "--config", str(REPO / config), "--input", shuffled_input(dev, out), "--limit", str(args.rows),
            "--output", str(out / "compare"), "--title", f"{dev}, {args.rows} rows (seed {SEED})"]
    for variant in chosen:
        argv += ["--variant", *variant]
    from raycls.cli import main as raycls

    code = raycls(argv)
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
