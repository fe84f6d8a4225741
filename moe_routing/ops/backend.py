"""Which implementation a dispatch op runs: the choice, and clear errors when one is unavailable."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton backend needs the triton package (pip install 'moe_routing[triton]')"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "triton backend needs CUDA tensors or TRITON_INTERPRET=1 (set before moe_routing is imported)"
    return None


def resolve_backend(name: str, device: torch.device = torch.device("cpu")) -> str:
    """Resolve ``name`` (``MOE_ROUTING_BACKEND`` overrides it) for tensors on ``device``.

    "auto": Triton on CUDA tensors when triton is importable, else the torch reference. An explicit backend
    that cannot run raises ValueError saying why.
    """
    name = check_backend_name(os.environ.get("MOE_ROUTING_BACKEND") or name)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "torch"
    if name == "triton":
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"triton backend is unavailable: {reason}")
    if name == "cuda":
        if device.type != "cuda":
            raise ValueError(f"cuda backend is unavailable: it needs CUDA tensors, got device {device}")
        from . import cuda_lib

        ok, reason = cuda_lib.is_available()
        if not ok:
            raise ValueError(f"cuda backend is unavailable: {reason}")
    return name


def accumulate_dtype(*dtypes) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), else float32 (bf16/fp16/fp32 inputs)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def token_offsets(token_N: torch.Tensor, num_tokens: int, top_k: int = 0) -> torch.Tensor:
    """CSR offsets [T+1] of each token's pairs (pairs sorted by token), as the token-major kernels take."""
    if top_k > 0:
        return torch.arange(num_tokens + 1, device=token_N.device) * top_k
    counts = torch.bincount(token_N, minlength=num_tokens)
    return torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
