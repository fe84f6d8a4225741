"""One knob for the dispatch kernels (moe_routing/settings.py, moe_routing/ops/backend.py): environment switches
read in settings.py only, the layer's backend resolved once per forward, ops that run an already resolved backend
as given, and kernel backends that cannot run here refused before any compute."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import moe_routing as mr
from moe_routing import settings
from moe_routing.ops import backend as backend_mod
from moe_routing.ops import combine, permute, resolve_backend, sort_by_expert
from moe_routing.ops.topk_softmax import topk_softmax

ROOT = Path(__file__).resolve().parents[1]


def test_environment_is_read_in_settings_only():
    sources = [*ROOT.joinpath("moe_routing").rglob("*.py"), *ROOT.joinpath("kernels").glob("*.py")]
    readers = sorted(str(p.relative_to(ROOT)) for p in sources
                     if re.search(r"\benviron\b|\bgetenv\b", p.read_text()))
    assert readers == ["moe_routing/settings.py"]


def test_settings_read_at_call_time(monkeypatch):
    monkeypatch.delenv("MOE_ROUTING_BACKEND", raising=False)
    monkeypatch.delenv("MOE_ROUTING_DEBUG", raising=False)
    assert settings.backend_override() is None and settings.debug_checks() is False
    monkeypatch.setenv("MOE_ROUTING_BACKEND", "triton")
    monkeypatch.setenv("MOE_ROUTING_DEBUG", "1")
    assert settings.backend_override() == "triton" and settings.debug_checks() is True
    monkeypatch.setenv("MOE_ROUTING_BACKEND", "")
    monkeypatch.setenv("MOE_ROUTING_DEBUG", "yes")  # only "1" turns the checks on
    assert settings.backend_override() is None and settings.debug_checks() is False
    for value, want in (("1", True), ("0", False), ("", None)):
        monkeypatch.setenv("MOE_ROUTING_BUILD_CUDA", value)
        assert settings.build_cuda_request() is want
    monkeypatch.setenv("MOE_ROUTING_BUILD_CUDA", "yes")
    with pytest.raises(ValueError, match="MOE_ROUTING_BUILD_CUDA must be 1, 0 or unset"):
        settings.build_cuda_request()


def test_layer_resolves_backend_once_per_forward(monkeypatch):
    calls = []
    real = settings.backend_override
    monkeypatch.setattr(settings, "backend_override", lambda: calls.append(1) or real())
    layer = mr.MoELayer(8, 6, 4, 2, losses=[])
    layer(torch.randn(5, 8)).sum().backward()
    assert len(calls) == 1
    layer.capacity_factor = 1.0
    calls.clear()
    layer(torch.randn(5, 8)).sum().backward()
    assert len(calls) == 1


def test_ops_run_a_concrete_backend_as_given(monkeypatch):
    """A resolved name is not resolved again: the override (even an invalid one) is not consulted."""
    monkeypatch.setattr(settings, "backend_override", lambda: pytest.fail("ops re-read the override"))
    x = torch.randn(4, 3)
    src_token = torch.tensor([0, 2, 2, 1])
    assert torch.equal(permute(x, src_token, "torch"), x[src_token])
    sort_by_expert(torch.tensor([1, 0, 1]), 2, "torch")
    topk_softmax(torch.randn(3, 4), 2, "torch")
    combine(torch.randn(2, 3), torch.ones(2), torch.tensor([1, 0]), torch.tensor([0, 1]), 2, 1, "torch")


def test_auto_passed_to_an_op_still_resolves(monkeypatch):
    monkeypatch.setenv("MOE_ROUTING_BACKEND", "bogus")
    with pytest.raises(ValueError, match="backend must be one of"):
        permute(torch.randn(4, 3), torch.tensor([0, 1]), "auto")
    monkeypatch.setenv("MOE_ROUTING_BACKEND", "torch")
    assert backend_mod.op_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        backend_mod.op_backend("gpu", torch.device("cpu"))


def test_override_applies_to_the_layer(monkeypatch):
    monkeypatch.setenv("MOE_ROUTING_BACKEND", "cuda")
    layer = mr.MoELayer(8, 6, 4, 2, backend="torch", losses=[])
    with pytest.raises(ValueError, match="cuda backend is unavailable"):
        layer(torch.randn(3, 8))


def test_concrete_kernel_backend_rejects_cpu_tensors_clearly():
    """With no re-resolution in the op, the backend's own wrapper names the argument it cannot run on."""
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="logits_TE must be a CUDA tensor for the cuda backend"):
        topk_softmax(x, 2, "cuda")
    with pytest.raises(ValueError, match="x_TD must be a CUDA tensor for the cuda backend"):
        permute(x, torch.tensor([0, 1]), "cuda")


def test_triton_kernels_reject_cpu_tensors_without_interpreter(monkeypatch):
    pytest.importorskip("triton")
    # import the kernels first: their decorators read the interpreter switch at import
    from moe_routing._kernels import _launch, counts, permute as permute_kernel  # noqa: F401

    monkeypatch.setattr(_launch, "INTERPRETING", False)
    with pytest.raises(ValueError, match="x_TD must be a CUDA tensor for the triton backend"):
        permute(torch.randn(4, 3), torch.tensor([0, 1]), "triton")
    with pytest.raises(ValueError, match="expert_N must be a CUDA tensor for the triton backend"):
        sort_by_expert(torch.tensor([0, 1]), 2, "triton")


def test_triton_backend_unavailable_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MOE_ROUTING_BACKEND", raising=False)
    with pytest.raises(ValueError, match="triton backend is unavailable"):
        resolve_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="cuda backend is unavailable"):
        resolve_backend("cuda", torch.device("cpu"))
    assert resolve_backend("auto", torch.device("cpu")) == "torch"


def test_layer_with_unavailable_triton_backend_raises_before_compute(monkeypatch):
    from moe_routing import MoELayer

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("MOE_ROUTING_BACKEND", raising=False)
    layer = MoELayer(8, 4, 4, 2, backend="triton", losses=[])
    with pytest.raises(ValueError, match="triton backend is unavailable"):
        layer(torch.randn(3, 8))
    assert layer.last_stats == {}  # nothing ran
