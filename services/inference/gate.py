"""Admission of HTTP requests around weight swaps, so each completion has one exact policy step.

Swap rule ("finish on the old weights, then swap"): when a swap begins, new
requests wait at the gate; requests already admitted finish on the weights they
started with; once none is left in flight the weights are replaced, and the
waiting requests are admitted on the new step. A request's step is therefore
fixed when it is admitted and never changes while it samples.

The cost is a pause as long as the longest in-flight completion. If draining
takes longer than the drain timeout, the caller aborts the stragglers (they
return early, still on and tagged with the old step) and the swap goes on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager


class AdmissionGate:
    """Counts requests in flight per policy step and holds new ones during a swap."""

    def __init__(self) -> None:
        self.step: int | None = None
        """Step new requests are admitted on; None until the first weights are loaded."""
        self.num_running = 0
        self.num_waiting = 0
        self._swapping = True  # closed until the first weights are known
        self._changed = asyncio.Condition()

    @property
    def is_open(self) -> bool:
        return not self._swapping

    @asynccontextmanager
    async def admitted(self) -> AsyncIterator[int]:
        """Hold one request slot; yields the policy step the request runs on."""
        async with self._changed:
            self.num_waiting += 1
            try:
                await self._changed.wait_for(lambda: not self._swapping)
            finally:
                self.num_waiting -= 1
            self.num_running += 1
            step = self.step
        assert step is not None, "the gate opens only once a step is loaded"
        try:
            yield step
        finally:
            async with self._changed:
                self.num_running -= 1
                self._changed.notify_all()

    async def close(self) -> None:
        """Stop admitting (requests arriving from now on wait for :meth:`open`)."""
        async with self._changed:
            self._swapping = True

    async def drained(self, timeout_s: float | None) -> bool:
        """Wait until no request is in flight; False if some still are after ``timeout_s`` (None: no limit)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.num_running == 0), timeout_s)
            except TimeoutError:
                return False
        return True

    async def open(self, step: int | None = None) -> None:
        """Admit requests again, on ``step`` (None: the step set before). Stays closed while no
        step is known."""
        async with self._changed:
            self.step = step if step is not None else self.step
            self._swapping = self.step is None
            self._changed.notify_all()

    @asynccontextmanager
    async def swapping(
        self, drain_timeout_s: float, on_drain_timeout: Callable[[], Awaitable[None]]
    ) -> AsyncIterator[None]:
        """Close, drain, and run the body with nothing in flight; re-open on ``self.step`` after,
        so the body sets ``gate.step`` when it changed the weights. If draining takes longer
        than ``drain_timeout_s``, ``await on_drain_timeout()`` runs once and draining goes on."""
        await self.close()
        try:
            if not await self.drained(drain_timeout_s):
                await on_drain_timeout()
                await self.drained(None)
            yield
        finally:
            await self.open()
