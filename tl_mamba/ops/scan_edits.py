"""State edits and knockouts around any scan implementation: what both scan dispatchers share.

``selective_scan`` (Mamba-1) and ``ssd_scan`` (Mamba-2) apply an edit of ``hook_h`` and a
``hook_ssm_mask`` knockout here, the same way for every backend, asking nothing of the backend
beyond a scan with an initial and a final state:

- a state override scans in segments that end at edited positions, or, with many of them, runs
  one masked recurrence over the states (``tl_mamba.ops.state_override``);
- a knockout subtracts the knocked-out terms from y by linearity: edge by edge, by one extra
  scan per S → T removal or per column pattern of a dense mask, or in the quadratic form
  (``tl_mamba.ops.knockout``);
- both together: y of the edited scan, less the sources' part of it. With Δ, B, C and the
  edited values fixed, that y is affine in x, and x_j's part reaches y_i through the states,
  except through an entry edited in between (the edit replaced what the entry held). So the
  knocked-out part is the scan of ``x ⊙ 1_S`` with the edited entries set to zero, by the
  scans (the edge-by-edge and quadratic forms know no edits);
- on the Triton backend, a single S → T knockout with no gradient to take goes into the family's
  kernel, in the same pass as its scan (:func:`knockout_in_kernel_or`), with the same result.

What differs between the families is only how their tensors line up: a :class:`ScanLayout`
says it, and each dispatcher defines its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from tl_mamba.backends import resolve_backend
from tl_mamba.ops.knockout import (EdgeRemoval, SSMMask, as_removal_list, attach_mask_gradient, check_removal,
                                   dense_mask_for, knocked_out_terms, removed_terms, same_pass_removal)
from tl_mamba.ops.precision import compute_dtype, needs_grad, silu_gate
from tl_mamba.ops.state_override import StateOverride, override_by_recurrence, scan_with_override
from tl_mamba.ops.triton_scan import kernel_or_fallback


@dataclass(frozen=True)
class ScanLayout:
    """How one scan family lays out its tensors: all that the edits need to know of it.

    Mamba-1 (``"bpe"``): x ``[b, p, e]``, Δ ``[b, p, e]``, A ``[e, n]``, B and C ``[b, p, n]``,
    D ``[e]``, a state ``[b, e, n]``; a knockout's features are channels and its mask ``[b, 1, p, p]``.
    Mamba-2 (``"bphd"``): x ``[b, p, h, hd]``, Δ ``[b, p, h]``, A ``[h]``, B and C ``[b, p, g, n]``,
    D ``[h]``, a state ``[b, h, hd, n]``; features are heads and the mask ``[b, h or 1, p, p]``.

    Attributes:
        op: the dispatcher's name, in error messages.
        target_layout: ``"bpe"`` or ``"bphd"``, as ``tl_mamba.ops.knockout`` keys its rules.
        features: ``"channels"`` or ``"heads"``, what a removal's ``features`` index.
        output: the dispatcher's output dataclass (fields ``y``, ``final_state``, ``states``).
        read_out: ``read_out(states, C, D, x)`` → y including the D skip, from states at one
            position (``[b, *state]``, C ``[b, n]`` or ``[b, g, n]``, x ``[b, *features]``) or at
            every position (a ``p`` axis after ``b`` in each); D may be None. All in one dtype.
        decay_and_write: ``decay_and_write(x, delta, A, B)`` → ``(decay, write)``, the
            recurrence ``h_t = decay_t ⊙ h_{t-1} + write_t`` with both broadcastable to
            ``[b, p, *state]``.
        pair_terms: ``pair_terms(x, delta, A, B, C, targets [P], sources [P])`` →
            ``α[i, j] x_j`` per pair, ``[b, P, *features]``.
        edge_gradient: ``edge_gradient(grad_y, mask, x, delta, A, B, C)`` → ∂L/∂mask,
            the mask's shape, given ∂L/∂y.
        mask_heads: ``mask_heads(x)``, the head axis a per-head mask may have (1: none).
    """

    op: str
    target_layout: str
    features: str
    output: type
    read_out: Callable[[Tensor, Tensor, Optional[Tensor], Tensor], Tensor]
    decay_and_write: Callable[[Tensor, Tensor, Tensor, Tensor], Tuple[Tensor, Tensor]]
    pair_terms: Callable[..., Tensor]
    edge_gradient: Callable[..., Tensor]
    mask_heads: Callable[[Tensor], int]


def removals_of(layout: ScanLayout, ssm_mask: Optional[SSMMask], state_override: Optional[StateOverride],
                x: Tensor) -> Optional[List[EdgeRemoval]]:
    """``ssm_mask``'s S → T removals, checked against x's batch, positions and features; None for a
    dense mask or none. Refuses ∂L/∂mask (a mask that requires grad) together with a state override:
    that gradient is the unedited scan's."""
    if (state_override is not None and isinstance(ssm_mask, Tensor) and ssm_mask.requires_grad
            and torch.is_grad_enabled()):
        raise NotImplementedError(f"{layout.op}: a state_override with an ssm_mask that requires grad is not "
                                  "supported: ∂L/∂mask scores the edges of the unedited scan. Take it without the "
                                  "edit, or detach the mask.")
    removals = None if ssm_mask is None else as_removal_list(ssm_mask, x.device)
    b, p, n_features = x.shape[:3]
    for removal in removals or ():
        check_removal(removal, b, p, n_features, layout.features)
    return removals


