"""How many SFT steps fit in SECONDS at the step rate an earlier SFT run measured (its steps.jsonl).

usage: python scripts/sft_steps_for.py STEPS_JSONL SECONDS   (prints one integer, at least 1)

The rate is the median ``sft/time/step`` of that run, start-up excluded; the quickstart uses it to
give SFT alone the minutes its RL phase took.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def steps_for(steps_jsonl: Path, seconds: float) -> int:
    times = [row["sft/time/step"] for row in map(json.loads, steps_jsonl.read_text().splitlines())
             if isinstance(row.get("sft/time/step"), (int, float))]  # fmt: skip
    if not times:
        raise ValueError(f"{steps_jsonl} reports no sft/time/step")
    return max(1, int(seconds / statistics.median(times)))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    print(steps_for(Path(sys.argv[1]), float(sys.argv[2])))
