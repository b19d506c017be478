"""What a person sees while a job runs: by default, warnings and one progress display; with
`--verbose`, everything vLLM and Ray print.

Call `configure(verbose)` before Ray starts (the environment variables it sets are read by
Ray's and vLLM's processes when they start), and pass `ray_init_kwargs(verbose)` to
`ray.init`. Ray's own log files stay where Ray keeps them (`ray_log_dir()` says where).

Progress: Ray Data's own machinery, reduced to its one overall bar (rows done of total,
rows/s, ETA; a tqdm bar on a terminal), instead of one bar per operator.
"""

from __future__ import annotations

import logging
import os
from typing import Any

QUIET_LOGGERS = ("ray", "ray.data", "ray.serve", "ray.llm", "vllm", "httpx", "openai", "filelock", "transformers")
"""Loggers turned down to WARNING by default: their INFO lines are one per step or request."""

QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "WARNING",  # vLLM's INFO lines, in the engine actor and its workers
    "RAY_DEDUP_LOGS": "1",  # repeated worker lines once, if any reach the driver
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",  # the fork warning of Hugging Face tokenizers
}
"""Environment for Ray's and vLLM's processes when the console is quiet; set only where unset."""


_VERBOSE = False


def configure(verbose: bool) -> None:
    """Quiet by default: vLLM's and Ray's INFO lines off, one progress bar. `verbose` leaves
    everything as the libraries have it."""
    global _VERBOSE
    _VERBOSE = verbose
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_operator_progress_bars = False  # the overall bar only
    context.enable_progress_bars = True


def ray_init_kwargs(verbose: bool | None = None) -> dict[str, Any]:
    """Arguments for `ray.init`: worker output (with its `(pid=...)` prefixes) reaches the
    console only when verbose (default: as `configure` was told); it is always in Ray's log files."""
    verbose = _VERBOSE if verbose is None else verbose
    return {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}


def ray_log_dir() -> str | None:
    """Where this Ray session writes its logs (for the summary), or None before Ray starts."""
    import ray

    if not ray.is_initialized():
        return None
    try:
        from ray._private.worker import global_worker

        return os.path.join(global_worker.node.get_session_dir_path(), "logs")
    except Exception:  # a private API; the summary just leaves the line out
        return None
