"""The fault-injection server, driven by the real `openai` client over real HTTP on 127.0.0.1.

Other tests trust this server's counts to prove raycls never exceeds a key's limits, so
its own limits, counting and faults are checked here first. No Ray, a few seconds.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx
import openai
import pytest

from raycls.testing.fake_openai import FakeOpenAI, FakeOpenAIConfig

LABELS = ["World", "Sports", "Business", "Sci/Tech"]
SCHEMA = {
    "type": "object",
    "properties": {"reasoning": {"type": "string"}, "label": {"type": "string", "enum": LABELS}},
    "required": ["reasoning", "label"],
}


class FakeClock:
    """The server's clock for its rate-limit windows, moved on by the test instead of sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@contextmanager
def clocked_server(**config):
    """A server whose windows run on a `FakeClock`: (server, clock)."""
    clock = FakeClock()
    with FakeOpenAI(FakeOpenAIConfig(**config), clock=clock) as server:
        yield server, clock


def poll(condition, what: str, deadline_s: float = 10.0) -> None:
    """Wait for `condition()` to hold, failing after `deadline_s` (never a fixed sleep)."""
    until = time.monotonic() + deadline_s
    while not condition():
        assert time.monotonic() < until, f"timed out waiting for {what}"
        time.sleep(0.01)


def client(server: FakeOpenAI, key: str = "k1", **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=key, max_retries=0, **kwargs)


def ask(c: openai.OpenAI, text: str = "Text: the match ended 2-1\nCategory:", **kwargs):
    return c.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": text}], **kwargs)


def test_answers_the_oracle_label_with_usage_and_logprobs(fake_openai):
    oracle = {"the match ended": "Sports", "stocks fell": "Business"}
    server = fake_openai(keys=["k1"], labels=LABELS, oracle=oracle)
    # A few-shot example earlier in the prompt must not shadow the row's own text.
    out = ask(client(server), "Text: stocks fell\nCategory: Business\n\nText: the match ended 2-1\nCategory:",
              logprobs=True, top_logprobs=3)
    choice = out.choices[0]
    assert choice.message.content == "Sports"
    assert out.usage.prompt_tokens == len(
        "Text: stocks fell\nCategory: Business\n\nText: the match ended 2-1\nCategory:") // 4 + 1
    assert out.usage.completion_tokens >= 1
    top = choice.logprobs.content[0].top_logprobs
    assert top[0].token == "Sports" and len(top) == 3
    assert top[0].logprob > top[1].logprob and {t.token for t in top} <= set(LABELS)


def test_hash_answers_are_stable_and_in_the_set(fake_openai):
    server = fake_openai(keys=["k1"], labels=LABELS)
    c = client(server)
    answers = [ask(c, f"text {i}").choices[0].message.content for i in range(20)]
    assert set(answers) <= set(LABELS) and len(set(answers)) > 1
    assert answers == [ask(c, f"text {i}").choices[0].message.content for i in range(20)]


def test_json_schema_and_json_object_answers_parse(fake_openai):
    server = fake_openai(keys=["k1"])  # no configured labels: the schema's enum is the set
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "label", "schema": SCHEMA, "strict": True}}
    out = json.loads(ask(c, response_format=fmt).choices[0].message.content)
    assert out["label"] in LABELS and isinstance(out["reasoning"], str)
    with pytest.raises(openai.BadRequestError):  # JSON mode alone names no labels
        ask(c, response_format={"type": "json_object"})
    server = fake_openai(keys=["k1"], labels=["正面", "负面"])
    out = ask(client(server), "酒店很好", response_format={"type": "json_object"}, logprobs=True, top_logprobs=2)
    content = out.choices[0].message.content
    assert set(json.loads(content)) == {"label"} and json.loads(content)["label"] in ("正面", "负面")
    tokens = [t.token for t in out.choices[0].logprobs.content]
    assert "".join(tokens) == content and json.loads(content)["label"] in tokens


