"""CPU benchmark of HookedMamba2 (Mamba-2) against transformers and the TransformerLens 4.x bridge.

Run from the repository root (no network needed; every model is random-init):

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_mamba2_cpu.py            # full, p = 256 and 1024
    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_mamba2_cpu.py --quick    # p = 256, fewer repeats

Shapes: mamba2-130m widths (d_model 768, d_inner 1536, 24 heads of 64, d_state 128,
1 group, d_conv 4, chunk_size 256 in the transformers config), 4 layers, vocab 8192
by default (``--vocab``), batch 1. The three models hold the same weights; logits
(and the SSM states) are checked to agree before anything is timed. Everything runs
under ``torch.inference_mode()``.

Contenders, per sequence length p, in two interleaved groups:

light (``--repeats`` rounds; ``--warmup`` extra warm-up calls, default none):

- ``hf_forward``: ``hf_model(tokens)`` (transformers' torch path: with no
  mamba_ssm / kernels it runs ``mamba2_chunk_scan``, the chunked SSD form in torch,
  at its config's chunk_size).
- ``ours_forward``: ``model(tokens)`` with ``model.set_backend("torch")`` at the
  chunk size the model was loaded with (``model.cfg.chunk_size``: the torch backend's
  default, ``tl_mamba.ops.ssd.chunked.DEFAULT_CHUNK``, since 2026-12-05; the checkpoint's
  256, at which transformers runs, is kept as ``cfg.checkpoint_chunk_size``; before, it
  was the model's too).
- ``ours_forward_chunk{L}``: the same with ``model.cfg.chunk_size = L`` for the
  other ``--chunk-sizes`` (read at each forward; results do not depend on it).
- ``ours_cache``: ``model.run_with_cache(tokens)`` (default names_filter: every
  hook except the heavy ``hook_h`` / ``hook_ssm_mask``).
- ``bridge_forward``: ``bridge(tokens)``, TransformerBridge default path.
- ``bridge_cache``: ``bridge.run_with_cache(tokens)`` (every bridge hook).

heavy (``--heavy-repeats`` rounds, the first of them the agreement check's calls):

- ``ours_cache_h``: ``model.run_with_cache(tokens, names_filter=<hook_h of the
  state layers>)``: the states ``[b, p, h, hd, n]`` of every state layer.
- ``bridge_cache_state``: ``eager_scan = True`` on the state layers' mixers, then
  ``bridge.run_with_cache(tokens, use_cache=False, names_filter=<hook_ssm_state of
  those layers>)``, the bridge's only way to expose the Mamba-2 state.

State layers: all by default (``--state-layers``). At p = 1024 one layer's states
take 1024·24·64·128·4 B = 805 MB.

Warm-up: at each length the agreement check runs every code path once before
the light group is timed (transformers, ours at every chunk size, both caches,
the bridge's default cache), so that group gets no extra warm-up calls by
default. The heavy calls take seconds each and write gigabytes of fresh
tensors every time, so they get none: the agreement check's two heavy calls
(timed) are their first round.

Threads: one by default (``--threads``), as in ``bench_mamba1_cpu.py`` (see the README).

There are no targets for Mamba-2; the script reports ratios only. Writes
``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/mamba2_cpu``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import pathlib
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from _setup import Mamba2Shapes, build_bridge, build_hf_mamba2, build_ours, set_eager_scan  # noqa: E402
from _timing import Timings, interleaved, timed_call  # noqa: E402
from _env import machine_info, package_revision, write_results  # noqa: E402

# Logits must agree to 1e-4 relative to the largest logit (as for Mamba-1). Random-init
# logits here reach |15.5|; fp32 rounding alone moves them by ~2e-4 at p = 1024
# (transformers' own fp32 logits against the same model in float64).
LOGIT_RTOL = 1e-4
STATE_RTOL = 1e-4  # our hook_h vs the bridge's hook_ssm_state, relative to the largest state

HEADLINE = [
    # (label, numerator, denominator); "ours_forward_best" is the fastest chunk size at that length
    ("forward vs transformers", "ours_forward", "hf_forward"),
    ("forward at the fastest chunk size vs transformers", "ours_forward_best", "hf_forward"),
    ("run_with_cache vs forward", "ours_cache", "ours_forward"),
    ("cache hook_h vs bridge eager-scan cache", "ours_cache_h", "bridge_cache_state"),
    ("run_with_cache vs bridge run_with_cache", "ours_cache", "bridge_cache"),
]
CONTEXT = [
    ("bridge forward vs transformers", "bridge_forward", "hf_forward"),
    ("bridge run_with_cache vs bridge forward", "bridge_cache", "bridge_forward"),
    ("cache hook_h vs forward", "ours_cache_h", "ours_forward"),
    ("bridge eager-scan cache vs bridge forward", "bridge_cache_state", "bridge_forward"),
]


def _state_filter(suffix: str, layers):
    names = {f"blocks.{layer}.{suffix}" for layer in layers}
    return lambda name: name in names


def _nbytes(cache) -> int:
    return sum(v.numel() * v.element_size() for v in cache.values())


def bridge_hooks(bridge) -> dict:
    """The hook names of the bridge's block 0, aliases included."""
    return {"block0": sorted(n for n in bridge.hook_dict if n.startswith("blocks.0."))}


