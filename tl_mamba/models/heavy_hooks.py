"""The two heavy hooks of every block, shared by both families.

- ``hook_ssm_mask`` (``[b, H, p, p]``, 1 = edge kept): materialised only when
  hooked. If a hook zeroes entries, the scan removes those hidden-attention edges.
  When only ``Knockout`` hooks are on it, their S → T structure goes to the scan
  instead and no mask is built (``tl_mamba.knockout.structured_removals``).
  A hook may return a mask that requires grad (knockout attribution): it is kept
  even when all ones, and the scan gives it its gradient. So does a backward hook
  (``incl_bwd``): the mask is then built as a leaf that requires grad, and the hook
  receives ∂L/∂mask.
- ``hook_h`` (the state after every step): materialised only when hooked. If a
  hook edits it, the scan is rerun with the edited entries fixed, so the
  recurrence continues from them and y is read from them. The hooks on it run one
  at a time: a hook after an edit (a cache, another edit) gets the rerun's states. Its gradient (backward
  hooks, ``incl_bwd``) is the total derivative: through y_t and through every
  later state the recurrence carries h_t into. An edit that is a function of h
  (``h * 0.7``, ``h + v``) passes its gradient on into the states and so to the
  parameters (``_ConnectStates``).

Both are handled around the scan by ``tl_mamba.ops.scan_edits``, for either family
and every backend.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from tl_mamba.knockout import channel_knockouts_beside_mask, structured_removals
from tl_mamba.models.base import hook_is_active
from tl_mamba.ops.buffers import format_bytes
from tl_mamba.ops.precision import compute_dtype
from tl_mamba.ops.state_override import StateOverride, adjoint_recurrence, edited_positions


#: Peak memory of applying an edit to a heavy hook, in multiples of the hook's tensor, over the
#: forward's own: ``hook_h``, the states, the unedited states to compare against, the edited-entry
#: mask and the rerun from the edits (2.0-2.2x measured); ``hook_ssm_mask``, the mask, the hook's
#: edited mask and the masked scan's scratch (2.7x). Peak RSS at 130m widths, p 2048-4096, CPU,
#: 2026-12-06. Reading a heavy hook (a cache, a hook that returns it unchanged) holds about 1x.
EDIT_WORKING_FACTOR = {"hook_h": 2.25, "hook_ssm_mask": 3.0}
#: An edit of ``hook_h`` that another hook on it follows: on top of the above, the states the edit
#: leads to (the next hook's input) and the rerun's own. Peak RSS over the forward's own, one layer at
#: 130m widths, p = 2048, CPU, 2026-12-07: 3.8x (Mamba-1), 4.1x (Mamba-2), against 2.0x / 2.2x for the
#: edit alone (docs/performance.md, "CPU: memory of hook_h edits followed by another hook").
CHAINED_EDIT_FACTOR = 4.25


def check_heavy_hook_memory(block, hook: str, nbytes: int, edited: bool = False, chained: bool = False) -> None:
    """Refuse to materialise a heavy hook of ``nbytes`` over ``model.heavy_hook_memory_limit``,
    or, with ``edited`` (called once a hook has edited it, before any work on the edit), to
    apply an edit whose working memory (:data:`EDIT_WORKING_FACTOR` times ``nbytes``) is over it;
    ``chained``: an edit of ``hook_h`` that another hook follows (:data:`CHAINED_EDIT_FACTOR`)."""
    limit = block.model_ref[0].heavy_hook_memory_limit
    needed = nbytes * (CHAINED_EDIT_FACTOR if chained else EDIT_WORKING_FACTOR[hook]) if edited else nbytes
    if needed <= limit:
        return
    if edited:
        raise MemoryError(
            f"applying the edit a hook made to blocks.{block.layer}.{hook} ({format_bytes(nbytes)}) would need about "
            f"{format_bytes(needed)} with its working memory, over the model's limit of {format_bytes(limit)} "
            "(model.heavy_hook_memory_limit). Use a shorter sequence or a smaller batch, edit fewer layers per "
            "forward, or raise the limit if you have the memory."
        )
    raise MemoryError(
        f"blocks.{block.layer}.{hook} would need {format_bytes(nbytes)} for this input, over the model's "
        f"limit of {format_bytes(limit)} (model.heavy_hook_memory_limit). Use a shorter sequence or a "
        "smaller batch, or raise the limit if you have the memory."
    )


def _warn_states_off_the_loss_path(block) -> None:
    """Under a knockout in the same layer, y comes from the knocked-out scan, not from the
    states ``hook_h`` shows (those of the scan without it), so they take no gradient."""
    import warnings

    warnings.warn(
        f"a backward hook on {block.hook_h.name} is never called while {block.hook_ssm_mask.name} knocks out "
        "edges in the same layer: y is then computed by the knocked-out scan, not read from the states hook_h "
        "shows (those of the scan without the knockout), so they get no gradient. Take hook_h gradients in a "
        "forward without this layer's knockout (or leave hook_h out of an incl_bwd cache).", UserWarning,
        stacklevel=2)


class _ThroughEdits:
    """What :class:`_ConnectStates` needs at backward time: the gradient that reached the hook's
    unedited entries through the zero-valued term (recorded by :class:`_TotalDerivative`'s backward)."""

    def __init__(self):
        self.unedited_grad = None
        self.hook_dtype = None  # the dtype the hook returned the states in, when another float dtype

    def record_unedited(self, grad: Tensor) -> None:
        self.unedited_grad = grad


class _ConnectStates(torch.autograd.Function):
    """``states → a copy`` for ``hook_h``, whose backward passes into the scan's states only the
    gradient that went through the hook's edits.

    The hook gets ``A`` (this copy) and returns ``seen = f(A)``. The gradient reaching ``A`` is
    ``J_fᵀ (G_edited + G_unedited)``: ``G_edited`` from the rerun scan, which reads the edited
    values (this part must reach the parameters through the states: ``h * 0.7`` depends on them),
    and ``G_unedited`` from the recurrence term, which the scan's own backward already carries
    to the parameters. The unedited entries pass through ``f`` unchanged, so their part of the
    incoming gradient is ``G_unedited`` itself, and it is taken out. (When the hook returned the
    states in another float dtype, ``G_unedited`` came back through that cast and its backward:
    rounded to that dtype. It is rounded the same way before it is taken out, so that rounding
    is not passed on as a gradient through edits.)
    """

    @staticmethod
    def forward(ctx, states: Tensor, through_edits: _ThroughEdits) -> Tensor:
        ctx.through_edits = through_edits
        return states.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        unedited = ctx.through_edits.unedited_grad
        ctx.through_edits.unedited_grad = None
        if unedited is None:
            return grad, None
        if ctx.through_edits.hook_dtype is not None:  # the round trip the incoming gradient made
            unedited = unedited.to(ctx.through_edits.hook_dtype).to(grad.dtype)
        if grad is unedited:
            # The recurrence term was the hook's only consumer (a hook that reads or caches the
            # states, the usual case; autograd then hands over the very tensor it returned):
            # nothing went through an edit, so no gradient, and the scan's backward skips its
            # states (1.6 GB a layer at 130m Mamba-2 widths, p = 2048: an adjoint recurrence and
            # four contractions over them, 0 in the end).
            return None, None
        through = grad - unedited
        # An edit that writes constants (zeroing, patching in values from another run: the usual
        # ones) passes nothing back either: then None too, for the same saving, at the price of
        # one read of ``through`` when an edit does pass a gradient (``h * 0.7``)
        return (through if bool(through.any()) else None), None


class _TotalDerivative(torch.autograd.Function):
    """``seen → 0`` (y's shape): a term added to y whose gradient with respect to ``seen``, the
    states after ``hook_h``, is the total derivative ∂L/∂h_t: through y_t (``read_out_grad``) and
    through every later state the decays carry h_t into, ``g_t = ∂L/∂y_t·C_t + decay_{t+1} g_{t+1}``
    (``adjoint_recurrence``), zero at edited entries, whose decays are zero too.

    Its forward builds nothing: before, ``read_out(linear_recurrence(decay, seen - seen.detach()))``
    computed and kept three ``[b, p, *state]`` tensors of zeros per hooked layer for the same gradient.
    """

    @staticmethod
    def forward(ctx, seen: Tensor, y: Tensor, read_out_grad, step_decay: Tensor, edited, through_edits) -> Tensor:
        ctx.read_out_grad, ctx.through_edits = read_out_grad, through_edits
        ctx.save_for_backward(step_decay, edited)  # freed with the graph after the backward
        ctx.dtype = seen.dtype
        return torch.zeros_like(y)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor):
        direct = ctx.read_out_grad(grad_y).to(ctx.dtype)  # ∂L/∂h_t through y_t: a new tensor, ours to overwrite
        step_decay, edited = ctx.saved_tensors
        total = adjoint_recurrence(direct, step_decay, reset=edited, in_place=True)
        if ctx.through_edits is not None:  # ∂L/∂h at the unedited entries: the scan's own gradient carries it
            ctx.through_edits.record_unedited(total)
        return total, None, None, None, None, None  # ctx keeps its fields: backward(retain_graph=True) twice


