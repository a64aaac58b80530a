"""Depthwise causal 1-D convolution with a carried state, behind one function.

Used by both families for the short conv in front of the SSM. Two implementations,
both exact (they differ in rounding only), chosen by device in :func:`causal_conv1d`:

- ``"taps"`` (CPU): a sum of k shifted products in the ``[b, p, c]`` layout the
  models use, with a hand-written backward (:class:`_ShiftedTaps`). On a CPU,
  ``F.conv1d`` with ``groups=channels`` needs a transposed copy of its input and
  its weight gradient is slow: timed alternately in one process (2026-12-05, 2-vCPU
  Intel Xeon, 2 threads) forward + backward took 0.4x its time on a 14-token training
  batch of either toy model, 0.75x at 159-244 tokens and 0.5x at 130m widths
  (b 1, p 1024); a no-grad forward 0.55-1.1x.
- ``"conv1d"`` (every other device): ``F.conv1d`` with ``groups=channels`` (cuDNN on a GPU).

The tests compare both against an explicit sum over taps, and their gradients
against finite differences.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

IMPLEMENTATIONS = ("taps", "conv1d")


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
    implementation: Optional[str] = None,
) -> Tuple[Tensor, Tensor]:
    """Causal depthwise convolution along the position axis.

    out[b, t, c] = bias[c] + sum_{i<k} weight[c, 0, i] * x_ext[b, t + i, c], where
    ``x_ext`` is ``x`` with the ``k - 1`` previous inputs (``initial_state``, zeros
    when None) prepended.

    Args:
        x: ``[b, p, c]`` conv input.
        weight: ``[c, 1, k]`` (``nn.Conv1d`` layout) or ``[c, k]``.
        bias: ``[c]`` or None.
        initial_state: ``[b, c, k-1]``, the last ``k-1`` inputs before ``x``.
        implementation: ``"taps"`` or ``"conv1d"`` (see the module docstring); None picks
            ``"taps"`` on a CPU and ``"conv1d"`` elsewhere.

    Returns:
        ``(out [b, p, c], final_state [b, c, k-1])``, both in the weight's dtype: the final
        state is the last ``k - 1`` inputs, ready to continue the convolution (generation).
    """
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    channels, _, k = weight.shape
    b, p, c = x.shape
    if c != channels:
        raise ValueError(f"conv input has {c} channels but the conv weight has {channels}")
    if initial_state is not None and initial_state.shape != (b, c, k - 1):
        raise ValueError(f"conv initial_state must be {(b, c, k - 1)}, got {tuple(initial_state.shape)}")
    if implementation is None:
        implementation = "taps" if x.device.type == "cpu" else "conv1d"
    if implementation == "conv1d":
        return _conv1d(x, weight, bias, initial_state)
    if implementation == "taps":
        return _taps(x, weight, bias, initial_state)
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")


def _conv1d(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor]):
    b, p, c = x.shape
    k = weight.shape[-1]
    xt = x.transpose(1, 2).to(weight.dtype)  # [b, c, p]
    history = xt.new_zeros(b, c, k - 1) if initial_state is None else initial_state.to(xt.dtype)
    x_ext = torch.cat([history, xt], dim=-1)  # [b, c, k-1+p]
    out = F.conv1d(x_ext, weight, bias, groups=c)  # [b, c, p]
    return out.transpose(1, 2), x_ext[:, :, x_ext.shape[-1] - (k - 1):]


def _taps(x: Tensor, weight: Tensor, bias: Optional[Tensor], initial_state: Optional[Tensor]):
    b, p, c = x.shape
    k = weight.shape[-1]
    dtype = weight.dtype
    # half-precision inputs sum their k taps in fp32 and are rounded once, at the end
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    history = (x.new_zeros(b, k - 1, c, dtype=work) if initial_state is None
               else initial_state.transpose(1, 2).to(work))
    x_ext = torch.cat([history, x.to(work)], dim=1)  # [b, k-1+p, c]
    out = _ShiftedTaps.apply(x_ext, weight.reshape(c, k).to(work), None if bias is None else bias.to(work))
    final_state = x_ext[:, x_ext.shape[1] - (k - 1):].transpose(1, 2)  # [b, c, k-1]
    return out.to(dtype), final_state.to(dtype)


class _ShiftedTaps(torch.autograd.Function):
    """``out[:, t] = bias + Σ_i w[:, i] ⊙ x_ext[:, t + i]``: x_ext ``[b, k-1+p, c]``, w ``[c, k]``,
    bias ``[c]`` or None → out ``[b, p, c]``. One ``addcmul`` per tap forward; backward
    ``∂x_ext[:, t+i] += w[:, i] ⊙ ∂out[:, t]`` (one in-place ``addcmul`` per tap, into one
    buffer) and ``∂w[:, i] = Σ_{b,t} ∂out[:, t] ⊙ x_ext[:, t+i]``, where autograd through the
    shifted slices would zero-fill a buffer of x_ext's size per tap."""

    @staticmethod
    def forward(ctx, x_ext, w, bias):
        k = w.shape[1]
        p = x_ext.shape[1] - (k - 1)
        out = x_ext[:, :p] * w[:, 0] if bias is None else torch.addcmul(bias, x_ext[:, :p], w[:, 0])
        for i in range(1, k):
            out.addcmul_(x_ext[:, i:i + p], w[:, i])
        ctx.save_for_backward(x_ext, w)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x_ext, w = ctx.saved_tensors
        k, p = w.shape[1], grad_out.shape[1]
        grad_x = grad_w = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x_ext)
            for i in range(k):
                grad_x[:, i:i + p].addcmul_(grad_out, w[:, i])
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack([(grad_out * x_ext[:, i:i + p]).sum((0, 1)) for i in range(k)], dim=1)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 1))
        return grad_x, grad_w, grad_bias
