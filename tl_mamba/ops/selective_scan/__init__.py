"""Mamba-1 selective scan behind one dispatch function.

    h_t = exp(Δ_t ⊗ A) ⊙ h_{t-1} + (Δ_t x_t) ⊗ B_t        h: [b, e, n]
    y_t = h_t · C_t + D ⊙ x_t

Implementations (same signature, same results):

- ``reference.py``: the plain sequential scan, one position at a time. The oracle.
- ``chunked.py``: the ``"torch"`` backend: discretises a chunk of positions at
  once, then runs a tight fused update per position. Fast on CPU, differentiable
  (a hand-written chunked backward that keeps one state per chunk).
- ``triton_kernel.py``: the ``"triton"`` backend: one fused kernel (state in
  registers, fp32, D skip fused), CUDA or ``TRITON_INTERPRET=1``.

Two features live here, in the dispatcher, so that every backend honours them
with no code of its own:

- ``state_override`` (what an edit of ``hook_h`` means): the recurrence continues
  from edited state entries. The scan runs in segments that end at edited
  positions (``tl_mamba.ops.state_override``), so a backend needs only an
  initial and a final state.
- ``ssm_mask`` (``hook_ssm_mask`` knockout): removes hidden-attention terms
  α[i, j]·x_j by linearity. With Δ, B and C fixed, y is linear in x, so the
  knocked-out part is ``1_T ⊙ scan(x ⊙ 1_S)`` with no D skip. Source columns of
  the mask that knock out the same targets are grouped, so an S→T knockout costs
  one extra scan (or, with few edges, a sum over its edges and no scan) and a
  general p×p mask one scan per distinct column pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tl_mamba.backends import pick_implementation, resolve_backend
from tl_mamba.ops.knockout import (EdgeRemoval, SSMMask, as_removal_list, attach_mask_gradient, check_no_override_with_mask,
                                  check_removal, dense_mask_for,
                                  dense_mask_after_bpe, dense_removed_terms_bpe, edge_gradient_bpe,
                                  knocked_out_terms, pair_terms_bpe, removed_terms, same_pass_removal)
from tl_mamba.ops.precision import compute_dtype, needs_grad, silu_gate
from tl_mamba.ops.triton_scan import kernel_or_fallback
from tl_mamba.ops.state_override import (StateOverride, check_override_shape, override_by_recurrence,
                                         scan_with_override)
from tl_mamba.ops.selective_scan.chunked import selective_scan_chunked
from tl_mamba.ops.selective_scan.reference import selective_scan_reference


@dataclass
class ScanOutput:
    y: Tensor  # [b, p, e], fp32
    final_state: Tensor  # [b, e, n], fp32
    states: Optional[Tensor] = None  # [b, p, e, n], fp32, only when asked for


def _triton(*args, **kwargs):
    # imported on first use: the kernel module compiles (or, under TRITON_INTERPRET=1,
    # interprets) its kernels, which plain CPU use never needs
    from tl_mamba.ops.selective_scan.triton_kernel import selective_scan_triton

    return selective_scan_triton(*args, **kwargs)


_IMPLEMENTATIONS = {
    "reference": selective_scan_reference,
    "torch": selective_scan_chunked,
    "triton": _triton,
}


def selective_scan(
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
    z: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> ScanOutput:
    """Run the selective scan with the chosen backend.

    Args:
        x: ``[b, p, e]`` SSM input u.
        delta: ``[b, p, e]`` Δ (after softplus).
        A: ``[e, n]`` (negative) state matrix diagonal.
        B, C: ``[b, p, n]``.
        D: ``[e]`` skip, or None.
        initial_state: ``[b, e, n]`` state before position 0 (zeros when None).
        state_override: entries of the state to replace (see ``StateOverride``).
        ssm_mask: ``[b, 1, p, p]`` hidden-attention mask, 1 = edge kept, 0 = the
            term α[i, j]·x_j is removed from y_i. Entries above the diagonal are
            ignored. The D skip is never masked. Or a list of ``EdgeRemoval``
            (S → T knockouts, optionally per channel), computed without a p×p tensor.
            A tensor mask that requires grad gets ∂L/∂mask (knockout attribution).
        return_states: also return every state ``[b, p, e, n]`` (memory heavy).
        z: ``[b, p, e]`` Mamba-1's gate input, or None. When given, y is returned
            gated, ``y · silu(z)``. The Triton kernel fuses the gate into the scan
            (one write of y instead of three passes over it) when y is the plain
            scan's output; with a mask or a state override the gate is applied
            after the knocked-out terms are removed. Same result either way.
        backend: ``"reference"``, ``"torch"``, ``"triton"`` or ``"auto"``.

    Returns:
        ``ScanOutput`` with y ``[b, p, e]``, the final state ``[b, e, n]`` and,
        when asked for, the states. All fp32 (the scan runs in fp32 for every
        input dtype, as mamba_ssm does).
    """
    if x.dim() != 3:
        raise ValueError(f"selective_scan: x must be [b, p, e], got shape {tuple(x.shape)}")
    if A.dim() != 2:
        raise ValueError(f"selective_scan: A must be [e, n], got shape {tuple(A.shape)}")
    b, p, e = x.shape
    n = A.shape[-1]
    if state_override is not None:
        check_override_shape(state_override, (b, p, e, n))
    _check_shapes(x, delta, A, B, C, D, initial_state, b, p, e, n)
    if z is not None and tuple(z.shape) != (b, p, e):
        raise ValueError(f"selective_scan: z must have shape {(b, p, e)}, got {tuple(z.shape)}")
    impl = pick_implementation(backend, x.device, _IMPLEMENTATIONS)
    check_no_override_with_mask(state_override, ssm_mask, "selective_scan")
    removals = None if ssm_mask is None else as_removal_list(ssm_mask, x.device)  # S → T structure, or None (dense)
    for removal in removals or ():
        check_removal(removal, b, p, e, "channels")

    def scan_then_remove() -> ScanOutput:
        """The scan (with any state override), then the knocked-out terms subtracted, then the gate."""
        # every implementation takes z; it can fuse the gate only when its y is the output
        fuse_gate = z is not None and state_override is None and ssm_mask is None
        if state_override is None:
            out = impl(x, delta, A, B, C, D, initial_state=initial_state, return_states=return_states,
                       **({"z": z} if fuse_gate else {}))
        else:
            def run(start, stop, init, want_states):
                return impl(x[:, start:stop], delta[:, start:stop], A, B[:, start:stop], C[:, start:stop], D,
                            initial_state=init, return_states=want_states)

            def read_out(state, t):  # y_t from an edited state [b, e, n]
                y = torch.einsum("ben,bn->be", state, C[:, t].to(state.dtype))
                return y + (D.to(state.dtype) * x[:, t].to(state.dtype) if D is not None else 0)

            def recurrence():  # every edit in one pass over the states (many edited positions)
                cdt = compute_dtype(x, delta, A, B, C, initial_state)
                xf, df = x.to(cdt), delta.to(cdt)
                decay = torch.exp(df[..., None] * A.to(cdt))  # [b, p, e, n]
                write = (df * xf)[..., None] * B.to(cdt)[:, :, None, :]

                def read_all(states):
                    y = torch.einsum("bpen,bpn->bpe", states, C.to(cdt))
                    return y + (D.to(cdt) * xf if D is not None else 0)

                return override_by_recurrence(decay, write, read_all, state_override, initial_state)

            y, final, states = scan_with_override(
                run, read_out, p, state_override, initial_state, return_states, recurrence,
                differentiable=needs_grad(x, delta, A, B, C, D, initial_state, state_override.values))
            out = ScanOutput(y=y, final_state=final, states=states)
        if ssm_mask is not None:
            def pairs(targets: Tensor, sources: Tensor) -> Tensor:  # [b, P, e]: α[i, j] x_j per channel
                return pair_terms_bpe(x, delta, A, B, C, targets, sources)

            # S → T structure: no p × p tensor; per removal one scan, or a sum over few edges
            if removals is not None:
                def contribution_by_row(sources: Tensor, start: int, stop: int) -> Tensor:  # sources [b, p]
                    window = slice(start, stop)
                    return impl(x[:, window] * sources[:, window, None].to(x.dtype), delta[:, window], A,
                                B[:, window], C[:, window], None, initial_state=None, return_states=False).y

                out.y = out.y - removed_terms(contribution_by_row, removals, "bpe", out.y.shape, pairs)
            else:
                mask = dense_mask_for(ssm_mask, b, 1, p, "selective_scan")  # [b, 1, p, p]

                def contribution(sources: Tensor) -> Tensor:
                    return impl(x * sources[None, :, None].to(x.dtype), delta, A, B, C, None,
                                initial_state=None, return_states=False).y

                def dense(removed: Tensor) -> Tensor:
                    return dense_removed_terms_bpe(removed, x, delta, A, B, C)

                # a mask with many column patterns: the quadratic form when no gradient flows
                # through the removed terms (under autograd it would keep a copy of its carried
                # columns per block), else the scans
                quadratic = not needs_grad(x, delta, A, B, C)
                out.y = out.y - knocked_out_terms(contribution, mask, target_layout="bpe",
                                                  pair_terms=pairs, dense_terms=dense if quadratic else None,
                                                  max_scans=dense_mask_after_bpe(p, x.device) if quadratic else None)
                if mask.requires_grad and torch.is_grad_enabled():  # knockout attribution: ∂L/∂mask
                    out.y = attach_mask_gradient(out.y, mask,
                                                 lambda grad_y: edge_gradient_bpe(grad_y, x, delta, A, B, C))
        if z is not None and not fuse_gate:
            out.y = silu_gate(out.y, z)
        return out

    knockout = _knockout_in_kernel(backend, x.device, removals, state_override,
                                   (x, delta, A, B, C, D, initial_state, z))
    if knockout is None:
        return scan_then_remove()
    # the Triton kernel applies the knockout in the same pass, sharing every load
    return kernel_or_fallback("selective scan with a knockout in the same pass", x.device,
                              lambda: _triton(x, delta, A, B, C, D, initial_state=initial_state,
                                              return_states=return_states, z=z, removal=knockout),
                              scan_then_remove, "a separate knockout scan")


def _knockout_in_kernel(backend, device, removals, state_override, inputs) -> Optional[EdgeRemoval]:
    """The S → T knockout the chunked Triton kernel applies in the same pass (see
    :func:`tl_mamba.ops.knockout.same_pass_removal`), or None: a separate scan then."""
    if removals is None or resolve_backend(backend, device, available=tuple(_IMPLEMENTATIONS)) != "triton":
        return None
    from tl_mamba.ops.selective_scan.triton_kernel import fuses_knockout

    return same_pass_removal(removals, state_override, inputs, kernel_runs=fuses_knockout())


def _check_shapes(x, delta, A, B, C, D, initial_state, b, p, e, n) -> None:
    expected = {
        "delta": (delta, (b, p, e)),
        "A": (A, (e, n)),
        "B": (B, (b, p, n)),
        "C": (C, (b, p, n)),
    }
    if D is not None:
        expected["D"] = (D, (e,))
    if initial_state is not None:
        expected["initial_state"] = (initial_state, (b, e, n))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(tensor.shape)}")


__all__ = ["selective_scan", "ScanOutput", "StateOverride", "selective_scan_reference", "selective_scan_chunked"]
