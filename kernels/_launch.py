"""Launch helpers shared by the kernels: accumulate dtype, interpreter detection, host-side checks."""
from __future__ import annotations

import torch
import triton.language as tl

from .. import settings

# Triton decides at import (when the kernels are decorated) whether they run in its CPU interpreter, so the
# switch is read once, here, with them.
INTERPRETING = settings.triton_interpret()


def interpreting() -> bool:
    return INTERPRETING


def check_device(name: str, t: torch.Tensor) -> None:
    """Raise unless the kernels can read ``t``: a CUDA tensor, or any tensor under the CPU interpreter."""
    if not t.is_cuda and not INTERPRETING:
        raise ValueError(f"{name} must be a CUDA tensor for the triton backend, got device {t.device} (on CPU, "
                         "use backend='torch', or TRITON_INTERPRET=1 set before moe_routing is imported)")


def acc_dtype(*dtypes: torch.dtype):
    """tl.float64 when any input is float64 (gradcheck), else tl.float32 (fp32/bf16/fp16 inputs)."""
    return tl.float64 if torch.float64 in dtypes else tl.float32


def _check_values(t: torch.Tensor) -> bool:
    """Value checks sync with the device: always on CPU (interpreter), on GPUs only with MOE_ROUTING_DEBUG=1."""
    return not t.is_cuda or settings.debug_checks()


def check_index(name: str, idx: torch.Tensor, upper: int, length: int | None = None) -> None:
    """Raise before launch if ``idx`` is not a 1-D int32/int64 tensor (of ``length`` entries when given) or
    has values outside [0, upper): an out-of-range read under the interpreter crashes the process and on a GPU
    reads garbage. The shape check is free; the value check syncs, so on GPUs it runs only in debug mode."""
    check_device(name, idx)
    if idx.dim() != 1 or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {idx.dtype} {tuple(idx.shape)}")
    if length is not None and idx.numel() != length:
        raise ValueError(f"{name} must have {length} entries, got {idx.numel()}")
    if idx.numel() == 0 or not _check_values(idx):
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= upper:
        raise ValueError(f"{name} has values in [{lo}, {hi}], outside [0, {upper})")


def check_offsets(name: str, offsets: torch.Tensor, total: int) -> None:
    """Raise unless ``offsets`` [T+1] (int32/int64) is non-decreasing within [0, total]: the CSR ranges
    ``offsets[t] .. offsets[t+1]-1`` then index only valid pairs."""
    check_device(name, offsets)
    if offsets.dim() != 1 or offsets.numel() < 1 or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D int32/int64 tensor of T+1 >= 1 entries, "
                         f"got {offsets.dtype} {tuple(offsets.shape)}")
    if not _check_values(offsets):
        return
    lo, hi = int(offsets[0]), int(offsets[-1])
    if lo < 0 or hi > total or bool((offsets[1:] < offsets[:-1]).any()):
        raise ValueError(f"{name} must be non-decreasing within [0, {total}] (the number of pairs), "
                         f"got first {lo}, last {hi}")


def check_rows(name: str, t: torch.Tensor, cols: int | None = None, rows: int | None = None) -> None:
    """Raise unless ``t`` is a 2-D floating tensor (with ``rows`` rows / ``cols`` columns when given) the
    kernels can read."""
    check_device(name, t)
    if t.dim() != 2 or not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a 2-D floating tensor, got {t.dtype} {tuple(t.shape)}")
    if (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        want = f"[{'*' if rows is None else rows}, {'*' if cols is None else cols}]"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


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
