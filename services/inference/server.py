"""``rlbus inference``: vLLM's own OpenAI server, extended with rlbus routes and weight sync.

The steps mirror ``vllm.entrypoints.launchers.api_server.entry.build_and_serve``
(vLLM 0.32): parse ``vllm serve`` arguments built from our config, bind the
port, start the engine client, ``build_app`` + ``init_app_state``, then
``serve_http``. Between building and serving the app, :func:`rlbus.services.inference.http.install`
adds our routes and middleware, and :class:`rlbus.services.inference.sync.WeightSync`
starts on the same event loop. vLLM is imported only here, after the config parsed.
"""

from __future__ import annotations

import os
import shutil
from argparse import Namespace
from collections.abc import Mapping
from typing import Any

from loguru import logger

from rlbus.services.inference.config import InferenceConfig
from rlbus.services.inference.executor import (
    fork_engine_core,
    place_worker,
    skip_broken_aot_cache,
)
from rlbus.services.inference.idle_spin import export_for_workers
from rlbus.services.inference.isa_probe import IsaProbe, start_isa_probe
from rlbus.services.inference.worker_extension import WORKER_EXTENSION


def vllm_argv(config: InferenceConfig, on_cpu: bool = False) -> list[str]:
    """The ``vllm serve`` command line equivalent to ``config`` (``on_cpu``: vLLM runs on the CPU)."""
    argv = [
        "--model", config.model, "--served-model-name", config.resolved_model_name(),
        "--host", config.host, "--port", str(config.port), "--seed", str(config.seed),
        "--dtype", config.dtype, "--max-model-len", str(config.max_model_len),
        "--max-num-seqs", str(config.max_num_seqs), "--gpu-memory-utilization", str(config.gpu_memory_utilization),
        "--tensor-parallel-size", str(config.tensor_parallel_size), "--worker-extension-cls", WORKER_EXTENSION,
        # Logprobs after temperature and top-p: the distribution tokens were really sampled from,
        # which is what the trainer compares against (it divides its logits by the temperature).
        "--logprobs-mode", "processed_logprobs",
    ]  # fmt: skip
    if config.enforce_eager or (on_cpu and not cpp_compiler_found()):
        argv.append("--enforce-eager")
    if config.kv_cache_gib is not None:
        argv += ["--kv-cache-memory-bytes", str(int(config.kv_cache_gib * 2**30))]
    if config.enable_lora:
        argv += ["--enable-lora", "--max-lora-rank", str(config.max_lora_rank), "--max-loras", str(config.max_loras)]
    if not config.access_log:
        argv.append("--disable-uvicorn-access-log")
    if on_cpu:
        # Training requests carry a sampling seed. vLLM's CPU runner crashes its engine when a
        # seeded request's prefill is split across steps ("CPU Generator does not use offset": it
        # rewinds the generator like a CUDA one); whole prefills also keep the numerics independent
        # of how requests happened to arrive. ``vllm_args`` can turn chunking back on.
        argv.append("--no-enable-chunked-prefill")
    return argv + list(config.vllm_args)