def keep_sources(x: Tensor, sources: Tensor) -> Tensor:
    """``x ⊙ 1_S``: x ``[b, p, *features]`` with only the positions ``sources`` (``[p]``, or ``[b, p]``
    per row; 1 = kept) left, in x's dtype."""
    return x * sources[(..., *([None] * (x.dim() - 2)))].to(x.dtype)


def scan_with_edits(layout: ScanLayout, impl: Callable, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                    D: Optional[Tensor], *, initial_state: Optional[Tensor], state_override: Optional[StateOverride],
                    ssm_mask: Optional[SSMMask], removals: Optional[List[EdgeRemoval]], return_states: bool,
                    z: Optional[Tensor] = None, dense_terms: Optional[Callable[[Tensor], Tensor]] = None,
                    max_scans: Optional[int] = None):
    """The scan by ``impl`` with any state override, then any knockout's terms subtracted from y,
    then any gate.

    Args:
        layout: the family's :class:`ScanLayout`.
        impl: the backend's scan, ``impl(x, delta, A, B, C, D, initial_state=, return_states=)``
            → ``layout.output`` (and ``z=`` for a gate).
        x, delta, A, B, C, D, initial_state, return_states: as the dispatcher's (checked there).
        state_override: edits of the state, or None.
        ssm_mask: the knockout, or None. With a state override too, the sources' terms stop at
            edited entries (see the module's docstring).
        removals: ``removals_of(layout, ssm_mask, ...)``: the mask's S → T removals, or None.
        z: Mamba-1's gate input (y is returned as ``y · silu(z)``), or None. ``impl`` fuses it into
            its scan when that scan's y is the output (no edit, no knockout); otherwise it is
            applied here after the knocked-out terms are removed. Same result either way.
        dense_terms: for a dense mask, ``dense_terms(removed [b, H, p, p])`` → the removed terms in the
            quadratic form, used past ``max_scans`` column patterns; None: always scans.

    Returns:
        ``layout.output`` (all fp32, or float64 for float64 inputs).
    """
    fuse_gate = z is not None and state_override is None and ssm_mask is None
    if state_override is None:
        out = impl(x, delta, A, B, C, D, initial_state=initial_state, return_states=return_states,
                   **({"z": z} if fuse_gate else {}))
    else:
        out = layout.output(*_scan_with_override(layout, impl, x, delta, A, B, C, D, initial_state,
                                                 state_override, return_states))
    if ssm_mask is not None:
        out.y = _without_knocked_out_terms(layout, impl, out.y, x, delta, A, B, C, ssm_mask, removals,
                                           dense_terms, max_scans, state_override)
    if z is not None and not fuse_gate:
        out.y = silu_gate(out.y, z)
    return out


