"""Regenerate docs/config.md from the config classes: python scripts/gen_config_docs.py"""

import sys
from pathlib import Path

from services.launcher.docs import render_config_docs

TARGET = Path(__file__).resolve().parents[1] / "docs" / "config.md"

if __name__ == "__main__":
    TARGET.write_text(render_config_docs())
    sys.stdout.write(f"wrote {TARGET}\n")
