"""`python -m services.trainer` is `rlbus trainer`."""

import sys

from services.trainer.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
