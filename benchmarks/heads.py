"""Classifier-head benchmarks: accuracy, training time and labelling speed of fine-tuned heads.

    python benchmarks/heads.py agnews-minilm [--train-rows N] [--epochs E]
    python benchmarks/heads.py thucnews-gemma --train-rows 2000 --test-rows 500
    python benchmarks/heads.py chnsenticorp-gemma
    python benchmarks/heads.py agnews-from-llm --llm-output DIR [--min-confidence 0.5] [--teacher-dev DIR]
    python benchmarks/heads.py thucnews-from-llm --llm-output DIR --teacher-dev DIR [--char-ngrams 1,2]
    python benchmarks/heads.py serving --model DIR --test-rows 500
    python benchmarks/heads.py speed [--model DIR] --test-rows 1000 [--dataset agnews|thucnews] [--split train]

`speed` labels the same rows (AG News, or THUCNews titles with `--dataset thucnews`; the dev
file, or the train file with `--split train`), one job after the other in one process, with
the head through the data set's example classify config (`--model` replaces its head) and
with the embedded LLM on the vLLM backend (the data set's example prompt, `agnews.yaml` or
`thucnews_zh.yaml`, with `calibration: none`: the LLM's cheapest set-up), each as
`jobs/classify.py` runs it, and reports rows/s of both whole jobs and their ratio. Ray is
started once before both (its start is reported apart): each job pays its own model load
(the head's predictor actors, the LLM's engine start), as a job on a running cluster does.

The `*-from-llm` cases train a student on a teacher's labels: `--llm-output` is a finished
raycls output of the embedded model over training rows (it keeps their `text` column).
With `--teacher-dev` (the teacher's output over dev rows), the student is tested on exactly
those rows and the teacher's own accuracy on them is reported beside it. `--base-model
e5-small --method linear` makes the student an embedding head (the default for THUCNews).

`serving` compares, on the same agnews_dev rows in one process, the classifier backend's
predictor (torch, in-process, 2 threads) with vLLM's pooling runner (`LLM.classify`, what
`ray.data.llm`'s `task_type="classify"` runs) on a trained head directory: rows/s of each
and how often their labels agree; a runner that fails to load the model is reported as such.

Each case trains a head with `raycls.train` (Ray Train, as `jobs/train.py` does), then labels
the test rows with it through the `classifier` backend (`raycls.job.pipeline.run_job`, as
`jobs/classify.py` does), and prints one JSON line: the training curve (loss, validation
accuracy, seconds and rows/s per epoch), the data counts, and the test accuracy, macro-F1
and labelling rows/s. ChnSentiCorp has no training file: its dev file is split by a hash of
the row id (`--test-share` of it for testing, the rest for training), stated in the output.
BENCHMARKS.md holds the figures and the machine's state when they were taken.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


from raycls.testing.bench import fresh_response_cache

REPO = Path(__file__).resolve().parents[1]
fresh_response_cache()
DATA = REPO.parent / "shared" / "datasets"

AGNEWS = ["World", "Sports", "Business", "Sci/Tech"]


def labels_of(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return sorted(set(pq.read_table(path, columns=["label"]).column("label").to_pylist()))


def train_and_label(name: str, train: dict, test_path: str, labels: list[str], work: Path, test_rows: int | None,
                    max_length: int, text: str = "text") -> dict:
    from raycls.config import parse_spec
    from raycls.job.pipeline import run_job
    from raycls.train.run import train as train_head
    from raycls.train.spec import parse_train_spec

    spec = parse_train_spec({**train, "labels": labels, "output": {"path": str(work / "head")}})
    started = time.monotonic()
    trained = train_head(spec)
    train_s = time.monotonic() - started
    job = parse_spec({
        "input": {"path": test_path, "text": text, "id_column": "id", "gold_column": "label"},
        "labels": labels, "limit": test_rows,
        "backend": {"kind": "classifier", "model": trained["model_dir"], "batch_size": 64, "num_cpus": 2, "max_length": max_length},
        "output": {"path": str(work / "labelled")},
    })
    result = run_job(job).metrics
    return {
        "case": name, "train_rows": trained["data"]["rows_train"], "validation_rows": trained["data"]["rows_validation"],
        "data": trained["data"], "curve": trained.get("curve"), "train_total_s": round(train_s, 1),
        "linear": {k: trained[k] for k in ("C", "val_accuracy", "embed_s", "fit_s", "ngram_features") if k in trained} or None,
        "test_path": test_path, "test_rows": result["rows_written"], "test_accuracy": result.get("accuracy"),
        "test_macro_f1": result.get("macro_f1"), "label_rows_per_s": result["rows_per_s"], "label_elapsed_s": result["elapsed_s"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def teacher_rows(dev_path: Path, teacher_dev: str, work: Path) -> tuple[str, dict]:
    """The dev rows the teacher labelled (as a file the student labels), and the teacher's scores on them."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from raycls.quality.metrics import scores_from_counts

    teacher = pq.read_table(Path(teacher_dev) / "data", columns=["id", "label", "input_label"])
    dev = pq.read_table(dev_path)
    rows = dev.filter(pc.is_in(dev.column("id"), value_set=teacher.column("id")))
    path = work / "teacher_dev_rows.parquet"
    pq.write_table(rows, path)
    pairs = [(g, p, 1) for g, p in zip(teacher.column("input_label").to_pylist(), teacher.column("label").to_pylist())]
    scores = scores_from_counts(pairs, sorted(set(dev.column("label").to_pylist())))
    return str(path), {"rows": teacher.num_rows, "accuracy": round(scores["accuracy"], 4),
                       "macro_f1": round(scores["macro_f1"], 4), "unanswered": pc.sum(pc.is_null(teacher.column("label"))).as_py() or 0}


