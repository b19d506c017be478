"""Faults injected into Ray workers for tests: programming errors that no server can cause.

Used as a Ray `worker_process_setup_hook` (runs in every worker process of a job as it
starts), so the job under test runs unchanged code everywhere else.
"""

from __future__ import annotations

INJECTED = "injected bug: reading the answer failed"


def break_answer_reading() -> None:
    """Make the API callers' answer reading raise a RuntimeError, as a bug in it would."""
    import raycls.backends.api.backend as openai_backend

    def broken(response, chat):
        raise RuntimeError(INJECTED)

    openai_backend.read_answer = broken
