"""Zero, mean and resample ablation of any Mamba hook, class-conditional ablation, Δ statistics and
next-token loss by token class, and a needle-in-a-haystack accuracy harness.

Every factory returns plain TransformerLens ``(hook_name, hook_fn)`` pairs, so they
compose with ``run_with_hooks``, the ``model.hooks(...)`` context, other hooks and
``Knockout``s (``model.run_with_knockout(tokens, ko, fwd_hooks=hooks)``):

    from tl_mamba.circuits.ablation import (zero_ablation_hooks, mean_ablation_hooks,
        class_conditional_ablation_hooks, delta_stats_by_class, needle_accuracy)

    hooks = zero_ablation_hooks(model, "y", layers=[2], heads=[0, 5])          # Mamba-2 heads
    hooks = mean_ablation_hooks(model, "x", reference_tokens, channels=range(32))  # Mamba-1 channels
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)

    # the Mamba-2 "state sink": zero Δ of chosen heads only at BOS positions
    hooks = class_conditional_ablation_hooks(model, tokens, {1: [3], 2: [0, 7]}, token_class="bos")
    df = delta_stats_by_class(model, tokens, {"bos": "bos", "period": ["."]})   # find such heads
    loss_by_class(model, tokens, {"period": ["."]}, fwd_hooks=hooks)   # the predictions they support
    needle_accuracy(model, lengths=(64, 128), n=100,
                    fwd_hooks=class_conditional_hook_factory(model, {1: [3]}, token_class="bos"))

Features: ``heads=`` picks Mamba-2 heads, ``channels=`` Mamba-1 ``d_inner`` channels,
on hooks that have that axis (see :func:`tl_mamba.circuits.patching.feature_axis`);
either may be a mapping ``{layer: features}`` to choose features per layer.
Positions: None (all), ints (negative from the end), a bool mask ``[p]`` or ``[b, p]``
(one row per batch element: the hooks then only fit runs of that batch size). Ints and
``[p]`` masks are columns of the batch, as ``Knockout``'s are (in a left-padded batch
column 2 is not every prompt's third token: one that falls on padding warns). Under
``generate`` they name places of the whole sequence, not of each one-token step (the hooks
read ``model.position_offset``): ``[2]`` is column 2 of the prompt; negative positions
are refused there (the sequence's end moves at every step). Values taken by place
(per-position means, resampled activations) go to each prompt's own token: its token t
takes place t, padding on either side of either batch lined up (``model.leading_pads``).

Ablating ``hook_delta`` (Δ) of a head to zero at a position means that head neither
decays its state (exp(0·A) = 1) nor writes to it (Δ·B = 0) there: the state passes
through that position unchanged. Ablating ``hook_h`` sets the state, and the
recurrence continues from the ablated value.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from tl_mamba.circuits.patching import (
    FeatureAxis,
    channel_group_slices,
    check_indices,
    check_layers,
    require_feature_axis,
    resolve_hook,
)
from tl_mamba.errors import NotAnIndexError, caller_stacklevel, reusable
from tl_mamba.models.tokens import leading_padding, padding_hit, trailing_padding

Hook = Tuple[str, Callable]
Features = Optional[Union[int, Sequence[int], Tensor, range, Mapping[int, Any]]]
PositionSpec = Optional[Union[int, Sequence[int], Tensor]]
TokenClass = Union[str, int, Sequence[int], Tensor, Callable[[Tensor], Tensor]]

KINDS = ("zero", "mean", "resample")

__all__ = [
    "KINDS",
    "zero_ablation_hooks",
    "mean_ablation_hooks",
    "resample_ablation_hooks",
    "ablation_hooks",
    "ablate",
    "mean_activations",
    "token_class_mask",
    "class_conditional_ablation_hooks",
    "class_conditional_hook_factory",
    "delta_stats_by_class",
    "loss_by_class",
    "needle_accuracy",
]


# ----------------------------------------------------------------------- helpers
def _layer_features(model, name: str, layers, heads: Features,
                    channels: Features) -> Tuple[Dict[int, Optional[List[int]]], Optional[FeatureAxis]]:
    """``({layer: feature indices or None (all)}, feature axis or None)`` for a resolved hook ``name``."""
    if heads is not None and channels is not None:
        raise ValueError("give heads= (Mamba-2) or channels= (Mamba-1), not both")
    if heads is None and channels is None:
        return {layer: None for layer in check_layers(model, layers)}, None
    asked, chosen = ("heads", heads) if heads is not None else ("channels", channels)
    if isinstance(chosen, Mapping):
        if layers is not None:
            raise ValueError(f"{asked} is a mapping {{layer: {asked}}}: it names the layers, so leave layers=None")
        if not chosen:
            raise ValueError(f"the {asked} mapping is empty")
        # a layer mapped to None takes every feature, which needs no feature axis
        axis = None
        if any(feats is not None for feats in chosen.values()):
            axis = require_feature_axis(model, name, asked)
        out: Dict[int, Optional[List[int]]] = {}
        for layer, feats in chosen.items():
            (layer,) = check_layers(model, [layer])
            out[layer] = None if feats is None else check_indices(feats, axis.size, asked)
        return out, axis
    axis = require_feature_axis(model, name, asked)
    feats = check_indices(chosen, axis.size, asked)
    return {layer: feats for layer in check_layers(model, layers)}, axis


def _position_mask(positions: PositionSpec, b: int, p: int, device, offset: Optional[int] = None) -> Tensor:
    """``positions`` as a ``[b, p]`` bool mask for a run of ``b`` rows and ``p`` positions.

    ``offset`` (``model.position_offset``) is the place of the run's first position in a
    sequence carried by a ``RecurrentState`` (generate's prefill has 0, each later step the
    tokens seen so far), or None for a run that is the whole sequence. With it, positions
    are places in that sequence: ``k >= 0`` is ablated in the run that holds it (none
    before or after, a place still to come is no error), and a bool mask ``[m]`` /
    ``[b, m]`` covers the sequence's first ``m`` places. Negative positions are refused
    there: they count from an end that moves at every step, and recurrent decoding (each
    token ablated once, when newest, and carried in the state) and re-running the sequence
    (only the current last token) would give them different meanings."""
    if positions is None:
        return torch.ones(b, p, dtype=torch.bool, device=device)
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        mask = positions.to(device)
        if offset is not None:  # the run's window of a mask over the whole sequence, False past its end
            window = torch.zeros(*mask.shape[:-1], p, dtype=torch.bool, device=device)
            seen = mask[..., offset:offset + p]
            window[..., :seen.shape[-1]] = seen
            mask = window
        if mask.dim() == 1:
            if mask.shape[0] != p:
                raise ValueError(f"the position mask has {mask.shape[0]} positions, the run {p}")
            return mask[None].expand(b, p)
        if mask.dim() != 2 or tuple(mask.shape) != (b, p):
            raise ValueError(f"a [b, p] position mask of shape {tuple(positions.shape)} cannot ablate a run of shape "
                             f"[{b}, {p}]: build the hooks for this batch (a factory tokens -> hooks)")
        return mask
    mask = torch.zeros(b, p, dtype=torch.bool, device=device)
    if offset is None:
        mask[:, check_indices(positions, p, "positions")] = True
        return mask
    length = offset + p  # the sequence so far
    values = positions.reshape(-1).tolist() if isinstance(positions, Tensor) else \
        [positions] if hasattr(positions, "__index__") or not hasattr(positions, "__iter__") else list(positions)
    for v in values:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise NotAnIndexError(f"positions must be ints, got {v!r}")
        if int(v) < 0:
            raise ValueError(
                f"position {int(v)} counts from the end of the sequence, but this forward is part of a sequence "
                "that grows (generate, or a RecurrentState), whose end moves at every step: give places counted "
                f"from the start (a prompt of P tokens ends at place P - 1; its new tokens are range(P, P + n))")
        if offset <= int(v) < length:  # (a later place is a token still to come)
            mask[:, int(v) - offset] = True
    return mask


def _offset(model) -> Optional[int]:
    """Where the running forward's first position lies in a sequence carried by a state (None: the
    run is the whole sequence); see ``HookedSSM.position_offset``."""
    return getattr(model, "position_offset", None)


def _ablation_mask(model, act: Tensor, positions: PositionSpec, warn: bool = True) -> Tensor:
    """The ``[b, p]`` places of ``act [b, p, ...]`` that ``positions`` names in this forward.

    Positions given as ints or a ``[p]`` mask are columns of the batch, as ``Knockout``'s are;
    where one falls on padding in some row of a padded forward, that warns (nothing is there to
    ablate: prompts of different lengths take a ``[b, p]`` mask, one row per prompt); ``warn``:
    whether this call may (the first layer's hook of a set, so a forward warns once)."""
    mask = _position_mask(positions, act.shape[0], act.shape[1], act.device, _offset(model))
    padding = model.padding_mask
    per_row = isinstance(positions, Tensor) and positions.dtype == torch.bool and positions.dim() == 2
    if warn and positions is not None and padding is not None and not per_row and \
            tuple(padding.shape) == tuple(mask.shape):
        hit = padding_hit(mask, padding.to(mask.device))
        if hit is not None:
            import warnings

            row, columns = hit
            warnings.warn(
                f"ablation positions {columns} fall on padding in row {row} (and maybe others): positions are "
                "columns of the padded batch, and a pad column holds no token to ablate. "
                "For prompts of different lengths give positions as a [b, p] bool mask, one row per prompt.",
                UserWarning, stacklevel=caller_stacklevel())
    return mask


def _masked_replace(act: Tensor, replacement: Union[Tensor, float], mask: Tensor,
                    axis: Optional[FeatureAxis], features: Optional[List[int]]) -> Tensor:
    """``act`` with ``replacement`` (broadcastable to ``act``) where the ``[b, p]`` ``mask`` is True, at
    the chosen features."""
    b, p = act.shape[:2]
    if not isinstance(replacement, Tensor):
        replacement = torch.tensor(replacement, dtype=act.dtype, device=act.device)
    replacement = replacement.to(device=act.device, dtype=act.dtype).expand_as(act)
    if features is None or axis is None:
        keep_dims = act.dim() - 2
        return torch.where(mask.reshape(b, p, *([1] * keep_dims)), replacement, act)
    view, repl = axis.view(act), axis.view(replacement)
    fmask = torch.zeros(axis.size, dtype=torch.bool, device=act.device)
    fmask[features] = True
    full = (mask[:, :, None] & fmask[None, None, :]).reshape(b, p, axis.size, *([1] * (view.dim() - 3)))
    return axis.unview(torch.where(full, repl, view))


def _replace_by_place(model, act: Tensor, places: Tensor, positions: PositionSpec, axis: Optional[FeatureAxis],
                      features: Optional[List[int]], what: str, lengths: Optional[Tensor] = None,
                      warn: bool = True) -> Tuple[Tensor, Tensor]:
    """``act [b, p, ...]`` with ``places [b or 1, m, ...]`` (per-position means, another prompt's
    activations, place k holding token k) at the chosen positions: each row's token takes the
    value of its place in the prompt, ``offset + t - leading_pads[row]`` for the run's column t
    (``offset`` 0 for a whole sequence, else generate's tokens so far; ``model.leading_pads``
    the rows' left padding; padding itself is left alone). A causal model's activation at a
    place depends on the tokens up to it only, so places line up whatever the run's length;
    a ``ValueError`` if an ablated token lies past place ``m - 1``, or past its row's own
    ``lengths [b]`` (a source prompt's real tokens). Padding of the run (``model.padding_mask``
    0, either side) is never replaced. Returns the new activation and the ``[b, p]`` positions
    it replaced."""
    if tuple(places.shape[2:]) != tuple(act.shape[2:]):
        raise ValueError(f"{what} have shape {tuple(places.shape[1:])} per row, the activation "
                         f"{tuple(act.shape[1:])}: were they made with another model or hook?")
    b, p, m = act.shape[0], act.shape[1], places.shape[1]
    place = (_offset(model) or 0) + torch.arange(p, device=act.device)[None, :].expand(b, p)  # [b, p]
    lead = model.leading_pads
    if lead is not None:
        place = place - lead.to(act.device)[:, None]
    mask = _ablation_mask(model, act, positions, warn) & (place >= 0)  # (a left pad column has no place)
    padding = model.padding_mask
    if padding is not None and tuple(padding.shape) == (b, p):  # nor has a right pad column
        mask = mask & padding.to(act.device).bool()
    limit = torch.full((b,), m, device=act.device) if lengths is None else lengths.to(act.device).clamp(max=m)
    beyond = mask & (place >= limit[:, None])
    if bool(beyond.any()):
        row = int(beyond.any(1).nonzero()[0, 0])
        first, cover = int(place[row][beyond[row]].min()), int(limit[row])
        raise ValueError(f"{what} cover {cover} positions, but this run ablates position {first} of its sequence"
                         f"{' (generate went past them)' if _offset(model) else ''}: pass longer ones, or restrict "
                         f"positions= to the first {cover}" + (f" (source row {row}'s tokens)" if lengths is not None
                                                              else ""))
    if not bool(mask.any()):
        return act, mask
    index = place.clamp(0, m - 1).reshape(b, p, *([1] * (act.dim() - 2)))
    taken = places.to(act.dtype).expand(b, *places.shape[1:]).gather(1, index.expand(b, p, *act.shape[2:]))
    return _masked_replace(act, taken, mask, axis, features), mask


def _warn_if_resampled_from_itself(act: Tensor, out: Tensor, mask: Tensor, name: str) -> bool:
    """Warn (and return True) when rows with ablated places come out of a resample ablation
    unchanged: their sources hold exactly their activations there (the prompt itself as its own
    source, ``source_tokens`` being the run's tokens lined up row by row or a random draw that
    picked it; or sources that share the ablated prefix, a BOS or a template's first words)."""
    import warnings

    unchanged = (out == act).reshape(act.shape[0], -1).all(1) & mask.any(1)
    if not bool(unchanged.any()):
        return False
    rows = unchanged.nonzero().flatten().tolist()
    warnings.warn(
        f"resample ablation of {name} changed nothing in rows {rows[:8]}{' ...' if len(rows) > 8 else ''} of "
        f"{act.shape[0]}: their source rows hold exactly their activations at every ablated place (the prompt as "
        "its own source: source_tokens are the run's tokens, lined up row by row, or a random draw picked it; or "
        "sources that share the ablated prefix, such as a BOS or a template's first words). Resample from other "
        "prompts, choose them with source_rows=, or ablate later positions.", UserWarning,
        stacklevel=caller_stacklevel())
    return True


def _real_positions(model, tokens: Tensor, attention_mask: Optional[Tensor]) -> Optional[Tensor]:
    """The padding mask a statistic should leave out, as the model's forward reads it: the given
    ``attention_mask``, checked by the forward's own check (shape, 0 / 1, contiguous padding), or,
    when None, the padding the forward infers from pad tokens (leading runs, for a model that pads
    on the left), else each row's trailing run of the pad id: ``to_tokens``' right padding, which
    the forward needs no mask for (it comes after every real token) but a statistic pooled over
    positions would count. A row of nothing but pads is not padding. None where every position
    is real."""
    mask = model._prepare_input(tokens, attention_mask, None, None)[1]
    if attention_mask is not None or mask is not None or model.tokenizer is None:
        return mask
    return trailing_padding(tokens, model._pad_id())


def _token_order(real: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """For a padding mask ``real [b, p]`` (None: no padding): ``(index, held)``. ``index [b, p]``
    gathers each row's token k to index k (a left-padded row's tokens move to the front, by its
    left padding; None where no row is left-padded: right padding and none stay as they are), and
    ``held [b, p]`` says which indices then hold a real token (None: all)."""
    if real is None:
        return None, None
    real = real.bool()
    lead = leading_padding(real)
    if not bool(lead.any()):
        return None, real
    places = torch.arange(real.shape[1], device=real.device)[None, :]
    return (places + lead[:, None]).clamp(max=real.shape[1] - 1), places < real.sum(1)[:, None]


def _in_token_order(act: Tensor, index: Optional[Tensor]) -> Tensor:
    """``act [b, p, ...]`` gathered by :func:`_token_order`'s ``index`` (as it is for None)."""
    if index is None:
        return act
    index = index.to(act.device).reshape(*index.shape, *([1] * (act.dim() - 2)))
    return act.gather(1, index.expand_as(act))


def check_batch_size(batch_size) -> int:
    """``batch_size`` (prompts per forward) as a positive int; ``ValueError`` otherwise."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (rows per forward), got {batch_size!r}")
    return int(batch_size)


def _stats_layers(model, layers, batch_size) -> List[int]:
    """``layers`` for a statistic over a batch, each once (a layer named twice would be summed
    twice), after checking ``batch_size``."""
    check_batch_size(batch_size)
    return list(dict.fromkeys(check_layers(model, layers)))


def _check_mask_of(mask: Optional[Tensor], tokens, name: str) -> None:
    """``ValueError`` naming ``name`` (``reference_attention_mask``, ...) when ``mask`` is not
    ``tokens``' shape: the forward's own check would name its ``attention_mask``."""
    if mask is not None and isinstance(tokens, Tensor) and tuple(torch.as_tensor(mask).shape) != tuple(tokens.shape):
        raise ValueError(f"{name} must have the shape of its tokens {tuple(tokens.shape)}, "
                         f"got {tuple(torch.as_tensor(mask).shape)}")


def _device_tokens(model, tokens) -> Tensor:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be a token tensor [b, p], got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    return tokens.to(model.W_E.device)


# ---------------------------------------------------------------------- factories
def zero_ablation_hooks(model, hook: str, layers=None, heads: Features = None, channels: Features = None,
                        positions: PositionSpec = None) -> List[Hook]:
    """Hooks that set ``blocks.{l}.{hook}`` to zero at the chosen positions and features.

    Args:
        hook: a per-block hook (``"y"``, ``"delta"``, ``"h"``, ``"mixer_out"`` ...).
        layers: None = all layers (or the keys of a ``heads``/``channels`` mapping).
        heads: Mamba-2 heads (on hooks with a head axis); channels: Mamba-1 ``d_inner``
            channels. A list applies to every layer; a mapping ``{layer: list or None}``
            picks per layer. None = every feature.
        positions: None (all), ints, or a bool mask ``[p]`` / ``[b, p]``.

    Returns:
        ``[(name, fn)]`` for ``run_with_hooks``.
    """
    name = resolve_hook(model, hook)
    per_layer, axis = _layer_features(model, name, layers, heads, channels)
    positions = reusable(positions)

    def make(features, first: bool):
        def zero_ablate(act: Tensor, hook) -> Tensor:
            return _masked_replace(act, 0.0, _ablation_mask(model, act, positions, first), axis, features)
        return zero_ablate

    return [(f"blocks.{layer}.{name}", make(features, i == 0)) for i, (layer, features) in enumerate(per_layer.items())]


def mean_activations(model, tokens: Tensor, hook: str, layers=None, *, per_position: bool = False,
                     attention_mask: Optional[Tensor] = None, batch_size: int = 32) -> Dict[int, Tensor]:
    """Mean of ``blocks.{l}.{hook}`` over a reference batch: ``{layer: mean}``.

    The mean is over rows and positions (shape ``act.shape[2:]``), or over rows only
    with ``per_position`` (shape ``[p, *act.shape[2:]]``: entry t is the mean of each
    prompt's token t, counted from its first real token, so left and right padding give the
    same means; ``p`` is then the longest reference prompt's length, as places past it have no
    token to average, and ablating one is a ``ValueError``). Padding (``attention_mask`` 0;
    without one, the padding the forward infers and trailing pad tokens) is left out.
    """
    name = resolve_hook(model, hook)
    layer_list = _stats_layers(model, layers, batch_size)
    tokens = _device_tokens(model, tokens)
    attention_mask = _real_positions(model, tokens, attention_mask)
    names = [f"blocks.{layer}.{name}" for layer in layer_list]
    sums: Dict[str, Tensor] = {}
    dtypes: Dict[str, torch.dtype] = {}
    count: Union[Tensor, float] = 0.0
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            chunk = tokens[start:start + batch_size]
            mask = None if attention_mask is None else attention_mask[start:start + batch_size]
            _, cache = model.run_with_cache(chunk, names_filter=names, attention_mask=mask, return_type=None,
                                            stop_at_layer=max(layer_list) + 1)
            weight = torch.ones(chunk.shape, dtype=torch.float64, device=chunk.device) if mask is None \
                else mask.to(torch.float64)
            index = None
            if per_position and mask is not None:  # each prompt's token t at t (left padding moved away)
                index, held = _token_order(mask)
                weight = held.to(torch.float64)
            for n in names:
                dtypes[n] = cache[n].dtype
                act = _in_token_order(cache[n].to(torch.float64), index)
                w = weight.reshape(*weight.shape, *([1] * (act.dim() - 2)))
                total = (act * w).sum(0) if per_position else (act * w).sum((0, 1))
                sums[n] = total if n not in sums else sums[n] + total
            count = count + (weight.sum(0) if per_position else weight.sum())
    if not sums:
        raise ValueError("mean_activations needs at least one reference prompt")
    out = {}
    # per position: places no reference prompt reaches (the padded width past the longest prompt) are
    # cut, so that ablating such a place raises instead of taking a mean of nothing
    covered = int((count > 0).sum()) if per_position else None
    for layer, n in zip(layer_list, names):
        c = count.clamp(min=1) if isinstance(count, Tensor) else max(count, 1.0)
        if isinstance(c, Tensor) and per_position:
            c = c.reshape(-1, *([1] * (sums[n].dim() - 1)))
        out[layer] = (sums[n] / c).to(dtypes[n])[:covered]
    return out


def mean_ablation_hooks(model, hook: str, reference_tokens: Optional[Tensor] = None, layers=None,
                        heads: Features = None, channels: Features = None, positions: PositionSpec = None, *,
                        per_position: bool = False, reference_attention_mask: Optional[Tensor] = None,
                        means: Optional[Mapping[int, Tensor]] = None, batch_size: int = 32) -> List[Hook]:
    """Hooks that replace ``blocks.{l}.{hook}`` by its mean over a reference batch at the chosen
    positions and features (see :func:`zero_ablation_hooks` for ``layers``, ``heads``,
    ``channels``, ``positions``).

    The mean (:func:`mean_activations`) is over the rows and real positions of
    ``reference_tokens``, or per position with ``per_position`` (each prompt's token t takes the
    mean of the reference prompts' tokens t, padding on either side of either batch left out, as
    :func:`resample_ablation_hooks` lines places up; ablating a token past the reference's
    length is a ``ValueError``). ``means`` (``{layer: mean}``) skips the reference run; giving
    both is a ``ValueError``.
    """
    name = resolve_hook(model, hook)
    per_layer, axis = _layer_features(model, name, layers, heads, channels)
    if means is not None and (reference_tokens is not None or reference_attention_mask is not None):
        raise ValueError("mean ablation takes reference_tokens (to compute the means) or means= (precomputed), "
                         "not both: the reference prompts would be ignored")
    if means is None:
        if reference_tokens is None:
            raise ValueError("mean ablation needs reference_tokens (or precomputed means={layer: mean})")
        _check_mask_of(reference_attention_mask, reference_tokens, "reference_attention_mask")
        means = mean_activations(model, reference_tokens, name, list(per_layer), per_position=per_position,
                                 attention_mask=reference_attention_mask, batch_size=batch_size)
    missing = [layer for layer in per_layer if layer not in means]
    if missing:
        raise ValueError(f"means has no entry for layers {missing}")
    positions = reusable(positions)

    def make(features, mean: Tensor, first: bool):
        def mean_ablate(act: Tensor, hook) -> Tensor:
            if mean.dim() == act.dim() - 1:  # per position: [p_ref, ...]
                return _replace_by_place(model, act, mean[None], positions, axis, features,
                                         "the per-position means (reference prompts)", warn=first)[0]
            if tuple(mean.shape) != tuple(act.shape[2:]):
                raise ValueError(f"the mean of {hook.name} has shape {tuple(mean.shape)}, the activation "
                                 f"{tuple(act.shape)}")
            return _masked_replace(act, mean, _ablation_mask(model, act, positions, first), axis, features)
        return mean_ablate

    return [(f"blocks.{layer}.{name}", make(features, means[layer], i == 0))
            for i, (layer, features) in enumerate(per_layer.items())]


def resample_ablation_hooks(model, hook: str, source_tokens: Tensor, layers=None, heads: Features = None,
                            channels: Features = None, positions: PositionSpec = None, *,
                            source_rows: Optional[Sequence[int]] = None, seed: int = 0,
                            source_attention_mask: Optional[Tensor] = None) -> List[Hook]:
    """Hooks that replace ``blocks.{l}.{hook}`` by its value on other prompts (resample ablation).

    ``source_tokens [b_s, p]`` are run once (no hooks); in a run of ``b`` rows, row i
    takes the activations of source row ``source_rows[i]``. By default that is row i
    when ``b_s == b`` (pass other prompts, aligned), else a seeded random draw
    (``seed``; the same rows on every forward of that batch size). Each prompt's token t takes
    its source prompt's token t, counted from each one's first real token, so padding on either
    side of either batch lines up (a causal model's activation there depends on tokens up to t
    only, so a shorter run, or a generate step, lines up with the sources' prefix); ablating a
    token past the sources' length ``p`` is a ``ValueError``. See
    :func:`zero_ablation_hooks` for the other arguments.
    """
    name = resolve_hook(model, hook)
    per_layer, axis = _layer_features(model, name, layers, heads, channels)
    source_tokens = _device_tokens(model, source_tokens)
    _check_mask_of(source_attention_mask, source_tokens, "source_attention_mask")
    source_mask = _real_positions(model, source_tokens, source_attention_mask)
    names = [f"blocks.{layer}.{name}" for layer in per_layer]
    with torch.no_grad():
        _, cache = model.run_with_cache(source_tokens, names_filter=names, attention_mask=source_mask,
                                        return_type=None, stop_at_layer=max(per_layer) + 1)
    index = _token_order(source_mask)[0]
    sources = {n: _in_token_order(cache[n], index) for n in names}  # each prompt's token t at place t
    b_s, p_s = source_tokens.shape
    # each source prompt's real tokens: a run token past its source's last one has nothing to take
    lengths = torch.full((b_s,), p_s) if source_mask is None else source_mask.bool().sum(1).cpu()
    positions = reusable(positions)
    fixed = None
    if source_rows is not None:  # ints in [0, b_s) (1.5 is refused, not truncated)
        fixed = torch.tensor(check_indices(source_rows, b_s, "source_rows"), dtype=torch.long)

    def rows_for(b: int, device) -> Tensor:
        if fixed is not None:
            if fixed.numel() != b:
                raise ValueError(f"source_rows has {fixed.numel()} entries, the run {b} rows")
            return fixed.to(device)
        if b == b_s:
            return torch.arange(b, device=device)
        generator = torch.Generator().manual_seed(int(seed))
        return torch.randint(b_s, (b,), generator=generator).to(device)

    warned = []  # at most one warning per set of hooks

    def make(features, source: Tensor, first: bool):
        def resample_ablate(act: Tensor, hook) -> Tensor:
            rows = rows_for(act.shape[0], source.device)
            out, replaced = _replace_by_place(model, act, source[rows], positions, axis, features,
                                              "the source prompts", lengths=lengths[rows.cpu()], warn=first)
            if not warned and out is not act and _warn_if_resampled_from_itself(act, out, replaced, hook.name):
                warned.append(True)
            return out
        return resample_ablate

    return [(n, make(features, sources[n], i == 0)) for i, (n, features) in enumerate(zip(names, per_layer.values()))]


def ablation_hooks(model, hook: str, kind: str = "zero", layers=None, heads: Features = None,
                   channels: Features = None, positions: PositionSpec = None, **kwargs) -> List[Hook]:
    """:func:`zero_ablation_hooks`, :func:`mean_ablation_hooks` (``reference_tokens=`` or ``means=``,
    ``per_position=``) or :func:`resample_ablation_hooks` (``source_tokens=``, ``source_rows=``,
    ``seed=``) by ``kind``."""
    if kind == "zero":
        if kwargs:
            raise ValueError(f"zero ablation takes no {', '.join(sorted(kwargs))}")
        return zero_ablation_hooks(model, hook, layers, heads, channels, positions)
    if kind == "mean":
        return mean_ablation_hooks(model, hook, kwargs.pop("reference_tokens", None), layers, heads, channels,
                                   positions, **kwargs)
    if kind == "resample":
        if "source_tokens" not in kwargs:
            raise ValueError("resample ablation needs source_tokens (the prompts to take activations from)")
        return resample_ablation_hooks(model, hook, kwargs.pop("source_tokens"), layers, heads, channels,
                                       positions, **kwargs)
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def ablate(model, tokens: Tensor, hook: str, kind: str = "zero", layers=None, heads: Features = None,
           channels: Features = None, positions: PositionSpec = None, *, attention_mask: Optional[Tensor] = None,
           fwd_hooks: Sequence[Hook] = (), return_type: Optional[str] = "logits", **kwargs):
    """Run ``tokens`` with an ablation (:func:`ablation_hooks`) plus any ``fwd_hooks``; returns the
    model's output (``return_type`` as ``model.forward``)."""
    hooks = ablation_hooks(model, hook, kind, layers, heads, channels, positions, **kwargs)
    return model.run_with_hooks(_device_tokens(model, tokens), fwd_hooks=list(fwd_hooks) + hooks,
                                attention_mask=attention_mask, return_type=return_type)


# -------------------------------------------------------------- token classes
_NEWLINE_CACHE: Dict[int, Tuple[Any, List[int]]] = {}


def _newline_ids(model) -> List[int]:
    tok = model.tokenizer
    if tok is None:
        raise ValueError("token_class='newline' needs a tokenizer (model.tokenizer is None); pass token ids instead")
    cached = _NEWLINE_CACHE.get(id(tok))
    if cached is not None and cached[0] is tok:
        return cached[1]
    ids = []
    for piece, i in tok.get_vocab().items():
        if piece in ("\n", "<0x0A>", "Ċ", "<nl>") or (piece and set(piece) <= {"Ċ"}):
            ids.append(int(i))
            continue
        try:
            text = tok.decode([i])
        except Exception:  # noqa: BLE001 - a tokenizer that cannot decode one id has no newline we can find
            continue
        if "\n" in text and not text.strip():
            ids.append(int(i))
    ids = sorted(set(ids))
    _NEWLINE_CACHE[id(tok)] = (tok, ids)
    return ids


def _bos_id(model) -> int:
    try:
        return model._bos_id()
    except ValueError:
        raise ValueError("token_class='bos' needs a BOS id: neither the tokenizer nor the config has one") from None


def token_class_mask(model, tokens: Tensor, token_class: TokenClass,
                     attention_mask: Optional[Tensor] = None) -> Tensor:
    """Where the tokens of a class are: a bool ``[b, p]`` mask.

    ``token_class``: ``"bos"`` (the BOS id of the tokenizer, else of the config),
    ``"newline"`` (every vocabulary entry that decodes to whitespace containing a
    newline), an id, a list of ids or of token strings (looked up in the
    tokenizer's vocabulary), an int tensor of ids, a bool mask ``[b, p]`` (or
    ``[p]``), or a function ``tokens -> bool [b, p]``. Padding (``attention_mask`` 0)
    is never in a class. Ids outside the vocabulary ``[0, d_vocab)`` are a ``ValueError``
    (no token can have them, so the class would be empty).
    """
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [b, p], got shape {tuple(tokens.shape)}")
    if callable(token_class) and not isinstance(token_class, (str, Tensor)):
        mask = torch.as_tensor(token_class(tokens))
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(tokens.shape):
            raise ValueError(f"a token_class function must return a bool mask of shape {tuple(tokens.shape)}, got "
                             f"{mask.dtype} {tuple(mask.shape)}")
    elif isinstance(token_class, Tensor) and token_class.dtype == torch.bool:
        mask = token_class.to(tokens.device)
        if mask.dim() == 1 and mask.shape[0] == tokens.shape[1]:
            mask = mask[None].expand_as(tokens)
        if tuple(mask.shape) != tuple(tokens.shape):
            raise ValueError(f"a token_class mask must have shape {tuple(tokens.shape)}, got {tuple(mask.shape)}")
    else:
        if isinstance(token_class, str):
            if token_class == "bos":
                ids = [_bos_id(model)]
            elif token_class == "newline":
                ids = _newline_ids(model)
                if not ids:
                    raise ValueError("token_class='newline': the tokenizer has no newline token")
            else:
                raise ValueError(f"token_class {token_class!r}: expected 'bos', 'newline', token ids, a list of "
                                 "token strings, a bool mask [b, p] or a function of the tokens")
        elif isinstance(token_class, Tensor):
            ids = token_class.reshape(-1).tolist()
            if tuple(token_class.shape) == tuple(tokens.shape) and set(ids) <= {0, 1}:
                import warnings

                warnings.warn(f"token_class is an integer tensor of the tokens' shape {tuple(tokens.shape)} holding "
                              "only 0 and 1: it is read as the token ids 0 and 1, not as positions; for a mask of "
                              "positions pass it as bool (token_class.bool())", UserWarning,
                              stacklevel=caller_stacklevel())
        elif isinstance(token_class, int) and not isinstance(token_class, bool):
            ids = [token_class]
        elif isinstance(token_class, (list, tuple, set, frozenset, range)):
            ids = []
            for item in token_class:
                if isinstance(item, str):
                    vocab = None if model.tokenizer is None else model.tokenizer.get_vocab()
                    if vocab is None or item not in vocab:
                        raise ValueError(f"token_class: {item!r} is not a token of the tokenizer's vocabulary")
                    ids.append(int(vocab[item]))
                elif isinstance(item, int) and not isinstance(item, bool):
                    ids.append(item)
                else:
                    raise ValueError(f"token_class entries must be token ids or token strings, got {item!r}")
        else:
            raise ValueError(f"token_class {token_class!r}: expected 'bos', 'newline', token ids, a bool mask [b, p] "
                             "or a function of the tokens")
        d_vocab = model.cfg.d_vocab
        outside = sorted({int(i) for i in ids if not 0 <= int(i) < d_vocab})
        if outside:
            raise ValueError(f"token_class ids {outside[:8]}{' ...' if len(outside) > 8 else ''} are outside the "
                             f"vocabulary (d_vocab={d_vocab}: ids lie in [0, {d_vocab})), so no token can match "
                             "them; pass ids of this model's vocabulary (model.to_single_token(...) finds one)")
        mask = torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))
    if attention_mask is not None:
        mask = mask & torch.as_tensor(attention_mask, device=mask.device).bool()
    return mask


def class_conditional_ablation_hooks(model, tokens: Tensor, layer_heads: Mapping[int, Any],
                                     token_class: TokenClass = "bos", hook: str = "delta", kind: str = "zero", *,
                                     attention_mask: Optional[Tensor] = None,
                                     reference_tokens: Optional[Tensor] = None,
                                     reference_attention_mask: Optional[Tensor] = None,
                                     means: Optional[Mapping[int, Tensor]] = None) -> List[Hook]:
    """Ablate chosen heads only at the positions of one token class (the state-sink experiment).

    Args:
        tokens: the ``[b, p]`` batch the hooks will run on (the mask is per row, so the
            hooks fit this batch only; build them per batch, or use
            :func:`class_conditional_hook_factory`).
        layer_heads: ``{layer: heads}`` (Mamba-2) or ``{layer: channels}`` (Mamba-1);
            None for every feature of that layer.
        token_class: see :func:`token_class_mask` (default ``"bos"``).
        hook: default ``"delta"``. Mamba-2's Δ is shared by all channels of a head, and
            zeroing it at a position means the head neither decays nor writes its
            state there (the state passes through unchanged), which is how the state
            sink paper's BOS-specialist heads are implicated. Any hook with a head /
            channel axis works (``"y"`` to silence the head's output instead).
        kind: ``"zero"`` or ``"mean"``: the mean of the hook over every real position of
            ``reference_tokens`` (default ``tokens`` with ``attention_mask``), or ``means``.
        attention_mask: padding of ``tokens`` (padding is never in the class).
        reference_tokens, reference_attention_mask: ``kind="mean"``: the prompts the means are
            taken over, and their padding.
        means: ``kind="mean"``: ``{layer: mean}`` given instead (no reference run).

    Returns:
        ``[(name, fn)]`` hooks that change ``blocks.{l}.{hook}`` only at
        ``token_class_mask(tokens)`` positions and the chosen features.
    """
    if not isinstance(layer_heads, Mapping) or not layer_heads:
        raise ValueError("layer_heads must be a non-empty mapping {layer: heads (Mamba-2) or channels (Mamba-1)}")
    tokens = _device_tokens(model, tokens)
    mask = token_class_mask(model, tokens, token_class, attention_mask)
    key = "channels" if model.cfg.family == "mamba1" else "heads"
    features = {key: dict(layer_heads)}
    if kind == "zero":
        return zero_ablation_hooks(model, hook, positions=mask, **features)
    if kind == "mean":
        if means is None and reference_tokens is None:
            reference_tokens, reference_attention_mask = tokens, attention_mask
        return mean_ablation_hooks(model, hook, reference_tokens, positions=mask, means=means,
                                   reference_attention_mask=reference_attention_mask, **features)
    raise ValueError(f"class-conditional ablation kind must be 'zero' or 'mean', got {kind!r}")


def class_conditional_hook_factory(model, layer_heads: Mapping[int, Any], token_class: TokenClass = "bos",
                                   hook: str = "delta", kind: str = "zero", *,
                                   reference_tokens: Optional[Tensor] = None,
                                   reference_attention_mask: Optional[Tensor] = None,
                                   means: Optional[Mapping[int, Tensor]] = None) -> Callable[..., List[Hook]]:
    """``tokens [, attention_mask] -> hooks``: :func:`class_conditional_ablation_hooks` built per batch
    (for :func:`needle_accuracy` and other loops over batches). ``kind="mean"`` needs
    ``reference_tokens`` (the means are computed once here) or ``means``: a mean taken over each
    batch would make a prompt's result depend on the batch it falls in."""
    if kind == "mean" and means is None and reference_tokens is None:
        raise ValueError("class_conditional_hook_factory(kind='mean') needs reference_tokens (or means): the means "
                         "are taken once from them, since a mean over each batch would make a prompt's result depend "
                         "on the batch size and on which prompts share its batch")
    if kind == "mean" and means is None:
        name = resolve_hook(model, hook)
        _check_mask_of(reference_attention_mask, reference_tokens, "reference_attention_mask")
        means = mean_activations(model, reference_tokens, name, [int(k) for k in layer_heads],
                                 attention_mask=reference_attention_mask)

    def factory(tokens: Tensor, attention_mask: Optional[Tensor] = None) -> List[Hook]:
        return class_conditional_ablation_hooks(model, tokens, layer_heads, token_class, hook, kind,
                                                attention_mask=attention_mask, means=means)

    return factory


# ------------------------------------------------------------- Δ statistics
def class_masks(model, tokens: Tensor, classes: Mapping[str, TokenClass], attention_mask: Optional[Tensor] = None,
                include_other: bool = True) -> Tuple[Tensor, Optional[Tensor], List[str], Tensor]:
    """The positions of each named token class, for statistics by class: ``(tokens, attention_mask)``
    on the model's device, the class names (with ``"other"``: real positions in none of the classes,
    when ``include_other``) and their float64 masks ``[C, b, p]``. Resolved once for the whole batch,
    as a mask class covers all of it; padding is in no class (``attention_mask``, or when None the
    padding the forward infers from pad tokens, which is returned). ``ValueError`` for an empty mapping,
    a class named ``"other"`` beside ``include_other``, or a mask of another shape than ``tokens``."""
    if not isinstance(classes, Mapping) or not classes:
        raise ValueError("classes must be a non-empty mapping {name: token class}")
    if include_other and "other" in classes:
        raise ValueError("a class is named 'other', which include_other=True adds: rename it or pass include_other=False")
    tokens = _device_tokens(model, tokens)
    attention_mask = _real_positions(model, tokens, attention_mask)
    names = list(classes) + (["other"] if include_other else [])
    masks = [token_class_mask(model, tokens, cls, attention_mask) for cls in classes.values()]
    if include_other:
        real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        masks.append(real & ~torch.stack(masks).any(0))
    return tokens, attention_mask, names, torch.stack(masks).to(torch.float64)


def delta_stats_by_class(model, tokens: Tensor, classes: Mapping[str, TokenClass], *,
                         attention_mask: Optional[Tensor] = None, layers=None, channel_groups: Optional[int] = None,
                         include_other: bool = True, batch_size: int = 32, progress: bool = True, fwd_hooks=()):
    """Per-head Δ and decay rate at the positions of each token class (to find state-sink heads).

    For every layer, head and class: the mean of Δ (``hook_delta``) and of the decay
    rate Δ·|A| (the state keeps exp(−Δ|A|) per step) over the class's positions.

    Mamba-1 has no heads: ``channel_groups=G`` (default 1) splits ``d_inner`` into ``G``
    contiguous, equal groups (``G`` must divide ``d_inner``; see
    :func:`tl_mamba.circuits.patching.channel_group_slices`) and reports the mean over
    each group's channels (|A| of a channel is its mean over the state entries, so the
    rate is the mean of Δ·|A| over channels and entries).
    ``channel_groups`` on Mamba-2 is a ``ValueError``.

    Args:
        tokens: ``[b, p]``.
        classes: ``{name: token class}`` (see :func:`token_class_mask`: ``"bos"``,
            ``"newline"``, ids, token strings, a bool mask ``[b, p]``, a function).
            Classes may overlap.
        attention_mask: padding is in no class.
        layers: None = all; a layer named twice counts once.
        channel_groups: Mamba-1 only, ``G`` (above).
        include_other: add a class ``"other"``: real positions in none of the classes.
        batch_size: prompts per forward.
        progress: a tqdm bar over the batches.
        fwd_hooks: hooks to run every batch under (an ablation, a patch: the statistic of the
            edited model), or a function ``tokens [b, p] -> hooks`` (given ``attention_mask=``
            too if it takes it) called per batch, such as a
            ``class_conditional_hook_factory``; as :func:`needle_accuracy` takes them.

    Returns:
        A pandas DataFrame, one row per (layer, head, class): ``layer``, ``head`` (head,
        or channel-group index for Mamba-1), ``class``, ``count`` (positions),
        ``mean_delta``, ``mean_decay`` (mean Δ·|A|) and ``rel_delta`` (``mean_delta``
        over the head's mean Δ on all real positions; > 1: Δ is larger on this class).
        Mamba-1 rows also carry ``channels`` ``(start, stop)``. NaN where count is 0.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    cfg = model.cfg
    mamba1 = cfg.family == "mamba1"
    if not mamba1 and channel_groups is not None:
        raise ValueError("channel_groups apply to Mamba-1; Mamba-2 statistics are per head already")
    layer_list = _stats_layers(model, layers, batch_size)
    tokens, attention_mask, names, masks = class_masks(model, tokens, classes, attention_mask, include_other)
    device = tokens.device
    real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()

    if mamba1:
        groups = channel_group_slices(cfg.d_inner, 1 if channel_groups is None else channel_groups)
        pool = torch.zeros(cfg.d_inner, len(groups), dtype=torch.float64, device=device)
        for g, (a, z) in enumerate(groups):
            pool[a:z, g] = 1.0 / (z - a)
    n_features = len(groups) if mamba1 else cfg.n_heads
    abs_a = {}
    for layer in layer_list:
        a = torch.exp(model.blocks[layer].mixer.A_log.detach().to(device, torch.float64))
        abs_a[layer] = a.mean(-1) if mamba1 else a  # [e] or [h]
    hook_names = {layer: f"blocks.{layer}.hook_delta" for layer in layer_list}
    C = masks.shape[0]
    sum_delta = {layer: torch.zeros(C, n_features, dtype=torch.float64, device=device) for layer in layer_list}
    sum_decay = {layer: torch.zeros(C, n_features, dtype=torch.float64, device=device) for layer in layer_list}
    sum_all = {layer: torch.zeros(n_features, dtype=torch.float64, device=device) for layer in layer_list}
    counts = masks.sum((1, 2))
    n_real = real.sum().to(torch.float64)
    with torch.no_grad():
        starts = range(0, tokens.shape[0], batch_size)
        for start in tqdm(starts, desc="delta stats", disable=not progress, leave=False, unit="batch"):
            chunk = tokens[start:start + batch_size]
            mask = None if attention_mask is None else attention_mask[start:start + batch_size]
            cache = _batch_cache(model, chunk, mask, list(hook_names.values()), max(layer_list) + 1, fwd_hooks)
            m = masks[:, start:start + batch_size]
            r = real[start:start + batch_size].to(torch.float64)
            for layer in layer_list:
                delta = cache[hook_names[layer]].to(torch.float64)  # [b, p, e] or [b, p, h]
                decay = delta * abs_a[layer]
                if mamba1:
                    delta, decay = delta @ pool, decay @ pool
                sum_delta[layer] += torch.einsum("cbp,bpf->cf", m, delta)
                sum_decay[layer] += torch.einsum("cbp,bpf->cf", m, decay)
                sum_all[layer] += torch.einsum("bp,bpf->f", r, delta)
    records = []
    for layer in layer_list:
        overall = (sum_all[layer] / n_real).cpu()
        for ci, cname in enumerate(names):
            count = float(counts[ci])
            for f in range(n_features):
                mean_delta = float(sum_delta[layer][ci, f] / count) if count else float("nan")
                mean_decay = float(sum_decay[layer][ci, f] / count) if count else float("nan")
                row = dict(layer=layer, head=f, **{"class": cname}, count=int(count), mean_delta=mean_delta,
                           mean_decay=mean_decay,
                           rel_delta=mean_delta / float(overall[f]) if float(overall[f]) else float("nan"))
                if mamba1:
                    row["channels"] = groups[f]
                records.append(row)
    return pd.DataFrame.from_records(records)


LOSS_BY = ("target", "context")


def loss_by_class(model, tokens: Tensor, classes: Mapping[str, TokenClass], *, by: str = "target",
                  attention_mask: Optional[Tensor] = None, include_other: bool = True, batch_size: int = 32,
                  progress: bool = True, fwd_hooks=()):
    """Next-token loss and accuracy by token class: where the model needs a head (the execution side).

    The state-sink study asks which *predictions* a set of heads supports (BOS-context and
    newline-target predictions): run this clean and under an ablation (``fwd_hooks=``) and
    compare the rows. The prediction made at position t (of token t+1) is counted for the
    class of token t+1 (``by="target"``) or of token t (``by="context"``); a prediction
    whose context or target is padding is not counted.

    Args:
        tokens: ``[b, p]``, ``p >= 2``.
        classes: ``{name: token class}`` (see :func:`token_class_mask`: ``"bos"``,
            ``"newline"``, ids, token strings, a bool mask ``[b, p]``, a function).
            Classes may overlap.
        by: ``"target"`` or ``"context"`` (above).
        attention_mask: ``[b, p]`` padding (1 = real token). When None, the padding the
            forward infers from pad tokens: leading runs when the tokenizer pads on the left,
            else each row's trailing run (``to_tokens``' default right padding). Left padding
            made with ``to_tokens(..., padding_side="left")`` needs its mask here (the forward
            warns otherwise, and the pads would be counted as tokens).
        include_other: add a class ``"other"``: predictions whose target (context) is in
            none of the classes.
        batch_size: prompts per forward.
        progress: a tqdm bar over the batches.
        fwd_hooks: hooks to run every batch under, or a function ``tokens [b, p] -> hooks``
            (given ``attention_mask=`` too if it takes it) called per batch, such as a
            ``class_conditional_hook_factory``; as :func:`needle_accuracy` takes them.

    Returns:
        A pandas DataFrame, one row per class: ``class``, ``by``, ``count`` (predictions),
        ``loss`` (mean negative log-likelihood of the next token, nats, computed from the
        logits in float64, one prompt at a time) and ``accuracy`` (share whose top logit is the next
        token; ties count as right). NaN where count is 0.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if by not in LOSS_BY:
        raise ValueError(f"by must be one of {LOSS_BY} (count a prediction for its next token's class or its "
                         f"own token's), got {by!r}")
    check_batch_size(batch_size)
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be [b, p] with p >= 2 (a prediction needs a next token), got shape "
                         f"{tuple(tokens.shape)}")
    tokens, attention_mask, names, masks = class_masks(model, tokens, classes, attention_mask, include_other)
    real = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    predicted = real[:, :-1] & real[:, 1:]  # [b, p-1]: context and target both real tokens
    # the class of each prediction, at its target (t+1) or its context (t); [C, b, p-1]
    counted = (masks[:, :, 1:] if by == "target" else masks[:, :, :-1]) * predicted.to(torch.float64)
    C = masks.shape[0]
    total_loss = torch.zeros(C, dtype=torch.float64, device=tokens.device)
    total_right = torch.zeros(C, dtype=torch.float64, device=tokens.device)
    with torch.no_grad():
        starts = range(0, tokens.shape[0], batch_size)
        for start in tqdm(starts, desc="loss by class", disable=not progress, leave=False, unit="batch"):
            chunk = tokens[start:start + batch_size]
            mask = None if attention_mask is None else attention_mask[start:start + batch_size]
            logits = model.run_with_hooks(chunk, fwd_hooks=_hooks_for(fwd_hooks, chunk, mask),
                                          attention_mask=mask, return_type="logits")[:, :-1]
            nexts = chunk[:, 1:, None]
            nll = torch.empty(nexts.shape[:2], dtype=torch.float64, device=tokens.device)  # [b, p-1]
            for row in range(len(chunk)):  # float64 one row at a time: the batch's copy would be 2x its logits
                row_logits = logits[row].to(torch.float64)  # [p-1, v]
                nll[row] = torch.logsumexp(row_logits, -1) - row_logits.gather(-1, nexts[row])[:, 0]
            right = (logits.gather(-1, nexts)[..., 0] >= logits.max(-1).values).to(torch.float64)
            weights = counted[:, start:start + batch_size]
            total_loss += torch.einsum("cbp,bp->c", weights, nll)
            total_right += torch.einsum("cbp,bp->c", weights, right)
    counts = counted.sum((1, 2))
    records = []
    for ci, cname in enumerate(names):
        count = float(counts[ci])
        records.append({"class": cname, "by": by, "count": int(count),
                        "loss": float(total_loss[ci] / count) if count else float("nan"),
                        "accuracy": float(total_right[ci] / count) if count else float("nan")})
    return pd.DataFrame.from_records(records)


