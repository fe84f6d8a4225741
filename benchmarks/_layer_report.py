"""Markdown reports of bench_layer.py's results: the main table (``markdown``) and the fine-grained-expert sweep
(``fine_markdown``: the layer against the balanced-expert floor as E grows at fixed active compute)."""
from __future__ import annotations


def markdown(payload: dict) -> str:
    m, c = payload["machine"], payload["config"]
    lines = [f"MoELayer fwd+bwd, T={c['T']}, D={c['D']}, F={c['F']}, k={c['k']}, fp32, median of {c['rounds']} "
             f"interleaved rounds. {payload['date']}; {m['nproc']} CPUs ({m['cpu_model']}), torch {m['torch']} "
             f"({m['torch_threads']} threads), transformers {m['transformers'] or 'not installed'}.", "",
             "| E | variant | median s | min s | MoE / variant | paired | peak MB | of which grads MB | saved MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for E, res in payload["results"].items():
        ratios = res.get("moe_over", {})
        for n, v in res["variants"].items():
            label = f"{n} (floor)" if n == res.get("floor") else n
            r = ratios.get(n)
            rs = ("1.00x", "1.00x") if n == "moe" else ((f"{r['of_medians']:.2f}x", f"{r['paired']:.2f}x")
                                                        if r else ("-", "-"))
            mem = ((f"{v['peak_mb']:.0f}", f"{v['grads_mb']:.0f}", f"{v['saved_mb']:.0f}") if "peak_mb" in v
                   else ("-", "-", "-"))
            lines.append(f"| {E} | {label} | {v['median_s']:.3f} | {v['min_s']:.3f} | {rs[0]} | {rs[1]} | "
                         + " | ".join(mem) + " |")
    lines += ["", "MoE / variant: ratio of medians; paired: median of per-round ratios. peak MB: peak of tensors "
              "allocated during one fwd+bwd (torch.profiler CPU allocator events), including the new weight and "
              "input gradients (grads MB); saved MB: activations autograd keeps for backward. Targets (issue): "
              "MoE <= 1.15x the floor, MoE <= 1.00x hf_grouped."]
    for E, res in payload["results"].items():
        r = res.get("moe_over", {})
        parts = [f"routing load max/mean {res['load_max_over_mean']:.2f}"]
        if "floor" in r:
            f = r["floor"]["of_medians"]
            parts.append(f"MoE/floor {f:.2f}x ({'met' if f <= 1.15 else 'missed'})")
        if "hf_grouped" in r:
            h = r["hf_grouped"]["of_medians"]
            parts.append(f"MoE/hf_grouped {h:.2f}x ({'met' if h <= 1.0 else 'missed'})")
        if "dense" in r:
            parts.append(f"MoE/dense {r['dense']['of_medians']:.2f}x")
        lines.append(f"- E={E}: " + "; ".join(parts))
    return "\n".join(lines)


def fine_markdown(payload: dict) -> str:
    m, c = payload["machine"], payload["config"]
    load = payload.get("load_before", [0.0]), payload.get("load_after", [0.0])
    lines = [f"MoELayer fwd+bwd against the balanced-expert floor, fine-grained experts: T={c['T']}, D={c['D']}, "
             f"F={c['F']}, k={c['k']}, fp32, default losses (SwitchAuxLoss) and stats, median of {c['rounds']} "
             f"interleaved rounds. {payload['date']}; {m['nproc']} CPUs ({m['cpu_model']}), torch {m['torch']} "
             f"({m['torch_threads']} threads); load average {load[0][0]:.1f} before, {load[1][0]:.1f} after; "
             f"moe_routing at {payload.get('library_commit') or 'unknown commit'}.", "",
             "| E | rows/expert | moe ms | floor ms | floor | moe / floor | paired | CPU moe / floor | router GEMM ms "
             "| same-loads floor ms | uneven-load cost | routing overhead | CPU routing overhead | moe / HF "
             "| load max/mean |",
             "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratio, overhead = {}, {}
    for E, res in payload["results"].items():
        v, f = res["variants"], res.get("floor")
        if "moe" not in v or f is None:
            continue
        r = res["moe_over"]["floor"]
        ratio[int(E)] = r["of_medians"]
        g, same = v.get("router_gemm"), v.get("floor_same_loads")
        cells = ["-"] * 4
        if g is not None:
            cells[0] = f"{g['median_s'] * 1e3:.1f}"
        if same is not None:
            cells[1] = f"{same['median_s'] * 1e3:.0f}"
            cells[2] = f"{same['median_s'] / v[f]['median_s']:.3f}x"
        if g is not None and same is not None:
            overhead[int(E)] = v["moe"]["median_s"] / (same["median_s"] + g["median_s"])
            cpu = v["moe"]["cpu_median_s"] / (same["cpu_median_s"] + g["cpu_median_s"])
            cells[3] = f"{overhead[int(E)]:.3f}x | {cpu:.3f}x"
        else:
            cells[3] = "- | -"
        hf = res["moe_over"].get("hf_grouped", {}).get("of_medians")
        lines.append(f"| {E} | {c['T'] * c['k'] // int(E)} | {v['moe']['median_s'] * 1e3:.0f} | "
                     f"{v[f]['median_s'] * 1e3:.0f} | {f} | {r['of_medians']:.3f}x | {r['paired']:.3f}x | "
                     f"{r['cpu_of_medians']:.3f}x | {' | '.join(cells)} | "
                     f"{'-' if hf is None else f'{hf:.3f}x'} | {res['load_max_over_mean']:.2f} |")
    lines += ["", "floor: the faster (lower median) of floor_bmm and floor_grouped, the expert matmuls alone with "
              "exactly T*k/E rows per expert and no routing. moe / floor: ratio of wall-time medians; paired: median "
              "of per-round ratios; CPU: ratio of process-CPU-time medians (with 1 thread the least disturbed by "
              "other jobs on a shared machine). router GEMM: the router's x @ W^T forward and backward alone "
              "(T*E*D work that grows with E, which any dense router does and the floor leaves out). same-loads "
              "floor: the grouped expert matmuls with the router's actual per-expert rows (load max/mean) instead "
              "of T*k/E each; uneven-load cost = same-loads floor / floor, the GEMM efficiency an uneven split "
              "loses (set by the router's decisions, not by the layer's code). routing overhead = moe / (same-loads "
              "floor + router GEMM): everything the layer adds beyond its unavoidable matmuls (softmax, top-k, "
              "aux loss, stats, sort, permute, combine, metadata). moe / HF: against Hugging Face's Qwen3-MoE "
              "block (grouped_mm experts, same weights and routing; no aux loss or stats) in the same rounds."]
    if 8 in ratio:
        for E in sorted(e for e in ratio if e > 8):
            verdict = "met" if ratio[E] <= ratio[8] else "missed"
            line = f"- E={E}: moe/floor {ratio[E]:.3f}x vs {ratio[8]:.3f}x at E=8 (goal: no higher; {verdict})"
            if E in overhead and 8 in overhead:
                ok = "no higher" if overhead[E] <= overhead[8] else "higher"
                line += f"; routing overhead {overhead[E]:.3f}x vs {overhead[8]:.3f}x ({ok})"
            lines.append(line)
    return "\n".join(lines)