def check_agreement(hf, ours, bridge, tokens, chunk_sizes, state_layers, heavy, log):
    """Logits of all three (ours at every chunk size, the bridge's plain and eager paths), and hook_h vs hook_ssm_state.

    ``heavy``: the heavy contenders (``heavy_contenders``), called once each, timed.
    Returns ``(agreement, Timings holding that first heavy round)``.
    """
    p = tokens.shape[1]
    ref = hf(tokens).logits
    out = {"p": p, "max_abs_logit": ref.abs().max().item(), "ours_vs_hf_logits": {}}
    tol = LOGIT_RTOL * max(1.0, out["max_abs_logit"])
    loaded = ours.cfg.chunk_size
    try:
        for chunk in chunk_sizes:
            ours.cfg.chunk_size = chunk
            out["ours_vs_hf_logits"][str(chunk)] = (ours(tokens) - ref).abs().max().item()
    finally:
        ours.cfg.chunk_size = loaded
    set_eager_scan(bridge, False)
    bridge_logits, bridge_cache = bridge.run_with_cache(tokens)
    out["bridge_vs_hf_logits"] = (bridge_logits - ref).abs().max().item()
    out["bridge_cache_tensors"], out["bridge_cache_bytes"] = len(bridge_cache), _nbytes(bridge_cache)
    out["bridge_cache_hooks_block0"] = sorted(n for n in bridge_cache if n.startswith("blocks.0."))
    del bridge_cache
    ours_logits, ours_cache = ours.run_with_cache(tokens)
    out["ours_cache_vs_hf_logits"] = (ours_logits - ref).abs().max().item()
    out["ours_cache_tensors"], out["ours_cache_bytes"] = len(ours_cache), _nbytes(ours_cache)
    del ours_cache

    first_round = Timings()
    (bridge_logits, bridge_cache), *measured = timed_call(heavy["bridge_cache_state"])
    first_round.add("bridge_cache_state", *measured)
    out["bridge_eager_vs_hf_logits"] = (bridge_logits - ref).abs().max().item()
    (ours_logits, ours_cache), *measured = timed_call(heavy["ours_cache_h"])
    first_round.add("ours_cache_h", *measured)
    out["ours_cache_h_vs_hf_logits"] = (ours_logits - ref).abs().max().item()
    out["states_bytes"] = _nbytes(ours_cache)
    # ours: blocks.{l}.hook_h [b, p, h, hd, n]; bridge: blocks.{l}.mixer.hook_ssm_state [b, p, h, hd, n]
    diffs, scales = [], []
    for layer in state_layers:
        h = ours_cache[f"blocks.{layer}.hook_h"]
        s = bridge_cache[f"blocks.{layer}.mixer.hook_ssm_state"]
        if h.shape != s.shape:
            raise AssertionError(f"layer {layer}: hook_h {tuple(h.shape)} vs bridge hook_ssm_state {tuple(s.shape)}")
        diffs.append((h - s).abs().max().item())
        scales.append(h.abs().max().item())
    del ours_cache, bridge_cache
    out["state_layers"] = list(state_layers)
    out["state_max_abs_diff_per_layer"] = diffs
    out["state_max_abs_per_layer"] = scales
    log(
        f"  p={p}: |ours-hf| logits by chunk "
        + ", ".join(f"{c}: {d:.2e}" for c, d in out["ours_vs_hf_logits"].items())
        + f"; |bridge-hf| {out['bridge_vs_hf_logits']:.2e}, |bridge eager-hf| {out['bridge_eager_vs_hf_logits']:.2e}"
        f" (max |logit| {out['max_abs_logit']:.1f}); |hook_h - hook_ssm_state| per layer "
        f"{', '.join(f'{d:.1e}' for d in diffs)} (state max {max(scales):.1f})"
    )
    worst = max(out["ours_vs_hf_logits"].values())
    if worst > tol:
        raise AssertionError(f"ours vs transformers logits differ by {worst:.3e} > {tol:.3e}")
    for key in ("ours_cache_vs_hf_logits", "ours_cache_h_vs_hf_logits", "bridge_eager_vs_hf_logits"):
        if out[key] > tol:
            raise AssertionError(f"{key} = {out[key]:.3e} > {tol:.3e}")
    if max(d / max(s, 1e-6) for d, s in zip(diffs, scales)) > STATE_RTOL:
        raise AssertionError(f"our hook_h and the bridge's hook_ssm_state disagree: {diffs}")
    return out, first_round


