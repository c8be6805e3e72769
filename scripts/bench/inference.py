"""Generation through ``rlbus inference`` against vLLM offline, and weight updates against raw loopback.

Same prompts (random printable token ids), same sampling (temperature 1, a seed per
prompt, ``ignore_eos`` so every completion has exactly ``--max-tokens`` tokens) and
the same engine settings, through

(a) vLLM's offline ``LLM.generate`` in one process (target: rlbus >= 0.9 x this),
(b) the rlbus service over HTTP with ``--concurrency`` concurrent clients, and
(c) plain ``vllm serve`` through the same clients, which isolates what rlbus adds
    from vLLM's own HTTP and asyncio cost (skip with ``--skip-vllm-serve``);

tokens/s are completion tokens over wall time, after one warm-up request each.
Then the service takes ``--updates`` weight steps from a WeightServer in this
process: MB/s of fetch + verify + load (as the replica reports it), of the fetch
alone, and end to end (publish until ``PolicyLoaded``), each against raw pyzmq
PUSH -> PULL of 1 MiB frames over tcp loopback measured in the same run.

    python scripts/bench/inference.py [--model DIR] [--num-prompts 128] [--max-tokens 256] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import zmq
from loopback import raw_loopback_mb_s  # scripts/bench/loopback.py, beside this script
from safetensors.numpy import load_file

from rlbus.bus import Bus
from rlbus.config.base import BusConfig, BusEndpoints, to_toml
from rlbus.logging import setup_logging
from rlbus.messages import Ack, Heartbeat, MetricsReport, PolicyLoaded
from rlbus.ports import free_loopback_port
from rlbus.services.inference.config import InferenceConfig
from rlbus.services.inference.policy import policy_ref
from rlbus.weights import WeightServer, WeightStore

STARTUP_S = 900.0
ENGINE = {"dtype": "float32", "max_model_len": 1024, "gpu_memory_utilization": 0.2, "enforce_eager": True}
ENV = {"VLLM_CPU_KVCACHE_SPACE": "2"}


def make_prompts(num_prompts: int, prompt_len: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return [rng.integers(32, 127, prompt_len).tolist() for _ in range(num_prompts)]


# ----------------------------------------------------------------- (a) offline


def offline_child(args: argparse.Namespace) -> None:
    """Runs in its own process: time LLM.generate and write ``tokens seconds`` to stdout."""
    from vllm import LLM, SamplingParams

    prompts = make_prompts(args.num_prompts, args.prompt_len)
    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, seed=0, **ENGINE)
    params = [SamplingParams(temperature=1.0, max_tokens=args.max_tokens, seed=i, ignore_eos=True)
              for i in range(len(prompts))]  # fmt: skip
    llm.generate([{"prompt_token_ids": prompts[0]}], params[0], use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    seconds = time.perf_counter() - started
    sys.stdout.write(f"RESULT {sum(len(o.outputs[0].token_ids) for o in outputs)} {seconds}\n")
    sys.stdout.flush()


def run_offline(args: argparse.Namespace, model: str, log: Path) -> tuple[int, float]:
    """(completion tokens, seconds) of the offline run, in a process session of its own: vLLM's
    engine and worker processes must be gone before the service starts, or they share its cores."""
    argv = [sys.executable, __file__, "--offline-child", "--model", model, "--num-prompts", str(args.num_prompts),
            "--prompt-len", str(args.prompt_len), "--max-tokens", str(args.max_tokens),
            "--max-num-seqs", str(args.max_num_seqs)]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=output, env=os.environ | ENV,
                                   start_new_session=True)  # fmt: skip
        try:
            stdout, _ = process.communicate(timeout=STARTUP_S)
        finally:
            stop_session(process)
    result = [line for line in stdout.decode().splitlines() if line.startswith("RESULT ")]
    if not result:
        raise RuntimeError(f"the offline run printed no result; see {log}")
    _, tokens, seconds = result[-1].split()
    return int(tokens), float(seconds)


def stop_session(process: subprocess.Popen) -> None:
    """SIGTERM ``process``, then SIGKILL whatever is left of its session (vLLM's engine and workers)."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(30)


# ----------------------------------------------------------------- (b) service


class Service:
    """``rlbus inference`` in a subprocess; this process is its trainer, orchestrator and monitor."""

    def __init__(self, model: str, workdir: Path, max_num_seqs: int, engine: dict | None = None) -> None:
        endpoints = {name: f"tcp://127.0.0.1:{free_loopback_port()}" for name in BusEndpoints.model_fields}
        self.bus_config = BusConfig(endpoints=BusEndpoints(**endpoints), linger_ms=0, heartbeat_interval_s=1)
        self.bus = Bus(self.bus_config)
        self.trainer = WeightServer(self.bus, endpoints["trainer_weights"], endpoints["trainer_announce"],
                                    WeightStore(bucket_bytes=64 << 20)).start()  # fmt: skip
        self.monitor = self.bus.bind(zmq.PULL, endpoints["monitor_telemetry"], "telemetry")
        self.orchestrator = self.bus.bind(zmq.ROUTER, endpoints["orchestrator_policy"], "policy")
        self.port = free_loopback_port()
        config = InferenceConfig(model=model, output_dir=workdir / "out", port=self.port, max_num_seqs=max_num_seqs,
                                 startup_weights_timeout_s=5, bus=self.bus_config, **(engine or ENGINE))  # fmt: skip
        (workdir / "inference.toml").write_text(to_toml(config))
        self.log = (workdir / "inference.log").open("wb")  # a subprocess writes it; closed with this process
        command = [sys.executable, "-m", "rlbus", "inference", "@", str(workdir / "inference.toml")]
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ | ENV,
                                        start_new_session=True)  # fmt: skip
        self.telemetry(Heartbeat, lambda m: m.status == "ready", STARTUP_S)

    def telemetry(self, kind: type, predicate, timeout_s: float = 300):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the service exited with {self.process.returncode}; see {self.log.name}")
            message = self.bus.recv_before(self.monitor, min(deadline, time.monotonic() + 1), None)
            if isinstance(message, kind) and predicate(message):
                return message
        raise TimeoutError(f"no matching {kind.__name__} from the service within {timeout_s:g}s")

    def wait_policy(self, step: int, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            received = self.bus.recv_before(self.orchestrator, deadline, PolicyLoaded)
            if received is not None:
                identity, report = received
                self.bus.send(self.orchestrator, Ack(ref=policy_ref(report.step)), identity)
                if report.step == step:
                    return
        raise TimeoutError(f"step {step} was not loaded within {timeout_s:g}s")

    def close(self) -> None:
        stop_session(self.process)
        self.trainer.stop()
        self.bus.close()


class VllmServe:
    """Plain ``vllm serve`` with the same engine settings: the HTTP baseline without rlbus."""

    def __init__(self, model: str, max_num_seqs: int, log: Path) -> None:
        self.port = free_loopback_port()
        # vLLM's API server entry itself (the `vllm` CLI needs a `vllm` dist, vllm-cpu is named otherwise).
        argv = [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry", "--model", model,
                "--port", str(self.port),
                "--max-num-seqs", str(max_num_seqs), "--seed", "0", "--disable-uvicorn-access-log",
                "--dtype", ENGINE["dtype"], "--max-model-len", str(ENGINE["max_model_len"]),
                "--gpu-memory-utilization", str(ENGINE["gpu_memory_utilization"]), "--enforce-eager"]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ | ENV,
                                        start_new_session=True)  # fmt: skip
        self._log = log.open("wb")
        # Ready when uvicorn says so (vLLM has no bus handshake); then keep draining its output.
        for line in self.process.stdout:
            self._log.write(line)
            if b"Application startup complete" in line:
                break
        else:
            raise RuntimeError(f"vllm serve exited before it was ready; see {log}")
        self._drain = threading.Thread(target=self._copy_output, daemon=True)
        self._drain.start()

    def _copy_output(self) -> None:
        for line in self.process.stdout:
            self._log.write(line)

    def close(self) -> None:
        stop_session(self.process)
        self._drain.join(30)
        self._log.close()


