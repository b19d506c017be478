"""Label a dataset: `python jobs/classify.py --config jobs/configs/demo.yaml`, the same as
`raycls run --config ...`.

Thin on purpose: everything testable lives in `raycls`. Runs as it is under
`ray job submit -- python jobs/classify.py ...` (Ray connects to the cluster) and on
one machine (Ray starts locally). `--dry-run` estimates instead (`raycls dry-run`).
"""

import sys

from raycls.cli import main

if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    sys.exit(main())
