"""Config of an inference replica (``rlbus inference``, section ``[inference]``)."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rlbus.config import ServiceConfig
from rlbus.config.base import Secret
from rlbus.curve import is_loopback_host
from rlbus.identity import service_id
from rlbus.messages import ADAPTER_NAME_PATTERN
from rlbus.weights_collective import parse_address

# vLLM's VLLM_CPU_OMP_THREADS_BIND grammar: core lists ("0-3,6") per worker, joined by "|".
_CORES = r"\d+(-\d+)?(,\d+(-\d+)?)*"
CORES_PATTERN = rf"^(auto|nobind|{_CORES}(\|{_CORES})*)$"


RELAY_CONNECT_PATTERN = r"^(tcp://[^\s/:*]+:\d{1,5}|ipc://\S+)$"
"""A relay address a peer connects to: ``tcp://host:port`` or ``ipc://path``."""
RELAY_BIND_PATTERN = r"^$|^(tcp://[^\s/:]+:(\d{1,5}|\*)|ipc://\S+)$"
"""A relay address to bind ("" for none): ``tcp://host:port`` (``*``: any free port) or ``ipc://path``."""


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM 0.32 accepts for ``--max-lora-rank`` (``vllm.config.lora.MaxLoRARanks``)."""


def lora_rank_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank`` (the largest if none does)."""
    return next((slot for slot in VLLM_LORA_RANKS if slot >= rank), VLLM_LORA_RANKS[-1])


