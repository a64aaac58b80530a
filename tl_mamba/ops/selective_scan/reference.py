"""The plain sequential selective scan: the oracle every other backend must match.

It does exactly what the recurrence says, one position at a time, in fp32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def selective_scan_reference(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    *,
    initial_state: Optional[Tensor] = None,
    state_override=None,
    return_states: bool = False,
):
    """Sequential scan. Shapes as in ``tl_mamba.ops.selective_scan.selective_scan``."""
    from tl_mamba.ops.selective_scan import ScanOutput

    b, p, e = x.shape
    n = A.shape[-1]
    xf, df, Bf, Cf, Af = x.float(), delta.float(), B.float(), C.float(), A.float()
    h = x.new_zeros(b, e, n, dtype=torch.float32) if initial_state is None else initial_state.float()
    ys, states = [], []
    for t in range(p):
        decay = torch.exp(df[:, t, :, None] * Af)  # [b, e, n]
        write = (df[:, t] * xf[:, t])[:, :, None] * Bf[:, t, None, :]  # [b, e, n]
        h = decay * h + write
        if state_override is not None:
            h = torch.where(state_override.mask[:, t], state_override.values[:, t].float(), h)
        ys.append((h * Cf[:, t, None, :]).sum(-1))
        if return_states:
            states.append(h)
    y = torch.stack(ys, dim=1) if p > 0 else xf.new_zeros(b, 0, e)
    if D is not None:
        y = y + D.float() * xf
    return ScanOutput(y=y, final_state=h, states=torch.stack(states, dim=1) if return_states else None)
