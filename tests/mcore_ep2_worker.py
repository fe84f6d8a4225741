"""One rank of the expert-model-parallel-2 check in test_integrations_megatron.py (run as a script, 2 processes).

    python tests/mcore_ep2_worker.py RANK RENDEZVOUS_FILE DISPATCHER ROUTER

Builds mcore's MoELayer with our router at expert_model_parallel_size=2 over gloo (each rank holds experts
2r, 2r+1), and checks its output and gradients on this rank's tokens against our MoELayer holding all experts.
mcore runs on the CPU through moe_routing.integrations.megatron_cpu. Prints "ok RANK" on success.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F


def main(rank: int, path: str, dispatcher: str, router: str) -> None:
    from moe_routing.integrations.megatron_cpu import cpu_device, cpu_process_group, cpu_streams

    with cpu_device(), cpu_streams(), cpu_process_group(rank, 2, path, expert_model_parallel_size=2):
        check(rank, dispatcher, router)
    print("ok", rank)


def check(rank: int, dispatcher: str, router: str) -> None:
    from megatron.core.transformer.transformer_config import TransformerConfig

    import moe_routing as mr
    from moe_routing.integrations.megatron import build_moe_layer, moe_layer_spec

    E, D, FF, K = 4, 16, 24, 2
    variable_k = router == "relu"
    extra = {"moe_expert_capacity_factor": float(E), "moe_router_load_balancing_type": "none"} if variable_k else {}
    cfg = TransformerConfig(num_layers=1, hidden_size=D, ffn_hidden_size=FF, num_attention_heads=1,
                            num_moe_experts=E, moe_router_topk=K, moe_ffn_hidden_size=FF, use_cpu_initialization=True,
                            moe_token_dispatcher_type=dispatcher, gated_linear_unit=True, activation_func=F.silu,
                            add_bias_linear=False, params_dtype=torch.float32, moe_aux_loss_coeff=0.0,
                            expert_model_parallel_size=2, **extra)
    router_kwargs = {"l1_coeff": 0.1} if variable_k else {}
    losses = None if variable_k else [mr.SwitchAuxLoss(0.1)]
    layer = build_moe_layer(moe_layer_spec(router, num_experts=E, losses=losses, **router_kwargs), cfg)
    torch.manual_seed(0)  # the same full layer on both ranks
    ours = mr.MoELayer(D, FF, E, K, router=router, backend="torch", router_kwargs=router_kwargs, losses=losses)
    with torch.no_grad():
        layer.router.router.load_state_dict(ours.router.state_dict())
        for i, mlp in enumerate(layer.experts.local_experts):
            e = 2 * rank + i
            mlp.linear_fc1.weight.copy_(torch.cat([ours.experts.w_gate[e].t(), ours.experts.w_up[e].t()]))
            mlp.linear_fc2.weight.copy_(ours.experts.w_down[e].t())
    xs = [torch.randn(6, 3, D, generator=torch.Generator().manual_seed(10 + r)) for r in range(2)]
    x = xs[rank].clone().requires_grad_()
    y, _ = layer(x)
    y.square().sum().backward()

    def close(a, b, what):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * float(b.abs().max().clamp_min(1e-6)),
                                   msg=lambda m: f"rank {rank} {what}: {m}")

    down = 0  # an expert's gradient sums the tokens of both ranks
    for r in range(2):
        ours.zero_grad()
        x2 = xs[r].transpose(0, 1).clone().requires_grad_()
        y2 = ours(x2)
        y2.square().sum().backward()
        down = down + ours.experts.w_down.grad
        if r == rank:
            close(y.transpose(0, 1), y2, "output")
            close(x.grad.transpose(0, 1), x2.grad, "input gradient")
            close(layer.router.router.weight.grad, ours.router.weight.grad, "router gradient")
    for i, mlp in enumerate(layer.experts.local_experts):
        close(mlp.linear_fc2.weight.grad.t(), down[2 * rank + i], f"expert {2 * rank + i} fc2 gradient")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
