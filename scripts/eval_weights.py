"""Evaluate a weights folder with a run's ``[[eval.env]]``: serve it with ``rlbus inference`` on a
free port, run ``rlbus eval`` against it, stop the replica.

usage: python scripts/eval_weights.py WEIGHTS ORCHESTRATOR_TOML OUTPUT_DIR

Writes ``OUTPUT_DIR/eval/metrics.json`` (``rlbus eval``) and the replica's log under
``OUTPUT_DIR/logs/``. The quickstart uses it for its SFT-alone comparison.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rlbus.ports import free_loopback_port

READY_TIMEOUT_S = 600.0  # vLLM on a busy 2-core CPU


def wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    """Until ``url`` answers /health; fails at once if the replica exits."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet
        try:  # the poll interval doubles as the check that the replica is still alive
            process.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue
        raise SystemExit(f"rlbus inference exited with {process.returncode}; see {log}")
    raise SystemExit(f"rlbus inference not ready within {READY_TIMEOUT_S:g}s; see {log}")


def main(weights: str, orchestrator_toml: str, output_dir: str) -> int:
    out = Path(output_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    port = free_loopback_port()
    log = out / "logs" / "eval-inference.out"
    command = [sys.executable, "-m", "rlbus", "inference", "--model", weights, "--port", str(port),
               "--output-dir", str(out / "eval-inference"), "--max-model-len", "512",
               "--startup-weights-timeout-s", "1"]  # fmt: skip
    with log.open("wb") as sink:
        replica = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_ready(replica, f"http://127.0.0.1:{port}", log)
        return subprocess.call([sys.executable, "-m", "rlbus", "eval", "@", orchestrator_toml, "--model", weights,
                                "--output-dir", str(out), "--client.base-url", f"http://127.0.0.1:{port}/v1"])  # fmt: skip
    finally:
        replica.send_signal(signal.SIGINT)
        try:
            replica.wait(timeout=60)
        except subprocess.TimeoutExpired:
            replica.kill()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    sys.exit(main(*sys.argv[1:]))
