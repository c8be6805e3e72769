"""LoRA training: a PEFT adapter on a frozen base, and what leaves the trainer.

Only the adapter's parameters require gradients and reach the optimizer, so the base
tensors are never written: :func:`base_fingerprint` hashes them to prove it. Inference
gets, per ``lora.transfer``, the adapter's tensors alone in the names vLLM reads from a PEFT
``adapter_model.safetensors`` (:func:`adapter_tensors`), or merged weights in Hugging Face
names (``W + alpha/r * B @ A``), computed into fresh tensors per step: the base parameters
are never merged in place. :func:`weight_sizes` compares the two; docs/lora.md says more.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Iterator, Mapping

import torch
from loguru import logger

from rlbus.messages import LoraAdapterMeta
from rlbus.services.trainer.distributed import DistContext
from rlbus.services.trainer.lora_config import LoraConfig
from rlbus.services.trainer.model import copy_to_host, named_arrays, to_numpy
from rlbus.weights import NamedArray, PublishBuffers

ADAPTER = "default"
"""PEFT's name of the one adapter the trainer trains."""
PEFT_PREFIX = "base_model.model."


def is_lora(model: torch.nn.Module) -> bool:
    # Without peft imported no model can be a PeftModel: full-weight runs never import (or need) it.
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def check_targets(model: torch.nn.Module, config: LoraConfig) -> None:
    """Each target must name at least one linear layer of ``model`` as PEFT matches them (the
    whole module name or its last dotted parts); PEFT only refuses a list of which none matches,
    so a misspelt one of several would silently train less."""
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    missing = [t for t in config.target_modules if not any(n == t or n.endswith(f".{t}") for n in linear)]
    if missing:
        leaf_names = sorted({name.rsplit(".", 1)[-1] for name in linear})
        raise ValueError(f"lora.target_modules {missing} match no linear layer of the model; "
                         f"its linear layers are named {leaf_names}")  # fmt: skip


def apply_lora(model: torch.nn.Module, config: LoraConfig) -> torch.nn.Module:
    """``model`` wrapped in a fresh PEFT adapter; only the adapter requires gradients."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    check_targets(model, config)
    peft_config = PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                 target_modules=list(config.target_modules), bias="none")  # fmt: skip
    wrapped = get_peft_model(model, peft_config)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    logger.info("LoRA rank {} alpha {:g} on {}: {:,} of {:,} parameters trained ({:.2%})", config.rank,
                config.alpha, config.target_modules, trainable, total, trainable / total)  # fmt: skip
    return wrapped


def hf_name(peft_name: str) -> str:
    """The Hugging Face name of a base tensor under PEFT's wrapping."""
    return peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def lora_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """PEFT's LoRA layers by their module name (PEFT names)."""
    from peft.tuners.lora import LoraLayer

    return {name: module for name, module in model.named_modules()
            if isinstance(module, LoraLayer) and ADAPTER in module.lora_A}  # fmt: skip


def merged_tensors(model: torch.nn.Module, state: Mapping[str, torch.Tensor] | None = None,
                   ) -> Iterator[tuple[str, torch.Tensor]]:  # fmt: skip
    """Every base tensor in HF names, adapted ones merged into a new tensor.

    ``state`` (PEFT names, e.g. a checkpoint's detached copy) is used instead of the live
    parameters when given; tied parameters appear once, as in ``named_parameters``.
    """
    live = dict(model.named_parameters())
    tensors = state if state is not None else live
    layers = lora_modules(model)
    with torch.no_grad():
        for name in live:
            if ".lora_" in name:
                continue
            module_name, _, leaf = name.rpartition(".base_layer.")
            tensor = tensors[name]
            if leaf == "weight" and module_name in layers:
                tensor = tensor + _delta(layers[module_name], module_name, tensors).to(tensor.dtype)
            yield hf_name(name), tensor


def _delta(layer: torch.nn.Module, module_name: str, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``scaling * B @ A`` of one layer, in float32 (bf16 matmuls on a CPU are slow and lossy)."""
    a = tensors[f"{module_name}.lora_A.{ADAPTER}.weight"].float()
    b = tensors[f"{module_name}.lora_B.{ADAPTER}.weight"].float()
    delta = (b @ a) * layer.scaling[ADAPTER]
    return delta.T if layer.fan_in_fan_out else delta


def adapter_tensor_name(peft_name: str) -> str:
    """The name PEFT saves (and vLLM loads) an adapter tensor under: the parameter's name without
    the adapter's own name, e.g. ``...q_proj.lora_A.default.weight`` -> ``...q_proj.lora_A.weight``."""
    return peft_name.replace(f".{ADAPTER}.", ".")


def adapter_tensors(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The adapter's A and B matrices in saved PEFT names (:func:`adapter_tensor_name`)."""
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            yield adapter_tensor_name(name), param.detach()


def adapter_meta(model: torch.nn.Module, config: LoraConfig, fingerprint: str = "") -> LoraAdapterMeta:
    """What a replica needs besides the tensors to load the adapter (the targets PEFT resolved)."""
    targets = sorted(model.peft_config[ADAPTER].target_modules or config.target_modules)
    return LoraAdapterMeta(name=config.name, rank=config.rank, alpha=config.alpha, target_modules=targets,
                           base_fingerprint=fingerprint)  # fmt: skip


def base_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the base tensors (HF names, dtype, shape, bytes): equal before and after
    training proves the base was never written. Works on a plain model too."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                continue
            tensor = param.detach().to("cpu").contiguous()
            digest.update(f"{hf_name(name)}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def weight_sizes(model: torch.nn.Module) -> dict[str, float]:
    """Bytes per step: the adapter's tensors against the full (merged) weights."""
    adapter = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" in n)
    full = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".lora_" not in n)
    return {"weights/lora_adapter_bytes": float(adapter), "weights/full_bytes": float(full),
            "weights/lora_adapter_fraction": adapter / full}  # fmt: skip


def with_lora(model: torch.nn.Module, config: LoraConfig | None, world_size: int, ac: int) -> torch.nn.Module:
    """``model`` with a fresh adapter when ``config`` is set (before activation checkpointing and
    sharding wrap it); combinations not built yet stop here with an error."""
    if config is None:
        return model
    if world_size > 1:
        raise ValueError(f"lora with {world_size} trainer ranks is not supported yet: train LoRA on one rank")
    if ac:
        raise ValueError("lora with memory.ac is not supported yet: set memory.ac = 0 (the adapter's "
                         "activations are small; the frozen base needs no optimizer memory)")  # fmt: skip
    return apply_lora(model, config)


def servable_arrays(model: torch.nn.Module, ctx: DistContext, buffers: PublishBuffers | None = None,
                    adapter_only: bool = False) -> Iterator[NamedArray]:  # fmt: skip
    """What inference loads each step: :func:`named_arrays`, or for a LoRA model (one rank:
    :func:`with_lora` refuses more) the adapter's tensors with ``adapter_only``, else the merged weights."""
    if not is_lora(model):
        yield from named_arrays(model, ctx, buffers)
        return
    for name, tensor in adapter_tensors(model) if adapter_only else merged_tensors(model):
        array, dtype = copy_to_host(tensor, buffers, name) if buffers is not None else to_numpy(tensor)
        yield name, array, dtype
