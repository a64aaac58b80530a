"""Internal precision of the scans.

Scans accumulate in fp32 for fp32, bf16 and fp16 inputs (as mamba_ssm does), and
in float64 when any input is float64, so float64 gradchecks are meaningful.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


FLUSH_BELOW = 2.0 ** 24
""":func:`zero_subnormals_` zeroes entries below ``finfo.tiny * FLUSH_BELOW`` (2e-31 in float32,
4e-301 in float64; at most 2^-48 of the batch row's largest entry): an adjoint entry that small
would make subnormal products with states and decays of magnitude down to 2^-24 (measured: with
the bound at ``finfo.tiny`` alone, the p = 2048 backward below still took 1.4x the time of
p = 1024 per position; at this bound 1.0x)."""


def zero_subnormals_(t: Tensor) -> Tensor:
    """Zero the entries of ``t`` that are about to become subnormal (|t| < ``finfo.tiny *``
    :data:`FLUSH_BELOW`), in place, on the CPU.

    Why: an adjoint state ``g_t = ∂L/∂h_t + decay_{t+1} ⊙ g_{t+1}`` with the loss on the last
    positions only (every attribution metric) decays geometrically back in time and reaches the
    subnormal range, where CPU arithmetic is many times slower: a Mamba-1 scan's forward and
    backward at p = 2048 took 4.5x the time per position of p = 1024 (1029 against 227 µs,
    b 2, e 1024, n 16, one thread); with this, 237 µs. The backward loops call it on the state
    they carry every few positions. ``t`` is ``[b, ...]``: within a batch row the bound is also
    at most 2^-48 of the row's largest entry, so a metric scaled far down (a probability of
    1e-30) keeps its gradients, and only true subnormals go; otherwise an entry below 2e-31 is far
    below what float32 sums with the row's other entries resolve. ``torch.set_flush_denormal``
    would do much the same, but it is a per-thread global switch with no getter. A no-op
    elsewhere than on the CPU and for 16-bit floats.
    """
    if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64) or t.numel() == 0:
        return t  # (16-bit floats: their own tiny is far larger, and the scans never carry them)
    magnitude = t.abs()
    bound = torch.finfo(t.dtype).tiny * FLUSH_BELOW
    if t.dim() > 1:  # per batch row, never more than 2^-48 of the row's largest entry: a metric
        # scaled down (a probability of 1e-30, say) keeps its gradients (then only subnormals go)
        largest = magnitude.flatten(1).amax(1).view(-1, *[1] * (t.dim() - 1))
        bound = torch.clamp(largest * 2.0 ** -48, max=bound)
    t.masked_fill_(magnitude < bound, 0.0)
    return t


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
