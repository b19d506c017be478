"""A real multi-node Ray cluster on one machine, for tests: `ray start` run twice or more.

Each node is a real `ray start` (a head with GCS, dashboard and job API; workers with
their own raylet), so jobs go through `ray job submit` as on a cloud cluster, and a
worker node can be killed mid-job the way a lost spot instance dies.

Built to share the machine with other Ray users (other test runs, benchmarks):

- every port is chosen free here (GCS, client server, dashboard and its agents, node
  and object managers, metrics) and each node gets its own worker-port range, so
  nothing collides with Ray's defaults or with another cluster;
- every node has its own `--temp-dir` under a fresh folder, so `ray start` writes its
  address to `<temp-dir>/ray_current_cluster` and not to `/tmp/ray/ray_current_cluster`:
  a plain `ray.init()` elsewhere on the machine does not find this cluster and join it
  (it would only through `RAY_ADDRESS` or `address="auto"`, which we never export);
- each `ray start` runs in a session of its own (`setsid`), and every process Ray
  starts for that node (raylet, agents, workers) inherits that session: a node is
  stopped or killed by its session id, never by `ray stop` (which would stop every
  Ray on the machine) and never by process name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HOST = "127.0.0.1"
WORKER_PORTS = 100
"""Size of each node's worker-port range (one port per worker process)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def free_port_range(size: int = WORKER_PORTS, low: int = 20000, high: int = 32000) -> tuple[int, int]:
    """A run of `size` free ports below the kernel's ephemeral range (32768+) and above
    Ray's default worker ports (10002-19999), so short-lived client sockets cannot take them."""
    for _ in range(200):
        start = random.randrange(low, high - size)
        if all(_bindable(p) for p in range(start, start + size)):
            return start, start + size - 1
    raise RuntimeError(f"no {size} consecutive free ports in [{low}, {high})")


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for `ray` commands and drivers of this cluster.

    Ray 2.60's `ray start --head` turns on token authentication when a token file
    exists; this cluster is local and private, so it runs with authentication off, and
    every client of it gets the same setting. `RAY_ADDRESS` from the caller is dropped:
    commands name this cluster's address explicitly.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


@dataclass
class Node:
    """One `ray start`: its session id (shared by all its processes) and its temp dir."""

    name: str
    sid: int
    temp_dir: Path
    node_id: str | None = None

    def processes(self) -> list[psutil.Process]:
        """Every live process of this node: Ray's daemons, agents and workers."""
        found = []
        for proc in psutil.process_iter():
            try:
                if os.getsid(proc.pid) == self.sid:
                    found.append(proc)
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return found

    def kill(self) -> int:
        """SIGKILL every process of the node at once (a lost machine, not a clean stop)."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)
        return len(procs)


@dataclass
class LocalCluster:
    """A head node plus worker nodes, all on 127.0.0.1, started with `ray start`."""

    root: Path
    gcs_port: int
    dashboard_port: int
    nodes: list[Node] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The GCS address (`ray start --address`, `ray.init(address=...)`)."""
        return f"{HOST}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The job and state API (`ray job submit --address`, `ray.util.state`)."""
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @classmethod
    def start(cls, head_cpus: int = 2, timeout_s: float = 300, attempts: int = 3) -> "LocalCluster":
        """Start the head node, under a fresh short folder in /tmp (Ray's socket paths live
        under the temp dir and must stay under ~100 characters). Retried like `add_worker`."""
        for attempt in range(1, attempts + 1):
            cluster = cls(Path(tempfile.mkdtemp(prefix="rc2n-", dir="/tmp")), free_port(), free_port())
            low, high = free_port_range()
            args = [
                "--head", f"--port={cluster.gcs_port}", f"--ray-client-server-port={free_port()}",
                "--include-dashboard=true", f"--dashboard-host={HOST}", f"--dashboard-port={cluster.dashboard_port}",
            ]
            try:
                cluster._start_node("head", args, head_cpus, {}, low, high, timeout_s)
                return cluster
            except BaseException as exc:
                cluster.stop()
                if not isinstance(exc, RuntimeError) or attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def add_worker(self, num_cpus: int = 2, resources: dict[str, float] | None = None, timeout_s: float = 300,
                   attempts: int = 3) -> Node:
        """Start one more node that joins the head, with its own temp dir and ports.

        `ray start` gives a joining raylet a fixed 30 s to register with the GCS; on a
        machine shared with other Ray runs that can pass, so a failed start is cleaned up
        (its processes killed by session) and tried again.
        """
        for attempt in range(1, attempts + 1):
            low, high = free_port_range()
            name = f"worker{len(self.nodes)}"
            try:
                return self._start_node(name, [f"--address={self.address}"], num_cpus, resources or {}, low, high, timeout_s)
            except RuntimeError:
                self.nodes.pop().kill()
                if attempt == attempts:
                    raise
        raise AssertionError("unreachable")

    def _start_node(self, name: str, role_args: list[str], num_cpus: int, resources: dict[str, float],
                    low: int, high: int, timeout_s: float) -> Node:
        temp_dir = self.root / ("h" if name == "head" else f"w{len(self.nodes)}")
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start", *role_args,
            f"--node-ip-address={HOST}", f"--num-cpus={num_cpus}", f"--resources={json.dumps(resources)}",
            f"--temp-dir={temp_dir}", f"--min-worker-port={low}", f"--max-worker-port={high}",
            f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            "--object-store-memory=300000000", "--disable-usage-stats",
        ]
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ray_env(), start_new_session=True)
        node = Node(name, proc.pid, temp_dir)
        self.nodes.append(node)  # before waiting: a failed start is still cleaned up by stop()
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            log.close()
        if rc != 0:
            raise RuntimeError(f"`ray start` for {name} failed ({rc}); see {self.root / f'{name}.log'}:\n"
                               + (self.root / f"{name}.log").read_text(errors="replace")[-3000:])
        node.node_id = self._wait_for_node(node, timeout_s)
        return node

    def _wait_for_node(self, node: Node, timeout_s: float) -> str:
        """The node's id (from its raylet's command line), once the head lists it alive."""
        from ray.util.state import list_nodes

        node_id = next((arg.split("=", 1)[1] for proc in node.processes() for arg in _cmdline(proc)
                        if arg.startswith("--node_id=")), None)
        if node_id is None:
            raise RuntimeError(f"no raylet found for {node.name} (temp dir {node.temp_dir})")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                # Filtered in Python: Ray 2.60's state API fails a node_id filter ("data truncation").
                if any(n.node_id == node_id and n.state == "ALIVE" for n in list_nodes(address=self.dashboard_url)):
                    return node_id
            except Exception:  # the dashboard is still coming up
                pass
            time.sleep(1)
        raise RuntimeError(f"{node.name} (node {node_id}) was not alive within {timeout_s} s")

    def processes(self) -> list[psutil.Process]:
        """Every process of this cluster: its nodes' sessions, plus job drivers (Ray starts
        those in sessions of their own) recognised by a working directory under our temp dirs."""
        procs = {p.pid: p for node in self.nodes for p in node.processes()}
        root = str(self.root)
        for proc in psutil.process_iter():
            try:
                if proc.pid not in procs and proc.cwd().startswith(root):
                    procs[proc.pid] = proc
            except psutil.Error:
                continue
        return list(procs.values())

    def stop(self) -> None:
        """Stop every process of this cluster (SIGTERM, then SIGKILL); other Rays are untouched."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
