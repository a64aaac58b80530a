"""Editing the recurrent state mid-scan, for any scan backend.

An edit of ``hook_h`` at position t means: the state after step t is the edited
value, y_t is read from it, and the recurrence continues from it. Any backend
that takes an initial state and returns its final state can do that: scan up to
each edited position, apply the edit, re-read y there, and continue. A backend
needs no code of its own for it; the number of extra backend calls is the
number of distinct edited positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from tl_mamba.ops.precision import zero_subnormals_

SUBNORMAL_SWEEP = 16
"""The adjoint recurrences zero their subnormal entries every this many positions
(:func:`tl_mamba.ops.precision.zero_subnormals_`), as the Mamba-1 backward does once per chunk of
16 positions."""

@dataclass
class StateOverride:
    """Replace state entries during the scan: where ``mask`` is True, h_t := ``values``.

    Both are ``[b, p, *state]`` (``state`` is ``[e, n]`` for Mamba-1 and
    ``[h, hd, n]`` for Mamba-2). ``positions``, optional: the positions that have an
    edited entry in some row, ascending, when the caller has them already (each
    derivation from ``mask`` reads all of it: 400 MB at 130m Mamba-2 widths, p = 2048).
    """

    values: Tensor
    mask: Tensor
    positions: Optional[List[int]] = None

    def edited_positions(self) -> List[int]:
        """The positions with an edited entry in some batch row, ascending."""
        if self.positions is None:
            self.positions = edited_positions(self.mask)
        return self.positions


def edited_positions(mask: Tensor) -> List[int]:
    """``mask`` ``[b, p, *state]`` → the positions where some entry is True, ascending."""
    return mask.flatten(2).any(-1).any(0).nonzero().flatten().tolist()


def check_override_shape(override: StateOverride, shape) -> None:
    """Raise a ``ValueError`` naming ``state_override`` unless values and mask are ``shape``."""
    for part in ("values", "mask"):
        got = tuple(getattr(override, part).shape)
        if got != tuple(shape):
            raise ValueError(f"state_override.{part} must have shape {tuple(shape)} (the states), got {got}")


#: Past this many edited positions, :func:`scan_with_override` applies the edits in one masked
#: recurrence over the states instead of scanning segments, under autograd (where each
#: segment keeps its own graph: 5.5-7.3x faster with every position edited, docs/performance.md)
#: or when the edits cover at least :data:`RECURRENCE_SHARE_NO_GRAD` of the positions. Without
#: gradients a few edits in a long sequence are faster as segments, which keep the backend's
#: kernels for the unedited stretches (Mamba-1, p = 2048, 128 edits: 0.15 s against 0.21 s).
RECURRENCE_AFTER_EDITS = 8
RECURRENCE_SHARE_NO_GRAD = 0.25


def scan_with_override(
    run: Callable[[int, int, Optional[Tensor], bool], "object"],
    read_out: Callable[[Tensor, int], Tensor],
    p: int,
    override: StateOverride,
    initial_state: Optional[Tensor],
    return_states: bool,
    recurrence: Optional[Callable[[], Tuple[Tensor, Tensor, Tensor]]] = None,
    differentiable: bool = False,
):
    """Scan ``[0, p)`` with ``override``'s edits: in segments that end at edited positions, or,
    with many edited positions (:data:`RECURRENCE_AFTER_EDITS`), by ``recurrence`` when given.

    Args:
        run: ``run(start, stop, initial_state, return_states)`` scans positions
            ``[start, stop)`` and returns an object with ``y [b, L, ...]``,
            ``final_state`` and ``states``.
        read_out: ``read_out(state [b, *state], t)`` → ``y_t`` (including the D skip).
        p: sequence length.
        override: the edits.
        initial_state: state before position 0 (None: zeros).
        return_states: also return ``[b, p, *state]``.
        recurrence: ``recurrence()`` → ``(y, final_state, states)`` of the same edits in one
            pass (:func:`override_by_recurrence`), or None (always segments).
        differentiable: whether a gradient will flow through the scan (the recurrence is then
            taken past :data:`RECURRENCE_AFTER_EDITS` edited positions, whatever their share).

    Returns:
        ``(y [b, p, ...], final_state, states or None)``.
    """
    positions = override.edited_positions()
    many = len(positions) > RECURRENCE_AFTER_EDITS and (
        differentiable or len(positions) >= RECURRENCE_SHARE_NO_GRAD * p)
    if recurrence is not None and many:
        y, final, states = recurrence()
        return y, final, (states if return_states else None)
    ys, states = [], []
    state, start = initial_state, 0
    values = edited_rows(override.values, positions)
    for i, t in enumerate(positions + [p]):
        if t > start:  # the unedited run up to t
            out = run(start, t, state, return_states)
            ys.append(out.y)
            if return_states:
                states.append(out.states)
            state = out.final_state
        if t == p:
            break
        # step t itself: scan one position, then apply the edit and re-read y_t
        out = run(t, t + 1, state, False)
        edited = torch.where(override.mask[:, t], values[i].to(out.final_state.dtype), out.final_state)
        ys.append(read_out(edited, t)[:, None])
        if return_states:
            states.append(edited[:, None])
        state, start = edited, t + 1
    y = torch.cat(ys, dim=1)
    return y, state, (torch.cat(states, dim=1) if return_states else None)


def edited_rows(values: Tensor, positions: List[int]) -> List[Tensor]:
    """``values`` ``[b, p, *state]`` → ``[values[:, t] for t in positions]``, each ``[b, *state]``.

    Under autograd they are taken by one index op, whose backward builds one gradient of
    ``values``' size for all of them; a select per position would build a fresh ``[b, p, *state]``
    of zeros each, which autograd then sums (1.6 GB apiece at 130m Mamba-2 widths, p = 2048:
    3.5 s of the backward on a CPU with two edited positions). Without a gradient they are views.
    """
    if values.requires_grad and torch.is_grad_enabled():
        return list(values[:, positions].unbind(1))
    return [values[:, t] for t in positions]


def override_by_recurrence(decay: Tensor, write: Tensor, read_all: Callable[[Tensor], Tensor],
                           override: StateOverride, initial_state: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Every state with the edits applied, in one pass: ``h_t = value_t`` at edited entries, else
    ``decay_t ⊙ h_{t-1} + write_t`` (so the recurrence continues from each edit), and y read from them.

    Args:
        decay: ``exp(Δ_t A)``, broadcastable to ``write``.
        write: ``[b, p, *state]``, the input term ``Δ_t x_t ⊗ B_t`` (in the scan's compute dtype).
        read_all: ``read_all(states [b, p, *state])`` → y (``h_t · C_t`` plus the D skip).
        override: the edits (``values`` and ``mask``, ``[b, p, *state]``); p ≥ 1.
        initial_state: ``[b, *state]`` before position 0, or None (zeros).

    Returns:
        ``(y, final_state, states)``. Differentiable in every input (:func:`linear_recurrence`);
        it holds ``[b, p, *state]`` tensors, as the states it returns do.
    """
    edited = override.mask
    decay = decay.expand_as(write).masked_fill(edited, 0.0)  # an edited entry forgets what came before
    write = torch.where(edited, override.values.to(write.dtype), write)
    if initial_state is not None:  # h_0 = decay_0 ⊙ h_{-1} + write_0
        write = torch.cat([write[:, :1] + decay[:, :1] * initial_state[:, None].to(write.dtype), write[:, 1:]], 1)
    states = linear_recurrence(decay, write)
    return read_all(states), states[:, -1], states


