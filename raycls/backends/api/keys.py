"""API keys: resolved from `env:NAME` / `file:PATH` references where they are used, never shown.

The spec holds references only. Keys are read inside the caller actors (and, to count
them and fail early, on the driver), so they never travel as task arguments, never sit
in Ray's job metadata, and never reach a log. Keys are named by their position and
source, `key#2 (env:OPENAI_KEYS[1])`, which identifies one without revealing it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from raycls.errors import SpecError


@dataclass(frozen=True)
class ApiKeys:
    """Resolved keys and their printable labels, in the same order."""

    values: tuple[str, ...]
    labels: tuple[str, ...]

    def __repr__(self) -> str:  # never print the values, even by accident
        return f"ApiKeys({list(self.labels)})"

    __str__ = __repr__

    def redact(self, text: str) -> str:
        """`text` with every key replaced by its label: for messages that came from a server."""
        for value, label in zip(self.values, self.labels):
            if value:
                text = text.replace(value, f"<{label.split(' ')[0]}>")
        return text


def resolve_keys(refs: list[str], environ: Mapping[str, str] | None = None) -> ApiKeys:
    """Read every reference; blanks and duplicates are dropped (a duplicate would double its budget)."""
    environ = os.environ if environ is None else environ
    values: list[str] = []
    labels: list[str] = []
    for i, ref in enumerate(refs):
        found = _read_ref(ref, f"backend.api_keys[{i}]", environ)
        for j, value in enumerate(found):
            if value in values:
                continue
            source = ref if len(found) == 1 else f"{ref}[{j}]"
            labels.append(f"key#{len(values)} ({source})")
            values.append(value)
    return ApiKeys(tuple(values), tuple(labels))


def _read_ref(ref: str, where: str, environ: Mapping[str, str]) -> list[str]:
    kind, _, name = ref.partition(":")
    if kind == "env":
        raw = _read_env(name, where, environ, "it should hold the API key, or several separated by commas")
        found = [part.strip() for part in raw.split(",")]
    elif kind == "file":
        found = [line.strip() for line in _read_file(name, where).splitlines() if not line.strip().startswith("#")]
    else:
        raise SpecError(where, "expected 'env:VARIABLE' or 'file:PATH'")
    found = [key for key in found if key]
    if not found:
        raise SpecError(where, f"{ref} holds no key")
    return found


def _read_env(name: str, where: str, environ: Mapping[str, str], what: str) -> str:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        raise SpecError(where, f"environment variable {name} is not set or empty ({what})")
    return raw


def _read_file(name: str, where: str) -> str:
    path = Path(name).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(where, f"cannot read key file {path}: {exc.strerror}") from None


def read_reference(ref: str, where: str, environ: Mapping[str, str] | None = None) -> str:
    """One secret value (a catalog password, a storage key) from `env:NAME` or `file:PATH`
    (the file's first line that is not a comment); errors name `where`, never the value."""
    environ = os.environ if environ is None else environ
    kind, _, name = ref.partition(":")
    if kind == "env":
        return _read_env(name, where, environ, "it should hold the value").strip()
    if kind == "file":
        lines = [line.strip() for line in _read_file(name, where).splitlines() if line.strip() and not line.strip().startswith("#")]
        if lines:
            return lines[0]
        raise SpecError(where, f"{ref} holds no value")
    raise SpecError(where, "expected 'env:VARIABLE' or 'file:PATH'")
