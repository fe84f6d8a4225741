"""CUDA sources (csrc/) without a GPU: compile checks of the kernels (nvcc, with the flags torch's BuildExtension
passes) and of the torch binding against torch's headers, setup.py's skip on CPU machines, the CPU-side behaviour
of moe_routing.ops.cuda_ext, and the kernels *executed* by the CPU emulator (csrc/emu/: the .cu sources compiled
with g++, every CUDA thread an OS thread): its ASan/UBSan driver, and the C launchers called through ctypes on
host tensors against the torch reference ops. tests/test_cuda_ext_emulated.py runs the binding itself on the
emulator. No GPU runs here: the emulator cannot show timing or memory-model effects."""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_routing.ops import cuda_ext

from helpers import half_expert_routing

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
CU_FILES = sorted(CSRC.glob("*.cu"))


def _find_nvcc():
    found = shutil.which("nvcc")
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if not found and root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            found = os.path.join(root, "bin", "nvcc")
    return found


def _cuda_include():
    """The CUDA toolkit's include directory (cuda_runtime_api.h), or None."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return Path(root) / "include"
    return None


NVCC = _find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: CUDA compile checks skipped")


def test_sources_present():
    assert {p.name for p in CU_FILES} == {"combine.cu", "counts.cu", "permute.cu", "topk_softmax.cu"}
    for name in ("moe_ops.h", "acc_types.cuh", "torch_binding.cpp"):
        assert (CSRC / name).is_file(), name


@needs_nvcc
# what BuildExtension passes: torch 2.4-2.6 / torch 2.13+ (the older standard in the slow set)
@pytest.mark.parametrize("std", [pytest.param("c++17", marks=pytest.mark.slow), "c++20"])
def test_kernels_compile_with_extension_flags(std, tmp_path):
    """Every .cu with the flags torch's BuildExtension gives nvcc (no implicit half/bfloat16 conversions...)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    cmd = [NVCC, "-arch=sm_90", f"-std={std}", "-O3", "-c", *COMMON_NVCC_FLAGS, f"-I{CSRC}", "-odir", str(tmp_path),
           *map(str, CU_FILES)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.glob("*.o")) == sorted(p.stem + ".o" for p in CU_FILES)


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None,
                    reason="needs g++ and the CUDA toolkit headers")
def test_binding_compiles_against_torch_headers():
    """csrc/torch_binding.cpp (CUDA mode) against this torch's headers. A CPU wheel ships ATen/cuda and c10/cuda
    but not the generated c10/cuda/impl/cuda_cmake_macros.h, hence C10_CUDA_NO_CMAKE_CONFIGURE_FILE; linking
    needs libc10_cuda/libtorch_cuda, which only CUDA wheels have, so this is a compile-only check."""
    from torch.utils.cpp_extension import include_paths

    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Wall", *(f"-I{p}" for p in include_paths()),
           f"-I{_cuda_include()}", f"-I{CSRC}", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", str(CSRC / "torch_binding.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]


@pytest.mark.skipif(torch.version.cuda is not None, reason="checks the CPU-only torch path")
def test_setup_py_skips_the_extension_on_cpu_torch_and_says_how_to_build():
    env = {k: v for k, v in os.environ.items() if k != "MOE_ROUTING_BUILD_CUDA"}
    proc = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "moe_routing", proc.stderr
    assert "skipping the CUDA extension moe_routing._C" in proc.stderr and "CPU-only" in proc.stderr
    assert "MOE_ROUTING_BUILD_CUDA=1 pip install -e . --no-build-isolation" in proc.stderr
    forced = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120, env={**env, "MOE_ROUTING_BUILD_CUDA": "1"})
    assert forced.returncode != 0 and "MOE_ROUTING_BUILD_CUDA=1 but" in forced.stderr
    assert "CPU-only" in forced.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only check")
def test_cuda_backend_unavailable_says_why_and_how_to_build(monkeypatch):
    from moe_routing.ops import resolve_backend

    monkeypatch.setattr(cuda_ext, "ops_registered", lambda: False)
    monkeypatch.setattr(cuda_ext, "extension_path", lambda: None)
    monkeypatch.setattr(cuda_ext, "_loaded", False)
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU-only torch
    ok, reason = cuda_ext.is_available()
    assert ok is False and "torch built with CUDA" in reason and "MOE_ROUTING_BUILD_CUDA=1" in reason
    # a CUDA torch on a GPU machine without the built extension: the reason is the missing build
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ok, reason = cuda_ext.is_available()
    assert ok is False and reason.startswith("the CUDA extension moe_routing._C is not built: build it with")
    with pytest.raises(cuda_ext.CudaExtensionUnavailable, match="cuda backend is unavailable: the CUDA extension"):
        cuda_ext.require()
    with pytest.raises(ValueError, match=r"cuda backend is unavailable: the CUDA extension .* --no-build-isolation"):
        resolve_backend("cuda", torch.device("cuda"))