async def run_clients(base_url: str, model: str, prompts: list[list[int]], max_tokens: int,
                      concurrency: int) -> tuple[int, float]:  # fmt: skip
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=STARTUP_S, limits=limits) as client:

        async def complete(i: int) -> int:
            body = {"model": model, "prompt": prompts[i], "max_tokens": max_tokens, "temperature": 1.0, "seed": i,
                    "ignore_eos": True}  # fmt: skip
            async with slots:
                response = await client.post("/v1/completions", json=body)
            response.raise_for_status()
            return response.json()["usage"]["completion_tokens"]

        await complete(0)  # warm-up
        started = time.perf_counter()
        tokens = await asyncio.gather(*(complete(i) for i in range(len(prompts))))
        return sum(tokens), time.perf_counter() - started


def weight_updates(service: Service, model: str, num_updates: int) -> dict[str, list[float]]:
    """Publish ``num_updates`` steps; MB/s per step as the replica measured it, and end to end."""
    base = load_file(str(Path(model) / "model.safetensors")) if (Path(model) / "model.safetensors").exists() else None
    if base is None:
        raise SystemExit(f"{model} has no model.safetensors to derive new weights from")
    rng = np.random.default_rng(1)
    variants = [[(name, (a + rng.normal(0, 0.01, a.shape)).astype(a.dtype), a.dtype.name) for name, a in base.items()]
                for _ in range(2)]  # fmt: skip
    total_mb = sum(a.nbytes for _, a, _ in variants[0]) / 1e6
    rates: dict[str, list[float]] = {"replica": [], "fetch": [], "end_to_end": []}
    for step in range(1, num_updates + 1):
        started = time.perf_counter()
        service.trainer.publish(step, variants[step % 2])
        service.wait_policy(step)
        rates["end_to_end"].append(total_mb / (time.perf_counter() - started))
        report = service.telemetry(
            MetricsReport, lambda m, s=step: m.step == s and "inference/weight_fetch_s" in m.metrics
        )
        rates["replica"].append(report.metrics["inference/weight_update_mb_per_s"])
        rates["fetch"].append(total_mb / report.metrics["inference/weight_fetch_s"])
    rates["size_mb"] = [total_mb]
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model directory; default: a fresh tiny model")
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--skip-vllm-serve", action="store_true", help="skip the plain `vllm serve` baseline")
    parser.add_argument("--offline-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.offline_child:
        offline_child(args)
        return
    setup_logging("bench", None, level="warning")
    workdir = Path(tempfile.mkdtemp(prefix="rlbus-bench-inference-"))
    model = args.model or str(tiny_model(workdir / "tiny"))
    prompts = make_prompts(args.num_prompts, args.prompt_len)

    raw = raw_loopback_mb_s()
    runs = {"offline LLM.generate": run_offline(args, model, workdir / "offline.log")}
    clients = f"{args.concurrency} HTTP clients"
    if not args.skip_vllm_serve:
        runs[f"vllm serve, {clients}"] = vllm_serve_baseline(args, model, prompts, workdir)
    service = Service(model, workdir, args.max_num_seqs)
    try:
        runs[f"rlbus inference, {clients}"] = asyncio.run(
            run_clients(f"http://127.0.0.1:{service.port}", model, prompts, args.max_tokens, args.concurrency)
        )
        rates = weight_updates(service, model, args.updates)
    finally:
        service.close()
    report(args, model, runs, rates, raw)
    shutil.rmtree(workdir)  # kept when something failed: its logs say why


def vllm_serve_baseline(args: argparse.Namespace, model: str, prompts: list[list[int]],
                        workdir: Path) -> tuple[int, float]:  # fmt: skip
    """Plain ``vllm serve`` through the same clients. Its engine has died mid-run here (EngineDeadError
    after "shutdown triggered", then httpx.ReadError in the clients); a run that fails so is started
    afresh once, and the failure is reported rather than ending the benchmark."""
    for attempt in (1, 2):
        log = workdir / f"vllm-serve-{attempt}.log"
        baseline = VllmServe(model, args.max_num_seqs, log)
        try:
            return asyncio.run(run_clients(f"http://127.0.0.1:{baseline.port}", model, prompts, args.max_tokens,
                                           args.concurrency))  # fmt: skip
        except httpx.HTTPError as exc:
            sys.stderr.write(f"[bench] plain vllm serve failed on attempt {attempt} ({type(exc).__name__}: {exc}); "
                             f"its log: {log}\n")  # fmt: skip
            if attempt == 2:
                raise
        finally:
            baseline.close()
    raise AssertionError("unreachable")


def tiny_model(out: Path) -> Path:
    from rlbus.services.models.tiny import TinyModelConfig, build_tiny_model

    return build_tiny_model(out, TinyModelConfig(out=out))


def report(args, model: str, runs: dict[str, tuple[int, float]], rates: dict, raw: float) -> None:
    tokens_per_s = {name: tokens / seconds for name, (tokens, seconds) in runs.items()}
    ours = tokens_per_s[next(name for name in runs if name.startswith("rlbus"))]
    median = {key: statistics.median(values) for key, values in rates.items()}
    lines = [
        (
            f"model {model}: {args.num_prompts} prompts x {args.prompt_len} tokens -> {args.max_tokens} tokens "
            f"each, temperature 1.0, max_num_seqs {args.max_num_seqs}"
        )
    ]
    for name, (tokens, seconds) in runs.items():
        lines.append(f"{name:<34} {tokens_per_s[name]:9.1f} tokens/s  ({tokens} tokens in {seconds:.1f}s)")
    for name in runs:
        if not name.startswith("rlbus"):
            lines.append(f"rlbus / {name.split(',')[0]:<26} {ours / tokens_per_s[name]:9.2f}")
    lines += [
        f"raw zmq loopback, 1 MiB frames     {raw:9.1f} MB/s",
        f"weight update of {median['size_mb']:.1f} MB, median of {args.updates}:",
        f"  fetch + verify + load            {median['replica']:9.1f} MB/s   / raw {median['replica'] / raw:6.3f}",
        f"  fetch + verify only              {median['fetch']:9.1f} MB/s   / raw {median['fetch'] / raw:6.3f}",
        f"  publish -> PolicyLoaded          {median['end_to_end']:9.1f} MB/s   / raw {median['end_to_end'] / raw:6.3f}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
