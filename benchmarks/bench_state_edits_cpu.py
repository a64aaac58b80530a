"""CPU: editing ``hook_h`` at every position (a state ablation), by segments or by one recurrence.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_state_edits_cpu.py

An edit of the state at a position makes the recurrence continue from the edited value.
With few edited positions the scan dispatchers run the scan in segments that end at
them (two scans per edited position, each on the backend's kernels). When the edits
cover many positions (more than ``tl_mamba.ops.state_override.RECURRENCE_AFTER_EDITS``:
zeroing a head's state everywhere, scaling the state) they apply them in one masked
recurrence over the states instead (``override_by_recurrence``). This bench times both
routes on the same edits in one run (``_setup.override_route`` per call), next to the
unhooked forward and a read-only ``hook_h`` hook, on the shipped toy models (torch
backend, one thread, b 4, p 256), without gradients and with ``loss.backward()``.

It also times state patching at a few positions (``patch2``: the whole state zeroed at
p/4 and 3p/4, the segment route), the common case in activation patching. With
``--widths 130m`` (random models of the 130m widths, ``--layers`` layers, b 1, p 2048)
it times only that one next to the forward and the read: the every-position edits under
autograd take minutes at those widths.

Edits: ``zero``, head 0 (Mamba-2) or channel 0 (Mamba-1) of the state set to 0 in place
at every position; ``scale``, the state times 0.9 (a new tensor). Both routes give the
same logits (checked here, max |Δ| printed). Writes ``<out>.json`` / ``<out>.md``
(default ``benchmarks/results/state_edits_cpu``, or ``state_edits_130m_cpu`` with ``--widths 130m``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _env import machine_info, package_revision, write_results  # noqa: E402
from _setup import Mamba2Shapes, Shapes, override_route  # noqa: E402
from _timing import interleaved  # noqa: E402

EDITS = {
    "zero": lambda h, hook: h.index_fill_(2, torch.tensor([0]), 0.0),  # head / channel 0, every position
    "scale": lambda h, hook: h * 0.9,
}


def patch_two(h, hook):
    """State patching at a few positions (the common case): the whole state zeroed, in place,
    at a quarter and three quarters of the sequence. Always the segment route."""
    p = h.shape[1]
    h[:, [p // 4, 3 * p // 4]] = 0.0


def contenders(model, tokens, grad: bool, every_position: bool = True):
    names = [f"blocks.{l}.hook_h" for l in range(model.cfg.n_layers)]

    def call(hooks, route=None):
        def run():
            with override_route(route) if route else contextlib.nullcontext():
                if grad:
                    model.zero_grad(set_to_none=True)
                    model.run_with_hooks(tokens, return_type="loss", fwd_hooks=hooks).backward()
                    return None
                with torch.no_grad():
                    return model.run_with_hooks(tokens, fwd_hooks=hooks)
        return run

    out = {"plain": call([]), "read": call([(n, lambda h, hook: None) for n in names]),
           "patch2": call([(n, patch_two) for n in names])}
    for edit, fn in (EDITS.items() if every_position else ()):
        hooks = [(n, fn) for n in names]
        out[f"{edit}_segments"] = call(hooks, "segments")
        out[f"{edit}_recurrence"] = call(hooks, "recurrence")
    return out


def models(widths: str, layers: int):
    """``(name, model)`` for Mamba-2 then Mamba-1: the shipped toy models, or random models
    of the 130m widths (``_setup.Shapes`` / ``Mamba2Shapes``) with ``layers`` layers."""
    import tl_mamba
    from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig

    if widths == "toy":
        for name in ("toy-mamba2", "toy-mamba"):
            yield name, tl_mamba.from_pretrained(name)
        return
    m2, m1 = Mamba2Shapes(n_layers=layers), Shapes(n_layers=layers)
    model = HookedMamba2(HookedMambaConfig(
        family="mamba2", n_layers=layers, d_model=m2.d_model, d_vocab=m2.vocab, d_state=m2.d_state,
        d_conv=m2.d_conv, expand=m2.expand, n_heads=m2.n_heads, n_groups=m2.n_groups, chunk_size=m2.chunk_size))
    model.heavy_hook_memory_limit = 2**40  # hook_h at p 2048 is 1.6 GB a layer: measured, not refused
    yield f"mamba2 130m widths, {layers} layer(s)", model
    model = HookedMamba(HookedMambaConfig(n_layers=layers, d_model=m1.d_model, d_vocab=m1.vocab,
                                          d_state=m1.d_state, d_conv=m1.d_conv, expand=m1.expand))
    model.heavy_hook_memory_limit = 2**40
    yield f"mamba 130m widths, {layers} layer(s)", model


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--widths", choices=("toy", "130m"), default="toy",
                        help="the shipped toy models, or random models of the 130m models' widths with "
                             "--layers layers (the default --p is then 2048, batch 1)")
    parser.add_argument("--layers", type=int, default=1, help="layers of the 130m-width models")
    parser.add_argument("--quick", action="store_true", help="p 24, one round (checks that it runs)")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="default benchmarks/results/state_edits_cpu (toy) or state_edits_130m_cpu")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = pathlib.Path(__file__).parent / "results" / (
            "state_edits_cpu" if args.widths == "toy" else "state_edits_130m_cpu")
    if args.widths == "130m" and args.p == parser.get_default("p") and args.batch == parser.get_default("batch"):
        args.p, args.batch = 2048, 1
    if args.quick:
        args.p, args.repeats = 24, 1
    torch.set_num_threads(1)

    rows, lines = [], []
    for name, model in models(args.widths, args.layers):
        model.set_backend("torch")
        tokens = torch.randint(3, model.cfg.d_vocab - 8, (args.batch, args.p), generator=torch.Generator().manual_seed(0))
        every = args.widths == "toy"  # at 130m widths every-position edits under grad take minutes: skipped
        found = contenders(model, tokens, grad=False, every_position=every)
        agree = {edit: float((found[f"{edit}_segments"]() - found[f"{edit}_recurrence"]()).abs().max())
                 for edit in (EDITS if every else ())}
        for grad in (False, True):
            timings = interleaved(contenders(model, tokens, grad, every), args.repeats, warmup=0 if args.quick else 1,
                                  log=print)
            row = {"model": name, "grad": grad, "b": args.batch, "p": args.p, "max_abs_diff": agree,
                   **{f"{k}_s": timings.median(k) for k in timings.samples}}
            for edit in (EDITS if every else ()):
                row[f"{edit}_speedup"] = timings.paired_ratio(f"{edit}_segments", f"{edit}_recurrence")
            row["patch2_over_plain"] = timings.paired_ratio("patch2", "plain")
            rows.append(row)
            lines.append(f"| {name} | {'forward + backward' if grad else 'forward, no grad'} | {row['plain_s']:.3f} "
                         f"| {row['read_s']:.3f} | {row['patch2_s']:.3f} ({row['patch2_over_plain']:.1f}×) | "
                         + " | ".join(
                             f"{row[f'{e}_segments_s']:.3f} → {row[f'{e}_recurrence_s']:.3f} "
                             f"({row[f'{e}_speedup']:.1f}×)" if every else "–" for e in EDITS) + " |")
    header = ("| model | pass | plain, s | `hook_h` read, s | state zeroed at 2 positions, s (× plain) "
              "| zero head/channel 0 everywhere: segments → recurrence, s "
              "| state × 0.9: segments → recurrence, s |\n|---|---|---|---|---|---|---|\n")
    agreement = "; ".join(f"{r['model']} {e} {d:.1e}" for r in rows if not r["grad"] for e, d in r["max_abs_diff"].items())
    markdown = header + "\n".join(lines) + "\n"
    if agreement:
        markdown += f"\nmax |Δ logits|, segments vs recurrence: {agreement}\n"
    results = {"date": _dt.date.today().isoformat(), "revision": package_revision(), "machine": machine_info(),
               "rows": rows}
    write_results(args.out, results, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
