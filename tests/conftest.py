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


@pytest.fixture(scope="session")
def emu_build_module():
    """csrc/emu/emu_build.py (test tooling, not part of the package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "moe_emu_build", Path(__file__).resolve().parent.parent / "csrc" / "emu" / "emu_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def emu(tmp_path_factory, emu_build_module) -> dict:
    """The CPU emulator's builds, once per session and concurrently (~20 s on 2 cores): the launchers library, the
    ASan/UBSan driver and the emulated torch binding."""
    if emu_build_module.find_cxx() is None:
        pytest.skip("no host C++ compiler (g++ or $CXX): CUDA emulator checks skipped")
    return emu_build_module.build(tmp_path_factory.mktemp("emu"), check=True, torch_ext=True)
