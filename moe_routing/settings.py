"""Environment switches of moe_routing, read here and nowhere else.

Each function reads its variable when called (not at import), so a launcher or a test may set it at any time;
callers that must stay consistent within one forward read it once (`MoELayer.forward` resolves the backend
once and hands the result to every op). This module imports only the standard library: setup.py loads it by
path, before torch is importable.

    MOE_ROUTING_BACKEND=torch|triton|cuda|auto   overrides the dispatch backend of every layer (and of ops
                                                 called with backend="auto")
    MOE_ROUTING_DEBUG=1                          value checks that sync an accelerator (index ranges, seq_lens,
                                                 token ids) run there too; on CPU they always run
    MOE_ROUTING_BUILD_CUDA=1|0                   setup.py: build the CUDA extension (1), never build it (0);
                                                 unset: build it when torch has CUDA and nvcc is found
    TRITON_INTERPRET=1                           Triton's own switch: kernels run on CPU in its interpreter
"""
from __future__ import annotations

import os
from typing import Optional

BACKEND_ENV = "MOE_ROUTING_BACKEND"
DEBUG_ENV = "MOE_ROUTING_DEBUG"
BUILD_CUDA_ENV = "MOE_ROUTING_BUILD_CUDA"
TRITON_INTERPRET_ENV = "TRITON_INTERPRET"


def backend_override() -> Optional[str]:
    """The backend named by ``MOE_ROUTING_BACKEND``, or None when it is unset or empty (not validated here:
    `moe_routing.ops.backend.resolve_backend` rejects unknown names)."""
    return os.environ.get(BACKEND_ENV) or None


def debug_checks() -> bool:
    """Whether checks that would sync an accelerator run there (``MOE_ROUTING_DEBUG=1``)."""
    return os.environ.get(DEBUG_ENV) == "1"


def triton_interpret() -> bool:
    """Whether Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get(TRITON_INTERPRET_ENV) == "1"


def build_cuda_request() -> Optional[bool]:
    """``MOE_ROUTING_BUILD_CUDA``: True for "1", False for "0", None when unset (build when possible)."""
    value = os.environ.get(BUILD_CUDA_ENV, "").strip()
    if value in ("", "auto"):
        return None
    if value not in ("0", "1"):
        raise ValueError(f"{BUILD_CUDA_ENV} must be 1, 0 or unset, got {value!r}")
    return value == "1"


def launcher_world_size() -> int:
    """``WORLD_SIZE`` set by torchrun (1 when the process was not started by a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launcher_local_rank() -> int:
    """``LOCAL_RANK`` set by torchrun (0 when the process was not started by a launcher)."""
    return int(os.environ.get("LOCAL_RANK", "0"))
