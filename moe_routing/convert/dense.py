"""Reading a dense SwiGLU FFN's weights, whatever module holds them, and capturing its calibration inputs.

Shape letters: D hidden, F the dense FFN's hidden size, T calibration tokens.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DenseSwiGLU(NamedTuple):
    """A dense FFN ``(silu(x @ w_gate) * (x @ w_up)) @ w_down`` in the library's layout (detached tensors)."""

    w_gate_DF: Tensor
    w_up_DF: Tensor
    w_down_FD: Tensor

    @property
    def hidden_size(self) -> int:
        return self.w_gate_DF.shape[0]

    @property
    def ffn_hidden_size(self) -> int:
        return self.w_gate_DF.shape[1]

    def __call__(self, x_TD: Tensor) -> Tensor:
        return (F.silu(x_TD @ self.w_gate_DF) * (x_TD @ self.w_up_DF)) @ self.w_down_FD


def _is_silu(act: object) -> bool:
    if not callable(act):
        return False
    probe = torch.linspace(-4.0, 4.0, 17, dtype=torch.float64)
    try:
        out = act(probe)
    except Exception:  # an activation that rejects float64 CPU tensors is not one we can vouch for
        return False
    return isinstance(out, Tensor) and out.shape == probe.shape and torch.allclose(out.double(), F.silu(probe))


def dense_swiglu(ffn: nn.Module) -> DenseSwiGLU:
    """The weights of a dense SwiGLU FFN: the ablation model's `SwiGLU` (and `SharedExperts` with SwiGLU),
    which hold ``w_gate``/``w_up`` [D, F] and ``w_down`` [F, D], or a Hugging Face gated MLP (``LlamaMLP``,
    ``Qwen2MLP``, ``MistralMLP``, ...): ``gate_proj``/``up_proj``/``down_proj`` linears without bias and a SiLU
    ``act_fn``. Anything else raises TypeError naming what is missing."""
    if not isinstance(ffn, nn.Module):
        raise TypeError(f"ffn must be an nn.Module (a dense SwiGLU FFN), got {type(ffn).__name__}")
    names = ("w_gate", "w_up", "w_down")
    if all(isinstance(getattr(ffn, n, None), Tensor) and getattr(ffn, n).dim() == 2 for n in names):
        g, u, d = (getattr(ffn, n).detach() for n in names)
        act = getattr(ffn, "activation", "swiglu")
        if act != "swiglu":
            raise TypeError(f"ffn has activation={act!r}; only SwiGLU FFNs convert")
    elif all(isinstance(getattr(ffn, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
        lins = (ffn.gate_proj, ffn.up_proj, ffn.down_proj)
        if any(lin.bias is not None for lin in lins):
            raise TypeError(f"{type(ffn).__name__} has biased projections (mlp_bias=True); the library's experts "
                            "have no bias, so it does not convert exactly")
        if not _is_silu(getattr(ffn, "act_fn", None)):
            raise TypeError(f"{type(ffn).__name__}.act_fn is not SiLU (hidden_act='silu'); only SwiGLU FFNs "
                            "convert")
        g, u, d = (lin.weight.detach().t() for lin in lins)
    else:
        raise TypeError(f"ffn must be a dense SwiGLU FFN: w_gate/w_up [D, F] and w_down [F, D] tensors, or "
                        f"gate_proj/up_proj/down_proj linears (Hugging Face); {type(ffn).__name__} has neither")
    D, Fh = g.shape
    if u.shape != (D, Fh) or d.shape != (Fh, D):
        raise ValueError(f"inconsistent FFN shapes: w_gate {tuple(g.shape)}, w_up {tuple(u.shape)}, "
                         f"w_down {tuple(d.shape)} (expected [D, F], [D, F], [F, D])")
    return DenseSwiGLU(g, u, d)


@contextmanager
def capture_inputs(modules: dict[str, nn.Module]) -> Iterator[dict[str, list[Tensor]]]:
    """Record the input of each named module during the block: ``{name: [x_TD of each call]}`` (detached,
    flattened to [T, D]), the calibration data `carve` reads::

        with capture_inputs({"0": model.blocks[0].ffn}) as seen:
            model(calibration_ids)
        x_TD = torch.cat(seen["0"])
    """
    seen: dict[str, list[Tensor]] = {name: [] for name in modules}
    handles = []

    def hook_for(name: str) -> Callable:
        def hook(module, args):
            x = args[0]
            seen[name].append(x.detach().reshape(-1, x.shape[-1]))
        return hook

    try:
        for name, m in modules.items():
            handles.append(m.register_forward_pre_hook(hook_for(name)))
        yield seen
    finally:
        for h in handles:
            h.remove()