# ------------------------------------------------------------- needle harness
def _parameters(fn) -> list:
    """``fn``'s parameters (empty where its signature cannot be read)."""
    import inspect

    try:
        return list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []


def _takes_attention_mask(fn) -> bool:
    return any(p.name == "attention_mask" or p.kind == p.VAR_KEYWORD for p in _parameters(fn))


def _required_positional(fn) -> int:
    """How many positional parameters ``fn`` requires (0 where its signature cannot be read)."""
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
               for p in _parameters(fn))


def _hook_list(hooks, what: str) -> List[Hook]:
    """``hooks`` as a list of ``(name or filter, fn)`` pairs; ``ValueError`` naming ``what`` otherwise
    (a lone pair, say, whose name would be unpacked as a hook)."""
    if isinstance(hooks, tuple) and len(hooks) == 2 and isinstance(hooks[0], str) and callable(hooks[1]):
        raise ValueError(f"{what} is one (name, fn) pair; pass a list of pairs: [({hooks[0]!r}, fn)]")
    try:
        pairs = list(hooks)
    except TypeError:
        raise ValueError(f"{what} must be a list of (hook name, hook fn) pairs or a function of the tokens, got "
                         f"{type(hooks).__name__}") from None
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and (isinstance(pair[0], str) or callable(pair[0]))
                and callable(pair[1])):
            raise ValueError(f"{what} must hold (hook name, hook fn) pairs, got {pair!r}")
    return pairs


