"""vLLM backend benchmarks: pipeline efficiency against plain `vllm.LLM.generate`, and label quality.

    python benchmarks/vllm_pipeline.py efficiency --rows 512
    python benchmarks/vllm_pipeline.py quality --rows 400

`efficiency` runs, in the same invocation and one after the other, (a) plain
`vllm.LLM(...).generate` on exactly the prompts and sampling parameters raycls sends,
and (b) `jobs/classify.py` on the same rows, each in a fresh process, and reports rows/s
of both and their ratio, with and without the engine start. `quality` labels a balanced
slice of agnews_dev with several prompt set-ups and reports accuracy and macro F1.
Results go to stdout as JSON lines; BENCHMARKS.md holds the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from raycls.testing.bench import fresh_response_cache  # noqa: E402

fresh_response_cache()
AGNEWS = REPO.parent / "shared" / "datasets" / "agnews_dev.parquet"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
DESCRIPTIONS = {
    "World": "international news, politics, conflicts, elections",
    "Sports": "games, athletes, teams, competitions",
    "Business": "companies, markets, the economy",
    "Sci/Tech": "science, technology, computing, space",
}


def balanced_rows(n: int, skip: int = 0) -> list[dict]:
    """n rows of agnews_dev, the same number from each class, in the file's order."""
    import pyarrow.parquet as pq

    rows = pq.read_table(AGNEWS).to_pylist()[skip:]
    per_class = n // len(LABELS)
    picked, seen = [], {label: 0 for label in LABELS}
    for row in rows:
        if seen[row["label"]] < per_class:
            picked.append(row)
            seen[row["label"]] += 1
    return picked


def spec_dict(input_path: str, out: str, **changes) -> dict:
    spec = {
        "input": {"path": input_path, "id_column": "id", "gold_column": "label"},
        "labels": [{"name": n, "description": d} for n, d in DESCRIPTIONS.items()],
        "instructions": "Classify the news article by topic.",
        "backend": {"kind": "vllm", "max_model_len": 1024, "batch_size": 64},
        "output": {"path": out},
    }
    for key, value in changes.items():
        spec[key] = value
    return spec


def write_input(rows: list[dict], folder: Path) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = folder / "input.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_spec(spec: dict, folder: Path, name: str) -> Path:
    import yaml

    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    return path


def plain_vllm(spec_path: str) -> None:
    """Child process: the same prompts and sampling params through vllm.LLM, timed."""
    import pyarrow.parquet as pq
    import vllm

    from raycls.backends.vllm import plan_engine, processor_config
    from raycls.config import load_spec
    from raycls.prompting.prompts import build_plan, row_text

    started = time.monotonic()
    spec = load_spec(spec_path)
    plan = build_plan(spec)
    engine = plan_engine(spec.backend, plan)
    tok = __import__("raycls.backends.vllm", fromlist=["_tokenizer"])._tokenizer(engine.model_path)
    prompts = []
    for row in pq.read_table(spec.input.path).to_pylist():
        ids = tok.encode(row_text(spec.input.text, row), add_special_tokens=False)[: engine.text_budget]
        prompts.append(plan.render(tok.decode(ids)))
    kwargs = processor_config(spec.backend, engine, on_gpu=_has_gpu()).engine_kwargs
    kwargs = {k: v for k, v in kwargs.items() if k != "task_type"}
    llm = vllm.LLM(model=engine.model_path, **kwargs)
    ready = time.monotonic()
    sampling = dict(engine.sampling_params)
    structured = vllm.sampling_params.StructuredOutputsParams(**sampling.pop("structured_outputs"))
    outputs = llm.generate(prompts, vllm.SamplingParams(**sampling, structured_outputs=structured), use_tqdm=False)
    done = time.monotonic()
    assert len(outputs) == len(prompts)
    print(json.dumps({"runner": "vllm.LLM.generate", "rows": len(prompts), "total_s": done - started,
                      "engine_start_s": ready - started, "generate_s": done - ready}), flush=True)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def run_child(args: list[str], env_extra: dict | None = None) -> tuple[float, str]:

    env = {**os.environ, **(env_extra or {})}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env)
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"child failed: {args}")
    return elapsed, proc.stdout


def efficiency(n: int) -> None:
    from raycls.backends.vllm import cpu_engine_env

    tmp = Path(tempfile.mkdtemp(prefix="raycls-bench-"))
    spec = spec_dict(write_input(balanced_rows(n), tmp), str(tmp / "out"))
    path = write_spec(spec, tmp, "efficiency")
    env = cpu_engine_env()  # the CPU engine's environment, as raycls gives its engine actors
    _, out = run_child([__file__, "_plain", str(path)], env)
    plain = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith('{"runner"')))
    total, _ = run_child(["jobs/classify.py", "--config", str(path), "--log-level", "WARNING"], env)
    metrics = json.loads((tmp / "out" / "metrics.json").read_text())
    result = {
        "rows": n,
        "plain_total_s": round(plain["total_s"], 1),
        "plain_engine_start_s": round(plain["engine_start_s"], 1),
        "plain_generate_s": round(plain["generate_s"], 1),
        "raycls_process_s": round(total, 1),
        "raycls_job_s": metrics["elapsed_s"],
        "plain_rows_per_s": round(n / plain["total_s"], 3),
        "raycls_rows_per_s": round(n / total, 3),
        "ratio_end_to_end": round(plain["total_s"] / total, 3),
        "ratio_after_engine_start": round(plain["generate_s"] / max(total - plain["engine_start_s"], 1e-9), 3),
    }
    print(json.dumps(result), flush=True)


QUALITY_SETUPS = {
    "basic zero-shot": {},
    "basic 4-shot": {"shots": 1},
    "basic 8-shot": {"shots": 2},
}


def quality(n: int) -> None:
    from raycls.backends.vllm import cpu_engine_env

    tmp = Path(tempfile.mkdtemp(prefix="raycls-quality-"))
    rows = balanced_rows(n)
    input_path = write_input(rows, tmp)
    eval_ids = {r["id"] for r in rows}
    pool = [r for r in balanced_rows(400, skip=1000) if r["id"] not in eval_ids]
    for name, setup in QUALITY_SETUPS.items():
        shots = []
        for label in LABELS:
            examples = [r for r in pool if r["label"] == label][: setup.get("shots", 0)]
            shots += [{"text": r["text"][:300], "label": label} for r in examples]
        order = sorted(range(len(shots)), key=lambda i: (i % setup.get("shots", 1), i))
        spec = spec_dict(input_path, str(tmp / name.replace(" ", "_")), few_shot=[shots[i] for i in order])
        path = write_spec(spec, tmp, name.replace(" ", "_"))
        total, _ = run_child(["jobs/classify.py", "--config", str(path), "--log-level", "WARNING"], cpu_engine_env())
        m = json.loads((tmp / name.replace(" ", "_") / "metrics.json").read_text())
        print(json.dumps({"setup": name, "rows": m["rows_written"], "accuracy": round(m["accuracy"], 4),
                          "macro_f1": round(m["macro_f1"], 4), "seconds": round(total, 1)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("efficiency").add_argument("--rows", type=int, default=512)
    sub.add_parser("quality").add_argument("--rows", type=int, default=400)
    sub.add_parser("_plain").add_argument("spec")
    args = parser.parse_args()
    if args.cmd == "efficiency":
        efficiency(args.rows)
    elif args.cmd == "quality":
        quality(args.rows)
    else:
        plain_vllm(args.spec)


if __name__ == "__main__":
    main()
