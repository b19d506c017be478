"""Command-line entry point shared by `jobs/classify.py` and the `raycls` console script.

Errors raised on purpose (`RayclsError`) become one clear line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from raycls.errors import RayclsError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raycls",
        description="Label text with LLMs as a Ray Data job: annotated Parquet and metrics out.",
    )
    add_spec_arguments(parser)
    parser.add_argument("--limit", type=int, help="label only the first N rows")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished output instead of refusing to redo it")
    parser.add_argument("--dry-run", action="store_true",
                        help="read the input, render prompts and estimate tokens and cost; call no model")
    return parser


def add_spec_arguments(parser: argparse.ArgumentParser, config_help: str = "job spec (YAML)") -> None:
    """The options every entry point shares: the spec, overrides, input, output, log level."""
    parser.add_argument("--config", required=True, help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec key, e.g. --set backend.batch_size=32 (repeatable)")
    parser.add_argument("--input", help="shorthand for --set input.path=PATH")
    parser.add_argument("--output", help="shorthand for --set output.path=PATH")
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from raycls.config import load_spec

        spec = load_spec(args.config, args.set, **{"input.path": args.input, "output.path": args.output, "limit": args.limit})
        if args.dry_run:
            from raycls.estimate import dry_run

            dry_run(spec)
            return 0
        from raycls.pipeline import run_job

        result = run_job(spec, overwrite=args.overwrite)
        print(f"output: {result.output_path}", flush=True)
        return 0
    except RayclsError as exc:
        print(f"raycls: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("raycls: interrupted; run the same command again to label the rest", file=sys.stderr, flush=True)
        return 130


if __name__ == "__main__":
    sys.exit(main())
