"""The API backend's HTTP session against the fault-injection server on 127.0.0.1: answers,
and each way a request fails as its own typed error (no Ray)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from raycls.backends.api.http import ApiConnectionError, ApiSession, ApiStatusError, ApiTimeout, MalformedBody

LABELS = ["negative", "positive"]
BODY = {"model": "fake-model", "prompt": "Text: clean room\nLabel:", "max_tokens": 4, "logprobs": 2,
        "structured_outputs": {"choice": LABELS}}


def post(base_url: str, key: str = "sk-fake", timeout_s: float = 5.0, body: dict = BODY):
    async def go():
        session = ApiSession(base_url, timeout_s, connections=4)
        try:
            return await session.post("/completions", body, key)
        finally:
            await session.close()

    return asyncio.run(go())


def test_an_answer_comes_back_as_its_json_body_and_headers(fake_openai):
    server = fake_openai(labels=LABELS, rpm=100)
    answer = post(server.base_url)
    assert answer.body["choices"][0]["text"].strip() in LABELS
    assert answer.headers["X-RateLimit-Limit-Requests"] == "100"  # case-insensitive, as servers vary


def test_an_unknown_key_is_a_status_error_with_the_servers_code(fake_openai):
    server = fake_openai(labels=LABELS)
    with pytest.raises(ApiStatusError) as err:
        post(server.base_url, key="sk-wrong")
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"


def test_a_cut_json_body_is_malformed(fake_openai):
    server = fake_openai(labels=LABELS, malformed_rate=1.0, malformed_kinds=["body"])
    with pytest.raises(MalformedBody):
        post(server.base_url)


def test_a_server_that_holds_the_request_times_out(fake_openai):
    server = fake_openai(labels=LABELS, timeout_rate=1.0, hang_s=30)
    with pytest.raises(ApiTimeout):
        post(server.base_url, timeout_s=0.5)


def test_nothing_listening_is_a_connection_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed: nothing listens there
    with pytest.raises(ApiConnectionError):
        post(f"http://127.0.0.1:{port}/v1")
