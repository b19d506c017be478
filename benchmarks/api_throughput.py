"""API backend benchmarks against the fault-injection server (a separate process on 127.0.0.1).

    python benchmarks/api_throughput.py limits --rows 3000      # raycls vs two common clients
    python benchmarks/api_throughput.py overhead --rows 3000    # zero latency, no limits

`limits`: one server with 4 keys x 600 RPM (60-second window, enforced with 429 and
Retry-After) and 200 ms latency. The same rows go, one client after the other, through
(a) `raycls.job.pipeline.run_job` with the API backend, (b) the common tutorial client — a
ThreadPoolExecutor of 5 threads, keys round-robin, sleep one second and retry on any
error, re-ask when the answer is not a label — and (c) a plain asyncio client with a
semaphore of 32 and round-robin keys that sleeps Retry-After on a 429. The server's
counters are reset between clients (its windows too). For each: wall time, rows/s,
steady-state requests/s as a share of the aggregate limit (the slope of the server's
accepted count between 10% and 90% of the rows, sampled every 0.25 s), 429s, rows lost.

`overhead`: the same server with no latency and no limits; raycls's rows/s when the model
is free, with the API backend's Ray actors, budget actor and all.

Results are printed as JSON lines; BENCHMARKS.md holds the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from raycls.testing.bench import fresh_response_cache  # noqa: E402

fresh_response_cache()
AGNEWS = REPO.parent / "shared" / "datasets" / "agnews_dev.parquet"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
KEYS = [f"sk-bench-{i}" for i in range(4)]
PORT = 8199


def rows(n: int) -> list[dict]:
    """n AG News rows (repeated with distinct ids past the 2,000 in the file)."""
    import pyarrow.parquet as pq

    base = pq.read_table(AGNEWS).to_pylist()
    return [{"id": f"r{i}", "text": base[i % len(base)]["description"], "label": base[i % len(base)]["label"]} for i in range(n)]


class Server:
    """`python -m raycls.testing.fake_openai` in its own process (its own GIL), with stats over HTTP."""

    def __init__(self, *args: str):
        self.root = f"http://127.0.0.1:{PORT}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "raycls.testing.fake_openai", "--port", str(PORT), "--keys", ",".join(KEYS),
             "--labels", ",".join(LABELS), *args],
            stdout=subprocess.PIPE, cwd=REPO,
        )
        self.base_url = self.proc.stdout.readline().decode().strip()

    def stats(self) -> dict:
        with urllib.request.urlopen(f"{self.root}/_stats") as r:
            return json.loads(r.read())

    def reset(self) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.root}/_reset", method="POST")).read()

    def accepted(self) -> int:
        return sum(k["accepted"] for k in self.stats()["keys"].values())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class Sampler:
    """Samples the server's accepted count while a client runs, for the steady-state rate."""

    def __init__(self, server: Server, every: float = 0.25):
        self.server, self.every, self.samples = server, every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic(), self.server.accepted()))
            time.sleep(self.every)

    def steady_rate(self, total: int) -> float | None:
        """Requests/s between the samples where 10% and 90% of `total` had been accepted."""
        lo = next(((t, n) for t, n in self.samples if n >= 0.1 * total), None)
        hi = next(((t, n) for t, n in self.samples if n >= 0.9 * total), None)
        if lo is None or hi is None or hi[0] <= lo[0]:
            return None
        return (hi[1] - lo[1]) / (hi[0] - lo[0])


def report(name: str, server: Server, sampler: Sampler, n_rows: int, labelled: int, rows_out: int, wall: float, limit_rps: float | None) -> dict:
    stats = server.stats()
    rate = sampler.steady_rate(n_rows)
    result = {
        "client": name,
        "rows": n_rows,
        "rows_out": rows_out,
        "rows_lost": n_rows - rows_out,
        "rows_labelled": labelled,
        "wall_s": round(wall, 1),
        "rows_per_s": round(n_rows / wall, 2),
        "steady_requests_per_s": round(rate, 2) if rate else None,
        "steady_share_of_limit": round(rate / limit_rps, 3) if rate and limit_rps else None,
        "http_429": sum(k["rate_limited"] for k in stats["keys"].values()),
        "max_requests_in_60s_per_key": max(k["max_requests_in_window"] for k in stats["keys"].values()),
    }
    print(json.dumps(result), flush=True)
    return result


# -- clients ----------------------------------------------------------------------------------


