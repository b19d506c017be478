"""`cluster.yaml`, the Ray cluster launcher config for AWS, checked offline.

Ray's own `prepare_config` (merge with the AWS defaults, fill node-type limits) and
`validate_config` (its JSON schema plus its cross-field checks) run without AWS
credentials; then what matters for raycls: GPU workers that scale from zero, a head
without GPUs (so vLLM engines can only land on workers), and setup commands that install
raycls with the official vLLM from the synced repository.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.conftest import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

CLUSTER = REPO / "cluster.yaml"
GPU_FAMILIES = re.compile(r"^(g\d|p\d|gr\d)")
"""EC2 instance families with NVIDIA GPUs (g4dn, g5, g6, gr6, p4d, p5, ...)."""


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def prepared(config) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config

    return prepare_config(config)


def _gpus(node_type: dict[str, Any]) -> int:
    return int(node_type.get("resources", {}).get("GPU", 0))


def test_rays_own_validation_accepts_it(prepared):
    from ray.autoscaler._private.util import validate_config

    validate_config(prepared)  # raises on any schema or consistency error


def test_provider_is_aws(config):
    assert config["provider"]["type"] == "aws"


def test_gpu_workers_exist_and_scale_from_zero(prepared):
    types = prepared["available_node_types"]
    gpu_types = {name: t for name, t in types.items() if name != prepared["head_node_type"] and _gpus(t) > 0}
    assert gpu_types, "no worker type advertises GPUs"
    assert {name: t["min_workers"] for name, t in gpu_types.items()} == dict.fromkeys(gpu_types, 0)
    assert all(t["max_workers"] >= 1 for t in gpu_types.values())


def test_gpu_worker_resources_match_gpu_instances(prepared):
    """A type that advertises GPUs must be an instance that has them, or engines would never start."""
    for name, t in prepared["available_node_types"].items():
        if _gpus(t) > 0:
            assert GPU_FAMILIES.match(t["node_config"]["InstanceType"]), name


def test_head_has_no_gpu_so_engines_go_to_workers(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert _gpus(head) == 0
    assert not GPU_FAMILIES.match(head["node_config"]["InstanceType"])


def test_setup_installs_raycls_with_official_vllm(prepared):
    """Every node installs the synced repository with the `gpu` extra, and that extra is the official vllm."""
    setup = "\n".join(prepared["setup_commands"])
    assert re.search(r"pip install .*-e \"\.\[[^\]]*\bgpu\b[^\]]*\]\"", setup), setup
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(r"vllm\b", dep) for dep in extras["gpu"]), extras["gpu"]


def test_setup_installs_the_ray_version_the_project_pins(prepared):
    """Cluster and client must run the same Ray: the pin in setup matches the installed one."""
    import ray

    pins = re.findall(r"ray\[[^\]]*\]==([\d.]+)", "\n".join(prepared["setup_commands"]))
    assert pins == [ray.__version__]


def test_repository_is_synced_where_setup_installs_it(prepared):
    mounts = prepared["file_mounts"]
    synced = [remote for remote, local in mounts.items() if local in (".", "./")]
    assert synced, mounts
    assert any(f"cd {remote}" in cmd for remote in synced for cmd in prepared["setup_commands"])
