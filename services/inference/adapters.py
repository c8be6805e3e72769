"""LoRA adapters that arrive over the bus: checked, written as PEFT folders, loaded in place.

A ``WeightsAnnounced`` with ``lora`` set carries only an adapter's A and B matrices (PEFT's
saved names). The replica fetches them in its API server process (they are small) with the
same verified transfer as full steps, writes ``adapter_model.safetensors`` and
``adapter_config.json`` into a fresh folder under ``<output_dir>/adapters/<replica>/<name>/``,
and has vLLM load it under the adapter's name with ``load_inplace`` (vLLM's worker loads the new
adapter before it drops the old one, so a refused adapter leaves the previous one serving).
The swap itself runs inside :class:`rlbus.services.inference.sync.WeightSync`'s admission gate,
like a full load. Adapters are kept by name, so several runs' adapters can share one replica.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from rlbus.messages import ADAPTER_NAME_PATTERN, LoraAdapterMeta, TensorMeta
from rlbus.weight_codec import NamedArray

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
_TENSOR_NAME = re.compile(r"^base_model\.model\.[A-Za-z0-9_.]+\.lora_[AB]\.weight$")
"""An adapter tensor as PEFT saves it (and vLLM reads it): no adapter name, no path characters."""


class AdapterRefused(ValueError):
    """An adapter announcement this replica will not load; nothing was changed."""


def check_adapter_meta(meta: LoraAdapterMeta, max_lora_rank: int, served_model_name: str) -> None:
    """Refuse metadata that vLLM would misread or that would escape the adapters' folder."""
    if not re.fullmatch(ADAPTER_NAME_PATTERN, meta.name):
        raise AdapterRefused(f"adapter name {meta.name!r} is not allowed: it must match {ADAPTER_NAME_PATTERN} "
                             "(no path separators, no leading dot)")  # fmt: skip
    if meta.name == served_model_name:
        raise AdapterRefused(f"adapter name {meta.name!r} is the served base model's name; give it another one")
    if not 0 < meta.rank <= max_lora_rank:
        raise AdapterRefused(f"adapter {meta.name!r} has rank {meta.rank}; this replica takes ranks 1 to "
                             f"{max_lora_rank} (inference.max_lora_rank)")  # fmt: skip
    if not meta.alpha > 0 or meta.alpha == float("inf"):
        raise AdapterRefused(f"adapter {meta.name!r} has alpha {meta.alpha}; it must be a positive finite number")
    if not meta.target_modules or any(not re.fullmatch(r"[A-Za-z0-9_.]+", t) for t in meta.target_modules):
        raise AdapterRefused(f"adapter {meta.name!r} has target_modules {meta.target_modules}; they must be "
                             "non-empty module names")  # fmt: skip


def check_adapter_manifest(meta: LoraAdapterMeta, manifest: Sequence[TensorMeta]) -> None:
    """Every tensor is an A (rank x in) or B (out x rank) matrix in PEFT's saved names, in pairs."""
    if not manifest:
        raise AdapterRefused(f"adapter {meta.name!r} was announced without tensors")
    names = {tensor.name for tensor in manifest}
    for tensor in manifest:
        if not _TENSOR_NAME.fullmatch(tensor.name):
            raise AdapterRefused(f"adapter {meta.name!r}: tensor {tensor.name!r} is not a LoRA matrix in PEFT's "
                                 "saved names (base_model.model.<module>.lora_A.weight / lora_B.weight)")  # fmt: skip
        is_a = tensor.name.endswith(".lora_A.weight")
        if len(tensor.shape) != 2 or tensor.shape[0 if is_a else 1] != meta.rank:
            raise AdapterRefused(f"adapter {meta.name!r}: tensor {tensor.name} has shape {tensor.shape}, which "
                                 f"does not fit rank {meta.rank}")  # fmt: skip
        partner = tensor.name.replace(".lora_A.", ".lora_B.") if is_a else tensor.name.replace(".lora_B.", ".lora_A.")
        if partner not in names:
            raise AdapterRefused(f"adapter {meta.name!r}: {tensor.name} came without {partner}")


def peft_config(meta: LoraAdapterMeta, base_model: str) -> dict:
    """``adapter_config.json`` as PEFT writes it, for what vLLM reads of it."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": meta.rank, "lora_alpha": meta.alpha,
        "lora_dropout": 0.0, "target_modules": list(meta.target_modules), "bias": "none",
        "base_model_name_or_path": base_model, "rlbus_base_sha256": meta.base_fingerprint,
    }  # fmt: skip


class AdapterFolders:
    """Where a replica writes the adapters it receives: ``<root>/<name>/<fresh folder per load>``.

    Each load gets a new folder (vLLM warns that reloading in place from the same path may reuse
    stale cache entries); once it serves, the adapter's older folders are deleted."""

    def __init__(self, root: Path, base_model: str) -> None:
        self.root, self.base_model = root, base_model

    def write(self, meta: LoraAdapterMeta, step: int, tensors: Sequence[NamedArray]) -> Path:
        """A PEFT folder holding ``tensors`` (verified arrays, bfloat16 as uint16 bits)."""
        from safetensors.torch import save_file

        from rlbus.services.inference.worker_extension import to_torch

        parent = self.root / meta.name
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix=f"step_{step}-", dir=parent))
        try:
            # Copies: the arrays are receive frames, which safetensors must not alias.
            save_file({name: to_torch(array, dtype).clone() for name, array, dtype in tensors},
                      str(folder / ADAPTER_WEIGHTS))  # fmt: skip
            (folder / ADAPTER_CONFIG).write_text(json.dumps(peft_config(meta, self.base_model), indent=2))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    def discard(self, folder: Path) -> None:
        """Delete a folder whose adapter was refused."""
        shutil.rmtree(folder, ignore_errors=True)

    def keep_only(self, name: str, folder: Path) -> None:
        """Delete the other folders of adapter ``name`` (the one serving is ``folder``)."""
        for other in (self.root / name).iterdir():
            if other != folder and other.is_dir():
                shutil.rmtree(other, ignore_errors=True)
