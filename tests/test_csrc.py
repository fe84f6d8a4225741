"""CUDA C++ twins (csrc/): compile checks with nvcc, the built library's exported ABI, the CPU-side behaviour
of moe_routing.ops.cuda_lib, and the kernels *executed* by the CPU emulator (csrc/emu/: the .cu sources compiled
with g++, every CUDA thread an OS thread): its ASan/UBSan driver, and the ABI called through ctypes on host
tensors against the torch reference ops. No GPU runs here: the emulator cannot show timing or memory-model
effects."""
from __future__ import annotations

import ctypes
import importlib.util
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


# ---- the CPU emulator ------------------------------------------------------------------------------------------
def _emu_build_module():
    spec = importlib.util.spec_from_file_location("moe_emu_build", CSRC / "emu" / "emu_build.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def emu(tmp_path_factory) -> dict:
    """Build the emulator library and the sanitizer driver once for this module (~15 s)."""
    mod = _emu_build_module()
    if mod.find_cxx() is None:
        pytest.skip("no host C++ compiler (g++ or $CXX): CUDA emulator checks skipped")
    return mod.build(tmp_path_factory.mktemp("emu"), check=True)


def test_emu_check_sanitized_driver_passes(emu):
    proc = subprocess.run([str(emu["check"])], capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert " 0 failures" in out and "FAIL" not in out


_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@pytest.fixture(scope="module")
def emu_lib(emu) -> ctypes.CDLL:
    return cuda_lib.declare_abi(ctypes.CDLL(str(emu["lib"])))


def _ptr(t):
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _emu_routing(T: int, E: int, K: int, variable: bool, gen: torch.Generator):
    """Pairs in token order over the first E//2 experts only (the rest get zero tokens); K distinct experts
    per token, or 0..K when ``variable``. Returns token_N, pair_of_row_N, row_of_pair_N, token_offsets_T1."""
    from moe_routing.ops import invert_permutation, sort_by_expert

    token, expert = [], []
    for t in range(T):
        k = int(torch.randint(0, K + 1, (1,), generator=gen)) if variable else K
        for e in torch.randperm(max(E // 2, K), generator=gen)[:k].tolist():
            token.append(t)
            expert.append(e)
    token_N, expert_N = torch.tensor(token, dtype=torch.long), torch.tensor(expert, dtype=torch.long)
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


def test_new_wrappers_reject_cpu_tensors_and_bad_arguments():
    with pytest.raises(ValueError, match="expert_N must be a CUDA tensor"):
        cuda_lib.expert_counts(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="expert_N must be a CUDA tensor"):
        cuda_lib.sort_by_expert(torch.tensor([0, 1]), 2)
    with pytest.raises(TypeError, match="expert_N must be an int32/int64 tensor"):
        cuda_lib.expert_counts(torch.tensor([0.0]), 2)
    with pytest.raises(ValueError, match=r"expert_N must be 1-D \[N\]"):
        cuda_lib.expert_counts(torch.zeros(2, 2, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        cuda_lib.expert_counts(torch.tensor([0]), 0)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        cuda_lib.expert_counts(torch.tensor([0]), 2.0)
    with pytest.raises(ValueError, match="logits_TE must be a CUDA tensor"):
        cuda_lib.topk_softmax(torch.randn(3, 4), 2)
    with pytest.raises(TypeError, match="logits_TE must be float32"):
        cuda_lib.topk_softmax(torch.zeros(3, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="logits_TE must be 2-D"):
        cuda_lib.topk_softmax(torch.randn(4), 2)