def _without_knocked_out_terms(layout, impl, y, x, delta, A, B, C, ssm_mask, removals, dense_terms, max_scans,
                               state_override):
    """y with the knocked-out terms of ``ssm_mask`` subtracted (and, for a dense mask that requires
    grad, a gradient path to it); with ``state_override``, terms stop at the edited entries."""

    def sources_part(xs: Tensor, start: int, stop: int) -> Tensor:
        """y over ``start:stop`` of the input ``xs`` (already cut to it) alone: no D skip, a zero
        initial state, and the edited entries of ``state_override`` set to zero."""
        window = slice(start, stop)
        if state_override is None:
            return impl(xs, delta[:, window], A, B[:, window], C[:, window], None, initial_state=None,
                        return_states=False).y
        edited = state_override.mask[:, window]
        erased = StateOverride(values=xs.new_zeros(()).expand(edited.shape), mask=edited,
                               positions=[t - start for t in state_override.edited_positions() if start <= t < stop])
        return _scan_with_override(layout, impl, xs, delta[:, window], A, B[:, window], C[:, window], None, None,
                                   erased, False)[0]

    def pair_terms(targets: Tensor, sources: Tensor) -> Tensor:  # [b, P, *features]: α[i, j] x_j
        return layout.pair_terms(x, delta, A, B, C, targets, sources)

    # only the scans know the edits: the edge-by-edge and quadratic forms read the unedited α
    pairs = pair_terms if state_override is None else None
    dense_terms = dense_terms if state_override is None else None
    if removals is not None:  # S → T structure: no p × p tensor; per removal one scan, or a sum over few edges
        def contribution_by_row(sources: Tensor, start: int, stop: int) -> Tensor:  # sources [b, p]
            return sources_part(keep_sources(x[:, start:stop], sources[:, start:stop]), start, stop)

        return y - removed_terms(contribution_by_row, removals, layout.target_layout, y.shape, pairs)
    b, p = x.shape[:2]
    mask = dense_mask_for(ssm_mask, b, layout.mask_heads(x), p, layout.op)  # [b, H, p, p]

    def contribution(sources: Tensor) -> Tensor:  # sources [p]: the positions whose input is kept
        return sources_part(keep_sources(x, sources), 0, p)

    y = y - knocked_out_terms(contribution, mask, target_layout=layout.target_layout, pair_terms=pairs,
                              dense_terms=dense_terms, max_scans=max_scans)
    if mask.requires_grad and torch.is_grad_enabled():  # knockout attribution: ∂L/∂mask
        y = attach_mask_gradient(y, mask, lambda grad_y: layout.edge_gradient(grad_y, mask, x, delta, A, B, C))
    return y


def _scan_with_override(layout, impl, x, delta, A, B, C, D, initial_state, state_override, return_states):
    """``(y, final_state, states)`` with the edits of ``state_override``: in segments run by ``impl``,
    or in one recurrence over the states (``tl_mamba.ops.state_override.scan_with_override`` chooses)."""

    def run(start, stop, init, want_states):
        return impl(x[:, start:stop], delta[:, start:stop], A, B[:, start:stop], C[:, start:stop], D,
                    initial_state=init, return_states=want_states)

    def read_out(state, t):  # y_t from an edited state [b, *state]
        dtype = state.dtype
        return layout.read_out(state, C[:, t].to(dtype), None if D is None else D.to(dtype), x[:, t].to(dtype))

    def recurrence():  # every edit in one pass over the states (many edited positions)
        cdt = compute_dtype(x, delta, A, B, C, initial_state)
        xf, Cf, Df = x.to(cdt), C.to(cdt), None if D is None else D.to(cdt)
        decay, write = layout.decay_and_write(xf, delta.to(cdt), A.to(cdt), B.to(cdt))
        return override_by_recurrence(decay, write, lambda states: layout.read_out(states, Cf, Df, xf),
                                      state_override, initial_state)

    return scan_with_override(run, read_out, x.shape[1], state_override, initial_state, return_states, recurrence,
                              differentiable=needs_grad(x, delta, A, B, C, D, initial_state, state_override.values))


def knockout_in_kernel_or(scan_then_remove: Callable[[], object], *, backend: Optional[str], device,
                          available: Sequence[str], removals: Optional[List[EdgeRemoval]],
                          state_override: Optional[StateOverride], inputs: Sequence[Optional[Tensor]],
                          fuses_knockout: Callable[[], bool], kernel: Callable[[EdgeRemoval], object],
                          kernel_name: str):
    """``kernel(removal)`` where the family's Triton kernel applies the knockout in the same pass as its
    scan (:func:`tl_mamba.ops.knockout.same_pass_removal`: one S → T removal, no state override, no
    gradient to take, and ``fuses_knockout()``), else ``scan_then_remove()``, the route every backend
    takes. The kernel falls back to that route, same result, where it fails on a GPU
    (``tl_mamba.ops.triton_scan.kernel_or_fallback``).

    Args:
        available: the family's implementation names (for resolving ``"auto"``).
        inputs: the scan's tensors, for the gradient check.
        fuses_knockout: whether the kernel in use can (asked only on the Triton backend, so that
            plain CPU use never imports the kernel module).
        kernel_name: the kernel's name in ``kernel_or_fallback``'s report.
    """
    # resolved only for a knockout: the plain forward's path stays as short
    if (removals is None or inputs[0].shape[1] == 0  # (no positions: nothing for a kernel to do)
            or resolve_backend(backend, device, available=tuple(available)) != "triton"):
        return scan_then_remove()
    removal = same_pass_removal(removals, state_override, inputs, kernel_runs=fuses_knockout())
    if removal is None:
        return scan_then_remove()
    return kernel_or_fallback(kernel_name, device, lambda: kernel(removal), scan_then_remove,
                              "a separate knockout scan")


__all__ = ["ScanLayout", "removals_of", "keep_sources", "scan_with_edits", "knockout_in_kernel_or"]
