"""LoRA in checkpoints: the adapter (not the base) saved and resumed, and servable weights.

``checkpoints/step_N/model/`` holds the PEFT adapter (``adapter_model.safetensors``,
``adapter_config.json``) and ``lora_base.json``, the fingerprint of the base it was trained
on; resuming onto another base (or another rank / target list) stops with an error naming
the difference. ``weights/step_N/`` is a merged HF model that vLLM and transformers load as
is; with ``ckpt.save_adapter_separately`` the raw adapter sits in ``weights/step_N/adapter``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlbus.services.trainer.lora import base_fingerprint, merged_tensors
from rlbus.services.trainer.lora_config import LoraConfig

BASE_FILE = "lora_base.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_adapter(model: torch.nn.Module, state: dict[str, torch.Tensor], folder: Path) -> None:
    """The adapter of ``state`` as a PEFT folder, with the fingerprint of the base under it."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    base = {"base_model": str(model.peft_config["default"].base_model_name_or_path),
            "base_sha256": base_fingerprint(model)}  # fmt: skip
    (folder / BASE_FILE).write_text(json.dumps(base, indent=2))


def save_servable(model: torch.nn.Module, state: dict[str, torch.Tensor], tokenizer: Any, folder: Path,
                  with_adapter: bool) -> None:  # fmt: skip
    """A merged HF model folder (the base is not touched: the merge goes into new tensors)."""
    folder.mkdir(parents=True, exist_ok=True)
    merged = dict(merged_tensors(model, state))
    model.get_base_model().save_pretrained(folder, state_dict=merged, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    if with_adapter:
        save_adapter(model, state, folder / "adapter")


def load_adapter(model: torch.nn.Module, folder: Path, config: LoraConfig | None = None) -> None:
    """Load the adapter saved in ``folder`` into ``model``, after checking it fits."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    check_adapter(model, folder, config)
    weights = load_file(folder / ADAPTER_WEIGHTS)
    result = set_peft_model_state_dict(model, weights)
    missing = [name for name in result.missing_keys if ".lora_" in name]
    if missing:
        raise ValueError(f"adapter in {folder} lacks {len(missing)} tensor(s) of this model's adapter, "
                         f"e.g. {missing[0]}")  # fmt: skip


def check_adapter(model: torch.nn.Module, folder: Path, config: LoraConfig | None) -> None:
    """Clear errors for a folder that is no adapter, one trained on another base, or one whose
    rank or targets differ from ``config``."""
    if not (folder / ADAPTER_WEIGHTS).is_file():
        raise ValueError(f"{folder} holds no LoRA adapter ({ADAPTER_WEIGHTS}): a checkpoint of full weights "
                         "cannot resume a LoRA run; start fresh or train without [trainer.lora]")  # fmt: skip
    base_file = folder / BASE_FILE
    if base_file.is_file():
        saved = json.loads(base_file.read_text())
        if saved["base_sha256"] != base_fingerprint(model):
            raise ValueError(f"the adapter in {folder} was trained on another base model ({saved['base_model']}, "
                             f"weights sha256 {saved['base_sha256'][:12]}…) than the one loaded "
                             f"({model.peft_config['default'].base_model_name_or_path}, sha256 "
                             f"{base_fingerprint(model)[:12]}…)")  # fmt: skip
    if config is None:
        return
    saved_config = json.loads((folder / "adapter_config.json").read_text())
    saved_targets = sorted(saved_config.get("target_modules") or [])
    if saved_config.get("r") != config.rank or saved_targets != sorted(config.target_modules):
        raise ValueError(f"the adapter in {folder} has rank {saved_config.get('r')} on {saved_targets}; "
                         f"the config asks for rank {config.rank} on {sorted(config.target_modules)}")  # fmt: skip
