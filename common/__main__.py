"""``python -m rlbus`` is the ``rlbus`` command (what the launcher and job scripts run)."""

import sys

from rlbus.services.cli import main

if __name__ == "__main__":
    sys.exit(main())
