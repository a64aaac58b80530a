"""CPU: forward + backward (what training and gradient attribution cost), ours against transformers.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_grad_cpu.py

Two settings, one thread, float32, interleaved rounds (``_timing.py``; ratios paired by round):

- **scan**: one Mamba-1 selective scan and its backward. ``torch`` is our
  ``"torch"`` backend (its hand-written chunked backward, ``chunked._ChunkedScan``),
  ``y.sum().backward()``; ``torch+states`` the same backend asked for every state as
  well, whose sum enters the loss too (what a hook on ``hook_h`` costs under autograd).
  Until 2026-12-05 that case was differentiated by autograd through the Python loop
  (what every differentiable call did before the hand-written backward); since then it
  runs the same hand-written backward.
- **model**: the loss of every next token, ``loss.backward()``, for ``HookedMamba`` /
  ``HookedMamba2`` (torch backend, train mode) against transformers' ``MambaForCausalLM`` /
  ``Mamba2ForCausalLM`` on their torch paths (train mode), identical random weights.
  Widths: the toy models' (batch 32: a training step of ``tl_mamba.toy.train``) and 130m
  widths with 4 layers at batch 1 (an attribution pass). transformers' Mamba-1 trains
  through a sequential loop that keeps every position's tensors, so its rows are short.

Memory: the bytes autograd holds between forward and backward (every distinct tensor
saved for backward, inputs included, counted once; ``saved_tensors_hooks``), from one
extra untimed forward per contender. (The resident-memory peak of ``_timing`` reads 0
here: the allocator keeps the memory of earlier rounds.)

Writes ``<out>.json`` / ``<out>.md`` (default ``benchmarks/results/grad_cpu``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import pathlib
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _env import machine_info, package_revision, write_results  # noqa: E402
from _setup import Mamba2Shapes, Shapes, build_hf, build_hf_mamba2, build_ours  # noqa: E402
from _timing import interleaved  # noqa: E402


def _forward_backward(loss_of, clear):
    """A timed call: ``loss_of().backward()``, then ``clear()`` the gradients; with
    ``backward=False`` it returns the loss instead (for :func:`saved_mb`)."""
    def call(backward: bool = True):
        loss = loss_of()
        if not backward:
            return loss
        loss.backward()
        clear()
    return call


def scan_contenders(b: int, p: int, e: int, n: int):
    from tl_mamba.ops.selective_scan import selective_scan

    g = torch.Generator().manual_seed(0)
    leaves = [torch.randn(b, p, e, generator=g), torch.rand(b, p, e, generator=g) * 0.1,
              -torch.rand(e, n, generator=g) - 0.1, torch.randn(b, p, n, generator=g),
              torch.randn(b, p, n, generator=g), torch.randn(e, generator=g)]
    leaves = [t.requires_grad_() for t in leaves]

    def clear():
        for t in leaves:
            t.grad = None

    def loss(states: bool):
        out = selective_scan(*leaves, backend="torch", return_states=states)
        return out.y.sum() + out.states.sum() if states else out.y.sum()

    def run(states: bool):
        return _forward_backward(lambda: loss(states), clear)

    return {"torch": run(False), "torch+states": run(True)}


def model_contenders(shapes, b: int, p: int):
    hf = (build_hf_mamba2 if isinstance(shapes, Mamba2Shapes) else build_hf)(shapes).train()
    ours = build_ours(hf).train()
    tokens = torch.randint(3, shapes.vocab, (b, p), generator=torch.Generator().manual_seed(1))

    def step(model, logits_of):
        return _forward_backward(
            lambda: F.cross_entropy(logits_of(model, tokens)[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()),
            lambda: model.zero_grad(set_to_none=True))

    # same weights: the losses must agree before anything is timed
    with torch.no_grad():
        diff = (ours(tokens[:1, :64]) - hf(tokens[:1, :64]).logits).abs().max().item()
    assert diff < 1e-3, f"our logits differ from transformers' by {diff}"
    return {"ours": step(ours, lambda m, t: m(t)), "transformers": step(hf, lambda m, t: m(t).logits)}


def saved_mb(call) -> float:
    """MB autograd keeps for the backward of ``call(backward=False)`` (distinct storages, counted once)."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = call(backward=False)
    del loss
    return round(sum(seen.values()) / 2**20, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds per row (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="small shapes, one round (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/grad_cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 1 if args.quick else args.repeats
    rows = []

    scans = [(32, 512, 192, 8), (1, 512, 1536, 16)] if not args.quick else [(2, 40, 8, 4)]
    for b, p, e, n in scans:
        contenders = scan_contenders(b, p, e, n)
        t = interleaved(contenders, repeats=repeats, warmup=1)
        rows.append(dict(setting="scan", shape=f"b={b} p={p} e={e} n={n}", torch_s=t.median("torch"),
                         states_s=t.median("torch+states"), ratio=t.paired_ratio("torch", "torch+states"),
                         torch_saved_mb=saved_mb(contenders["torch"]), states_saved_mb=saved_mb(contenders["torch+states"])))
        print(rows[-1], flush=True)

    toy = Shapes(d_model=96, d_state=8, n_layers=4, vocab=416)
    toy2 = Mamba2Shapes(d_model=128, n_heads=8, d_head=32, d_state=32, n_layers=4, vocab=416, chunk_size=64)
    models = [(toy, 32, 128), (Shapes(), 1, 256), (toy2, 32, 256), (Mamba2Shapes(), 1, 512)] if not args.quick else \
        [(Shapes(d_model=32, d_state=4, n_layers=2, vocab=64), 2, 40),
         (Mamba2Shapes(d_model=32, n_heads=4, d_head=16, d_state=8, n_layers=2, vocab=64, chunk_size=16), 2, 40)]
    for shapes, b, p in models:
        contenders = model_contenders(shapes, b, p)
        t = interleaved(contenders, repeats=repeats, warmup=1)
        family = "Mamba-2" if isinstance(shapes, Mamba2Shapes) else "Mamba-1"
        rows.append(dict(setting="model", shape=f"{family} d_model={shapes.d_model} layers={shapes.n_layers} b={b} p={p}",
                         ours_s=t.median("ours"), transformers_s=t.median("transformers"),
                         ours_vs_transformers=t.paired_ratio("ours", "transformers"),
                         ours_saved_mb=saved_mb(contenders["ours"]), transformers_saved_mb=saved_mb(contenders["transformers"])))
        print(rows[-1], flush=True)

    meta = dict(date=_dt.date.today().isoformat(), machine=machine_info(), revision=package_revision(),
                threads=1, repeats=repeats)
    lines = [f"# forward + backward on the CPU ({meta['date']}, {meta['revision']})", "",
             "| setting | shape | ours (s) | other (s) | time ratio | ours saved (MB) | other saved (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["setting"] == "scan":
            lines.append(f"| scan: torch vs torch+states | {r['shape']} | {r['torch_s']:.3f} | {r['states_s']:.3f} | "
                         f"{r['ratio']:.2f} | {r['torch_saved_mb']} | {r['states_saved_mb']} |")
        else:
            lines.append(f"| model: ours vs transformers | {r['shape']} | {r['ours_s']:.3f} | "
                         f"{r['transformers_s']:.3f} | {r['ours_vs_transformers']:.2f} | {r['ours_saved_mb']} | "
                         f"{r['transformers_saved_mb']} |")
    write_results(args.out, dict(meta=meta, rows=rows), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
