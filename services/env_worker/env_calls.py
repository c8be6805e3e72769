"""Environment code called from a rollout: off the event loop, within the rollout's time budget,
and what it answers checked.

Whatever goes wrong there becomes a :class:`RolloutFailure`, whose text is the rollout's ``error``:
the rollout is not trained on and the env-worker goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from rlbus.environments import Message

# Roles an environment's reply may hold; the assistant's turns are the policy's alone.
REPLY_ROLES = frozenset({"user", "tool", "system"})


class RolloutFailure(Exception):
    """Why a rollout cannot be trained on; the text becomes ``Rollout.error``."""


class EnvCaller:
    """Calls environment hooks within one rollout's time budget.

    Plain functions run in a daemon thread of their own so a slow or stuck one
    cannot block the event loop; when the budget runs out a stuck thread is
    abandoned (a daemon thread does not keep the process alive at exit, where
    a thread pool's worker would).
    """

    def __init__(self, budget_s: float) -> None:
        self.budget_s, self.used_s = budget_s, 0.0

    async def __call__(self, what: str, func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            if inspect.iscoroutinefunction(func):
                pending = func(*args, **kwargs)
            else:
                pending = in_daemon_thread(partial(func, *args, **kwargs), what)
            result = await asyncio.wait_for(pending, self.remaining_s)
            if inspect.isawaitable(result):  # a plain function that returned a coroutine
                result = await asyncio.wait_for(result, self.remaining_s - (time.monotonic() - started))
            return result
        except TimeoutError:
            raise RolloutFailure(f"environment timed out in {what} (env_timeout_s={self.budget_s:g})") from None
        except (RolloutFailure, asyncio.CancelledError):
            raise
        except Exception as exc:
            raise RolloutFailure(f"{what} raised {type(exc).__name__}: {exc}") from exc
        finally:
            self.used_s += time.monotonic() - started

    @property
    def remaining_s(self) -> float:
        return max(0.0, self.budget_s - self.used_s)


def in_daemon_thread(func: Callable[[], Any], name: str) -> asyncio.Future[Any]:
    """A future of ``func()`` run in a new daemon thread."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the caller gave up (timeout or cancellation)
            return
        if error is None:
            future.set_result(result)
        else:
            future.set_exception(error)

    def target() -> None:
        result, error = None, None
        try:
            result = func()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the event loop closed while this thread was stuck
            pass

    threading.Thread(target=target, name=f"env: {name}", daemon=True).start()
    return future


def check_reply(reply: Any) -> list[Message] | None:
    """``env_response``'s answer, or RolloutFailure saying what is wrong with it."""
    if reply is None or reply == []:
        return None
    if not isinstance(reply, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in reply):
        raise RolloutFailure(f"env_response must return a list of chat messages or None, got {reply!r:.120}")
    # An assistant turn the policy did not sample would be shown (and scored) as the model's own.
    roles = {m["role"] for m in reply} - REPLY_ROLES
    if roles:
        raise RolloutFailure(f"env_response may answer with user, tool or system messages, got role {min(roles)!r}")
    return reply
