"""CUDA C++ twins (csrc/): compile checks with nvcc, the built library's exported ABI, and the CPU-side behaviour
of moe_routing.ops.cuda_lib. Nothing here runs a kernel: these machines have nvcc but no GPU."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_routing import build_cuda
from moe_routing.ops import cuda_lib

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))
NVCC = build_cuda.find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA compile checks skipped")


def test_sources_present():
    assert {p.name for p in CU_FILES} >= set(build_cuda.SOURCES)
    assert (CSRC / "moe_ops.h").is_file()


@needs_nvcc
@pytest.mark.parametrize("cu", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_sm90(cu, tmp_path):
    proc = subprocess.run([NVCC, "-arch=sm_90", "-c", str(cu), "-o", str(tmp_path / (cu.stem + ".o"))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_nvcc
def test_build_cuda_cli_exports_abi(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "moe_routing.build_cuda", "--arch", "sm_90", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lib = Path(proc.stdout.strip().splitlines()[-1])
    assert lib == tmp_path / build_cuda.LIB_NAME and lib.is_file()
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("nm not found: exported-symbol check skipped")
    out = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if line.split()[-2:-1] == ["T"]}
    assert set(build_cuda.SYMBOLS) <= exported, out


def test_build_cuda_cli_without_arch_or_gpu_fails_clearly(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the arch comes from it")
    proc = subprocess.run([sys.executable, "-m", "moe_routing.build_cuda", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "--arch" in proc.stderr


def test_normalize_arch():
    assert build_cuda.normalize_arch("sm_90") == "sm_90"
    assert build_cuda.normalize_arch("9.0") == "sm_90"
    assert build_cuda.normalize_arch("90a") == "sm_90a"
    with pytest.raises(ValueError, match="arch"):
        build_cuda.normalize_arch("hopper")


def test_cache_path_depends_on_arch(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_ROUTING_CACHE", str(tmp_path))
    a, b = build_cuda.library_path("sm_90"), build_cuda.library_path("sm_80")
    assert a.parent.parent == tmp_path and a != b and a.name == build_cuda.LIB_NAME


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_is_available_false_with_reason():
    ok, reason = cuda_lib.is_available()
    assert ok is False
    assert "cuda backend needs" in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_require_raises_with_reason():
    with pytest.raises(cuda_lib.CudaLibUnavailable, match="cuda backend needs"):
        cuda_lib.require()


def test_wrappers_reject_cpu_tensors():
    x = torch.randn(4, 8)
    rows = torch.tensor([0, 2, 1])
    with pytest.raises(ValueError, match="x_TD must be a CUDA tensor"):
        cuda_lib.permute(x, rows)
    h = torch.randn(3, 8)
    offs = torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="h_ND must be a CUDA tensor"):
        cuda_lib.combine(h, torch.ones(3), torch.arange(3), offs)
    with pytest.raises(ValueError, match="h_ND must be a CUDA tensor"):
        cuda_lib.combine_backward(torch.randn(2, 8), h, torch.ones(3), torch.arange(3), torch.tensor([0, 1, 1]))


def test_wrappers_check_dtype_and_shape_first():
    with pytest.raises(TypeError, match="x_TD must be float32"):
        cuda_lib.permute(torch.zeros(4, 8, dtype=torch.int32), torch.tensor([0]))
    with pytest.raises(ValueError, match="x_TD must be 2-D"):
        cuda_lib.permute(torch.zeros(4), torch.tensor([0]))
    with pytest.raises(TypeError, match="x_TD must be a torch.Tensor"):
        cuda_lib.permute([[1.0]], torch.tensor([0]))
