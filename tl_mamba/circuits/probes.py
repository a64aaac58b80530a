"""Representational probes by token class: what a head *looks like* at the positions of a class.

The state-sink study separates *detection* (a head's activations on BOS and on newlines
look alike) from *execution* (ablating the head at those positions changes behaviour,
:func:`tl_mamba.circuits.class_conditional_ablation_hooks`), and finds that the first
does not imply the second. :func:`similarity_by_class` is the detection side: per head
(Mamba-2) or channel group (Mamba-1) and pair of token classes, how alike the head's
activation vectors are on the two classes.

    from tl_mamba.circuits import similarity_by_class
    df = similarity_by_class(model, tokens, {"bos": "bos", "newline": "newline"}, hook="y")
    df[(df.class_a == "bos") & (df.class_b == "newline")].sort_values("mean_cosine")
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

from tl_mamba.circuits.ablation import TokenClass, _batch_cache, _stats_layers, class_masks
from tl_mamba.circuits.patching import _feature_hooks, channel_group_slices, feature_axis, resolve_hook

__all__ = ["similarity_by_class"]


def similarity_by_class(model, tokens: Tensor, classes: Mapping[str, TokenClass], hook: str = "y", *,
                        attention_mask: Optional[Tensor] = None, layers=None, channel_groups: Optional[int] = None,
                        include_other: bool = True, batch_size: int = 32, progress: bool = True, fwd_hooks=()):
    """Class-conditional cosine similarity of each head's activations (the detection probe).

    For every layer, head and pair of classes (a, b), with ``v_i`` the head's slice of
    ``blocks.{l}.{hook}`` at position i, flattened (``hook_y``: ``[hd]``; ``hook_h``:
    ``[hd·n]``):

    - ``mean_cosine``: the mean of cos(v_i, v_j) over i in a, j in b (for a = b, over
      pairs i ≠ j): how alike single positions of the two classes are;
    - ``cosine_of_means``: cos(mean of a's v, mean of b's v) (NaN for a = b, and where a
      class has no position or its mean is the zero vector).

    Computed exactly from sums of the vectors and of the unit vectors, in float64, so
    every pair of positions counts without a ``[n, n]`` matrix. A zero vector has no
    direction: it counts as a pair of cosine 0.

    Args:
        tokens: ``[b, p]``.
        classes: ``{name: token class}`` (see :func:`tl_mamba.circuits.token_class_mask`:
            ``"bos"``, ``"newline"``, ids, token strings, a bool mask ``[b, p]``, a function).
            Classes may overlap (a position in both pairs with itself, cosine 1).
        hook: a hook with a head axis (Mamba-2: ``"y"``, ``"x"``, ``"h"``, ``"y_normed"``, ...)
            or a channel axis (Mamba-1, with ``channel_groups``). Default ``"y"``.
        attention_mask: padding is in no class (None: the padding the forward infers from pad
            tokens, if any).
        layers: None = all.
        channel_groups: Mamba-1 only: ``G`` contiguous, equal groups of ``d_inner`` (default
            1: the whole layer); each group's slice is one vector.
        include_other: add a class ``"other"``: real positions in none of the classes.
        batch_size: prompts per forward.
        progress: a tqdm bar over the batches.
        fwd_hooks: hooks to run every batch under (an ablation, a patch: the statistic of the
            edited model), or a function ``tokens [b, p] -> hooks`` (given ``attention_mask=``
            too if it takes it) called per batch, such as a
            ``class_conditional_hook_factory``; as ``needle_accuracy`` takes them.

    Returns:
        A pandas DataFrame, one row per (layer, head, class_a, class_b) with class_a at or
        before class_b in ``classes``' order: ``layer``, ``head`` (head, or channel-group
        index), ``class_a``, ``class_b``, ``count_a``, ``count_b``, ``mean_cosine``,
        ``cosine_of_means`` (``mean_cosine`` is NaN where there is no pair of positions).
        Mamba-1 rows also carry ``channels`` ``(start, stop)``. Layers named twice count once.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    cfg = model.cfg
    mamba1 = cfg.family == "mamba1"
    if not mamba1 and channel_groups is not None:
        raise ValueError("channel_groups apply to Mamba-1; Mamba-2 vectors are per head already")
    name = resolve_hook(model, hook)
    axis = feature_axis(model, name)  # the family's own axis: heads (Mamba-2) or channels (Mamba-1)
    if axis is None:  # the probe compares heads (channel groups): hook= is what is wrong
        unit = "channel (d_inner) axis to split into channel groups" if mamba1 else "head axis"
        raise ValueError(f"similarity_by_class(hook={hook!r}): {name} has no {unit}; hooks with one: "
                         f"{_feature_hooks(model)}")
    layer_list = _stats_layers(model, layers, batch_size)
    tokens, attention_mask, names, masks = class_masks(model, tokens, classes, attention_mask, include_other)
    groups = channel_group_slices(cfg.d_inner, 1 if channel_groups is None else channel_groups) if mamba1 else None
    n_units = len(groups) if mamba1 else axis.size

    def unit_vectors(act: Tensor) -> Tensor:
        """``[b, p, units, D]``: each head's (channel group's) slice, flattened, in float64."""
        view = axis.view(act).to(torch.float64)  # [b, p, features, ...]
        if not mamba1:
            return view.flatten(3) if view.dim() > 3 else view[..., None]
        b, p = view.shape[:2]
        return view.reshape(b, p, len(groups), -1)  # contiguous, equal groups of the channel axis

    C = masks.shape[0]
    sums = {layer: None for layer in layer_list}  # [C, units, D]: Σ v over each class
    unit_sums = {layer: None for layer in layer_list}  # [C, units, D]: Σ v / ‖v‖
    nonzero = {layer: torch.zeros(C, n_units, dtype=torch.float64) for layer in layer_list}
    squares = {layer: torch.zeros(C, n_units, dtype=torch.float64) for layer in layer_list}  # Σ ‖v‖²
    hook_names = [f"blocks.{layer}.{name}" for layer in layer_list]
    with torch.no_grad():
        for start in tqdm(range(0, tokens.shape[0], batch_size), desc="similarity by class", disable=not progress,
                          leave=False, unit="batch"):
            chunk = tokens[start:start + batch_size]
            mask = None if attention_mask is None else attention_mask[start:start + batch_size]
            cache = _batch_cache(model, chunk, mask, hook_names, max(layer_list) + 1, fwd_hooks)
            weights = masks[:, start:start + batch_size].to(chunk.device)  # [C, b, p]
            for layer, hook_name in zip(layer_list, hook_names):
                v = unit_vectors(cache[hook_name])  # [b, p, units, D]
                norm = v.norm(dim=-1, keepdim=True)
                u = torch.where(norm > 0, v / norm.clamp_min(1e-300), torch.zeros_like(v))
                s = torch.einsum("cbp,bpud->cud", weights, v)
                us = torch.einsum("cbp,bpud->cud", weights, u)
                sums[layer] = s if sums[layer] is None else sums[layer] + s
                unit_sums[layer] = us if unit_sums[layer] is None else unit_sums[layer] + us
                nonzero[layer] += torch.einsum("cbp,bpu->cu", weights, (norm[..., 0] > 0).to(torch.float64)).cpu()
                squares[layer] += torch.einsum("cbp,bpu->cu", weights, norm[..., 0].pow(2)).cpu()
    counts = masks.sum((1, 2)).cpu()
    rows = []
    for layer in layer_list:
        s, us = sums[layer].cpu(), unit_sums[layer].cpu()
        for unit in range(n_units):
            for a in range(C):
                for b in range(a, C):
                    n_a, n_b = float(counts[a]), float(counts[b])
                    dot = float(us[a, unit] @ us[b, unit])
                    if a == b:  # distinct pairs: |Σu|² less each unit vector with itself
                        pairs = n_a * (n_a - 1)
                        mean_cos = (dot - float(nonzero[layer][a, unit])) / pairs if pairs > 0 else float("nan")
                        of_means = float("nan")
                    else:
                        mean_cos = dot / (n_a * n_b) if n_a and n_b else float("nan")
                        ma, mb = s[a, unit], s[b, unit]
                        denom = float(ma.norm() * mb.norm())
                        of_means = float(ma @ mb) / denom if n_a and n_b and denom > 0 else float("nan")
                    row = {"layer": layer, "head": unit, "class_a": names[a], "class_b": names[b],
                           "count_a": int(n_a), "count_b": int(n_b), "mean_cosine": mean_cos,
                           "cosine_of_means": of_means}
                    if mamba1:
                        row["channels"] = groups[unit]
                    rows.append(row)
    # n Σ‖v‖² ≥ ‖Σv‖², equal exactly when the class's n vectors are one vector (Cauchy-Schwarz)
    scale = torch.stack([counts[:, None].double() * squares[layer] for layer in layer_list])  # [layers, C, units]
    spread = scale - torch.stack([sums[layer].cpu().pow(2).sum(-1) for layer in layer_list])
    one_vector = ((spread <= 1e-9 * scale) & (counts[None, :, None] > 1)).all(0).all(-1)  # [C]
    _warn_if_one_context([name for name, same in zip(names, one_vector.tolist()) if same])
    return pd.DataFrame(rows)


def _warn_if_one_context(classes) -> None:
    """Warn for classes whose positions hold one activation (in every layer and head): they all have
    one context, as a BOS at position 0 does, so their similarity says nothing about the heads."""
    import warnings

    for name in classes:
        warnings.warn(
            f"similarity_by_class: class {name!r} holds the same activation at each of its positions, in every "
            "layer and head (mean cosine 1 within it): its positions all have the same context (a BOS at "
            "position 0 does), so its similarity measures the class, not the heads. Compare classes whose "
            "positions have different contexts.", UserWarning, stacklevel=3)
