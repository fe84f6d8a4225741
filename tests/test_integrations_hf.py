"""moe_routing.integrations.hf against transformers itself: tiny random-config models built locally (no hub)."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="the Hugging Face integration needs transformers>=5 (extra 'hf')")

import moe_routing as mr  # noqa: E402
from moe_routing.integrations import hf  # noqa: E402
from moe_routing.integrations import hf_routers  # noqa: E402
from moe_routing.integrations.hf_routers import MoEBlock, RouterGate  # noqa: E402
from moe_routing.routers import HashRouter, ReLURouter, TopKRouter  # noqa: E402

FAMILIES = ("qwen3_moe", "mixtral", "olmoe", "deepseek_v3")
VOCAB = 64


def tiny_config(family: str, hidden: int = 32, inter: int = 16, **over):
    """Two decoder layers, 8 experts, k = 2 (DeepSeek-V3: one dense layer, then an MoE layer with 4 groups of 2,
    the best 2 groups eligible, and a shared expert)."""
    common = dict(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, num_experts_per_tok=2,
                  attn_implementation="eager", eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if family == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=inter, num_experts=8,
                                          norm_topk_prob=True, head_dim=8)
    elif family == "mixtral":
        cfg = transformers.MixtralConfig(**common, intermediate_size=inter, num_local_experts=8)
    elif family == "olmoe":
        cfg = transformers.OlmoeConfig(**common, intermediate_size=inter, num_experts=8, norm_topk_prob=False)
    else:
        common["num_key_value_heads"] = 4
        cfg = transformers.DeepseekV3Config(**common, intermediate_size=48, moe_intermediate_size=inter,
                                            n_routed_experts=8, n_group=4, topk_group=2, n_shared_experts=1,
                                            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                                            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    for key, value in over.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(family: str, seed: int = 0, **cfg_over):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, **cfg_over))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "e_score_correction_bias"):  # zeros at init: random, so the bias decides some choices
                m.e_score_correction_bias.uniform_(-0.05, 0.05)
    return model.eval()


def token_ids(seed: int = 1, batch: int = 2, seq: int = 7):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def sparse_gates(model):
    return [m.gate for _, m in hf_routers._sparse_blocks(model)]


def run(model, ids, impl=None, **kw):
    """Logits and the gradient of a scalar of them (and of the aux loss when the model returns one)."""
    if impl is not None:
        model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(ids, **kw)
    loss = (out.logits.float() ** 2).mean()
    if getattr(out, "aux_loss", None) is not None:
        loss = loss + out.aux_loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# --- experts implementation ---

def test_import_registers_the_experts_implementation():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["moe_routing"] is hf.moe_routing_experts_forward
    model = tiny_model("mixtral")
    model.set_experts_implementation("moe_routing")
    assert model.config._experts_implementation == "moe_routing"


@pytest.mark.parametrize("family,inter", [*((f, 16) for f in FAMILIES), ("qwen3_moe", 6), ("deepseek_v3", 6)])
def test_experts_match_eager_and_grouped_mm(family, inter):
    """I=6: the down projection's rows are not 16-byte aligned, so ours loops over experts there (HF's grouped_mm
    raises on CPU: it is compared with eager only)."""
    model = tiny_model(family, inter=inter)
    ids = token_ids()
    ours, ours_g = run(model, ids, "moe_routing")
    for impl in ("eager", "grouped_mm") if inter == 16 else ("eager",):
        ref, ref_g = run(model, ids, impl)
        assert max_diff(ours.logits, ref.logits) < 1e-5, impl
        assert ours_g.keys() == ref_g.keys()
        for name in ref_g:
            scale = ref_g[name].abs().max().item() + 1e-12
            assert max_diff(ours_g[name], ref_g[name]) <= 1e-5 * max(1.0, scale), (impl, name)
    assert any("gate_up_proj" in n for n in ours_g) and any("gate.weight" in n for n in ours_g)


def test_experts_no_weight_copy_and_config_switch(monkeypatch):
    """``config._experts_implementation`` selects ours per call, and the weights seen are HF's own storage."""
    from transformers.integrations.moe import ExpertsInterface

    seen = []

    def spy(self, hidden_states, top_k_index, top_k_weights):
        seen.append(self.gate_up_proj.data_ptr())
        return hf.moe_routing_experts_forward(self, hidden_states, top_k_index, top_k_weights)

    monkeypatch.setitem(ExpertsInterface._global_mapping, "moe_routing", spy)
    model = tiny_model("qwen3_moe")
    model.config._experts_implementation = "moe_routing"
    with torch.no_grad():
        model(token_ids())
    assert seen == [layer.mlp.experts.gate_up_proj.data_ptr() for layer in model.model.layers]


