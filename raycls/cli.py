"""The `raycls` command line: one program, one subcommand per thing a user does.

    raycls run        --config X.yaml   label the input (resumable), write Parquet + metrics
    raycls dry-run    --config X.yaml   read the input, render prompts, estimate tokens and cost
    raycls validate   --config X.yaml   check the spec and the input's columns; starts no Ray
    raycls label-new  --config X.yaml   label the files that landed since the last call
    raycls status     --config X.yaml   what an output (or an incremental lake) holds; batch mode: --output is enough
    raycls cancel     --output PATH     batch mode: cancel the output's in-flight batches
    raycls train      --config H.yaml   fine-tune a classifier head on Ray Train
    raycls compare    --config X.yaml --variant a ... --variant b ...   variants side by side, report.html
    raycls schema                       the job spec's JSON schema, with every field's doc

`jobs/*.py` are thin wrappers over these for `ray job submit`. Exit codes: 0 done, 1 the
run failed, 2 a bad spec or input (nothing was spent), 130 interrupted. Errors raised on
purpose (`RayclsError`) become one `raycls: error:` line; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Callable

from raycls.errors import BackendError, LeaseLost, RayclsError, RowCountError, user_message

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
STDIN = "-"


def _version() -> str:
    from raycls import __version__

    return __version__


def add_spec_arguments(parser: argparse.ArgumentParser, config_help: str = "job spec (YAML); - reads it from standard input",
                       required: bool = True) -> None:
    """The options every spec-driven command shares: the spec, overrides, input, output, log level."""
    parser.add_argument("--config", required=required, help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec key, e.g. --set backend.batch_size=32 (repeatable)")
    parser.add_argument("--input", help="shorthand for --set input.path=PATH")
    parser.add_argument("--output", help="shorthand for --set output.path=PATH")
    add_console_arguments(parser)


def add_console_arguments(parser: argparse.ArgumentParser) -> None:
    """How much a command prints: raycls's own log level, and Ray's and vLLM's logs with -v."""
    parser.add_argument("--log-level", default="WARNING", type=str.upper, choices=LOG_LEVELS,
                        help="logging level of raycls itself (default WARNING)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show Ray's and vLLM's own logs too")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raycls", description="Label text with LLMs as a Ray Data job: annotated Parquet and metrics out.")
    parser.add_argument("--version", action="version", version=f"raycls {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="label the input (resumable); write annotated Parquet and metrics")
    add_spec_arguments(run)
    run.add_argument("--limit", type=int, help="label only the first N rows")
    run.add_argument("--overwrite", action="store_true", help="replace a finished output instead of refusing to redo it")
    run.add_argument("--no-wait", action="store_true",
                     help="batch mode: submit and exit 0; the same command later collects (e.g. from cron)")
    run.add_argument("--dry-run", action="store_true", help=argparse.SUPPRESS)  # the old spelling of `raycls dry-run`

    dry = commands.add_parser("dry-run", help="read the input, render prompts, estimate tokens and cost; call no model")
    add_spec_arguments(dry)
    dry.add_argument("--limit", type=int, help="only the first N rows")

    validate = commands.add_parser("validate", help="check the spec and the input's columns; starts no Ray")
    add_spec_arguments(validate)

    new = commands.add_parser("label-new", help="label the files that landed in the input since the last call")
    add_spec_arguments(new, "job spec (YAML); input.path is the prefix to watch; - reads it from standard input")
    new.add_argument("--max-files", type=int, help="claim at most N new files in this call (the rest wait for the next)")
    new.add_argument("--dry-run", action="store_true", help="list the files that would be labelled; claim nothing")

    status = commands.add_parser("status", help="what an output holds: its run manifest, or an incremental lake's batches")
    add_spec_arguments(status, "job spec (YAML); optional with --output in batch mode", required=False)
    status.add_argument("--batches", action="store_true", help="the incremental batch records (label-new) as JSON")

    cancel = commands.add_parser("cancel", help="batch mode: cancel the output's in-flight batches at the provider")
    add_spec_arguments(cancel, "job spec (YAML); optional: --output is enough", required=False)

    train = commands.add_parser("train", help="fine-tune a classifier head on Ray Train (a train spec)")
    add_spec_arguments(train, "train spec (YAML); --input stands for data.path; - reads it from standard input")
    train.add_argument("--overwrite", action="store_true", help="replace a trained head instead of refusing")

    from raycls.quality.compare import add_compare_arguments

    compare = commands.add_parser("compare", help="run variants of a job over the same rows; write report.html with plots")
    add_compare_arguments(compare)
    add_console_arguments(compare)

    commands.add_parser("schema", help="print the job spec's JSON schema")
    return parser


def _load(args: argparse.Namespace):
    from raycls.config import load_spec

    direct = {"input.path": args.input, "output.path": args.output, "limit": getattr(args, "limit", None)}
    return load_spec(sys.stdin if args.config == STDIN else args.config, args.set, **direct)


def _console(args: argparse.Namespace, worker_output: bool = False, start_ray: bool = True) -> None:
    """Once the spec is valid: the console quiet unless `--verbose`, and Ray started with the
    same setting, so the library functions the command calls join it (`raycls.job.console`)."""
    from raycls.job import console
    console.configure(args.verbose)
    logging.getLogger("raycls").setLevel(args.log_level)
    if start_ray:
        from raycls.job.session import init_ray

        init_ray(args.verbose, worker_output)


def cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        return cmd_dry_run(args)
    spec = _load(args)  # a bad spec fails before Ray is imported
    _console(args)
    from raycls.job.pipeline import run_job

    if spec.output.format == "iceberg":  # a labels table: label what it does not cover yet, one commit
        return _label_new_table(spec, dry_run=False)
    result = run_job(spec, overwrite=args.overwrite, no_wait=args.no_wait)
    print(f"output: {result.output_path}", flush=True)
    return EXIT_OK


def cmd_dry_run(args: argparse.Namespace) -> int:
    spec = _load(args)
    _console(args)
    from raycls.job.estimate import dry_run

    dry_run(spec)
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from raycls.inputs.sources import check_input, resolve_input

    if args.config != STDIN and _is_train_spec(args.config):
        return validate_train_spec(args)
    spec = _load(args)
    files = resolve_input(spec.input)
    columns = check_input(spec.input, files).names
    print(f"ok: {len(files.files)} {spec.input.format or files.format} file(s), columns {columns}; "
          f"{len(spec.labels)} labels; backend {spec.backend.kind} ({spec.backend.model})", flush=True)
    return EXIT_OK


def _is_train_spec(path: str) -> bool:
    """A train spec has `data` where a job spec has `input` (`raycls validate` takes both)."""
    import yaml

    try:
        data = yaml.safe_load(open(path, encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return False  # the job spec loader gives the clear error
    return isinstance(data, dict) and "data" in data and "input" not in data


def validate_train_spec(args: argparse.Namespace) -> int:
    """A train spec and the columns of its labelled input (or that its LLM output exists); starts no Ray."""
    from raycls.config import InputSpec
    from raycls.inputs.sources import check_input, resolve_input
    from raycls.train.data import check_output_dir
    from raycls.train.spec import load_train_spec

    spec = load_train_spec(args.config, args.set, **{"data.path": args.input, "output.path": args.output})
    data = spec.data
    if data.path is not None:
        source = InputSpec(path=data.path, format=data.format, text=data.text, id_column=data.id_column,
                           gold_column=data.label_column)
        files = resolve_input(source)
        found = f"{len(files.files)} {files.format} file(s), columns {check_input(source, files).names}"
    else:
        found = f"the raycls output {check_output_dir(data.from_output)}"
    print(f"ok: train spec; {found}; {len(spec.labels)} labels; base model {spec.model.base_model} ({spec.model.method})",
          flush=True)
    return EXIT_OK


def cmd_label_new(args: argparse.Namespace) -> int:
    from raycls.job import incremental
    spec = _load(args)
    _console(args, start_ray=not args.dry_run)  # a dry run only lists
    if spec.input.is_table:
        return _label_new_table(spec, args.dry_run)
    if args.dry_run:
        print(incremental.describe_plan(incremental.plan(spec)), flush=True)
    else:
        outcome = incremental.label_new(spec, max_files=args.max_files)
        print(incremental.describe_outcome(outcome, spec.output.path), flush=True)
    return EXIT_OK


def _label_new_table(spec, dry_run: bool) -> int:
    """`label-new` over an Iceberg or Delta table (`raycls.lake.runs`)."""
    from raycls.lake import runs

    if dry_run:
        print(runs.describe_plan(spec), flush=True)
    else:
        where = spec.output.table if spec.output.format == "iceberg" else spec.output.path
        print(runs.describe_outcome(runs.label_new(spec), where), flush=True)
    return EXIT_OK


def _output_only(args: argparse.Namespace) -> str:
    from raycls.errors import SpecError

    if args.config:
        return _load(args).output.path
    if not args.output:
        raise SpecError("--output", "give --config, or --output naming a batch-mode output")
    return args.output


def cmd_status(args: argparse.Namespace) -> int:
    from raycls.job import incremental
    from raycls.job import resume
    from raycls.job.batch_job import batch_status

    batches = batch_status(_output_only(args))
    if not args.config:
        if batches is None:
            from raycls.errors import SpecError

            raise SpecError("--config", f"{args.output} holds no batch-mode state: give the job's --config")
        print(json.dumps({"output": args.output, **batches}, indent=2), flush=True)
        return EXIT_OK
    spec = _load(args)
    if spec.input.is_table:
        from raycls.lake import runs

        print(json.dumps(runs.status(spec), indent=2), flush=True)
        return EXIT_OK
    if args.batches:
        print(json.dumps(incremental.batch_records(incremental.Layout.of(spec)), indent=2), flush=True)
    else:
        found = resume.status(spec)
        if batches is not None:
            found["batch_mode"] = batches
        print(json.dumps(found, indent=2), flush=True)
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    from raycls.job.batch_job import batch_cancel

    output = _output_only(args)
    print(f"asked the provider to cancel {batch_cancel(output)} batch(es) of {output}; rows they answered are "
          "collected by the next `raycls run`, which also submits the rest again", flush=True)
    return EXIT_OK


def cmd_train(args: argparse.Namespace) -> int:
    from raycls.train.spec import load_train_spec

    spec = load_train_spec(sys.stdin if args.config == STDIN else args.config, args.set,
                           **{"data.path": args.input, "output.path": args.output})
    _console(args, worker_output=True)  # the epoch lines come from the training workers
    from raycls.train.run import train

    metrics = train(spec, overwrite=args.overwrite)
    shown = ("model_dir", "method", "epochs", "C", "val_accuracy", "val_macro_f1", "onnx", "elapsed_s")  # a linear head has C, no epochs
    print(json.dumps({k: metrics[k] for k in shown if k in metrics}), flush=True)
    return EXIT_OK


def cmd_compare(args: argparse.Namespace) -> int:
    from raycls.quality.compare import compare

    _console(args)
    report = compare(args.config, args.variant, args.output, limit=args.limit, input_path=args.input, sets=args.set,
                     title=args.title)
    print(f"report: {report}", flush=True)
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    from raycls.config import JobSpec

    print(json.dumps(JobSpec.model_json_schema(), indent=2), flush=True)
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run, "dry-run": cmd_dry_run, "validate": cmd_validate, "label-new": cmd_label_new,
    "status": cmd_status, "cancel": cmd_cancel, "train": cmd_train, "compare": cmd_compare, "schema": cmd_schema,
}


def _with_default_command(argv: list[str]) -> list[str]:
    """`raycls --config X` (the form before subcommands) still means `raycls run --config X`."""
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        return ["run", *argv]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_with_default_command(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=getattr(args, "log_level", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (BackendError, RowCountError, LeaseLost) as exc:
        print(f"raycls: error: {user_message(exc)}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except RayclsError as exc:
        print(f"raycls: error: {user_message(exc)}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("raycls: interrupted; run the same command again to label the rest", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
