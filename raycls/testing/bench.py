"""What every benchmark shares: the response cache on, as users have it, but empty.

A benchmark measures the model, so no answer may come from an earlier run; it does not
switch the cache off either (users run with it on, and its lookups are part of the cost).
`fresh_response_cache()` points the default cache location at a new directory of this
process and says so on the console, so each benchmark's output states what it measured.
"""

from __future__ import annotations

import os
import tempfile

from raycls.backends.cache import ENV_PATH


_PREFIX = "raycls-bench-responses-"


def fresh_response_cache() -> str:
    """A new, empty default response cache for this process (and the jobs it starts); returns its path."""
    inherited = os.environ.get(ENV_PATH, "")
    if os.path.basename(inherited).startswith(_PREFIX):  # a process this benchmark started (vLLM spawns)
        return inherited
    path = tempfile.mkdtemp(prefix=_PREFIX)
    os.environ[ENV_PATH] = path
    print(f"response cache: on, empty at the start ({path}); answers repeated within this process are served from it",
          flush=True)
    return path
