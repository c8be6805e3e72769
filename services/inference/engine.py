"""Weight loads through a running vLLM engine: the bridge from the server to the worker extension.

The engine client runs the worker extension's methods in every worker with
``collective_rpc`` and passes only small values (announcement, address, bus
settings); the workers pull the tensors themselves. After any change of
weights the prefix cache is reset: cached KV blocks were computed with the
old weights and must not be reused for the new step.
"""

from __future__ import annotations

from typing import Any

import msgspec
from loguru import logger

from rlbus.config.base import BusConfig
from rlbus.messages import WeightsAnnounced
from rlbus.services.inference.policy import BASE_STEP, LoadReport


class EngineWeightLoader:
    """Loads steps and base weights into the engine's workers; aborts requests on demand."""

    def __init__(self, engine: Any, weights_address: str, replica_id: str, bus_config: BusConfig) -> None:
        self.engine = engine
        self.weights_address = weights_address
        self.replica_id = replica_id
        self.bus_config = bus_config

    async def load_step(self, announced: WeightsAnnounced) -> LoadReport:
        args = (msgspec.to_builtins(announced), self.weights_address, self.replica_id,
                self.bus_config.model_dump(mode="json"))  # fmt: skip
        report = await self._call("rlbus_load_step", args, announced.step)
        if report.ok or report.kind == "load":
            await self.engine.reset_prefix_cache()
        return report

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
                      error=first.error, kind=kind)  # fmt: skip
