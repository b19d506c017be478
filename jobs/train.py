"""Fine-tune a classifier head: `python jobs/train.py --config jobs/configs/agnews_head.yaml`."""

import sys

from raycls.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
