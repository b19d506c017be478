"""The Batch API's HTTP, from the driver: upload a file, create, retrieve, list and cancel
batches, download results. A handful of calls per batch of up to 50,000 rows, so plain
blocking `urllib` (no event loop, no dependency); errors are `api_http`'s typed ones, so
the same rules apply (401/403 drop a key, 5xx and broken connections are retried).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

from raycls.backends.api.http import _version, json_object
from raycls.backends.api.http import ApiConnectionError, ApiStatusError, ApiTimeout, _error_object

RETRIES = 4
"""Attempts of one call after a 5xx, 408/409, timeout or broken connection (backoff 1, 2, 4 s)."""


class BatchClient:
    """One provider's Batch API; every call names the key it uses."""

    def __init__(self, base_url: str, timeout_s: float = 120.0, backoff_s: float = 1.0):
        self.base = base_url.rstrip("/")
        self.timeout_s, self.backoff_s = timeout_s, backoff_s

    def upload(self, key: str, content: bytes, filename: str) -> dict[str, Any]:
        """POST /files (multipart, purpose=batch): the file object."""
        boundary = uuid.uuid4().hex
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
                "Content-Type: application/jsonl\r\n\r\n").encode()
        body = head + content + f"\r\n--{boundary}--\r\n".encode()
        return self._json("POST", "/files", key, body, f"multipart/form-data; boundary={boundary}")

    def create(self, key: str, file_id: str, endpoint: str, window: str, metadata: dict[str, str]) -> dict[str, Any]:
        body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": window, "metadata": metadata}
        return self._json("POST", "/batches", key, json.dumps(body).encode(), "application/json")

    def retrieve(self, key: str, batch_id: str) -> dict[str, Any]:
        return self._json("GET", f"/batches/{batch_id}", key)

    def cancel(self, key: str, batch_id: str) -> dict[str, Any]:
        return self._json("POST", f"/batches/{batch_id}/cancel", key, b"", "application/json")

    def list(self, key: str, limit: int = 100, after: str | None = None) -> dict[str, Any]:
        return self._json("GET", f"/batches?limit={limit}" + (f"&after={after}" if after else ""), key)

    def content(self, key: str, file_id: str) -> bytes:
        """GET /files/{id}/content: the raw bytes (JSONL)."""
        return self._call("GET", f"/files/{file_id}/content", key, None, None)

    # -- transport ---------------------------------------------------------------------------

    def _json(self, method: str, path: str, key: str, body: bytes | None = None, ctype: str | None = None) -> dict[str, Any]:
        return json_object(self._call(method, path, key, body, ctype))

    def _call(self, method: str, path: str, key: str, body: bytes | None, ctype: str | None) -> bytes:
        headers = {"Authorization": f"Bearer {key}", "User-Agent": f"raycls/{_version()}"}
        if ctype:
            headers["Content-Type"] = ctype
        for attempt in range(RETRIES + 1):
            request = urllib.request.Request(self.base + path, data=body, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                error: Exception = ApiStatusError(exc.code, _error_object(exc.read()), dict(exc.headers))
                transient = exc.code >= 500 or exc.code in (408, 409)
            except TimeoutError:
                error, transient = ApiTimeout("timed out"), True
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                error, transient = ApiConnectionError(type(exc).__name__), True
            if not transient or attempt == RETRIES:
                raise error
            time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")
