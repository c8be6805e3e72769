"""Weight loads through a running vLLM engine: the bridge from the server to the worker extension.

The engine client runs the worker extension's methods in every worker with
``collective_rpc`` and passes only small values (announcement, address, bus
settings); the workers pull the tensors themselves. A step that carries a LoRA
adapter (``WeightsAnnounced.lora``) is instead fetched here and loaded by name
(:class:`AdapterLoader`). After any change of weights the prefix cache is reset:
cached KV blocks were computed with the old weights and must not be reused for
the new step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import msgspec
from loguru import logger

from rlbus.bus import BusError
from rlbus.config.base import BusConfig
from rlbus.messages import LoraAdapterMeta, WeightsAnnounced
from rlbus.services.inference.adapters import AdapterFolders, check_adapter_manifest, check_adapter_meta
from rlbus.services.inference.policy import BASE_STEP, LoadReport


class EngineWeightLoader:
    """Loads steps and base weights into the engine's workers; aborts requests on demand."""

    def __init__(self, engine: Any, weights_address: str, replica_id: str, bus_config: BusConfig,
                 adapters: AdapterLoader | None = None, relay: dict | None = None,
                 weight_group: bool = False) -> None:  # fmt: skip
        self.engine = engine
        self.relay = relay
        """Fan-out settings for the workers (``InferenceConfig.relay_settings``); None: trainer only."""
        self.weight_group = weight_group
        """Whether the workers join the trainer's weight group (their settings come in an environment variable)."""
        self.weights_address = weights_address
        self.replica_id = replica_id
        self.bus_config = bus_config
        self.adapters = adapters
        """Loads adapter steps; None where LoRA is off (such steps are then refused)."""

    async def load_step(self, announced: WeightsAnnounced) -> LoadReport:
        if announced.lora is not None:
            if self.adapters is None:
                return LoadReport(ok=False, step=announced.step, kind="transfer",
                                  error=f"step {announced.step} is LoRA adapter {announced.lora.name!r} but LoRA "
                                        "is off on this replica (inference.enable_lora)")  # fmt: skip
            return await self.adapters.load(announced)
        args = (msgspec.to_builtins(announced), self.weights_address, self.replica_id,
                self.bus_config.model_dump(mode="json"))  # fmt: skip
        if self.relay:
            args = (*args, self.relay)
        report = await self._call("rlbus_load_step", args, announced.step)
        if report.ok or report.kind == "load":
            await self.engine.reset_prefix_cache()
        return report

    async def start_transports(self) -> None:
        """Start the workers' weight relay and collective receiver now, before any step arrives (each
        would otherwise start at the first load, and a peer's or the group's first step would go to
        the trainer); nothing to do on the bus alone."""
        if not self.relay and not self.weight_group:
            return
        args = (self.bus_config.model_dump(mode="json"), self.relay)
        try:
            results = await self.engine.collective_rpc("rlbus_start_transports", args=args)
        except Exception:  # noqa: BLE001 - they start at the first load then; steps still arrive over the bus
            logger.exception("starting the weight relay and receiver failed; they start at the first load")
            return
        for started in results:
            logger.info("weight transports started: relay {!r}, weight group at {!r}", started["relay"],
                        started["weight_group"])  # fmt: skip

    async def reload_base(self) -> LoadReport:
        report = await self._call("rlbus_reload_base", (), BASE_STEP)
        await self.engine.reset_prefix_cache()
        return report

    async def abort_in_flight(self) -> None:
        """End every running request now (they return what they sampled so far)."""
        logger.warning("in-flight requests did not finish in time for the weight swap; aborting them")
        await self.engine.pause_generation(mode="abort", clear_cache=False)
        await self.engine.resume_generation()

    def engine_dead(self) -> bool:
        return bool(self.engine.errored)

    async def _call(self, method: str, args: tuple, step: int) -> LoadReport:
        try:
            results = await self.engine.collective_rpc(method, args=args)
        except Exception as exc:  # noqa: BLE001 - the worker's state is unknown: treated as a failed load
            logger.exception("{} failed in the worker", method)
            return LoadReport(ok=False, step=step, error=f"{method} failed: {exc}", kind="load")
        return merge_reports([LoadReport(**result) for result in results])


