"""Compare variants of a job side by side: `python jobs/compare.py --config X.yaml --variant a --variant b prompt=json ...`."""

import sys

from raycls.cli import main

if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    sys.exit(main(["compare", *sys.argv[1:]]))
