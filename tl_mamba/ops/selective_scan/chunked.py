"""The ``"torch"`` backend of the Mamba-1 selective scan.

The per-position work of the recurrence is one fused ``addcmul`` on a ``[b, e, n]``
state. Everything else (discretisation ``exp(Δ ⊗ A)``, the write ``Δx ⊗ B`` and
the read-out ``h · C``) is done for a chunk of positions at once, so the chunk's
intermediates stay in cache and the Python loop carries a single op per step.
Without autograd, states are written in place into a preallocated chunk buffer;
with autograd, they are stacked, so the whole scan is differentiable.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from tl_mamba.ops.precision import compute_dtype, needs_grad, silu_gate

DEFAULT_CHUNK = 64


def selective_scan_chunked(
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
    chunk_size: int = DEFAULT_CHUNK,
):
    """Chunked scan. Shapes as in ``tl_mamba.ops.selective_scan.selective_scan``."""
    from tl_mamba.ops.selective_scan import ScanOutput

    b, p, e = x.shape
    n = A.shape[-1]
    cdt = compute_dtype(x, delta, A, B, C, initial_state)
    xf, df, Bf, Cf, Af = (t.to(cdt) for t in (x, delta, B, C, A))
    h = x.new_zeros(b, e, n, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    differentiable = needs_grad(x, delta, A, B, C, initial_state)
    ys, all_states = [], []
    # Without autograd, states go straight into one buffer (no concatenation copy). It is a
    # normal tensor even under inference mode, so hook_h can track in-place edits without a copy.
    states_buffer = None
    if return_states and not differentiable:
        with torch.inference_mode(False):
            states_buffer = x.new_empty(b, p, e, n, dtype=cdt)
    for start in range(0, p, chunk_size):
        stop = min(start + chunk_size, p)
        d_c = df[:, start:stop]
        decay = torch.exp(d_c[..., None] * Af)  # [b, L, e, n]
        write = (d_c * xf[:, start:stop])[..., None] * Bf[:, start:stop, None, :]  # [b, L, e, n]
        if differentiable:
            # unbind, not decay[:, t]: each indexing op's backward would scatter into a
            # zero [b, L, e, n] buffer (quadratic in L); unbind's backward is one stack.
            chunk_states = []
            for decay_t, write_t in zip(decay.unbind(1), write.unbind(1)):
                h = torch.addcmul(write_t, decay_t, h)
                chunk_states.append(h)
            states = torch.stack(chunk_states, dim=1)
        else:
            states = torch.empty_like(write) if states_buffer is None else states_buffer[:, start:stop]
            for t in range(stop - start):
                h = torch.addcmul(write[:, t], decay[:, t], h, out=states[:, t])
        ys.append(torch.einsum("blen,bln->ble", states, Cf[:, start:stop]))
        if return_states and states_buffer is None:
            all_states.append(states)
    y = torch.cat(ys, dim=1) if ys else xf.new_zeros(b, 0, e)
    if D is not None:
        y = y + D.to(cdt) * xf
    if z is not None:
        y = silu_gate(y, z)
    states = None
    if states_buffer is not None:
        states = states_buffer
    elif return_states:
        states = torch.cat(all_states, dim=1) if all_states else xf.new_zeros(b, 0, e, n)
    return ScanOutput(y=y, final_state=h, states=states)
