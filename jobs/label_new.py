"""Label the files that landed in the input since the last call, as a new output partition.

`python jobs/label_new.py --config jobs/configs/X.yaml` from cron, or hourly as
`ray job submit --working-dir . -- python jobs/label_new.py --config ...`; the same as
`raycls label-new`. Overlapping and crashed calls are safe: see `raycls.job.incremental`.
"""

import sys

from raycls.cli import main

if __name__ == "__main__":  # vLLM spawns processes: keep the guard
    args = sys.argv[1:]
    if "--status" in args:  # the batch records, as `raycls status --batches`
        sys.exit(main(["status", "--batches", *(a for a in args if a != "--status")]))
    sys.exit(main(["label-new", *args]))
