"""Expiring, exclusive ownership of an output location, on any fsspec filesystem.

Two runs writing into the same output (a cron job that fires again while the last run is
still going, a user who starts the same command twice) would label rows twice, because
Ray Data's checkpoint is read once, when a run starts. So a run holds a *lease* on its
output while it writes, and a second run refuses with a clear message instead.

A lease is a chain of small JSON records `<dir>/<generation>.json`. Taking, renewing or
releasing it means creating the *next* generation with `storage.create_exclusive`: of two
processes racing for a generation exactly one wins, on local disk and on S3 (conditional
PUT). The holder renews it from a background thread every `ttl_s / 4`; a lease counts as
free when its last record says `released`, when it was not renewed for `ttl_s`, or when
its holder ran on this host and that process no longer exists (so re-running a command
right after a crash or Ctrl-C does not wait for the TTL). Limits: hosts' clocks must agree
to well within `ttl_s`; a holder frozen for longer than `ttl_s` loses the lease, notices at
its next renewal and stops its job (KeyboardInterrupt in the main thread).
"""

from __future__ import annotations

import _thread
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from raycls import storage
from raycls.errors import LeaseLost, ResumeError

log = logging.getLogger(__name__)

DEFAULT_TTL_S = float(os.environ.get("RAYCLS_LEASE_TTL_S", "60"))
"""Seconds without renewal after which a lease held on another host counts as abandoned."""
_KEEP_GENERATIONS = 3
_PROCESS_TOKEN = uuid.uuid4().hex
"""Identifies this process's leases (a pid alone can be reused)."""


class LeaseHeld(ResumeError):
    """Another live run holds the lease on this output."""


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


_HOST = f"{socket.gethostname()}/{_boot_id()}"


def _alive(pid: int) -> bool:
    """Whether a local process exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


_HARMLESS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")
"""Ray helpers that outlive a killed driver by a minute but never touch the output."""
TAKEOVER_WAIT_S = 15.0


def _group_busy(pgid: int) -> bool:
    """Whether a live process of this process group (a dead driver's Ray workers) remains."""
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) != pgid or fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if not f.read().startswith(_HARMLESS):
                    return True
        except (OSError, IndexError, ValueError):
            continue
    return False


def _wait_for_group(record: dict[str, Any]) -> None:
    """After a local holder died, let its Ray workers finish dying before we read the
    checkpoint: a write task still running would otherwise commit rows we then redo."""
    pgid = record.get("pgid")
    if record.get("host") != _HOST or pgid is None or pgid != record.get("pid"):
        return  # not a process-group leader: its workers cannot be told from others
    deadline = time.monotonic() + TAKEOVER_WAIT_S
    while _group_busy(int(pgid)) and time.monotonic() < deadline:
        time.sleep(0.25)


def _gen_name(gen: int) -> str:
    return f"{gen:09d}.json"