class _HookEdits:
    """The edits the hooks on ``hook_h`` make, read one hook at a time (``CheckedHookPoint.call_each``
    calls it after each hook that changed the states it was given).

    An edit is an entry a hook returned different from the states it was given. After an edit,
    when another hook follows, the scan is rerun with the edits so far fixed, and that hook gets
    the states the recurrence continues into (a cache after an edit holds the states the forward
    uses; a second edit applies to them). Under autograd the rerun states are connected as the
    first hook's are (:class:`_ConnectStates`), through their own :class:`_ThroughEdits`, which
    then replaces the first: the unedited entries the last hook saw are the rerun's.

    Attributes:
        mask: ``[b, p, *state]`` bool, the entries edited so far (None: no hook changed anything).
        through_edits: the :class:`_ThroughEdits` of the states whose unedited entries the last
            hook was given (None without autograd).
    """

    def __init__(self, block, scan, state_bytes: int, attention_mask: Optional[Tensor],
                 through_edits: Optional[_ThroughEdits], unedited: Optional[Tensor]):
        self.block, self.scan, self.state_bytes, self.attention_mask = block, scan, state_bytes, attention_mask
        self.through_edits = through_edits
        self.unedited = unedited  # the unedited values of what the next hook is given (None: scan again to know)
        self.mask: Optional[Tensor] = None
        # the last rerun's output, while no hook has changed the states since (without autograd its
        # y and final state are the forward's when no knockout is in the layer: no second rerun)
        self.rerun = None
        # the narrowest float dtype a hook returned the states in since the last rerun: the unedited
        # entries' gradient comes back rounded through it (_ConnectStates rounds what it takes out alike)
        self.rounded_to: Optional[torch.dtype] = None

    def __call__(self, returned: Tensor, more: bool) -> Tensor:
        self.rerun = None  # a change since
        if self.mask is None:  # before any work on the first edit
            check_heavy_hook_memory(self.block, "hook_h", self.state_bytes, edited=True)
        reference = self.unedited
        if reference is None:  # the hook had the scan's states themselves (no autograd): even a new
            # tensor returned may come with an edit through .data, which no version counter shows
            with torch.no_grad():  # only compared against, never differentiated
                reference = self.scan(return_states=True).states
        # compared in the hook's float dtype: states it returned rounded to bf16 are edited only where
        # it changed them (in the states' dtype, every entry would differ, and the recurrence would be
        # pinned to the unedited values everywhere instead of continuing from the edit). An int or bool
        # return is read as floats, as at every other hook point.
        compare_in = returned.dtype if returned.dtype.is_floating_point else reference.dtype
        new = returned.detach().to(compare_in) != reference.to(compare_in)
        if self.attention_mask is not None:  # padding never reaches a real token, edited or not
            new &= self.attention_mask.bool().view(*self.attention_mask.shape, *[1] * (new.dim() - 2))
        self.mask = new if self.mask is None else self.mask | new
        if returned.dtype.is_floating_point and returned.dtype != reference.dtype and (
                self.rounded_to is None or torch.finfo(returned.dtype).eps > torch.finfo(self.rounded_to).eps):
            self.rounded_to = returned.dtype
        if not more:
            return returned
        # what the next hook gets is made outside inference mode: its in-place edits must show in a
        # version counter, which inference tensors lack
        positions = edited_positions(self.mask)
        if not positions:  # only padding changed: the next hook gets the states as they are
            self.unedited = reference
            if returned.is_inference():
                with _with_version_counters():
                    returned = returned.clone()
            return returned
        check_heavy_hook_memory(self.block, "hook_h", self.state_bytes, edited=True, chained=True)
        with _with_version_counters():
            values = returned.to(reference.dtype)  # (differentiable)
            override = StateOverride(values=values, mask=self.mask, positions=positions)
            rerun = self.scan(state_override=override, return_states=True)
            continued = rerun.states
            self.rerun = None if torch.is_grad_enabled() else rerun
            self.unedited = continued.detach()
            self.rounded_to = None  # the next hook's unedited entries are the rerun's
            if self.through_edits is not None:
                self.through_edits = _ThroughEdits()
                continued = _ConnectStates.apply(continued, self.through_edits)
            return torch.where(self.mask, values, continued)


