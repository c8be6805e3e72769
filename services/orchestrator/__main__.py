"""`python -m services.orchestrator` is `rlbus orchestrator`."""

import sys

from services.orchestrator.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
