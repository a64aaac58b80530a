"""CPU benchmark: the cost of a knockout forward against a plain forward, both families.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_knockout_cpu.py            # p = 512
    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_knockout_cpu.py --quick    # fewer rounds

Shapes: 130m widths (Mamba-1: d_model 768, d_inner 1536, d_state 16; Mamba-2:
24 heads of 64, d_state 128, 1 group, chunk 64), 4 layers, vocab 8192, batch 1,
random-init weights, ``"torch"`` backend, under ``torch.inference_mode()``.

Contenders (interleaved rounds, see ``_timing.py``):

- ``plain``: ``model(tokens)``.
- ``knockout_ssm``: ``model.run_with_knockout(tokens, Knockout(all layers, sources=
  3 subject-like positions, targets=[-1]))``: the structured S → T form, no p×p
  mask; its 3 edges per layer are few, so they are summed edge by edge (no extra scan).
- ``knockout_ssm_scan``: the same knockout forced onto the extra-scan route
  (``tl_mamba.ops.knockout.PAIRS_PER_SCANNED_POSITION`` set to 0), one scan per layer
  cropped to first source → last target: what ``knockout_ssm`` cost before the edge route.
- ``knockout_both``: the same with ``path="both"`` (the conv taps too).
- ``knockout_per_row``: a batch of 4 rows, each with its own sources (``[b, p]``
  bool masks), against ``plain_batch4``.
- ``dense_mask_hook``: the same S → T edges zeroed by a plain hook on
  ``hook_ssm_mask`` (the mask is built, p×p per head, and its column patterns found).

Target (issue "Knockout and hidden attention"): ``knockout_ssm / plain ≤ 1.5`` at p = 512.
Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/knockout_cpu``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _env import machine_info, package_revision, write_results  # noqa: E402
from _timing import interleaved  # noqa: E402

from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig, Knockout  # noqa: E402
from tl_mamba.ops import knockout as ops_knockout  # noqa: E402

TARGET = 1.5


def build(family: str):
    if family == "mamba1":
        cfg = HookedMambaConfig(n_layers=4, d_model=768, d_state=16, expand=2, d_vocab=8192, seed=0)
        return HookedMamba(cfg).set_backend("torch").eval()
    cfg = HookedMambaConfig(family="mamba2", n_layers=4, d_model=768, d_state=128, expand=2, n_heads=24, n_groups=1,
                            chunk_size=64, d_vocab=8192, seed=0)
    return HookedMamba2(cfg).set_backend("torch").eval()


def contenders(model, p: int):
    n = model.cfg.n_layers
    tokens = torch.randint(0, model.cfg.d_vocab, (1, p), generator=torch.Generator().manual_seed(0))
    batch = tokens.expand(4, p).contiguous()
    sources = [p // 3, p // 3 + 1, p // 3 + 2]
    per_row = torch.zeros(4, p, dtype=torch.bool)
    for row in range(4):
        per_row[row, [p // 5 + 7 * row, p // 2 + row]] = True
    ko_ssm = Knockout(layers=range(n), sources=sources, targets=[-1])
    ko_both = Knockout(layers=range(n), sources=sources, targets=[-1], path="both")
    ko_rows = Knockout(layers=range(n), sources=per_row, targets=[-1])

    def dense(mask, hook):
        mask[:, :, -1, sources] = 0.0
        return mask

    dense_hooks = [(f"blocks.{layer}.hook_ssm_mask", dense) for layer in range(n)]

    def knockout_by_scan():
        saved = ops_knockout.PAIRS_PER_SCANNED_POSITION
        ops_knockout.PAIRS_PER_SCANNED_POSITION = {"bpe": 0.0, "bphd": 0.0}
        try:
            return model.run_with_knockout(tokens, ko_ssm)
        finally:
            ops_knockout.PAIRS_PER_SCANNED_POSITION = saved

    return {
        "plain": lambda: model(tokens),
        "knockout_ssm": lambda: model.run_with_knockout(tokens, ko_ssm),
        "knockout_ssm_scan": knockout_by_scan,
        "knockout_both": lambda: model.run_with_knockout(tokens, ko_both),
        "dense_mask_hook": lambda: model.run_with_hooks(tokens, fwd_hooks=dense_hooks),
        "plain_batch4": lambda: model(batch),
        "knockout_per_row": lambda: model.run_with_knockout(batch, ko_rows),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--out", default="benchmarks/results/knockout_cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else args.repeats
    results = {"date": _dt.date.today().isoformat(), "machine": machine_info(), "revision": package_revision(),
               "p": args.p, "threads": args.threads, "repeats": repeats, "families": {}}
    lines = [f"# Knockout forward vs plain forward (CPU, p = {args.p}, {args.threads} thread(s))", "",
             f"{results['date']}, {results['machine'].get('cpu', '?')}, revision {results['revision']}", "",
             "| family | contender | median s | vs its plain |", "|---|---|---|---|"]
    ok = True
    for family in ("mamba1", "mamba2"):
        model = build(family)
        with torch.inference_mode():
            calls = contenders(model, args.p)
            # agreement: the structured knockout equals the dense mask hook
            diff = float((calls["knockout_ssm"]() - calls["dense_mask_hook"]()).abs().max())
            diff_routes = float((calls["knockout_ssm"]() - calls["knockout_ssm_scan"]()).abs().max())
            timings = interleaved(calls, repeats=repeats, warmup=1, log=print)
        family_result = {"structured_vs_dense_max_abs_diff": diff, "edges_vs_scan_max_abs_diff": diff_routes,
                         "median_s": {}, "ratio": {}}
        for name in calls:
            base = "plain_batch4" if name in ("plain_batch4", "knockout_per_row") else "plain"
            ratio = timings.paired_ratio(name, base)
            family_result["median_s"][name] = timings.median(name)
            family_result["ratio"][name] = ratio
            lines.append(f"| {family} | {name} | {timings.median(name):.3f} | {ratio:.2f}x |")
        met = family_result["ratio"]["knockout_ssm"] <= TARGET
        ok &= met
        family_result["target_met"] = met
        results["families"][family] = family_result
        print(f"{family}: knockout_ssm / plain = {family_result['ratio']['knockout_ssm']:.2f} "
              f"(target <= {TARGET}: {'met' if met else 'NOT met'}); structured vs dense max |diff| {diff:.2e}, "
              f"edges vs scan {diff_routes:.2e}")
    lines += ["", f"Target: knockout_ssm / plain <= {TARGET}."]
    write_results(args.out, results, "\n".join(lines))
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
