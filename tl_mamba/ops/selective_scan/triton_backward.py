"""The Mamba-1 selective scan's backward as one Triton kernel (chunked, memory linear in p).

The forward (``triton_kernel.py``) keeps the state at every chunk boundary (every
``T`` positions). One program per (sequence, block of channels) walks the chunks last
to first. In each chunk it recomputes the chunk's states from the boundary state
(written to a scratch buffer of ``T`` states per program), then walks the chunk's
positions backwards carrying ∂L/∂h_t:

    ∂L/∂h_t  += C_t ⊗ ∂L/∂y_t  (+ ∂L/∂states_t when the states were returned)
    ∂L/∂C_t   = Σ_e h_t ∂L/∂y_t              ∂L/∂D += ∂L/∂y_t ⊙ x_t
    ∂L/∂B_t   = Σ_e ∂L/∂h_t ⊙ (Δ_t x_t)      ∂(Δx)_t = Σ_n ∂L/∂h_t ⊙ B_t
    ∂L/∂Δ_t   = Σ_n ∂L/∂h_t ⊙ h_{t-1} ⊙ e^{Δ_t A} ⊙ A  +  ∂(Δx)_t ⊙ x_t
    ∂L/∂A    += ∂L/∂h_t ⊙ h_{t-1} ⊙ e^{Δ_t A} ⊙ Δ_t
    ∂L/∂x_t   = ∂(Δx)_t ⊙ Δ_t + ∂L/∂y_t ⊙ D
    ∂L/∂h_{t-1} = ∂L/∂h_t ⊙ e^{Δ_t A}

With the gate fused (z given), ∂L/∂y_t is first taken through ``y · silu(z)``:
∂L/∂z = ∂L/∂out ⊙ y ⊙ silu'(z) (y recomputed from h_t), ∂L/∂y = ∂L/∂out ⊙ silu(z).
Sums over channels (∂B, ∂C) are written per channel block and added up in torch;
sums over the batch (∂A, ∂D) per sequence. Same memory as the chunked recompute it
replaces for Mamba-1 (boundary states saved; one chunk of states per program while it
runs), and no Python loop over positions. Checked against autograd through the
reference scan in Triton's CPU interpreter (``tests/test_triton.py``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

import triton
import triton.language as tl

from tl_mamba.ops.selective_scan.triton_kernel import _channel_block, kernel_inputs


@triton.jit
def _selective_scan_bwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, z_ptr, bounds_ptr,
    dy_ptr, dfinal_ptr, dstates_ptr,
    dx_ptr, ddt_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dh0_ptr, dz_ptr, scratch_ptr,
    p, e, n, T, n_bounds, n_eblocks,
    HAS_D: tl.constexpr, HAS_H0: tl.constexpr, HAS_Z: tl.constexpr, HAS_DFINAL: tl.constexpr,
    HAS_DSTATES: tl.constexpr, ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # x, dt, z, dy, dx, ddt, dz: [b, p, e]; A: [e, n]; B, C: [b, p, n]; h0, dfinal, dh0: [b, e, n];
    # bounds: [b, n_bounds, e, n]; dstates: [b, p, e, n]; dA: [b, e, n]; dD: [b, e];
    # dB, dC: [b, p, n_eblocks, n]; scratch: [b, n_eblocks, T, BLOCK_E, BLOCK_N]. All contiguous.
    pid_b = tl.program_id(0).to(tl.int64)  # int64 offsets (tl_mamba.ops.triton_scan, "Offsets")
    pid_e = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    offs_e, mask_e, mask_en, en_offsets, A, D, h0 = _channel_block(
        A_ptr, D_ptr, h0_ptr, e, n, HAS_D, HAS_H0, ACC, BLOCK_E, BLOCK_N)
    tile = tl.arange(0, BLOCK_E)[:, None] * BLOCK_N + offs_n[None, :]
    scratch = scratch_ptr + (pid_b * n_eblocks + pid_e) * T * BLOCK_E * BLOCK_N
    if HAS_DFINAL:
        dh = tl.load(dfinal_ptr + pid_b * e * n + en_offsets, mask=mask_en, other=0.0).to(ACC)
    else:
        dh = tl.zeros((BLOCK_E, BLOCK_N), dtype=ACC)
    dA = tl.zeros((BLOCK_E, BLOCK_N), dtype=ACC)
    dD = tl.zeros((BLOCK_E,), dtype=ACC)
    n_chunks = tl.cdiv(p, T)
    for back in range(0, n_chunks):
        k = n_chunks - 1 - back
        start = k * T
        stop = tl.minimum(start + T, p)
        if k == 0:
            h_start = h0
        else:
            h_start = tl.load(bounds_ptr + (pid_b * n_bounds + k - 1) * e * n + en_offsets, mask=mask_en,
                              other=0.0).to(ACC)
        # recompute the chunk's states (scratch slot s holds h_{start+s})
        h = h_start
        for t in range(start, stop):
            row = pid_b * p + t
            x = tl.load(x_ptr + row * e + offs_e, mask=mask_e, other=0.0).to(ACC)
            dt = tl.load(dt_ptr + row * e + offs_e, mask=mask_e, other=0.0).to(ACC)
            Bt = tl.load(B_ptr + row * n + offs_n, mask=mask_n, other=0.0).to(ACC)
            h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bt[None, :]
            tl.store(scratch + (t - start) * BLOCK_E * BLOCK_N + tile, h)
        # then walk it backwards
        for back_t in range(0, stop - start):
            t = stop - 1 - back_t
            row = pid_b * p + t
            x = tl.load(x_ptr + row * e + offs_e, mask=mask_e, other=0.0).to(ACC)
            dt = tl.load(dt_ptr + row * e + offs_e, mask=mask_e, other=0.0).to(ACC)
            Bt = tl.load(B_ptr + row * n + offs_n, mask=mask_n, other=0.0).to(ACC)
            Ct = tl.load(C_ptr + row * n + offs_n, mask=mask_n, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + row * e + offs_e, mask=mask_e, other=0.0).to(ACC)
            h_t = tl.load(scratch + (t - start) * BLOCK_E * BLOCK_N + tile)
            # the state before t: the previous slot, or the chunk's start state at its first position
            h_prev = tl.load(scratch + tl.maximum(t - start - 1, 0) * BLOCK_E * BLOCK_N + tile)
            h_prev = tl.where(t > start, h_prev, h_start)
            if HAS_Z:
                z = tl.load(z_ptr + row * e + offs_e, mask=mask_e, other=0.0).to(ACC)
                sig = 1.0 / (1.0 + tl.exp(-z))
                y = tl.sum(h_t * Ct[None, :], axis=1) + D * x
                tl.store(dz_ptr + row * e + offs_e, dy * y * sig * (1.0 + z * (1.0 - sig)), mask=mask_e)
                dy = dy * z * sig
            if HAS_DSTATES:
                dh += tl.load(dstates_ptr + row * e * n + en_offsets, mask=mask_en, other=0.0).to(ACC)
            dh += dy[:, None] * Ct[None, :]
            part = (row * n_eblocks + pid_e) * n + offs_n
            tl.store(dC_ptr + part, tl.sum(h_t * dy[:, None], axis=0), mask=mask_n)
            tl.store(dB_ptr + part, tl.sum(dh * (dt * x)[:, None], axis=0), mask=mask_n)
            dD += dy * x
            decay = tl.exp(dt[:, None] * A)
            d_decay = dh * h_prev * decay
            d_dtx = tl.sum(dh * Bt[None, :], axis=1)
            dA += d_decay * dt[:, None]
            tl.store(ddt_ptr + row * e + offs_e, tl.sum(d_decay * A, axis=1) + d_dtx * x, mask=mask_e)
            tl.store(dx_ptr + row * e + offs_e, d_dtx * dt + dy * D, mask=mask_e)
            dh = dh * decay
    tl.store(dA_ptr + pid_b * e * n + en_offsets, dA, mask=mask_en)
    if HAS_D:
        tl.store(dD_ptr + pid_b * e + offs_e, dD, mask=mask_e)
    tl.store(dh0_ptr + pid_b * e * n + en_offsets, dh, mask=mask_en)


def selective_scan_backward(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                            initial_state: Optional[Tensor], z: Optional[Tensor], bounds: Tensor, chunk: int,
                            grad_y: Optional[Tensor], grad_final: Optional[Tensor], grad_states: Optional[Tensor],
                            needs: Sequence[bool]):
    """Gradients of (x, Δ, A, B, C, D, initial_state, z) from those of y, the final state and the states.

    ``bounds``: the forward's chunk-boundary states ``[b, ceil(p/chunk) - 1, e, n]``. ``needs``: which of
    the eight want a gradient (the others come back None). Gradients have their input's dtype.
    """
    b, p, e = x.shape
    n = A.shape[-1]
    acc, (x, delta, A, B, C, D_c, z_c), h0 = kernel_inputs(x, delta, A, B, C, D, z, initial_state)
    block_n = triton.next_power_of_2(n)
    block_e = max(1, min(triton.next_power_of_2(e), 4096 // block_n, 64))
    n_eblocks = triton.cdiv(e, block_e)
    dy = torch.zeros(b, p, e, device=x.device, dtype=acc) if grad_y is None else grad_y.to(acc).contiguous()
    new = dict(device=x.device, dtype=acc)
    dx, ddt = torch.empty(b, p, e, **new), torch.empty(b, p, e, **new)
    dz = torch.empty(b, p, e, **new) if z is not None else None  # no gate: nothing to write
    dA, dh0, dD = torch.empty(b, e, n, **new), torch.empty(b, e, n, **new), torch.empty(b, e, **new)
    dB, dC = torch.empty(b, p, n_eblocks, n, **new), torch.empty(b, p, n_eblocks, n, **new)
    scratch = torch.empty(b, n_eblocks, min(chunk, max(p, 1)), block_e, block_n, **new)
    _selective_scan_bwd_kernel[(b, n_eblocks)](
        x, delta, A, B, C, D_c if D_c is not None else x, h0 if h0 is not None else dh0,
        z_c if z_c is not None else x, bounds if bounds.numel() else dh0,
        dy, grad_final.to(acc).contiguous() if grad_final is not None else dh0,
        grad_states.to(acc).contiguous() if grad_states is not None else dh0,
        dx, ddt, dA, dB, dC, dD, dh0, dz if dz is not None else dx, scratch,
        p, e, n, min(chunk, max(p, 1)), bounds.shape[1], n_eblocks,
        HAS_D=D is not None, HAS_H0=h0 is not None, HAS_Z=z is not None, HAS_DFINAL=grad_final is not None,
        HAS_DSTATES=grad_states is not None, ACC=tl.float64 if acc == torch.float64 else tl.float32,
        BLOCK_E=block_e, BLOCK_N=block_n,
    )
    grads = [dx, ddt, dA.sum(0), dB.sum(2), dC.sum(2), None if D is None else dD.sum(0), dh0, dz]
    inputs = (x, delta, A, B, C, D, initial_state, z)
    return tuple(g.to(t.dtype) if (want and t is not None) else None for g, t, want in zip(grads, inputs, needs))