@contextlib.contextmanager
def _with_version_counters():
    """In inference mode: out of it, still without autograd, so that the tensors made here have
    the version counters through which a hook's in-place edit is seen. Otherwise nothing."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def scan_with_heavy_hooks(
    block,
    scan: Callable[..., object],
    read_out_grad: Callable[[Tensor], Tensor],
    decay: Callable[[], Tensor],
    *,
    mask_shape: Tuple[int, int, int, int],
    state_bytes: int,
    attention_mask: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """Run a block's scan, honouring ``hook_ssm_mask`` and ``hook_h``.

    Args:
        block: the block (has ``hook_ssm_mask``, ``hook_h``, ``layer``, ``model_ref``).
        scan: ``scan(ssm_mask=..., state_override=..., return_states=...)`` → an
            output with ``y``, ``final_state`` and ``states``.
        read_out_grad: ``read_out_grad(∂L/∂y)`` → ∂L/∂h_t through y_t = h_t · C_t alone
            (``∂L/∂y_t ⊗ C_t``, the states' shape, a new tensor): the transpose of the read-out.
        decay: ``decay()`` → the per-step decay ``exp(Δ_t A)``, broadcastable to the states.
        mask_shape: ``(b, H, p, p)`` of the mask to materialise.
        state_bytes: size of the materialised states, for the memory guard.
        attention_mask: ``[b, p]``, 0 at padding: a ``hook_h`` edit there is ignored (a state
            written at a left pad would decay into the first real tokens).

    Returns:
        ``(y, final_state)``.
    """
    ssm_mask = None
    removes_edges = False  # whether ssm_mask removes anything (an all-ones mask kept for its gradient does not)
    if hook_is_active(block.hook_ssm_mask):
        b, H, p, _ = mask_shape
        # hooked only by Knockouts: keep their S → T structure, never build the p × p mask
        ssm_mask = structured_removals(block.hook_ssm_mask, b, p, block.hook_device())
        removes_edges = ssm_mask is not None
        if ssm_mask is None:
            # in the scan's precision: fp32, float64 for a float64 model (whose knockout attribution
            # returns a float64 mask, read in this dtype by the hook point)
            mask_dtype = compute_dtype(block.mixer.A_log)
            mask_bytes = b * H * p * p * torch.finfo(mask_dtype).bits // 8
            check_heavy_hook_memory(block, "hook_ssm_mask", mask_bytes)
            ones = torch.ones(mask_shape, device=block.hook_device(), dtype=mask_dtype)
            if block.hook_ssm_mask._backward_hooks and torch.is_grad_enabled():
                # a backward hook (incl_bwd caching it, say) gets ∂L/∂mask, as at any other hook: the
                # mask is a leaf that requires grad, and the scan gives it its gradient (every edge's
                # first-order knockout effect; Mamba-1's costs O(p² · d_inner · d_state) per layer)
                ones.requires_grad_(True)
            # (a hook returning another shape is refused by the hook point, CheckedHookPoint)
            ssm_mask = block.hook_ssm_mask(ones)
            beside = channel_knockouts_beside_mask(block.hook_ssm_mask, ssm_mask, b, p, block.hook_device())
            if beside is not None:  # Mamba-1 channels= knockouts, which the mask cannot hold: structured
                ssm_mask, removes_edges = beside, True
            else:
                if ssm_mask.requires_grad and torch.is_grad_enabled():
                    # knockout attribution: keep the mask even when it removes nothing, so the scan
                    # gives it a gradient (∂L/∂mask[i, j] scores the edge j → i)
                    removes_edges = not bool((ssm_mask.detach() == 1).all())
                elif bool((ssm_mask == 1).all()):  # nothing removed
                    ssm_mask = None
                else:
                    removes_edges = True
                if removes_edges:  # (the dense mask's route; the structured one needs no mask)
                    check_heavy_hook_memory(block, "hook_ssm_mask", mask_bytes, edited=True)

    if not hook_is_active(block.hook_h):
        out = scan(ssm_mask=ssm_mask)
        return out.y, out.final_state

    check_heavy_hook_memory(block, "hook_h", state_bytes)
    if removes_edges and block.hook_h._backward_hooks and torch.is_grad_enabled():
        _warn_states_off_the_loss_path(block)
    # An in-place edit by a hook is seen through the states' version counter, which inference
    # tensors lack. Computing them outside inference mode (still without grad) gives them one,
    # where copying them would move p·d_inner·n values again (1.6 GB a layer at 130m widths,
    # p = 2048: ~1 ms on an H200).
    with _with_version_counters():
        out = scan(ssm_mask=ssm_mask, return_states=True)
    # The hook sees a copy of the states. Under autograd it is the output of _ThroughEdits,
    # which passes back into the scan only what went through the hook's edits (h * 0.7, h + v):
    # the unedited entries' gradient reaches the scan by its own path, not a second time.
    wants_grad = torch.is_grad_enabled()
    through_edits = _ThroughEdits() if wants_grad else None
    if wants_grad:  # a non-leaf copy, so hooks may still edit it in place
        states = _ConnectStates.apply(out.states, through_edits)
    else:
        states = out.states.detach()
    if not wants_grad and states.is_inference():  # a scan that returned inference tensors all the same
        with torch.inference_mode(False):
            states = states.clone()
    # A hook's edits are read against the states it was given; after an edit, a hook that follows
    # (a cache, another edit) gets the states the edit leads to (_HookEdits, one hook at a time)
    edits = _HookEdits(block, scan, state_bytes, attention_mask, through_edits,
                       unedited=out.states.detach() if wants_grad else None)  # (no grad: the hook had out.states)
    seen = block.hook_h.call_each(states, edits)
    edited, through_edits = edits.mask, edits.through_edits
    if edited is not None:
        if through_edits is not None:  # the cast the unedited entries' gradient comes back through
            through_edits.hook_dtype = edits.rounded_to
        seen = seen.to(out.states.dtype)  # (differentiable: a gradient still reaches the hook's input)
        positions = edited_positions(edited)  # read once: the override needs them too
        if positions:
            if isinstance(ssm_mask, Tensor) and ssm_mask.requires_grad and wants_grad:
                raise NotImplementedError(
                    f"{block.hook_h.name} was edited while {block.hook_ssm_mask.name} takes a gradient (a backward "
                    "hook, or a mask that requires grad) in the same layer: ∂L/∂mask scores the edges of the "
                    "unedited scan. Take one without the other.")
            # y, final state; a knockout in this layer too: the sources' terms stop at the edited entries
            if edits.rerun is not None and ssm_mask is None:  # the states the last hook saw are the answer's
                out = edits.rerun
            else:
                out = scan(ssm_mask=ssm_mask, state_override=StateOverride(values=seen, mask=edited,
                                                                           positions=positions))
        else:
            edited = None
    y = out.y
    if wants_grad and seen.requires_grad and not removes_edges:
        # Add a term whose value is zero and whose gradient with respect to ``seen`` is the
        # total derivative: a perturbation of h_t enters the recurrence at t and is carried by
        # the decays into every later state (edited entries are reset, so nothing passes them).
        # The decays get no gradient from a term that is zero, so they are computed without a graph.
        with torch.no_grad():  # as small as it comes (Mamba-2: [b, p, h, 1, 1], not the states' size)
            step_decay = decay()
        y = y + _TotalDerivative.apply(seen, y.detach(), read_out_grad, step_decay, edited, through_edits)
    return y, out.final_state
