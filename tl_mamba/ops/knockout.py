"""Knockout of hidden-attention edges by linearity, for any scan backend.

With Δ, B and C fixed, the scan output y is linear in its input x, so the part
of y_i that comes from a set of sources S is ``scan(x ⊙ 1_S)_i`` (with no D
skip). Removing the edges j → i where ``mask[i, j] == 0`` therefore costs one
extra scan per distinct *column pattern* of the mask: the sources whose columns
knock out the same targets (in every batch row and head) are scanned together.
An S → T knockout is at most one extra scan (none when it has few edges, below).

A general mask with many column patterns (a random or learned p×p mask) would
cost many scans. For Mamba-2, past :func:`dense_mask_after` patterns the removed part is computed in the
quadratic hidden-attention form instead, ``Σ_j (1 - M[i, j]) α[i, j] x_j``, in chunks
of heads (:func:`dense_removed_terms_bphd`). For Mamba-1, past :func:`dense_mask_after_bpe`,
in blocks of positions (:func:`dense_removed_terms_bpe`: its α has a decay per channel and
state entry, so that form is O(p² e n) work; it serves only without autograd, where it needs
no copies of its blocks).
Same result, exact either way.

A mask with S → T structure need not be materialised at all: :class:`EdgeRemoval`
describes it by its sources and targets (one set per batch row) and the features
(heads or channels) it touches, and :func:`removed_terms` computes
``1_T ⊙ F ⊙ scan(x ⊙ 1_S)`` directly: one extra scan and no p×p tensor. When
the removal has few edges (a few sources → the last token, the usual experiment)
it sums ``α[i, j] x_j`` over its edges instead (:func:`pair_terms_bpe`,
:func:`pair_terms_bphd`): no scan at all (a Mamba-1 edge costs about one scanned
position, a Mamba-2 edge far less; :data:`PAIRS_PER_SCANNED_POSITION`). A dense mask
that removes few edges (a hook zeroing a few entries) is summed edge by edge the
same way, whatever its column patterns. The dispatchers accept either form as
``ssm_mask``.

A dense mask that requires grad (knockout attribution) also gets a gradient:
y_i depends on M[i, j] through ``M[i, j]·α[i, j]·x_j``, so
``∂L/∂M[i, j] = Σ_features ∂L/∂y_i · α[i, j] · x_j`` (zero above the diagonal).
:func:`attach_mask_gradient` adds that path to y with no change to its value;
:func:`edge_gradient_bpe` and :func:`edge_gradient_bphd` compute it from Δ, A,
B, C and x in chunks of features, so no ``[b, features, p, p]`` α is held (Mamba-1: in
blocks of positions, almost all of it one matrix product per block).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from tl_mamba.ops.precision import compute_dtype, needs_grad, upcast


@dataclass
class EdgeRemoval:
    """The edges j → i with j a source and i a target (j ≤ i), in one layer, as a structure.

    Attributes:
        sources: ``[b, p]`` 1 where a position is a source (float or bool).
        targets: ``[b, p]`` 1 where a position is a target.
        features: ``[F]`` 1 for the features whose edges are removed (heads for Mamba-2,
            channels for Mamba-1), or None for all.
        source_positions, target_positions: optional CPU ``[S]``, ``[T]`` int64, the
            positions that are a source (a target) in some row. ``Knockout`` gives them;
            when None they are read from the masks, which on a GPU waits for the device.
    """

    sources: Tensor
    targets: Tensor
    features: Optional[Tensor] = None
    source_positions: Optional[Tensor] = None
    target_positions: Optional[Tensor] = None

    def positions(self):
        """``(source positions, target positions)``: CPU int64, ascending (see the attributes)."""
        def host(given: Optional[Tensor], mask: Tensor) -> Tensor:
            return given if given is not None else mask.bool().any(0).nonzero()[:, 0].cpu()
        return host(self.source_positions, self.sources), host(self.target_positions, self.targets)

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
                  target_layout: str, shape: Sequence[int],
                  pair_terms: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> Tensor:
    """Σ over removals of ``1_T ⊙ F ⊙ scan(x ⊙ 1_S)``: the knocked-out part of y, one scan each.

    A removal with few edges (a few sources → a few targets, the usual knockout) is
    computed edge by edge instead, ``Σ_{j ∈ S} α[i, j] x_j`` for each target i, when
    ``pair_terms`` is given and the edges number at most :data:`PAIRS_PER_SCANNED_POSITION`
    (per family) times the positions the scan would cover. Same result (tests compare both with an
    explicit hidden-attention matrix).

    Args:
        contribution_by_row: ``contribution_by_row(sources [b, p], start, stop)`` returns the scan
            output (no D skip, zero initial state) of the input restricted to each row's sources,
            over positions ``start:stop`` only: ``[b, stop - start, e]`` (Mamba-1) or
            ``[b, stop - start, h, hd]`` (Mamba-2). Nothing before the first source reaches
            the state and nothing after the last target is read, so the scan is cropped to them.
        removals: pairwise disjoint (see :func:`any_overlap`).
        target_layout: ``"bpe"`` (features are channels) or ``"bphd"`` (features are heads).
        shape: the shape of y, ``[b, p, e]`` or ``[b, p, h, hd]``.
        pair_terms: ``pair_terms(targets [P], sources [P])`` (position indices on the masks' device,
            which is the scan's: :func:`as_removal_list`; source ≤ target)
            returns ``α[i, j] x_j`` for each pair: ``[b, P, e]`` or ``[b, P, h, hd]``
            (:func:`pair_terms_bpe`, :func:`pair_terms_bphd`); None: always scan.

    Returns:
        ``[*shape]`` fp32 (a 0-dim zero when nothing is removed).
    """
    total = None
    for removal in removals:
        # on the host (given by Knockout): the route and the crop are chosen without waiting for the GPU
        any_source, any_target = removal.positions()
        if any_source.numel() == 0 or any_target.numel() == 0:
            continue
        start, stop = int(any_source[0]), int(any_target[-1]) + 1
        if start >= stop:  # every target precedes every source: no edge
            continue
        if pair_terms is not None:
            target_of_pair, source_of_pair = _edges(any_target, any_source)
            if len(target_of_pair) <= PAIRS_PER_SCANNED_POSITION[target_layout] * (stop - start):
                # one staged copy of both index lists (a blocking copy would wait for the GPU's queue)
                target_of_pair, source_of_pair = torch.stack([target_of_pair, source_of_pair]).to(
                    removal.sources.device, non_blocking=True)
                part = pair_terms(target_of_pair, source_of_pair)  # [b, P, *features]
                # each row removes only its own sources → targets
                rows = removal.sources[:, source_of_pair].float() * removal.targets[:, target_of_pair].float()
                part = _feature_weight(rows.to(part), removal.features, target_layout) * part
                if total is None:
                    total = part.new_zeros(shape)
                total.index_add_(1, target_of_pair, part)
                continue
        part = contribution_by_row(removal.sources, start, stop)
        weight = _feature_weight(removal.targets[:, start:stop].to(part.dtype), removal.features, target_layout)
        if total is None:
            total = part.new_zeros(shape)
        total[:, start:stop] += weight * part
    return torch.zeros(()) if total is None else total


PAIRS_PER_SCANNED_POSITION = {"bpe": 0.5, "bphd": 8.0}
"""A knockout's removed part is computed edge by edge (``pair_terms``) when it has at most
this many edges per position its extra scan would cover (first source to last target);
otherwise by scans (S → T removals and dense masks alike). Keyed by target layout, that
is by family. Measured on CPU at 130m widths, p = 512 (docs/performance.md, "Which
route: edges per scanned position"; ``benchmarks/bench_knockout_routes_cpu.py``): a Mamba-1 edge costs
about one scanned position (one ``[e, n]`` decay each), so 0.5 keeps the edge form to
where it is clearly cheaper; a Mamba-2 edge (a scalar decay per head) costs about
1/15 of a scanned position, so edges win up to about 15 per position, and 8 leaves margin."""


def _edges(targets: Tensor, sources: Tensor):
    """Every (target, source) pair with source ≤ target: two ``[P]`` index tensors."""
    t, s = torch.meshgrid(targets, sources, indexing="ij")
    keep = s <= t
    return t[keep], s[keep]


def _feature_weight(weight: Tensor, features: Optional[Tensor], target_layout: str) -> Tensor:
    """``weight [b, L]`` (which rows and positions) times the removal's features, broadcastable
    against ``[b, L, e]`` (``"bpe"``) or ``[b, L, h, hd]`` (``"bphd"``)."""
    if target_layout == "bpe":
        weight = weight[..., None]  # [b, L, 1]
        return weight if features is None else weight * features.to(weight)  # [b, L, e]
    if target_layout == "bphd":
        weight = weight[..., None, None]  # [b, L, 1, 1]
        return weight if features is None else weight * features.to(weight)[:, None]  # [b, L, h, 1]
    raise ValueError(f"unknown target_layout {target_layout!r}")


def _pair_spans(cumulative: Tensor, targets: Tensor, sources: Tensor, dtype: torch.dtype) -> Tensor:
    """``Σ_{k=j+1..i} Δ_k`` for each pair (i, j), from ``cumulative = cumsum(Δ)`` ``[b, p, F]`` → ``[b, P, F]``.

    Take the cumulative sum in float64 so that the difference of two long sums keeps its precision.
    """
    return (cumulative[:, targets] - cumulative[:, sources]).to(dtype)


def pair_terms_bpe(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, targets: Tensor, sources: Tensor,
                   chunk_bytes: int = 2**27) -> Tensor:
    """Mamba-1: ``α[i, j] x_j`` per channel for each pair (i, j) = (targets[k], sources[k]).

    ``α[i, j][e] x_j[e] = Σ_n C_i[n] · exp(A[e, n] Σ_{k=j+1..i} Δ_k[e]) · B_j[n] · Δ_j[e] x_j[e]``.

    Args:
        x, delta: ``[b, p, e]``. A: ``[e, n]``. B, C: ``[b, p, n]``.
        targets, sources: ``[P]`` position indices, sources[k] ≤ targets[k].
        chunk_bytes: working memory per chunk of pairs (one ``[b, pairs, e, n]`` decay).

    Returns:
        ``[b, P, e]`` in the compute dtype (float64 if any input is, else float32); differentiable.
    """
    b, _, e = x.shape
    n = A.shape[-1]
    dtype = compute_dtype(x, delta, A, B, C)
    x, dt, A, B, C = (t.to(dtype) for t in (x, delta, A, B, C))
    cumulative = torch.cumsum(delta.double(), dim=1)  # [b, p, e]
    chunk = max(1, chunk_bytes // max(1, 2 * b * e * n * 8))
    parts = []
    for start in range(0, len(targets), chunk):
        i, j = targets[start:start + chunk], sources[start:start + chunk]
        decay = torch.exp(_pair_spans(cumulative, i, j, dtype)[..., None] * A)  # [b, P, e, n]
        read = torch.einsum("bken,bkn->bke", decay, C[:, i] * B[:, j])  # [b, P, e]
        parts.append(read * dt[:, j] * x[:, j])
    return torch.cat(parts, dim=1)


def pair_terms_bphd(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, targets: Tensor,
                    sources: Tensor) -> Tensor:
    """Mamba-2: ``α_h[i, j] x_j[h]`` for each pair (i, j) = (targets[k], sources[k]).

    ``α_h[i, j] = (C_i · B_j) · exp(A_h Σ_{k=j+1..i} Δ_k[h]) · Δ_j[h]``.

    Args:
        x: ``[b, p, h, hd]``. delta: ``[b, p, h]``. A: ``[h]``. B, C: ``[b, p, g, n]``.
        targets, sources: ``[P]`` position indices, sources[k] ≤ targets[k].

    Returns:
        ``[b, P, h, hd]`` in the compute dtype (float64 if any input is, else float32); differentiable.
    """
    h, g = x.shape[2], B.shape[2]
    dtype = compute_dtype(x, delta, A, B, C)
    x, dt, A, B, C = (t.to(dtype) for t in (x, delta, A, B, C))
    cb = (C[:, targets] * B[:, sources]).sum(-1).repeat_interleave(h // g, dim=2)  # [b, P, h]
    cumulative = torch.cumsum(delta.double(), dim=1)  # [b, p, h]
    alpha = cb * torch.exp(_pair_spans(cumulative, targets, sources, dtype) * A) * dt[:, sources]  # [b, P, h]
    return alpha[..., None] * x[:, sources]


def any_overlap(removals: Sequence[EdgeRemoval]) -> bool:
    """Whether two removals share an edge (then their union is not the sum of their terms)."""
    return any(removals[a].overlaps(removals[c]) for a in range(len(removals)) for c in range(a + 1, len(removals)))


def without(removal: EdgeRemoval, other: EdgeRemoval) -> List[EdgeRemoval]:
    """The edges of ``removal`` that ``other`` does not remove, as disjoint S → T removals.

    An edge (row, j → i, feature f) of ``removal`` escapes ``other`` when j is not one of
    other's sources, or j is but i is not one of its targets, or both are but f is not one of
    its features: three disjoint pieces, ``(S ∧ ¬S', T, F)``, ``(S ∧ S', T ∧ ¬T', F)`` and
    ``(S ∧ S', T ∧ T', F ∧ ¬F')``, each row with its own masks. Pieces that are empty on the
    host side are dropped. The host position lists of a piece are those of its parents (a
    superset, which :func:`removed_terms` allows).
    """
    if not removal.overlaps(other):
        return [removal]
    S, T, S2, T2 = (m.bool() for m in (removal.sources, removal.targets, other.sources, other.targets))
    F = None if removal.features is None else removal.features.bool()
    F2 = None if other.features is None else other.features.bool()

    def host_both(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
        return None if a is None or b is None else a[torch.isin(a, b)]

    def piece(sources: Tensor, targets: Tensor, features: Optional[Tensor], source_positions, target_positions):
        for positions in (source_positions, target_positions):
            if positions is not None and positions.numel() == 0:
                return []
        if not bool((sources.any(-1) & targets.any(-1)).any()):  # no row has both: nothing to remove
            return []
        dtype = removal.sources.dtype
        return [EdgeRemoval(sources=sources.to(dtype), targets=targets.to(dtype),
                            features=None if features is None else features.float(),
                            source_positions=source_positions, target_positions=target_positions)]

    shared_sources = host_both(removal.source_positions, other.source_positions)
    pieces = piece(S & ~S2, T, F, removal.source_positions, removal.target_positions)
    pieces += piece(S & S2, T & ~T2, F, shared_sources, removal.target_positions)
    if F2 is not None:  # other removes only some features: the rest of the shared edges stay
        rest = ~F2 if F is None else F & ~F2
        if bool(rest.any()):
            pieces += piece(S & S2, T & T2, rest, shared_sources,
                            host_both(removal.target_positions, other.target_positions))
    return pieces


def outside(removal: EdgeRemoval, removed: Sequence[EdgeRemoval]) -> List[EdgeRemoval]:
    """The edges of ``removal`` that none of ``removed`` has, as disjoint pieces (:func:`without`
    applied for each of them in turn)."""
    pieces = [removal]
    for earlier in removed:
        pieces = [rest for piece in pieces for rest in without(piece, earlier)]
    return pieces


class DisjointRemovals(list):
    """A list of :class:`EdgeRemoval` known to share no edge (what :func:`disjoint_removals`
    returns), so :func:`as_removal_list` does not check it again pair by pair."""


def disjoint_removals(removals: Sequence[EdgeRemoval]) -> "DisjointRemovals":
    """The union of the removals' edges as pairwise disjoint removals, so that summing their
    terms removes each edge once (several Knockouts in one layer remove the union of their
    edges). Each removal keeps only the edges that no earlier one removes (:func:`without`);
    removals that share no edge come back unchanged. Pieces with no edge are dropped."""
    result = DisjointRemovals()
    for removal in removals:
        result += outside(removal, result)
    return result


def check_removal(removal: EdgeRemoval, b: int, p: int, n_features: int, what: str) -> None:
    """Raise if a removal's shapes do not fit a ``[b, p]`` scan with ``n_features`` heads/channels."""
    for name in ("sources", "targets"):
        shape = tuple(getattr(removal, name).shape)
        if shape != (b, p):
            raise ValueError(f"a knockout's {name} must be [b, p] = {(b, p)} here, got {shape}")
    if removal.features is not None and tuple(removal.features.shape) != (n_features,):
        raise ValueError(f"a knockout's {what} mask must have {n_features} entries, got {tuple(removal.features.shape)}")


def as_removal_list(ssm_mask: SSMMask, device: torch.device) -> Optional[List[EdgeRemoval]]:
    """The structured form of ``ssm_mask`` when it is one (a list of EdgeRemoval), else None.

    Raises a ``ValueError`` naming both devices when the mask (or a removal's sources,
    targets or features) is not on ``device``, the scan inputs' device: a mask built on
    the CPU for a CUDA model would otherwise fail deep inside a kernel or autograd.
    """
    def check_device(tensor: Tensor, what: str) -> None:
        if tensor.device != torch.device(device):
            raise ValueError(f"{what} is on {tensor.device} but the scan inputs are on {device}; "
                             f"move it there first (.to({str(device)!r}))")

    if isinstance(ssm_mask, Tensor):
        check_device(ssm_mask, "ssm_mask")
        return None
    removals = list(ssm_mask)
    if not all(isinstance(r, EdgeRemoval) for r in removals):
        raise TypeError("ssm_mask must be a [b, H, p, p] tensor or a list of EdgeRemoval")
    for removal in removals:
        for name in ("sources", "targets", "features"):
            if getattr(removal, name) is not None:
                check_device(getattr(removal, name), f"a knockout's {name}")
    # each removal's terms are subtracted on their own: a shared edge would go twice (what
    # disjoint_removals returns is disjoint by construction: not checked again, pair by pair)
    if not isinstance(ssm_mask, DisjointRemovals) and any_overlap(removals):
        raise ValueError("ssm_mask: two of these EdgeRemovals share source and target positions (and features) "
                         "in some row, so an edge would be removed twice; pass "
                         "tl_mamba.ops.knockout.disjoint_removals(removals) (their union, each edge once), as "
                         "tl_mamba.Knockout does for overlapping knockouts")
    return removals


def dense_mask_for(ssm_mask: Tensor, b: int, heads: int, p: int, op: str) -> Tensor:
    """``ssm_mask`` as ``[b, H, p, p]``: a batch axis of 1 is shared by every row, and ``H`` is
    1 (every head or channel) or, for Mamba-2, ``heads``; any other shape is refused."""
    shape = tuple(ssm_mask.shape)
    if ssm_mask.dim() != 4 or shape[0] not in (1, b) or shape[1] not in {1, heads} or shape[2:] != (p, p):
        per_head = f" or [b, {heads}, {p}, {p}]" if heads != 1 else ""
        raise ValueError(f"{op}: ssm_mask must be [b, 1, {p}, {p}]{per_head} with b = {b} (or 1, shared by "
                         f"every row), got {shape}")
    return ssm_mask.expand(b, shape[1], p, p)


def same_pass_removal(removals: Optional[List[EdgeRemoval]], state_override, inputs: Sequence[Optional[Tensor]],
                      kernel_runs: bool) -> Optional[EdgeRemoval]:
    """The S → T removal a Triton kernel can apply in the same pass as its scan, or None.

    That is: exactly one structured removal (``Knockout`` hooks on one layer), no state
    override, no gradient to take (``inputs``: the scan's tensors) and ``kernel_runs``
    (the family's Triton kernel serves this call). Otherwise the knockout takes the route
    every backend takes: edge by edge or a separate scan (:func:`removed_terms`).
    """
    if removals is None or len(removals) != 1 or state_override is not None or not kernel_runs:
        return None
    return None if needs_grad(*inputs) else removals[0]


def knocked_out_terms(contribution: Callable[[Tensor], Tensor], ssm_mask: Tensor, target_layout: str,
                      dense_terms: Optional[Callable[[Tensor], Tensor]] = None,
                      max_scans: Optional[int] = None,
                      pair_terms: Optional[Callable[[Tensor, Tensor], Tensor]] = None) -> Tensor:
    """Σ_j (1 - M[i, j]) α[i, j] x_j for every target i.

    A mask that removes few edges (a hand-written hook zeroing a few entries) is summed
    edge by edge when ``pair_terms`` is given, by the rule of :func:`removed_terms`;
    otherwise one scan per column pattern, or ``dense_terms`` past ``max_scans`` patterns.

    Args:
        contribution: ``contribution(sources [p])`` returns the scan output (no D
            skip, zero initial state) of the input restricted to those source
            positions: ``[b, p, e]`` or ``[b, p, h, hd]``.
        ssm_mask: ``[b, H, p, p]`` (target i, source j), 1 = kept, 0 = removed; a
            value in between keeps that share of the edge (exact, by linearity).
            Entries above the diagonal are ignored (there is no edge from the future).
        target_layout: ``"bpe"`` (Mamba-1, H must be 1) or ``"bphd"`` (Mamba-2, H is 1 or h).
        dense_terms: ``dense_terms(removed [b, H, p, p])`` computes the same thing in the
            quadratic form; used instead of the scans when the mask has more than
            ``max_scans`` distinct column patterns.
        pair_terms: as for :func:`removed_terms`: ``α[i, j] x_j`` for given (i, j) pairs.

    Returns:
        The knocked-out part of y, to subtract from it (fp32, same shape as the output).
    """
    b, H, p, _ = ssm_mask.shape
    causal = torch.ones(p, p, dtype=torch.bool, device=ssm_mask.device).tril()
    # the share of each edge to remove: 1 - M (a mask of 0.5 halves the edge, by linearity), zeroed
    # above the diagonal in place: one tensor the mask's size (a float64 mask stays float64)
    removed = torch.sub(1, upcast(ssm_mask.detach())).masked_fill_(~causal, 0)  # [b, H, i, j]
    total = None
    if not bool(removed.any()):
        return torch.zeros((), device=ssm_mask.device)
    if pair_terms is not None:
        edges = removed.flatten(0, 1).any(0).nonzero()  # [P, 2]: (target i, source j), removed in some row/head
        targets, sources = edges[:, 0], edges[:, 1]
        if len(edges) <= PAIRS_PER_SCANNED_POSITION[target_layout] * (int(targets.max()) + 1 - int(sources.min())):
            part = pair_terms(targets, sources)  # [b, P, *features]
            share = removed[:, :, targets, sources].transpose(1, 2).to(part)  # [b, P, H]: how much of each edge
            if target_layout == "bpe":
                share = share if H == 1 else _bad_layout(H)  # [b, P, 1]
            elif target_layout == "bphd":
                share = share[..., None]  # [b, P, H, 1]
            else:
                raise ValueError(f"unknown target_layout {target_layout!r}")
            total = part.new_zeros(b, p, *part.shape[2:])
            return total.index_add_(1, targets, share * part)
    group_of_source, first, removes = column_groups(removed)  # sources j with the same column R[:, :, :, j]
    removes = removes.tolist()
    if dense_terms is not None and max_scans is not None and sum(removes) > max_scans:
        return dense_terms(removed)
    for g, j in enumerate(first.tolist()):
        if not removes[g]:
            continue
        sources = (group_of_source == g).float()  # [p]
        part = contribution(sources)
        targets = removed[..., j].permute(0, 2, 1).to(part.dtype)  # [b, i, H]: the group's column
        if target_layout == "bpe":
            targets = targets.reshape(b, p, 1) if H == 1 else _bad_layout(H)
        elif target_layout == "bphd":
            targets = targets[..., None]  # [b, i, H, 1]
        else:
            raise ValueError(f"unknown target_layout {target_layout!r}")
        term = targets * part
        total = term if total is None else total + term
    return total


def _column_weights(n: int) -> Tensor:
    # column_groups' random weights: float64 in [1, 2), seeded (the same groups on every call)
    return 1 + torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


GROUP_CHUNK_ENTRIES = 2**21
"""Mask entries per chunk when :func:`column_groups` reads the mask (two float64 copies of one chunk: 32 MB)."""


def column_groups(removed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Group the source positions j of ``removed [b, H, p, p]`` by their column ``removed[..., j]``:
    ``(group [p], first [G], removes [G])``, the group of each source, each group's first source
    and whether its column removes anything (not all 0), groups in no set order. Sources in one
    group have exactly equal columns.

    Each column is summed with random float64 weights over its ``b·H·p`` entries, a chunk of
    rows at a time (no transposed copy of the mask, and no sort of its columns as ``torch.unique``
    over them makes: together ~3 more masks' worth of memory), the sums are grouped, and every
    column is then compared with its group's first: a collision of two different columns
    (probability ~2^-52 per pair) is caught there, and grouped exactly instead."""
    p = removed.shape[-1]
    rows = removed.reshape(-1, p)  # [b·H·i, j]
    weights = _column_weights(rows.shape[0]).to(rows.device)
    step = max(1, GROUP_CHUNK_ENTRIES // p)
    keys = torch.zeros(p, dtype=torch.float64, device=rows.device)
    nonzero = torch.zeros(p, dtype=torch.bool, device=rows.device)
    for r in range(0, rows.shape[0], step):
        keys += (rows[r:r + step].double() * weights[r:r + step, None]).sum(0)
        nonzero |= rows[r:r + step].ne(0).any(0)
    def firsts(group: Tensor) -> Tensor:  # each group's first source
        return torch.full((int(group.max()) + 1,), p, dtype=torch.long, device=rows.device).scatter_reduce_(
            0, group, torch.arange(p, device=rows.device), reduce="amin")

    group = torch.unique(keys, return_inverse=True)[1]
    first = firsts(group)
    if not all(torch.equal(rows[r:r + step], rows[r:r + step][:, first[group]])
               for r in range(0, rows.shape[0], step)):
        group = torch.unique(rows.T, dim=0, return_inverse=True)[1]  # (a collision: exact, at the memory cost)
        first = firsts(group)
    return group, first, nonzero[first]


class _MaskGradient(torch.autograd.Function):
    """Identity on y; backward also gives the mask its gradient ``edge_gradient(∂L/∂y)``."""

    @staticmethod
    def forward(ctx, mask, y, edge_gradient):
        ctx.edge_gradient = edge_gradient
        ctx.mask_dtype = mask.dtype
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad_y):
        grad_mask = None
        if ctx.needs_input_grad[0]:
            grad_mask = ctx.edge_gradient(grad_y).to(ctx.mask_dtype)
        return grad_mask, grad_y, None


def attach_mask_gradient(y: Tensor, ssm_mask: Tensor, edge_gradient: Callable[[Tensor], Tensor]) -> Tensor:
    """``y`` unchanged in value, with a gradient path to ``ssm_mask``.

    Args:
        y: the masked scan output ``[b, p, e]`` or ``[b, p, h, hd]`` (value and other
            gradients already correct: the knocked-out terms are subtracted from it).
        ssm_mask: ``[b, H, p, p]``, requires grad.
        edge_gradient: ``edge_gradient(grad_y)`` → ``[b, H, p, p]``, ∂L/∂M given ∂L/∂y.

    Returns:
        y as a view, or y itself when no gradient is being recorded.
    """
    if not (ssm_mask.requires_grad and torch.is_grad_enabled()):
        return y
    return _MaskGradient.apply(ssm_mask, y, edge_gradient)


def _log_decay_differences(log_decay: Tensor, causal: Tensor, dtype: torch.dtype) -> Tensor:
    """``L_i - L_j`` for ``L = cumsum(log_decay)`` over the last axis → ``[..., i, j]``, 0 for j > i.

    The cumulative sum is taken in float64 so that the difference of two long sums keeps its precision.
    """
    L = torch.cumsum(log_decay.double(), dim=-1)
    return (L[..., :, None] - L[..., None, :]).masked_fill(~causal, 0.0).to(dtype)


EDGE_GRADIENT_BLOCK = 4
"""Positions per block of :func:`edge_gradient_bpe`: pairs inside a block are summed directly
(``exp`` of a ``[T, T]`` difference per feature), pairs across blocks by a matrix product.
Measured 2026-12-05 (Intel Xeon, 1 thread, e 1536, n 16), 4 against 8: b 1 p 128 0.07 / 0.11 s,
p 512 0.55 / 0.73 s, b 8 p 256 1.54 / 2.27 s, p 1024 1.75 / 1.60 s; toy widths (b 32, p 160, e 192,
n 8) 0.19 / 0.27 s. 16 to 64 were slower still (p 512: 1.15, 2.77, 5.60 s)."""

FLUSH_BLOCKS = 4
"""Every this many blocks, :func:`edge_gradient_bpe` sets to zero the carried columns' entries that
have decayed below ``2**20`` times the dtype's smallest normal number (a term 1e-32 times its
input's size in float32, far below its resolution). Left alone they go on decaying into subnormal
numbers, which x86 CPUs multiply many times slower: in a 130m-width model, p 512, the two layers'
gradients took 1.30 and 3.74 s, with every 4 blocks flushed 1.1 and 1.2 s (every block: 2.4 s,
the flush's own passes; every 16: 0.9 and 1.7 s). Results unchanged to the last bit there."""


def _source_blocks_bpe(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, dtype: torch.dtype, chunk_bytes: int,
                       block: int):
    """The blocks of Mamba-1's quadratic forms (:func:`edge_gradient_bpe`, :func:`dense_removed_terms_bpe`).

    Over the features f = (e, n), in chunks of channels, with ``v_j[f] = Δ_j[e] x_j[e] B_j[n]``
    and ``a_k[f] = exp(Δ_k[e] A[e, n])``, yields per chunk of channels ``c`` and block of target
    positions ``w`` (first position s, T positions):

    - ``local`` [b, T, f]: ``Σ_{k=s..i} log a_k``, so ``exp(local_i)`` is the decay from s to i;
    - ``decays`` [b, T, T, f]: ``Π_{k=j+1..i} a_k`` for i, j in the block, 0 for j > i;
    - ``v`` [b, T, f]: the block's ``v_j``;
    - ``carried`` [b, s, f]: every earlier source carried to s - 1, ``v_j Π_{k=j+1..s-1} a_k``.

    After the consumer's turn it carries the columns over the block (every 4th block,
    :data:`FLUSH_BLOCKS`, setting to zero what has decayed to negligible) and adds the block's own.
    Every factor is a product of decays ≤ 1 from short sums: nothing overflows, nothing is divided,
    and no long cumulative sum is differenced. ``carried`` is updated in place.
    """
    b, p, e = x.shape
    n = A.shape[-1]
    source = delta.to(dtype) * x.to(dtype)  # Δ_j x_j, [b, p, e]
    dt, A, B = delta.to(dtype), A.to(dtype), B.to(dtype)
    within = torch.ones(block, block, dtype=torch.bool, device=x.device).tril()
    channels = max(1, chunk_bytes // max(1, 3 * b * p * n * dtype.itemsize))
    negligible = torch.finfo(dtype).tiny * 2**20
    for start in range(0, e, channels):
        c = slice(start, min(start + channels, e))
        v = (source[:, :, c, None] * B[:, :, None, :]).flatten(2)  # [b, p, f]
        log_decay = (dt[:, :, c, None] * A[c]).flatten(2)  # [b, p, f], ≤ 0
        carried = torch.empty_like(v)
        for s in range(0, p, block):
            w = slice(s, min(s + block, p))
            T = w.stop - s
            local = torch.cumsum(log_decay[:, w], dim=1)
            spans = (local[:, :, None, :] - local[:, None, :, :]).masked_fill_(~within[:T, :T, None], float("-inf"))
            yield c, w, local, spans.exp_(), v[:, w], carried[:, :s]
            carried[:, :s] *= local[:, -1:].exp()
            if (s // block) % FLUSH_BLOCKS == FLUSH_BLOCKS - 1:
                head = carried[:, :s]
                head.masked_fill_(head.abs() < negligible, 0.0)
            carried[:, w] = v[:, w] * (local[:, -1:] - local).exp()


def edge_gradient_bpe(grad_y: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                      chunk_bytes: int = 2**28, block: int = EDGE_GRADIENT_BLOCK) -> Tensor:
    """Mamba-1: ∂L/∂M ``[b, 1, p, p]`` from ∂L/∂y.

    ``G[i, j] = Σ_e Σ_n g_i[e] · C_i[n] · exp(A[e, n] Σ_{k=j+1..i} Δ_k[e]) · B_j[n] · Δ_j[e] · x_j[e]``
    for j ≤ i (0 above the diagonal). With f = (e, n) a feature, ``u_i[f] = g_i[e] C_i[n]``,
    ``v_j[f] = Δ_j[e] x_j[e] B_j[n]`` and ``a_k[f] = exp(Δ_k[e] A[e, n])``, that is
    ``Σ_f u_i[f] (Π_{k=j+1..i} a_k[f]) v_j[f]``: O(p² e n) work, as there is a decay per feature.
    Done in blocks of positions, so that almost all of it is one matrix product per block:

    - i in block I (first position s), j before s: ``Σ_f (u_i Π_{k=s..i} a_k)[f] · V_j[f]`` with
      ``V_j = v_j Π_{k=j+1..s-1} a_k``, a ``[T, f] @ [f, s]`` product. V is carried from block to
      block, each column multiplied by the block's decay product.
    - i, j in the same block: directly, ``exp`` of differences of the block's own cumulative
      log-decays.

    The blocks come from :func:`_source_blocks_bpe` (shared with :func:`dense_removed_terms_bpe`).

    Args:
        grad_y, x, delta: ``[b, p, e]``. A: ``[e, n]``. B, C: ``[b, p, n]``.
        chunk_bytes: working memory per chunk of channels (about three ``[b, p, c·n]`` tensors).
        block: positions per block (speed only).

    Returns:
        ``[b, 1, p, p]`` in the compute dtype (float64 if any input is, else float32).
    """
    b, p, e = x.shape
    dtype = compute_dtype(grad_y, x, delta, A, B, C)
    g, C = grad_y.detach().to(dtype), C.detach().to(dtype)
    total = torch.zeros(b, p, p, dtype=dtype, device=x.device)
    for c, w, local, decays, v, carried in _source_blocks_bpe(x.detach(), delta.detach(), A.detach(), B.detach(),
                                                             dtype, chunk_bytes, block):
        u = (g[:, w, c, None] * C[:, w, None, :]).flatten(2)  # [b, T, f]: g_i[e] C_i[n]
        if carried.shape[1]:
            total[:, w, :w.start] += torch.matmul(u * local.exp(), carried.transpose(1, 2))
        total[:, w, w] += (u[:, :, None, :] * decays * v[:, None, :, :]).sum(-1)
    return total[:, None]


def dense_removed_terms_bpe(removed: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                            chunk_bytes: int = 2**28, block: int = EDGE_GRADIENT_BLOCK) -> Tensor:
    """Mamba-1: ``Σ_j R[i, j] α_e[i, j] x_j[e]`` in the quadratic form, without autograd.

    ``α_e[i, j] = Σ_n C_i[n] exp(A[e, n] Σ_{k=j+1..i} Δ_k[e]) B_j[n] Δ_j[e]`` for j ≤ i. With
    ``v_j[f] = Δ_j[e] x_j[e] B_j[n]`` over the features f = (e, n), the part of state entry f at
    target i is ``Σ_j R[i, j] (Π_{k=j+1..i} a_k[f]) v_j[f]``, read out with C_i. The blocks of
    :func:`edge_gradient_bpe`: sources before target block I (first position s) are one matrix
    product ``R[I, :s] @ V`` with V the source columns carried to s - 1, times the decay from s
    to i; sources within the block directly. O(p² e n) multiply-adds, almost all in that
    product, against O(p² e n) elementwise work for p scans.

    Args:
        removed: ``[b, 1, p, p]`` R, 0 above the diagonal.
        x, delta: ``[b, p, e]``. A: ``[e, n]``. B, C: ``[b, p, n]``.
        chunk_bytes: working memory per chunk of channels (about three ``[b, p, c·n]`` tensors).
        block: positions per block (speed only).

    Returns:
        ``[b, p, e]`` in the compute dtype (float64 if any input is, else float32). Autograd
        can differentiate it, but its in-place block updates then keep a copy of the carried
        columns per block (O(p² e n / block) memory), so under autograd the scans serve instead.
    """
    b, p, e = x.shape
    n = A.shape[-1]
    dtype = compute_dtype(x, delta, A, B, C, removed)
    R, C = removed[:, 0].to(dtype), C.to(dtype)  # R: [b, i, j]
    out = torch.empty(b, p, e, dtype=dtype, device=x.device)
    for c, w, local, decays, v, carried in _source_blocks_bpe(x, delta, A, B, dtype, chunk_bytes, block):
        # the block's states' removed part: Σ_j R[i, j] (Π_{k=j+1..i} a_k) v_j, [b, T, f]
        state = torch.matmul(R[:, w, w, None].transpose(2, 3), decays * v[:, None, :, :]).squeeze(2)
        if carried.shape[1]:
            state += torch.matmul(R[:, w, :w.start], carried) * local.exp()
        out[:, w, c] = (state.unflatten(2, (-1, n)) * C[:, w, None, :]).sum(-1)
    return out


def edge_gradient_bphd(grad_y: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                       mask_heads: int, chunk_bytes: int = 2**28) -> Tensor:
    """Mamba-2: ∂L/∂M ``[b, H, p, p]`` from ∂L/∂y (H = h, or 1 for a mask shared by the heads).

    ``G_h[i, j] = (C_i · B_j) · exp(A_h Σ_{k=j+1..i} Δ_k[h]) · Δ_j[h] · (g_i[h] · x_j[h])`` for j ≤ i.

    Args:
        grad_y, x: ``[b, p, h, hd]``. delta: ``[b, p, h]``. A: ``[h]``. B, C: ``[b, p, g, n]``.
        mask_heads: H, the mask's head axis (h or 1: then the heads are summed).
        chunk_bytes: working memory per chunk of heads.

    Returns:
        ``[b, H, p, p]`` in the compute dtype (float64 if any input is, else float32).
    """
    dtype = compute_dtype(grad_y, x, delta, A, B, C)
    g = grad_y.detach().to(dtype)
    source = delta.detach().to(dtype)[..., None] * x.detach().to(dtype)  # Δ_j x_j [b, p, h, hd]
    b, p, h, _ = x.shape
    total = torch.zeros(b, mask_heads, p, p, dtype=dtype, device=x.device)
    for heads, weight in _head_chunks_of_alpha(x.detach(), delta.detach(), A.detach(), B.detach(), C.detach(), dtype,
                                               chunk_bytes):
        gx = torch.einsum("bihd,bjhd->bhij", g[:, :, heads], source[:, :, heads])  # [b, c, i, j]
        if mask_heads == 1:  # summed as it goes: one [b, 1, p, p] whatever the number of chunks
            total += (weight * gx).sum(1, keepdim=True)
        else:
            torch.mul(weight, gx, out=total[:, heads[0]:heads[-1] + 1])
    return total


def _head_chunks_of_alpha(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, dtype: torch.dtype,
                          chunk_bytes: int):
    """Mamba-2's α without its Δ_j factor, a chunk of heads at a time (so no ``[b, h, p, p]`` is held):
    yields ``(heads [c], (C_i · B_j) · exp(A_h Σ_{k=j+1..i} Δ_k[h]) [b, c, i, j])``, 0 above the diagonal."""
    b, p, h, _ = x.shape
    heads_per_group = h // B.shape[2]
    causal = torch.ones(p, p, dtype=torch.bool, device=x.device).tril()
    cb = torch.einsum("bign,bjgn->bgij", C.to(dtype), B.to(dtype))  # [b, g, i, j]
    dt = delta.transpose(1, 2)  # [b, h, p]
    A = A.to(dtype)
    chunk = max(1, chunk_bytes // max(1, 3 * b * p * p * 8))
    for start in range(0, h, chunk):
        heads = torch.arange(start, min(h, start + chunk), device=x.device)
        span = _log_decay_differences(dt[:, heads], causal, dtype)  # [b, c, i, j]: Σ_{k=j+1..i} Δ_k
        yield heads, torch.exp(span * A[heads, None, None]) * causal * cb[:, heads // heads_per_group]


DENSE_MASK_AFTER: Optional[int] = None
"""The number of extra scans (distinct column patterns) past which a dense mask's removed
part is computed in the quadratic form, both families; None: :func:`dense_mask_after` and
:func:`dense_mask_after_bpe`."""


def dense_mask_after(p: int, device=None, dtype: Optional[torch.dtype] = None) -> int:
    """How many extra scans a Mamba-2 dense mask may cost before the quadratic form is cheaper.

    Measured on CPU (docs/performance.md, "CPU: knockout"): the quadratic form costs
    about p / 100 scans (under 1 at p = 128, 3-4 at p = 512), so it takes over past p / 64.
    On CUDA the quadratic form is the masked-tile kernel, whose cost in scans does not
    grow with p the same way: measured on an H200 (2026-12-04, 130m widths, p = 2048;
    docs/performance.md, "GPU") 3.5 scans in fp32 and 15 in bf16, so it takes over past
    :data:`DENSE_MASK_AFTER_CUDA` scans for the inputs' dtype.
    Mamba-1 has its own rule (:func:`dense_mask_after_bpe`).
    """
    if DENSE_MASK_AFTER is not None:
        return DENSE_MASK_AFTER
    if device is not None and torch.device(device).type == "cuda" and dtype in DENSE_MASK_AFTER_CUDA:
        return DENSE_MASK_AFTER_CUDA[dtype]
    return max(4, p // 64)


def dense_mask_after_bpe(p: int, device=None) -> Optional[int]:
    """How many extra scans a Mamba-1 dense mask may cost before :func:`dense_removed_terms_bpe`
    serves it instead (None: never).

    Measured on CPU (docs/performance.md, "CPU: knockout"; 2026-12-05, Intel Xeon, 1 thread,
    b 1): the quadratic form costs 13, 38 and 84 scans at 130m widths (e 1536, n 16) and
    p = 128, 512, 1024, and 6, 13 and 22 at the toy models' widths (e 192, n 8): about p / 12
    at most, so it takes over past p / 8 (and at least 8). A random mask has about p patterns.
    On other devices the scans keep serving until the quadratic form is measured there.
    """
    if DENSE_MASK_AFTER is not None:
        return DENSE_MASK_AFTER
    if device is not None and torch.device(device).type != "cpu":
        return None
    return max(8, p // 8)


DENSE_MASK_AFTER_CUDA = {torch.float32: 4, torch.bfloat16: 15, torch.float16: 15}
"""Per input dtype on CUDA, the scans past which the masked-tile kernel serves a dense mask
(the H200 numbers above, rounded up; float64 keeps the CPU rule)."""


def dense_removed_terms_bphd(removed: Tensor, x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                             chunk_bytes: int = 2**28) -> Tensor:
    """Mamba-2: ``Σ_j R_h[i, j] α_h[i, j] x_j[h]`` in the quadratic form, chunk by chunk of heads.

    ``α_h[i, j] = (C_i · B_j) · exp(A_h Σ_{k=j+1..i} Δ_k[h]) · Δ_j[h]`` for j ≤ i.

    Args:
        removed: ``[b, H, p, p]`` R (H = h, or 1 for every head), 0 above the diagonal.
        x: ``[b, p, h, hd]``. delta: ``[b, p, h]``. A: ``[h]``. B, C: ``[b, p, g, n]``.
        chunk_bytes: working memory per chunk of heads.

    Returns:
        ``[b, p, h, hd]`` in the compute dtype (float64 if any input is, else float32); differentiable.
    """
    dtype = compute_dtype(x, delta, A, B, C, removed)
    R = removed.to(dtype)
    source = delta.to(dtype)[..., None] * x.to(dtype)  # Δ_j x_j [b, p, h, hd]
    parts = []
    for heads, weight in _head_chunks_of_alpha(x, delta, A, B, C, dtype, chunk_bytes):
        weight = weight * (R if R.shape[1] == 1 else R[:, heads])
        parts.append(torch.einsum("bcij,bjcd->bicd", weight, source[:, :, heads]))
    return torch.cat(parts, dim=2)


def _bad_layout(H: int):
    raise ValueError(f"a Mamba-1 ssm_mask has one head axis of size 1, got {H}")