class InferenceConfig(ServiceConfig):
    """One vLLM replica serving the OpenAI-compatible API and pulling new weights over the bus."""

    SERVICE: ClassVar[str] = "inference"

    host: str = "127.0.0.1"
    """Interface the HTTP server listens on; a non-loopback one (e.g. ``0.0.0.0``) needs ``api_key``
    or ``allow_insecure_remote`` (docs/security.md)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port of the OpenAI-compatible API."""
    api_key: Secret | None = None
    """Bearer key required on every request except ``GET /health`` and ``GET /metrics``;
    None leaves the API open. Also read from ``RLBUS_INFERENCE__API_KEY``; written redacted in
    resolved configs, so pass it that way to a service started from one."""
    allow_insecure_remote: bool = False
    """Let the HTTP server listen on a non-loopback ``host`` without ``api_key``: anyone who reaches
    the port can then sample, reload weights and load LoRA adapters. Only for networks where every
    host is trusted (e.g. a private Docker network)."""
    replica_id: str | None = None
    """Name of this replica on the bus; None derives ``inference-<hostname>-<port>``."""
    advertise_url: str | None = None
    """Base URL (ending in ``/v1``) that env-workers reach this replica at, sent in ``PolicyLoaded``;
    None derives ``http://<host>:<port>/v1`` (the machine's hostname when host is 0.0.0.0)."""
    served_model_name: str | None = None
    """Model name clients pass in requests; None uses ``model`` as written."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """Weight dtype inside vLLM; float32 on CPU."""
    max_model_len: int = Field(2048, ge=16)
    """Longest prompt + completion, in tokens."""
    max_num_seqs: int = Field(64, ge=1)
    """Sequences vLLM schedules at once."""
    gpu_memory_utilization: float = Field(0.2, gt=0, le=1)
    """Fraction of device memory for vLLM (of host RAM on CPU)."""
    kv_cache_gib: float | None = Field(None, gt=0)
    """KV cache size in GiB (vLLM's ``--kv-cache-memory-bytes``), which then replaces the share of
    memory ``gpu_memory_utilization`` would leave for it; None lets vLLM size it. On CPU vLLM
    allocates and touches the whole cache as it starts, so a cache sized to the run starts faster:
    the quickstart's 64 rollouts of <= 512 tokens need ~35 K tokens (~0.07 GiB for its model)."""
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one replica shards the model across."""
    enforce_eager: bool = True
    """Run the model eagerly: no torch.compile (and no CUDA graphs on GPUs). A faster start, slower
    steps: measured on 2 CPU cores with the quickstart's model, vLLM's engine init took 2.6 s eager and
    3.5 s compiled (~20 s the first time, before torch inductor's cache holds the model), and 64
    rollouts took 0.72 s eager and 0.50 s compiled. Set false for long runs and on GPUs.
    Compiling on a CPU needs a C++ compiler (``$CXX`` or g++); without one the replica runs eagerly."""
    worker_idle_spin_s: float | None = Field(0.005, ge=0)
    """Seconds an idle vLLM worker spins for the next engine step before it sleeps; vLLM's own 1 s
    burns a core after every generation burst that a trainer on the same CPUs needs (measured on
    2 cores: trainer step 2.4 s -> 1.5 s); a parked worker then re-checks its queue every 10 ms
    instead of every 5 s. None keeps vLLM's defaults (services/inference/idle_spin.py)."""
    cpu_threads_bind: str | None = Field(None, min_length=1, pattern=CORES_PATTERN)
    """On CPU: the cores vLLM's worker pins its threads to, one per core (vLLM's
    ``VLLM_CPU_OMP_THREADS_BIND``: ``"0"``, ``"0-3"``, ``"0,2"``); None keeps vLLM's ``auto`` (every
    core of a NUMA node). Set it when a trainer on the same machine trains while this replica
    generates (``max_async_level`` >= 1), with ``trainer.num_threads`` for the other cores."""
    worker_in_engine_process: bool = True
    """With one worker (``tensor_parallel_size`` 1), run vLLM's model worker inside its engine-core
    process (vLLM's uniproc executor) rather than in a third process. vLLM's CPU platform picks the
    multiprocessing executor unless ``VLLM_ENABLE_V1_MULTIPROCESSING=0``, which costs a process start
    (torch and vLLM imported once more) and a queue hop every engine step; measured on 2 cores with
    the quickstart's model: 64 rollouts 1.04 -> 0.72 s, replica start 16 -> 3 s offline. On GPUs
    vLLM already runs one worker this way. False keeps vLLM's choice (services/inference/executor.py)."""
    fork_engine_core: bool = True
    """On CPU, with the worker in the engine-core process (``worker_in_engine_process``, one worker):
    fork the engine core from the server (vLLM's library default) instead of spawning it as ``vllm
    serve`` and its CPU platform ask (for executor workers this placement does not start). A spawned engine core imports
    torch and vLLM again: measured on 2 cores, the quickstart's replica served 19.5 s after ``rlbus rl``
    started with spawn and 14.1 s with fork, steps as fast. With ``cpu_threads_bind`` too: the binding
    and its ``OMP_NUM_THREADS`` are set before the server imports torch, whose OpenMP team a forked
    engine keeps (set after, the team was sized for every core and generated 2x slower beside a
    trainer). At ``max_async_level = 1``: first rollouts 25.1 s after launch spawned, 16.0-17.6 s
    forked, steps as fast. A compiled replica's server also runs torch inductor's CPU ISA probe while
    it imports vLLM, and the forked engine core inherits the answers instead of probing in its warm-up
    (engine init 4.3-4.9 -> 3.0-3.7 s; services/inference/isa_probe.py). False keeps spawn
    (services/inference/executor.py); so does ``VLLM_WORKER_MULTIPROC_METHOD`` set by you."""
    enable_lora: bool = False
    """Allow LoRA adapters (``POST /rlbus/load_lora``); costs some speed, so off unless needed."""
    max_lora_rank: int = Field(16, ge=1)
    """Largest LoRA rank accepted when ``enable_lora`` is set; vLLM takes 1, 8, 16, 32, 64, 128, 256,
    320 or 512 (``rlbus rl`` raises it to fit ``trainer.lora.rank`` unless set)."""
    max_loras: int = Field(1, ge=1)
    """LoRA adapters usable in one batch when ``enable_lora`` is set."""
    await_adapter: str | None = Field(None, pattern=ADAPTER_NAME_PATTERN)
    """A LoRA run's adapter name (``rlbus rl`` sets it from ``trainer.lora.name`` when only the
    adapter travels): requests name it as ``model``, so the replica admits none until the trainer's
    adapter of that name is loaded (the base alone would answer them 404). It also selects which
    adapter the replica follows: it asks the trainer for this adapter's latest step and ignores
    announcements of the full weights or of other adapters (other runs sharing the trainer).
    Adapters are written under ``<output_dir>/adapters/<replica_id>/`` and loaded in place by name
    (needs ``enable_lora``). None: follow the full weights, and serve the base weights when the
    trainer has published none."""
    lora_dir: Path | None = None
    """Folder ``POST /rlbus/load_lora`` loads adapters from: a ``lora_path`` must be an absolute path
    that resolves (symlinks followed) inside it; hub ids are refused. None refuses loading by HTTP."""
    access_log: bool = False
    """Log one line per HTTP request (noisy under RL load)."""
    startup_weights_timeout_s: float = Field(10.0, gt=0)
    """How long a starting replica waits for the trainer to say which step is latest before it
    serves the base weights (step 0); it still loads newer steps when they are announced."""
    weights_poll_interval_s: float = Field(30.0, gt=0)
    """Seconds between ``WeightsQuery`` checks for a newer step, in case an announcement was missed."""
    swap_drain_timeout_s: float = Field(300.0, gt=0)
    """How long a weight swap waits for in-flight requests to finish on the old weights before it
    aborts them (they return ``finish_reason: "abort"``, still tagged with the old step)."""
    weights_relay: str = Field("", pattern=RELAY_BIND_PATTERN)
    """Address where this replica serves the steps it loaded to peer replicas (a ZeroMQ ROUTER bound
    in its vLLM worker, rank 0 only with tensor parallelism; e.g. ``tcp://127.0.0.1:5580``), from
    the receive buffers it keeps anyway: peers that list it in ``weights_upstream`` take each step
    from here instead of the trainer. "" serves none. ``rlbus rl`` sets it from ``weights_fanout``."""
    weights_upstream: list[str] = Field(default_factory=list)
    """Relay addresses (other replicas' ``weights_relay``) tried in order for each full-weights
    step before the trainer. Every tensor is still checked against the trainer's own manifest; a
    refusal, a silence or a corrupt bucket moves on to the next source, the trainer last. Empty:
    the trainer only. ``rlbus rl`` sets it from ``weights_fanout``."""
    weights_relay_timeout_s: float = Field(2.0, gt=0)
    """How long an upstream relay has to answer at all before this replica tries its next source."""
    weights_relay_wait_s: float = Field(30.0, gt=0)
    """How long a relay holds a peer's request for a step it is still fetching (or has not been
    told of yet) before refusing it; a peer waits this long on a relay that answers before it
    fetches the step from the trainer itself."""
    weights_fanout: int = Field(0, ge=0)
    """``rlbus rl`` with several replicas: pull weights through a tree of replicas in which each
    serves up to this many others (replica i pulls from replica (i - 1) // k, replica 0 from the
    trainer), so the trainer uploads each step about once instead of once per replica. 0: every
    replica pulls from the trainer. Ignored by a replica started alone (set ``weights_relay`` and
    ``weights_upstream`` there)."""
    weights_relay_port: int = Field(5580, ge=1, le=65535)
    """With ``weights_fanout``: replica i of ``rlbus rl`` serves its peers at
    ``tcp://127.0.0.1:<weights_relay_port + i>``."""
    vllm_args: list[str] = Field(default_factory=list)
    """Extra ``vllm serve`` command-line arguments, e.g. ``["--max-num-batched-tokens", "4096"]``."""

    @model_validator(mode="after")
    def _check_relay_addresses(self) -> InferenceConfig:
        bad = [address for address in self.weights_upstream if not re.fullmatch(RELAY_CONNECT_PATTERN, address)]
        if bad:
            raise ValueError(f"weights_upstream: {bad[0]!r} is not a relay address to connect to (tcp://host:port "
                             "or ipc://path)")  # fmt: skip
        if self.weights_relay and self.weights_relay in self.weights_upstream:
            raise ValueError(f"weights_upstream lists this replica's own weights_relay {self.weights_relay!r}")
        return self

    @model_validator(mode="after")
    def _adapter_needs_lora(self) -> InferenceConfig:
        if self.await_adapter is not None and not self.enable_lora:
            raise ValueError(f"await_adapter = {self.await_adapter!r} needs enable_lora = true (the replica serves "
                             "the trainer's LoRA adapter)")  # fmt: skip
        return self

    @model_validator(mode="after")
    def _refuse_open_remote_http(self) -> InferenceConfig:
        # The loopback rule of the bus (rlbus.curve.check_bind_allowed), for the HTTP API.
        if self.api_key is None and not self.allow_insecure_remote and not is_loopback_host(self.host):
            raise ValueError(
                f"refusing to serve the inference HTTP API on host = {self.host!r} without a key: a non-loopback "
                "host needs inference.api_key (or RLBUS_INFERENCE__API_KEY), or, on a network where every "
                "host is trusted, inference.allow_insecure_remote = true"
            )
        return self

    def relay_settings(self) -> dict | None:
        """What the vLLM workers need of weight fan-out (``rlbus_load_step``'s ``relay``); None when off."""
        if not self.weights_relay and not self.weights_upstream:
            return None
        return {"bind": self.weights_relay, "upstream": list(self.weights_upstream),
                "answer_timeout_s": self.weights_relay_timeout_s, "wait_s": self.weights_relay_wait_s}  # fmt: skip

    def resolved_replica_id(self) -> str:
        return self.replica_id or service_id("inference", self.port)

    def resolved_advertise_url(self) -> str:
        host = socket.gethostname() if self.host in ("0.0.0.0", "::", "") else self.host
        return self.advertise_url or f"http://{host}:{self.port}/v1"

    def resolved_model_name(self) -> str:
        return self.served_model_name or self.model

    # ------------------------------------------------ collective weight transport (docs/inference.md)
    weight_transport: Literal["bus", "collective"] = "bus"
    """``bus`` (default): fetch every step from the trainer over the bus. ``collective``: also join the
    trainer's weight group (its ``weight_transport = "collective"``) as ``weight_group_rank`` and take
    the steps it broadcasts, each checked against its manifest; any step the broadcast fails for is
    fetched over the bus. Needs ``tensor_parallel_size`` 1. The group forms once every replica
    joined (each as it starts); steps before that come over the bus. ``rlbus rl`` sets these
    fields from the trainer's."""
    weight_group_address: str | None = None
    """``collective``: the trainer's ``weight_group_address`` (``host:port`` of its rendezvous store)."""
    weight_group_rank: int = Field(1, ge=1)
    """``collective``: this replica's rank in the weight group, 1..``weight_group_replicas``, unique per replica."""
    weight_group_replicas: int = Field(1, ge=1)
    """``collective``: the trainer's ``weight_group_replicas`` (how many replicas the group holds)."""
    weight_group_backend: Literal["auto", "gloo", "nccl"] = "auto"
    """``collective``: the trainer's ``weight_group_backend`` (``auto``: nccl where CUDA is available, else gloo)."""
    weight_group_timeout_s: float = Field(60.0, gt=0)
    """``collective``: how long joining the group or one bucket's broadcast may take before the replica
    leaves that group (and fetches the step over the bus); set it like the trainer's."""
    weight_group_verify: bool = True
    """``collective``: check every broadcast tensor's xxh3 checksum against the manifest before loading
    (on GPUs this copies each step to host memory once); off trusts the fabric: sizes are still checked."""

    @model_validator(mode="after")
    def _weight_group_is_set(self) -> InferenceConfig:
        if self.weight_transport != "collective":
            return self
        if self.weight_group_address is None:
            raise ValueError('weight_transport = "collective" needs weight_group_address (the trainer\'s)')
        parse_address(self.weight_group_address)
        if self.weight_group_rank > self.weight_group_replicas:
            raise ValueError(f"weight_group_rank = {self.weight_group_rank} is past weight_group_replicas = "
                             f"{self.weight_group_replicas} (ranks are 1..replicas)")  # fmt: skip
        if self.tensor_parallel_size != 1:
            raise ValueError(f"weight_transport = \"collective\" needs tensor_parallel_size = 1 (got "
                             f"{self.tensor_parallel_size}): one rank per replica in the weight group")  # fmt: skip
        return self

    def weight_group_settings(self) -> dict | None:
        """What the vLLM worker needs to join the weight group (``weight_collective.GroupSettings``); None on the bus."""
        if self.weight_transport != "collective":
            return None
        return {"address": self.weight_group_address, "rank": self.weight_group_rank,
                "size": self.weight_group_replicas + 1, "backend": self.weight_group_backend,
                "timeout_s": self.weight_group_timeout_s, "verify": self.weight_group_verify}  # fmt: skip
