"""The ``"triton"`` backend of the Mamba-2 scan: a chunked and a recurrent forward.

Which kernel runs (:func:`_forward`):

- **chunked** (``triton_chunked.py``, three kernels: per-chunk states, a pass over
  chunks, per-chunk outputs with ``tl.dot``): the plain forward, the dispatcher's
  knockout scans, the final state for generation. When every position's state is
  asked for (``return_states=True``: a ``hook_h`` cache or edit), a fourth kernel walks
  each chunk from its starting state and writes the states, all chunks in parallel.
  With autograd on it also serves the backward's chunk-boundary states (below) when
  the backward's chunk T fits the kernel's chunks: T ≤ Q (the kernel then runs with
  chunks of T) or T a multiple of Q (``Q = triton_chunked.CHUNK_SIZE``, 64).
- **recurrent** (``_ssd_fwd_kernel`` here) for p = 0 and for a backward chunk T > Q
  that is not a multiple of Q: one sequential walk over all p positions. Until
  2026-12-04 it also served ``return_states``; on an H200 (130m widths, p = 2048) its
  b·h·2 programs wrote the states at ~0.2 TB/s, 7 ms a layer.

The recurrent kernel: one program per (sequence, head, block of ``BLOCK_HD`` head
channels) holds its ``[BLOCK_HD, n]`` slice of the state in registers, in fp32
(float64 for float64 inputs), and walks the positions:

    h = exp(Δ_t A_h) h + (Δ_t x_t) ⊗ B_t,    y_t = h C_t + D_h x_t   (D skip fused)

B and C are read from the head's group. Knockouts and state edits are applied by the
dispatcher (``tl_mamba.ops.ssd``), around either kernel.

Gradients: a chunked recompute (``tl_mamba.ops.triton_scan``). With autograd on,
the forward also returns the state every ``T`` positions (``boundary_every``): the
chunked kernels' chunk-starting states (every T/Q-th of them), or the recurrent
kernel's own boundary output. The backward recomputes one chunk of ``T`` positions at
a time through the ``"torch"`` backend from its saved initial state, last chunk
first, so its memory is linear in p.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (set before
anything imports triton).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from tl_mamba.ops.precision import compute_dtype
from tl_mamba.ops.ssd import SAME_PASS_KNOCKOUT, triton_chunked
from tl_mamba.ops.triton_scan import run_triton_scan

BACKWARD_CHUNK = 2048
"""Positions per recomputed chunk (T) in this backend's backward, by default.

