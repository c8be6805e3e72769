"""``trainer.compile``: the model's decoder layers run torch.compile'd, compiled before the first batch.

On a CPU the small models this project trains spend a quarter of each forward/backward in
elementwise kernels (RMSNorm, rotary embeddings, SiLU and their backwards; torch profiler, the
quickstart's model on one thread); inductor fuses them. Each decoder layer is compiled in place
(``Module.compile``: parameter names stay the Hugging Face ones that leave the trainer; the layers
share one graph) with ``dynamic=True``, so one graph serves every padded batch shape, plus one for
rows of a single sample (torch specializes a dimension of size 1). Compiling the whole model fused
a little more (one thread: 0.93 -> ~0.72 s a step against ~0.82 s by layers) but took ~12-18 s
to start from inductor's cache against ~5 s, on the cores a starting replica needs.

The compile would otherwise land in the first step. A single-rank trainer compiles on a thread of
its own at low CPU priority (``nice`` 10: the replica starting on the same cores comes first) while
it waits for its first batch, by running both row shapes forward and backward on made-up tokens;
``TrainStep`` waits for that warm-up before its first step. The warm-up changes no weight and no
optimizer state, and leaves no gradient behind. One rank only, for now: several are refused at start
(the warm-up thread would run FSDP's collectives beside the main thread's, and compiling through
FSDP2's hooks is untested here).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import torch
from loguru import logger

from rlbus.services.trainer.logprobs import RowTensors, row_logprobs

WARMUP_NICE = 10
"""CPU priority of the warm-up thread (and the compiler processes it starts): below the replica's."""
WARMUP_LENGTHS = ((24,), (24, 17))
"""Made-up rows of the warm-up: one sample, and two of unequal length (a padded batch)."""


def compile_model(model: torch.nn.Module) -> None:
    """Compile ``model``'s decoder layers in place for every batch shape (see the module docstring)."""
    for module in model.modules():
        if module.__class__.__name__.endswith("DecoderLayer"):
            module.compile(dynamic=True)


def warmup_row(lengths: tuple[int, ...], vocab_size: int, device: torch.device) -> RowTensors:
    """A row of made-up samples of ``lengths`` tokens, every token a loss token."""
    size = sum(lengths)
    return RowTensors(
        input_ids=torch.arange(size, device=device) % vocab_size,
        position_ids=torch.cat([torch.arange(n, device=device) for n in lengths]),
        loss_mask=torch.ones(size, dtype=torch.bool, device=device),
        advantages=torch.zeros(size, device=device),
        inference_logprobs=torch.zeros(size, device=device),
        temperatures=torch.ones(size, device=device),
    )


def run_warmup(model: torch.nn.Module, padded: bool, device: torch.device) -> None:
    """Forward and backward of each warm-up row: what compiles the graphs a step needs."""
    vocab_size = int(model.config.vocab_size)
    for lengths in WARMUP_LENGTHS:
        logprobs, _ = row_logprobs(model, warmup_row(lengths, vocab_size, device), padded)
        (logprobs.sum() * 0).backward()
    model.zero_grad(set_to_none=True)


class CompileWarmup:
    """The warm-up on a low-priority thread (``start``); ``wait`` before the model trains."""

    def __init__(self, model: torch.nn.Module, padded: bool, device: torch.device) -> None:
        self.model = model
        self.padded = padded
        self.device = device
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> CompileWarmup:
        self._thread = threading.Thread(target=self._run, name="rlbus-compile-warmup", daemon=True)
        self._thread.start()
        return self

    def wait(self) -> None:
        """Block until the warm-up is done; raise what it raised (a model that does not compile)."""
        if self._thread is None:
            return
        waiting_since = time.perf_counter()
        self._thread.join()
        self._thread = None
        if self._error is not None:
            raise RuntimeError(f"trainer.compile: compiling the model failed ({type(self._error).__name__}: "
                               f"{self._error}); set trainer.compile = false to train it eagerly") from self._error  # fmt: skip
        logger.debug("waited {:.2f}s for the compile warm-up", time.perf_counter() - waiting_since)

    def _run(self) -> None:
        started = time.perf_counter()
        if sys.platform == "linux":  # per thread on Linux; elsewhere it would lower the whole process
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WARMUP_NICE)
        try:
            run_warmup(self.model, self.padded, self.device)
        except Exception as exc:  # noqa: BLE001 - handed to wait(), on the thread that trains
            self._error = exc
            return
        logger.info("compiled the model in {:.1f}s (trainer.compile)", time.perf_counter() - started)
