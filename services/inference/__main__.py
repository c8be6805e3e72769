"""`python -m services.inference` is `rlbus inference`."""

import sys

from services.inference.main import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
