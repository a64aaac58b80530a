"""What the Triton backends of both scans share: autograd and the call contract.

Each family's ``triton_kernel.py`` has its forward kernel and a ``_forward`` that
launches it; :func:`run_triton_scan` turns that into a backend with the dispatcher's
signature. Gradients come from recomputing the scan with the family's differentiable
``"torch"`` backend on the same device (correct, but with the torch backend's memory,
O(p·e·n), not the O(p) a fused backward kernel would give).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor


class _RecomputeBackward(torch.autograd.Function):
    """Forward with the kernel; backward by recomputing through the torch backend."""

    @staticmethod
    def forward(ctx, kernel_forward, torch_scan, x, delta, A, B, C, D, initial_state, return_states):
        y, h_final, states = kernel_forward(x, delta, A, B, C, D, initial_state, return_states)
        ctx.save_for_backward(x, delta, A, B, C, D, initial_state)
        ctx.torch_scan, ctx.return_states = torch_scan, return_states
        return y, h_final, states

    @staticmethod
    def backward(ctx, grad_y, grad_final, grad_states):
        offset = 2  # kernel_forward and torch_scan take no gradient
        inputs = [None if t is None else t.detach().requires_grad_(ctx.needs_input_grad[offset + i])
                  for i, t in enumerate(ctx.saved_tensors)]
        with torch.enable_grad():
            out = ctx.torch_scan(*inputs[:6], initial_state=inputs[6], return_states=ctx.return_states)
            outputs, grads = [out.y, out.final_state], [grad_y, grad_final]
            if ctx.return_states and grad_states is not None:
                outputs.append(out.states)
                grads.append(grad_states)
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            found = iter(torch.autograd.grad(outputs, wanted, [torch.zeros_like(o) if g is None else g
                                                               for o, g in zip(outputs, grads)], allow_unused=True))
        return (None, None, *[next(found) if t is not None and t.requires_grad else None for t in inputs], None)


def run_triton_scan(kernel_forward: Callable, torch_scan: Callable, output_cls, what: str,
                    x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                    initial_state: Optional[Tensor], return_states: bool):
    """Run ``kernel_forward`` (differentiable through ``torch_scan``) and wrap its fp32 outputs.

    ``kernel_forward(x, delta, A, B, C, D, initial_state, return_states)`` returns
    ``(y, final_state, states or None)``; ``output_cls`` is the family's output dataclass.
    """
    from tl_mamba.backends import triton_usable

    if not triton_usable(x.device):
        raise RuntimeError(f"the Triton {what} needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, delta, A, B, C, D, initial_state))
    if needs_grad:
        y, h_final, states = _RecomputeBackward.apply(kernel_forward, torch_scan, x, delta, A, B, C, D,
                                                      initial_state, return_states)
    else:
        y, h_final, states = kernel_forward(x, delta, A, B, C, D, initial_state, return_states)
    if x.dtype == torch.float64:  # the kernel accumulates in fp32; keep the dispatcher's dtype contract
        y, h_final = y.double(), h_final.double()
        states = None if states is None else states.double()
    return output_cls(y=y, final_state=h_final, states=states)