def test_completions_with_vllm_choice_and_logprobs(fake_openai):
    server = fake_openai(keys=["k1"])
    out = client(server).completions.create(
        model="fake-model", prompt="Review: great hotel\nSentiment:", logprobs=2,
        extra_body={"structured_outputs": {"choice": ["positive", "negative"]}},
    )
    choice = out.choices[0]
    assert choice.text in ("positive", "negative")
    assert choice.logprobs.tokens == [choice.text]
    assert set(choice.logprobs.top_logprobs[0]) == {"positive", "negative"}


def test_models_and_auth(fake_openai):
    server = fake_openai(keys=["k1"], revoked=["k3"])
    assert [m.id for m in client(server).models.list()] == ["fake-model"]
    with pytest.raises(openai.AuthenticationError) as err:
        ask(client(server, "k3"))
    assert "k3" not in str(err.value)
    with pytest.raises(openai.AuthenticationError) as err:
        ask(client(server, "sk-unknown-secret"))
    assert "sk-unknown-secret" not in str(err.value)
    server.revoke("k1")
    with pytest.raises(openai.AuthenticationError):
        ask(client(server, "k1"))
    stats = server.stats()
    assert stats.keys["k3"].unauthorized == 1 and stats.keys["k1"].unauthorized == 1 and stats.unknown_key == 1
    forbidding = fake_openai(keys=["k1"], revoked=["k3"], revoked_status=403, labels=LABELS)
    with pytest.raises(openai.PermissionDeniedError):
        ask(client(forbidding, "k3"))


def test_rpm_limit_answers_429_with_retry_after_and_recovers():
    with clocked_server(keys=["k1", "k2"], labels=LABELS, rpm=3, window_s=2.0) as (server, clock):
        c = client(server)
        raw = c.chat.completions.with_raw_response.create(model="m", messages=[{"role": "user", "content": "a"}])
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-remaining-requests"] == "2"
        assert raw.headers["x-ratelimit-reset-requests"] == "2s"  # the window is 2 s; the clock stood still
        clock.advance(0.5)
        ask(c), ask(c)
        with pytest.raises(openai.RateLimitError) as err:
            ask(c)
        headers = err.value.response.headers
        assert headers["retry-after-ms"] == "1500" and headers["retry-after"] == "2"  # the first admission leaves at 2 s
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert err.value.body["code"] == "rate_limit_exceeded"
        ask(client(server, "k2"))  # limits are per key
        clock.advance(1.499)
        with pytest.raises(openai.RateLimitError):  # a millisecond early: still full
            ask(c)
        clock.advance(0.001)
        ask(c)  # the first admission has left the window
        stats = server.stats().keys
        assert (stats["k1"].accepted, stats["k1"].rate_limited, stats["k1"].max_requests_in_window) == (4, 2, 3)
        assert stats["k2"].accepted == 1


def test_tpm_limit_counts_total_tokens():
    with clocked_server(keys=["k1"], labels=["yes"], tpm=30, window_s=1.0) as (server, clock):
        _tpm_checks(server, clock)


def _tpm_checks(server, clock):
    c = client(server)
    text = "x" * 40  # 10 prompt tokens + 1 completion token
    assert ask(c, text).usage.total_tokens == 11
    ask(c, text)
    with pytest.raises(openai.RateLimitError) as err:
        ask(c, text)
    assert err.value.response.headers["x-ratelimit-remaining-tokens"] == "8"
    stats = server.stats().keys["k1"]
    assert (stats.tokens, stats.max_tokens_in_window, stats.rate_limited) == (22, 22, 1)
    clock.advance(1.0)  # both admissions leave the window: its tokens are free again
    ask(c, text)
    assert server.stats().keys["k1"].tokens == 33


