"""One run's checkpoint under a shared trainer (multi_run.py), and the names of its adapter.

``folder/`` holds the run's adapter as a PEFT folder (``adapter_model.safetensors`` in the names
PEFT and vLLM load, without the run id infix, and ``adapter_config.json``), ``lora_base.json``
(the base's path and fingerprint, as in single-run LoRA checkpoints) and ``run_state.pt`` (run
id, last step, AdamW state, random state). It is written as ``<folder>.partial`` and renamed into
place, so a kill leaves a complete copy or none. Loading checks the run id, the base, rank, alpha
and targets, and that the tensors are exactly the run's adapter, before it changes anything.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlbus.services.trainer.checkpoint import PARTIAL, _publish, load_tensor_state, save_tensor_state
from rlbus.services.trainer.lora_ckpt import ADAPTER_WEIGHTS, BASE_FILE

if TYPE_CHECKING:
    from rlbus.services.trainer.multi_run import Run, RunTable

RUN_STATE = "run_state.pt"


def adapter_params(model: torch.nn.Module, run_id: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``run_id``'s adapter by PEFT name (``...q_proj.lora_A.<run_id>.weight``)."""
    pattern = re.compile(rf"\.lora_\w+\.{re.escape(run_id)}(\.|$)")
    params = {name: p for name, p in model.named_parameters() if pattern.search(name)}
    if not params:
        raise ValueError(f"the model holds no adapter parameters of run {run_id!r}")
    return params


def file_name(peft_name: str, run_id: str) -> str:
    """PEFT's in-model name without the adapter infix: the name in adapter files."""
    return re.sub(rf"(\.lora_\w+)\.{re.escape(run_id)}(\.|$)", r"\1\2", peft_name)


def save_run(table: RunTable, run: Run, folder: Path, base_sha256: str) -> None:
    from safetensors.torch import save_file

    run_id = run.spec.run_id
    partial = folder.with_name(folder.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(table.adapter_tensors(run_id), partial / ADAPTER_WEIGHTS)
    config = copy.deepcopy(table.model.peft_config[run_id])
    config.inference_mode = True  # as PeftModel.save_pretrained writes it: loaders serve, not train
    config.save_pretrained(str(partial))
    base = {"base_model": table.base_name, "base_sha256": base_sha256}
    (partial / BASE_FILE).write_text(json.dumps(base, indent=2))
    state = {"run_id": run_id, "step": run.step, "optimizer": run.optimizer.state_dict(), "rng": run.rng}
    save_tensor_state(state, partial / RUN_STATE)
    _publish(partial)


def load_run(table: RunTable, run: Run, folder: Path) -> None:
    """Set ``run``'s adapter, optimizer, step and random state from ``folder``; all or nothing."""
    from safetensors.torch import load_file

    run_id = run.spec.run_id
    for name in (ADAPTER_WEIGHTS, BASE_FILE, RUN_STATE):
        if not (folder / name).is_file():
            raise ValueError(f"{folder} is no checkpoint of a run: it lacks {name}")
    state = load_tensor_state(folder / RUN_STATE)
    if state["run_id"] != run_id:
        raise ValueError(f"{folder} is a checkpoint of run {state['run_id']!r}, not of run {run_id!r}")
    table.check_base(json.loads((folder / BASE_FILE).read_text())["base_sha256"], f"the adapter in {folder}")
    _check_config(folder, run)
    weights = load_file(folder / ADAPTER_WEIGHTS)
    targets = {file_name(name, run_id): param for name, param in run.params.items()}
    _check_tensors(folder, weights, targets)
    with torch.no_grad():
        for name, param in targets.items():
            param.copy_(weights[name])
    run.optimizer.load_state_dict(state["optimizer"])
    for group in run.optimizer.param_groups:  # the spec that joined decides, not the one that saved
        group.update(betas=run.spec.optimizer.betas, weight_decay=run.spec.optimizer.weight_decay)
    run.step = int(state["step"])
    run.rng = state["rng"]


def _check_config(folder: Path, run: Run) -> None:
    saved: dict[str, Any] = json.loads((folder / "adapter_config.json").read_text())
    lora = run.spec.lora
    have = (saved.get("r"), float(saved.get("lora_alpha", 0)), sorted(saved.get("target_modules") or []))
    want = (lora.rank, lora.alpha, sorted(lora.target_modules))
    if have != want:
        raise ValueError(f"the adapter in {folder} has rank {have[0]}, alpha {have[1]:g} on {have[2]}; run "
                         f"{run.spec.run_id!r} asks for rank {want[0]}, alpha {want[1]:g} on {want[2]}")  # fmt: skip


def _check_tensors(folder: Path, weights: dict[str, torch.Tensor], targets: dict[str, torch.nn.Parameter]) -> None:
    missing, unexpected = sorted(set(targets) - set(weights)), sorted(set(weights) - set(targets))
    if missing or unexpected:
        raise ValueError(f"the adapter in {folder} does not fit: {len(missing)} tensor(s) missing "
                         f"{missing[:2]}, {len(unexpected)} unexpected {unexpected[:2]}")  # fmt: skip
    for name, param in targets.items():
        if weights[name].shape != param.shape:
            raise ValueError(f"the adapter in {folder} has {name} of shape {tuple(weights[name].shape)}, "
                             f"the run's is {tuple(param.shape)}")  # fmt: skip
