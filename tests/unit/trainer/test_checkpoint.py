"""Trainer checkpoints: on disk before the step is acknowledged, and never missing while replaced."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
import torch

from rlbus.services.trainer import checkpoint as ckpt_module
from rlbus.services.trainer.checkpoint import CheckpointManager, complete_steps
from rlbus.services.trainer.config import CheckpointConfig
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.model import load_model

SOLO = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(str(tiny_model_dir), "float32", torch.device("cpu"))


def manager(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(tmp_path, CheckpointConfig(enabled=True, interval=1), SOLO)


def save(ckpt: CheckpointManager, model, marker: str) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ckpt.save(3, model, optimizer, None, {"marker": marker})


def readable_marker(ckpt: CheckpointManager) -> str | None:
    """What a resuming trainer would read as step 3: its marker, or None when it finds no complete copy."""
    if 3 not in complete_steps(ckpt.checkpoints):
        return None
    folder = ckpt_module.step_folder(ckpt.checkpoints, 3) if hasattr(ckpt_module, "step_folder") else (
        ckpt.checkpoints / "step_3")  # fmt: skip
    weights = ckpt_module.step_folder(ckpt.weights, 3) if hasattr(ckpt_module, "step_folder") else (
        ckpt.weights / "step_3")  # fmt: skip
    try:
        progress = (folder / "progress.json").read_text()
        assert (folder / "model" / "model.safetensors").exists() and (weights / "model.safetensors").exists()
    except (FileNotFoundError, AssertionError):
        return None
    return "old" if '"old"' in progress else "new"


def watch_every_change(monkeypatch, ckpt: CheckpointManager) -> list[str | None]:
    """After every rename and removal, what a reader of step 3 finds."""
    seen: list[str | None] = []

    def after(real):
        def wrapped(*args, **kwargs):
            result = real(*args, **kwargs)
            seen.append(readable_marker(ckpt))
            return result

        return wrapped

    monkeypatch.setattr(os, "rename", after(os.rename))
    monkeypatch.setattr(os, "replace", after(os.replace))
    monkeypatch.setattr(shutil, "rmtree", after(shutil.rmtree))
    if hasattr(ckpt_module, "exchange"):
        monkeypatch.setattr(ckpt_module, "exchange", after(ckpt_module.exchange))
    return seen


def test_replacing_a_checkpoint_never_leaves_a_moment_without_a_complete_copy(tmp_path, model, monkeypatch):
    ckpt = manager(tmp_path)
    save(ckpt, model, "old")
    seen = watch_every_change(monkeypatch, ckpt)
    save(ckpt, model, "new")  # a trainer resumed from an older checkpoint reaches step 3 again
    assert seen and None not in seen, seen
    assert readable_marker(ckpt) == "new" and seen[-1] == "new"
    assert sorted(p.name for p in ckpt.checkpoints.iterdir()) == ["step_3"]


def test_without_an_atomic_exchange_the_old_copy_is_read_until_the_new_one_is_in_place(tmp_path, model,
                                                                                        monkeypatch):  # fmt: skip
    def unsupported(a, b):  # a filesystem without renameat2(RENAME_EXCHANGE), e.g. NFS
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(ckpt_module, "exchange", unsupported)
    ckpt = manager(tmp_path)
    save(ckpt, model, "old")
    seen = watch_every_change(monkeypatch, ckpt)
    save(ckpt, model, "new")
    assert seen and None not in seen, seen
    assert readable_marker(ckpt) == "new"
    # A crash between the two renames leaves the old copy aside: the next start puts it back.
    (ckpt.checkpoints / "step_3").rename(ckpt.checkpoints / "step_3.replaced")
    ckpt.remove_partials()
    assert readable_marker(ckpt) == "new" and complete_steps(ckpt.checkpoints) == [3]


def test_a_checkpoint_is_on_disk_when_save_returns(tmp_path, model, monkeypatch):
    ckpt = manager(tmp_path)
    events: list[tuple[str, int]] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def rename(source, target, *args, **kwargs):
        result = real_rename(source, target, *args, **kwargs)
        events.append(("rename into", os.stat(Path(target).parent).st_ino))
        return result

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    save(ckpt, model, "old")  # the trainer sends BatchAck once this returns
    synced = {ino for kind, ino in events if kind == "fsync"}
    for top in (ckpt.checkpoints / "step_3", ckpt.weights / "step_3"):
        for path in [top, *top.rglob("*")]:
            assert path.stat().st_ino in synced, f"{path} was not fsynced before save returned"
    for parent in (ckpt.checkpoints, ckpt.weights):
        renamed = ("rename into", parent.stat().st_ino)
        assert renamed in events
        last = max(i for i, event in enumerate(events) if event == renamed)
        assert ("fsync", parent.stat().st_ino) in events[last + 1 :], f"{parent} not fsynced after the rename"
