"""Test-time rerouting on a trained ablation model (a ``moe-ablate`` run: TinyLM, byte Shakespeare).

``--run RUN_DIR`` reads a run folder (``<out>/<router>/seed<k>`` written by ``python -m moe_routing.ablate``, byte
tokenizer, a gated softmax router such as topk); without it one is trained first into a temporary folder with
``python -m moe_routing.ablate --preset quick --routers topk --seeds 0 --steps 150`` (D=64, L=2, E=8, k=2).

1. Online rerouting ("Rewiring Experts on the Fly", arXiv 2510.14853): perplexity of held-out text (validation
   plays) with and without additive router-logit vectors adapted on the context: at prefill only, and online
   (re-adapted every `--interval` revealed tokens, teacher forced, as generation would).
2. R2-T2 (arXiv 2502.20395) on a next-byte classification task: accuracy on held-out windows before and after
   re-routing the last MoE layer toward correctly handled training windows (kernel regression, NGD, mode finding).
3. A short greedy and a seeded sampled generation with the online rerouter.

Numbers go to examples/results/online_rerouting.json. About a minute on one quiet CPU core:
``PYTHONPATH=. .venv/bin/python examples/online_rerouting.py [--run runs/ablate-quick/topk/seed0]``.
"""
from __future__ import annotations

import argparse
from contextlib import nullcontext
import json
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_routing.ablate.data import ByteTokenizer, get_batch, load_corpus
from moe_routing.ablate.load import LoadedRun, load_run, train_quick_run
from moe_routing.rerouting import OnlineRerouter, build_reference, generate, r2t2

RESULTS = Path(__file__).resolve().parent / "results"


def trained_run(args) -> LoadedRun:
    """The run given with ``--run``, or one trained now into a temporary folder."""
    if args.run is not None:
        return load_run(args.run)
    with tempfile.TemporaryDirectory() as tmp:
        return load_run(train_quick_run(tmp, args.preset, "topk", args.train_steps))


def continuation_nll(model, window_S, context, rerouter=None, interval=0):
    """Summed NLL and count of the tokens after ``context`` in ``window_S``; with a rerouter: adapted on the
    context, then (``interval`` > 0) again after every ``interval`` revealed tokens."""
    ids = window_S[None]
    total, count = 0.0, 0
    if rerouter is not None:
        rerouter.reset()
        rerouter.adapt(ids[:, :context])
    pos = context
    while pos < ids.shape[1]:
        end = ids.shape[1] if not interval else min(ids.shape[1], pos + interval)
        with torch.no_grad(), (rerouter.applied() if rerouter is not None else nullcontext()):
            logits = model(ids[:, :end])[0, pos - 1:end - 1]
        total += float(F.cross_entropy(logits, ids[0, pos:end], reduction="sum"))
        count += end - pos
        pos = end
        if rerouter is not None and interval and pos < ids.shape[1]:
            rerouter.adapt(ids[:, :pos])
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a moe-ablate run folder (<out>/<router>/seed<k>); default: train one")
    parser.add_argument("--preset", default="quick", help="preset of the run trained without --run")
    parser.add_argument("--train-steps", type=int, default=150, help="steps of the run trained without --run")
    parser.add_argument("--windows", type=int, default=24, help="held-out windows for the perplexity")
    parser.add_argument("--interval", type=int, default=8)
    parser.add_argument("--test", type=int, default=24, help="held-out windows for R2-T2")
    parser.add_argument("--lr", type=float, default=0.02, help="learning rate of the rerouting vectors")
    parser.add_argument("--steps", type=int, default=3, help="optimisation steps per adaptation")
    parser.add_argument("--reference", type=int, default=256, help="labelled windows for R2-T2's reference set")
    parser.add_argument("--out", type=Path, default=RESULTS / "online_rerouting.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.time()
    corpus = load_corpus()
    tok = ByteTokenizer()
    train_tokens = tok.encode("\n\n".join(corpus.train_docs)[:400_000])
    val_tokens = tok.encode("\n\n".join(corpus.val_docs)[:100_000])
    run = trained_run(args)
    if run.tokenizer != "byte":
        raise SystemExit(f"--run {run.run_dir}: trained with the {run.tokenizer!r} tokenizer; this example encodes "
                         "bytes (moe-ablate's default tokenizer)")
    model, p = run.model, run.preset
    last = p.n_layers - 1
    results = {"model": run.describe() + ("" if args.run else " (trained by this run, temporary folder)"),
               "run_final_val_loss": round(run.result["final_val_loss"], 4) if run.result else None,
               "seconds_train_or_load": round(time.time() - t0, 1)}

    # 1. perplexity of held-out continuations
    windows, _ = get_batch(val_tokens, args.windows, p.seq_len, seed=-7, step=0)
    context = p.seq_len // 2
    settings = {"base": None,
                "prefill": OnlineRerouter(model, "confidence", num_layers=1, steps=args.steps, lr=args.lr, interval=0),
                "online": OnlineRerouter(model, "confidence", num_layers=1, steps=args.steps, lr=args.lr,
                                         interval=args.interval)}
    ppl = {}
    for name, rr in settings.items():
        nll = n = 0
        for w in windows:
            a, b = continuation_nll(model, w, context, rr, rr.interval if rr is not None else 0)
            nll, n = nll + a, n + b
        ppl[name] = round(math.exp(nll / n), 4)
    results["perplexity"] = {**ppl, "context_tokens": context, "continuation_tokens": p.seq_len - context,
                             "windows": args.windows, "interval": args.interval, "steps": args.steps, "lr": args.lr,
                             "change_prefill_pct": round(100 * (ppl["prefill"] / ppl["base"] - 1), 3),
                             "change_online_pct": round(100 * (ppl["online"] / ppl["base"] - 1), 3)}

    # 2. R2-T2 on next-byte classification (window of 32 bytes -> the next byte)
    S = 32
    ref_x, ref_y = get_batch(train_tokens, args.reference, S, seed=1, step=0)
    test_x, test_y = get_batch(val_tokens, args.test, S, seed=2, step=0)
    ref = build_reference(model, ref_x, ref_y[:, -1], layers=[last])
    with torch.no_grad():
        base_acc = float((model(test_x)[:, -1].argmax(-1) == test_y[:, -1]).float().mean())
    r2 = {"layer": last, "reference_correct": int(ref.inputs.shape[0]), "reference_total": args.reference, "test": args.test,
          "accuracy_base": base_acc}
    for strategy in ("kernel", "ngd", "mode"):
        out = r2t2(model, test_x, ref, strategy=strategy, num_neighbors=5, search_steps=4)
        r2[f"accuracy_{strategy}"] = float((out.output[:, -1].argmax(-1) == test_y[:, -1]).float().mean())
        r2[f"mean_abs_routing_change_{strategy}"] = float((out.routing_BLPE - out.initial_routing_BLPE).abs().mean())
    results["r2t2"] = r2

    # 3. generations
    prompt = tok.encode("ROMEO:\nWhat light")[None]
    rr = OnlineRerouter(model, "confidence", num_layers=1, steps=args.steps, lr=args.lr, interval=16)
    texts = {}
    for name, kw in (("greedy", {}), ("greedy_rerouted", {"rerouter": rr}),
                     ("sampled_seed0", {"greedy": False, "temperature": 0.8, "seed": 0})):
        ids = generate(model, prompt, 48, **kw)
        texts[name] = bytes(ids[0].tolist()).decode("utf-8", errors="replace")
    results["generations"] = texts
    results["seconds"] = round(time.time() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "generations"}, indent=2))


if __name__ == "__main__":
    main()