def test_max_in_window_counts_a_burst_when_not_enforcing():
    with clocked_server(keys=["k1"], labels=LABELS, rpm=2, window_s=1.0, enforce_limits=False) as (server, clock):
        c = client(server)
        for _ in range(5):
            ask(c)
        clock.advance(1.0)  # the burst leaves the window
        ask(c), ask(c)
        stats = httpx.get(server.base_url.removesuffix("/v1") + "/_stats").json()
        assert stats["keys"]["k1"]["accepted"] == 7 and stats["keys"]["k1"]["rate_limited"] == 0
        assert stats["keys"]["k1"]["max_requests_in_window"] == 5  # the burst, not the later pair
        assert stats["window_s"] == 1.0 and stats["rpm"] == 2
        server.reset_stats()
        assert server.stats().keys["k1"].accepted == 0


def test_faults_500_timeout_malformed_offlabel(fake_openai):
    c = client(fake_openai(keys=["k1"], labels=LABELS, error_rate=1.0))
    with pytest.raises(openai.InternalServerError):
        ask(c)
    hung = fake_openai(keys=["k1"], labels=LABELS, timeout_rate=1.0, hang_s=600)
    with pytest.raises(openai.APITimeoutError):  # the client gave up: the server would have held it 10 minutes
        ask(client(hung, timeout=0.3))
    assert hung.stats().keys["k1"].timeouts == 1 and hung.stats().max_in_flight == 1
    poll(lambda: hung.stats().in_flight == 0, "the server to drop the request its client gave up on")
    broken = client(fake_openai(keys=["k1"], labels=LABELS, malformed_rate=1.0, malformed_kinds=["body"]))
    with pytest.raises(json.JSONDecodeError):  # what the openai client raises on a cut body
        ask(broken)
    blank = client(fake_openai(keys=["k1"], labels=LABELS, malformed_rate=1.0, malformed_kinds=["whitespace"]))
    out = ask(blank).choices[0]
    assert out.message.content.strip() == "" and out.finish_reason == "length"
    off = client(fake_openai(keys=["k1"], labels=LABELS, offlabel_rate=1.0))
    answers = {ask(off, f"t{i}").choices[0].message.content for i in range(12)}
    assert not answers & set(LABELS) and "Other" in answers and any("," in a for a in answers)


def test_fault_mix_is_seeded(fake_openai):
    def outcomes(seed: int) -> list[str]:
        c = client(fake_openai(keys=["k1"], labels=LABELS, error_rate=0.3, offlabel_rate=0.3, seed=seed))
        seen = []
        for i in range(30):
            try:
                seen.append(ask(c, f"t{i}").choices[0].message.content)
            except openai.InternalServerError:
                seen.append("500")
        return seen

    first = outcomes(7)
    assert first == outcomes(7) and first != outcomes(8)
    assert 0 < first.count("500") < 30


def test_latency_overlaps_across_concurrent_requests(fake_openai):
    server = fake_openai(keys=["k1"], labels=LABELS, latency_ms=200)

    async def burst() -> None:
        c = openai.AsyncOpenAI(base_url=server.base_url, api_key="k1", max_retries=0)
        await asyncio.gather(*(c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": str(i)}]) for i in range(40)))
        await c.close()

    asyncio.run(burst())
    stats = server.stats()
    assert stats.keys["k1"].accepted == 40 and stats.in_flight == 0
    assert stats.max_in_flight > 1  # answered side by side, not one after another


def test_config_rejects_rates_over_one():
    with pytest.raises(ValueError, match="sum to <= 1"):
        FakeOpenAIConfig(error_rate=0.6, timeout_rate=0.6)


def test_cli_serves_on_a_free_port():
    proc = subprocess.Popen(
        [sys.executable, "-m", "raycls.testing.fake_openai", "--port", "0", "--keys", "a,b", "--rpm", "5",
         "--labels", "yes,no"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        base_url = proc.stdout.readline().strip()
        out = openai.OpenAI(base_url=base_url, api_key="b", max_retries=0).completions.create(
            model="m", prompt="is it?")
        assert out.choices[0].text in ("yes", "no")
        assert httpx.get(base_url.removesuffix("/v1") + "/_stats").json()["keys"]["b"]["accepted"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=10)
