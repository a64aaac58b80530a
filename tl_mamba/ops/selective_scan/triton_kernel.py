"""The ``"triton"`` backend of the Mamba-1 selective scan (forward kernels).

Two kernels compute the same thing (:data:`KERNEL` picks; results agree to fp32
rounding). In both, one program per (sequence, block of ``BLOCK_E`` channels) holds
its ``[BLOCK_E, n]`` slice of the state in registers, in fp32 for fp32/bf16/fp16
inputs (as mamba_ssm does; float64 for float64 inputs, as ``tl_mamba.ops.precision``
says), and carries it along the sequence:

- ``"chunked"`` (the default): a tile of ``BLOCK_T`` positions at a time. It loads
  the tile's inputs at once, computes its decays and writes, runs the recurrence
  within the tile as a parallel prefix scan (``tl.associative_scan`` with the
  combine ``(a₁, b₁) ∘ (a₂, b₂) = (a₁a₂, a₂b₁ + b₂)``, log-depth, as mamba_ssm's
  CUDA kernel scans time within a block), then adds the carried state times the
  tile's cumulative decay. Parallel in time as well as channels, so a short batch
  still fills the GPU.
- ``"sequential"``: one position at a time (the recurrence as written). Its
  per-step latency chain is p long; kept as the simpler kernel and a second
  opinion, and for the GPU benchmark to compare.

Per position:

    h = exp(Δ_t A) ⊙ h + (Δ_t x_t) ⊗ B_t,    y_t = h · C_t + D ⊙ x_t   (D skip fused)

and, given Mamba-1's gate input z, writes ``y_t · silu(z_t)`` instead (gate fused:
the ungated y never reaches memory). It writes y, the final state, and, only when asked for (``hook_h`` hooked or
cached), every state. Knockout masks and state overrides need nothing here: the
dispatcher applies them with extra calls that only use the initial and final state.

Gradients: with autograd on, the kernel also writes the state every ``T`` positions
(``boundary_every``). The backward starts from those, last chunk first, so its memory
is linear in p: by default in one Triton kernel (``triton_backward.py``; :data:`BACKWARD`),
or chunk by chunk through the ``"torch"`` backend (``tl_mamba.ops.triton_scan``).

Block sizes are fixed (``BLOCK_T`` = 32 positions; ``BLOCK_E`` so that a tile holds
at most 4096 state entries), not yet tuned on a GPU.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (slow: tests only).
The variable must be set before anything imports triton (torch and transformers may):
Triton builds its own library functions in interpreter mode or not at import time.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

import triton
import triton.language as tl

from tl_mamba.ops.precision import compute_dtype
from tl_mamba.ops.triton_scan import _FAILED_KERNELS, kernel_or_fallback, run_triton_scan


KERNEL = "chunked"
"""Which forward kernel runs: ``"chunked"`` (parallel in time within tiles) or ``"sequential"``."""
BACKWARD = "kernel"
"""Mamba-1's backward: ``"kernel"`` (``triton_backward.py``, one Triton kernel) or ``"recompute"``
(chunk by chunk through the torch backend, ``tl_mamba.ops.triton_scan``)."""
BLOCK_T = 32
"""Positions per tile of the chunked kernel."""
TILE_ENTRIES = 4096
"""At most this many state entries (BLOCK_T × BLOCK_E × n, padded) per tile of the chunked kernel."""


def fuses_knockout() -> bool:
    """Whether the forward kernel in use applies a single S → T knockout in the same pass."""
    return KERNEL == "chunked" and "chunked selective-scan kernel" not in _FAILED_KERNELS


@triton.jit
def _combine_with_knockout(decay_1, write_1, removed_1, decay_2, write_2, removed_2):
    # two recurrences with the same decay: the scan and the scan of the knocked-out sources
    return decay_1 * decay_2, decay_2 * write_1 + write_2, decay_2 * removed_1 + removed_2


@triton.jit
def _channel_block(A_ptr, D_ptr, h0_ptr, e, n, HAS_D: tl.constexpr, HAS_H0: tl.constexpr, ACC: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr):
    # What both kernels' programs start from, for program (sequence, channel block):
    # the block's channels and masks, its [BLOCK_E, BLOCK_N] slice of A, D (zeros
    # without D) and the initial state (zeros without one).
    pid_b = tl.program_id(0).to(tl.int64)  # int64 offsets (tl_mamba.ops.triton_scan, "Offsets")
    offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_n = tl.arange(0, BLOCK_N)
    mask_e = offs_e < e
    mask_en = mask_e[:, None] & (offs_n < n)[None, :]
    en_offsets = offs_e[:, None] * n + offs_n[None, :]
    A = tl.load(A_ptr + en_offsets, mask=mask_en, other=0.0).to(ACC)
    if HAS_D:
        D = tl.load(D_ptr + offs_e, mask=mask_e, other=0.0).to(ACC)
    else:
        D = tl.zeros((BLOCK_E,), dtype=ACC)
    if HAS_H0:
        h = tl.load(h0_ptr + pid_b * e * n + en_offsets, mask=mask_en, other=0.0).to(ACC)
    else:
        h = tl.zeros((BLOCK_E, BLOCK_N), dtype=ACC)
    return offs_e, mask_e, mask_en, en_offsets, A, D, h


@triton.jit
def _combine(decay_1, write_1, decay_2, write_2):
    # two steps of h ← a·h + b, the first then the second, as one
    return decay_1 * decay_2, decay_2 * write_1 + write_2


@triton.jit
def _selective_scan_chunked_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, z_ptr,
    y_ptr, h_final_ptr, states_ptr, bounds_ptr, src_ptr, tgt_ptr, feat_ptr,
    p, e, n, every, n_bounds,
    HAS_D: tl.constexpr, HAS_H0: tl.constexpr, HAS_Z: tl.constexpr, STORE_STATES: tl.constexpr,
    STORE_BOUNDS: tl.constexpr, ACC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_KO: tl.constexpr, HAS_FEAT: tl.constexpr,
):
    # Layouts as in _selective_scan_fwd_kernel. Tiles are [BLOCK_T, BLOCK_E, BLOCK_N].
    # With HAS_KO, one S → T knockout in the same pass: src, tgt [b, p] (the sources' and
    # targets' weights), feat [e] (the channels it touches, HAS_FEAT; else all). A second
    # state carries the scan of the sources alone (zero initial state, no D skip), and
    # tgt_t · feat ⊙ (its read-out) is subtracted from y_t, before the gate.
    pid_b = tl.program_id(0).to(tl.int64)  # int64 offsets (tl_mamba.ops.triton_scan, "Offsets")
    offs_t = tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    offs_e, mask_e, mask_en, en_offsets, A, D, h = _channel_block(
        A_ptr, D_ptr, h0_ptr, e, n, HAS_D, HAS_H0, ACC, BLOCK_E, BLOCK_N)
    last_row = (offs_t == BLOCK_T - 1)[:, None, None]
    if HAS_KO:
        h_removed = tl.zeros((BLOCK_E, BLOCK_N), dtype=ACC)
        if HAS_FEAT:
            feat = tl.load(feat_ptr + offs_e, mask=mask_e, other=0.0).to(ACC)
    for t0 in range(0, p, BLOCK_T):
        pos = t0 + offs_t
        mask_t = pos < p
        rows = pid_b * p + pos
        mask_te = mask_t[:, None] & mask_e[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]
        te_offsets = rows[:, None] * e + offs_e[None, :]
        x = tl.load(x_ptr + te_offsets, mask=mask_te, other=0.0).to(ACC)
        dt = tl.load(dt_ptr + te_offsets, mask=mask_te, other=0.0).to(ACC)
        Bt = tl.load(B_ptr + rows[:, None] * n + offs_n[None, :], mask=mask_tn, other=0.0).to(ACC)
        Ct = tl.load(C_ptr + rows[:, None] * n + offs_n[None, :], mask=mask_tn, other=0.0).to(ACC)
        # positions past p have Δ = 0 and x = 0: decay 1 and write 0, so they pass the state on
        decay = tl.exp(dt[:, :, None] * A[None, :, :])
        write = (dt * x)[:, :, None] * Bt[:, None, :]
        if HAS_KO:
            src = tl.load(src_ptr + rows, mask=mask_t, other=0.0).to(ACC)
            tgt = tl.load(tgt_ptr + rows, mask=mask_t, other=0.0).to(ACC)
            decay_from_start, state_from_zero, removed_from_zero = tl.associative_scan(
                (decay, write, write * src[:, None, None]), 0, _combine_with_knockout)
        else:
            decay_from_start, state_from_zero = tl.associative_scan((decay, write), 0, _combine)
        states = state_from_zero + decay_from_start * h[None, :, :]
        y = tl.sum(states * Ct[:, None, :], axis=2)
        if HAS_KO:
            removed_states = removed_from_zero + decay_from_start * h_removed[None, :, :]
            removed = tl.sum(removed_states * Ct[:, None, :], axis=2) * tgt[:, None]
            if HAS_FEAT:
                removed = removed * feat[None, :]
            y -= removed
            h_removed = tl.sum(tl.where(last_row, removed_states, 0.0), axis=0)
        if HAS_D:
            y += D[None, :] * x
        if HAS_Z:  # the gate, silu(z) = z · sigmoid(z), in ACC precision
            z = tl.load(z_ptr + te_offsets, mask=mask_te, other=0.0).to(ACC)
            y = y * z / (1.0 + tl.exp(-z))
        tl.store(y_ptr + te_offsets, y, mask=mask_te)
        if STORE_STATES:
            tl.store(states_ptr + rows[:, None, None] * e * n + en_offsets[None, :, :], states,
                     mask=mask_t[:, None, None] & mask_en[None, :, :])
        if STORE_BOUNDS:  # the state after positions every-1, 2·every-1, ... short of the last
            is_bound = ((pos + 1) % every == 0) & (pos + 1 < p)
            bound = pid_b * n_bounds + (pos + 1) // every - 1
            tl.store(bounds_ptr + bound[:, None, None] * e * n + en_offsets[None, :, :], states,
                     mask=is_bound[:, None, None] & mask_en[None, :, :])
        h = tl.sum(tl.where(last_row, states, 0.0), axis=0)
    tl.store(h_final_ptr + pid_b * e * n + en_offsets, h, mask=mask_en)


@triton.jit
def _selective_scan_fwd_kernel(
    x_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, h0_ptr, z_ptr,
    y_ptr, h_final_ptr, states_ptr, bounds_ptr,
    p, e, n, every, n_bounds,
    HAS_D: tl.constexpr, HAS_H0: tl.constexpr, HAS_Z: tl.constexpr, STORE_STATES: tl.constexpr, STORE_BOUNDS: tl.constexpr,
    ACC: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # x, dt, z, y: [b, p, e]; A: [e, n]; B, C: [b, p, n]; h0, h_final: [b, e, n];
    # states: [b, p, e, n]; bounds: [b, n_bounds, e, n] (the state after positions
    # every-1, 2·every-1, ... short of the last); all contiguous. ACC: fp32, or fp64
    # for float64 inputs.
    pid_b = tl.program_id(0).to(tl.int64)  # int64 offsets (tl_mamba.ops.triton_scan, "Offsets")
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    offs_e, mask_e, mask_en, en_offsets, A, D, h = _channel_block(
        A_ptr, D_ptr, h0_ptr, e, n, HAS_D, HAS_H0, ACC, BLOCK_E, BLOCK_N)
    for t in range(0, p):
        row = pid_b * p + t
        x = tl.load(x_ptr + row * e + offs_e, mask=mask_e, other=0.0).to(ACC)
        dt = tl.load(dt_ptr + row * e + offs_e, mask=mask_e, other=0.0).to(ACC)
        Bt = tl.load(B_ptr + row * n + offs_n, mask=mask_n, other=0.0).to(ACC)
        Ct = tl.load(C_ptr + row * n + offs_n, mask=mask_n, other=0.0).to(ACC)
        h = tl.exp(dt[:, None] * A) * h + (dt * x)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
        if HAS_D:
            y += D * x
        if HAS_Z:  # the gate, silu(z) = z · sigmoid(z), in ACC precision
            z = tl.load(z_ptr + row * e + offs_e, mask=mask_e, other=0.0).to(ACC)
            y = y * z / (1.0 + tl.exp(-z))
        tl.store(y_ptr + row * e + offs_e, y, mask=mask_e)
        if STORE_STATES:
            tl.store(states_ptr + row * e * n + en_offsets, h, mask=mask_en)
        if STORE_BOUNDS:
            if (t + 1) % every == 0:
                if t + 1 < p:
                    bound = pid_b * n_bounds + (t + 1) // every - 1
                    tl.store(bounds_ptr + bound * e * n + en_offsets, h, mask=mask_en)
    tl.store(h_final_ptr + pid_b * e * n + en_offsets, h, mask=mask_en)


def kernel_inputs(x, delta, A, B, C, D, z, initial_state):
    """What the kernels read: ``(accumulation dtype, contiguous (x, Δ, A, B, C, D, z), initial state
    in that dtype)``; D, z and the initial state may be None."""
    acc = compute_dtype(x, delta, A, B, C, initial_state)
    tensors = tuple(None if t is None else t.contiguous() for t in (x, delta, A, B, C, D, z))
    return acc, tensors, None if initial_state is None else initial_state.to(acc).contiguous()


def _forward(x, delta, A, B, C, D, initial_state, return_states: bool, block_e: Optional[int] = None,
             boundary_every: Optional[int] = None, z: Optional[Tensor] = None, kernel: Optional[str] = None,
             block_t: Optional[int] = None, removal=None):
    """Launch a kernel: ``(y, final_state, states or None)``, in fp32 (float64 if any input is).

    With ``z`` ([b, p, e]) y is gated, ``y · silu(z)``, in the kernel. ``kernel``:
    ``"chunked"`` or ``"sequential"`` (default :data:`KERNEL`); ``block_e`` / ``block_t``
    override the block sizes (powers of two). ``removal`` (an ``EdgeRemoval``, chunked
    kernel only): y has that knockout applied in the same pass (see the kernel).

    With ``boundary_every=T`` it also returns, fourth, the states after positions
    T-1, 2T-1, ... (the initial states of the chunks of T positions after the first):
    ``[b, ceil(p/T) - 1, e, n]``, what the chunked-recompute backward keeps.
    """
    b, p, e = x.shape
    n = A.shape[-1]
    acc, (x, delta, A, B, C, D, z), h0 = kernel_inputs(x, delta, A, B, C, D, z, initial_state)
    y = torch.empty(b, p, e, device=x.device, dtype=acc)
    h_final = torch.empty(b, e, n, device=x.device, dtype=acc)
    states = torch.empty(b, p, e, n, device=x.device, dtype=acc) if return_states else y
    n_bounds = 0 if boundary_every is None else max(triton.cdiv(p, boundary_every) - 1, 0)
    bounds = torch.empty(b, n_bounds, e, n, device=x.device, dtype=acc)
    kernel = KERNEL if kernel is None else kernel
    if kernel not in ("chunked", "sequential"):
        raise ValueError(f"kernel must be 'chunked' or 'sequential', got {kernel!r}")
    block_n = triton.next_power_of_2(n)
    block_t = block_t or min(BLOCK_T, max(triton.next_power_of_2(p), 2))
    if kernel == "chunked":
        block_e = block_e or max(1, min(triton.next_power_of_2(e), TILE_ENTRIES // (block_t * block_n), 64))
    else:
        block_e = block_e or max(1, min(triton.next_power_of_2(e), 4096 // block_n, 64))
    grid = (b, triton.cdiv(e, block_e))
    # Both kernels take (tensors..., sizes...); the chunked one also takes the knockout
    # pointers between them (placeholders when there is no knockout).
    tensors = (x, delta, A, B, C, D if D is not None else x, h0 if h0 is not None else h_final,
               z if z is not None else x, y, h_final, states, bounds if n_bounds else y)
    sizes = (p, e, n, boundary_every or 1, n_bounds)
    knockout = (y, y, y)
    if removal is not None:
        if kernel != "chunked":
            raise ValueError("only the chunked kernel applies a knockout in the same pass")
        features = None if removal.features is None else removal.features.to(x.device, torch.float32).contiguous()
        knockout = (removal.sources.to(x.device, torch.float32).contiguous(),
                    removal.targets.to(x.device, torch.float32).contiguous(),
                    features if features is not None else y)
    flags = dict(HAS_D=D is not None, HAS_H0=h0 is not None, HAS_Z=z is not None, STORE_STATES=return_states,
                 STORE_BOUNDS=n_bounds > 0, ACC=tl.float64 if acc == torch.float64 else tl.float32,
                 BLOCK_E=block_e, BLOCK_N=block_n)

    def chunked(has_knockout: bool):
        _selective_scan_chunked_fwd_kernel[grid](
            *tensors, *knockout, *sizes, **flags, BLOCK_T=block_t, HAS_KO=has_knockout,
            HAS_FEAT=has_knockout and removal.features is not None)

    def sequential(block_e: int = block_e):
        _selective_scan_fwd_kernel[(b, triton.cdiv(e, block_e))](*tensors, *sizes, **dict(flags, BLOCK_E=block_e))

    if removal is not None:  # no fallback here: the dispatcher's is the separate knockout scan
        chunked(has_knockout=True)
    elif kernel == "chunked":
        kernel_or_fallback("chunked selective-scan kernel", x.device, lambda: chunked(has_knockout=False),
                           lambda: sequential(max(1, min(triton.next_power_of_2(e), 4096 // block_n, 64))),
                           "the sequential kernel")
    else:
        sequential()
    out = y, h_final, (states if return_states else None)
    return out if boundary_every is None else (*out, bounds)


def selective_scan_triton(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    *,
    initial_state: Optional[Tensor] = None,
    return_states: bool = False,
    z: Optional[Tensor] = None,
    backward_chunk: Optional[int] = None,
    removal=None,
):
    """Triton scan. Shapes as in ``tl_mamba.ops.selective_scan.selective_scan``.

    Outputs fp32 (float64 for float64 inputs).

    ``backward_chunk``: positions per recomputed chunk in the backward (default
    ``tl_mamba.ops.triton_scan.BACKWARD_CHUNK``). ``removal``: one ``EdgeRemoval``
    applied in the same pass (no autograd; see :func:`fuses_knockout`).
    """
    from tl_mamba.ops.selective_scan import ScanOutput
    from tl_mamba.ops.selective_scan.chunked import selective_scan_chunked
    from tl_mamba.ops.selective_scan.triton_backward import selective_scan_backward

    return run_triton_scan(_forward, selective_scan_chunked, ScanOutput, "selective scan", x, delta, A, B, C, D,
                           initial_state, return_states, backward_chunk=backward_chunk, z=z,
                           kernel_backward=selective_scan_backward if BACKWARD == "kernel" else None,
                           removal=removal)
