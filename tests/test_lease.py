"""The output lease (`raycls.job.lease`) on a local folder, without Ray: taking it, losing it to
another writer, its records vanishing, and what a run that lost it may no longer do.

"Another writer" is a record written the way another process's `Lease` writes one (its own
process token), so these tests see exactly what a second run would leave in the folder.
One test runs a holder in a subprocess, because losing the lease interrupts the holder's
main thread, which must not be pytest's; `lost_as_error` turns that interrupt into `LeaseLost`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from raycls import storage

from raycls.job import lease
from raycls.errors import LeaseLost
from raycls.job.resume import MANIFEST_FILE, Run
from tests.conftest import REPO


def other_record(renewed_at: float | None = None, host: str = "elsewhere/boot-1", released: bool = False) -> dict:
    """A lease record as a run in another process (here: on another host) writes it."""
    return {"host": host, "pid": 4242, "pgid": 4242, "token": "another-process",
            "renewed_at": time.time() if renewed_at is None else renewed_at, "ttl_s": 60.0, "released": released}


def write_generation(url: Path, gen: int, record: dict) -> bool:
    return storage.create_exclusive(str(url / f"{gen:09d}.json"), record)


def latest_record(url: Path) -> dict:
    newest = max(url.glob("*.json"))
    return json.loads(newest.read_text())


def generations(url: Path) -> list[int]:
    return sorted(int(p.stem) for p in url.glob("*.json"))


def take(url: Path, renewals: int = 0) -> lease.Lease:
    """Take the lease in this process (no heartbeat: the test renews by hand) and renew it `renewals` times."""
    held = lease.Lease(str(url))
    held.acquire()
    for _ in range(renewals):
        assert held.renew()
    return held


@pytest.fixture
def url(tmp_path: Path) -> Path:
    return tmp_path / "out" / "_raycls_lease"


def test_a_free_location_is_taken_at_generation_zero(url):
    held = take(url)
    assert held.gen == 0 and generations(url) == [0] and latest_record(url)["token"] == lease._PROCESS_TOKEN


def test_a_lease_renewed_recently_by_another_host_is_refused_naming_its_holder(url):
    write_generation(url, 0, other_record())
    with pytest.raises(lease.LeaseHeld, match=r"another run is writing this output \(host elsewhere, pid 4242"):
        take(url)
    assert generations(url) == [0]


def test_a_lease_not_renewed_for_its_ttl_is_taken_over(url):
    write_generation(url, 0, other_record(renewed_at=time.time() - 120))
    held = take(url)
    assert held.gen == 1 and latest_record(url)["token"] == lease._PROCESS_TOKEN


def test_a_released_lease_is_taken_at_once(url):
    write_generation(url, 0, other_record(released=True))
    held = take(url)
    assert held.gen == 1


def test_renewing_after_another_writer_took_the_next_generation_reports_the_lease_lost(url):
    held = take(url)
    assert write_generation(url, 1, other_record())
    assert held.renew() is False
    assert held.lost and held.gen == 0


def test_a_lost_lease_is_not_released_over_its_new_holder(url):
    held = take(url)
    write_generation(url, 1, other_record())
    held.renew()
    held.release()
    assert generations(url) == [0, 1] and latest_record(url)["token"] == "another-process"
    with pytest.raises(lease.LeaseHeld):  # the new holder keeps it
        take(url)


def test_renewal_keeps_the_lease_while_no_one_else_writes(url):
    held = take(url)
    assert [held.renew() for _ in range(4)] == [True] * 4
    assert held.gen == 4 and not held.lost
    assert generations(url) == [2, 3, 4]  # older generations pruned


def test_records_that_vanish_are_written_again_by_the_holders_next_renewal(url):
    held = take(url, renewals=1)
    shutil.rmtree(url)
    assert held.renew() is True and not held.lost
    assert generations(url) == [2] and latest_record(url)["token"] == lease._PROCESS_TOKEN


def test_a_holder_whose_records_vanished_notices_a_newcomer_that_took_the_lease(url):
    held = take(url, renewals=1)
    shutil.rmtree(url)
    write_generation(url, 0, other_record())  # what another run's acquire writes into the emptied folder
    assert held.renew() is False and held.lost


def test_a_run_that_lost_its_lease_does_not_mark_the_output_finished(tmp_path, url):
    out, checkpoint = tmp_path / "out", tmp_path / "out" / "_checkpoint"
    checkpoint.mkdir(parents=True)
    (checkpoint / "ds_w_1.parquet").write_bytes(b"committed rows")
    held = take(url)
    write_generation(url, 1, other_record())
    held.renew()
    run = Run(str(out), str(checkpoint), {"finished": False}, held)
    with pytest.raises(LeaseLost, match="another run took over the output lease"):
        run.finish({"rows_written": 10})
    assert not (out / MANIFEST_FILE).exists()
    assert (checkpoint / "ds_w_1.parquet").exists()  # the next run resumes from it


def test_an_interrupt_is_lease_lost_only_when_the_lease_was_lost(url):
    held = take(url)
    with pytest.raises(KeyboardInterrupt):  # a Ctrl-C while the lease is held stays a Ctrl-C
        with lease.lost_as_error(held):
            raise KeyboardInterrupt
    write_generation(url, 1, other_record())
    assert held.renew() is False
    with pytest.raises(LeaseLost) as err:  # what the heartbeat's interrupt becomes once it lost the lease
        with lease.lost_as_error(held):
            raise KeyboardInterrupt
    assert err.value.url == held.url and "this run stopped and left the output to it" in str(err.value)


HOLDER = textwrap.dedent("""
    import sys, time
    from raycls.job import lease
    from raycls.errors import LeaseLost
    held = lease.acquire(sys.argv[1], ttl_s=0.4)  # heartbeat every 0.1 s
    print("holding", flush=True)
    try:
        with lease.lost_as_error(held):
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                time.sleep(0.01)  # keep the main thread where an interrupt can reach it
        print("never interrupted", flush=True)
        sys.exit(1)
    except LeaseLost as exc:
        print(f"lease lost {exc.url == held.url}", flush=True)
        sys.exit(3)
    except KeyboardInterrupt:
        print("a bare interrupt", flush=True)
        sys.exit(4)
""")


@pytest.mark.timeout(180)
def test_losing_the_lease_interrupts_the_holders_main_thread(url):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(url)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "holding"
        taken = False
        for _ in range(1000):  # the holder renews meanwhile: take whatever generation comes next
            if write_generation(url, generations(url)[-1] + 1, other_record()):
                taken = True
                break
        assert taken
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (proc.returncode, stdout.strip()) == (3, "lease lost True"), stderr
    assert "lost the lease" in stderr and latest_record(url)["token"] == "another-process"
