"""raycls: label text with LLMs (or fine-tuned heads) at data-lake scale, as a Ray Data job.

The public surface, importable without starting Ray or loading a model::

    from raycls import load_spec, run_job
    result = run_job(load_spec("jobs/configs/agnews.yaml", ["backend.batch_size=32"]))
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from raycls.config import JobSpec, load_spec, parse_spec
from raycls.errors import RayclsError

try:
    __version__ = version("raycls")
except PackageNotFoundError:  # a checkout on the path, not installed
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from raycls.job.pipeline import JobResult, run_job

__all__ = ["JobResult", "JobSpec", "RayclsError", "__version__", "load_spec", "parse_spec", "run_job"]


def __getattr__(name: str) -> Any:
    if name in ("run_job", "JobResult"):  # imports Ray: only when asked for
        from raycls.job import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'raycls' has no attribute {name!r}")