def _hooks_for(fwd_hooks, tokens: Tensor, attention_mask: Optional[Tensor]) -> List[Hook]:
    """``fwd_hooks`` for one batch: the hooks themselves (None: none), or a function
    ``tokens [b, p] -> hooks`` (taking ``attention_mask=`` too if it has an argument of that
    name, or ``**kwargs``) called with this batch."""
    if fwd_hooks is None:
        return []
    if not callable(fwd_hooks):
        return _hook_list(fwd_hooks, "fwd_hooks")
    if _takes_attention_mask(fwd_hooks):
        return _hook_list(fwd_hooks(tokens, attention_mask=attention_mask), "what the fwd_hooks function returned")
    if _required_positional(fwd_hooks) > 1:
        raise ValueError("a fwd_hooks function is called with the batch's tokens, and with attention_mask= by that "
                         "name when it has such an argument; this one requires more positional arguments: name the "
                         "second one attention_mask (def hooks(tokens, attention_mask=None))")
    return _hook_list(fwd_hooks(tokens), "what the fwd_hooks function returned")


def _batch_cache(model, tokens: Tensor, attention_mask: Optional[Tensor], names, stop_at_layer: int, fwd_hooks=()):
    """The cache of ``names`` for one batch of a statistic, run under ``fwd_hooks`` (see :func:`_hooks_for`):
    a statistic of an ablated or patched model."""
    with model.hooks(fwd_hooks=_hooks_for(fwd_hooks, tokens, attention_mask)):
        return model.run_with_cache(tokens, names_filter=names, attention_mask=attention_mask, return_type=None,
                                    stop_at_layer=stop_at_layer)[1]