@pytest.mark.parametrize("variant", ["gpt_oss", "nemotron_h"])
def test_experts_layout_variants(variant):
    """The other layouts HF's decorator declares: GPT-OSS (``is_transposed``, biases, interleaved gate/up with its
    own ``_apply_gate``) and Nemotron-H (no gate: ``up_proj`` and an activation), against eager at module level."""
    if variant == "gpt_oss":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Experts
        cfg = transformers.GptOssConfig(hidden_size=32, intermediate_size=16, num_local_experts=8,
                                        num_experts_per_tok=2)
    else:
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts as Experts
        cfg = transformers.NemotronHConfig(hidden_size=32, moe_intermediate_size=16, n_routed_experts=8,
                                           num_experts_per_tok=2)
    torch.manual_seed(0)
    experts = Experts(cfg)
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(std=0.2)
    x, w = torch.randn(9, 32), torch.rand(9, 2)
    idx = torch.rand(9, 8).topk(2, -1).indices
    results = {}
    for impl in ("eager", "moe_routing"):
        experts.config._experts_implementation = impl
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = experts(xg, idx, wg)
        y.pow(2).sum().backward()
        results[impl] = {"y": y.detach(), "x": xg.grad, "w": wg.grad,
                         **{n: p.grad.clone() for n, p in experts.named_parameters()}}
        experts.zero_grad(set_to_none=True)
    for name, ref in results["eager"].items():
        assert max_diff(results["moe_routing"][name], ref) <= 1e-5 * max(1.0, ref.abs().max().item()), name


def test_experts_empty_input():
    """No tokens (an empty micro-batch): an empty output, and zero (not missing) expert gradients."""
    model = tiny_model("qwen3_moe")
    model.set_experts_implementation("moe_routing")
    experts = model.model.layers[0].mlp.experts
    x = torch.randn(0, model.config.hidden_size, requires_grad=True)
    y = experts(x, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2))
    y.sum().backward()
    assert y.shape == (0, model.config.hidden_size)
    assert experts.gate_up_proj.grad is not None and not experts.gate_up_proj.grad.any()


def test_from_pretrained_experts_implementation(tmp_path):
    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moe_routing").eval()
    assert loaded.config._experts_implementation == "moe_routing"
    ids = token_ids()
    with torch.no_grad():
        ref = model(ids).logits
        assert max_diff(loaded(ids).logits, ref) < 1e-5


def test_experts_bf16_matches_grouped_mm():
    model = tiny_model("mixtral").to(torch.bfloat16)
    ids = token_ids()
    with torch.no_grad():
        model.set_experts_implementation("grouped_mm")
        ref = model(ids).logits
        model.set_experts_implementation("moe_routing")
        ours = model(ids).logits
    assert ours.dtype == torch.bfloat16
    assert max_diff(ours, ref) < 0.1  # both accumulate in float32; rounding of bf16 intermediates differs


# --- swap_routers ---

