"""Launch helpers shared by the kernels: accumulate dtype, interpreter detection, host-side index checks."""
from __future__ import annotations

import os

import torch
import triton.language as tl


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def acc_dtype(*dtypes: torch.dtype):
    """tl.float64 when any input is float64 (gradcheck), else tl.float32 (fp32/bf16/fp16 inputs)."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def check_index(name: str, idx: torch.Tensor, upper: int) -> None:
    """Raise before launch if ``idx`` has values outside [0, upper): an out-of-range read under the
    interpreter crashes the process and on a GPU reads garbage. Syncs, so on GPUs only in debug mode."""
    if idx.numel() == 0:
        return
    if idx.is_cuda and os.environ.get("MOE_ROUTING_DEBUG") != "1":
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} has values in [{lo}, {hi}], outside [0, {upper})")


class _FirstConfig:
    """Launcher that applies the first autotune config: ``@triton.autotune`` fails under the interpreter
    ("0 active drivers"), and there is nothing to tune on a CPU anyway."""

    def __init__(self, kernel, config) -> None:
        self.kernel, self.config = kernel, config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = dict(self.config.kwargs)
            g = grid(meta) if callable(grid) else grid
            return self.kernel[g](*args, **kwargs, **meta, num_warps=self.config.num_warps)
        return launch


def autotune(configs: list, key: list[str]):
    """``triton.autotune(configs, key)`` on a GPU; the first config under ``TRITON_INTERPRET=1``."""
    import triton

    def wrap(kernel):
        if interpreting():
            return _FirstConfig(kernel, configs[0])
        return triton.autotune(configs=configs, key=key)(kernel)
    return wrap
