"""`python -m services.launcher` is `rlbus launcher`."""

import sys

from services.launcher.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