def cpp_compiler_found(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether torch.compile on the CPU can build its kernels (inductor needs ``$CXX`` or a ``c++``,
    ``g++`` or ``clang++`` on PATH). Without one a compiled replica would fail as it starts: it runs
    eagerly instead, and says so once."""
    path = environ.get("PATH")
    if environ.get("CXX") or any(shutil.which(name, path=path) for name in ("c++", "g++", "clang++")):
        return True
    logger.warning("inference.enforce_eager = false, but this machine has no C++ compiler (set CXX or install "
                   "g++) for torch.compile's CPU kernels: the replica runs eagerly")  # fmt: skip
    return False


def vllm_args(config: InferenceConfig) -> Namespace:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args
    from vllm.platforms import current_platform
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = make_arg_parser(FlexibleArgumentParser(prog="rlbus inference"))
    args = parser.parse_args(vllm_argv(config, on_cpu=current_platform.is_cpu()))
    validate_parsed_serve_args(args)
    return args


def run_inference(config: InferenceConfig) -> int:
    """Serve until SIGINT/SIGTERM; exit code 1 if the replica broke."""
    import uvloop
    from vllm.platforms import current_platform  # vLLM's environment fixes, then torch and inductor

    on_cpu = current_platform.is_cpu()
    if place_worker(config.worker_in_engine_process, config.tensor_parallel_size):
        logger.debug("vLLM's model worker runs in its engine-core process (inference.worker_in_engine_process)")
    forked = config.fork_engine_core and on_cpu and fork_engine_core(type(current_platform))
    if forked:
        logger.debug("vLLM's engine-core process is forked from the server (inference.fork_engine_core)")
    # Inductor's ISA probe on a thread while vLLM's other imports run (~5 s): the engine core forked
    # below then inherits the answers instead of waiting ~1.4 s on them in its warm-up.
    probe = start_isa_probe(forked, compiled=not config.enforce_eager)
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    if skip_broken_aot_cache(on_cpu):
        logger.debug("vLLM's AOT compile artifacts are off on CPU: they fail to load (VLLM_USE_AOT_COMPILE=0)")
    export_for_workers(config.worker_idle_spin_s)
    from rlbus.services.inference.weight_collective import export_for_workers as export_weight_group

    export_weight_group(config.weight_group_settings())  # weight_transport = "collective": the worker joins
    cli_env_setup()  # vLLM's CLI default: spawn processes (unless set above or by the user)
    if config.api_key is None and os.environ.get("VLLM_API_KEY"):
        logger.warning("VLLM_API_KEY is ignored; set api_key (or RLBUS_INFERENCE__API_KEY) instead")
    return uvloop.run(serve(config, probe))


async def serve(config: InferenceConfig, probe: IsaProbe | None = None) -> int:
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.launcher import setup_server

    args = vllm_args(config)
    _, sock = setup_server(args, reuse_port=False)
    failures: list[BaseException] = []
    if probe is not None:
        probe.join()  # before the engine core forks: it inherits the answers, never a half-done probe
    try:
        async with build_async_engine_client(args) as engine:
            shutdown = await build_and_serve(engine, args, sock, config, failures)
        await shutdown
    finally:
        sock.close()
    return 1 if failures else 0


async def build_and_serve(engine: Any, args: Namespace, sock: Any, config: InferenceConfig,
                          failures: list[BaseException]) -> Any:  # fmt: skip
    """vLLM's build_and_serve with rlbus installed; returns vLLM's shutdown awaitable."""
    from vllm import envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http

    from rlbus.services.inference.engine import EngineWeightLoader
    from rlbus.services.inference.http import install
    from rlbus.services.inference.sync import WeightSync

    supported_tasks = await engine.get_supported_tasks()
    app = build_app(args, supported_tasks, engine.model_config)
    replica_id = config.resolved_replica_id()
    loader = EngineWeightLoader(engine, config.bus.endpoints.trainer_weights, replica_id, config.bus,
                                adapter_loader(engine, app, config) if config.enable_lora else None,
                                config.relay_settings(), config.weight_transport == "collective")  # fmt: skip

    def on_fatal(exc: BaseException) -> None:
        failures.append(exc)
        server = getattr(getattr(app, "state", None), "server", None)
        if server is not None:
            server.should_exit = True

    def server_started() -> bool:
        # serve_http sets app.state.server; the lifespan deletes app.state on shutdown.
        server = getattr(getattr(app, "state", None), "server", None)
        return bool(getattr(server, "started", False))

    sync = WeightSync(config, loader, server_started=server_started, on_fatal=on_fatal)
    install(app, sync, config.api_key, config.lora_dir)
    await init_app_state(engine, app.state, args, supported_tasks)
    # Relay and weight group receiver before the first step, so that one need not come from the trainer.
    await loader.start_transports()
    # Weights first: a late replica serves the trainer's latest step from its first request on.
    await sync.start()
    logger.info("rlbus inference {} serving {} at http://{}:{}", replica_id, config.model, config.host, config.port)
    try:
        return await serve_http(
            app, sock=sock, enable_ssl_refresh=args.enable_ssl_refresh, host=args.host, port=args.port,
            log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log,
            timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE, ssl_keyfile=args.ssl_keyfile,
            ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs, ssl_cert_reqs=args.ssl_cert_reqs,
            ssl_ciphers=args.ssl_ciphers, h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
            h11_max_header_count=args.h11_max_header_count,
        )  # fmt: skip
    finally:
        await sync.stop()


def adapter_loader(engine: Any, app: Any, config: InferenceConfig) -> Any:
    """Loads the trainer's LoRA adapter steps (services/inference/adapters.py); they are fetched in
    this process, over a DEALER per step like the workers' full steps."""
    from functools import partial
    from pathlib import Path

    from rlbus.services.inference.adapters import AdapterFolders
    from rlbus.services.inference.engine import AdapterLoader
    from rlbus.services.inference.worker_extension import pull_step

    replica_id = config.resolved_replica_id()
    fetch = partial(pull_step, address=config.bus.endpoints.trainer_weights, replica_id=replica_id,
                    bus_config=config.bus)  # fmt: skip
    folders = AdapterFolders(Path(config.output_dir) / "adapters" / replica_id, config.model)
    # app.state gets vLLM's model registry in init_app_state, before the first load.
    return AdapterLoader(engine, lambda: app.state.openai_serving_models, folders, config.max_lora_rank, fetch)
