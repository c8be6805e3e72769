"""``rlbus eval`` as a real process: write the orchestrator config, run it against an endpoint,
read the metrics file it writes (shared by the eval tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

ROOT = Path(__file__).resolve().parents[2]


def run_rlbus_eval(config: dict[str, Any], base_url: str, env: Mapping[str, str],
                   timeout: int) -> tuple[subprocess.CompletedProcess, dict[str, float]]:  # fmt: skip
    """Run ``rlbus eval`` on ``config`` (its ``output_dir`` included) against ``base_url``; the
    finished process and the metrics of ``<output_dir>/eval/metrics.json`` (empty if it failed)."""
    out = Path(config["output_dir"])
    path = out / "orchestrator.toml"
    path.write_text(tomli_w.dumps(config))
    result = subprocess.run([sys.executable, "-m", "rlbus", "eval", "@", str(path), "--client.base-url", base_url],
                            cwd=ROOT, env=dict(env), capture_output=True, text=True, timeout=timeout,
                            check=False)  # fmt: skip
    metrics_file = out / "eval" / "metrics.json"
    metrics = json.loads(metrics_file.read_text())["metrics"] if result.returncode == 0 else {}
    return result, metrics
