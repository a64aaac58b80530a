"""The ``"torch"`` backend of the Mamba-2 scan: the chunked SSD form.

Within a chunk of L positions the scan is a masked attention-like product
(the "diagonal blocks"): y_t = Σ_{s≤t} C_t·B_s exp(Σ_{k=s+1..t} Δ_k A) Δ_s x_s.
Across chunks, each chunk's final state is passed on with one small recurrence
over chunks (the "off-diagonal blocks"). All exponents are differences of a
within-chunk cumulative sum with s ≤ t, so they are ≤ 0 and never overflow.
Differentiable; results do not depend on the chunk size.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from tl_mamba.ops.buffers import states_buffer
from tl_mamba.ops.precision import compute_dtype
from tl_mamba.ops.state_override import adjoint_recurrence

DEFAULT_CHUNK = 32
"""Chunk length L (speed and memory only: results do not depend on it). Measured on a 2-vCPU
Intel Xeon, 1 thread, 2026-12-05: a 4-layer model at 130m widths took 0.91-0.93x the time of
L = 64 (p = 1024 and 4096; L = 16 1.01-1.03x), at toy widths (b 32, p 256) 0.84x; L = 64 had
been the fastest of 64, 128 and 256 in every earlier run. The toy recipe's training steps were
13-20% faster at 32 than at 64 (docs/toy_models.md). The scan alone on another host,
2026-12-07 (Intel Xeon, 1.25 MB of L2 a core; ``benchmarks/bench_scan_chunk_cpu.py``), against
32: 130m widths 16 1.30-1.31x, 64 0.99-1.00x (b 1, p 1024 and b 4, p 512); toy widths (b 32,
p 256) 16 0.88x, 64 1.36x."""


def ssd_chunked(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    *,
    initial_state: Optional[Tensor] = None,
    return_states: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
):
    """Chunked SSD scan. Shapes as in ``tl_mamba.ops.ssd.ssd_scan``."""
    from tl_mamba.ops.ssd import SSDOutput

    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    b, p, h, hd = x.shape
    g, n = B.shape[-2:]
    heads_per_group = h // g
    cdt = compute_dtype(x, delta, A, B, C, initial_state)
    if p == 0:
        state = x.new_zeros(b, h, hd, n, dtype=cdt) if initial_state is None else initial_state.to(cdt)
        return SSDOutput(y=x.new_zeros(b, 0, h, hd, dtype=cdt), final_state=state,
                         states=x.new_zeros(b, 0, h, hd, n, dtype=cdt) if return_states else None)
    L = min(chunk_size, p)
    pad = (-p) % L
    xf, df, Af = x.to(cdt), delta.to(cdt), A.to(cdt)
    Bh = B.to(cdt).repeat_interleave(heads_per_group, dim=2)  # [b, p, h, n]
    Ch = C.to(cdt).repeat_interleave(heads_per_group, dim=2)
    if pad:  # padded steps have Δ = 0 and x = 0: no decay, no write
        xf, df, Bh, Ch = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (xf, df, Bh, Ch))
    nc = (p + pad) // L
    # Head-major chunk layout [b, c, h, L, ...]: every product below is then a batched matmul
    # over (b, c, h) on contiguous operands, and the [L, L] per-head matrices are never permuted
    # (with the head axis innermost, each einsum copied them, most of a CPU forward's copies).
    def by_head(t: Tensor) -> Tensor:  # [b, p, h, k] -> [b, c, h, L, k]
        return t.reshape(b, nc, L, h, t.shape[-1]).permute(0, 1, 3, 2, 4).contiguous()

    xd = by_head(xf * df[..., None])  # Δ_s x_s: [b, c, h, L, hd]
    Bc, Cc = by_head(Bh), by_head(Ch)  # [b, c, h, L, n]
    step = (df * Af).reshape(b, nc, L, h).permute(0, 1, 3, 2)  # [b, c, h, L]: Δ_k A

    # diagonal blocks: causal decay matrix per chunk and head. seg[t, s] = Σ_{k=s+1..t} Δ_k A is
    # summed directly (a cumulative sum over k of the terms with k > s) rather than as a
    # difference of two cumulative sums, which loses digits where the decay is strong. It is
    # built source-major, [s, t], so that the cumulative sum runs along the contiguous last
    # axis (twice as fast on a CPU as along the second-to-last); the matmuls take it transposed.
    causal_st = torch.ones(L, L, dtype=torch.bool, device=x.device).triu()  # [s, t]: s ≤ t
    terms = step[..., None, :].masked_fill(~causal_st.triu(1), 0.0)  # [b, c, h, s, k]: Δ_k A where k > s
    seg_st = torch.cumsum(terms, dim=-1)  # [b, c, h, s, t] = seg[t, s]
    decay_st = torch.exp(seg_st.masked_fill_(~causal_st, float("-inf")))
    scores_st = torch.matmul(Bc, Cc.transpose(-1, -2)) * decay_st  # [b, c, h, s, t]: C_t·B_s decay
    y = torch.matmul(scores_st.transpose(-1, -2), xd)  # [b, c, h, t, hd]

    log_decay = torch.cumsum(step, dim=-1)  # [b, c, h, L]: decay from the chunk start to t

    # each chunk's contribution to its own final state
    to_end = torch.exp(log_decay[..., -1:] - log_decay)  # [b, c, h, L]
    chunk_writes = torch.matmul((xd * to_end[..., None]).transpose(-1, -2), Bc)  # [b, c, h, hd, n]
    chunk_decay = torch.exp(log_decay[..., -1])  # [b, c, h]

    # off-diagonal blocks: carry the state across chunks
    state = x.new_zeros(b, h, hd, n, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    starts = []
    # unbind, not chunk_writes[:, c]: under autograd each index's backward would scatter into a
    # zero tensor of all the chunks' writes (quadratic in the number of chunks); unbind's is one stack
    for decay_c, writes_c in zip(chunk_decay.unbind(1), chunk_writes.unbind(1)):
        starts.append(state)
        state = decay_c[:, :, None, None] * state + writes_c
    start_states = torch.stack(starts, dim=1)  # [b, c, h, hd, n]
    from_start = torch.exp(log_decay)  # [b, c, h, L]
    y = y + torch.matmul(Cc, start_states.transpose(-1, -2)) * from_start[..., None]
    y = y.permute(0, 1, 3, 2, 4).reshape(b, nc * L, h, hd)[:, :p]
    if D is not None:
        y = y + D.to(cdt)[:, None] * xf[:, :p]

    states = None
    if return_states:
        # Every state, by the recurrence itself: p steps on [b, h, hd, n]. (Expanding the chunk
        # form to every position would cost L² work per state entry.)
        decay_t = torch.exp(df[:, :p] * Af)  # [b, p, h]
        write_x = xf[:, :p] * df[:, :p, :, None]  # [b, p, h, hd]
        h0 = x.new_zeros(b, h, hd, n, dtype=cdt) if initial_state is None else initial_state.to(cdt)
        states = _EveryState.apply(decay_t, write_x, Bh[:, :p], h0)
    return SSDOutput(y=y, final_state=state, states=states)


class _EveryState(torch.autograd.Function):
    """Every state ``h_t = decay_t h_{t-1} + x̄_t ⊗ B_t`` ``[b, p, h, hd, n]`` from decay_t ``[b, p, h]``,
    x̄_t = Δ_t x_t ``[b, p, h, hd]``, B_t ``[b, p, h, n]`` and h_{-1} ``[b, h, hd, n]``.

    The forward writes each state into one buffer (``states_buffer``), two ops per position
    and no temporary; it records no graph. The backward is the adjoint recurrence
    ``g_t = ∂L/∂h_t + decay_{t+1} g_{t+1}``, one in-place op per position, and then whole-tensor
    sums for the four gradients. Autograd through the loop instead kept a graph of p steps and a
    stacked copy of every state (measured in docs/performance.md, "Gradients with `hook_h`
    hooked").
    """

    @staticmethod
    def forward(ctx, decay_t: Tensor, write_x: Tensor, B: Tensor, h0: Tensor) -> Tensor:
        b, p, h, hd = write_x.shape
        states = states_buffer((b, p, h, hd, B.shape[-1]), like=write_x, dtype=write_x.dtype)
        h_t = h0
        for t in range(p):  # the two ops in the buffer's slot: no temporary (0.89x the time)
            write = torch.mul(write_x[:, t, :, :, None], B[:, t, :, None, :], out=states[:, t])
            h_t = write.addcmul_(decay_t[:, t, :, None, None], h_t)
        ctx.save_for_backward(decay_t, write_x, B, h0, states)
        ctx.set_materialize_grads(False)  # no gradient reached the states: None, not a tensor of zeros
        return states

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_states: Optional[Tensor]):
        if grad_states is None:  # hook_h only read or cached (its hook point passes nothing back): no work
            return None, None, None, None
        decay_t, write_x, B, h0, states = ctx.saved_tensors
        g = adjoint_recurrence(grad_states, decay_t[..., None, None])  # ∂L/∂h_t, total
        grad_write_x = torch.einsum("bphdn,bphn->bphd", g, B)
        grad_B = torch.einsum("bphdn,bphd->bphn", g, write_x)
        grad_decay = torch.empty_like(decay_t)  # Σ_{hd, n} g_t ⊙ h_{t-1}
        grad_decay[:, 0] = torch.einsum("bhdn,bhdn->bh", g[:, 0], h0)
        grad_decay[:, 1:] = torch.einsum("bphdn,bphdn->bph", g[:, 1:], states[:, :-1])
        return grad_decay, grad_write_x, grad_B, decay_t[:, 0, :, None, None] * g[:, 0]
