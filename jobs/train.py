"""Fine-tune a classifier head: `python jobs/train.py --config jobs/configs/agnews_head.yaml`,
the same as `raycls train --config ...` (thin, for `ray job submit`)."""

import sys

from raycls.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