def merge_reports(reports: list[LoadReport]) -> LoadReport:
    """One report for all tensor-parallel workers: ok only if every worker loaded the step.

    If some workers loaded and others refused, the ranks now disagree, which is
    as bad as a half-done load (kind ``load``).
    """
    failed = [r for r in reports if not r.ok]
    first = failed[0] if failed else reports[0]
    kind = ""
    if failed:
        kind = "transfer" if all(r.kind == "transfer" for r in reports) else "load"
    return LoadReport(ok=not failed, step=first.step, num_bytes=first.num_bytes,
                      fetch_s=max(r.fetch_s for r in reports), load_s=max(r.load_s for r in reports),
                      error=first.error, kind=kind, relay_bytes=sum(r.relay_bytes for r in reports),
                      trainer_bytes=sum(r.trainer_bytes for r in reports),
                      broadcast_bytes=sum(r.broadcast_bytes for r in reports))  # fmt: skip


class AdapterLoader:
    """Fetches an adapter step, writes it as a PEFT folder and loads it in place under its name.

    Registered with vLLM's OpenAI model registry (``models``: its ``OpenAIServingModels``) as
    ``/v1/load_lora_adapter`` does, except that the request kept for completions has
    ``load_inplace`` off: requests carry it to the worker every engine step, which would re-read
    the folder each time. Every failure is a refusal (kind ``transfer``): vLLM loads the new
    adapter before it replaces the old one, so the previous adapter keeps serving."""

    def __init__(self, engine: Any, models: Callable[[], Any], folders: AdapterFolders, max_lora_rank: int,
                 fetch: Callable[[WeightsAnnounced], list]) -> None:  # fmt: skip
        self.engine, self.models, self.folders = engine, models, folders
        self.max_lora_rank = max_lora_rank
        self.fetch = fetch
        """Blocking: the verified tensors of a step (``worker_extension.pull_step``); run on a thread.
        It asks for the step of ``announced.lora.name`` (``WeightsFetch.adapter``): runs sharing a
        trainer number their steps alike, so the number alone could fetch another run's adapter."""

    async def load(self, announced: WeightsAnnounced) -> LoadReport:
        meta = announced.lora
        assert meta is not None
        started = time.perf_counter()
        report = LoadReport(ok=False, step=announced.step, num_bytes=announced.total_bytes, kind="transfer")
        models = self.models()
        try:
            check_adapter_meta(meta, self.max_lora_rank, models.model_name())
            check_adapter_manifest(meta, announced.manifest)
            tensors = await asyncio.to_thread(self.fetch, announced)
            folder = await asyncio.to_thread(self.folders.write, meta, announced.step, tensors)
        except (BusError, ValueError, OSError) as exc:
            report.error, report.fetch_s = f"adapter {meta.name!r}: {exc}", time.perf_counter() - started
            return report
        fetched = time.perf_counter()
        report.fetch_s = fetched - started
        error = await self._register(models, meta, str(folder))
        report.load_s = time.perf_counter() - fetched
        if error:
            self.folders.discard(folder)
            report.error = f"adapter {meta.name!r}: vLLM refused it: {error}"
            return report
        self.folders.keep_only(meta.name, folder)
        await self.engine.reset_prefix_cache()
        logger.info("LoRA adapter {!r} of step {} loaded in place ({:,} bytes)", meta.name, announced.step,
                    announced.total_bytes)  # fmt: skip
        report.ok, report.kind = True, ""
        return report

    async def _register(self, models: Any, meta: LoraAdapterMeta, path: str) -> str:
        """Load ``path`` as ``meta.name`` into the engine and the model registry; the error, or ""."""
        from vllm.lora.request import LoRARequest

        async with models.lora_resolver_lock[meta.name]:
            previous = models.lora_requests.get(meta.name)
            lora_id = previous.lora_int_id if previous is not None else models.lora_id_counter.inc(1)
            try:
                await self.engine.add_lora(LoRARequest(lora_name=meta.name, lora_int_id=lora_id, lora_path=path,
                                                       load_inplace=True))  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - whatever vLLM raised, the old adapter still serves
                return f"{type(exc).__name__}: {exc}"
            models.lora_requests[meta.name] = LoRARequest(lora_name=meta.name, lora_int_id=lora_id, lora_path=path)
        return ""