@dataclass
class Lease:
    """The lease on one location; use `hold(url)` rather than this class directly."""

    url: str
    ttl_s: float = DEFAULT_TTL_S
    gen: int | None = None
    lost: bool = False
    holders: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    # -- reading the chain -----------------------------------------------------------

    def _latest(self) -> tuple[int, dict[str, Any] | None]:
        gens = sorted(int(n[:-5]) for n in storage.list_names(self.url) if n.endswith(".json") and n[:-5].isdigit())
        if not gens:
            return -1, None
        return gens[-1], storage.read_json(storage.join(self.url, _gen_name(gens[-1])))

    def _record(self, released: bool = False) -> dict[str, Any]:
        return {"host": _HOST, "pid": os.getpid(), "pgid": os.getpgrp(), "token": _PROCESS_TOKEN, "renewed_at": time.time(),
                "ttl_s": self.ttl_s, "released": released}

    @staticmethod
    def _free(record: dict[str, Any] | None) -> bool:
        if record is None or record.get("released") or record.get("token") == _PROCESS_TOKEN:
            return True
        if time.time() - float(record.get("renewed_at", 0)) > float(record.get("ttl_s", DEFAULT_TTL_S)):
            return True
        return record.get("host") == _HOST and not _alive(int(record.get("pid", -1)))

    # -- taking, renewing, releasing -------------------------------------------------

    def acquire(self) -> None:
        """Take the lease or raise LeaseHeld naming the holder."""
        for _ in range(5):
            latest, record = self._latest()
            if not self._free(record):
                age = time.time() - float(record.get("renewed_at", 0))
                raise LeaseHeld(
                    f"{self.url}: another run is writing this output (host {record.get('host', '?').split('/')[0]}, "
                    f"pid {record.get('pid')}, last renewed {age:.0f} s ago); wait for it to finish, or if it died "
                    f"on another host, its lease lapses {max(0.0, float(record.get('ttl_s', 0)) - age):.0f} s from now"
                )
            if storage.create_exclusive(storage.join(self.url, _gen_name(latest + 1)), self._record()):
                self.gen = latest + 1
                self._prune()
                if record is not None and not record.get("released") and record.get("token") != _PROCESS_TOKEN:
                    _wait_for_group(record)
                return
        raise LeaseHeld(f"{self.url}: could not take the lease: other runs keep taking it")

    def renew(self, released: bool = False) -> bool:
        """Write the next generation; False (and `lost`) when someone else took the lease."""
        assert self.gen is not None
        _, newest = self._latest()
        if newest is not None and newest.get("token") != _PROCESS_TOKEN:
            self.lost = True  # another run holds the newest record, whatever its generation
            return False
        while True:
            if storage.create_exclusive(storage.join(self.url, _gen_name(self.gen + 1)), self._record(released)):
                self.gen += 1
                self._prune()
                return True
            latest, record = self._latest()
            if record is not None and record.get("token") == _PROCESS_TOKEN and latest > self.gen:
                self.gen = latest  # our own other handle renewed meanwhile
                continue
            self.lost = True
            return False

    def _prune(self) -> None:
        assert self.gen is not None
        for name in storage.list_names(self.url):
            if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) <= self.gen - _KEEP_GENERATIONS:
                storage.remove(storage.join(self.url, name))

    def start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    if not self.renew():  # `lost` is set: `lost_as_error` tells this interrupt from a Ctrl-C
                        log.error("lost the lease on %s to another run: stopping this run", self.url)
                        _thread.interrupt_main()
                        return
                except Exception:  # a storage hiccup: try again at the next beat
                    log.warning("could not renew the lease on %s", self.url, exc_info=True)

        self._thread = threading.Thread(target=beat, name="raycls-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not self.lost and self.gen is not None:
            try:
                self.renew(released=True)
            except Exception:
                log.warning("could not release the lease on %s; it lapses after %.0f s", self.url, self.ttl_s, exc_info=True)


@contextlib.contextmanager
def lost_as_error(lease: Lease) -> Iterator[None]:
    """Work done under `lease`: the interrupt its heartbeat sends the main thread when another
    run takes the lease over comes out as `LeaseLost`, not as a Ctrl-C (which stays one).

    The interrupt is the only way to stop a main thread blocked in Ray's write; this turns it
    into an error that a library caller of `run_job` can catch and the CLI can report."""
    try:
        yield
    except KeyboardInterrupt:
        if lease.lost:
            raise LeaseLost(lease.url) from None
        raise


_HELD: dict[str, Lease] = {}
_HELD_LOCK = threading.Lock()


def acquire(url: str, ttl_s: float = DEFAULT_TTL_S) -> Lease:
    """Take the lease at `url` (re-entrant within a process) and keep it renewed."""
    with _HELD_LOCK:
        lease = _HELD.get(url)
        if lease is None:
            lease = Lease(url, ttl_s)
            lease.acquire()
            lease.start_heartbeat()
            _HELD[url] = lease
        lease.holders += 1
        return lease


def release(lease: Lease) -> None:
    """Give back one hold; the last one releases the lease for other runs."""
    with _HELD_LOCK:
        lease.holders -= 1
        if lease.holders > 0:
            return
        _HELD.pop(lease.url, None)
    lease.release()
