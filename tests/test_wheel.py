"""The installable package: a wheel built from the sources holds the built-in prompts, and a
raycls installed from it into a fresh virtual environment, run from outside the checkout,
renders a built-in prompt in a dry run.

The fresh environment gets the heavy dependencies (Ray, pyarrow, pydantic) from the
development environment through a `.pth` line, not by installing them again (no network,
seconds instead of minutes); a `.pth` line adds a directory to `sys.path` without running
the `.pth` files inside it, so the development environment's editable raycls is not seen.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.timeout(600)

SOURCES = ("pyproject.toml", "README.md", "raycls", "prompts")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the checkout itself gets no build/ folder)."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(root / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    (built,) = (root / "dist").glob("raycls-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment outside the checkout with the wheel installed in it."""
    env = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    (purelib,) = env.glob("lib/python*/site-packages")
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "raycls_test_deps.pth").write_text("\n".join(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    return env


def project_version() -> str:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def clean_env(ray_tmp: str) -> dict[str, str]:
    """No PYTHONPATH (the checkout must not be importable), a Ray of its own."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAY_ADDRESS")}
    env["RAY_TMPDIR"] = ray_tmp
    return env


def test_wheel_holds_the_builtin_prompts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    builtins = sorted(p.name for p in (REPO / "prompts").glob("*.yaml"))
    assert builtins, "no built-in prompts in the checkout"
    for name in builtins:
        assert f"raycls/builtin_prompts/{name}" in names


DRY_RUN = textwrap.dedent("""
    import sys, raycls
    from raycls.config import load_spec
    from raycls.job.estimate import dry_run
    print("RAYCLS_FILE", raycls.__file__)
    print("RAYCLS_VERSION", raycls.__version__)
    result = dry_run(load_spec(sys.argv[1]))
    assert result["rows"] == 2, result
""")


@pytest.mark.ray
def test_installed_wheel_dry_runs_a_builtin_prompt_outside_the_checkout(venv, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "rows.jsonl").write_text('{"text": "The striker scored twice."}\n{"text": "Shares fell 3%."}\n')
    (work / "job.yaml").write_text(textwrap.dedent("""
        input: {path: rows.jsonl}
        labels: [World, Sports, Business]
        prompt: reason
        backend: {kind: openai, base_url: "http://127.0.0.1:9/v1", model: m, api_keys: ["env:NO_SUCH_KEYS"]}
        output: {path: out}
    """))
    with tempfile.TemporaryDirectory(prefix="rwh-", dir="/tmp") as ray_tmp:  # short: Ray's sockets live there
        proc = subprocess.run([str(venv / "bin" / "python"), "-c", DRY_RUN, "job.yaml"], cwd=work,
                              env=clean_env(ray_tmp), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith("RAYCLS_"))
    assert Path(lines["RAYCLS_FILE"]).resolve().is_relative_to(venv.resolve())
    assert lines["RAYCLS_VERSION"] == project_version()
    prompt = proc.stdout.split("first prompt:\n", 1)[1]
    assert "The striker scored twice." in prompt or "Shares fell 3%." in prompt  # the first row read
    assert "Business" in prompt  # the label set went into the built-in `reason` template
    assert not (work / "out").exists()  # a dry run writes nothing


def test_installed_console_script_runs(venv, tmp_path):
    proc = subprocess.run([str(venv / "bin" / "raycls"), "--help"], cwd=tmp_path, env=clean_env(str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: raycls" in proc.stdout
