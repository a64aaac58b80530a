"""Mamba-2 scan (SSD: scalar decay per head) behind one dispatch function.

    h_t = exp(Δ_t A_h) h_{t-1} + (Δ_t x_t) ⊗ B_t       h: [b, h, hd, n]
    y_t = h_t C_t + D_h x_t

- ``reference.py``: the sequential scan, the oracle.
- ``chunked.py``: the ``"torch"`` backend, the chunked SSD form.
- ``triton_kernel.py`` / ``triton_chunked.py``: the ``"triton"`` backend (CUDA or
  ``TRITON_INTERPRET=1``): chunked SSD kernels (``tl.dot`` within chunks, one
  sequential pass over chunks), plus a per-chunk walk writing every state when they
  are asked for (``hook_h``); D skip fused. A recurrent kernel (fp32 state in
  registers) covers what the chunks cannot. ``triton_masked.py``: a general
  knockout mask's removed terms by masked tiles.

State edits (``hook_h``) and knockout masks (``hook_ssm_mask``) are applied
here, in the dispatcher, with nothing asked of the backends beyond an initial
state and a final state: see ``tl_mamba.ops.state_override`` and
``tl_mamba.ops.knockout``. The one exception: on the Triton backend, a single
S → T knockout with no gradient to take goes into the chunked kernels' own pass
(``triton_kernel.SAME_PASS``, see its docstring), with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tl_mamba.backends import pick_implementation, resolve_backend
from tl_mamba.ops.knockout import (SSMMask, as_removal_list, attach_mask_gradient, check_no_override_with_mask,
                                  check_removal, dense_mask_for,
                                  dense_mask_after, dense_removed_terms_bphd, edge_gradient_bphd, knocked_out_terms,
                                  pair_terms_bphd, removed_terms, same_pass_removal)
from tl_mamba.ops.precision import compute_dtype, needs_grad
from tl_mamba.ops.ssd.chunked import DEFAULT_CHUNK, ssd_chunked
from tl_mamba.ops.ssd.reference import ssd_reference
from tl_mamba.ops.state_override import (StateOverride, check_override_shape, override_by_recurrence,
                                         scan_with_override)
from tl_mamba.ops.triton_scan import kernel_or_fallback


@dataclass
class SSDOutput:
    y: Tensor  # [b, p, h, hd] fp32
    final_state: Tensor  # [b, h, hd, n] fp32
    states: Optional[Tensor] = None  # [b, p, h, hd, n] fp32, only when asked for


def _triton(*args, **kwargs):
    # imported on first use: plain CPU use never needs the kernel module
    from tl_mamba.ops.ssd.triton_kernel import ssd_triton

    return ssd_triton(*args, **kwargs)


def _triton_masked(*args, **kwargs):
    from tl_mamba.ops.ssd.triton_masked import masked_removed_terms_triton

    return masked_removed_terms_triton(*args, **kwargs)


def _dense_mask_implementation(backend: Optional[str], device):
    """The quadratic form of a dense mask's removed terms: masked tiles on Triton, torch elsewhere."""
    return pick_implementation(backend, device, {
        "reference": dense_removed_terms_bphd,
        "torch": dense_removed_terms_bphd,
        "triton": _triton_masked,
    })


_IMPLEMENTATION_NAMES = ("reference", "torch", "triton")  # what "auto" and a named backend resolve to


def _implementation(backend: Optional[str], device, chunk_size: int):
    return pick_implementation(backend, device, {
        "reference": ssd_reference,
        "torch": lambda *a, **k: ssd_chunked(*a, chunk_size=chunk_size, **k),
        "triton": _triton,
    })


