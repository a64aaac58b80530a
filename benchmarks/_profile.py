"""Where the torch backend's forward time goes: projections vs conv vs scan vs the rest.

Wall-clock timers (no profiler, whose per-op overhead would inflate the scan's
many small ops) are attached for the duration of the measurement only:

- ``projections``: the ``in_proj``, ``x_proj`` and ``out_proj`` ``nn.Linear``
  modules of every block (module pre/post hooks, not HookPoints).
- ``unembed``: the unembedding matmul (the ``unembed`` module).
- ``conv``: ``causal_conv1d`` as called by the block.
- ``scan``: ``selective_scan`` as called by the block (discretisation, the
  per-position loop, the read-out and the D skip).
- ``other``: the remainder of the forward: embedding, RMSNorms, SiLU, softplus,
  ``dt_proj`` (a rank-48 ``F.linear``), splits, residual adds, HookPoint calls
  and Python.

The names ``selective_scan`` and ``causal_conv1d`` are swapped in the
``tl_mamba.models.mamba`` module namespace and put back afterwards; nothing in
the package is changed.

HookPoint cost is measured separately: the time of one call to a HookPoint with
nothing attached, times the number of HookPoints a forward passes through.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict

import torch


@contextmanager
def _timers(model, acc: Dict[str, float]):
    import tl_mamba.models.mamba as mamba_module

    originals = {"selective_scan": mamba_module.selective_scan, "causal_conv1d": mamba_module.causal_conv1d}

    def timed(label, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            acc[label] += time.perf_counter() - start
            return out

        return wrapper

    mamba_module.selective_scan = timed("scan", originals["selective_scan"])
    mamba_module.causal_conv1d = timed("conv", originals["causal_conv1d"])
    handles, starts = [], {}

    def attach(module, label):
        def pre(mod, args):
            starts[id(mod)] = time.perf_counter()

        def post(mod, args, out):
            acc[label] += time.perf_counter() - starts.pop(id(mod))

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    for block in model.blocks:
        for name in ("in_proj", "x_proj", "out_proj"):
            attach(getattr(block.mixer, name), "projections")
    attach(model.unembed, "unembed")
    try:
        yield
    finally:
        mamba_module.selective_scan = originals["selective_scan"]
        mamba_module.causal_conv1d = originals["causal_conv1d"]
        for handle in handles:
            handle.remove()


def hookpoint_call_cost(calls: int = 20000) -> float:
    """Seconds per call of a HookPoint with nothing attached (Module.__call__ + identity)."""
    from transformer_lens.hook_points import HookPoint

    hp = HookPoint()
    x = torch.zeros(1)
    for _ in range(1000):
        hp(x)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            hp(x)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def count_hookpoint_calls(model, tokens) -> int:
    """HookPoints a plain forward passes through (the heavy ones are skipped when unhooked)."""
    from transformer_lens.hook_points import HookPoint

    count = [0]
    handles = [
        m.register_forward_pre_hook(lambda mod, args: count.__setitem__(0, count[0] + 1))
        for m in model.modules()
        if isinstance(m, HookPoint)
    ]
    try:
        model(tokens)
    finally:
        for h in handles:
            h.remove()
    # a pre-hook is an nn.Module hook, not a TransformerLens hook, so hook_is_active() stays False
    return count[0]


CATEGORIES = ("projections", "unembed", "conv", "scan", "other")


def breakdown(model, call, repeats: int = 3) -> Dict[str, float]:
    """Median seconds per category over ``repeats`` calls of ``call()`` (after one warm-up).

    ``call`` runs ``model`` once (a forward, or a ``run_with_cache``); its wall
    time is ``total`` and what no timer covers is ``other``.
    """
    call()
    runs = []
    for _ in range(repeats):
        acc: Dict[str, float] = defaultdict(float)
        with _timers(model, acc):
            start = time.perf_counter()
            out = call()
            del out
            acc["total"] = time.perf_counter() - start
        acc["other"] = acc["total"] - sum(acc[k] for k in CATEGORIES[:-1])
        runs.append(dict(acc))
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in ("total",) + CATEGORIES}


def hookpoint_overhead(model, tokens) -> Dict[str, float]:
    """HookPoint calls in a plain forward, the cost of one, and their product (seconds)."""
    calls = count_hookpoint_calls(model, tokens)
    per_call = hookpoint_call_cost()
    return {"hookpoint_calls": calls, "hookpoint_seconds_per_call": per_call, "hookpoints": calls * per_call}


def scan_parts(model, tokens, repeats: int = 3) -> Dict[str, float]:
    """One layer's torch-backend scan, split into its parts, with and without the states.

    Captures layer 0's scan inputs with hooks, times the package's
    ``selective_scan(backend="torch")`` with ``return_states`` False and True, and
    times a replica of the chunked algorithm (``tl_mamba/ops/selective_scan/chunked.py``
    as of commit d9c79e6: chunks of 64 positions; discretise ``exp(Δ⊗A)`` and
    ``Δx⊗B`` for the chunk, an in-place ``addcmul`` per position into a chunk
    buffer, or into one preallocated ``[b, p, e, n]`` buffer when the states are
    kept; an einsum read-out per chunk) with a timer around each part. The
    replica's total is reported next to the package's so a drift between the two
    shows.
    """
    from tl_mamba.ops.selective_scan import selective_scan

    names = ["blocks.0.hook_x", "blocks.0.hook_delta", "blocks.0.hook_B", "blocks.0.hook_C"]
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    x, delta, B, C = (cache[n].float() for n in names)
    mixer = model.blocks[0].mixer
    A = -torch.exp(mixer.A_log.float())
    D = mixer.D.float()
    b, p, e = x.shape
    n = A.shape[-1]
    chunk = 64

    def replica(acc, return_states):
        h = torch.zeros(b, e, n)
        ys = []
        t0 = time.perf_counter()
        buffer = torch.empty(b, p, e, n) if return_states else None
        acc["allocate"] += time.perf_counter() - t0
        for start in range(0, p, chunk):
            stop = min(start + chunk, p)
            t0 = time.perf_counter()
            d_c = delta[:, start:stop]
            decay = torch.exp(d_c[..., None] * A)
            write = (d_c * x[:, start:stop])[..., None] * B[:, start:stop, None, :]
            states = torch.empty_like(write) if buffer is None else buffer[:, start:stop]
            t1 = time.perf_counter()
            for t in range(stop - start):
                h = torch.addcmul(write[:, t], decay[:, t], h, out=states[:, t])
            t2 = time.perf_counter()
            ys.append(torch.einsum("blen,bln->ble", states, C[:, start:stop]))
            t3 = time.perf_counter()
            acc["discretise"] += t1 - t0
            acc["loop"] += t2 - t1
            acc["readout"] += t3 - t2
        t0 = time.perf_counter()
        y = torch.cat(ys, dim=1) + D * x
        acc["concat_and_skip"] += time.perf_counter() - t0
        return y

    def med(fn):
        fn()
        ts = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - start)
        return statistics.median(ts)

    out: Dict[str, float] = {"positions": p}
    out["scan_one_layer"] = med(lambda: selective_scan(x, delta, A, B, C, D, backend="torch"))
    out["scan_one_layer_with_states"] = med(
        lambda: selective_scan(x, delta, A, B, C, D, backend="torch", return_states=True)
    )
    for return_states in (False, True):
        runs = []
        for _ in range(repeats + 1):
            acc: Dict[str, float] = defaultdict(float)
            start = time.perf_counter()
            replica(acc, return_states)
            acc["total"] = time.perf_counter() - start
            runs.append(acc)
        tag = "replica_with_states" if return_states else "replica"
        for key in ("allocate", "discretise", "loop", "readout", "concat_and_skip", "total"):
            out[f"{tag}_{key}"] = statistics.median(r.get(key, 0.0) for r in runs[1:])
    return out
