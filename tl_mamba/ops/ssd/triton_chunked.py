"""The chunked SSD forward of the ``"triton"`` Mamba-2 backend (three kernels).

The sequence is cut into chunks of Q positions (:data:`CHUNK_SIZE`, 64 by default;
the last chunk may be shorter and is masked). With dA_t = Δ_t A_h, per chunk and head:

1. ``_chunk_state_kernel`` — what the chunk writes into its end state, from its own
   inputs only: ``S_c = Σ_s exp(Σ_{k>s} dA_k) Δ_s x_s ⊗ B_s``, one ``tl.dot``
   ``[hd, Q] @ [Q, n]``; also the chunk's total log-decay ``Σ_s dA_s``.
2. ``_state_passing_kernel`` — the one sequential pass, over chunks rather than
   positions: ``h_c = exp(Σ dA) h_{c-1} + S_c`` from the initial state (zeros if
   none). It overwrites the ``S_c`` buffer with each chunk's *starting* state and
   writes the final state.
3. ``_chunk_scan_kernel`` — the output, all positions of a chunk at once:
   ``y = ((C Bᵀ) ∘ L ∘ Δ_j) x  +  exp(Σ_{k≤i} dA_k) · (C h_start)  +  D x`` with
   ``L[i, j] = exp(Σ_{j<k≤i} dA_k)`` for j ≤ i, 0 above the diagonal; three ``tl.dot``
   (``C Bᵀ`` and ``C h_startᵀ`` accumulated over blocks of n, then ``[Q, Q] @ [Q, hd]``).
4. ``_chunk_states_kernel`` — only when every position's state is asked for (``hook_h``):
   from each chunk's starting state, the recurrence over the chunk's positions, one
   program per (sequence, chunk, head, state tile), writing each state.

B and C are read from the head's group (``head // (h // g)``). Every exponent is a
sum of ≤ 0 terms within one chunk (an inclusive, reverse or segment cumulative sum; the
reverse one less its own first term), never a difference of two long cumulative sums,
so nothing overflows and cancellation costs at most an ulp of a chunk's sum, as in the
torch backend (``chunked.py``). Inputs of any float dtype are
loaded and upcast to fp32 (float64 for float64 inputs); states, dot products and the
output are in that dtype. The dots run with ``input_precision=DOT_PRECISION``
(``"ieee"``: exact fp32 products; ``"tf32"`` would use tensor cores at ~1e-3 relative
error: not used, but timed beside the default by ``benchmarks/bench_triton_gpu.py``,
``chunked_tf32_dots``, with its error against float64).

Parallelism: kernels 1, 3 and 4 run one program per (sequence, chunk, head, block of
head channels or state tile); only kernel 2 is sequential, over p / Q chunks. Compare
the recurrent kernel (``triton_kernel.py``), sequential over all p positions.

The starting states of the chunks are returned: the dispatcher's caller
(``triton_kernel._forward``) uses them as the chunk-boundary states that the
chunked-recompute backward (``tl_mamba.ops.triton_scan``) saves.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from tl_mamba.ops.precision import compute_dtype

CHUNK_SIZE = 64
"""Q, positions per chunk of the chunked kernels (a Q×Q tile per chunk and head)."""

DOT_PRECISION = "ieee"
"""``input_precision`` of the kernels' ``tl.dot`` for fp32 operands (see the module docstring)."""

TILE_CAPS = {("plain", "fp32"): (32, 64), ("plain", "16-bit"): (32, 64),
             ("knockout", "fp32"): (32, 32), ("knockout", "16-bit"): (32, 32)}
