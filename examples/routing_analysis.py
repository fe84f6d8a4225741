"""Routing analysis of a trained ablation model: load, specialisation, cross-input divergence, an intervention,
local routing consistency (SRP / SCH) and expert-cache hit rates.

The model is a ``moe-ablate`` run: ``--run RUN_DIR`` reads one (a folder ``<out>/<router>/seed<k>`` written by
``python -m moe_routing.ablate``, byte tokenizer); without it, one run is trained first into a temporary folder
with ``python -m moe_routing.ablate --preset cpu-full --routers topk --seeds 0 --steps 150`` (4 layers; the whole
example takes about 80 s of CPU, 2 to 4 min on a loaded 2-core machine). Writes ``summary.txt``, ``summary.json`` and three small plots to ``--out`` (default
``examples/results/routing_analysis``):

    PYTHONPATH=. .venv/bin/python examples/routing_analysis.py [--run runs/ablate-quick/topk/seed0]

Input sets: held-out Shakespeare windows ("text"), the same windows upper-cased (a parallel set: sequence i is
a "translation" of text's sequence i, as FLORES sentences are in the Multilingual Routing paper) and windows
of this library's Python source ("code", unpaired).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import moe_routing as mr
from moe_routing.ablate.data import ByteTokenizer, get_batch, load_corpus
from moe_routing.ablate.load import LoadedRun, load_run, train_quick_run
from moe_routing.analysis import (collect_routing, hit_rate_curve, plot_hit_rates, plot_routing, routing_divergence,
                                  sch, srp)

ROOT = Path(__file__).resolve().parents[1]


def windows(tokens_N: torch.Tensor, n: int, seq_len: int, seed: int) -> torch.Tensor:
    return get_batch(tokens_N, n, seq_len, seed=seed, step=0)[0]


def upper(ids: torch.Tensor) -> torch.Tensor:
    """ASCII lower-case bytes upper-cased (the same length: a parallel set)."""
    return torch.where((ids >= 97) & (ids <= 122), ids - 32, ids)


def trained_run(args) -> LoadedRun:
    """The run given with ``--run``, or one trained now into a temporary folder."""
    if args.run is not None:
        return load_run(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        return load_run(train_quick_run(tmp, args.preset, args.router, args.steps))


@torch.no_grad()
def val_loss(model, x_BS, y_BS) -> float:
    return F.cross_entropy(model(x_BS).flatten(0, 1), y_BS.flatten()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a moe-ablate run folder (<out>/<router>/seed<k>); default: train one")
    parser.add_argument("--preset", default="cpu-full", help="preset of the run trained without --run")
    parser.add_argument("--steps", type=int, default=150, help="steps of the run trained without --run")
    parser.add_argument("--router", default="topk", help="router of the run trained without --run")
    parser.add_argument("--out", default=str(ROOT / "examples" / "results" / "routing_analysis"))
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    t0 = time.time()
    run = trained_run(args)
    if run.tokenizer != "byte":
        raise SystemExit(f"--run {run.run_dir}: trained with the {run.tokenizer!r} tokenizer; this example's input "
                         "sets (upper-cased bytes) need a byte-tokenised run (moe-ablate's default)")
    model, p = run.model, run.preset
    t_train = time.time() - t0
    tok = ByteTokenizer()
    corpus = load_corpus()
    val_N = tok.encode(corpus.val_docs[0])
    code_N = tok.encode("".join(f.read_text() for f in sorted((ROOT / "moe_routing" / "analysis").glob("*.py"))))

    S, N = p.seq_len, 32
    text_BS = windows(val_N, N, S, seed=1)
    upper_BS = upper(text_BS)
    code_BS = windows(code_N, N, S, seed=2)
    text, upper_set, code = (collect_routing(model, [b]) for b in (text_BS, upper_BS, code_BS))
    E, K, L = p.num_experts, p.top_k, text.num_layers

    tok_spec, pos_spec = text.specialization("token", num_values=256), text.specialization("position")
    div_upper = routing_divergence(text, upper_set)            # parallel sets: paired
    div_code = routing_divergence(text, code, paired=False)   # different corpora: unpaired
    # the paper's recipe: promote, in the middle layers, the experts most used on the reference set (text)
    recipe = mr.promote_experts(text, delta=1.0, top_n=K)
    xv, yv = get_batch(val_N, N, S, seed=3, step=0)
    xu, yu = upper(xv), upper(yv)
    with mr.intervene(model, offsets=recipe):
        upper_steered = collect_routing(model, [upper_BS])
        loss_upper_steered = val_loss(model, xu, yu)
    div_steered = routing_divergence(text, upper_steered)

    # local routing consistency and expert caching on the text set's routing (one sequence per window)
    seg = 8
    srp_L, sch_L = srp(text.experts_TLK, E, seg, text.seq_lens), sch(text.experts_TLK, E, seg, text.seq_lens)
    sizes = list(range(K, E + 1))
    curves = {f"{pol} (layer {l})": hit_rate_curve(text.experts_TLK[:, l], sizes, [pol])[pol]
              for l in (0, L - 1) for pol in ("lru", "belady")}

    out = Path(args.out)
    plot_routing(text, out, other=upper_set, kinds=("load", "divergence"))
    plot_hit_rates(sizes, curves, out / "hit_rates.png", active=K, title="Expert cache hit rate (text)")

    r = lambda t: [round(float(v), 4) for v in t]  # noqa: E731
    summary = {
        "model": run.describe() + ("" if args.run else " (trained by this run, temporary folder)"),
        "run_final_val_loss": round(run.result["final_val_loss"], 4) if run.result else None,
        "tokens_per_set": text.num_tokens,
        "expert_load_max_over_mean": r(text.expert_load().amax(1) * E),
        "token_id_specialisation_U": r(tok_spec.score_L),
        "position_specialisation_U": r(pos_spec.score_L),
        "divergence_text_vs_upper_paired": r(div_upper),
        "divergence_text_vs_code_unpaired": r(div_code),
        "intervention_recipe": {str(k): v for k, v in recipe.items()},
        "divergence_text_vs_upper_steered": r(div_steered),
        "val_loss_upper": round(val_loss(model, xu, yu), 4),
        "val_loss_upper_steered": round(loss_upper_steered, 4),
        "val_loss_text": round(val_loss(model, xv, yv), 4),
        f"srp_seg{seg}": r(srp_L),
        f"sch_seg{seg}_cache{K}": r(sch_L[:, K - 1]),
        f"sch_seg{seg}_cache{2 * K}": r(sch_L[:, 2 * K - 1]),
        "hit_rate_cache_sizes": sizes,
        "hit_rates": {k: r(v) for k, v in curves.items()},
        "seconds_train_or_load": round(t_train, 1),
        "seconds_total": round(time.time() - t0, 1),
        "cpu_seconds_total": round(time.process_time(), 1),
        "notes": "divergence is Bandarkar et al.'s JSD / (log E - mean entropy): the denominator is the room the two "
                 "distributions leave below the uniform entropy, so with balanced routers (sequence-mean weights "
                 "near uniform) it is small and the ratio measures the direction of the difference, not its "
                 "size; compare layers and input pairs of one model, not absolute values across models. "
                 "Steering boosts the promoted experts for every token, so the steered set's per-sequence "
                 "distributions can move away from the unsteered reference's; the paper judges the recipe by "
                 "task accuracy (here: validation loss on the upper-cased set).",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"{k}: {v}" for k, v in summary.items()]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