Larger than Mamba-1's (``tl_mamba.ops.triton_scan.BACKWARD_CHUNK``, 64) because the
recompute here is the torch chunked SSD form, whose graph for T positions holds only
T/Q chunk states and the [h, Q, Q] decay tiles (not T per-position states), while
each recomputed chunk costs a fixed ~100 kernel launches. Measured on an H200
(2026-12-04, 130m widths, p = 2048, fp32, forward + backward of one scan): 89 ms at
T = 64, 18-21 ms at T = 512, 10.5 ms at T = 2048, where the torch backend's own
autograd took 12 ms (docs/performance.md, "GPU")."""

RECOMPUTE_CHUNK = 64
"""Chunk length Q of the torch SSD form inside the backward's recompute: the 64 those H200
timings were taken at. (The torch backend's own default, ``ssd.chunked.DEFAULT_CHUNK``, is
tuned on a CPU and was not timed on a GPU.)"""


@triton.jit
def _ssd_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr,
    y_ptr, h_final_ptr, states_ptr, bounds_ptr,
    p, h, hd, g, n, every, n_bounds,
    HAS_D: tl.constexpr, HAS_H0: tl.constexpr, STORE_STATES: tl.constexpr, STORE_BOUNDS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # x, y: [b, p, h, hd]; dt: [b, p, h]; A, D: [h]; B, C: [b, p, g, n];
    # h0, h_final: [b, h, hd, n]; states: [b, p, h, hd, n]; bounds: [b, n_bounds, h, hd, n]
    # (the state after positions every-1, 2·every-1, ... short of the last); all contiguous.
    # ACC: fp32, or fp64 for float64 inputs.
    pid_b = tl.program_id(0).to(tl.int64)  # int64 offsets (tl_mamba.ops.triton_scan, "Offsets")
    pid_h = tl.program_id(1)
    pid_d = tl.program_id(2)
    group = pid_h // (h // g)
    offs_d = pid_d * BLOCK_HD + tl.arange(0, BLOCK_HD)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < hd
    mask_n = offs_n < n
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn_offsets = offs_d[:, None] * n + offs_n[None, :]
    A = tl.load(A_ptr + pid_h).to(ACC)
    if HAS_D:
        D = tl.load(D_ptr + pid_h).to(ACC)
    state_base = (pid_b * h + pid_h) * hd * n
    if HAS_H0:
        state = tl.load(h0_ptr + state_base + dn_offsets, mask=mask_dn, other=0.0).to(ACC)
    else:
        state = tl.zeros((BLOCK_HD, BLOCK_N), dtype=ACC)
    for t in range(0, p):
        row = pid_b * p + t
        x = tl.load(x_ptr + (row * h + pid_h) * hd + offs_d, mask=mask_d, other=0.0).to(ACC)
        dt = tl.load(dt_ptr + row * h + pid_h).to(ACC)
        Bt = tl.load(B_ptr + (row * g + group) * n + offs_n, mask=mask_n, other=0.0).to(ACC)
        Ct = tl.load(C_ptr + (row * g + group) * n + offs_n, mask=mask_n, other=0.0).to(ACC)
        state = tl.exp(dt * A) * state + (dt * x)[:, None] * Bt[None, :]
        y = tl.sum(state * Ct[None, :], axis=1)
        if HAS_D:
            y += D * x
        tl.store(y_ptr + (row * h + pid_h) * hd + offs_d, y, mask=mask_d)
        if STORE_STATES:
            tl.store(states_ptr + (row * h + pid_h) * hd * n + dn_offsets, state, mask=mask_dn)
        if STORE_BOUNDS:
            if (t + 1) % every == 0:
                if t + 1 < p:
                    bound = (pid_b * n_bounds + (t + 1) // every - 1) * h + pid_h
                    tl.store(bounds_ptr + bound * hd * n + dn_offsets, state, mask=mask_dn)
    tl.store(h_final_ptr + state_base + dn_offsets, state, mask=mask_dn)


def _recurrent_forward(x, delta, A, B, C, D, initial_state, return_states: bool, block_hd: Optional[int] = None,
                       boundary_every: Optional[int] = None):
    """Launch the recurrent kernel: ``(y, final_state, states or None)``, in fp32 (float64 if any input is).

    With ``boundary_every=T`` it also returns, fourth, the states after positions
    T-1, 2T-1, ... (the initial states of the chunks of T positions after the first):
    ``[b, ceil(p/T) - 1, h, hd, n]``, what the chunked-recompute backward keeps.
    """
    b, p, h, hd = x.shape
    g, n = B.shape[-2:]
    acc = compute_dtype(x, delta, A, B, C, initial_state)
    x, delta, A, B, C = (t.contiguous() for t in (x, delta, A, B, C))
    D = None if D is None else D.contiguous()
    h0 = None if initial_state is None else initial_state.to(acc).contiguous()
    y = torch.empty(b, p, h, hd, device=x.device, dtype=acc)
    h_final = torch.empty(b, h, hd, n, device=x.device, dtype=acc)
    states = torch.empty(b, p, h, hd, n, device=x.device, dtype=acc) if return_states else y
    n_bounds = 0 if boundary_every is None else max(triton.cdiv(p, boundary_every) - 1, 0)
    bounds = torch.empty(b, n_bounds, h, hd, n, device=x.device, dtype=acc)
    block_n = triton.next_power_of_2(n)
    block_hd = block_hd or max(1, min(triton.next_power_of_2(hd), 4096 // block_n))
    grid = (b, h, triton.cdiv(hd, block_hd))
    _ssd_fwd_kernel[grid](
        x, delta, A, B, C, D if D is not None else A, h0 if h0 is not None else h_final,
        y, h_final, states, bounds if n_bounds else y, p, h, hd, g, n, boundary_every or 1, n_bounds,
        HAS_D=D is not None, HAS_H0=h0 is not None, STORE_STATES=return_states, STORE_BOUNDS=n_bounds > 0,
        ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_HD=block_hd, BLOCK_N=block_n,
    )
    out = y, h_final, (states if return_states else None)
    return out if boundary_every is None else (*out, bounds)


SAME_PASS = True
"""Whether the dispatcher applies a single S → T knockout in the same pass as the chunked
kernels (``triton_chunked.ssd_chunked_triton(removal=...)``) rather than edge by edge or
by a separate scan (the route every backend has). The kernels carry a second state and a
second ``[Q, Q] @ [Q, hd]`` product; at 64 × 64 tiles they spilled registers (an H200,
2026-12-04, 130m widths, p = 2048: the three kernels 6.6 ms against 0.68 plain; the
model, 4 layers, 5.0x plain where the edge route took 1.6-1.8x), so the knockout uses
32 × 32 tiles (``triton_chunked.TILE_CAPS``): 1.26 ms, 1.8x the plain kernels (1.1x in
bf16). The model-level ratio with those tiles is predicted (~1.3x), not yet measured."""

def fuses_knockout() -> bool:
    """Whether the dispatcher applies a single S → T knockout in the chunked kernels' pass:
    :data:`SAME_PASS`, unless that kernel failed on this GPU (then never again)."""
    from tl_mamba.ops.triton_scan import _FAILED_KERNELS

    return SAME_PASS and SAME_PASS_KNOCKOUT not in _FAILED_KERNELS


def _chunk_for(p: int, boundary_every: Optional[int], chunk_size: Optional[int]) -> Optional[int]:
    """The chunk length Q for the chunked kernels, or None where the recurrent kernel runs."""
    if p == 0:
        return None
    q = triton_chunked.CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if boundary_every is not None:  # the chunk starts must include every T-th state
        if boundary_every <= q:
            q = boundary_every
        elif boundary_every % q:
            return None
    return q


def _forward(x, delta, A, B, C, D, initial_state, return_states: bool, block_hd: Optional[int] = None,
             boundary_every: Optional[int] = None, chunk_size: Optional[int] = None, removal=None):
    """The backend's forward: ``(y, final_state, states or None)`` in fp32 (float64 if any input is).

    Chunked kernels (chunks of ``chunk_size``, default ``triton_chunked.CHUNK_SIZE``),
    plus the per-chunk state walk when ``return_states``; the recurrent kernel where
    :func:`_chunk_for` says so (p = 0, or a backward chunk the chunks do not divide).
    ``removal``: one ``EdgeRemoval`` applied in the same pass by the chunked kernels
    (``triton_chunked.ssd_chunked_triton``).
    With ``boundary_every=T`` it also returns, fourth, the states after positions
    T-1, 2T-1, ... (the initial states of the chunks of T positions after the first):
    ``[b, ceil(p/T) - 1, h, hd, n]``, what the chunked-recompute backward keeps.
    """
    q = _chunk_for(x.shape[1], boundary_every, chunk_size)
    if q is None:
        if removal is not None:
            raise ValueError("a knockout in the same pass needs the chunked kernels (p >= 1, no backward chunk)")
        return _recurrent_forward(x, delta, A, B, C, D, initial_state, return_states, block_hd=block_hd,
                                  boundary_every=boundary_every)
    y, final, starts = triton_chunked.ssd_chunked_triton(x, delta, A, B, C, D, initial_state, chunk_size=q,
                                                         block_hd=block_hd, removal=removal)
    states = triton_chunked.chunk_states_triton(x, delta, A, B, starts, q) if return_states else None
    if boundary_every is None:
        return y, final, states
    # starts[:, c] is the state after position c·q - 1, and q divides T (_chunk_for): the
    # boundaries are every (T/q)-th chunk start from the (T/q)-th on
    step = boundary_every // q
    n_bounds = max(triton.cdiv(x.shape[1], boundary_every) - 1, 0)
    bounds = starts[:, step::step][:, :n_bounds]
    if step > 1:  # a copy, so that the other chunk starts are not kept alive for the backward
        bounds = bounds.contiguous()
    return y, final, states, bounds


def ssd_triton(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    *,
    initial_state: Optional[Tensor] = None,
    return_states: bool = False,
    backward_chunk: Optional[int] = None,
    chunk_size: Optional[int] = None,
    removal=None,
):
    """Triton Mamba-2 scan. Shapes as in ``tl_mamba.ops.ssd.ssd_scan``.

    Outputs fp32 (float64 for float64 inputs). Which kernels run: see the module docstring.

    ``backward_chunk``: positions per recomputed chunk in the backward (default
    :data:`BACKWARD_CHUNK`, a multiple of Q). ``chunk_size``: Q of the chunked
    kernels (default ``triton_chunked.CHUNK_SIZE``); results do not depend on it.
    ``removal``: one ``EdgeRemoval`` applied in the same pass (no autograd; the
    dispatcher, ``tl_mamba.ops.ssd.ssd_scan``, decides).
    """
    from tl_mamba.ops.ssd import SSDOutput
    from tl_mamba.ops.ssd.chunked import ssd_chunked

    forward = _forward if chunk_size is None else functools.partial(_forward, chunk_size=chunk_size)
    recompute = functools.partial(ssd_chunked, chunk_size=RECOMPUTE_CHUNK)
    return run_triton_scan(forward, recompute, SSDOutput, "SSD scan", x, delta, A, B, C, D,
                           initial_state, return_states,
                           backward_chunk=BACKWARD_CHUNK if backward_chunk is None else backward_chunk,
                           removal=removal)