"""The largest default (hd, n) tiles of the chunked kernels, by whether a knockout runs in
the same pass and the inputs' width (float64 counts as fp32). Measured on an H200
(2026-12-04, Triton 3.6; 130m widths: hd 64, n 128; p = 2048;
``benchmarks/results/triton_gpu_scans.md``), the three kernels of one scan: plain fp32
0.68 ms at 64 × 64 (0.72 at 32 × 64), plain bf16 1.17 ms at 64 × 64 but 0.76 at 32 × 64;
with a knockout in the same pass (a second state and a second product per tile) 6.6 ms
at 64 × 64, 2.3 (fp32) / 1.4 (bf16) at 32 × 64, 1.26 / 1.28 at 32 × 32 and 1.4 at
16 × 32: the large tiles spill registers. Plain fp32 is 32 × 64 since 2026-12-06, not
from a timing: compiled by ``benchmarks/compile_triton.py`` with the ptxas of Triton 3.9
(CUDA 13.4 for sm_90, 12.9 for sm_80), at 64 × 64 ``_chunk_state_kernel`` spills 5.1 KB
per thread on sm_90 and ``_chunk_scan_kernel`` 18 KB on sm_80, where Triton 3.6's ptxas
(12.8, the H200's) spilled 0 and 80 B; at 32 × 64 the two kernels spill at most 44 B on
sm_90 and 812 B on sm_80 with either ptxas (docs/performance.md, "Compiled without a
GPU"). The GPU bench times both tiles (``plain_chunked_kernels_*``)."""


def default_tiles(hd: int, n: int, dtype: torch.dtype, knockout: bool):
    """``(block_hd, block_n)`` for the chunked kernels: :data:`TILE_CAPS`, fitted to hd and n."""
    cap_hd, cap_n = TILE_CAPS[("knockout" if knockout else "plain",
                               "16-bit" if dtype in (torch.bfloat16, torch.float16) else "fp32")]
    return _block(hd, cap_hd), _block(n, cap_n)


