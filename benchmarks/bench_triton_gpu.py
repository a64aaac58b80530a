"""GPU check and benchmark of the ``"triton"`` backends (one command, needs CUDA).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_triton_gpu.py            # full
    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_triton_gpu.py --quick    # fewer lengths/rounds

1. Correctness at real sizes: the scan of every family and width below, Triton
   against the ``"reference"`` sequential backend computed in float64 on the GPU,
   for p in ``--check-lengths`` (up to 4096), inputs in fp32 and bf16, with and
   without returned states; plus a structured knockout and a ``hook_h`` edit through
   a 2-layer model. Reports the max abs error relative to the output's scale.
2. Speed at 130m widths, 4 layers, vocab 8192, batch 1, ``--p`` (2048), median of
   interleaved rounds (``_timing.py``), each call followed by ``cuda.synchronize``:
   ``triton`` and ``torch`` forwards, ``knockout`` (Triton, all layers, 3 sources →
   last), ``hook_h`` cached forward (Triton), transformers' forward (its own path:
   the fused mamba_ssm kernels when installed, else its torch fallback), and the
   TransformerLens bridge's eager-scan ``hook_ssm_state`` cache.

Targets (issue "Triton scan kernels"), printed as met / NOT met:
knockout / plain <= 1.3; bridge eager-scan state cache / our hook_h cache >= 50;
plain Triton forward <= 1.5x transformers with mamba_ssm (reported only when
mamba_ssm is importable).

Widths: Mamba-1 130m (d 768, e 1536, n 16) and 370m (d 1024, e 2048, n 16);
Mamba-2 130m (d 768, 24 heads of 64, n 128) and 370m (d 1024, 32 heads of 64, n 128).
Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/triton_gpu``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _env import machine_info, package_revision  # noqa: E402
from _timing import interleaved  # noqa: E402

WIDTHS = {
    "mamba1": {"130m": dict(d_model=768, d_state=16), "370m": dict(d_model=1024, d_state=16)},
    "mamba2": {"130m": dict(d_model=768, d_state=128, n_heads=24), "370m": dict(d_model=1024, d_state=128, n_heads=32)},
}


def scan_inputs(family, widths, p, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    e = 2 * widths["d_model"]
    n = widths["d_state"]
    if family == "mamba1":
        shapes = dict(x=(1, p, e), delta=(1, p, e), A=(e, n), B=(1, p, n), C=(1, p, n), D=(e,))
    else:
        h = widths["n_heads"]
        shapes = dict(x=(1, p, h, e // h), delta=(1, p, h), A=(h,), B=(1, p, 1, n), C=(1, p, 1, n), D=(h,))
    t = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    t["delta"] = torch.rand(*shapes["delta"], generator=g) * 0.1 + 0.001
    t["A"] = -torch.rand(*shapes["A"], generator=g) * 4 - 0.1
    return {k: v.to(device=device, dtype=dtype) for k, v in t.items()}


def check_scans(lengths, device, log):
    from tl_mamba.ops.selective_scan import selective_scan
    from tl_mamba.ops.ssd import ssd_scan

    rows = []
    for family, by_width in WIDTHS.items():
        scan = selective_scan if family == "mamba1" else ssd_scan
        for width, widths in by_width.items():
            for p in lengths:
                for dtype in (torch.float32, torch.bfloat16):
                    t = scan_inputs(family, widths, p, dtype, device)
                    ref = scan(*(v.double() for v in t.values()), backend="reference", return_states=False)
                    out = scan(*t.values(), backend="triton", return_states=False)
                    scale = float(ref.y.abs().max())
                    err = float((out.y.double() - ref.y).abs().max()) / scale
                    ferr = float((out.final_state.double() - ref.final_state).abs().max()) / float(
                        ref.final_state.abs().max())
                    rows.append(dict(family=family, width=width, p=p, dtype=str(dtype).split(".")[-1],
                                     rel_err_y=err, rel_err_final=ferr))
                    log(f"check {family} {width} p={p} {dtype}: rel err y {err:.2e}, final {ferr:.2e}")
                    del ref, out, t
                    torch.cuda.empty_cache()
    return rows


def build_models(device):
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    from tl_mamba import HookedMamba, HookedMamba2

    torch.manual_seed(0)
    hf1 = MambaForCausalLM(MambaConfig(hidden_size=768, state_size=16, num_hidden_layers=4, vocab_size=8192,
                                       bos_token_id=0, eos_token_id=1, pad_token_id=2)).eval().to(device)
    hf2 = Mamba2ForCausalLM(Mamba2Config(hidden_size=768, num_heads=24, head_dim=64, state_size=128, n_groups=1,
                                         num_hidden_layers=4, vocab_size=8192, chunk_size=256, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=2)).eval().to(device)
    return {"mamba1": (hf1, HookedMamba.from_hf(hf1).to(device).eval()),
            "mamba2": (hf2, HookedMamba2.from_hf(hf2).to(device).eval())}


def contenders(family, hf, model, p, device, with_bridge):
    from tl_mamba import Knockout

    tokens = torch.randint(0, 8192, (1, p), device=device)
    ko = Knockout(layers=range(model.cfg.n_layers), sources=[p // 3, p // 3 + 1, p // 3 + 2], targets=[-1])
    names = [f"blocks.{layer}.hook_h" for layer in range(model.cfg.n_layers)]

    def sync(fn):
        def call():
            out = fn()
            torch.cuda.synchronize()
            return out
        return call

    def backend(name, fn):
        def call():
            model.set_backend(name)
            return fn()
        return call

    calls = {
        "triton": backend("triton", lambda: model(tokens)),
        "torch": backend("torch", lambda: model(tokens)),
        "knockout_triton": backend("triton", lambda: model.run_with_knockout(tokens, ko)),
        "hook_h_cache_triton": backend("triton", lambda: model.run_with_cache(tokens, names_filter=names)),
        "transformers": lambda: hf(tokens),
    }
    if with_bridge:
        try:
            from _setup import build_bridge, set_eager_scan

            bridge = build_bridge(hf.cpu()).to(device)
            hf.to(device)
            set_eager_scan(bridge, True)
            bridge_names = [n for n in bridge.hook_dict if n.endswith("hook_ssm_state")]
            calls["bridge_eager_state_cache"] = lambda: bridge.run_with_cache(tokens, use_cache=False,
                                                                              names_filter=bridge_names)
        except Exception as err:  # the bridge is optional here: report why it is missing
            print(f"bridge unavailable: {err}")
    return {name: sync(fn) for name, fn in calls.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=int, default=2048)
    parser.add_argument("--check-lengths", default="512,2048,4096")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-bridge", action="store_true", help="skip the TransformerLens bridge")
    parser.add_argument("--out", default="benchmarks/results/triton_gpu")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_triton_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    lengths = [int(x) for x in args.check_lengths.split(",")]
    if args.quick:
        lengths, args.repeats = lengths[:1], 3
    results = {"date": _dt.date.today().isoformat(), "machine": machine_info(), "gpu": torch.cuda.get_device_name(),
               "revision": package_revision(), "p": args.p}
    try:
        import mamba_ssm  # noqa: F401

        results["mamba_ssm"] = True
    except ImportError:
        results["mamba_ssm"] = False
    results["checks"] = check_scans(lengths, device, print)
    results["speed"] = {}
    lines = [f"# Triton backends on {results['gpu']} ({results['date']}, revision {results['revision']})", "",
             "## Correctness (max |error| / max |reference|, reference in float64)", "",
             "| family | width | p | dtype | y | final state |", "|---|---|---|---|---|---|"]
    for row in results["checks"]:
        lines.append(f"| {row['family']} | {row['width']} | {row['p']} | {row['dtype']} | {row['rel_err_y']:.1e} | "
                     f"{row['rel_err_final']:.1e} |")
    lines += ["", f"## Speed at 130m widths, 4 layers, p = {args.p} (median s; mamba_ssm installed: "
              f"{results['mamba_ssm']})", "", "| family | contender | median s | vs triton |", "|---|---|---|---|"]
    with torch.inference_mode():
        for family, (hf, model) in build_models(device).items():
            calls = contenders(family, hf, model, args.p, device, not args.no_bridge)
            timings = interleaved(calls, repeats=args.repeats, warmup=2, log=print)
            speed = {name: timings.median(name) for name in calls}
            ratios = {name: timings.paired_ratio(name, "triton") for name in calls}
            results["speed"][family] = {"median_s": speed, "vs_triton": ratios}
            for name in calls:
                lines.append(f"| {family} | {name} | {speed[name]:.4f} | {ratios[name]:.2f}x |")
            targets = {"knockout / plain <= 1.3": ratios["knockout_triton"] <= 1.3}
            if "bridge_eager_state_cache" in calls:
                targets["bridge state cache / hook_h cache >= 50"] = (
                    timings.paired_ratio("bridge_eager_state_cache", "hook_h_cache_triton") >= 50)
            if results["mamba_ssm"]:
                targets["triton <= 1.5x transformers+mamba_ssm"] = timings.paired_ratio("triton", "transformers") <= 1.5
            results["speed"][family]["targets"] = targets
            lines += [f"| {family} | target: {k} | {'met' if v else 'NOT met'} | |" for k, v in targets.items()]
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
