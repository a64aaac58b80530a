"""What the Triton backends of both scans share: autograd and the call contract.

Each family's ``triton_kernel.py`` has its forward kernel and a ``_forward`` that
launches it; :func:`run_triton_scan` turns that into a backend with the dispatcher's
signature.

Gradients: a chunked recompute (:class:`_ChunkedRecompute`), memory linear in p.
With autograd on, the forward kernel also writes the state at every chunk boundary
(after positions T-1, 2T-1, ...; ``T = BACKWARD_CHUNK`` by default), and those
boundary states are all that is saved beyond the inputs themselves. The backward
walks the chunks from last to first: it recomputes one chunk of T positions with the
family's differentiable ``"torch"`` backend on the same device, starting from the
chunk's saved initial state, backpropagates the chunk's share of the output
gradients (y, ``states`` when returned) plus the gradient flowing into its final
state from the chunk after it, accumulates the gradients of x, Δ, B, C (per
position) and A, D (summed), and hands the gradient of its initial state to the
chunk before it (the first chunk's goes to ``initial_state``). Memory, with
``S`` = e·n (Mamba-1) or h·hd·n (Mamba-2) state entries per sequence:

- saved between forward and backward: the boundary states, b·(⌈p/T⌉ - 1)·S
  values (the inputs are referenced, not copied);
- during the backward, on top of that: the gradients of the inputs (their own
  size, O(b·p·e)) and one chunk's recompute graph, O(b·T·S) for Mamba-1; for
  Mamba-2 the torch chunked SSD form holds T/Q chunk states and b·T·Q·h decay
  entries (Q = its chunk, 64), so its default T is larger.

So O(b·(p/T)·S + b·T·S) instead of the O(b·p·S) of recomputing the whole sequence
under autograd. The backward costs one extra forward of the torch backend, done in
⌈p/T⌉ pieces. The gradients are not themselves differentiable (no double backward).

Offsets: every kernel takes its sequence index (``pid_b``) as int64, so each flat
offset computed from it is int64 too. Triton's program ids and size arguments are
int32, and the tensors the heavy paths write pass 2^31 entries at ordinary sizes:
``hook_h`` of Mamba-2 130m (h·hd·n = 196,608 entries a position) from b·p = 10,923
tokens, of Mamba-1 130m (e·n = 24,576) from b·p = 87,382; a Mamba-2 2.7B's
``[b, h, p, p]`` knockout mask at b = 2, p = 4096. In int32 those offsets wrap, and
the kernel reads and writes outside its tensors.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from tl_mamba.backends import OUT_OF_MEMORY
from tl_mamba.ops.precision import compute_dtype, needs_grad

BACKWARD_CHUNK = 64
"""Positions per recomputed chunk in the Triton backends' backward (T). Memory is
b·(⌈p/T⌉-1)·S saved plus O(b·T·S) while a chunk is recomputed, smallest near T = √p;
64 suits p from a few hundred to a few thousand. Mamba-2's backend passes its own
default (``tl_mamba.ops.ssd.triton_kernel.BACKWARD_CHUNK``, larger: its recompute holds
no per-position states). Per call: ``backward_chunk=``."""

_FAILED_KERNELS: Dict[str, str] = {}  # kernel name -> why it failed on this process's GPU


def kernel_or_fallback(name: str, device: torch.device, kernel: Callable[[], object], fallback: Callable[[], object],
                       fallback_name: str):
    """``kernel()``, or ``fallback()`` where the kernel fails on a GPU.

    The faster kernels (Mamba-1's chunked forward and backward kernels, Mamba-2's masked
    tiles) have been checked in Triton's interpreter but not compiled on every GPU. On a
    CUDA device where one fails, a ``RuntimeWarning`` says so once and the simpler path
    (same results) serves that kernel's calls from then on. Off CUDA (the interpreter,
    that is tests) the error propagates, and so does running out of GPU memory (the
    input's size, not the kernel: the simpler path would not fit either).
    """
    if name in _FAILED_KERNELS:
        return fallback()
    try:
        return kernel()
    except OUT_OF_MEMORY:
        raise
    except Exception as err:  # compilation and resource errors have no common type
        if torch.device(device).type != "cuda":
            raise
        _FAILED_KERNELS[name] = f"{type(err).__name__}: {err}"
        warnings.warn(f"the Triton {name} failed on this GPU ({_FAILED_KERNELS[name]}); using {fallback_name} "
                      "instead from now on (same results, slower)", RuntimeWarning)
        return fallback()


# inputs of the scan, in the order _ChunkedRecompute.apply takes them after its 4 settings
# (Z: Mamba-1's gate input, fused into y; None for Mamba-2 and for an ungated scan)
_X, _DELTA, _A, _B, _C, _D, _H0, _Z = range(8)
_AFFECT_STATE = (_X, _DELTA, _A, _B, _H0)  # C, D and Z only act on the read-out
_PER_POSITION = (_X, _DELTA, _B, _C, _Z)


class _ChunkedRecompute(torch.autograd.Function):
    """Forward with the kernel (saving chunk-boundary states); backward by chunked recompute."""

    @staticmethod
    def forward(ctx, kernel_forward, torch_scan, kernel_backward, chunk, x, delta, A, B, C, D, initial_state, z,
                return_states):
        y, h_final, states, bounds = kernel_forward(x, delta, A, B, C, D, initial_state, return_states,
                                                    boundary_every=chunk, **_gate(z))
        # an output nothing differentiates reaches backward as None, not as zeros: the states'
        # zeros would be b·p·S values (1.6 GB a layer at Mamba-2 130m, p = 2048) that the
        # backward would also read, and recompute the states for
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, delta, A, B, C, D, initial_state, z, bounds)
        ctx.torch_scan, ctx.kernel_backward, ctx.chunk, ctx.return_states = torch_scan, kernel_backward, chunk, return_states
        return y, h_final, states

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_final, grad_states):
        # each of the three gradients may be None: that output is not differentiated
        x, delta, A, B, C, D, h0, z, bounds = ctx.saved_tensors
        needs = ctx.needs_input_grad[4:12]  # the four settings take no gradient
        if ctx.kernel_backward is not None:  # the family's backward kernel: one pass, no Python loop
            grads = kernel_or_fallback(
                "backward kernel", x.device,
                lambda: ctx.kernel_backward(x, delta, A, B, C, D, h0, z, bounds, ctx.chunk, grad_y, grad_final,
                                            grad_states if ctx.return_states else None, needs),
                lambda: _recompute_backward(ctx, grad_y, grad_final, grad_states), "the chunked torch recompute")
            return (None, None, None, None, *grads, None)
        return (None, None, None, None, *_recompute_backward(ctx, grad_y, grad_final, grad_states), None)


def _recompute_backward(ctx, grad_y, grad_final, grad_states):
    """The gradients of the eight inputs by chunk-by-chunk recompute through the torch backend."""
    x, delta, A, B, C, D, h0, z, bounds = ctx.saved_tensors
    needs = ctx.needs_input_grad[4:12]
    state_needed = any(needs[i] for i in _AFFECT_STATE)  # does the gradient of a chunk's start matter?
    p, T = x.shape[1], ctx.chunk
    acc = compute_dtype(x, delta, A, B, C, h0)
    inputs = (x, delta, A, B, C, D, h0, z)
    per_position = {i: torch.zeros_like(inputs[i]) for i in _PER_POSITION if needs[i]}
    summed = {i: None for i in (_A, _D) if needs[i]}
    carry = grad_final  # gradient w.r.t. the state after the current chunk
    starts = list(range(0, p, T))
    for k in reversed(range(len(starts))):
        w = slice(starts[k], min(starts[k] + T, p))
        leaf = {i: None if inputs[i] is None else inputs[i][:, w].detach().requires_grad_(needs[i])
                for i in _PER_POSITION}
        leaf[_A] = A.detach().requires_grad_(needs[_A])
        leaf[_D] = None if D is None else D.detach().requires_grad_(needs[_D])
        init = h0 if k == 0 else bounds[:, k - 1]
        leaf[_H0] = None if init is None else init.detach().requires_grad_(
            needs[_H0] if k == 0 else state_needed)
        with torch.enable_grad():
            out = ctx.torch_scan(*(leaf[i] for i in range(6)), initial_state=leaf[_H0],
                                 return_states=ctx.return_states and grad_states is not None, **_gate(leaf[_Z]))
            pairs = [(out.y, None if grad_y is None else grad_y[:, w]), (out.final_state, carry)]
            if out.states is not None:
                pairs.append((out.states, grad_states[:, w]))
            pairs = [(o, g) for o, g in pairs if g is not None and o.requires_grad]
            wanted = [i for i in range(8) if leaf[i] is not None and leaf[i].requires_grad]
            found = torch.autograd.grad([o for o, _ in pairs], [leaf[i] for i in wanted],
                                        [g for _, g in pairs], allow_unused=True) if pairs and wanted else []
        del out, pairs  # this chunk's graph goes before the next one is built
        carry = None
        for i, grad in zip(wanted, found):
            if i in per_position:
                if grad is not None:
                    per_position[i][:, w] = grad
            elif i in summed:
                if grad is not None:
                    summed[i] = grad.to(acc) if summed[i] is None else summed[i] + grad
            elif i == _H0:
                carry = grad
    if not starts:  # p == 0: the final state is the initial state
        carry = grad_final
    grads = [per_position.get(i) for i in range(8)]
    for i, t in ((_A, A), (_D, D)):
        if i in summed:
            grads[i] = torch.zeros_like(t) if summed[i] is None else summed[i].to(t.dtype)
    if needs[_H0]:
        grads[_H0] = torch.zeros_like(h0) if carry is None else carry.to(h0.dtype)
    return grads


def _gate(z: Optional[Tensor]) -> dict:
    # z goes only to scans that gate (Mamba-1's); Mamba-2's take no such argument
    return {} if z is None else {"z": z}


def run_triton_scan(kernel_forward: Callable, torch_scan: Callable, output_cls, what: str,
                    x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    initial_state: Optional[Tensor], return_states: bool, backward_chunk: Optional[int] = None,
                    z: Optional[Tensor] = None, kernel_backward: Optional[Callable] = None, removal=None):
    """Run ``kernel_forward`` (differentiable by chunked recompute through ``torch_scan``).

    ``kernel_forward(x, delta, A, B, C, D, initial_state, return_states, boundary_every=None)``
    returns ``(y, final_state, states or None)`` in ``compute_dtype`` of its inputs (fp32,
    or float64), plus, fourth, the chunk-boundary states when ``boundary_every`` is given;
    ``output_cls`` is the family's output dataclass. ``z`` (Mamba-1's gate input) is
    passed on to ``kernel_forward`` and ``torch_scan``, which then return y gated.
    ``kernel_backward`` (Mamba-1: ``triton_backward.selective_scan_backward``), when given,
    computes the gradients from the same boundary states in one kernel instead of the
    chunk-by-chunk torch recompute. ``backward_chunk`` (default
    :data:`BACKWARD_CHUNK`) is the T of the backward's memory, O(b·(p/T)·S + b·T·S).
    ``removal`` (one ``EdgeRemoval``) is passed on to ``kernel_forward``, which applies it
    in the same pass; that has no backward, so it is refused when a gradient is wanted
    (the dispatchers then run the knockout separately).
    """
    from tl_mamba.backends import triton_usable

    if not triton_usable(x.device):
        raise RuntimeError(f"the Triton {what} needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    chunk = BACKWARD_CHUNK if backward_chunk is None else backward_chunk
    if int(chunk) != chunk or chunk < 1:
        raise ValueError(f"backward_chunk must be a positive integer, got {chunk!r}")
    if removal is not None:
        if needs_grad(x, delta, A, B, C, D, initial_state, z):
            raise ValueError("a knockout in the same pass has no backward; the dispatcher runs it separately")
        y, h_final, states = kernel_forward(x, delta, A, B, C, D, initial_state, return_states, **_gate(z),
                                            removal=removal)
    elif needs_grad(x, delta, A, B, C, D, initial_state, z):
        y, h_final, states = _ChunkedRecompute.apply(kernel_forward, torch_scan, kernel_backward, int(chunk),
                                                     x, delta, A, B, C, D, initial_state, z, return_states)
    else:
        y, h_final, states = kernel_forward(x, delta, A, B, C, D, initial_state, return_states, **_gate(z))
    return output_cls(y=y, final_state=h_final, states=states)
