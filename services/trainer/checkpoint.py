"""Checkpoints of the trainer (RL and SFT alike), written atomically.

Layout under ``output_dir``::

    checkpoints/step_N/model/        HF snapshot (safetensors, config, tokenizer)
    checkpoints/step_N/optimizer.pt  full AdamW state, keyed by parameter name
    checkpoints/step_N/progress.json step, learning rate, data position, world size
    weights/step_N/                  the same HF snapshot (hard links), for vLLM to serve

Rank 0 writes everything into ``step_N.partial`` folders, forces them to disk and
renames them when complete (then forces the rename to disk too): ``save`` returns,
and the step is acknowledged, only once the checkpoint would survive a machine
crash. Only folders named ``step_N`` are read, so a crash mid-write leaves nothing
that could be picked up. An existing ``step_N`` (a trainer resumed from an older
checkpoint reached step N again) is swapped with the new one in one atomic step
where the filesystem can (``renameat2``); elsewhere it is renamed to
``step_N.replaced`` first, which readers take while no ``step_N`` exists and the
next start puts back if a crash came in between: a complete copy is always found. States are gathered in full
(``full_state_dict``) and loaded on rank 0 then broadcast, so a checkpoint does
not depend on the number of ranks and no filesystem has to be shared.

``ckpt.format = "sharded"`` replaces ``model/`` and ``optimizer.pt`` by ``shards/``, which every
rank writes its part of (:mod:`ckpt_sharded`); only the HF weights are gathered. Loading looks at
what the folder holds, so a run resumes from either format whatever ``ckpt.format`` now says.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from loguru import logger
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from rlbus import faults
from rlbus.durable import EXCHANGE_UNSUPPORTED, exchange, fsync_dir, fsync_tree
from rlbus.services.trainer.ckpt_sharded import (
    SHARDS,
    check_shards_complete,
    is_sharded,
    load_shards,
    sharded_state,
    write_shards,
)
from rlbus.services.trainer.ckpt_writer import BackgroundWriter, detached_copy
from rlbus.services.trainer.config import CheckpointConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.lora import is_lora
from rlbus.services.trainer.lora_ckpt import load_adapter, save_adapter, save_servable
from rlbus.services.trainer.lora_config import LoraConfig
from rlbus.services.trainer.model import full_state_dict, load_state, read_hf_weights, save_hf_snapshot

STEP_DIR = re.compile(r"^step_(\d+)(\.replaced)?$")
PARTIAL = ".partial"
REPLACED = ".replaced"


def complete_steps(folder: Path) -> list[int]:
    """Steps with a complete (renamed) ``step_N`` folder under ``folder`` (or, in the moment
    it is being replaced, ``step_N.replaced``), ascending."""
    if not folder.is_dir():
        return []
    return sorted({int(m.group(1)) for p in folder.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))})


def step_folder(folder: Path, step: int) -> Path:
    """The complete copy of ``step``: ``step_N``, or ``step_N.replaced`` while it is being replaced."""
    final = folder / f"step_{step}"
    aside = folder / f"step_{step}{REPLACED}"
    return aside if not final.is_dir() and aside.is_dir() else final


class CheckpointManager:
    """Saves, finds, loads and prunes checkpoints under ``output_dir``."""

    def __init__(self, output_dir: Path, config: CheckpointConfig, ctx: DistContext) -> None:
        self.config = config
        self.ctx = ctx
        self.checkpoints = Path(output_dir) / "checkpoints"
        self.weights = Path(output_dir) / "weights"
        self.writer = BackgroundWriter()
        self.unsynced = False
        """A ``save_async`` save was started on this rank and not yet waited for."""
        self.shard_group = None
        """Sharded writes off the training thread talk over their own gloo group, so their
        collectives never interleave with the training step's."""
        if ctx.is_distributed and config.format == "sharded" and config.save_async:
            self.shard_group = dist.new_group(backend="gloo")
        self.lora: LoraConfig | None = None
        """The run's LoRA settings, which a resumed adapter must match (lora_ckpt.py)."""

    def due(self, step: int) -> bool:
        return self.config.enabled and step % self.config.interval == 0

    def resume_step(self) -> int | None:
        """The step to resume from, per ``ckpt.resume_step``; None starts fresh.

        Decided on rank 0 (only its disk need hold checkpoints) and shared with every rank.
        """
        outcome: tuple[int | None, str | None] = (None, None)
        try:
            if self.ctx.is_main:
                outcome = (self._find_resume_step(), None)
        except ValueError as exc:
            outcome = (None, str(exc))
        step, error = self.ctx.broadcast_object(outcome)
        if error is not None:
            raise ValueError(error)
        return step

    def _find_resume_step(self) -> int | None:
        wanted = self.config.resume_step
        if wanted is None:
            return None
        steps = complete_steps(self.checkpoints)
        if wanted == -1:
            if not steps and self.config.weights_only and complete_steps(self.weights):
                raise ValueError(
                    f"ckpt.weights_only = true: {self.weights} holds weights of steps {complete_steps(self.weights)} "
                    f"but {self.checkpoints} no checkpoint with the optimizer state, so this trainer cannot resume "
                    "where the run is; restart the run from scratch (--clean-output-dir), or without weights_only")
            if not steps:
                logger.warning("ckpt.resume_step = -1 but {} holds no checkpoint: starting fresh", self.checkpoints)
                return None
            return steps[-1]
        if wanted not in steps:
            raise ValueError(f"ckpt.resume_step = {wanted}, but {self.checkpoints} only holds steps {steps}")
        return wanted

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokenizer: Any,
             progress: dict[str, Any], weights_only: bool | None = None) -> None:  # fmt: skip
        """Save ``step`` (every rank calls this: the state is gathered), then prune old ones.

        With ``save_async`` the state is copied here and written by a background thread:
        call :meth:`wait` before anything that needs the checkpoint on disk (acknowledging the
        step's batch, the end of the run). Without it, the checkpoint is on disk on return.
        """
        weights_only = self.config.weights_only if weights_only is None else weights_only
        self.wait()  # one write at a time, in step order
        model_state = full_state_dict(model)
        shards, optimizer_state = None, None
        if not weights_only and self.config.format == "sharded" and not is_lora(model):
            shards = sharded_state(model, optimizer, to_cpu=self.config.save_async)
            if self.ctx.is_main:
                _fresh_partial(self.checkpoints, step)
            self.ctx.barrier()  # the folder is fresh before any rank writes into it
        elif not weights_only:
            optimizer_state = _full_optimizer_state(model, optimizer)
        if not self.config.save_async:
            self._write(step, model, model_state, optimizer_state, shards, tokenizer, progress, weights_only)
            self.ctx.barrier()
            return
        # Copies: training goes on and changes the live tensors while the thread writes (sharded
        # state moved to host memory off a GPU is a copy already).
        if shards is not None and self.ctx.device.type == "cpu":
            shards = detached_copy(shards)
        if self.ctx.is_main:
            model_state, optimizer_state = detached_copy(model_state), detached_copy(optimizer_state)
        if self.ctx.is_main or shards is not None:
            self.writer.submit(self._write, step, model, model_state, optimizer_state, shards, tokenizer, progress,
                               weights_only)  # fmt: skip
        self.unsynced = True

    def wait(self) -> float:
        """Block until the background write (``save_async``) is on disk on every rank; re-raises
        its error. Returns the seconds waited."""
        started = time.perf_counter()
        self.writer.wait()  # idle on ranks other than 0 unless they write shards
        if self.unsynced:
            self.ctx.barrier()
            self.unsynced = False
        return time.perf_counter() - started

    def _write(self, step: int, model: torch.nn.Module, model_state: dict, optimizer_state: dict | None,
               shards: dict | None, tokenizer: Any, progress: dict[str, Any], weights_only: bool) -> None:  # fmt: skip
        """Every rank: its shards (sharded format); rank 0: the rest, then the renames."""
        started = time.perf_counter()
        if shards is not None:
            write_shards(shards, self.checkpoints / f"step_{step}{PARTIAL}" / SHARDS, self.shard_group)
        if not self.ctx.is_main:
            return
        if weights_only:
            self._write_weights(step, model, model_state, tokenizer)
        else:
            self._write_checkpoint(step, model, model_state, optimizer_state, tokenizer, progress)
        self.prune()
        logger.info("saved {} of step {} in {:.2f}s{}", "weights" if weights_only else "checkpoint", step,
                    time.perf_counter() - started, " (in the background)" if self.config.save_async else "")  # fmt: skip

    def _write_weights(self, step: int, model: torch.nn.Module, state: dict, tokenizer: Any) -> None:
        partial = _fresh_partial(self.weights, step)
        if is_lora(model):
            save_servable(model, state, tokenizer, partial, self.config.save_adapter_separately)
        else:
            save_hf_snapshot(model, state, tokenizer, partial)
        _publish(partial)

    def _write_checkpoint(self, step: int, model: torch.nn.Module, state: dict, optimizer_state: dict | None,
                          tokenizer: Any, progress: dict[str, Any]) -> None:  # fmt: skip
        if optimizer_state is None:  # sharded: every rank wrote its shards into the partial folder
            partial = self.checkpoints / f"step_{step}{PARTIAL}"
            check_shards_complete(partial / SHARDS)
        else:
            partial = _fresh_partial(self.checkpoints, step)
            if is_lora(model):  # the adapter alone; the servable copy below is merged
                save_adapter(model, state, partial / "model")
            else:
                save_hf_snapshot(model, state, tokenizer, partial / "model")
            save_tensor_state(optimizer_state, partial / "optimizer.pt")
        progress = {**progress, "step": step, "world_size": self.ctx.world_size, "saved_at": time.time(),
                    "format": "full" if optimizer_state is not None else "sharded"}  # fmt: skip
        (partial / "progress.json").write_text(json.dumps(progress, indent=2))
        # The servable copy shares the files (hard links; a copy where links are not possible).
        weights_partial = _fresh_partial(self.weights, step)
        if is_lora(model):
            save_servable(model, state, tokenizer, weights_partial, self.config.save_adapter_separately)
        elif optimizer_state is None:  # sharded: the gathered weights, written once here
            save_hf_snapshot(model, state, tokenizer, weights_partial)
        else:
            shutil.copytree(partial / "model", weights_partial, copy_function=_link_or_copy, dirs_exist_ok=True)
        _publish(weights_partial)
        faults.point("trainer.checkpoint_before_rename")
        _publish(partial)

    def load(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Load model and optimizer of ``step`` into every rank; returns its progress."""
        folder = step_folder(self.checkpoints, step)
        # Rank 0 decides (only its disk need hold a full checkpoint); sharded ones every rank reads.
        if self.ctx.broadcast_object(is_sharded(folder) if self.ctx.is_main else None):
            load_shards(folder / SHARDS, model, optimizer)
        else:
            self._load_full(folder, model, optimizer)
        progress = json.loads((folder / "progress.json").read_text()) if self.ctx.is_main else None
        progress = self.ctx.broadcast_object(progress)
        logger.info("resumed from checkpoint {} (step {})", folder, step)
        return progress

    def _load_full(self, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        if is_lora(model):
            load_adapter(model, folder / "model", self.lora)
        else:
            model_state = read_hf_weights(folder / "model") if self.ctx.is_main else {}
            load_state(model, model_state, self.ctx)
        optimizer_state = load_tensor_state(folder / "optimizer.pt") if self.ctx.is_main else {}
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=self.ctx.is_distributed)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)

    def prune(self) -> None:
        """Delete checkpoints and weights not kept by ``keep_last`` / ``keep_interval``."""
        if self.config.keep_last is None:
            return
        for folder in (self.checkpoints, self.weights):
            steps = complete_steps(folder)
            keep = set(steps[-self.config.keep_last :])
            if self.config.keep_interval:
                keep |= {s for s in steps if s % self.config.keep_interval == 0}
            for step in steps:
                if step not in keep:
                    shutil.rmtree(step_folder(folder, step), ignore_errors=True)

    def remove_partials(self) -> None:
        """Clear half-written folders a crashed run left behind and finish an interrupted
        replacement (rank 0, at start)."""
        for folder in (self.checkpoints, self.weights):
            for partial in folder.glob(f"step_*{PARTIAL}") if folder.is_dir() else []:
                logger.warning("removing half-written {}", partial)
                shutil.rmtree(partial, ignore_errors=True)
            for aside in folder.glob(f"step_*{REPLACED}") if folder.is_dir() else []:
                final = aside.with_name(aside.name.removesuffix(REPLACED))
                if final.is_dir():
                    logger.warning("removing {}: replaced by {}", aside, final)
                    shutil.rmtree(aside, ignore_errors=True)
                else:
                    logger.warning("a crash interrupted the replacement of {}: putting the old copy back", final)
                    os.rename(aside, final)
                fsync_dir(folder)


def _full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _fresh_partial(folder: Path, step: int) -> Path:
    partial = folder / f"step_{step}{PARTIAL}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def _publish(partial: Path) -> None:
    """Put ``step_N.partial`` on disk, then in place as ``step_N``; an older ``step_N`` is
    replaced without a moment where no complete copy can be found (see the module docstring)."""
    final = partial.with_name(partial.name.removesuffix(PARTIAL))
    fsync_tree(partial)
    if not final.exists():
        os.rename(partial, final)
        fsync_dir(final.parent)
        return
    try:
        exchange(partial, final)
        old = partial  # the swap left the old copy under the partial name
    except OSError as exc:
        if exc.errno not in EXCHANGE_UNSUPPORTED:
            raise
        old = final.with_name(final.name + REPLACED)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)  # readers take it (step_folder) until the new copy is in place
        os.rename(partial, final)
    fsync_dir(final.parent)
    shutil.rmtree(old)
    fsync_dir(final.parent)


def _link_or_copy(source: str, target: str) -> str:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)
    return target


def save_tensor_state(state: dict, path: Path) -> None:
    """Optimizer and random state: torch's format, the one pickle stream rlbus writes
    (tests/unit/test_no_pickle.py), read back only by :func:`load_tensor_state`."""
    torch.save(state, path)


def load_tensor_state(path: Path) -> dict:
    # weights_only: torch's restricted unpickler, which builds only tensors and containers.
    return torch.load(path, map_location="cpu", weights_only=True)
