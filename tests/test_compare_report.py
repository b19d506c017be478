"""`raycls compare` over the fault-injection API server, and its report opened in real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from raycls.cli import main
from tests.conftest import UNPACED

pytestmark = pytest.mark.ray

LABELS = ["negative", "positive"]


def _oracle(prompt: str) -> str:
    # A model that says "good" too often; rows "... number 0-4 ... dirty" are answered "bad".
    text = prompt.rsplit("Text:", 1)[-1]
    return "bad" if "dirty" in text and re.search(r"review \d*[0-4]:", text) else "good"


@pytest.fixture(scope="module")
def report(ray_local, tmp_path_factory):
    from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig

    tmp = tmp_path_factory.mktemp("compare")
    rows = [{"text": f"review {i}: the room was {'clean' if i % 2 else 'dirty'}", "label": LABELS[i % 2]} for i in range(24)]
    (tmp / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "keys.txt").write_text("sk-fake\n")
    (tmp / "words.yaml").write_text(yaml.safe_dump({"labels": [{"name": "negative", "answer": "bad"}, {"name": "positive", "answer": "good"}]}))
    with FakeOpenAI(FakeOpenAIConfig(labels=["bad", "good", *LABELS], oracle=_oracle)) as server:
        base = {
            "input": {"path": str(tmp / "in.jsonl"), "gold_column": "label"},
            "labels": LABELS,
            "output": {"path": str(tmp / "unused")},
            "backend": {"kind": "openai", "base_url": server.base_url, "model": "fake-model",
                        "api_keys": [f"file:{tmp / 'keys.txt'}"], "endpoint": "completions", **UNPACED},
        }
        (tmp / "base.yaml").write_text(yaml.safe_dump(base))
        code = main(["compare", "--config", str(tmp / "base.yaml"), "--output", str(tmp / "cmp"), "--limit", "20",
                     "--variant", "names", "--variant", "words", str(tmp / "words.yaml"),
                     "--variant", "words-batch", str(tmp / "words.yaml"), "calibration=batch"])
    assert code == 0
    return tmp / "cmp"


def test_each_variant_keeps_its_own_output_over_the_same_rows(report):
    metrics = {v: json.loads((report / v / "metrics.json").read_text()) for v in ("names", "words", "words-batch")}
    assert {m["rows_written"] for m in metrics.values()} == {20}
    assert metrics["words-batch"]["calibration"]["method"] == "batch"
    assert metrics["words"]["calibration"]["prior"] is None


def test_the_report_embeds_every_figure_and_writes_the_pngs(report):
    page = (report / "report.html").read_text()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert pngs == sorted(["confusion_names.png", "confusion_words.png", "confusion_words-batch.png",
                           "per_class_f1.png", "reliability.png", "coverage.png", "answers.png"])
    assert page.count('src="data:image/png;base64,') == len(pngs)
    assert "Rows where the variants disagree" in page


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed (.ci/run installs it: apt-get install chromium)")
    return path


def test_the_report_renders_in_headless_chromium_with_all_its_images(report):
    args = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000"]
    dom = subprocess.run([*args, "--dump-dom", (report / "report.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    # The page's own script counts the images the browser decoded (naturalWidth > 0) after load.
    assert "figures: 7 of 7 rendered" in dom
    shot = report / "screenshot.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=1200,2400", (report / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    from PIL import Image

    image = Image.open(shot).convert("L")
    assert len(np.unique(np.asarray(image))) > 20  # not a blank page: text, tables and plots drawn
