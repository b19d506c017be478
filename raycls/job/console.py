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
from pathlib import Path
from typing import Any

QUIET_LOGGERS = ("ray", "ray.serve", "ray.llm", "vllm", "httpx", "openai", "filelock", "transformers")
"""Loggers turned down to WARNING by default: their INFO lines are one per step or request."""

QUIET_ENV = {
    "VLLM_LOGGING_LEVEL": "WARNING",  # vLLM's INFO lines, in the engine actor and its workers
    "RAY_DEDUP_LOGS": "1",  # repeated worker lines once, if any reach the driver
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",  # the fork warning of Hugging Face tokenizers
    # Ray Data re-reads its logging configuration whenever a dataset starts: this one keeps its
    # console at WARNING (its log files keep everything), so its INFO lines and, when output is
    # not a terminal, its logged progress blocks stay off the console.
    "RAY_DATA_LOGGING_CONFIG": str(Path(__file__).with_name("ray_data_logging.yaml")),
}
"""Environment for Ray's and vLLM's processes when the console is quiet; set only where unset."""


QUIET_NOTICES = {
    # Every `ray.init` resets the "ray" logger to INFO; `ray.data.llm` calls it again while the
    # job builds its vLLM stage, and the worker module then notes "Calling ray.init() again".
    "ray._private.worker": logging.WARNING,
    # Ray 2.60 turns on token authentication for the cluster the job starts on this machine
    # itself, and says so as a WARNING on every start: nothing for the user to do.
    "ray._private.authentication.authentication_token_setup": logging.ERROR,
    # The CPU build of vLLM, on import: Triton has no CPU backend (it is not used on CPUs).
    "vllm.triton_utils.importing": logging.ERROR,
}
"""Loggers of single notices a default run would print that need no action: quiet unless verbose."""


def configure(verbose: bool) -> None:
    """Quiet by default: vLLM's and Ray's INFO lines off, one progress bar. `verbose` leaves
    everything as the libraries have it. Loggers and the environment are the process's own,
    so this sets them for the process; what Ray's workers print is `ray_init_kwargs`'s."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if verbose:
        return
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for name, level in QUIET_NOTICES.items():
        logging.getLogger(name).setLevel(level)
    # Ray LLM gives each of its loggers an INFO console handler unless "ray.llm" has one already.
    logging.getLogger("ray.llm").addHandler(logging.NullHandler())
    import ray.data
    from ray.data._internal.logging import configure_logging

    configure_logging()  # again, in case ray.data was imported before the environment was set
    context = ray.data.DataContext.get_current()
    context.enable_operator_progress_bars = False  # the overall bar only
    context.enable_progress_bars = True


class HideOwnChoices(logging.Filter):
    """Ray Data's console filter, less the notice that operator bars are off (raycls's choice)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from ray.data._internal.logging import HiddenRecordFilter

        if not HiddenRecordFilter().filter(record):
            return False
        return not record.getMessage().startswith("Progress bars for operators disabled")


def ray_init_kwargs(verbose: bool = False, worker_output: bool = False) -> dict[str, Any]:
    """Arguments for `ray.init`: worker output (with its `(pid=...)` prefixes) reaches the
    console only when verbose or asked for (`worker_output`: training, whose per-epoch
    lines the workers print); it is always in Ray's log files."""
    return {"log_to_driver": verbose or worker_output, "logging_level": logging.INFO if verbose else logging.WARNING}


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
