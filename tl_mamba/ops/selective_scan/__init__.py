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

Two features are applied around the backend, in ``tl_mamba.ops.scan_edits`` (shared
with Mamba-2's dispatcher), so that every backend honours them with no code of its own:

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

What this module adds is Mamba-1's layout (:data:`LAYOUT`) and its rules: a dense
mask's quadratic form only without autograd, and the gate fused into the scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tl_mamba.backends import pick_implementation
from tl_mamba.ops.knockout import (SSMMask, dense_mask_after_bpe, dense_removed_terms_bpe, edge_gradient_bpe,
                                  pair_terms_bpe)
from tl_mamba.ops.precision import needs_grad
from tl_mamba.ops.scan_edits import ScanLayout, knockout_in_kernel_or, removals_of, scan_with_edits
from tl_mamba.ops.state_override import StateOverride, check_override_shape
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


def _fuses_knockout() -> bool:
    # looked up at call time (the benchmarks switch it) and only on the Triton backend
    from tl_mamba.ops.selective_scan.triton_kernel import fuses_knockout

    return fuses_knockout()


def _read_out(states: Tensor, C: Tensor, D: Optional[Tensor], x: Tensor) -> Tensor:
    """y from states ``[b, (p,) e, n]``, C ``[b, (p,) n]``, x ``[b, (p,) e]`` and D ``[e]``."""
    y = torch.einsum("...en,...n->...e", states, C)
    return y if D is None else y + D * x


def _decay_and_write(x: Tensor, delta: Tensor, A: Tensor, B: Tensor):
    """``h_t = exp(Δ_t ⊗ A) ⊙ h_{t-1} + (Δ_t x_t) ⊗ B_t``: decay and write, ``[b, p, e, n]`` each."""
    return torch.exp(delta[..., None] * A), (delta * x)[..., None] * B[..., None, :]


LAYOUT = ScanLayout(
    op="selective_scan", target_layout="bpe", features="channels", output=ScanOutput,
    read_out=_read_out, decay_and_write=_decay_and_write, pair_terms=pair_terms_bpe,
    edge_gradient=lambda grad_y, mask, *inputs: edge_gradient_bpe(grad_y, *inputs),
    mask_heads=lambda x: 1,  # one mask for every channel
)
"""Mamba-1's tensors, for the state edits and knockouts (``tl_mamba.ops.scan_edits``)."""


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
    removals = removals_of(LAYOUT, ssm_mask, state_override, x)  # S → T structure, or None (dense or no mask)
    # a dense mask with many column patterns: the quadratic form when no gradient flows through the
    # removed terms (under autograd it would keep a copy of its carried columns per block), else the scans
    quadratic = ssm_mask is not None and removals is None and not needs_grad(x, delta, A, B, C)

    def scan_then_remove() -> ScanOutput:
        """The scan (with any state override), then the knocked-out terms subtracted, then the gate."""
        return scan_with_edits(
            LAYOUT, impl, x, delta, A, B, C, D, initial_state=initial_state, state_override=state_override,
            ssm_mask=ssm_mask, removals=removals, return_states=return_states, z=z,
            dense_terms=(lambda removed: dense_removed_terms_bpe(removed, x, delta, A, B, C)) if quadratic else None,
            max_scans=dense_mask_after_bpe(p, x.device) if quadratic else None)

    # on Triton, one S → T knockout goes into the chunked kernel's own pass, sharing every load
    return knockout_in_kernel_or(
        scan_then_remove, backend=backend, device=x.device, available=tuple(_IMPLEMENTATIONS), removals=removals,
        state_override=state_override, inputs=(x, delta, A, B, C, D, initial_state, z),
        fuses_knockout=_fuses_knockout, kernel_name="selective scan with a knockout in the same pass",
        kernel=lambda removal: _triton(x, delta, A, B, C, D, initial_state=initial_state,
                                       return_states=return_states, z=z, removal=removal))


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