class _HookedModel:
    """Calls ``model.run_with_hooks`` with hooks (fixed, or built from each batch's tokens);
    everything else is the model's, so ``tl_mamba.toy.tasks.evaluate`` can run it."""

    def __init__(self, model, fwd_hooks):
        self._model = model
        self._fwd_hooks = fwd_hooks

    def __call__(self, tokens: Tensor, attention_mask: Optional[Tensor] = None, **kwargs):
        return self._model.run_with_hooks(tokens, fwd_hooks=_hooks_for(self._fwd_hooks, tokens, attention_mask),
                                          attention_mask=attention_mask, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)


def needle_accuracy(model, lengths: Sequence[int] = (64, 128, 256), n: int = 100, seed: int = 0, *,
                    fwd_hooks: Union[Sequence[Hook], Callable[..., Sequence[Hook]]] = (), batch_size: int = 32,
                    split: str = "heldout", progress: bool = True, **needle_kw) -> Dict[int, float]:
    """Needle-in-a-haystack accuracy against length, under hooks: ``{length: accuracy}``.

    The toy key-value task (:func:`tl_mamba.toy.tasks.make_needle`), ``n`` prompts of
    exactly ``length`` tokens per length, scored as the toy models are
    (:func:`tl_mamba.toy.tasks.needle_accuracy_by_length`: argmax at the last prompt
    token == the value); ``tl_mamba.toy.train.evaluate_model`` reports the same numbers
    with ``seed = training seed + 1`` and ``split="heldout"``.

    Args:
        model: a model with the toy tokenizer (``tl_mamba.from_pretrained("toy-mamba2")``).
        fwd_hooks: hooks for every batch, or a function ``tokens [b, p] -> hooks`` (it may
            also take ``attention_mask=``) called per batch, for hooks that depend on
            the tokens (:func:`class_conditional_hook_factory`). Knockouts apply with
            ``with model.knockouts(ko): needle_accuracy(...)``.
        batch_size, split, progress: batching, ``"heldout"``/``"train"`` prompts, tqdm bars.
        needle_kw: ``depth``, ``n_pairs``, ``max_pairs`` of ``make_needle``.
    """
    from tl_mamba.toy import tasks as toy_tasks
    from tl_mamba.toy import vocab as toy_vocab

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    toy_vocab.check_tokenizer(getattr(model, "tokenizer", None), "needle_accuracy")
    for length in lengths:  # every length before the first is run
        toy_tasks.check_needle_length(length)
    runner = _HookedModel(model, fwd_hooks if callable(fwd_hooks) else list(fwd_hooks))
    return toy_tasks.needle_accuracy_by_length(runner, lengths=lengths, n=n, seed=seed, split=split,
                                               batch_size=batch_size, progress=progress, **needle_kw)
