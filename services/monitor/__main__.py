"""`python -m services.monitor` is `rlbus monitor`."""

import sys

from services.monitor.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
