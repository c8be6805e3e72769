"""Environments on a server of their own: an unreachable server is not cached as a broken environment."""

from __future__ import annotations

import asyncio

import pytest

from rlbus.environments import Environment, EnvironmentCache, EnvironmentUnavailable, Rubric
from rlbus.errors import UserError


def test_an_unavailable_server_is_tried_again_while_a_broken_environment_is_not() -> None:
    calls = {"served": 0, "broken": 0}

    def loader(env_id: str, args: dict) -> Environment:
        calls[env_id] += 1
        if env_id == "broken":
            raise ValueError("bad args")
        if calls[env_id] == 1:
            raise EnvironmentUnavailable("env server at tcp://127.0.0.1:9 did not answer")
        return Environment([{"prompt": "hi"}], Rubric([]))

    async def main() -> None:
        cache = EnvironmentCache(loader)
        with pytest.raises(EnvironmentUnavailable, match="tcp://127.0.0.1:9"):
            await cache.get("served", {})
        assert (await cache.get("served", {})).num_examples == 1  # the server is back
        for _ in range(2):
            with pytest.raises(ValueError, match="bad args"):
                await cache.get("broken", {})

    asyncio.run(main())
    assert calls == {"served": 2, "broken": 1}
    # Commands print it as their last line (a user can start the server or fix the address).
    assert issubclass(EnvironmentUnavailable, UserError)
