"""Prompt templates: loading them from `prompts/`, rendering a row into a prompt or chat messages.

A template is a YAML file with an English (`en`) and a Chinese (`zh`) version, and says
what the model answers with: the bare `label`, or a `json` object with `reasoning` and
`label`. Everything but the row's text is rendered once per job (`PromptPlan`), so the
per-row work is one string substitution.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from raycls.config import JobSpec
from raycls.errors import SpecError

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "builtin_prompts"
"""The built-in templates: package data, so a wheel carries them. In a checkout it is a link
to the top-level `prompts/` (where users look for them); the wheel holds copies."""
_TEXT_SLOT = "\x00TEXT\x00"


@dataclass(frozen=True)
class PromptPlan:
    """A job's prompt with everything but the text filled in."""

    name: str
    answer: Literal["label", "json"]
    """What the model answers with: the bare label, or a JSON object."""
    reasoning: bool
    """Whether the JSON answer carries a `reasoning` field (asked before the label)."""
    head: str
    """Prompt text before the row's text."""
    tail: str
    """Prompt text after it, ending with the answer cue (e.g. `Category:`)."""
    answer_prefix: str
    """What goes between the cue and the answer in plain completion (a space in English)."""
    labels: tuple[str, ...]
    """What the model writes for each label: its verbalizer (`Label.answer`), else its name."""
    names: tuple[str, ...] = ()
    """The user's label names, in the order of `labels` (empty: the same as `labels`)."""

    @property
    def label_names(self) -> tuple[str, ...]:
        return self.names or self.labels

    @property
    def name_of(self) -> dict[str, str]:
        """Answer word -> label name (names map to themselves too), for the output."""
        return {**dict(zip(self.label_names, self.label_names)), **dict(zip(self.labels, self.label_names))}

    def render(self, text: str) -> str:
        """The user-visible prompt for one row."""
        return f"{self.head}{text}{self.tail}"

    def messages(self, text: str) -> list[dict[str, str]]:
        """The same prompt as chat messages, for models and APIs with a chat template."""
        return [{"role": "user", "content": self.render(text)}]

    @property
    def expects_json(self) -> bool:
        return self.answer == "json"

    @property
    def prompt_id(self) -> str:
        """A hash of the rendered template and the label set: equal ids, equal prompts."""
        material = [self.head, self.tail, self.answer, self.reasoning, self.labels]
        if self.names and self.names != self.labels:
            material.append(self.names)  # the same answers standing for other names are another job
        material = json.dumps(material)
        return hashlib.sha256(material.encode()).hexdigest()[:16]

    @property
    def fixed_text(self) -> str:
        """The prompt without the row's text, for counting the tokens every row pays."""
        return self.head + self.tail


def template_path(name: str) -> Path:
    """A built-in name (`basic`) or a path to a YAML template."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    return BUILTIN_DIR / f"{name}.yaml"


def load_template(name: str, language: str) -> dict:
    path = template_path(name)
    if not path.exists():
        builtins = sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))
        raise SpecError("prompt", f"no prompt template {name!r}: expected one of {builtins} or a path to a .yaml file")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError("prompt", f"{path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or doc.get("answer") not in ("label", "json"):
        raise SpecError("prompt", f"{path}: expected a mapping with 'answer: label' or 'answer: json'")
    if language not in doc:
        raise SpecError("language", f"{path} has no {language!r} version (it has {[k for k in doc if k in ('en', 'zh')]})")
    version = doc[language]
    for key in ("template", "label_line", "example"):
        if key not in version:
            raise SpecError("prompt", f"{path}: {language}.{key} is missing")
    return {"answer": doc["answer"], "reasoning": bool(doc.get("reasoning", False)), **version}


def build_plan(spec: JobSpec) -> PromptPlan:
    """Render the job's template with its labels, instructions and few-shot examples."""
    tpl = load_template(spec.prompt, spec.language)
    label_lines = []
    for label in spec.labels:
        line = tpl.get("label_line_described", tpl["label_line"]) if label.description else tpl["label_line"]
        label_lines.append(line.format(name=label.word, description=label.description or ""))
    word = dict(zip(spec.label_names, spec.label_words))
    examples = "".join(_render_example(tpl, ex.text, word[ex.label], ex.reasoning) for ex in spec.few_shot)
    instructions = spec.instructions or tpl.get("instructions", "")
    try:
        full = tpl["template"].format(
            instructions=instructions, labels="\n".join(label_lines), examples=examples, text=_TEXT_SLOT
        )
    except (KeyError, IndexError) as exc:
        raise SpecError("prompt", f"template {spec.prompt!r} uses an unknown placeholder {exc}") from None
    if full.count(_TEXT_SLOT) != 1:
        raise SpecError("prompt", f"template {spec.prompt!r} must contain {{text}} exactly once")
    head, tail = full.split(_TEXT_SLOT)
    return PromptPlan(
        name=spec.prompt,
        answer=tpl["answer"],
        reasoning=tpl["reasoning"],
        head=head,
        tail=tail.rstrip(),
        answer_prefix=tpl.get("answer_prefix", ""),
        labels=tuple(spec.label_words),
        names=tuple(spec.label_names),
    )


def _render_example(tpl: dict, text: str, label: str, reasoning: str | None) -> str:
    answer = {"reasoning": reasoning or "", "label": label} if tpl["reasoning"] else {"label": label}
    return tpl["example"].format(text=text, label=label, json=json.dumps(answer, ensure_ascii=False))


def row_text(template: str, row: dict) -> str | None:
    """The text to classify: a column's value, or a template over columns (`{title}. {body}`).

    Returns None when the text is missing; a template with every column missing is None too.
    """
    if "{" not in template:
        value = row.get(template)
        return None if value is None else str(value)
    values = {k: ("" if v is None else v) for k, v in row.items()}
    text = template.format_map(values)
    return text if any(row.get(k) not in (None, "") for k in template_columns(template)) else None


def template_columns(template: str) -> list[str]:
    """The columns a text template refers to (or the column itself when it is a plain name)."""
    if "{" not in template:
        return [template]
    import string

    return [field for _, field, _, _ in string.Formatter().parse(template) if field]
