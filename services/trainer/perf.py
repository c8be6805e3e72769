"""Throughput bookkeeping: FLOPs of a training step, the device's peak, memory.

MFU = achieved FLOP/s / peak FLOP/s. The FLOPs of a step are estimated the usual
way (Kaplan et al.; PaLM appendix B): 6 FLOPs per matmul parameter per token for
forward + backward, plus causal attention, 6 * layers * (heads * head_dim) * n^2
per sample of n tokens (half of the full n x n score and value products, times 3
for the backward). The peak is ``peak_flops`` from the config or a float matmul
timed once at start on this device and dtype.
"""

from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FlopsModel:
    matmul_params: int
    """Parameters taking part in a matmul per token (embedding lookups excluded, lm_head included)."""
    num_layers: int
    attention_width: int
    """num_attention_heads * head_dim."""

    @classmethod
    def of(cls, model: torch.nn.Module) -> FlopsModel:
        config = model.config
        embeddings = model.get_input_embeddings().weight
        total = sum(p.numel() for p in model.parameters())
        # An untied lm_head is a parameter of its own; tied, the embedding table serves as lm_head.
        tied = model.get_output_embeddings() is None or model.get_output_embeddings().weight is embeddings
        matmul = total if tied else total - embeddings.numel()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # Under FSDP2 parameters are DTensors whose numel() is the global size, as needed here.
        return cls(matmul_params=matmul, num_layers=config.num_hidden_layers,
                   attention_width=config.num_attention_heads * head_dim)  # fmt: skip

    def training_flops(self, sample_lengths: list[int]) -> float:
        """FLOPs of forward + backward over packed samples of these lengths."""
        tokens = sum(sample_lengths)
        attention = 6 * self.num_layers * self.attention_width * sum(n * n for n in sample_lengths)
        return 6.0 * self.matmul_params * tokens + attention


def measure_peak_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 8) -> float:
    """Best FLOP/s of a square matmul on ``device``: the practical peak MFU is measured against."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up kernels and caches
        _synchronize(device)
        started = time.perf_counter()
        torch.mm(a, b)
        _synchronize(device)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory of this process: allocated on the GPU, or resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # bytes on macOS, KiB on Linux


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