@triton.jit
def _state_tile(nc, h, g, hd, n, BLOCK_HD: tl.constexpr, BLOCK_N: tl.constexpr):
    # a program of a (sequence·chunk, head, hd block·n block) grid: which sequence, chunk,
    # head and group, and the offsets and masks of its [BLOCK_HD, BLOCK_N] state tile
    pid_b = (tl.program_id(0) // nc).to(tl.int64)  # int64 offsets (tl_mamba.ops.triton_scan, "Offsets")
    pid_c = tl.program_id(0) % nc
    pid_h = tl.program_id(1)
    n_blocks_n = tl.cdiv(n, BLOCK_N)
    offs_d = (tl.program_id(2) // n_blocks_n) * BLOCK_HD + tl.arange(0, BLOCK_HD)
    offs_n = (tl.program_id(2) % n_blocks_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_b, pid_c, pid_h, pid_h // (h // g), offs_d, offs_n, offs_d < hd, offs_n < n


@triton.jit
def _sources(src_ptr, feat_ptr, rows, mask_q, pid_h, HAS_FEAT: tl.constexpr, ACC: tl.constexpr):
    # a knockout's source weight of each row of the chunk, times the head's feature flag
    src = tl.load(src_ptr + rows, mask=mask_q, other=0.0).to(ACC)
    if HAS_FEAT:
        src = src * tl.load(feat_ptr + pid_h).to(ACC)
    return src


@triton.jit
def _chunk_state_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, states_ptr, logdecay_ptr, src_ptr, feat_ptr, ko_states_ptr,
    p, h, hd, g, n, nc, Q,
    ACC: tl.constexpr, PREC: tl.constexpr, HAS_KO: tl.constexpr, HAS_FEAT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # x: [b, p, h, hd]; dt: [b, p, h]; A: [h]; B: [b, p, g, n]; states: [b, nc, h, hd, n];
    # logdecay: [b, nc, h]. Knockout (HAS_KO): src [b, p], feat [h] (HAS_FEAT), and
    # ko_states [b, nc, h, hd, n], what the chunk's sources alone write.
    # Program: (sequence·chunk, head, hd block·n block).
    pid_b, pid_c, pid_h, group, offs_d, offs_n, mask_d, mask_n = _state_tile(nc, h, g, hd, n, BLOCK_HD, BLOCK_N)
    offs_q = tl.arange(0, BLOCK_Q)
    mask_q = (offs_q < Q) & (pid_c * Q + offs_q < p)
    rows = pid_b * p + pid_c * Q + offs_q  # flat (sequence, position) index of each row

    dt = tl.load(dt_ptr + rows * h + pid_h, mask=mask_q, other=0.0).to(ACC)  # 0 past the end: no decay, no write
    dA = dt * tl.load(A_ptr + pid_h).to(ACC)
    to_end = tl.cumsum(dA, axis=0, reverse=True) - dA  # Σ_{k>s} dA_k: decay from s to the chunk's end
    scale = tl.where(mask_q, tl.exp(to_end) * dt, 0.0)
    xT = tl.load(x_ptr + (rows[None, :] * h + pid_h) * hd + offs_d[:, None],
                 mask=mask_d[:, None] & mask_q[None, :], other=0.0).to(ACC)  # [BLOCK_HD, BLOCK_Q]
    Bq = tl.load(B_ptr + (rows[:, None] * g + group) * n + offs_n[None, :],
                 mask=mask_q[:, None] & mask_n[None, :], other=0.0).to(ACC)  # [BLOCK_Q, BLOCK_N]
    xs = xT * scale[None, :]
    state = tl.dot(xs, Bq, input_precision=PREC)  # [BLOCK_HD, BLOCK_N]
    head = (pid_b * nc + pid_c) * h + pid_h
    tl.store(states_ptr + (head * hd + offs_d[:, None]) * n + offs_n[None, :], state.to(ACC),
             mask=mask_d[:, None] & mask_n[None, :])
    if HAS_KO:
        src = _sources(src_ptr, feat_ptr, rows, mask_q, pid_h, HAS_FEAT, ACC)
        knocked = tl.dot(xs * src[None, :], Bq, input_precision=PREC)
        tl.store(ko_states_ptr + (head * hd + offs_d[:, None]) * n + offs_n[None, :], knocked.to(ACC),
                 mask=mask_d[:, None] & mask_n[None, :])
    tl.store(logdecay_ptr + head, tl.sum(dA, axis=0), mask=tl.program_id(2) == 0)


@triton.jit
def _state_passing_kernel(
    states_ptr, logdecay_ptr, h0_ptr, final_ptr,
    h, size, nc,
    HAS_H0: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    # states: [b, nc, h, size] in: each chunk's own writes; out: each chunk's starting state.
    # h0, final: [b, h, size]; size = hd·n. Program: (sequence, head, block of state entries).
    pid_b = tl.program_id(0).to(tl.int64)  # int64 offsets (tl_mamba.ops.triton_scan, "Offsets")
    pid_h = tl.program_id(1)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < size
    base = (pid_b * h + pid_h) * size
    if HAS_H0:
        state = tl.load(h0_ptr + base + offs, mask=mask, other=0.0).to(ACC)
    else:
        state = tl.zeros((BLOCK,), dtype=ACC)
    for c in range(0, nc):
        head = (pid_b * nc + c) * h + pid_h
        written = tl.load(states_ptr + head * size + offs, mask=mask, other=0.0)
        tl.store(states_ptr + head * size + offs, state, mask=mask)
        state = tl.exp(tl.load(logdecay_ptr + head)) * state + written
    tl.store(final_ptr + base + offs, state, mask=mask)


@triton.jit
def _chunk_scan_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, starts_ptr, y_ptr, src_ptr, tgt_ptr, feat_ptr, ko_starts_ptr,
    p, h, hd, g, n, nc, Q,
    HAS_D: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, HAS_KO: tl.constexpr, HAS_FEAT: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # starts: [b, nc, h, hd, n], each chunk's starting state; y: [b, p, h, hd].
    # Knockout (HAS_KO): src, tgt [b, p], feat [h] (HAS_FEAT), ko_starts [b, nc, h, hd, n]
    # (the sources-only scan's chunk starts); y -= tgt_i · Σ_{j≤i} src_j α[i, j] x_j.
    # Program: (sequence·chunk, head, hd block).
    pid_bc = tl.program_id(0)
    pid_b = (pid_bc // nc).to(tl.int64)  # int64 offsets (tl_mamba.ops.triton_scan, "Offsets")
    pid_c = pid_bc % nc
    pid_h = tl.program_id(1)
    pid_d = tl.program_id(2)
    group = pid_h // (h // g)
    offs_q = tl.arange(0, BLOCK_Q)
    mask_q = (offs_q < Q) & (pid_c * Q + offs_q < p)
    rows = pid_b * p + pid_c * Q + offs_q
    offs_d = pid_d * BLOCK_HD + tl.arange(0, BLOCK_HD)
    mask_d = offs_d < hd
    head = (pid_b * nc + pid_c) * h + pid_h

    dt = tl.load(dt_ptr + rows * h + pid_h, mask=mask_q, other=0.0).to(ACC)
    dA = dt * tl.load(A_ptr + pid_h).to(ACC)
    from_start = tl.cumsum(dA, axis=0)  # Σ_{k≤i} dA_k: decay from the chunk's start to i
    # seg[i, j] = Σ_{j<k≤i} dA_k, summed directly: a cumulative sum down i of dA_i masked to i > j
    seg = tl.cumsum(tl.where(offs_q[:, None] > offs_q[None, :], dA[:, None], 0.0), axis=0)
    causal = offs_q[:, None] >= offs_q[None, :]

    cb = tl.zeros((BLOCK_Q, BLOCK_Q), dtype=ACC)  # C_i · B_j
    off = tl.zeros((BLOCK_Q, BLOCK_HD), dtype=ACC)  # C_i · h_start
    off_ko = tl.zeros((BLOCK_Q, BLOCK_HD), dtype=ACC)  # C_i · (the sources-only scan's h_start)
    for k in range(0, n, BLOCK_N):
        offs_n = k + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n
        Cq = tl.load(C_ptr + (rows[:, None] * g + group) * n + offs_n[None, :],
                     mask=mask_q[:, None] & mask_n[None, :], other=0.0).to(ACC)  # [BLOCK_Q, BLOCK_N]
        BT = tl.load(B_ptr + (rows[None, :] * g + group) * n + offs_n[:, None],
                     mask=mask_n[:, None] & mask_q[None, :], other=0.0).to(ACC)  # [BLOCK_N, BLOCK_Q]
        ST = tl.load(starts_ptr + (head * hd + offs_d[None, :]) * n + offs_n[:, None],
                     mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(ACC)  # [BLOCK_N, BLOCK_HD]
        cb += tl.dot(Cq, BT, input_precision=PREC).to(ACC)
        off += tl.dot(Cq, ST, input_precision=PREC).to(ACC)
        if HAS_KO:
            KT = tl.load(ko_starts_ptr + (head * hd + offs_d[None, :]) * n + offs_n[:, None],
                         mask=mask_n[:, None] & mask_d[None, :], other=0.0).to(ACC)
            off_ko += tl.dot(Cq, KT, input_precision=PREC).to(ACC)

    weights = tl.where(causal, cb * tl.exp(seg) * dt[None, :], 0.0)  # [BLOCK_Q, BLOCK_Q]
    xq = tl.load(x_ptr + (rows[:, None] * h + pid_h) * hd + offs_d[None, :],
                 mask=mask_q[:, None] & mask_d[None, :], other=0.0).to(ACC)  # [BLOCK_Q, BLOCK_HD]
    y = tl.dot(weights, xq, input_precision=PREC).to(ACC) + off * tl.exp(from_start)[:, None]
    if HAS_KO:  # the same read-out of the sources alone, subtracted at the targets (D x is no edge)
        src = _sources(src_ptr, feat_ptr, rows, mask_q, pid_h, HAS_FEAT, ACC)
        tgt = tl.load(tgt_ptr + rows, mask=mask_q, other=0.0).to(ACC)
        removed = tl.dot(weights * src[None, :], xq, input_precision=PREC).to(ACC) \
            + off_ko * tl.exp(from_start)[:, None]
        y -= tgt[:, None] * removed
    if HAS_D:
        y += tl.load(D_ptr + pid_h).to(ACC) * xq
    tl.store(y_ptr + (rows[:, None] * h + pid_h) * hd + offs_d[None, :], y,
             mask=mask_q[:, None] & mask_d[None, :])


@triton.jit
def _chunk_states_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, starts_ptr, states_ptr,
    p, h, hd, g, n, nc, Q,
    ACC: tl.constexpr, BLOCK_HD: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # starts: [b, nc, h, hd, n], each chunk's starting state (kernel 2's output);
    # states: [b, p, h, hd, n], every position's state after its update.
    # Program: (sequence·chunk, head, hd block·n block); it walks its chunk's ≤ Q positions.
    pid_b, pid_c, pid_h, group, offs_d, offs_n, mask_d, mask_n = _state_tile(nc, h, g, hd, n, BLOCK_HD, BLOCK_N)
    mask_dn = mask_d[:, None] & mask_n[None, :]
    dn = offs_d[:, None] * n + offs_n[None, :]
    state = tl.load(starts_ptr + ((pid_b * nc + pid_c) * h + pid_h) * hd * n + dn, mask=mask_dn,
                    other=0.0).to(ACC)
    A = tl.load(A_ptr + pid_h).to(ACC)
    for t in range(pid_c * Q, tl.minimum(pid_c * Q + Q, p)):
        row = pid_b * p + t
        x = tl.load(x_ptr + (row * h + pid_h) * hd + offs_d, mask=mask_d, other=0.0).to(ACC)
        dt = tl.load(dt_ptr + row * h + pid_h).to(ACC)
        Bt = tl.load(B_ptr + (row * g + group) * n + offs_n, mask=mask_n, other=0.0).to(ACC)
        state = tl.exp(dt * A) * state + (dt * x)[:, None] * Bt[None, :]
        tl.store(states_ptr + (row * h + pid_h) * hd * n + dn, state, mask=mask_dn)


def chunk_states_triton(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, starts: Tensor,
                        chunk_size: int) -> Tensor:
    """Every position's state ``[b, p, h, hd, n]`` from the chunks' starting states.

    ``starts`` is :func:`ssd_chunked_triton`'s third output for the same inputs and
    ``chunk_size``. One program per (sequence, chunk, head, tile of the state) walks
    its chunk's positions, so the p·h·hd·n values (what ``hook_h`` caches) are written
    by b·⌈p/Q⌉·h·tiles programs in parallel, Q steps deep, instead of by the recurrent
    kernel's b·h·tiles programs p steps deep. Dtype: ``starts``'s (fp32, or float64).
    """
    b, p, h, hd = x.shape
    g, n = B.shape[-2:]
    Q = min(int(chunk_size), p)
    nc = triton.cdiv(p, Q)
    if tuple(starts.shape) != (b, nc, h, hd, n):
        raise ValueError(f"starts must be [b, ceil(p/Q), h, hd, n] = {(b, nc, h, hd, n)}, got {tuple(starts.shape)}")
    x, delta, A, B, starts = (t.contiguous() for t in (x, delta, A, B, starts))
    states = torch.empty(b, p, h, hd, n, device=x.device, dtype=starts.dtype)
    block_hd = _block(hd, 32)
    block_n = _block(n, 64)
    _chunk_states_kernel[(b * nc, h, triton.cdiv(hd, block_hd) * triton.cdiv(n, block_n))](
        x, delta, A, B, starts, states, p, h, hd, g, n, nc, Q,
        ACC=tl.float64 if starts.dtype == torch.float64 else tl.float32, BLOCK_HD=block_hd, BLOCK_N=block_n)
    return states


def _block(size: int, cap: int) -> int:
    # a power of 2, at least 16 (tl.dot's smallest tile on tensor cores), at most cap
    return max(16, min(cap, triton.next_power_of_2(size)))


def ssd_chunked_triton(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                       initial_state: Optional[Tensor], chunk_size: Optional[int] = None,
                       block_hd: Optional[int] = None, block_n: Optional[int] = None, removal=None):
    """Run the three chunked kernels: ``(y, final_state, chunk_starts)``.

    Shapes as in ``tl_mamba.ops.ssd.ssd_scan`` (p ≥ 1). ``chunk_starts`` is
    ``[b, ceil(p/Q), h, hd, n]``: the state before each chunk of Q positions
    (``chunk_starts[:, c]`` is the state after position c·Q - 1; index 0 is the initial
    state, or zeros). All outputs in fp32 (float64 if any input is).

    ``removal`` (an ``EdgeRemoval``: sources and targets ``[b, p]``, features ``[h]``
    or None) is applied in the same pass: the kernels carry a second state, that of
    the sources' inputs alone (from zero: the initial state is not an edge), with the
    same decays and loads, and subtract its read-out at the targets:
    ``y_i -= t_i Σ_{j≤i} s_j α[i, j] x_j``. Final state and chunk starts stay the plain
    scan's, as on every backend (a knockout changes only y).

    ``block_hd`` and ``block_n`` (powers of 2, ≥ 16) tile hd and n; by default
    :func:`default_tiles` (measured per dtype, and smaller with a knockout).
    """
    b, p, h, hd = x.shape
    g, n = B.shape[-2:]
    if p < 1:
        raise ValueError("ssd_chunked_triton needs at least one position")
    Q = min(CHUNK_SIZE if chunk_size is None else int(chunk_size), p)
    if Q < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    nc = triton.cdiv(p, Q)
    acc = compute_dtype(x, delta, A, B, C, initial_state)
    acc_tl = tl.float64 if acc == torch.float64 else tl.float32
    x, delta, A, B, C = (t.contiguous() for t in (x, delta, A, B, C))
    D = None if D is None else D.contiguous()
    h0 = None if initial_state is None else initial_state.to(acc).contiguous()
    block_q = _block(Q, 1 << 30)
    tiles_hd, tiles_n = default_tiles(hd, n, x.dtype, removal is not None)
    block_hd, block_n = block_hd or tiles_hd, block_n or tiles_n
    starts = torch.empty(b, nc, h, hd, n, device=x.device, dtype=acc)
    logdecay = torch.empty(b, nc, h, device=x.device, dtype=acc)
    final = torch.empty(b, h, hd, n, device=x.device, dtype=acc)
    y = torch.empty(b, p, h, hd, device=x.device, dtype=acc)
    tiles = dict(BLOCK_Q=block_q, BLOCK_HD=block_hd, BLOCK_N=block_n)
    src = tgt = feat = ko_starts = y  # placeholders, never read without HAS_KO / HAS_FEAT
    if removal is not None:
        src, tgt = (t.to(x.device, acc).contiguous() for t in (removal.sources, removal.targets))
        if removal.features is not None:
            feat = removal.features.to(x.device, acc).contiguous()
        ko_starts = torch.empty_like(starts)
    knockout = dict(HAS_KO=removal is not None, HAS_FEAT=removal is not None and removal.features is not None)

    _chunk_state_kernel[(b * nc, h, triton.cdiv(hd, block_hd) * triton.cdiv(n, block_n))](
        x, delta, A, B, starts, logdecay, src, feat, ko_starts, p, h, hd, g, n, nc, Q,
        ACC=acc_tl, PREC=DOT_PRECISION, **knockout, **tiles)
    block_s = min(1024, triton.next_power_of_2(hd * n))
    passing_grid = (b, h, triton.cdiv(hd * n, block_s))
    _state_passing_kernel[passing_grid](
        starts, logdecay, h0 if h0 is not None else final, final, h, hd * n, nc,
        HAS_H0=h0 is not None, ACC=acc_tl, BLOCK=block_s)
    if removal is not None:  # the sources-only chain: same decays, from zero; its final state unused
        _state_passing_kernel[passing_grid](
            ko_starts, logdecay, final, torch.empty_like(final), h, hd * n, nc,
            HAS_H0=False, ACC=acc_tl, BLOCK=block_s)
    _chunk_scan_kernel[(b * nc, h, triton.cdiv(hd, block_hd))](
        x, delta, A, B, C, D if D is not None else A, starts, y, src, tgt, feat, ko_starts,
        p, h, hd, g, n, nc, Q,
        HAS_D=D is not None, ACC=acc_tl, PREC=DOT_PRECISION, **knockout, **tiles)
    return y, final, starts
