"""Writing checkpoints off the training thread (``ckpt.save_async``).

The trainer copies the gathered state (model and optimizer tensors) and hands the copy
to one background thread, which writes, forces to disk, renames and prunes as a
synchronous save would. Writes run one at a time, in step order. Whoever needs the
checkpoint on disk (the trainer before acknowledging the step's batch, which lets the
orchestrator forget it; the end of the run) calls ``wait``, which also re-raises an
error of the write: a failed checkpoint stops the trainer before it acknowledges
anything the checkpoint should have kept.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch


class BackgroundWriter:
    """One writer thread; at most one write pending."""

    def __init__(self) -> None:
        self.executor: ThreadPoolExecutor | None = None
        self.pending: Future | None = None

    def submit(self, write: Callable[..., None], *args: Any) -> None:
        self.wait()
        if self.executor is None:  # started on first use: synchronous runs never have the thread
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-writer")
        self.pending = self.executor.submit(write, *args)

    def wait(self) -> None:
        """Block until the pending write is done; re-raise its error."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self.wait()
        if self.executor is not None:
            self.executor.shutdown()
            self.executor = None


def detached_copy(state: Any) -> Any:
    """``state`` (nested dicts / lists of tensors and plain values) with every tensor copied, so
    the copy stays as it is while training changes the originals."""
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    if isinstance(state, dict):
        return {key: detached_copy(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(detached_copy(value) for value in state)
    return state
