"""The API backend's HTTP: JSON requests to an OpenAI-compatible server over one aiohttp
session per caller actor, and what can go wrong with them, as a few typed errors.

Why not the official `openai` client: the HTTP side of the OpenAI API is small (POST JSON
to `{base_url}/completions` or `/chat/completions` with a Bearer key; an error is a status
and `{"error": {"message", "type", "code"}}`), while the client's per-request work
(parameter transforms, request and response models, httpx) cost 1.1-2.1 ms of CPU per
request, against 0.2 ms for the same POST through aiohttp, and capped a caller actor at a
few hundred requests/s (BENCHMARKS.md, "raycls's own overhead"). Retries, key rotation and
rate limits were ours anyway (`raycls.backends.api.backend`); the official client stays the
reference the fault-injection server is tested against (`tests/test_fake_openai.py`).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Mapping



class ApiError(Exception):
    """A request that got no usable answer. `status_code` is None when no HTTP status came back."""

    status_code: int | None = None


class ApiStatusError(ApiError):
    """The server answered with an error status; `body` is its `error` object (or `{}`)."""

    def __init__(self, status_code: int, body: dict[str, Any], headers: Mapping[str, str]):
        super().__init__(f"HTTP {status_code}")
        self.status_code, self.body, self.headers = status_code, body, headers

    @property
    def message(self) -> str:
        message = self.body.get("message")
        return message if isinstance(message, str) else ""

    @property
    def reason(self) -> str:
        """Message, parameter and code together: what a 400 blames may sit in any of them."""
        parts = (self.body.get(k) for k in ("message", "param", "code"))
        return " ".join(p for p in parts if isinstance(p, str))

    @property
    def code(self) -> str | None:
        code = self.body.get("code") or self.body.get("type")
        return code if isinstance(code, str) else None


class ApiTimeout(ApiError):
    """No complete answer within `backend.timeout_s`."""


class ApiConnectionError(ApiError):
    """The connection failed or broke before an answer came back."""


class MalformedBody(ApiError, ValueError):
    """A 2xx answer whose body is not a JSON object."""


@dataclass(frozen=True)
class ApiResponse:
    """A 2xx answer: its JSON body and headers (case-insensitive, for the rate-limit ones)."""

    body: dict[str, Any]
    headers: Mapping[str, str]


class ApiSession:
    """POSTs JSON bodies to one server with any of the run's keys. Create and use it on the
    caller actor's event loop; `close()` there too."""

    def __init__(self, base_url: str, timeout_s: float, connections: int):
        import aiohttp

        self._aiohttp = aiohttp
        self._base = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=max(1, connections)),
            headers={"User-Agent": f"raycls/{_version()}", "Accept": "application/json"},
            json_serialize=lambda body: json.dumps(body, ensure_ascii=False),
        )

    async def post(self, path: str, body: dict[str, Any], key: str) -> ApiResponse:
        """POST `body` to `{base_url}{path}` with `key`; raises an ApiError for anything but a JSON 2xx."""
        aiohttp = self._aiohttp
        try:
            async with self._session.post(self._base + path, json=body, timeout=self._timeout,
                                          headers={"Authorization": f"Bearer {key}"}) as response:
                raw = await response.read()
                status, headers = response.status, response.headers
        except asyncio.TimeoutError:
            raise ApiTimeout("timed out") from None
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise ApiConnectionError(type(exc).__name__) from None
        if status >= 400:
            raise ApiStatusError(status, _error_object(raw), headers)
        return ApiResponse(json_object(raw), headers)

    async def close(self) -> None:
        await self._session.close()


def _error_object(raw: bytes) -> dict[str, Any]:
    """The `error` object of an error body (`{"error": {...}}`, or the object itself); `{}` if none."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {}
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return parsed["error"]
    return parsed if isinstance(parsed, dict) else {}


def json_object(raw: bytes | str) -> dict[str, Any]:
    """A response body that must be a JSON object; anything else is a MalformedBody."""
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise MalformedBody("malformed response body") from None
    if not isinstance(parsed, dict):
        raise MalformedBody("response body is not a JSON object")
    return parsed


def _version() -> str:
    """raycls's version for the User-Agent (without importing the package: no import cycle)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("raycls")
    except PackageNotFoundError:  # a checkout that was not installed
        return "0"