def ssd_scan(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    *,
    initial_state: Optional[Tensor] = None,
    state_override: Optional[StateOverride] = None,
    ssm_mask: Optional[SSMMask] = None,
    return_states: bool = False,
    backend: Optional[str] = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> SSDOutput:
    """Run the Mamba-2 scan with the chosen backend.

    Args:
        x: ``[b, p, h, hd]`` SSM input per head.
        delta: ``[b, p, h]`` Δ (after softplus and clamping).
        A: ``[h]`` negative decay rate per head.
        B, C: ``[b, p, g, n]`` per group (``h`` divisible by ``g``).
        D: ``[h]`` skip, or None.
        initial_state: ``[b, h, hd, n]``.
        state_override: edits of the state (what editing ``hook_h`` means).
        ssm_mask: ``[b, h, p, p]`` per-head hidden-attention mask, 1 = kept; or a list of
            ``EdgeRemoval`` (S → T knockouts, optionally per head), computed without a p×p tensor.
            A tensor mask that requires grad gets ∂L/∂mask (knockout attribution).
        return_states: also return every state ``[b, p, h, hd, n]``.
        backend: ``"reference"``, ``"torch"``, ``"triton"`` or ``"auto"``.
        chunk_size: chunk length of the torch backend (results do not depend on it).

    Returns:
        ``SSDOutput`` (all fp32).
    """
    if x.dim() != 4:
        raise ValueError(f"ssd_scan: x must be [b, p, h, hd], got shape {tuple(x.shape)}")
    b, p, h, hd = x.shape
    if B.dim() != 4 or B.shape[:2] != (b, p) or C.shape != B.shape:
        raise ValueError(f"ssd_scan: B and C must be [b, p, g, n] = [{b}, {p}, g, n], got {tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[-2:]
    if h % g:
        raise ValueError(f"ssd_scan: {h} heads are not divisible into {g} groups")
    for name, tensor, shape in (("delta", delta, (b, p, h)), ("A", A, (h,)), ("D", D, (h,)),
                                ("initial_state", initial_state, (b, h, hd, n))):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"ssd_scan: {name} must have shape {shape}, got {tuple(tensor.shape)}")
    if state_override is not None:
        check_override_shape(state_override, (b, p, h, hd, n))
    impl = _implementation(backend, x.device, chunk_size)
    check_no_override_with_mask(state_override, ssm_mask, "ssd_scan")
    removals = None if ssm_mask is None else as_removal_list(ssm_mask, x.device)  # S → T structure, or None
    for removal in removals or ():
        check_removal(removal, b, p, h, "heads")

    def scan_then_remove() -> SSDOutput:
        """The scan (with any state override), then the knocked-out terms subtracted."""
        if state_override is None:
            out = impl(x, delta, A, B, C, D, initial_state=initial_state, return_states=return_states)
        else:
            heads_per_group = h // g

            def run(start, stop, init, want_states):
                return impl(x[:, start:stop], delta[:, start:stop], A, B[:, start:stop], C[:, start:stop], D,
                            initial_state=init, return_states=want_states)

            def read_out(state, t):
                Ct = C[:, t].to(state.dtype).repeat_interleave(heads_per_group, dim=1)  # [b, h, n]
                y = torch.einsum("bhpn,bhn->bhp", state, Ct)
                return y + (D.to(state.dtype)[:, None] * x[:, t].to(state.dtype) if D is not None else 0)

            def recurrence():  # every edit in one pass over the states (many edited positions)
                cdt = compute_dtype(x, delta, A, B, C, initial_state)
                xf, df = x.to(cdt), delta.to(cdt)
                Bh = B.to(cdt).repeat_interleave(heads_per_group, dim=2)  # [b, p, h, n]
                Ch = C.to(cdt).repeat_interleave(heads_per_group, dim=2)
                decay = torch.exp(df * A.to(cdt))[..., None, None]  # [b, p, h, 1, 1]
                write = (df[..., None] * xf)[..., None] * Bh[:, :, :, None, :]  # [b, p, h, hd, n]

                def read_all(states):
                    y = torch.einsum("bphdn,bphn->bphd", states, Ch)
                    return y + (D.to(cdt)[:, None] * xf if D is not None else 0)

                return override_by_recurrence(decay, write, read_all, state_override, initial_state)

            y, final, states = scan_with_override(
                run, read_out, p, state_override, initial_state, return_states, recurrence,
                differentiable=needs_grad(x, delta, A, B, C, D, initial_state, state_override.values))
            out = SSDOutput(y=y, final_state=final, states=states)
        if ssm_mask is None:
            return out

        def pairs(targets: Tensor, sources: Tensor) -> Tensor:  # [b, P, h, hd]: α_h[i, j] x_j[h]
            return pair_terms_bphd(x, delta, A, B, C, targets, sources)

        # S → T structure: no p × p tensor; per removal one scan, or a sum over few edges
        if removals is not None:
            def contribution_by_row(sources: Tensor, start: int, stop: int) -> Tensor:  # sources [b, p]
                window = slice(start, stop)
                xs = x[:, window] * sources[:, window, None, None].to(x.dtype)
                return impl(xs, delta[:, window], A, B[:, window], C[:, window], None, initial_state=None,
                            return_states=False).y

            out.y = out.y - removed_terms(contribution_by_row, removals, "bphd", out.y.shape, pairs)
        else:
            mask = dense_mask_for(ssm_mask, b, h, p, "ssd_scan")  # [b, h or 1, p, p]

            def contribution(sources: Tensor) -> Tensor:  # sources [p]: the positions whose input is kept
                xs = x * sources[None, :, None, None].to(x.dtype)
                return impl(xs, delta, A, B, C, None, initial_state=None, return_states=False).y  # [b, p, h, hd]

            out.y = out.y - knocked_out_terms(
                contribution, mask, target_layout="bphd", max_scans=dense_mask_after(p, x.device, x.dtype),
                pair_terms=pairs,
                dense_terms=lambda removed: _dense_mask_implementation(backend, x.device)(removed, x, delta, A, B, C))
            if mask.requires_grad and torch.is_grad_enabled():  # knockout attribution: ∂L/∂mask
                out.y = attach_mask_gradient(out.y, mask, lambda grad_y: edge_gradient_bphd(
                    grad_y, x, delta, A, B, C, mask_heads=mask.shape[1]))
        return out

    if (removals is None or p == 0  # (resolved only for a knockout: the plain forward's path stays as short)
            or resolve_backend(backend, x.device, available=_IMPLEMENTATION_NAMES) != "triton"):
        return scan_then_remove()
    from tl_mamba.ops.ssd.triton_kernel import SAME_PASS_KNOCKOUT, fuses_knockout

    knockout = same_pass_removal(removals, state_override, (x, delta, A, B, C, D, initial_state), fuses_knockout())
    if knockout is None:
        return scan_then_remove()
    # the chunked kernels apply the knockout in the same pass, sharing every load
    return kernel_or_fallback(SAME_PASS_KNOCKOUT, x.device,
                              lambda: _triton(x, delta, A, B, C, D, initial_state=initial_state,
                                              return_states=return_states, removal=knockout),
                              scan_then_remove, "a separate knockout scan")


__all__ = ["ssd_scan", "SSDOutput", "StateOverride", "ssd_reference", "ssd_chunked"]
