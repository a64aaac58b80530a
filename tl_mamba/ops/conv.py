"""Depthwise causal 1-D convolution with a carried state.

Used by both families for the short conv in front of the SSM. ``F.conv1d`` with
``groups=channels`` is already exact and fast on every device, so there is no
separate reference: the tests compare it against an explicit sum over taps.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    initial_state: Optional[Tensor] = None,
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

    Returns:
        ``(out [b, p, c], final_state [b, c, k-1])``: the final state is the last
        ``k - 1`` inputs, ready to continue the convolution (generation).
    """
    if weight.dim() == 2:
        weight = weight.unsqueeze(1)
    channels, _, k = weight.shape
    b, p, c = x.shape
    if c != channels:
        raise ValueError(f"conv input has {c} channels but the conv weight has {channels}")
    xt = x.transpose(1, 2).to(weight.dtype)  # [b, c, p]
    if initial_state is None:
        history = xt.new_zeros(b, c, k - 1)
    else:
        if initial_state.shape != (b, c, k - 1):
            raise ValueError(f"conv initial_state must be {(b, c, k - 1)}, got {tuple(initial_state.shape)}")
        history = initial_state.to(xt.dtype)
    x_ext = torch.cat([history, xt], dim=-1)  # [b, c, k-1+p]
    out = F.conv1d(x_ext, weight, bias, groups=c)  # [b, c, p]
    final_state = x_ext[:, :, x_ext.shape[-1] - (k - 1) :]
    return out.transpose(1, 2), final_state
