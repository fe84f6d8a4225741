"""The environment variables the library reads, each read here and nowhere else.

MOE_ROUTING_BACKEND: overrides every layer's ``backend`` ("auto" | "torch" | "triton" | "cuda").
MOE_ROUTING_DEBUG=1: value checks that would sync the host on accelerators (index ranges, ``seq_lens``).
"""
from __future__ import annotations

import os
from typing import Optional


def debug_checks() -> bool:
    """Whether checks that sync an accelerator run (``MOE_ROUTING_DEBUG=1``)."""
    return os.environ.get("MOE_ROUTING_DEBUG") == "1"


def backend_override() -> Optional[str]:
    """The ``MOE_ROUTING_BACKEND`` override, or None when unset or empty."""
    return os.environ.get("MOE_ROUTING_BACKEND") or None