def hash_split(source: Path, work: Path, test_share: float, seed: int) -> tuple[str, str]:
    """Split a file into train/test Parquet files by a hash of the row id (raycls.train.data.held_out)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raycls.train.data import held_out

    table = pq.read_table(source)
    test = pa.array([held_out(i, seed, test_share) for i in table.column("id").to_pylist()])
    train_path, test_path = work / "split_train.parquet", work / "split_test.parquet"
    pq.write_table(table.filter(pa.compute.invert(test)), train_path)
    pq.write_table(table.filter(test), test_path)
    return str(train_path), str(test_path)


def serving(model_dir: str, rows: int, max_length: int) -> dict:
    """Rows/s of the torch predictor and of vLLM's pooling runner on the same rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raycls import schema
    from raycls.backends.classifier import HeadPredictor, head_labels

    texts = pq.read_table(DATA / "agnews_dev.parquet", columns=["text"]).column("text").to_pylist()[:rows]
    labels = head_labels(model_dir)
    out: dict = {"case": "serving", "model": model_dir, "rows": len(texts), "max_length": max_length,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    started = time.monotonic()
    predictor = HeadPredictor(model_dir, labels, max_length, threads=2, use_gpu=False, model_name="head")
    loaded = time.monotonic()
    torch_labels = []
    for i in range(0, len(texts), 64):
        chunk = texts[i:i + 64]
        batch = pa.table({schema.TEXT: pa.array(chunk, pa.string()), schema.ERROR: pa.array([None] * len(chunk), pa.string())})
        torch_labels += predictor(batch).column(schema.LABEL).to_pylist()
    done = time.monotonic()
    out["torch"] = {"load_s": round(loaded - started, 1), "rows_per_s": round(len(texts) / (done - loaded), 1)}
    try:
        from vllm import LLM

        started = time.monotonic()
        llm = LLM(model=model_dir, runner="pooling", dtype="float32", enforce_eager=True, max_model_len=max_length)
        loaded = time.monotonic()
        tok = llm.get_tokenizer()
        prompts = [{"prompt_token_ids": tok(t, truncation=True, max_length=max_length)["input_ids"]} for t in texts]
        results = llm.classify(prompts)
        done = time.monotonic()
        vllm_labels = [labels[max(range(len(r.outputs.probs)), key=r.outputs.probs.__getitem__)] for r in results]
        agree = sum(a == b for a, b in zip(torch_labels, vllm_labels)) / len(texts)
        out["vllm_classify"] = {"load_s": round(loaded - started, 1), "rows_per_s": round(len(texts) / (done - loaded), 1),
                                "label_agreement_with_torch": round(agree, 4)}
    except Exception as exc:  # the measurement is whether it runs at all
        out["vllm_classify"] = {"error": f"{type(exc).__name__}: {str(exc)[:500]}"}
    return out


SPEED_SETS = {  # data set: (dev file, train file, the embedded LLM's example config, the head's classify config)
    "agnews": ("agnews_dev.parquet", "agnews_train.parquet", "agnews.yaml", "agnews_classifier.yaml"),
    "thucnews": ("thucnews_titles_dev.parquet", "thucnews_titles_train.parquet", "thucnews_zh.yaml",
                 "thucnews_classifier.yaml"),
}


def speed(model_dir: str | None, rows: int, dataset: str = "agnews", split: str = "dev") -> dict:
    """Whole-job rows/s of the head and of the embedded LLM on the same rows, one after the other."""
    import yaml

    from raycls.config import parse_spec
    from raycls.job.pipeline import init_ray, run_job

    work = Path(tempfile.mkdtemp(prefix="heads-speed-"))
    dev, train, llm_config, head_config = SPEED_SETS[dataset]
    path = str(DATA / (dev if split == "dev" else train))
    llm = yaml.safe_load((REPO / "jobs" / "configs" / llm_config).read_text())
    head = yaml.safe_load((REPO / "jobs" / "configs" / head_config).read_text())
    if model_dir:
        head["backend"]["model"] = model_dir

    def read(config: dict) -> dict:  # every train file is id, text, label (AG News dev has title and description)
        return {**config["input"], "path": path} if split == "dev" else {"path": path, "text": "text", "id_column": "id",
                                                                          "gold_column": "label"}

    jobs = {
        "head": {**head, "input": read(head), "limit": rows, "output": {"path": str(work / "head")}},
        "llm": {**llm, "input": read(llm), "limit": rows, "calibration": "none", "output": {"path": str(work / "llm")}},
    }
    out: dict = {"case": "speed", "dataset": dataset, "file": path, "model": head["backend"]["model"], "rows": rows,
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    started = time.monotonic()
    init_ray()  # once, before both jobs: neither pays Ray's start
    out["ray_start_s"] = round(time.monotonic() - started, 1)
    for name, job in jobs.items():
        started = time.monotonic()
        metrics = run_job(parse_spec(job)).metrics
        wall = time.monotonic() - started
        out[name] = {"wall_s": round(wall, 1), "rows_written": metrics["rows_written"],
                     "rows_per_s": round(metrics["rows_written"] / wall, 2), "job_rows_per_s": metrics.get("rows_per_s"),
                     "rows_cached": metrics.get("rows_cached"), "accuracy": metrics.get("accuracy")}
    out["head_over_llm"] = round(out["head"]["rows_per_s"] / out["llm"]["rows_per_s"], 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("case", choices=["agnews-minilm", "thucnews-gemma", "chnsenticorp-gemma", "agnews-from-llm",
                                         "thucnews-from-llm", "serving", "speed"])
    parser.add_argument("--model", help="serving: a trained head directory")
    parser.add_argument("--train-rows", type=int, help="first N training rows (default: all)")
    parser.add_argument("--test-rows", type=int, help="first N test rows (default: all)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--method", choices=["full", "lora", "linear"], default=None)
    parser.add_argument("--base-model", default=None, help="from-llm students: minilm (AG News default) or e5-small")
    parser.add_argument("--char-ngrams", default=None, help="linear students: n-gram lengths 'min,max' (e.g. 1,2)")
    parser.add_argument("--teacher-dev", help="*-from-llm: the teacher's finished output over dev rows (test on those rows)")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--learning-rate", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dataset", choices=sorted(SPEED_SETS), default="agnews", help="speed: whose files and example configs")
    parser.add_argument("--split", choices=["dev", "train"], default="dev",
                        help="speed: which file of the data set (THUCNews train has 10,000 titles)")
    parser.add_argument("--test-share", type=float, default=0.5, help="chnsenticorp: share of the dev file held out for testing")
    parser.add_argument("--llm-output", help="*-from-llm: a finished raycls output of the embedded model over training rows")
    parser.add_argument("--min-confidence", type=float, default=None)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the one training worker (= torch threads)")
    args = parser.parse_args()

    if args.case == "serving":
        print("RESULT " + json.dumps(serving(args.model, args.test_rows or 500, args.max_length or 128)), flush=True)
        return
    if args.case == "speed":
        print("RESULT " + json.dumps(speed(args.model, args.test_rows or 1000, args.dataset, args.split)), flush=True)
        return
    work = Path(tempfile.mkdtemp(prefix=f"heads-{args.case}-"))
    ray_cfg = {"workers": 1, "cpus_per_worker": args.cpus}
    training = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": 0}
    if args.case.endswith("-from-llm"):
        agnews = args.case == "agnews-from-llm"
        dev = DATA / ("agnews_dev.parquet" if agnews else "thucnews_titles_dev.parquet")
        labels = AGNEWS if agnews else labels_of(dev)
        base = args.base_model or ("minilm" if agnews else "e5-small")
        method = args.method or ("full" if agnews else "linear")
        max_length = args.max_length or (128 if agnews else 64)
        model = {"base_model": base, "method": method, "max_length": max_length}
        if method == "linear" and args.char_ngrams:
            model["linear"] = {"char_ngrams": [int(n) for n in args.char_ngrams.split(",")]}
        training["learning_rate"] = args.learning_rate or 1e-4
        data = {"from_output": args.llm_output, "text": "text", "min_confidence": args.min_confidence, "limit": args.train_rows}
        train = {"data": data, "validation": {"fraction": 0.1}, "model": model, "training": training, "ray": ray_cfg}
        test_path, teacher = str(dev), None
        if args.teacher_dev:
            test_path, teacher = teacher_rows(dev, args.teacher_dev, work)
        out = train_and_label(args.case, train, test_path, labels, work, args.test_rows, max_length)
        out["teacher_on_test_rows"] = teacher
    elif args.case == "agnews-minilm":
        max_length = args.max_length or 128
        model = {"base_model": "minilm", "method": args.method or "full", "max_length": max_length}
        training["learning_rate"] = args.learning_rate or 1e-4
        data = {"path": str(DATA / "agnews_train.parquet"), "id_column": "id", "label_column": "label", "limit": args.train_rows}
        train = {"data": data, "validation": {"fraction": 0.1}, "model": model, "training": training, "ray": ray_cfg}
        out = train_and_label(args.case, train, str(DATA / "agnews_dev.parquet"), AGNEWS, work, args.test_rows, max_length)
    else:
        max_length = args.max_length or (48 if args.case == "thucnews-gemma" else 160)
        model = {"base_model": "embedded:gemma3-270m", "method": args.method or "lora", "max_length": max_length,
                 "freeze_embeddings": True, "lora": {"rank": 16, "alpha": 32}}
        training["learning_rate"] = args.learning_rate or (2e-4 if model["method"] == "lora" else 3e-5)
        if args.case == "thucnews-gemma":
            train_path, test_path = str(DATA / "thucnews_titles_train.parquet"), str(DATA / "thucnews_titles_dev.parquet")
        else:
            train_path, test_path = hash_split(DATA / "chnsenticorp_htl_dev.parquet", work, args.test_share, seed=7)
        data = {"path": train_path, "id_column": "id", "label_column": "label", "limit": args.train_rows}
        train = {"data": data, "validation": {"fraction": 0.1}, "model": model, "training": training, "ray": ray_cfg}
        out = train_and_label(args.case, train, test_path, labels_of(Path(test_path)), work, args.test_rows, max_length)
    out["args"] = vars(args)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