def light_contenders(hf, ours, bridge, tokens, chunk_sizes) -> dict:
    loaded = ours.cfg.chunk_size

    def at_chunk(chunk):
        def run():
            ours.cfg.chunk_size = chunk
            try:
                return ours(tokens)
            finally:
                ours.cfg.chunk_size = loaded

        return run

    def bridge_forward():
        set_eager_scan(bridge, False)
        return bridge(tokens)

    def bridge_cache():
        set_eager_scan(bridge, False)
        return bridge.run_with_cache(tokens)

    c = {"hf_forward": lambda: hf(tokens), "ours_forward": lambda: ours(tokens)}
    for chunk in chunk_sizes:
        if chunk != loaded:
            c[f"ours_forward_chunk{chunk}"] = at_chunk(chunk)
    c["ours_cache"] = lambda: ours.run_with_cache(tokens)
    c["bridge_forward"] = bridge_forward
    c["bridge_cache"] = bridge_cache
    return c


def heavy_contenders(ours, bridge, tokens, state_layers) -> dict:
    h_filter = _state_filter("hook_h", state_layers)
    state_filter = _state_filter("mixer.hook_ssm_state", state_layers)

    def bridge_cache_state():
        set_eager_scan(bridge, True, state_layers)
        try:
            return bridge.run_with_cache(tokens, use_cache=False, names_filter=state_filter)
        finally:
            set_eager_scan(bridge, False)

    return {
        "ours_cache_h": lambda: ours.run_with_cache(tokens, names_filter=h_filter),
        "bridge_cache_state": bridge_cache_state,
    }