def linear_recurrence(decay: Tensor, write: Tensor) -> Tensor:
    """h_t = decay_t ⊙ h_{t-1} + write_t from h_{-1} = 0, for every t: ``[b, p, *state]``.

    ``write`` is ``[b, p, *state]``; ``decay`` broadcasts against it. Differentiable, with a
    hand-written backward (the adjoint recurrence ``g_t = ∂L/∂h_t + decay_{t+1} ⊙ g_{t+1}``,
    one in-place op per position), so its cost is linear in p. Used by
    :func:`override_by_recurrence`.
    """
    return _LinearRecurrence.apply(decay, write)


def adjoint_recurrence(grad_states: Tensor, decay: Tensor, reset: Optional[Tensor] = None,
                       in_place: bool = False) -> Tensor:
    """``g_t = ∂L/∂h_t + decay_{t+1} ⊙ g_{t+1}``, last position first: ∂L/∂h_t in total, for every t.

    The backward of ``h_t = decay_t ⊙ h_{t-1} + write_t`` (``g_t`` is then the gradient of
    ``write_t``). ``grad_states``: ``[b, p, *state]``, ∂L/∂h_t from everything but the recurrence;
    ``decay`` broadcasts against it (``[b, p, h, 1, 1]`` stays that small). ``reset``: optional bool
    ``[b, p, *state]``, entries overwritten in the forward (a ``hook_h`` edit): their g is zero and
    nothing passes back through them. Returns a new tensor, one in-place op per position (two
    where ``reset`` has an entry); with ``in_place`` (a contiguous ``grad_states`` the caller owns)
    it overwrites ``grad_states`` and returns it instead of copying it first (a copy of the states' size).
    """
    if in_place and grad_states.is_contiguous():
        g = grad_states
    else:
        g = grad_states.clone(memory_format=torch.contiguous_format)
    # the positions with a reset entry, read from the mask once: a masked_fill_ at every position
    # reads the whole mask and writes all of g (0.45 s of a backward at 130m Mamba-2 widths,
    # p = 2048, for an edit at two positions)
    reset_at = set(edited_positions(reset)) if reset is not None else set()
    last = g.shape[1] - 1
    if last in reset_at:
        g[:, last].masked_fill_(reset[:, last], 0.0)
    for t in reversed(range(last)):
        g[:, t].addcmul_(decay[:, t + 1], g[:, t + 1])
        if t in reset_at:
            g[:, t].masked_fill_(reset[:, t], 0.0)
        if t % SUBNORMAL_SWEEP == 0:  # what flows back decays to subnormals, which are slow on a CPU
            zero_subnormals_(g[:, t])
    return g


