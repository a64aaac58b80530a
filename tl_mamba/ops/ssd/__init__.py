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
around the backend, in ``tl_mamba.ops.scan_edits`` (shared with Mamba-1's
dispatcher), with nothing asked of the backends beyond an initial state and a
final state. What this module adds is Mamba-2's layout (:data:`LAYOUT`) and its
rules: a dense mask's quadratic form is the masked-tile kernel on Triton, and on
Triton a single S → T knockout with no gradient to take goes into the chunked
kernels' own pass (``triton_kernel.SAME_PASS``, see its docstring), with the same result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from tl_mamba.backends import pick_implementation
from tl_mamba.ops.knockout import (SSMMask, dense_mask_after, dense_removed_terms_bphd, edge_gradient_bphd,
                                  pair_terms_bphd)
from tl_mamba.ops.scan_edits import ScanLayout, knockout_in_kernel_or, removals_of, scan_with_edits
from tl_mamba.ops.ssd.chunked import DEFAULT_CHUNK, ssd_chunked
from tl_mamba.ops.ssd.reference import ssd_reference
from tl_mamba.ops.state_override import StateOverride, check_override_shape


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


SAME_PASS_KNOCKOUT = "SSD scan with a knockout in the same pass"
"""The name the dispatcher gives that kernel in ``kernel_or_fallback`` (and its failure record)."""


def _fuses_knockout() -> bool:
    # looked up at call time (the benchmarks switch it) and only on the Triton backend
    from tl_mamba.ops.ssd.triton_kernel import fuses_knockout

    return fuses_knockout()


def _per_head(C: Tensor, heads: int) -> Tensor:
    """B or C ``[..., g, n]`` → ``[..., h, n]``: each group's row repeated for its heads."""
    return C.repeat_interleave(heads // C.shape[-2], dim=-2)


def _read_out(states: Tensor, C: Tensor, D: Optional[Tensor], x: Tensor) -> Tensor:
    """y from states ``[b, (p,) h, hd, n]``, C ``[b, (p,) g, n]``, x ``[b, (p,) h, hd]`` and D ``[h]``."""
    y = torch.einsum("...hdn,...hn->...hd", states, _per_head(C, states.shape[-3]))
    return y if D is None else y + D[:, None] * x


def _decay_and_write(x: Tensor, delta: Tensor, A: Tensor, B: Tensor):
    """``h_t = exp(Δ_t A_h) h_{t-1} + (Δ_t x_t) ⊗ B_t``: decay ``[b, p, h, 1, 1]``, write ``[b, p, h, hd, n]``."""
    write = (delta[..., None] * x)[..., None] * _per_head(B, x.shape[-2])[..., None, :]
    return torch.exp(delta * A)[..., None, None], write


LAYOUT = ScanLayout(
    op="ssd_scan", target_layout="bphd", features="heads", output=SSDOutput,
    read_out=_read_out, decay_and_write=_decay_and_write, pair_terms=pair_terms_bphd,
    edge_gradient=lambda grad_y, mask, *inputs: edge_gradient_bphd(grad_y, *inputs, mask_heads=mask.shape[1]),
    mask_heads=lambda x: x.shape[2],  # a mask per head, or one shared by them
)
"""Mamba-2's tensors, for the state edits and knockouts (``tl_mamba.ops.scan_edits``)."""


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
    removals = removals_of(LAYOUT, ssm_mask, state_override, x)  # S → T structure, or None (dense or no mask)

    def scan_then_remove() -> SSDOutput:
        """The scan (with any state override), then the knocked-out terms subtracted."""
        return scan_with_edits(
            LAYOUT, impl, x, delta, A, B, C, D, initial_state=initial_state, state_override=state_override,
            ssm_mask=ssm_mask, removals=removals, return_states=return_states,
            dense_terms=lambda removed: _dense_mask_implementation(backend, x.device)(removed, x, delta, A, B, C),
            max_scans=dense_mask_after(p, x.device, x.dtype))

    # on Triton, one S → T knockout goes into the chunked kernels' own pass, sharing every load
    return knockout_in_kernel_or(
        scan_then_remove, backend=backend, device=x.device, available=_IMPLEMENTATION_NAMES, removals=removals,
        state_override=state_override, inputs=(x, delta, A, B, C, D, initial_state),
        fuses_knockout=_fuses_knockout, kernel_name=SAME_PASS_KNOCKOUT,
        kernel=lambda removal: _triton(x, delta, A, B, C, D, initial_state=initial_state,
                                       return_states=return_states, removal=removal))


__all__ = ["ssd_scan", "SSDOutput", "StateOverride", "ssd_reference", "ssd_chunked"]
