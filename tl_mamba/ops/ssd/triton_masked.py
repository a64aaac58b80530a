"""Mamba-2 knockout through masked tiles: the removed part of y for a general p×p mask.

For a dense ``hook_ssm_mask`` M with many column patterns, the dispatcher
(``tl_mamba.ops.knockout.knocked_out_terms``) asks for

    removed[i, h] = Σ_{j ≤ i} R_h[i, j] · α_h[i, j] · x_j[h],     R = (1 - M) on and below the diagonal,
    α_h[i, j] = (C_i · B_j) · exp(A_h Σ_{k=j+1..i} Δ_k[h]) · Δ_j[h],

which is causal linear attention with a decay, computed the way flash attention
computes attention: one program per (sequence and head, tile of ``BLOCK_I`` targets,
block of head channels) walks the source tiles up to its diagonal, forms the tile of α
from ``tl.dot(C_i, B_jᵀ)`` and the decays, multiplies in the tile of R, and
accumulates ``tl.dot(tile, x_j)``. Nothing of size p×p is written besides the mask
itself. ``torch`` equivalent (the fallback, differentiable):
``tl_mamba.ops.knockout.dense_removed_terms_bphd``.

Precision: the cumulative sums of Δ come in float64, so a decay between two late
positions is a difference of sums without cancellation; the rest is fp32 (float64
for float64 inputs), dots in ``triton_chunked.DOT_PRECISION``. No backward: with
autograd on, :func:`masked_removed_terms_triton` hands over to the torch form.
Checked against α built position by position (``tests/test_triton.py``) in Triton's CPU
interpreter and compiled on an H200 (2026-12-04, small shapes); timed there at 130m
widths, p = 2048, but not checked at that size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from tl_mamba.ops.precision import compute_dtype, needs_grad
from tl_mamba.ops.ssd import triton_chunked
from tl_mamba.ops.triton_scan import kernel_or_fallback

BLOCK_I = 32
"""Targets (and sources) per tile."""


@triton.jit
def _masked_removed_terms_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, R_ptr, cs_ptr, out_ptr,
    p, h, hd, g, n, heads_per_group, mask_heads,
    ACC: tl.constexpr, DOT: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # x, out: [b, p, h, hd]; dt: [b, p, h]; A: [h]; B, C: [b, p, g, n]; R: [b, mask_heads, p, p];
    # cs: [b, h, p] float64, the cumulative sum of Δ over positions. All contiguous.
    pid_bh = tl.program_id(0)
    pid_i = tl.program_id(1)
    pid_d = tl.program_id(2)
    batch = (pid_bh // h).to(tl.int64)  # int64 offsets (tl_mamba.ops.triton_scan, "Offsets")
    head = pid_bh % h
    group = head // heads_per_group
    mask_head = head if mask_heads > 1 else 0
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_i = offs_i < p
    mask_d = offs_d < hd
    mask_n = offs_n < n
    C_i = tl.load(C_ptr + ((batch * p + offs_i[:, None]) * g + group) * n + offs_n[None, :],
                  mask=mask_i[:, None] & mask_n[None, :], other=0.0).to(ACC)
    cs_i = tl.load(cs_ptr + (batch * h + head) * p + offs_i, mask=mask_i, other=0.0)
    a = tl.load(A_ptr + head).to(ACC)
    acc = tl.zeros((BLOCK_I, BLOCK_D), dtype=ACC)
    for j0 in range(0, tl.minimum((pid_i + 1) * BLOCK_I, p), BLOCK_I):
        offs_j = j0 + tl.arange(0, BLOCK_I)
        mask_j = offs_j < p
        B_j = tl.load(B_ptr + ((batch * p + offs_j[:, None]) * g + group) * n + offs_n[None, :],
                      mask=mask_j[:, None] & mask_n[None, :], other=0.0).to(ACC)
        cb = tl.dot(C_i, tl.trans(B_j), input_precision=DOT).to(ACC)  # [I, J]
        cs_j = tl.load(cs_ptr + (batch * h + head) * p + offs_j, mask=mask_j, other=0.0)
        span = (cs_i[:, None] - cs_j[None, :]).to(ACC)  # Σ_{k=j+1..i} Δ_k, ≥ 0 on and below the diagonal
        causal = (offs_j[None, :] <= offs_i[:, None]) & mask_i[:, None] & mask_j[None, :]
        decay = tl.exp(tl.where(causal, span * a, float("-inf")))  # 0 above the diagonal, never overflows
        removed = tl.load(R_ptr + ((batch * mask_heads + mask_head) * p + offs_i[:, None]) * p + offs_j[None, :],
                          mask=causal, other=0.0).to(ACC)
        dt_j = tl.load(dt_ptr + (batch * p + offs_j) * h + head, mask=mask_j, other=0.0).to(ACC)
        weight = cb * decay * removed * dt_j[None, :]
        x_j = tl.load(x_ptr + ((batch * p + offs_j[:, None]) * h + head) * hd + offs_d[None, :],
                      mask=mask_j[:, None] & mask_d[None, :], other=0.0).to(ACC)
        acc += tl.dot(weight, x_j, input_precision=DOT).to(ACC)
    tl.store(out_ptr + ((batch * p + offs_i[:, None]) * h + head) * hd + offs_d[None, :], acc,
             mask=mask_i[:, None] & mask_d[None, :])


def masked_removed_terms_triton(removed: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                                block_d: Optional[int] = None) -> Tensor:
    """``Σ_j R_h[i, j] α_h[i, j] x_j[h]`` by masked tiles (shapes as ``dense_removed_terms_bphd``).

    Args:
        removed: ``[b, H, p, p]`` R, the share of each edge to remove (H = h, or 1 for every head).
        x: ``[b, p, h, hd]``. delta: ``[b, p, h]``. A: ``[h]``. B, C: ``[b, p, g, n]``.
        block_d: head channels per program (a power of 2, at least 16; default up to 64).
            Smaller blocks form each C·Bᵀ tile once per block: 32 spills no registers on
            sm_80 and sm_90 with Triton 3.6's or 3.9's ptxas (480 B on sm_86 with 3.9's),
            where 64 spills 764 B on sm_90 with 3.9's (docs/performance.md, "Compiled
            without a GPU"); the GPU bench times both.

    Returns:
        ``[b, p, h, hd]`` in fp32 (float64 if any input is). With autograd on and an input
        that requires grad, the differentiable torch form computes it instead.
    """
    from tl_mamba.backends import triton_usable
    from tl_mamba.ops.knockout import dense_removed_terms_bphd

    if block_d is not None and (isinstance(block_d, bool) or int(block_d) != block_d or block_d < 16
                                or int(block_d) & (int(block_d) - 1)):
        raise ValueError(f"block_d must be a power of 2, at least 16 (tl.dot's smallest tile), got {block_d!r}")
    if needs_grad(x, delta, A, B, C):
        return dense_removed_terms_bphd(removed, x, delta, A, B, C)
    if not triton_usable(x.device):
        raise RuntimeError("the Triton masked-tile knockout needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    b, p, h, hd = x.shape
    g, n = B.shape[-2:]
    acc = compute_dtype(x, delta, A, B, C, removed)
    # upcast here, not in the kernel: the kernel computes in acc either way, but loading 16-bit
    # tiles and converting them in registers spilled (4.2-5.0 KB per thread at the default tiles,
    # sm_80 to sm_90: benchmarks/compile_triton.py --sweep) and ran 6.3x slower than on fp32 inputs (an H200,
    # 2026-12-04: 18.4 against 2.9 ms, 130m widths, p = 2048). The copies are O(b·p·e), the
    # mask O(b·h·p²).
    x, delta, A, B, C = (t.to(acc).contiguous() for t in (x, delta, A, B, C))
    R = removed.to(acc).contiguous()
    cs = torch.cumsum(delta.double(), dim=1).transpose(1, 2).contiguous()  # [b, h, p]
    out = torch.empty(b, p, h, hd, device=x.device, dtype=acc)
    block_d = int(block_d) if block_d else max(16, min(64, triton.next_power_of_2(hd)))
    block_n = max(16, triton.next_power_of_2(n))
    grid = (b * h, triton.cdiv(p, BLOCK_I), triton.cdiv(hd, block_d))

    def launch():
        _masked_removed_terms_kernel[grid](
            x, delta, A, B, C, R, cs, out, p, h, hd, g, n, h // g, R.shape[1],
            ACC=tl.float64 if acc == torch.float64 else tl.float32, DOT=triton_chunked.DOT_PRECISION,
            BLOCK_I=BLOCK_I, BLOCK_D=block_d, BLOCK_N=block_n,
        )
        return out

    return kernel_or_fallback("masked-tile knockout kernel", x.device, launch,
                              lambda: dense_removed_terms_bphd(removed, x, delta, A, B, C), "the torch form")
