"""The plain sequential selective scan: the oracle every other backend must match.

It does exactly what the recurrence says, one position at a time, in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tl_mamba.ops.precision import compute_dtype, silu_gate


def selective_scan_reference(
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
):
    """Sequential scan. Shapes as in ``tl_mamba.ops.selective_scan.selective_scan``."""
    from tl_mamba.ops.selective_scan import ScanOutput

    b, p, e = x.shape
    n = A.shape[-1]
    cdt = compute_dtype(x, delta, A, B, C, initial_state)
    xf, df, Bf, Cf, Af = (t.to(cdt) for t in (x, delta, B, C, A))
    h = x.new_zeros(b, e, n, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    ys, states = [], []
    for t in range(p):
        decay = torch.exp(df[:, t, :, None] * Af)  # [b, e, n]
        write = (df[:, t] * xf[:, t])[:, :, None] * Bf[:, t, None, :]  # [b, e, n]
        h = decay * h + write
        ys.append((h * Cf[:, t, None, :]).sum(-1))
        if return_states:
            states.append(h)
    y = torch.stack(ys, dim=1) if p > 0 else xf.new_zeros(b, 0, e)
    if D is not None:
        y = y + D.to(cdt) * xf
    if z is not None:
        y = silu_gate(y, z)
    if return_states:
        states = torch.stack(states, dim=1) if p > 0 else xf.new_zeros(b, 0, e, n)
    return ScanOutput(y=y, final_state=h, states=states if return_states else None)
