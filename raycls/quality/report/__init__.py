"""The comparison report: one self-contained `report.html` (PNGs embedded as base64) plus the PNGs.

Built from the variants `raycls.quality.compare` ran: a table of figures per variant (accuracy,
macro-F1, ECE, Brier, accuracy at coverage, rows/s, tokens, cost, invalid and multi-label
answers), a confusion-matrix heatmap per variant, per-class F1 bars, a reliability
diagram, accuracy-vs-coverage curves, the invalid/multi-label answers, and the rows
where the variants disagree with their texts. Needs the `report` extra (matplotlib).
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from string import Template
from typing import Any

from raycls.quality.report import plots

TEMPLATE = Path(__file__).with_name("template.html")
MAX_DISAGREEMENTS = 50
"""Rows listed where the variants disagree (the first by id)."""
TEXT_CHARS = 300


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def figures_table(results: list[Any]) -> str:
    """The per-variant figures as an HTML table."""
    head = ["variant", "rows", "accuracy", "macro-F1", "ECE", "Brier", "acc@50%", "acc@80%", "rows/s",
            "tokens in", "tokens out", "cost $", "invalid", "multi-label"]
    lines = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for r in results:
        m = r.metrics
        at = {c["target"]: c["accuracy"] for c in m.get("coverage", [])}
        cells = [html.escape(r.name), m.get("rows_written"), m.get("accuracy"), m.get("macro_f1"), m.get("ece"), m.get("brier"),
                 at.get(0.5), at.get(0.8), m.get("rows_per_s"), m.get("input_tokens"), m.get("output_tokens"),
                 m.get("cost_usd"), m.get("rows_failed"), m.get("multi_label_outputs")]
        lines.append("<tr>" + "".join(f"<td>{c if i == 0 else _fmt(c)}</td>" for i, c in enumerate(cells)) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def variants_list(results: list[Any]) -> str:
    """What each variant changed (prompt, language, calibration, verbalizers, model)."""
    items = []
    for r in results:
        s = r.spec
        words = {label.name: label.answer for label in s.labels if label.answer}
        bits = [f"prompt <b>{html.escape(s.prompt)}</b> ({s.language})", f"calibration <b>{s.calibration.method}</b>",
                f"{len(s.few_shot)}-shot", f"model {html.escape(s.backend.model)} ({s.backend.kind})"]
        if words:
            bits.append("answers " + ", ".join(f"{html.escape(k)}&rarr;{html.escape(v)}" for k, v in words.items()))
        items.append(f"<li><b>{html.escape(r.name)}</b>: " + "; ".join(bits) + "</li>")
    return "<ul>" + "".join(items) + "</ul>"


def disagreements(results: list[Any]) -> str:
    """Rows whose label differs between variants, with text, gold and each variant's label."""
    if len(results) < 2:
        return "<p class='note'>one variant: nothing to compare.</p>"
    frames = [r.rows.set_index("id") for r in results]
    ids = sorted(set(frames[0].index).intersection(*(f.index for f in frames[1:])))
    rows = []
    for row_id in ids:
        labels = [f.at[row_id, "label"] for f in frames]
        if len({str(x) for x in labels}) > 1:
            rows.append((row_id, labels))
    head = "".join(f"<th>{html.escape(r.name)}</th>" for r in results)
    lines = [f"<p class='note'>{len(rows)} of {len(ids)} rows differ; the first {min(len(rows), MAX_DISAGREEMENTS)} by id.</p>",
             f"<table><tr><th>id</th><th class='text'>text</th><th>gold</th>{head}</tr>"]
    for row_id, labels in rows[:MAX_DISAGREEMENTS]:
        text = frames[0].at[row_id, "_text"] or ""
        gold = frames[0].at[row_id, "_gold"]
        cells = "".join(
            f"<td class='{'ok' if str(x) == str(gold) else 'wrong'}'>{_fmt(x)}</td>" for x in labels
        )
        short = text if len(text) <= TEXT_CHARS else text[: TEXT_CHARS - 1] + "…"
        lines.append(f"<tr><td>{_fmt(row_id)}</td><td class='text'>{html.escape(short)}</td><td>{_fmt(gold)}</td>{cells}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def write_report(results: list[Any], output: str, title: str = "comparison") -> str:
    """Write the PNGs and `report.html` under `output` (a local folder); returns the HTML's path."""
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)

    def embed(name: str, png: bytes | None, alt: str) -> str:
        if png is None:
            return f"<p class='note'>{html.escape(alt)}: no data.</p>"
        (folder / name).write_bytes(png)
        data = base64.b64encode(png).decode("ascii")
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" title="{html.escape(name)}">'

    confusion = "".join(
        embed(f"confusion_{_slug(r.name)}.png", plots.confusion(r.name, r.metrics), f"confusion matrix of {r.name}")
        for r in results
    )
    page = Template(TEMPLATE.read_text(encoding="utf-8")).substitute(
        title=html.escape(title),
        summary=html.escape(f"{len(results)} variants over the same rows; each variant's output is in its own folder here."),
        variants=variants_list(results),
        table=figures_table(results),
        confusion=confusion,
        f1=embed("per_class_f1.png", plots.per_class_f1(results), "F1 per class"),
        reliability=embed("reliability.png", plots.reliability(results), "reliability diagram"),
        coverage=embed("coverage.png", plots.coverage_curves(results), "accuracy vs coverage"),
        answers=embed("answers.png", plots.answers(results), "multi-label and invalid answers"),
        disagreements=disagreements(results),
    )
    path = folder / "report.html"
    path.write_text(page, encoding="utf-8")
    return str(path)
