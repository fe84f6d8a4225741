"""Build script: a pure-Python package, plus the CUDA extension ``moe_routing._C`` from csrc/ when asked or possible.

    pip install -e .                                                   # pure Python (the default, any machine)
    MOE_ROUTING_BUILD_CUDA=1 pip install -e . --no-build-isolation     # also build the CUDA extension

The extension is built with torch's CUDAExtension / BuildExtension from csrc/torch_binding.cpp and every
csrc/*.cu. Without MOE_ROUTING_BUILD_CUDA it is built when torch is importable here with CUDA support
(``torch.version.cuda``) and nvcc is found, and skipped with a printed reason otherwise; pip's build isolation
hides the installed torch, hence ``--no-build-isolation``. MOE_ROUTING_BUILD_CUDA=1 makes a missing requirement an
error, =0 skips the build. Arches: ``TORCH_CUDA_ARCH_LIST`` (e.g. "9.0"), else those of the visible GPUs.
Everything else about the package is in pyproject.toml.
"""
import importlib.util
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
BUILD_HINT = "MOE_ROUTING_BUILD_CUDA=1 pip install -e . --no-build-isolation"


def _settings():
    """moe_routing/settings.py loaded by path: importing the package would import torch."""
    spec = importlib.util.spec_from_file_location("_moe_routing_settings", ROOT / "moe_routing" / "settings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _say(message: str) -> None:
    print(f"moe_routing setup.py: {message}", file=sys.stderr)


def _skip_or_fail(requested: bool, why: str) -> tuple[list, dict]:
    if requested:
        raise SystemExit(f"moe_routing setup.py: MOE_ROUTING_BUILD_CUDA=1 but {why}")
    _say(f"skipping the CUDA extension moe_routing._C: {why}. This is a pure-Python install; backend='cuda' "
         f"stays unavailable. To build it: {BUILD_HINT}")
    return [], {}


def cuda_extensions() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for setup(): the CUDA extension, or nothing with a printed reason."""
    request = _settings().build_cuda_request()
    if request is False:
        _say("MOE_ROUTING_BUILD_CUDA=0: skipping the CUDA extension moe_routing._C")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return _skip_or_fail(bool(request), "torch is not importable in this build environment (pip's build "
                                            "isolation hides it: add --no-build-isolation)")
    if torch.version.cuda is None:
        return _skip_or_fail(bool(request), f"this torch {torch.__version__} is CPU-only (torch.version.cuda is "
                                            "None)")
    if CUDA_HOME is None:
        return _skip_or_fail(bool(request), "nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    sources = ["csrc/torch_binding.cpp", *sorted(f"csrc/{p.name}" for p in CSRC.glob("*.cu"))]
    _say(f"building the CUDA extension moe_routing._C with torch {torch.__version__} (CUDA {torch.version.cuda}) "
         f"and {CUDA_HOME}/bin/nvcc")
    ext = CUDAExtension("moe_routing._C", sources, include_dirs=[str(CSRC)],
                        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return [ext], {"build_ext": BuildExtension}


if __name__ == "__main__":
    ext_modules, cmdclass = cuda_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