@pytest.mark.parametrize("family", FAMILIES)
def test_swap_topk_reproduces_the_model(family):
    """Default swap: same logits, the same recorded router logits (raw logits, not probabilities) and aux loss;
    fresh model (HF installs its recording hooks after the swap) and a model that already recorded (hooks
    installed before the swap) alike."""
    model = tiny_model(family)
    original = copy.deepcopy(model)
    ids = token_ids()
    ref, ref_g = run(original, ids, output_router_logits=True)  # installs the recording hooks on `original`
    gate_w = [g.weight.detach().clone() for g in sparse_gates(original)]
    for swapped_model, hooks_before in ((model, False), (original, True)):
        gate_classes = [type(g) for g in sparse_gates(swapped_model)]
        names = hf.swap_routers(swapped_model)
        assert len(names) == len(gate_classes)
        gates = [b.gate for b in (swapped_model.get_submodule(n) for n in names)]
        assert all(isinstance(g, RouterGate) and isinstance(g, cls) for g, cls in zip(gates, gate_classes))
        assert all(isinstance(g.router, TopKRouter) for g in gates)
        inputs = []
        handles = [g.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach())) for g in gates]
        out, grads = run(swapped_model, ids, output_router_logits=True)
        for h in handles:
            h.remove()
        assert max_diff(out.logits, ref.logits) <= 1e-5, hooks_before
        assert len(out.router_logits) == len(ref.router_logits) == len(gates), hooks_before
        for rec, ref_rec, x, w in zip(out.router_logits, ref.router_logits, inputs, gate_w):
            expected = x.reshape(-1, w.shape[1]).float() @ w.float().t()
            assert max_diff(rec, expected) < 1e-5 and max_diff(rec, ref_rec) < 1e-5
            assert max_diff(rec.sum(-1), torch.ones(rec.shape[0])) > 1e-2  # logits, not probabilities
        if family != "deepseek_v3":  # HF's DeepSeek-V3 has no aux loss
            assert abs(out.aux_loss.item() - ref.aux_loss.item()) < 1e-6
        router_grads = [n for n in grads if n.endswith("gate.router.weight")]
        assert len(router_grads) == len(gates)
        for n in router_grads:
            ref_name = n.replace("gate.router.weight", "gate.weight")
            assert max_diff(grads[n], ref_g[ref_name]) < 1e-5


def test_swap_deepseek_bias_and_controller():
    model = tiny_model("deepseek_v3")
    bias = sparse_gates(model)[0].e_score_correction_bias.clone()
    hf.swap_routers(model)
    router = model.model.layers[1].mlp.gate.router
    assert router.num_groups == 4 and router.topk_groups == 2 and router.scaling_factor == 2.5
    assert torch.equal(router.expert_bias, bias)
    model.train()
    model(token_ids()).logits.sum().backward()
    mr.step(model)  # the aux-free bias moves only when the controllers run
    assert not torch.equal(router.expert_bias, bias)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_swap_relu_rebuilds_the_block_on_moe_layer(family):
    model = tiny_model(family)
    hf_blocks = {n: b for n, b in hf_routers._sparse_blocks(model)}
    gate_w = {n: b.gate.weight.detach().clone() for n, b in hf_blocks.items()}
    names = hf.swap_routers(model, "relu")
    assert names == list(hf_blocks)
    for name in names:
        block, old = model.get_submodule(name), hf_blocks[name]
        assert isinstance(block, MoEBlock) and isinstance(block.moe.router, ReLURouter)
        assert torch.equal(block.moe.router.weight, gate_w[name])
        ex = block.moe.experts
        assert ex.w_gate.data_ptr() == old.experts.gate_up_proj.data_ptr()  # views, no copy
        assert ex.w_down.data_ptr() == old.experts.down_proj.data_ptr()
        assert (block.shared_experts is not None) == (family == "deepseek_v3")
        # the block against a float64 loop over experts on HF's own tensors
        x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            y = block(x[None])[0]
            expected = relu_block_reference(x, gate_w[name], old.experts)
            if block.shared_experts is not None:
                expected = expected + block.shared_experts(x).double()
        assert max_diff(y, expected) < 1e-5
    model.train()
    blocks = [model.get_submodule(n) for n in names]
    inputs = []
    handles = [b.register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach())) for b in blocks]
    out = model(token_ids(), output_router_logits=True)
    for h in handles:
        h.remove()
    assert len(out.router_logits) == len(names)
    for rec, x, b in zip(out.router_logits, inputs, blocks):  # the ReLU router's raw logits, negatives included
        assert max_diff(rec, x.reshape(-1, x.shape[-1]) @ b.moe.router.weight.detach().t()) < 1e-5
        assert (rec < 0).any()
    assert mr.aux_losses(model) and all("relu_l1" in v for v in mr.aux_losses(model).values())
    loss = out.logits.float().pow(2).mean() + (out.aux_loss if out.aux_loss is not None else 0)
    loss.backward()
    assert model.get_submodule(names[0]).moe.router.weight.grad.abs().sum() > 0
    mr.step(model)


