"""Every figure and number of docs/circuits.md, from the shipped toy-mamba2.

    python examples/circuit_tutorial.py --out docs/figures/circuits          # ~5 min on 2 CPU cores
    python examples/circuit_tutorial.py --out /tmp/quick --quick             # the CI smoke run

Three parts, as in the tutorial:
1. the IOI circuit with EAP-IG (head level), checked against exact edge patching;
2. knockout attribution (one backward) against brute-force knockouts;
3. head ablation on the needle task: Δ statistics by token class, per-head ablation,
   class-conditional ablation.
Writes PNGs and ``results.json`` (the numbers the tutorial quotes) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import tl_mamba  # noqa: E402
from tl_mamba.circuits import (  # noqa: E402
    Graph,
    attribute,
    class_conditional_hook_factory,
    delta_stats_by_class,
    evaluate_baseline,
    faithfulness,
    knockout_attribution,
    knockout_attribution_vs_knockout,
    logit_diff,
    needle_accuracy,
    plot_knockout_attribution,
    rank_correlation,
    task_batches,
    zero_ablation_hooks,
)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.double().flatten(), b.double().flatten()]))[0, 1])


def ioi_circuit(model, out: Path, n: int, steps: int) -> dict:
    """Part 1: EAP and EAP-IG head-level scores on IOI, against exact patching; faithfulness curves."""
    batches = task_batches(model, "ioi", n=n, seed=0)
    scores = {}
    for method, kw in (("EAP", {}), ("EAP-IG", {"ig_steps": steps}), ("exact", {})):
        graph = Graph.from_model(model, level="head")
        scores[method] = attribute(model, graph, batches, None, logit_diff, method=method, quiet=True, **kw).scores
    result = {
        "n_edges": len(graph.edges),
        "pearson_vs_exact": {m: pearson(scores[m], scores["exact"]) for m in ("EAP", "EAP-IG")},
        "spearman_vs_exact": {m: rank_correlation(scores[m], scores["exact"]) for m in ("EAP", "EAP-IG")},
    }
    sizes = [1, 2, 5, 10, 15, 20, 30, 40, 50, 60, 85]
    baselines = tuple(float(evaluate_baseline(model, batches, None, logit_diff, run_corrupted=run).mean())
                      for run in (False, True))  # clean, corrupted: shared by every point of the curves
    curves = {}
    for method in ("EAP", "EAP-IG", "exact"):
        curve = []
        for k in sizes:
            graph.scores = scores[method].clone()
            graph.apply_topn(k)
            curve.append(faithfulness(model, graph, batches, None, logit_diff, quiet=True, baselines=baselines))
        curves[method] = curve
    result["faithfulness"] = {"edges": sizes, **curves}

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for method, curve in curves.items():
        ax.plot(sizes, curve, marker="o", ms=3, label=method)
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("edges kept (top-n by score)")
    ax.set_ylabel("faithfulness")
    ax.set_title("toy-mamba2 IOI circuit: faithfulness of the top-n edges", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "ioi_faithfulness.png", dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(scores["exact"], scores["EAP"], s=8, label=f"EAP (r = {result['pearson_vs_exact']['EAP']:.2f})")
    ax.scatter(scores["exact"], scores["EAP-IG"], s=8,
               label=f"EAP-IG, {steps} steps (r = {result['pearson_vs_exact']['EAP-IG']:.2f})")
    low, high = float(scores["exact"].min()), float(scores["exact"].max())
    ax.plot([low, high], [low, high], color="grey", lw=0.5)
    ax.set_xlabel("exact edge patching (Δ logit diff)")
    ax.set_ylabel("attribution score")
    ax.set_title("head-level edges, IOI", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "ioi_eap_vs_exact.png", dpi=130)
    plt.close(fig)

    graph.scores = scores["EAP-IG"].clone()
    graph.apply_topn(20)
    result["top_edges"] = graph.top_edges(10)
    result["faithfulness_top20"] = curves["EAP-IG"][sizes.index(20)]  # the graph drawn below
    graph.to_image(out / "ioi_circuit.png", title="toy-mamba2 IOI: top 20 head-level edges by EAP-IG")
    graph.to_json(out / "ioi_circuit.json")
    return result


def knockout_part(model, out: Path, n: int) -> dict:
    """Part 2: knockout attribution for every edge, one backward, against real knockouts into the last token."""
    from collections import defaultdict

    from tl_mamba.toy import make_ioi

    # one template and name order, so that every position means the same thing in every prompt
    groups = defaultdict(list)
    for prompt in make_ioi(20 * n, seed=1, split="heldout"):
        groups[(prompt.meta["template_index"], prompt.meta["order"])].append(prompt)
    prompts = max(groups.values(), key=len)[:n]
    clean = torch.cat([model.to_tokens(p.text) for p in prompts])
    labels = torch.tensor([[model.to_single_token(p.meta["IO"]), model.to_single_token(p.meta["S"])]
                           for p in prompts])
    roles = {pos: role for role in ("IO", "S1", "S2") for pos in prompts[0].spans[role]}

    def metric(logits):
        return logit_diff(logits, labels)

    scores = knockout_attribution(model, clean, metric)  # [layer, head, p, p]
    str_tokens = [roles.get(i, word) for i, word in enumerate(model.to_str_tokens(clean[0]))]
    plot_knockout_attribution(scores, out / "knockout_attribution_layer{layer}.png", str_tokens=str_tokens,
                              title="toy-mamba2 IOI: knockout attribution (sum over heads)")
    result = {"prompts": int(clean.shape[0]), "template": prompts[0].meta["template"],
              "order": prompts[0].meta["order"], "layers": {}}
    fig, axes = plt.subplots(1, model.cfg.n_layers, figsize=(3 * model.cfg.n_layers, 3))
    attribution_all, knockout_all = [], []
    for layer, ax in enumerate(axes):
        check = knockout_attribution_vs_knockout(model, clean, metric, layer=layer)
        attribution_all.append(check.attribution)
        knockout_all.append(check.knockout)
        result["layers"][layer] = {"spearman": check.spearman, "pearson": check.pearson}
        ax.scatter(check.knockout, check.attribution, s=10)
        for j, a, k in zip(check.sources, check.attribution.tolist(), check.knockout.tolist()):
            if abs(k) > 0.25 * float(check.knockout.abs().max()):
                ax.annotate(str_tokens[j], (k, a), fontsize=6)
        ax.set_title(f"layer {layer}: ρ = {check.spearman:.2f}", fontsize=8)
        ax.set_xlabel("real knockout Δ", fontsize=7)
        if layer == 0:
            ax.set_ylabel("attribution", fontsize=7)
    fig.suptitle("edges j → last token: knockout attribution vs real knockout", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "knockout_attribution_vs_real.png", dpi=130)
    plt.close(fig)
    result["spearman_pooled"] = rank_correlation(torch.cat(attribution_all), torch.cat(knockout_all))
    return result


def needle_part(model, out: Path, n: int, length: int) -> dict:
    """Part 3: which heads the needle retrieval needs, and at which token class."""
    from tl_mamba.toy import make_needle

    prompts = make_needle(32, seed=3, length=length)
    tokens = torch.cat([model.to_tokens(p.text) for p in prompts])
    digits = [model.to_single_token(str(d)) for d in range(10)]
    classes = {"bos": "bos", "value digits": digits, "key": [model.to_single_token("key")]}
    stats = delta_stats_by_class(model, tokens, classes, progress=False)
    by_head = stats.pivot_table(index=["layer", "head"], columns="class", values="rel_delta")

    base = needle_accuracy(model, lengths=(length,), n=n, seed=5, progress=False)[length]
    L, H = model.cfg.n_layers, model.cfg.n_heads
    ablated = torch.zeros(L, H)
    for layer in range(L):
        for head in range(H):
            hooks = zero_ablation_hooks(model, "y", layers=[layer], heads=[head])
            ablated[layer, head] = needle_accuracy(model, lengths=(length,), n=n, seed=5, fwd_hooks=hooks,
                                                   progress=False)[length]
    flat = sorted(((float(ablated[l, h]), l, h) for l in range(L) for h in range(H)))
    critical = [(l, h) for _, l, h in flat[:3]]

    conditional = {}
    for name, token_class in (("bos", "bos"), ("value digits", digits), ("key", classes["key"])):
        factory = class_conditional_hook_factory(model, {l: [h for ll, h in critical if ll == l]
                                                         for l in {l for l, _ in critical}},
                                                 token_class=token_class, hook="delta", kind="zero")
        conditional[name] = needle_accuracy(model, lengths=(length,), n=n, seed=5, fwd_hooks=factory,
                                            progress=False)[length]

    fig, ax = plt.subplots(figsize=(5, 2.8))
    image = ax.imshow(ablated, cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    for l in range(L):
        for h in range(H):
            ax.text(h, l, f"{float(ablated[l, h]):.2f}", ha="center", va="center", fontsize=6,
                    color="white" if ablated[l, h] < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="needle accuracy")
    ax.set_title(f"needle @ {length} tokens with one head's hook_y zeroed (clean {base:.2f})", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "needle_head_ablation.png", dpi=130)
    plt.close(fig)

    return {
        "length": length, "n": n, "clean_accuracy": base,
        "head_ablation": ablated.tolist(),
        "critical_heads": critical,
        "class_conditional_delta_zero": conditional,
        "rel_delta_of_critical_heads": {f"{l}.{h}": {c: float(by_head.loc[(l, h), c]) for c in by_head.columns}
                                        for l, h in critical},
        "max_rel_delta_bos": float(by_head["bos"].max()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/figures/circuits")
    parser.add_argument("--quick", action="store_true", help="few prompts (a smoke run: numbers are noisy)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = tl_mamba.from_pretrained("toy-mamba2")
    quick = args.quick
    results = {
        "model": "toy-mamba2",
        "ioi_circuit": ioi_circuit(model, out, n=16 if quick else 64, steps=2 if quick else 5),
        "knockout_attribution": knockout_part(model, out, n=8 if quick else 32),
        "needle": needle_part(model, out, n=8 if quick else 64, length=64 if quick else 128),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
