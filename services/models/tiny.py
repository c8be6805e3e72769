"""Build a tiny, randomly initialised Qwen3 model with the byte-level tokenizer.

The model exists so that every service can run end to end on a CPU, offline,
in seconds: it is the default policy of tests and examples. It is a real
``Qwen3ForCausalLM`` directory (safetensors, config, tokenizer, generation
config) that transformers and vLLM load like any hub model.

Builds are reproducible: each weight is drawn from its own generator seeded by
``(seed, parameter name)``, so identical arguments give byte-identical files,
whatever order transformers happens to create or initialise modules in.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger
from pydantic import Field, model_validator

from rlbus.config import ConfigModel
from rlbus.services.models.tokenizer import ENDOFTEXT, IM_END, build_tokenizer

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

# Multiple the embedding rows are padded to; vLLM and GPU kernels like aligned shapes.
VOCAB_MULTIPLE = 64
INIT_STD = 0.02


class TinyModelConfig(ConfigModel):
    """``rlbus model tiny``: a small random Qwen3 model for tests and examples."""

    out: Path
    """Directory the model is written to (created if missing; files in it are overwritten)."""
    hidden_size: int = Field(256, ge=8)
    """Width of the residual stream."""
    num_layers: int = Field(4, ge=1)
    """Number of transformer blocks."""
    num_heads: int = Field(4, ge=1)
    """Attention (query) heads per layer."""
    num_kv_heads: int = Field(2, ge=1)
    """Key/value heads per layer (grouped-query attention); must divide ``num_heads``."""
    head_dim: int = Field(64, ge=64)
    """Width of one attention head; vLLM's CPU attention refuses less than 64."""
    intermediate_size: int = Field(768, ge=1)
    """Width of the SwiGLU feed-forward layer."""
    seed: int = Field(0, ge=0)
    """Seed of the weight initialisation; the same seed gives byte-identical files."""
    max_position_embeddings: int = Field(2048, ge=16)
    """Longest sequence (prompt + completion, in tokens = bytes) the model accepts."""

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        return self


def build_tiny_model(out_dir: Path | str, config: TinyModelConfig | None = None) -> Path:
    """Write a random tiny Qwen3 model to ``out_dir``; returns the directory.

    ``config`` gives the shape and seed (its ``out`` is ignored in favour of
    ``out_dir``); None uses the defaults.
    """
    import torch
    from transformers import Qwen3ForCausalLM

    out_dir = Path(out_dir)
    config = config or TinyModelConfig(out=out_dir)
    started = time.perf_counter()
    tokenizer = build_tokenizer(model_max_length=config.max_position_embeddings)
    # Seed the global generator too, for anything transformers draws at
    # construction that our explicit initialisation below does not cover.
    torch.manual_seed(config.seed)
    model = Qwen3ForCausalLM(qwen3_config(config, tokenizer)).to(torch.float32)
    init_weights(model, config.seed)
    model.generation_config = generation_config(tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info(
        "built tiny Qwen3 model in {} ({:,} parameters, {:.1f} MB) in {:.2f}s",
        out_dir,
        num_params,
        directory_bytes(out_dir) / 1e6,
        time.perf_counter() - started,
    )
    return out_dir


def qwen3_config(config: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> Qwen3Config:
    """The transformers config: float32, tied embeddings, vocab padded to a multiple of 64."""
    from transformers import Qwen3Config

    vocab = -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=INIT_STD,
        tie_word_embeddings=True,
        torch_dtype="float32",
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
    )


def generation_config(tokenizer: PreTrainedTokenizerFast):
    """Stop on ``<|im_end|>`` (end of turn) or ``<|endoftext|>``, as Qwen does."""
    from transformers import GenerationConfig

    endoftext, im_end = tokenizer.convert_tokens_to_ids([ENDOFTEXT, IM_END])
    return GenerationConfig(bos_token_id=endoftext, eos_token_id=[im_end, endoftext], pad_token_id=endoftext)


def init_weights(model: Qwen3ForCausalLM, seed: int) -> None:
    """Norm scales at 1, every other weight N(0, 0.02), each from its own seeded generator."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, INIT_STD, generator=param_generator(seed, name))


def param_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from (seed, name) with a stable hash (Python's ``hash`` is salted per process)."""
    import torch

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") % 2**63)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
