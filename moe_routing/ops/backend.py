"""Which implementation a dispatch op runs: the choice, and clear errors when one is unavailable.

One knob: `MoELayer` resolves its ``backend`` (or the ``MOE_ROUTING_BACKEND`` override) once per forward with
`resolve_backend` and passes the concrete name to every op. The ops run a concrete name ("torch", "triton",
"cuda") as given, with no second resolution and no environment read (`op_backend`); each backend's wrapper
rejects tensors it cannot run on. Only "auto" passed directly to an op is resolved there.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

from .. import settings

BACKENDS = ("auto", "torch", "triton", "cuda")
CONCRETE_BACKENDS = ("torch", "triton", "cuda")


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the Triton backend cannot run on ``device`` (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return "triton backend needs the triton package (pip install 'moe_routing[triton]')"
    if device.type != "cuda" and not settings.triton_interpret():
        return "triton backend needs CUDA tensors or TRITON_INTERPRET=1 (set before moe_routing is imported)"
    return None


def cuda_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the CUDA extension backend cannot run on ``device`` (None when it can)."""
    if device.type != "cuda":
        return f"it needs CUDA tensors, got device {device}"
    from . import cuda_ext

    ok, reason = cuda_ext.is_available()
    return None if ok else reason


def resolve_backend(name: str, device: torch.device = torch.device("cpu")) -> str:
    """Resolve ``name`` (``MOE_ROUTING_BACKEND`` overrides it) for tensors on ``device``.

    "auto": Triton on CUDA tensors when triton is importable, else the torch reference. An explicit backend
    that cannot run raises ValueError saying why.
    """
    check_backend_name(name)
    name = check_backend_name(settings.backend_override() or name)
    if name == "auto":
        return "triton" if device.type == "cuda" and triton_unavailable_reason(device) is None else "torch"
    reason = None
    if name == "triton":
        reason = triton_unavailable_reason(device)
    elif name == "cuda":
        reason = cuda_unavailable_reason(device)
    if reason is not None:
        raise ValueError(f"{name} backend is unavailable: {reason}")
    return name


def op_backend(name: str, device: torch.device) -> str:
    """The backend an op runs: a concrete name as given (already resolved, e.g. by `MoELayer.forward`),
    "auto" resolved here; anything else raises ValueError."""
    if name in CONCRETE_BACKENDS:
        return name
    return resolve_backend(name, device)


def accumulate_dtype(*dtypes) -> torch.dtype:
    """float64 if any input is float64 (gradcheck), else float32 (bf16/fp16/fp32 inputs)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32
