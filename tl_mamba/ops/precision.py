"""Internal precision of the scans.

Scans accumulate in fp32 for fp32, bf16 and fp16 inputs (as mamba_ssm does), and
in float64 when any input is float64, so float64 gradchecks are meaningful.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any given tensor is float64, else float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def upcast(t: Tensor) -> Tensor:
    """``t`` in at least fp32 (float64 stays float64)."""
    return t if t.dtype == torch.float64 else t.float()


def silu_gate(y: Tensor, z: Tensor) -> Tensor:
    """Mamba-1's output gate ``y · silu(z)``, computed in ``y``'s dtype (fp32, or float64).

    Every selective-scan backend applies it the same way when given ``z``; the Triton
    kernel fuses it (``silu(z) = z · sigmoid(z)`` in its fp32 registers).
    """
    return y * F.silu(z.to(y.dtype))


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd is on and any given tensor (None allowed) requires grad: whether a
    scan must build something differentiable."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
