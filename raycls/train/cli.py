"""`python jobs/train.py --config SPEC.yaml` (and, wired by the CLI, `raycls train`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from raycls.cli import add_spec_arguments
from raycls.errors import RayclsError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycls train", description="Fine-tune a classifier head on Ray Train.")
    add_spec_arguments(parser, "train spec (YAML); --input stands for data.path")
    parser.add_argument("--overwrite", action="store_true", help="replace a trained head instead of refusing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from raycls.train.run import train
        from raycls.train.spec import load_train_spec

        spec = load_train_spec(args.config, args.set, **{"data.path": args.input, "output.path": args.output})
        metrics = train(spec, overwrite=args.overwrite)
        print(json.dumps({k: metrics[k] for k in ("model_dir", "epochs", "val_accuracy", "val_macro_f1", "elapsed_s")}), flush=True)
        return 0
    except RayclsError as exc:
        print(f"raycls: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