def run_raycls(server: Server, data: list[dict], work: Path, limit_rps: float | None, **backend) -> dict:
    import pyarrow.parquet as pq

    from raycls import parse_spec, run_job

    path = work / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    (work / "keys.txt").write_text("\n".join(KEYS) + "\n")
    spec = parse_spec({
        "input": {"path": str(path), "id_column": "id", "gold_column": "label"},
        "labels": LABELS,
        "output": {"path": str(work / f"out-{time.time_ns()}")},
        "backend": {"kind": "openai", "base_url": server.base_url, "model": "fake-model",
                    "api_keys": [f"file:{work / 'keys.txt'}"], "timeout_s": 30, **backend},
    })
    server.reset()
    start = time.monotonic()
    with Sampler(server) as sampler:
        result = run_job(spec)
    wall = time.monotonic() - start
    out = pq.read_table(f"{result.output_path}/data", columns=["label"]).column("label").to_pylist()
    print("SAMPLES", [(round(t - sampler.samples[0][0], 2), n) for t, n in sampler.samples][::4], flush=True)
    return report("raycls", server, sampler, len(data), sum(x is not None for x in out), len(out), wall, limit_rps)


def run_tutorial(server: Server, data: list[dict], limit_rps: float) -> dict:
    """The common tutorial: 5 threads, keys round-robin, sleep 1 s and retry on any error."""
    import openai

    clients = [openai.OpenAI(api_key=k, base_url=server.base_url, max_retries=0, timeout=30) for k in KEYS]
    prompt = "Classify the text into one of: World, Sports, Business, Sci/Tech. Answer with the category only.\n\nText: {}\nCategory:"

    def label(i: int) -> str | None:
        client = clients[i % len(clients)]
        for _ in range(20):
            try:
                r = client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": prompt.format(data[i]["text"])}], max_tokens=16)
                answer = (r.choices[0].message.content or "").strip()
                if answer in LABELS:
                    return answer
            except Exception:
                time.sleep(1)
        return None

    server.reset()
    start = time.monotonic()
    with Sampler(server) as sampler, ThreadPoolExecutor(5) as pool:
        out = list(pool.map(label, range(len(data))))
    wall = time.monotonic() - start
    return report("tutorial_threadpool_5", server, sampler, len(data), sum(x is not None for x in out), len(out), wall, limit_rps)


def run_asyncio(server: Server, data: list[dict], limit_rps: float, concurrency: int = 32) -> dict:
    """A plain asyncio client: a semaphore, keys round-robin, Retry-After honoured on 429."""
    import openai

    async def main() -> list[str | None]:
        clients = [openai.AsyncOpenAI(api_key=k, base_url=server.base_url, max_retries=0, timeout=30) for k in KEYS]
        semaphore = asyncio.Semaphore(concurrency)
        prompt = "Classify the text into one of: World, Sports, Business, Sci/Tech. Answer with the category only.\n\nText: {}\nCategory:"

        async def label(i: int) -> str | None:
            for attempt in range(50):
                async with semaphore:
                    client = clients[(i + attempt) % len(clients)]
                    try:
                        r = await client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": prompt.format(data[i]["text"])}], max_tokens=16)
                        answer = (r.choices[0].message.content or "").strip()
                        if answer in LABELS:
                            return answer
                        continue
                    except openai.RateLimitError as exc:
                        wait = float(exc.response.headers.get("retry-after", 1))
                    except Exception:
                        wait = 1.0
                await asyncio.sleep(wait)
            return None

        return await asyncio.gather(*(label(i) for i in range(len(data))))

    server.reset()
    start = time.monotonic()
    with Sampler(server) as sampler:
        out = asyncio.run(main())
    wall = time.monotonic() - start
    return report(f"asyncio_semaphore_{concurrency}", server, sampler, len(data), sum(x is not None for x in out), len(out), wall, limit_rps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["limits", "overhead"])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--rpm", type=int, default=600)
    parser.add_argument("--latency-ms", type=float, default=200)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--skip-baselines", action="store_true")
    args = parser.parse_args()
    import logging

    import ray

    data = rows(args.rows)
    work = Path(tempfile.mkdtemp(prefix="raycls-bench-"))
    ray.init(address="local", num_cpus=4, logging_level=logging.WARNING)  # a Ray of its own, as run_job would start
    if args.what == "limits":
        server = Server("--rpm", str(args.rpm), "--latency-ms", str(args.latency_ms))
        limit = len(KEYS) * args.rpm / 60
        try:
            run_raycls(server, data, work, limit, rpm=args.rpm, actors=args.actors)
            if not args.skip_baselines:
                run_tutorial(server, data, limit)
                run_asyncio(server, data, limit)
        finally:
            server.close()
    else:
        server = Server()
        try:
            run_raycls(server, data, work, None, rpm=10**6, tpm=10**9, actors=args.actors, max_concurrency=64, batch_size=256)
        finally:
            server.close()


if __name__ == "__main__":
    main()
