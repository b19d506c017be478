"""Label the files that landed in the input since the last call, as a new output partition.

`python jobs/label_new.py --config jobs/configs/X.yaml` from cron, or hourly as
`ray job submit --working-dir . -- python jobs/label_new.py --config ...`. Overlapping and
crashed calls are safe: see `raycls.incremental`. Thin on purpose: the logic lives there.
"""

import argparse
import json
import logging
import sys

from raycls.cli import add_spec_arguments
from raycls.errors import RayclsError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="label_new", description=__doc__.split("\n")[0])
    add_spec_arguments(parser, "job spec (YAML); input.path is the prefix to watch")
    parser.add_argument("--max-files", type=int, help="claim at most N new files in this call (the rest wait for the next)")
    parser.add_argument("--dry-run", action="store_true", help="list the files that would be labelled; claim nothing")
    parser.add_argument("--status", action="store_true", help="print the batch records (the manifest) as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from raycls import incremental
        from raycls.config import load_spec

        spec = load_spec(args.config, args.set, **{"input.path": args.input, "output.path": args.output})
        if args.status:
            print(json.dumps(incremental.batch_records(incremental.Layout.of(spec)), indent=2), flush=True)
        elif args.dry_run:
            print(incremental.describe_plan(incremental.plan(spec)), flush=True)
        else:
            outcome = incremental.label_new(spec, max_files=args.max_files)
            print(incremental.describe_outcome(outcome, spec.output.path), flush=True)
        return 0
    except RayclsError as exc:
        print(f"label_new: error: {exc}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    sys.exit(main())