def relu_block_reference(x, w_gate_ED, experts):
    """y[t] = sum over experts e with logit > 0 of relu(logit) * SwiGLU expert e (HF's [gate; up] layout)."""
    x = x.double()
    logits = x @ w_gate_ED.double().t()
    gate_up, down = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
    inter = gate_up.shape[1] // 2
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e in range(logits.shape[1]):
            if logits[t, e] > 0:
                h = gate_up[e] @ x[t]
                y[t] += logits[t, e] * (down[e] @ (torch.nn.functional.silu(h[:inter]) * h[inter:]))
    return y


def test_swapped_state_dict_round_trip():
    """A swapped model's weights reload into a freshly swapped model of the same config (the README's recipe)."""
    model, fresh = tiny_model("olmoe"), tiny_model("olmoe", seed=5)
    for m in (model, fresh):
        hf.swap_routers(m, "relu")
    assert not fresh.load_state_dict(copy.deepcopy(model.state_dict())).missing_keys
    ids = token_ids()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_swapped_variable_k_model_save_pretrained_round_trip(family, tmp_path):
    """save_pretrained after a ReLU swap writes HF's own checkpoint layout (the block's state dict is HF's: packed
    expert tensors, the router weight as the gate weight); from_pretrained + swap_routers reproduces the logits."""
    model = tiny_model(family)
    stock_keys = set(model.state_dict())
    names = hf.swap_routers(model, "relu")
    for name in names:
        with torch.no_grad():
            model.get_submodule(name).moe.router.l1_coeff.fill_(0.25)  # controller state: not in HF's block
    state = model.state_dict()
    assert stock_keys - set(state) <= {f"{n}.gate.e_score_correction_bias" for n in names}  # ReLU has no bias
    assert set(state) - stock_keys == {f"{n}.gate.{b}" for n in names for b in ("l1_coeff", "active_accum",
                                                                                  "count_accum")}
    block = model.get_submodule(names[-1])
    assert state[f"{names[-1]}.experts.gate_up_proj"].data_ptr() == block.moe.experts.w_gate.data_ptr()  # no copy
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    hf.swap_routers(loaded, "relu")
    ids = token_ids()
    with torch.no_grad():
        assert max_diff(loaded(ids).logits, model(ids).logits) <= 1e-5
    for name in names:  # the router weight came back through HF's gate weight
        assert torch.equal(loaded.get_submodule(name).moe.router.weight, model.get_submodule(name).moe.router.weight)
    fresh = tiny_model(family, seed=5)  # the full router state reloads into a swapped model
    hf.swap_routers(fresh, "relu")
    assert not fresh.load_state_dict(state).missing_keys
    assert fresh.get_submodule(names[0]).moe.router.l1_coeff.item() == 0.25


def test_swap_with_a_factory_and_with_experts_implementation():
    model = tiny_model("mixtral")
    ref = copy.deepcopy(model)
    factory = functools.partial(TopKRouter, softmax_before_topk=False)  # top-k logits then softmax: the same gates
    hf.swap_routers(model, factory)
    model.set_experts_implementation("moe_routing")
    ids = token_ids()
    with torch.no_grad():
        assert max_diff(model(ids).logits, ref(ids).logits) <= 1e-5


def test_swap_errors():
    model = tiny_model("olmoe")
    with pytest.raises(ValueError, match="router must be"):
        hf.swap_routers(model, "nope")
    with pytest.raises(ValueError, match="init_from_gate"):
        hf.swap_routers(model, HashRouter)
    with pytest.raises(TypeError, match="init_from_gate"):
        hf.swap_routers(model, init_from_gate=1)
    with pytest.raises(ValueError, match="no supported sparse MoE block"):
        hf.swap_routers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_experts"):
        hf.swap_routers(model, lambda d, e, k: TopKRouter(d, e + 1, k))


def test_readme_example_runs():
    """The "Inside Hugging Face models" example of docs/integrations.md, as written."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    section = doc.split("## Inside Hugging Face models", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "docs/integrations.md", "exec"), scope)
    assert scope["model"].config._experts_implementation == "moe_routing"
    assert torch.isfinite(scope["out"].loss)
