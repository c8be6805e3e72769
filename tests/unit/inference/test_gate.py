"""The admission gate: every request runs on one step; swaps wait for requests in flight."""

from __future__ import annotations

import asyncio

import pytest

from rlbus.services.inference.gate import AdmissionGate


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


async def opened(step: int = 0) -> AdmissionGate:
    gate = AdmissionGate()
    await gate.open(step)
    return gate


def test_requests_wait_until_the_first_step_is_known():
    async def scenario():
        gate = AdmissionGate()
        await gate.open()  # no step yet: stays closed
        entered = asyncio.Event()

        async def request():
            async with gate.admitted() as step:
                entered.set()
                return step

        task = asyncio.create_task(request())
        await asyncio.sleep(0)  # let it reach the gate
        assert not entered.is_set() and gate.num_waiting == 1
        await gate.open(3)
        return await task

    assert run(scenario()) == 3


def test_a_swap_waits_for_requests_in_flight_and_later_requests_get_the_new_step():
    async def scenario():
        gate = await opened(1)
        release, events = asyncio.Event(), []

        async def old_request():
            async with gate.admitted() as step:
                events.append(("old admitted", step))
                await release.wait()
                events.append(("old done", step))

        async def swap():
            async with gate.swapping(60, on_drain_timeout=pytest.fail):
                events.append(("swap", gate.num_running))
                gate.step = 2

        async def new_request():
            async with gate.admitted() as step:
                events.append(("new admitted", step))

        old = asyncio.create_task(old_request())
        await asyncio.sleep(0)
        swapper = asyncio.create_task(swap())
        await asyncio.sleep(0)
        new = asyncio.create_task(new_request())
        await asyncio.sleep(0)
        assert events == [("old admitted", 1)] and gate.num_waiting == 1, "new request held, swap not started"
        release.set()
        await asyncio.gather(old, swapper, new)
        return events

    assert run(scenario()) == [("old admitted", 1), ("old done", 1), ("swap", 0), ("new admitted", 2)]


def test_slow_requests_are_aborted_once_then_the_swap_goes_on():
    async def scenario():
        gate = await opened(1)
        release, aborted = asyncio.Event(), []

        async def stuck_request():
            async with gate.admitted():
                await release.wait()

        async def abort():
            aborted.append(gate.num_running)
            release.set()  # what the engine's abort does to a running request

        task = asyncio.create_task(stuck_request())
        await asyncio.sleep(0)
        async with gate.swapping(0.05, abort):
            running_during_swap = gate.num_running
        await task
        return aborted, running_during_swap, gate.is_open

    assert run(scenario()) == ([1], 0, True)


def test_a_failed_swap_reopens_on_the_old_step():
    async def scenario():
        gate = await opened(4)
        with pytest.raises(RuntimeError):
            async with gate.swapping(1, pytest.fail):
                raise RuntimeError("load failed")
        async with gate.admitted() as step:
            return step, gate.is_open

    assert run(scenario()) == (4, True)
