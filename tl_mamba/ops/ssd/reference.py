"""The plain sequential Mamba-2 scan: the oracle every other backend must match.

Per head, the decay is a scalar: h_t = exp(Δ_t A) h_{t-1} + Δ_t x_t ⊗ B_t, with B
and C shared by the heads of a group.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tl_mamba.ops.precision import compute_dtype


def ssd_reference(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    *,
    initial_state: Optional[Tensor] = None,
    return_states: bool = False,
):
    """Sequential scan. Shapes as in ``tl_mamba.ops.ssd.ssd_scan``."""
    from tl_mamba.ops.ssd import SSDOutput

    b, p, h, hd = x.shape
    g, n = B.shape[-2:]
    heads_per_group = h // g
    cdt = compute_dtype(x, delta, A, B, C, initial_state)
    xf, df, Af = x.to(cdt), delta.to(cdt), A.to(cdt)
    Bh = B.to(cdt).repeat_interleave(heads_per_group, dim=2)  # [b, p, h, n]
    Ch = C.to(cdt).repeat_interleave(heads_per_group, dim=2)
    state = x.new_zeros(b, h, hd, n, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    ys, states = [], []
    for t in range(p):
        decay = torch.exp(df[:, t] * Af)  # [b, h]
        write = (df[:, t, :, None] * xf[:, t])[..., None] * Bh[:, t, :, None, :]  # [b, h, hd, n]
        state = decay[:, :, None, None] * state + write
        ys.append((state * Ch[:, t, :, None, :]).sum(-1))  # [b, h, hd]
        if return_states:
            states.append(state)
    y = torch.stack(ys, dim=1) if p else xf.new_zeros(b, 0, h, hd)
    if D is not None:
        y = y + D.to(cdt)[:, None] * xf
    if return_states:
        states = torch.stack(states, dim=1) if p else xf.new_zeros(b, 0, h, hd, n)
    return SSDOutput(y=y, final_state=state, states=states if return_states else None)
