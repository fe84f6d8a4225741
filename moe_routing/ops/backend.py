"""Which implementation a dispatch op runs: the choice, and clear errors when one is unavailable."""
from __future__ import annotations

import os

BACKENDS = ("auto", "torch", "triton", "cuda")
_IMPLEMENTED = ("torch",)


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(name: str) -> str:
    """Resolve ``name`` (``MOE_ROUTING_BACKEND`` overrides it) to an implemented backend.

    "auto" picks the fastest implemented backend for the tensors' device; today that is the torch reference
    on every device. Asking for one that is not implemented raises ValueError saying so.
    """
    name = check_backend_name(os.environ.get("MOE_ROUTING_BACKEND") or name)
    if name == "auto":
        return "torch"
    if name not in _IMPLEMENTED:
        raise ValueError(f"backend {name!r} is unavailable: this version of moe_routing ships only the "
                         f"{_IMPLEMENTED} backend(s); use backend='torch' or 'auto'")
    return name


def accumulate_dtype(*dtypes) -> "torch.dtype":
    """float64 if any input is float64 (gradcheck), else float32 (bf16/fp16/fp32 inputs)."""
    import torch

    return torch.float64 if torch.float64 in dtypes else torch.float32
