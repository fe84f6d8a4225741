import os

# The Triton backend runs on CPU under the interpreter; the variable must be set before any kernel module is
# imported (moe_routing imports them lazily, on first use of backend="triton").
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from moe_routing.ops.grouped_mm import grouped_mm_available  # noqa: E402

# Tests that force expert_impl="grouped_mm" need torch._grouped_mm (recent torch only; "auto" falls back to the loop).
needs_grouped_mm = pytest.mark.skipif(not grouped_mm_available(torch.device("cpu")),
                                      reason=f"torch {torch.__version__} has no CPU torch._grouped_mm")
