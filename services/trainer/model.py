"""The policy at the trainer's edges: loading it, exporting its tensors, HF snapshots.

Parameters leave the trainer in Hugging Face names (``model.layers.0.mlp.up_proj.weight``),
which is what vLLM's ``load_weights`` and ``from_pretrained`` expect. Under FSDP2 a
parameter is gathered with ``full_tensor()`` one at a time, every rank taking part
in the same order, so no rank ever holds more than one extra full tensor at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from loguru import logger
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from rlbus.model_path import check_model_path
from rlbus.services.trainer.distributed import DistContext
from rlbus.weights import NamedArray, PublishBuffers

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(path: str, dtype: str, device: torch.device, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A causal LM from an HF directory (or hub name), in ``dtype`` on ``device``, in train mode."""
    from transformers import AutoModelForCausalLM

    check_model_path(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=TORCH_DTYPES[dtype], attn_implementation=attn_implementation
    )
    model.to(device)
    model.train()
    model.config.use_cache = False
    return model


def enable_activation_checkpointing(model: torch.nn.Module, every: int, offload: bool = False) -> None:
    """Recompute every ``every``-th decoder layer in the backward instead of keeping its activations
    (``memory.ac``; 0 is off). transformers' own switch, not torch's ``checkpoint_wrapper``: the
    wrapper would rename every parameter (``_checkpoint_wrapped_module``), and they leave the
    trainer in HF names. Non-reentrant checkpointing: what FSDP2 supports."""
    if every == 0:
        return
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"memory.ac: {type(model).__name__} does not support activation checkpointing")
    if offload and next(model.parameters()).device.type == "cpu":
        raise ValueError("memory.ac_offload moves checkpointed activations off the GPU; on a CPU they are in "
                         "host memory already: unset it")  # fmt: skip
    model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every, offload=offload
    )


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    check_model_path(path)  # a misspelt folder must not be asked of a model hub
    return AutoTokenizer.from_pretrained(path)


def to_numpy(tensor: torch.Tensor) -> tuple[np.ndarray, str]:
    """A copy of ``tensor`` as numpy and its logical dtype (bfloat16 travels as uint16 bits)."""
    tensor = tensor.detach().to("cpu", copy=True)
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    return tensor.numpy(), str(tensor.dtype).removeprefix("torch.")


def copy_to_host(tensor: torch.Tensor, buffers: PublishBuffers, name: str) -> tuple[np.ndarray, str]:
    """``tensor`` copied into this step's host buffer for ``name``, and its logical dtype (bfloat16
    as uint16 bits); dtypes without a numpy twin take :func:`to_numpy`'s fresh copy."""
    if tensor.dtype == torch.bfloat16:
        array = buffers.array(name, tuple(tensor.shape), np.uint16)
        torch.from_numpy(array.view(np.int16)).view(torch.bfloat16).copy_(tensor.detach())
        return array, "bfloat16"
    if tensor.dtype not in (torch.float32, torch.float16, torch.float64):
        return to_numpy(tensor)
    array = buffers.array(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))
    torch.from_numpy(array).copy_(tensor.detach())
    return array, array.dtype.name


def full_tensor(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter: gathered from every rank if it is sharded (a collective)."""
    gather = getattr(param, "full_tensor", None)
    return gather() if gather is not None else param


def named_arrays(
    model: torch.nn.Module, ctx: DistContext, buffers: PublishBuffers | None = None
) -> Iterator[NamedArray]:
    """Every parameter as numpy in HF names, gathered one by one; yields only on rank 0.

    All ranks must exhaust the iterator together (each gather is a collective).
    Tied parameters (``lm_head`` = embeddings) appear once, as vLLM expects.
    Each is copied once: into ``buffers`` when given, else into fresh memory.
    """
    for name, param in model.named_parameters():
        tensor = full_tensor(param)
        if ctx.is_main:
            array, dtype = copy_to_host(tensor, buffers, name) if buffers is not None else to_numpy(tensor)
            yield name, array, dtype
        del tensor


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the model on CPU, full size on rank 0 (a collective under FSDP2)."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_hf_snapshot(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], tokenizer, folder: Path) -> None:
    """Write an HF model directory (safetensors, config, tokenizer) that vLLM and transformers load."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of an HF snapshot (one safetensors file or an indexed set of shards)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(folder / name))
    return tensors


def load_state(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], ctx: DistContext) -> None:
    """Load ``state_dict`` (read on rank 0 only) into every rank's (sharded) model."""
    if ctx.is_main:
        _fill_tied(model, state_dict)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=ctx.is_distributed)
    set_model_state_dict(model, state_dict if ctx.is_main else {}, options=options)


def _fill_tied(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Snapshots store a tied parameter once; give its other names the same tensor."""
    names_by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_by_param.setdefault(id(param), []).append(name)
    for names in names_by_param.values():
        present = [n for n in names if n in state_dict]
        if not present:
            raise ValueError(f"checkpoint has no tensor for {names[0]}")
        for name in names:
            state_dict.setdefault(name, state_dict[present[0]])
    logger.debug("loaded state of {} tensors", len(state_dict))
