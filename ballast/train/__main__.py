"""`python -m ballast.train JOB_DIR`: run one fine-tuning job (resuming from its last checkpoint, if any)."""

import sys

from ballast.train.worker import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
