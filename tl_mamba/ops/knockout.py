"""Knockout of hidden-attention edges by linearity, for any scan backend.

With Δ, B and C fixed, the scan output y is linear in its input x, so the part
of y_i that comes from a set of sources S is ``scan(x ⊙ 1_S)_i`` (with no D
skip). Removing the edges j → i where ``mask[i, j] == 0`` therefore costs one
extra scan per distinct *column pattern* of the mask: the sources whose columns
knock out the same targets (in every batch row and head) are scanned together.
An S → T knockout is one extra scan; a general p×p mask at most p.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def knocked_out_terms(contribution: Callable[[Tensor], Tensor], ssm_mask: Tensor, target_layout: str) -> Tensor:
    """Σ_j (1 - M[i, j]) α[i, j] x_j for every target i.

    Args:
        contribution: ``contribution(sources [p])`` returns the scan output (no D
            skip, zero initial state) of the input restricted to those source
            positions: ``[b, p, e]`` or ``[b, p, h, hd]``.
        ssm_mask: ``[b, H, p, p]`` (target i, source j), 1 = kept, 0 = removed; a
            value in between keeps that share of the edge (exact, by linearity).
            Entries above the diagonal are ignored (there is no edge from the future).
        target_layout: ``"bpe"`` (Mamba-1, H must be 1) or ``"bphd"`` (Mamba-2, H is 1 or h).

    Returns:
        The knocked-out part of y, to subtract from it (fp32, same shape as the output).
    """
    b, H, p, _ = ssm_mask.shape
    causal = torch.ones(p, p, dtype=torch.bool, device=ssm_mask.device).tril()
    # the share of each edge to remove: 1 - M (a mask of 0.5 halves the edge, by linearity)
    removed = (1 - ssm_mask.detach().float()) * causal  # [b, H, i, j]
    total = None
    if not bool(removed.any()):
        return torch.zeros((), device=ssm_mask.device)
    columns = removed.permute(3, 0, 1, 2).reshape(p, b * H * p)  # one row per source j
    patterns, group_of_source = torch.unique(columns, dim=0, return_inverse=True)
    for g, pattern in enumerate(patterns):
        if not bool(pattern.any()):
            continue
        sources = (group_of_source == g).float()  # [p]
        part = contribution(sources)
        targets = pattern.view(b, H, p).permute(0, 2, 1).to(part.dtype)  # [b, i, H]
        if target_layout == "bpe":
            targets = targets.reshape(b, p, 1) if H == 1 else _bad_layout(H)
        elif target_layout == "bphd":
            targets = targets[..., None]  # [b, i, H, 1]
        else:
            raise ValueError(f"unknown target_layout {target_layout!r}")
        term = targets * part
        total = term if total is None else total + term
    return total


def _bad_layout(H: int):
    raise ValueError(f"a Mamba-1 ssm_mask has one head axis of size 1, got {H}")