def ratio_row(label, num, den, p, groups) -> dict:
    """Paired ratio when both contenders ran in the same group, else the ratio of medians (``paired`` None)."""
    for t in groups:
        if num in t.samples and den in t.samples:
            return {"label": label, "num": num, "den": den, "p": p, "ratio": t.paired_ratio(num, den),
                    "ratio_of_medians": t.median(num) / t.median(den),
                    "ratio_of_best": t.best(num) / t.best(den),
                    "cpu_ratio": t.paired_ratio(num, den, cpu=True), "paired": True}
    tn = next(t for t in groups if num in t.samples)
    td = next(t for t in groups if den in t.samples)
    return {"label": label, "num": num, "den": den, "p": p, "ratio": tn.median(num) / td.median(den),
            "ratio_of_medians": tn.median(num) / td.median(den), "ratio_of_best": tn.best(num) / td.best(den),
            "cpu_ratio": tn.cpu_median(num) / td.cpu_median(den), "paired": False}


def _mb(value) -> str:
    return "–" if value is None else f"{value / 1e6:,.0f}"


def render(results: dict) -> str:
    """Markdown: agreement, medians and memory, ratios, bridge hooks, then the profile."""
    lines = []
    info = results["machine"]
    threads = info["torch_threads"]
    env = ", ".join(f"{k}={v}" for k, v in info["env"].items())
    shapes = results["shapes"]
    lines.append(
        f"Machine: {info['cpu']}, {info['logical_cpus']} logical CPUs, torch {info['torch']} "
        f"({threads} intra-op thread{'' if threads == 1 else 's'}), transformers {info['transformers']}, "
        f"transformer-lens {info['transformer_lens']}. "
        + (f"Environment: {env}. " if env else "")
        + f"d_model {shapes['d_model']}, {shapes['n_heads']} heads of {shapes['d_head']}, d_state "
        f"{shapes['d_state']}, {shapes['n_groups']} group, vocab {shapes['vocab']}, {shapes['n_layers']} layers, "
        f"transformers chunk_size {shapes['chunk_size']}, batch 1. Light group: {results['repeats']} interleaved "
        f"round{'s' if results['repeats'] != 1 else ''} after the agreement check's calls"
        + (f" and {results['warmup']} warm-up call(s)" if results["warmup"] else "")
        + f"; heavy group: {results['heavy_repeats']} round{'s' if results['heavy_repeats'] != 1 else ''}, "
        "the first the agreement check's calls"
        + f". States cached for layers {results['state_layers']}. 1-minute load average "
        f"{results['loadavg_1min']['start']:.1f} at the start, {results['loadavg_1min']['end']:.1f} at the end."
    )
    lines.append("")
    lines.append("Agreement (max |Δ| against transformers' logits; the states against the bridge's):")
    lines.append("")
    lines.append("| p | max \\|logit\\| | ours, by chunk size | ours `run_with_cache` | ours caching `hook_h` | "
                 "bridge | bridge eager | \\|hook_h − hook_ssm_state\\| / max state |")
    lines.append("|---:|---:|---|---:|---:|---:|---:|---:|")
    for a in results["agreement"]:
        by_chunk = ", ".join(f"{c}: {d:.1e}" for c, d in a["ours_vs_hf_logits"].items())
        rel = max(d / s for d, s in zip(a["state_max_abs_diff_per_layer"], a["state_max_abs_per_layer"]))
        lines.append(f"| {a['p']} | {a['max_abs_logit']:.1f} | {by_chunk} | {a['ours_cache_vs_hf_logits']:.1e} | "
                     f"{a['ours_cache_h_vs_hf_logits']:.1e} | {a['bridge_vs_hf_logits']:.1e} | "
                     f"{a['bridge_eager_vs_hf_logits']:.1e} | {rel:.1e} |")
    lines.append("")
    lengths = [str(p) for p in results["lengths"]]
    lines.append("| contender | " + " | ".join(f"p={p} median ms (best, ±spread) | peak MB" for p in lengths) + " |")
    lines.append("|---|" + "---:|---:|" * len(lengths))
    names = []
    for p in lengths:
        for group in ("light", "heavy"):
            for name in results["timings"][p][group]["median_s"]:
                if name not in names:
                    names.append(name)
    for name in names:
        cells = []
        for p in lengths:
            group = next((g for g in results["timings"][p].values() if name in g["median_s"]), None)
            if group is None:
                cells += ["–", "–"]
                continue
            t, best, spread = group["median_s"][name], group["best_s"][name], group["spread"][name]
            cells.append(f"{t * 1e3:,.0f} ({best * 1e3:,.0f}, ±{spread * 50:.0f}%)")
            cells.append(_mb(group["peak_bytes_median"][name]))
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("(best: the fastest round; ±: half the max−min range over rounds, as a share of the median; "
                 "peak MB: median over rounds of the call's peak resident memory above that at its start; memory "
                 "the allocator kept from earlier calls and reused is not counted, hence the zeros.)")
    lines.append("")
    for a in results["agreement"]:
        lines.append(
            f"p={a['p']}: our default cache holds {a['ours_cache_tensors']} tensors, "
            f"{a['ours_cache_bytes'] / 1e6:,.0f} MB; the bridge's {a['bridge_cache_tensors']}, "
            f"{a['bridge_cache_bytes'] / 1e6:,.0f} MB; the cached states {a['states_bytes'] / 1e6:,.0f} MB. "
            f"Fastest chunk size for our forward: {results['fastest_chunk'][str(a['p'])]}."
        )
    lines.append("")
    lines.append("Ratios: `paired` is the median over rounds of the two contenders' times in the same round; "
                 "`best` the ratio of their fastest rounds; `cpu` the paired ratio of process CPU time. Rows "
                 "marked * compare contenders of different groups: there `paired` is the ratio of medians and "
                 "`cpu` that of CPU-time medians.")
    lines.append("")
    for title, rows in (("ratio", results["ratios"]), ("context", results["context"])):
        lines.append(f"| {title} | p | paired | best | cpu |")
        lines.append("|---|---:|---:|---:|---:|")
        for row in rows:
            star = "" if row["paired"] else " *"
            num = row.get("num_resolved", row["num"])
            lines.append(f"| {row['label']} (`{num}` / `{row['den']}`){star} | {row['p']} | {row['ratio']:.3f} | "
                         f"{row['ratio_of_best']:.3f} | {row['cpu_ratio']:.3f} |")
        lines.append("")
    hooks = results.get("bridge_hooks", {}).get("block0")
    if hooks:
        lines.append("The bridge's hooks on block 0 (aliases included): " + ", ".join(f"`{h}`" for h in hooks) + ".")
        lines.append("")
    prof = results.get("profile")
    if prof:
        from _profile import MAMBA2_CATEGORIES, SSD_PARTS, SSD_STATE_PARTS

        lines.append(f"Where the time goes at p={prof['p']} (wall ms; `ours_forward`: median of "
                     f"{prof['repeats']} calls; caching `hook_h` of layers {prof['cache_h_layers']}: "
                     f"median of {prof['cache_h_repeats']}):")
        lines.append("")
        lines.append("| part | `ours_forward` | share | caching `hook_h` | share |")
        lines.append("|---|---:|---:|---:|---:|")
        fwd, cch = prof["ours_forward"], prof["ours_cache_h"]
        for key in MAMBA2_CATEGORIES + ("total",):
            lines.append(f"| {key} | {fwd[key] * 1e3:,.1f} | {fwd[key] / fwd['total']:.0%} | "
                         f"{cch[key] * 1e3:,.1f} | {cch[key] / cch['total']:.0%} |")
        lines.append("")
        lines.append(
            f"HookPoint calls per forward: {prof['hookpoint_calls']} at "
            f"{prof['hookpoint_seconds_per_call'] * 1e6:.1f} µs each = {prof['hookpoints'] * 1e3:.2f} ms "
            f"(inside `other`)."
        )
        sc = prof["scan"]
        chunks = list(sc["chunks"])
        lines.append("")
        lines.append(f"One layer's SSD scan at p={sc['positions']} by chunk size (ms):")
        lines.append("")
        lines.append("| | " + " | ".join(f"chunk {c}" for c in chunks) + " |")
        lines.append("|---|" + "---:|" * len(chunks))
        lines.append("| package `ssd_scan(backend=\"torch\")` | "
                     + " | ".join(f"{sc['chunks'][c]['scan'] * 1e3:,.1f}" for c in chunks) + " |")
        if all("transformers_scan" in sc["chunks"][c] for c in chunks):
            lines.append("| transformers' `mamba2_chunk_scan`, same inputs | "
                         + " | ".join(f"{sc['chunks'][c]['transformers_scan'] * 1e3:,.1f}" for c in chunks) + " |")
        lines.append("| package, with the states (`return_states=True`) | "
                     + " | ".join("–" if sc["chunks"][c].get("scan_with_states") is None
                                  else f"{sc['chunks'][c]['scan_with_states'] * 1e3:,.0f}" for c in chunks) + " |")
        for key in SSD_PARTS + ("total",):
            lines.append(f"| replica: {key} | "
                         + " | ".join(f"{sc['chunks'][c]['replica'][key] * 1e3:,.1f}" for c in chunks) + " |")
        for c in chunks:
            rs = sc["chunks"][c].get("replica_with_states")
            if rs:
                lines.append("")
                lines.append(f"Replica with the states, chunk {c}: "
                             + ", ".join(f"{key} {rs[key] * 1e3:,.0f}" for key in SSD_PARTS + SSD_STATE_PARTS)
                             + f"; total {rs['total'] * 1e3:,.0f} ms.")
    return "\n".join(lines) + "\n"


