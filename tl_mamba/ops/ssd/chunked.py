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

from tl_mamba.ops.precision import compute_dtype, needs_grad

DEFAULT_CHUNK = 64


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
    xd = (xf * df[..., None]).view(b, nc, L, h, hd)  # Δ_s x_s
    Bc, Cc = Bh.view(b, nc, L, h, n), Ch.view(b, nc, L, h, n)

    # diagonal blocks: causal decay matrix per chunk and head. seg[t, s] = Σ_{k=s+1..t} Δ_k A is
    # summed directly (a cumulative sum over k of the terms with k > s) rather than as a
    # difference of two long cumulative sums, which would lose precision.
    causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
    step = (df * Af).view(b, nc, L, h)
    terms = step[:, :, :, None, :].expand(b, nc, L, L, h)  # [b, c, k, s, h] = Δ_k A
    after_source = torch.ones(L, L, dtype=torch.bool, device=x.device).tril(-1)  # [k, s]: k > s
    terms = terms.masked_fill(~after_source[None, None, :, :, None], 0.0)
    seg = torch.cumsum(terms, dim=2)  # [b, c, t, s, h]
    decay_ts = torch.exp(seg.masked_fill(~causal[None, None, :, :, None], float("-inf")))
    scores = torch.einsum("bcthn,bcshn->bctsh", Cc, Bc) * decay_ts
    y = torch.einsum("bctsh,bcshp->bcthp", scores, xd)

    log_decay = torch.cumsum(step, dim=2)  # [b, c, L, h]: decay from the chunk start to t

    # each chunk's contribution to its own final state
    to_end = torch.exp(log_decay[:, :, -1:, :] - log_decay)  # [b, c, L, h]
    chunk_writes = torch.einsum("bcshn,bcsh,bcshp->bchpn", Bc, to_end, xd)
    chunk_decay = torch.exp(log_decay[:, :, -1, :])  # [b, c, h]

    # off-diagonal blocks: carry the state across chunks
    state = x.new_zeros(b, h, hd, n, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    starts = []
    for c in range(nc):
        starts.append(state)
        state = chunk_decay[:, c, :, None, None] * state + chunk_writes[:, c]
    start_states = torch.stack(starts, dim=1)  # [b, c, h, hd, n]
    from_start = torch.exp(log_decay)  # [b, c, L, h]
    y = y + torch.einsum("bcthn,bchpn->bcthp", Cc, start_states) * from_start[..., None]
    y = y.reshape(b, nc * L, h, hd)[:, :p]
    if D is not None:
        y = y + D.to(cdt)[:, None] * xf[:, :p]

    states = None
    if return_states:
        # Every state, by the recurrence itself: p steps on [b, h, hd, n]. (Expanding the chunk
        # form to every position would cost L² work per state entry.) Written into one buffer
        # that is a normal tensor even under inference mode, so hook_h can track in-place edits.
        decay_t = torch.exp(df[:, :p] * Af)  # [b, p, h]
        write_x = xf[:, :p] * df[:, :p, :, None]  # [b, p, h, hd]
        with torch.inference_mode(False):
            buffer = x.new_empty(b, p, h, hd, n, dtype=cdt)
        differentiable = needs_grad(x, delta, A, B, C, initial_state)
        h_t = x.new_zeros(b, h, hd, n, dtype=cdt) if initial_state is None else initial_state.to(cdt)
        kept = []
        for t in range(p):
            write = write_x[:, t, :, :, None] * Bh[:, t, :, None, :]
            if differentiable:
                h_t = torch.addcmul(write, decay_t[:, t, :, None, None], h_t)
                kept.append(h_t)
            else:
                h_t = torch.addcmul(write, decay_t[:, t, :, None, None], h_t, out=buffer[:, t])
        states = torch.stack(kept, dim=1) if differentiable else buffer
    return SSDOutput(y=y, final_state=state, states=states)
