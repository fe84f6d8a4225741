"""Cost of running a variable-k router (ReLU) through Megatron-Core's dispatchers, one process (ep = 1), CPU.

    PYTHONPATH=. python benchmarks/megatron_variable_k.py [--tokens 2048] [--repeats 5]

Forward + backward time of mcore's MoELayer (local spec, SequentialMLP experts) under the settings the
integration allows for a variable-k router (see moe_routing/integrations/megatron.py), with the ReLU router's
sparsity pinned near its target k / E (a constant input feature and a negative gate column), next to a top-k
router with the same k:
- allgather: the dispatcher sizes everything from routing_map (variable-k native);
- alltoall + capacity factor E: the dispatcher counts routing_map.sum() (one device-to-host sync on GPU);
- topk = E: every (token, expert) pair dispatched, weight 0 off the routed ones (E / k times the expert work).
mcore runs on the CPU through moe_routing.integrations.megatron_cpu (as in the tests).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moe_routing.integrations.megatron_cpu import cpu_device, cpu_process_group, cpu_streams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with cpu_device(), cpu_streams(), cpu_process_group():
        from megatron.core.transformer.transformer_config import TransformerConfig

        from moe_routing.integrations.megatron import build_moe_layer, moe_layer_spec
        E, D, K = args.experts, args.hidden, args.top_k
        S, B = args.tokens // 4, 4
        x = torch.randn(S, B, D)
        x[..., 0] = 1.0  # a constant feature: its gate column sets the fraction of positive ReLU logits
        settings = [("topk, alltoall dropless (reference)", "topk", "alltoall", {}),
                    ("relu, allgather", "relu", "allgather", {}),
                    ("relu, alltoall + capacity factor E", "relu", "alltoall",
                     {"moe_expert_capacity_factor": float(E), "moe_router_load_balancing_type": "none"}),
                    ("relu, alltoall + topk = E", "relu", "alltoall", {"moe_router_topk": E}),
                    ("relu, allgather + topk = E", "relu", "allgather", {"moe_router_topk": E})]
        print(f"T={S * B} D={D} F={args.ffn} E={E} k={K}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; min and median of {args.repeats} forward+backward")
        for label, router, dispatcher, extra in settings:
            cfg = TransformerConfig(num_layers=1, hidden_size=D, ffn_hidden_size=args.ffn, num_attention_heads=1,
                                    num_moe_experts=E, moe_router_topk=extra.pop("moe_router_topk", K),
                                    moe_ffn_hidden_size=args.ffn, use_cpu_initialization=True,
                                    moe_token_dispatcher_type=dispatcher, gated_linear_unit=True,
                                    activation_func=F.silu, add_bias_linear=False, params_dtype=torch.float32,
                                    moe_aux_loss_coeff=0.0, **extra)
            torch.manual_seed(0)
            layer = build_moe_layer(moe_layer_spec(router, num_experts=E, top_k=K), cfg)
            inner = layer.router.router
            with torch.no_grad():
                rest = x[..., 1:].reshape(-1, D - 1) @ inner.weight[:, 1:].t()
                # P(logit > 0) = k / E for a normal logit: shift by its (1 - k/E) quantile
                q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1 - K / E)).item()
                inner.weight[:, 0] = -q * rest.std() if router == "relu" else 0.0
            times, pairs, rows = [], 0.0, 0
            for _ in range(args.repeats + 1):
                xi = x.clone().requires_grad_()
                t0 = time.perf_counter()
                y, _ = layer(xi)
                rows = int(layer.token_dispatcher.routing_map.sum()) if getattr(
                    layer.token_dispatcher, "routing_map", None) is not None else int(
                    layer.token_dispatcher.local_map.sum())
                y.square().mean().backward()
                times.append(time.perf_counter() - t0)
                if router == "relu":
                    pairs = 1.0 - float(layer.router.last_stats["sparsity"])
            per_token = f"{pairs * E:.2f} experts/token" if router == "relu" else f"{K} experts/token"
            print(f"{label:38s} {1e3 * min(times[1:]):7.1f} / {1e3 * statistics.median(times[1:]):7.1f} ms"
                  f"  {rows:6d} expert rows  ({per_token})")


if __name__ == "__main__":
    main()