def print_table(results: dict) -> None:
    try:
        from rich.console import Console
        from rich.markdown import Markdown

        Console().print(Markdown(render(results)))
    except Exception:  # rich missing or failing: plain markdown is readable as is
        print(render(results))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="p = 256 only, fewer repeats, no profile")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds of the light group (default 7; quick 3)")
    parser.add_argument("--heavy-repeats", type=int, default=None,
                        help="timed rounds of the state-caching group, the agreement check's calls included "
                             "(default 5; quick 2)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed calls per light contender before timing, besides the agreement check (default 0)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths (default 256 1024)")
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[32, 64, 128, 256],
                        help="model.cfg.chunk_size values to time our forward at (default 32 64 128 256)")
    parser.add_argument("--state-layers", type=int, default=None,
                        help="cache the states of the first N layers (default: all)")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size (default 8192; mamba2-130m has 50288)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1; 0 keeps torch's default, one per core). See README.")
    parser.add_argument("--no-profile", action="store_true", help="skip the time breakdown of our forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "mamba2_cpu"),
                        help="write <out>.json and <out>.md (default benchmarks/results/mamba2_cpu)")
    args = parser.parse_args(argv)
    lengths = args.lengths or ([256] if args.quick else [256, 1024])
    repeats = args.repeats or (3 if args.quick else 7)
    heavy_repeats = max(1, args.heavy_repeats or (2 if args.quick else 5))
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    started = time.perf_counter()
    shapes = Mamba2Shapes(vocab=args.vocab, n_layers=args.layers)
    state_layers = list(range(min(args.state_layers or shapes.n_layers, shapes.n_layers)))
    chunk_sizes = sorted(set(args.chunk_sizes) | {shapes.chunk_size})
    results = {
        "date": _dt.date.today().isoformat(),
        "command": " ".join([sys.executable, *sys.argv]),
        "tl_mamba_revision": package_revision(),
        "machine": machine_info(),
        "shapes": {**shapes.__dict__, "d_inner": shapes.d_inner, "batch": 1},
        "lengths": lengths,
        "repeats": repeats,
        "heavy_repeats": heavy_repeats,
        "warmup": args.warmup,
        "chunk_sizes": chunk_sizes,
        "state_layers": state_layers,
        "agreement": [],
        "timings": {},
        "fastest_chunk": {},
        "ratios": [],
        "context": [],
    }
    log(f"building models: {shapes}")
    hf = build_hf_mamba2(shapes, seed=args.seed)
    ours = build_ours(hf)
    bridge = build_bridge(hf, name="random-mamba2-130m-widths")
    results["bridge_hooks"] = bridge_hooks(bridge)
    results["ours_heavy_hook_memory_limit"] = ours.heavy_hook_memory_limit
    loaded_chunk = ours.cfg.chunk_size
    gen = torch.Generator().manual_seed(args.seed)
    with torch.inference_mode():
        for p in lengths:
            tokens = torch.randint(0, shapes.vocab, (1, p), generator=gen)
            heavy_calls = heavy_contenders(ours, bridge, tokens, state_layers)
            log(f"p={p}: checking agreement (its heavy calls are the heavy group's first round)")
            agreement, heavy = check_agreement(hf, ours, bridge, tokens, chunk_sizes, state_layers, heavy_calls, log)
            results["agreement"].append(agreement)
            log(f"p={p}: timing the light group, {repeats} interleaved rounds")
            light = interleaved(light_contenders(hf, ours, bridge, tokens, chunk_sizes), repeats, args.warmup, log)
            log(f"p={p}: timing the heavy group, {heavy_repeats - 1} more interleaved rounds")
            heavy = interleaved(heavy_calls, heavy_repeats - 1, 0, log, timings=heavy)
            results["timings"][str(p)] = {"light": light.summary(), "heavy": heavy.summary()}
            forwards = {name: light.median(name) for name in light.samples if name.startswith("ours_forward")}
            best_name = min(forwards, key=forwards.get)
            best_chunk = loaded_chunk if best_name == "ours_forward" else int(best_name.rsplit("chunk", 1)[1])
            results["fastest_chunk"][str(p)] = best_chunk
            for label, num, den in HEADLINE:
                resolved = best_name if num == "ours_forward_best" else num
                row = ratio_row(label, resolved, den, p, (light, heavy))
                row["num_resolved"], row["num"] = resolved, num
                results["ratios"].append(row)
            for label, num, den in CONTEXT:
                results["context"].append(ratio_row(label, num, den, p, (light, heavy)))
            for chunk in chunk_sizes:
                if chunk != loaded_chunk:
                    results["context"].append(ratio_row(f"chunk {chunk} vs chunk {loaded_chunk} forward",
                                                        f"ours_forward_chunk{chunk}", "ours_forward", p,
                                                        (light, heavy)))
        if not args.quick and not args.no_profile:
            from _profile import breakdown, hookpoint_overhead, ssd_scan_parts

            p = max(lengths)
            log(f"p={p}: breakdown of our forward, of caching hook_h and of one layer's scan")
            tokens = torch.randint(0, shapes.vocab, (1, p), generator=gen)
            h_filter = _state_filter("hook_h", state_layers)
            results["profile"] = {
                "p": p,
                "repeats": 3,
                "cache_h_layers": state_layers,
                "cache_h_repeats": 3,
                "ours_forward": breakdown(ours, lambda: ours(tokens), repeats=3, warmup=0),
                "ours_cache_h": breakdown(ours, lambda: ours.run_with_cache(tokens, names_filter=h_filter),
                                          repeats=3, warmup=0),
                **hookpoint_overhead(ours, tokens),
                "scan": ssd_scan_parts(ours, tokens, chunk_sizes=chunk_sizes, repeats=3,
                                       states_chunk_sizes=(loaded_chunk,), states_repeats=3),
            }
    results["wall_s"] = time.perf_counter() - started
    results["loadavg_1min"] = {"start": load_before[0], "end": os.getloadavg()[0]}
    print_table(results)
    md = (f"# Mamba-2 CPU benchmark ({results['date']})\n\nCommand: `{results['command']}`\n\n"
          f"tl_mamba at {results['tl_mamba_revision']}. Wall time {results['wall_s']:.0f} s.\n\n" + render(results))
    out = write_results(args.out, results, md)
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({results['wall_s']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