def test_op_names_are_in_their_own_namespace():
    assert cuda_ext.NAMESPACE == "moe_routing_cuda" and cuda_ext.NAMESPACE != "moe_routing"
    assert cuda_ext.OPS == ("permute", "combine", "combine_backward", "sort_by_expert", "topk_softmax")
    binding = (CSRC / "torch_binding.cpp").read_text()
    assert "TORCH_LIBRARY(moe_routing_cuda, m)" in binding
    assert "TORCH_LIBRARY_IMPL(moe_routing_cuda, CUDA, m)" in binding
    for name in cuda_ext.OPS:
        assert f'm.def("{name}(' in binding and f'm.impl("{name}", &{name}_impl)' in binding


def test_wrappers_reject_cpu_tensors_and_bad_arguments_first():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match="x_TD must be a CUDA tensor"):
        cuda_ext.permute(x, torch.tensor([0, 2, 1]))
    h = torch.randn(3, 8)
    with pytest.raises(ValueError, match="h_ND must be a CUDA tensor"):
        cuda_ext.combine(h, torch.ones(3), torch.arange(3), torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="h_ND must be a CUDA tensor"):
        cuda_ext.combine_backward(torch.randn(2, 8), h, torch.ones(3), torch.arange(3), torch.tensor([0, 1, 1]))
    with pytest.raises(TypeError, match="x_TD must be float32"):
        cuda_ext.permute(torch.zeros(4, 8, dtype=torch.int32), torch.tensor([0]))
    with pytest.raises(ValueError, match="x_TD must be 2-D"):
        cuda_ext.permute(torch.zeros(4), torch.tensor([0]))
    with pytest.raises(TypeError, match="x_TD must be a torch.Tensor"):
        cuda_ext.permute([[1.0]], torch.tensor([0]))
    with pytest.raises(ValueError, match="expert_N must be a CUDA tensor"):
        cuda_ext.sort_by_expert(torch.tensor([0, 1]), 2)
    with pytest.raises(TypeError, match="expert_N must be an int32/int64 tensor"):
        cuda_ext.sort_by_expert(torch.tensor([0.0]), 2)
    with pytest.raises(ValueError, match=r"expert_N must be 1-D \[N\]"):
        cuda_ext.sort_by_expert(torch.zeros(2, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        cuda_ext.sort_by_expert(torch.tensor([0]), 0)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        cuda_ext.sort_by_expert(torch.tensor([0]), 2.0)
    with pytest.raises(ValueError, match="logits_TE must be a CUDA tensor"):
        cuda_ext.topk_softmax(torch.randn(3, 4), 2)
    with pytest.raises(TypeError, match="logits_TE must be float32"):
        cuda_ext.topk_softmax(torch.zeros(3, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="logits_TE must be 2-D"):
        cuda_ext.topk_softmax(torch.randn(4), 2)


# ---- the CPU emulator ------------------------------------------------------------------------------------------
def test_emu_check_sanitized_driver_passes(emu):
    proc = subprocess.run([str(emu["check"])], capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert " 0 failures" in out and "FAIL" not in out


@pytest.fixture(scope="module")
def emu_lib(emu, emu_build_module) -> ctypes.CDLL:
    return emu_build_module.declare_abi(ctypes.CDLL(str(emu["lib"])))


_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


def _ptr(t):
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _emu_routing(T: int, E: int, K: int, variable: bool, gen: torch.Generator):
    """Pairs in token order over the first E//2 experts only (the rest get zero tokens); K distinct experts
    per token, or 0..K when ``variable``. Returns token_N, pair_of_row_N, row_of_pair_N, token_offsets_T1."""
    from moe_routing.ops import invert_permutation, sort_by_expert

    token_N, expert_N = half_expert_routing(T, E, K, variable, gen)
    pair_of_row_N, counts_E, _ = sort_by_expert(expert_N, E, "torch")
    assert (counts_E == 0).any()  # zero-token experts are part of every case
    offsets = torch.nn.functional.pad(torch.bincount(token_N, minlength=T).cumsum(0), (1, 0))
    return token_N, pair_of_row_N, invert_permutation(pair_of_row_N), offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,E,K,D,variable", [(1, 4, 1, 3, False), (1, 8, 3, 1, False), (13, 8, 2, 7, False),
                                                (11, 16, 3, 33, True)])
def test_emu_abi_matches_torch_reference(emu_lib, dtype, T, E, K, D, variable):
    from moe_routing.ops import combine, permute

    gen = torch.Generator().manual_seed(T * 100 + D)
    token_N, pair_of_row_N, row_of_pair_N, offsets = _emu_routing(T, E, K, variable, gen)
    N = token_N.numel()
    code = _CODE[dtype]
    top_k = None if variable else K

    # permute: exact row copies
    x = torch.randn(T, D, generator=gen).to(dtype)
    src_token_N = token_N[pair_of_row_N].contiguous()
    out = torch.full((N, D), 7.0, dtype=dtype)
    assert emu_lib.moe_permute_fwd(_ptr(x), _ptr(src_token_N), _ptr(out), N, D, code, None) == 0
    assert torch.equal(out, permute(x, src_token_N, "torch"))

    # combine forward (weighted) and backward, vs the torch backend's op and its autograd
    h = torch.randn(N, D, generator=gen).to(dtype).requires_grad_()
    w = torch.rand(N, generator=gen).requires_grad_()
    dy = torch.randn(T, D, generator=gen).to(dtype)
    ref_y = combine(h, w, row_of_pair_N, token_N, T, top_k, "torch")
    ref_dh, ref_dw = torch.autograd.grad(ref_y, (h, w), dy)
    y = torch.full((T, D), 7.0, dtype=dtype)  # poison: every row must be written, zero-pair tokens too
    assert emu_lib.moe_combine_fwd(_ptr(h), _ptr(w), _ptr(row_of_pair_N), _ptr(offsets), _ptr(y), T, D, code, None) == 0
    tol = {} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-2}
    torch.testing.assert_close(y, ref_y.detach(), **tol)
    d_h, d_w = torch.full_like(h, 7.0), torch.full_like(w, 7.0)
    st = emu_lib.moe_combine_bwd(_ptr(dy), _ptr(h), _ptr(w), _ptr(row_of_pair_N), _ptr(token_N), _ptr(d_h),
                                 _ptr(d_w), N, D, code, None)
    assert st == 0
    torch.testing.assert_close(d_h, ref_dh, **tol)
    torch.testing.assert_close(d_w, ref_dw, rtol=1e-5, atol=1e-5 * D)

    # weight NULL is permute's backward: dx[t] = sum of the rows gathered from t
    xg = x.detach().requires_grad_()
    g_ND = torch.randn(N, D, generator=gen).to(dtype)
    (ref_dx,) = torch.autograd.grad(permute(xg, src_token_N, "torch"), xg, g_ND)
    rows_by_token = torch.sort(src_token_N, stable=True).indices
    dx = torch.full((T, D), 7.0, dtype=dtype)
    assert emu_lib.moe_combine_fwd(_ptr(g_ND), None, _ptr(rows_by_token), _ptr(offsets), _ptr(dx), T, D, code,
                                   None) == 0
    torch.testing.assert_close(dx, ref_dx, **tol)


@pytest.mark.parametrize("N,E,used", [(0, 4, 1), (1, 1, 1), (257, 8, 5), (700, 64, 40), (300, 3, 3)])
def test_emu_expert_counts_match_torch_sort(emu_lib, N, E, used):
    """counts.cu through the ABI vs `ops.sort_by_expert(backend="torch")`: exact counts, offsets, stable order
    (experts >= ``used`` get zero pairs; 257 and 700 pairs span several 256-pair blocks)."""
    from moe_routing.ops import sort_by_expert

    expert_N = torch.randint(0, used, (N,), generator=torch.Generator().manual_seed(N + E))
    ref_pair_of_row, ref_counts, ref_offsets = sort_by_expert(expert_N, E, "torch")
    counts, offsets = torch.full((E,), -7), torch.full((E + 1,), -7)
    pair_of_row = torch.full((N,), -7)
    work = torch.empty(emu_lib.moe_expert_counts_workspace(N, E), dtype=torch.uint8)
    st = emu_lib.moe_expert_counts(_ptr(expert_N), N, E, _ptr(counts), _ptr(offsets), _ptr(pair_of_row), _ptr(work),
                                   None)
    assert st == 0
    assert torch.equal(pair_of_row, ref_pair_of_row) and torch.equal(counts, ref_counts)
    assert torch.equal(offsets, ref_offsets)  # the same CSR [E+1] offsets


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
@pytest.mark.parametrize("softmax_first,normalize", [(False, False), (True, False), (True, True)])
def test_emu_topk_softmax_matches_op(emu_lib, dtype, softmax_first, normalize):
    """topk_softmax.cu through the ABI vs `ops.topk_softmax(backend="torch")`: random rows, a tie row, a NaN row
    and a -inf row; E = 37 (lanes own one or two experts), K = 4; T = 9 (three blocks of four tokens)."""
    from moe_routing.ops.topk_softmax import topk_softmax

    T, E, K = 9, 37, 4
    logits = torch.randn(T, E, generator=torch.Generator().manual_seed(5)).to(dtype)
    logits[1] = 0.5
    logits[2, 3::5] = float("nan")
    logits[3] = float("-inf")
    ref_w, ref_i = topk_softmax(logits, K, "torch", softmax_before_topk=softmax_first, normalize=normalize)
    w = torch.full((T, K), 7.0, dtype=ref_w.dtype)
    i = torch.full((T, K), -7)
    st = emu_lib.moe_topk_softmax_fwd(_ptr(logits), _ptr(w), _ptr(i), T, E, K, int(softmax_first), int(normalize),
                                      _CODE[dtype], None)
    assert st == 0
    assert torch.equal(i, ref_i)
    tol = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {"rtol": 2e-6, "atol": 1e-7}
    torch.testing.assert_close(w, ref_w, equal_nan=True, **tol)
    assert torch.isnan(w[2:4]).all() and torch.isfinite(w[[0, 1, 4]]).all()