class _LinearRecurrence(torch.autograd.Function):
    # Why not autograd through a Python loop: the backward of each ``decay[:, t]`` /
    # ``write[:, t]`` scatters into a fresh zero tensor of the whole [b, p, *state], so a
    # backward through p positions wrote O(p²·state) bytes (a 2-layer model at 130m widths with
    # hook_h hooked: 14 s for the backward at p = 512, against 0.45 s at p = 128).

    @staticmethod
    def forward(ctx, decay: Tensor, write: Tensor) -> Tensor:
        states = torch.empty_like(write, memory_format=torch.contiguous_format)
        h = torch.zeros_like(states[:, 0]) if write.shape[1] else None
        for t in range(write.shape[1]):
            h = torch.addcmul(write[:, t], decay[:, t], h, out=states[:, t])
        # the states are needed only for the decays' gradient (which the hook_h route never asks for)
        ctx.save_for_backward(decay, states if ctx.needs_input_grad[0] else None)
        return states

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_states: Tensor):
        decay, states = ctx.saved_tensors
        g = adjoint_recurrence(grad_states, decay)
        grad_decay = None
        if ctx.needs_input_grad[0]:  # ∂L/∂decay_t = g_t ⊙ h_{t-1}, h_{-1} = 0
            grad_decay = torch.zeros_like(g)
            torch.mul(g[:, 1:], states[:, :-1], out=grad_decay[:, 1:])
            grad_decay = grad_decay.sum_to_size(decay.shape)
        return grad_decay, g
