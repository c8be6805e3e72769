"""A real ``rlbus inference`` replica serving a model folder's base weights, for tests that only sample.

No trainer answers, so the replica serves the folder's weights after ``startup_weights_timeout_s``;
it is ready when its heartbeat says so (awaited on the telemetry socket, never by sleeping).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import tomli_w
import zmq

from rlbus.bus import Bus
from rlbus.config.base import BusConfig
from rlbus.messages import Heartbeat
from tests.conftest import free_tcp_port

REPO = Path(__file__).resolve().parents[2]
START_S = 900  # vLLM on a loaded 2-core machine


def _endpoint() -> str:
    return f"tcp://127.0.0.1:{free_tcp_port()}"


@contextmanager
def serve_tiny_inference(model_dir: Path, folder: Path, max_model_len: int = 1024) -> Iterator[str]:
    """Start ``rlbus inference`` on ``model_dir`` (logs in ``folder``); yields its ``/v1`` base URL."""
    port, telemetry = free_tcp_port(), _endpoint()
    config = {
        "model": str(model_dir), "output_dir": str(folder / "out"), "port": port, "max_model_len": max_model_len,
        "startup_weights_timeout_s": 1.0,
        "bus": {"endpoints": {"trainer_weights": _endpoint(), "trainer_announce": _endpoint(),
                              "orchestrator_policy": _endpoint(), "monitor_telemetry": telemetry}},
    }  # fmt: skip
    (folder / "inference.toml").write_text(tomli_w.dumps(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLBUS_")} | {"VLLM_CPU_KVCACHE_SPACE": "1"}
    log_path = folder / "inference.log"
    with Bus(BusConfig(linger_ms=0)) as bus, log_path.open("w") as log:
        heartbeats = bus.bind(zmq.PULL, telemetry, role="telemetry")
        process = subprocess.Popen([sys.executable, "-m", "rlbus", "inference", "@", str(folder / "inference.toml")],
                                   cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            deadline = time.monotonic() + START_S
            while True:
                assert process.poll() is None, f"inference exited: {log_path.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"inference not ready in {START_S}s"
                beat = bus.recv_before(heartbeats, time.monotonic() + 5, Heartbeat)
                if isinstance(beat, Heartbeat) and beat.service == "inference" and beat.status == "ready":
                    break
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            _stop(process)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the replica's process group (vLLM's engine shares it), SIGKILL it if it lingers."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(30)
