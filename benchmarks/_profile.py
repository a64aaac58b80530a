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

For Mamba-2 (``HookedMamba2``, ``model.cfg.family == "mamba2"``) the categories
are ``MAMBA2_CATEGORIES``:

- ``projections``: ``in_proj`` and ``out_proj`` of every block (there is no
  ``x_proj`` / ``dt_proj``).
- ``unembed``, ``conv``: as above (``causal_conv1d`` in ``tl_mamba.models.mamba2``).
- ``scan``: ``ssd_scan`` as called by the block (the chunked SSD form, with the
  states when ``hook_h`` is hooked).
- ``states_hook``: what ``scan_with_heavy_hooks`` adds around the scan when
  ``hook_h`` is hooked (the copy of the states it hands to the hook, the hook
  call and the cache's store); about zero otherwise.
- ``other``: embedding, RMSNorms, the gated norm, SiLU, softplus, splits,
  residual adds, HookPoints and Python.

``ssd_scan_parts`` splits one layer's Mamba-2 scan into the steps of the chunked
form, per chunk size.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Dict

import torch


def _timed(acc: Dict[str, float], label: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        acc[label] += time.perf_counter() - start
        return out

    return wrapper


def _attach(handles, starts, acc: Dict[str, float], module, label: str) -> None:
    """Add the wall time of ``module``'s forward to ``acc[label]`` (forward pre/post hooks)."""

    def pre(mod, args):
        starts[id(mod)] = time.perf_counter()

    def post(mod, args, out):
        acc[label] += time.perf_counter() - starts.pop(id(mod))

    handles.append(module.register_forward_pre_hook(pre))
    handles.append(module.register_forward_hook(post))


@contextmanager
def _timers_mamba2(model, acc: Dict[str, float]):
    """Timers of ``MAMBA2_CATEGORIES``; ``acc["heavy_hooks"]`` includes the scan (subtracted later)."""
    import tl_mamba.models.mamba2 as mamba2_module

    names = ("ssd_scan", "causal_conv1d", "scan_with_heavy_hooks")
    originals = {name: getattr(mamba2_module, name) for name in names}
    mamba2_module.ssd_scan = _timed(acc, "scan", originals["ssd_scan"])
    mamba2_module.causal_conv1d = _timed(acc, "conv", originals["causal_conv1d"])
    mamba2_module.scan_with_heavy_hooks = _timed(acc, "heavy_hooks", originals["scan_with_heavy_hooks"])
    handles, starts = [], {}
    for block in model.blocks:
        for name in ("in_proj", "out_proj"):
            _attach(handles, starts, acc, getattr(block.mixer, name), "projections")
    _attach(handles, starts, acc, model.unembed, "unembed")
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(mamba2_module, name, fn)
        for handle in handles:
            handle.remove()


@contextmanager
def _timers(model, acc: Dict[str, float]):
    if getattr(model.cfg, "family", None) == "mamba2":
        with _timers_mamba2(model, acc):
            yield
        return
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
MAMBA2_CATEGORIES = ("projections", "unembed", "conv", "scan", "states_hook", "other")


def categories_for(model):
    """The breakdown's categories for ``model``'s family (``CATEGORIES`` for Mamba-1)."""
    return MAMBA2_CATEGORIES if getattr(model.cfg, "family", None) == "mamba2" else CATEGORIES


def breakdown(model, call, repeats: int = 3, warmup: int = 1) -> Dict[str, float]:
    """Median seconds per category over ``repeats`` calls of ``call()`` (after ``warmup`` untimed calls).

    ``call`` runs ``model`` once (a forward, or a ``run_with_cache``); its wall
    time is ``total`` and what no timer covers is ``other``.
    """
    categories = categories_for(model)
    for _ in range(warmup):
        call()
    runs = []
    for _ in range(repeats):
        acc: Dict[str, float] = defaultdict(float)
        with _timers(model, acc):
            start = time.perf_counter()
            out = call()
            del out
            acc["total"] = time.perf_counter() - start
        if "states_hook" in categories:  # scan_with_heavy_hooks' own time, without the scan it runs
            acc["states_hook"] = max(0.0, acc.pop("heavy_hooks", 0.0) - acc["scan"])
        acc["other"] = acc["total"] - sum(acc[k] for k in categories[:-1])
        runs.append(dict(acc))
    return {k: statistics.median(r.get(k, 0.0) for r in runs) for k in ("total",) + categories}


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


SSD_PARTS = ("prepare", "diag_decay", "diag_scores", "diag_y", "chunk_states", "chunk_recurrence",
             "off_diag", "skip")
SSD_STATE_PARTS = ("states_prepare", "states_loop")


def _ssd_replica(x, delta, A, B, C, D, chunk: int, acc: Dict[str, float], return_states: bool = False):
    """``tl_mamba/ops/ssd/chunked.py`` (its head-major layout, 8457b18), fp32, no initial state, with a timer per step.

    prepare: casts, repeat_interleave of B and C over heads, padding, Δx.
    diag_decay: the [b, c, h, L, L] within-chunk decay (masked cumulative sum, exp), source-major.
    diag_scores: C·B per chunk times the decay.  diag_y: scores applied to Δx.
    chunk_states: each chunk's contribution to its final state.  chunk_recurrence:
    the Python loop over chunks.  off_diag: start states read out by C.  skip:
    reshape and the D skip.  With ``return_states`` (no gradient): states_prepare
    (the per-step decay exp(Δ_t A), Δx, the [b, p, h, hd, n] buffer) and
    states_loop (the recurrence, one ``addcmul`` per position into the buffer).
    """
    import torch.nn.functional as F

    def mark(label, t0):
        t1 = time.perf_counter()
        acc[label] += t1 - t0
        return t1

    t = time.perf_counter()
    b, p, h, hd = x.shape
    g, n = B.shape[-2:]
    L = min(chunk, p)
    pad = (-p) % L
    xf, df, Af = x.float(), delta.float(), A.float()
    Bh = B.float().repeat_interleave(h // g, dim=2)
    Ch = C.float().repeat_interleave(h // g, dim=2)
    if pad:
        xf, df, Bh, Ch = (F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad)) for v in (xf, df, Bh, Ch))
    nc = (p + pad) // L

    def by_head(v):  # [b, p, h, k] -> [b, c, h, L, k]
        return v.reshape(b, nc, L, h, v.shape[-1]).permute(0, 1, 3, 2, 4).contiguous()

    xd = by_head(xf * df[..., None])
    Bc, Cc = by_head(Bh), by_head(Ch)
    step = (df * Af).reshape(b, nc, L, h).permute(0, 1, 3, 2)
    t = mark("prepare", t)
    causal_st = torch.ones(L, L, dtype=torch.bool).triu()
    terms = step[..., None, :].masked_fill(~causal_st.triu(1), 0.0)
    seg_st = torch.cumsum(terms, dim=-1)
    decay_st = torch.exp(seg_st.masked_fill_(~causal_st, float("-inf")))
    t = mark("diag_decay", t)
    scores_st = torch.matmul(Bc, Cc.transpose(-1, -2)) * decay_st
    t = mark("diag_scores", t)
    y = torch.matmul(scores_st.transpose(-1, -2), xd)
    t = mark("diag_y", t)
    log_decay = torch.cumsum(step, dim=-1)
    to_end = torch.exp(log_decay[..., -1:] - log_decay)
    chunk_writes = torch.matmul((xd * to_end[..., None]).transpose(-1, -2), Bc)
    chunk_decay = torch.exp(log_decay[..., -1])
    t = mark("chunk_states", t)
    state = x.new_zeros(b, h, hd, n, dtype=torch.float32)
    starts = []
    for c in range(nc):
        starts.append(state)
        state = chunk_decay[:, c, :, None, None] * state + chunk_writes[:, c]
    start_states = torch.stack(starts, dim=1)
    t = mark("chunk_recurrence", t)
    from_start = torch.exp(log_decay)
    y = y + torch.matmul(Cc, start_states.transpose(-1, -2)) * from_start[..., None]
    t = mark("off_diag", t)
    y = y.permute(0, 1, 3, 2, 4).reshape(b, nc * L, h, hd)[:, :p] + D.float()[:, None] * xf[:, :p]
    t = mark("skip", t)
    states = None
    if return_states:
        decay_t = torch.exp(df[:, :p] * Af)
        write_x = xf[:, :p] * df[:, :p, :, None]
        with torch.inference_mode(False):
            states = x.new_empty(b, p, h, hd, n, dtype=torch.float32)
        h_t = x.new_zeros(b, h, hd, n, dtype=torch.float32)
        t = mark("states_prepare", t)
        for pos in range(p):
            write = write_x[:, pos, :, :, None] * Bh[:, pos, :, None, :]
            h_t = torch.addcmul(write, decay_t[:, pos, :, None, None], h_t, out=states[:, pos])
        mark("states_loop", t)
    return y, states


def ssd_scan_parts(model, tokens, chunk_sizes=(64, 128, 256), repeats: int = 3,
                   package_states_chunk_sizes=None, states_chunk_sizes=(256,),
                   states_repeats: int = 1, compare_transformers: bool = True) -> Dict[str, object]:
    """One layer's Mamba-2 torch-backend scan, split into its steps, per chunk size.

    Captures layer 0's scan inputs with hooks. For each chunk size: the package's
    ``ssd_scan(backend="torch")`` without the states (median of ``repeats`` after
    a warm-up) and the replica's steps without the states. For
    ``package_states_chunk_sizes`` (default: all) the package call with the
    states (``states_repeats`` calls, no warm-up: each call writes a fresh
    ``[b, p, h, hd, n]`` tensor anyway), and for ``states_chunk_sizes`` the
    replica with the states. The replica's totals sit next to the package's so a
    drift between the two shows. With ``compare_transformers``, transformers'
    torch fallback ``mamba2_chunk_scan`` on the same inputs (Δ passed as is:
    no bias, no softplus) at each chunk size, median of ``repeats``.
    """
    from tl_mamba.ops.ssd import ssd_scan

    names = ["blocks.0.hook_x", "blocks.0.hook_delta", "blocks.0.hook_B", "blocks.0.hook_C"]
    _, cache = model.run_with_cache(tokens, names_filter=lambda name: name in names)
    x, delta, B, C = (cache[name].float() for name in names)
    del cache
    mixer = model.blocks[0].mixer
    A = -torch.exp(mixer.A_log.float())
    D = mixer.D.float()

    def med(fn, reps, warmup=1):
        for _ in range(warmup):
            fn()
        ts = []
        for _ in range(reps):
            start = time.perf_counter()
            out = fn()
            ts.append(time.perf_counter() - start)
            del out
        return statistics.median(ts)

    def replica_parts(chunk, return_states, reps, warmup):
        for _ in range(warmup):
            _ssd_replica(x, delta, A, B, C, D, chunk, defaultdict(float), return_states)
        runs = []
        for _ in range(reps):
            acc: Dict[str, float] = defaultdict(float)
            start = time.perf_counter()
            out = _ssd_replica(x, delta, A, B, C, D, chunk, acc, return_states)
            acc["total"] = time.perf_counter() - start
            del out
            runs.append(acc)
        keys = SSD_PARTS + (SSD_STATE_PARTS if return_states else ()) + ("total",)
        return {key: statistics.median(r.get(key, 0.0) for r in runs) for key in keys}

    out: Dict[str, object] = {"positions": int(x.shape[1]), "chunks": {}}
    for chunk in chunk_sizes:
        row: Dict[str, object] = {
            "scan": med(lambda: ssd_scan(x, delta, A, B, C, D, backend="torch", chunk_size=chunk), repeats),
            "replica": replica_parts(chunk, False, repeats, 1),
        }
        if compare_transformers:
            from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan

            row["transformers_scan"] = med(lambda: mamba2_chunk_scan(x, delta, A, B, C, chunk_size=chunk, D=D), repeats)
        if package_states_chunk_sizes is None or chunk in package_states_chunk_sizes:
            row["scan_with_states"] = med(
                lambda: ssd_scan(x, delta, A, B, C, D, backend="torch", chunk_size=chunk, return_states=True),
                states_repeats, warmup=0,
            )
        if chunk in states_chunk_sizes:
            row["replica_with_states"] = replica_parts(chunk, True, states_repeats, 0)
        out["chunks"][str(chunk)] = row
    return out
