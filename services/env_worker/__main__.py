"""`python -m services.env_worker` is `rlbus env-worker`."""

import sys

from services.env_worker.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
