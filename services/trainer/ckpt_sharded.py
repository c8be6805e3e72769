"""Sharded checkpoints (``ckpt.format = "sharded"``): every rank writes its own shards with torch DCP.

Nothing of the model or optimizer is gathered for them: each rank writes the parameter and AdamW
shards it holds into ``step_N/shards/`` (one ``.distcp`` file per rank, plus DCP's ``.metadata``
from rank 0), so a checkpoint costs each rank time in proportion to its share and rank 0 no more
memory than the others. DCP records every tensor's global shape and each shard's offsets, so the
checkpoint loads onto any number of ranks (FSDP2 shards or one plain model alike): the
resharding happens at load. The folder must be one that every rank writes to (a shared filesystem);
rank 0 checks that every rank's file is there before the checkpoint is published. One process without
a process group reads the model's tensors back whole (``rlbus export-weights``, :mod:`export`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

SHARDS = "shards"
"""Sub-folder of ``step_N`` with the DCP files."""
MODEL = "model"
"""Key of the model's tensors in the saved state (the optimizer's: ``optimizer``)."""


def is_sharded(folder: Path) -> bool:
    """Whether the checkpoint in ``folder`` was written sharded (else it is ``full``)."""
    return (folder / SHARDS).is_dir()


def sharded_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, to_cpu: bool = False) -> dict:
    """This rank's shards of model and optimizer in parameter names (``to_cpu``: copied to host
    memory, for a write off the training thread)."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(cpu_offload=to_cpu))
    return {MODEL: model_state, "optimizer": optimizer_state}


def write_shards(state: dict, folder: Path, group: dist.ProcessGroup | None = None) -> None:
    """Write this rank's ``state`` into ``folder`` (a collective over ``group``, default: all ranks).
    Returns on every rank once every rank's file and rank 0's metadata are written and synced."""
    with _alone_is_intended():
        dcp.save(state, checkpoint_id=folder, process_group=group, no_dist=not dist.is_initialized())


def missing_shard_files(folder: Path) -> list[str]:
    """The files ``folder``'s DCP metadata names that are not there (sorted; empty when complete)."""
    metadata = dcp.FileSystemReader(folder).read_metadata()
    files = {item.relative_path for item in (metadata.storage_data or {}).values()}
    return sorted(name for name in files if not (folder / name).exists())


def check_shards_complete(folder: Path) -> None:
    """Rank 0: every file the metadata names is here, which it is not when ranks on other hosts wrote
    their shards to their own disks."""
    missing = missing_shard_files(folder)
    if missing:
        raise RuntimeError(
            f"ckpt.format = sharded: {folder} lacks {missing}, written by other ranks to their own disks; "
            "give output_dir a filesystem every rank shares, or use ckpt.format = full"
        )


def load_shards(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load the shards in ``folder`` into this rank's (sharded or plain) model and optimizer, however
    many ranks wrote them (a collective)."""
    state = sharded_state(model, optimizer)  # its shapes tell DCP which pieces this rank needs
    with _alone_is_intended():
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    set_state_dict(model, optimizer, model_state_dict=state[MODEL], optim_state_dict=state["optimizer"])


def read_model_shards(folder: Path) -> dict[str, torch.Tensor]:
    """The model's tensors in ``folder``, whole and in parameter names, read by this one process
    without a process group, however many ranks wrote them (the optimizer's shards stay unread)."""
    reader = dcp.FileSystemReader(folder)
    entries = reader.read_metadata().state_dict_metadata
    prefix = f"{MODEL}."
    # Empty tensors of the recorded global shapes: DCP fills each from the shards that cover it.
    model_state = {
        key.removeprefix(prefix): torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in entries.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    if model_state:
        with _alone_is_intended():
            dcp.load({MODEL: model_state}, storage_reader=reader, no_dist=True)
    return model_state


@contextmanager
def _alone_is_intended() -> Iterator[None]:
    """One rank without a process group is a normal trainer here, not a mistake DCP should warn of."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
