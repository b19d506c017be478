"""One command line: `raycls run | dry-run | validate | label-new | status | schema`, one error
prefix, exit codes 0 done / 1 failed / 2 bad spec or input / 130 interrupted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from raycls import cli
from raycls.errors import LeaseLost
from tests.conftest import REPO


def raycls(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raycls.cli", *args], cwd=REPO, input=stdin,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def spec_text(tmp_path) -> str:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a goal", "label": "Sports"}\n{"text": "a summit", "label": "World"}\n')
    return f"input: {{path: {data}, gold_column: label}}\nlabels: [World, Sports]\noutput: {{path: {tmp_path / 'out'}}}\n"


@pytest.fixture
def spec_file(tmp_path, spec_text):
    path = tmp_path / "job.yaml"
    path.write_text(spec_text)
    return path


def test_version_names_the_installed_version():
    from raycls import __version__

    proc = raycls("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"raycls {__version__}"
    assert __version__ != "0+unknown"  # read from the installed distribution


def test_validate_checks_spec_and_input_columns_without_starting_ray(spec_file):
    proc = raycls("validate", "--config", str(spec_file))
    assert proc.returncode == 0, proc.stderr
    assert "ok: 1 jsonl file(s), columns ['text', 'label']" in proc.stdout
    check = subprocess.run(
        [sys.executable, "-c", "import sys; from raycls.cli import main; main(['validate', '--config', sys.argv[1]]); "
                               "import ray; print('RAY_STARTED' if ray.is_initialized() else 'NO_RAY')", str(spec_file)],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert check.stdout.strip().endswith("NO_RAY"), check.stdout + check.stderr


def test_validate_names_a_missing_column_with_exit_2(spec_file):
    proc = raycls("validate", "--config", str(spec_file), "--set", "input.text=body")
    assert proc.returncode == 2
    assert proc.stderr.startswith("raycls: error: ") and "missing column(s) ['body']" in proc.stderr


def test_config_dash_reads_the_spec_from_standard_input(spec_text):
    proc = raycls("validate", "--config", "-", stdin=spec_text)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok: ")


def test_a_bad_spec_from_standard_input_is_named_as_stdin(spec_text):
    proc = raycls("validate", "--config", "-", stdin=spec_text + "backend: {engnes: 2}\n")
    assert proc.returncode == 2
    assert "raycls: error: backend.engnes: unknown key [in <stdin>]" in proc.stderr


def test_a_bad_log_level_is_a_usage_error_not_a_traceback(spec_file):
    proc = raycls("validate", "--config", str(spec_file), "--log-level", "LOUD")
    assert proc.returncode == 2
    assert "invalid choice: 'LOUD'" in proc.stderr and "Traceback" not in proc.stderr


def test_schema_prints_the_json_schema_with_the_fields_docs():
    proc = raycls("schema")
    assert proc.returncode == 0
    schema = json.loads(proc.stdout)
    path_doc = schema["$defs"]["InputSpec"]["properties"]["path"]["description"]
    assert path_doc.startswith("A file, a directory or a glob")


def test_status_of_an_untouched_output_says_empty(spec_file):
    proc = raycls("status", "--config", str(spec_file))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["state"] == "empty"


def test_the_form_without_a_command_still_runs_the_job(spec_file):
    """`raycls --config X --dry-run` (the form before subcommands) is `raycls run`/`dry-run`."""
    assert cli._with_default_command(["--config", "x.yaml"]) == ["run", "--config", "x.yaml"]
    assert cli._with_default_command(["validate", "--config", "x.yaml"])[0] == "validate"


def test_losing_the_output_lease_is_reported_as_such_not_as_ctrl_c(spec_file, monkeypatch, capsys):
    def lease_taken_over(args):
        raise LeaseLost("/data/out/_raycls_lease")  # what run_job raises once the heartbeat lost the lease

    monkeypatch.setitem(cli.COMMANDS, "validate", lease_taken_over)
    code = cli.main(["validate", "--config", str(spec_file)])
    err = capsys.readouterr().err
    assert code == cli.EXIT_FAILED
    assert "another run took over the output lease (/data/out/_raycls_lease)" in err
    assert "run the same command again" not in err


def test_ctrl_c_exits_130_and_says_how_to_resume(spec_file, monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "validate", interrupted)
    assert cli.main(["validate", "--config", str(spec_file)]) == cli.EXIT_INTERRUPTED
    assert "run the same command again" in capsys.readouterr().err
