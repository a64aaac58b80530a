"""Knockout of hidden-attention edges by linearity, for any scan backend.

With Δ, B and C fixed, the scan output y is linear in its input x, so the part
of y_i that comes from a set of sources S is ``scan(x ⊙ 1_S)_i`` (with no D
skip). Removing the edges j → i where ``mask[i, j] == 0`` therefore costs one
extra scan per distinct *column pattern* of the mask: the sources whose columns
knock out the same targets (in every batch row and head) are scanned together.
An S → T knockout is one extra scan; a general p×p mask at most p.

A mask with S → T structure need not be materialised at all: :class:`EdgeRemoval`
describes it by its sources and targets (one set per batch row) and the features
(heads or channels) it touches, and :func:`removed_terms` computes
``1_T ⊙ F ⊙ scan(x ⊙ 1_S)`` directly: one extra scan and no p×p tensor.
The dispatchers accept either form as ``ssm_mask``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor


@dataclass
class EdgeRemoval:
    """The edges j → i with j a source and i a target (j ≤ i), in one layer, as a structure.

    Attributes:
        sources: ``[b, p]`` 1 where a position is a source (float or bool).
        targets: ``[b, p]`` 1 where a position is a target.
        features: ``[F]`` 1 for the features whose edges are removed (heads for Mamba-2,
            channels for Mamba-1), or None for all.
    """

    sources: Tensor
    targets: Tensor
    features: Optional[Tensor] = None

    def dense(self, n_heads: int) -> Tensor:
        """The same removal as a ``[b, H, p, p]`` 0/1 tensor (1 = removed), H = n_heads."""
        b, p = self.sources.shape
        causal = torch.ones(p, p, dtype=torch.bool, device=self.sources.device).tril()
        edges = self.targets.bool()[:, :, None] & self.sources.bool()[:, None, :] & causal  # [b, i, j]
        heads = torch.ones(n_heads, dtype=torch.bool, device=edges.device) if self.features is None \
            else self.features.bool().to(edges.device)
        if heads.numel() != n_heads:
            raise ValueError(f"features has {heads.numel()} entries, the mask has {n_heads} heads")
        return (edges[:, None] & heads[None, :, None, None]).float()

    def overlaps(self, other: "EdgeRemoval") -> bool:
        """Whether the two removals share an edge (then their sum would remove it twice)."""
        both_features = True if self.features is None or other.features is None else \
            bool((self.features.bool() & other.features.bool()).any())
        if not both_features:
            return False
        rows = ((self.sources.bool() & other.sources.bool()).any(-1)
                & (self.targets.bool() & other.targets.bool()).any(-1))
        return bool(rows.any())


SSMMask = Union[Tensor, Sequence[EdgeRemoval]]


def removed_terms(contribution_by_row: Callable[[Tensor, int, int], Tensor], removals: Sequence[EdgeRemoval],
                  target_layout: str, shape: Sequence[int]) -> Tensor:
    """Σ over removals of ``1_T ⊙ F ⊙ scan(x ⊙ 1_S)``: the knocked-out part of y, one scan each.

    Args:
        contribution_by_row: ``contribution_by_row(sources [b, p], start, stop)`` returns the scan
            output (no D skip, zero initial state) of the input restricted to each row's sources,
            over positions ``start:stop`` only: ``[b, stop - start, e]`` (Mamba-1) or
            ``[b, stop - start, h, hd]`` (Mamba-2). Nothing before the first source reaches
            the state and nothing after the last target is read, so the scan is cropped to them.
        removals: pairwise disjoint (see :func:`any_overlap`).
        target_layout: ``"bpe"`` (features are channels) or ``"bphd"`` (features are heads).
        shape: the shape of y, ``[b, p, e]`` or ``[b, p, h, hd]``.

    Returns:
        ``[*shape]`` fp32 (a 0-dim zero when nothing is removed).
    """
    total = None
    for removal in removals:
        any_source = removal.sources.bool().any(0).nonzero()
        any_target = removal.targets.bool().any(0).nonzero()
        if any_source.numel() == 0 or any_target.numel() == 0:
            continue
        start, stop = int(any_source[0]), int(any_target[-1]) + 1
        if start >= stop:  # every target precedes every source: no edge
            continue
        part = contribution_by_row(removal.sources, start, stop)
        targets = removal.targets[:, start:stop].to(part.dtype)
        if target_layout == "bpe":
            weight = targets[..., None]  # [b, L, 1]
            if removal.features is not None:
                weight = weight * removal.features.to(part.dtype)  # [b, L, e]
        elif target_layout == "bphd":
            weight = targets[..., None, None]  # [b, L, 1, 1]
            if removal.features is not None:
                weight = weight * removal.features.to(part.dtype)[:, None]  # [b, L, h, 1]
        else:
            raise ValueError(f"unknown target_layout {target_layout!r}")
        if total is None:
            total = part.new_zeros(shape)
        total[:, start:stop] += weight * part
    return torch.zeros(()) if total is None else total


def any_overlap(removals: Sequence[EdgeRemoval]) -> bool:
    """Whether two removals share an edge (then their union is not the sum of their terms)."""
    return any(removals[a].overlaps(removals[c]) for a in range(len(removals)) for c in range(a + 1, len(removals)))


def check_removal(removal: EdgeRemoval, b: int, p: int, n_features: int, what: str) -> None:
    """Raise if a removal's shapes do not fit a ``[b, p]`` scan with ``n_features`` heads/channels."""
    for name in ("sources", "targets"):
        shape = tuple(getattr(removal, name).shape)
        if shape != (b, p):
            raise ValueError(f"a knockout's {name} must be [b, p] = {(b, p)} here, got {shape}")
    if removal.features is not None and tuple(removal.features.shape) != (n_features,):
        raise ValueError(f"a knockout's {what} mask must have {n_features} entries, got {tuple(removal.features.shape)}")


def as_removal_list(ssm_mask: SSMMask) -> Optional[List[EdgeRemoval]]:
    """The structured form of ``ssm_mask`` when it is one (a list of EdgeRemoval), else None."""
    if isinstance(ssm_mask, Tensor):
        return None
    removals = list(ssm_mask)
    if not all(isinstance(r, EdgeRemoval) for r in removals):
        raise TypeError("ssm_mask must be a [b, H, p, p] tensor or a list of EdgeRemoval")
    return removals


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
