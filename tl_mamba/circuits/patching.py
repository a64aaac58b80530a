"""Activation patching of any Mamba hook: by layer × position, by head (Mamba-2), by channel group (Mamba-1).

The convention is ``transformer_lens.patching``'s: run the CORRUPTED input and
patch in the CLEAN run's activation at one index at a time (a layer and a
position, a layer and a head, ...), then record ``metric(patched_logits)``. A
metric that measures how much of the clean behaviour is recovered (a logit
difference, the answer's probability) is high where the patched activation
carries the information the corruption removed.

    from tl_mamba.circuits.patching import patch_layer_position, patch_heads

    def metric(logits):                                # [b, p, v] -> scalar
        return (logits[:, -1, good] - logits[:, -1, bad]).mean()

    patch_layer_position(model, clean, corrupted, metric, hook="resid_pre")   # [n_layers, p]
    patch_layer_position(model, clean, corrupted, metric, hook="h")           # the state: [n_layers, p]
    patch_heads(model, clean, corrupted, metric, hook="y")                    # Mamba-2: [n_layers, h]
    patch_heads(model, clean, corrupted, metric, hook="y", per_position=True) # [n_layers, h, p]
    patch_heads(model, clean, corrupted, metric, hook="x", channel_groups=8)  # Mamba-1: [n_layers, 8]

Hooks are named without their layer, with or without the ``hook_`` prefix:
``"resid_pre"``, ``"hook_h"``, ``"delta"``, ``"B"``, ``"ln1.hook_scale"``... Any
per-block hook with a position axis works (every one but ``hook_ssm_mask``: use
``tl_mamba.Knockout`` for edges). Patching ``hook_h`` at position t replaces the
state after step t, and the recurrence continues from the clean state (the model
does this whenever a hook edits ``hook_h``), so later positions see it too.

A metric may also return one value per prompt (``[b]``, e.g. the logit difference
without the ``.mean()``): every result then gains a last axis of size b, the value of
each prompt under each patch.

Speed: several patches run in one forward, each on its own copy of the corrupted
batch (``batch_size`` rows per forward in all), and the metric is called on each
copy's logits separately, so the numbers are those of one patch per forward. Patches
of ``hook_h`` take fewer rows per forward (:data:`STATE_PATCH_BYTES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from tl_mamba.circuits.graph import check_channel_group_count
from tl_mamba.errors import NotAnIndexError, OutOfRangeError, caller_stacklevel, check_index, refuse_a_mapping
from tl_mamba.models.tokens import padding_hit

Metric = Callable[[Tensor], Union[Tensor, float]]
LayerSpec = Optional[Union[int, Sequence[int]]]
IndexSpec = Optional[Union[int, Sequence[int], Tensor, range]]

__all__ = [
    "block_hook_names",
    "resolve_hook",
    "feature_axis",
    "patch_layer_position",
    "patch_heads",
    "patch_channel_groups",
]

# Per-block hooks whose axis 2 is a feature axis, by family. Mamba-2 hooks of width
# e = h·hd (y_gated, y_normed) are head-major, so they are split into [h, hd].
_MAMBA1_CHANNEL_HOOKS = ("hook_conv_in", "hook_conv", "hook_x", "hook_z", "hook_gate", "hook_delta", "hook_h",
                         "hook_y", "hook_y_gated")
_MAMBA2_HEAD_HOOKS = ("hook_z", "hook_gate", "hook_x", "hook_delta_raw", "hook_delta", "hook_h", "hook_y")
_MAMBA2_FLAT_HEAD_HOOKS = ("hook_y_gated", "hook_y_normed")
_NO_POSITION_HOOKS = ("hook_ssm_mask",)


# ----------------------------------------------------------------------- hook names
def block_hook_names(model) -> List[str]:
    """The hook names of one block, relative to ``blocks.{l}.`` (``"hook_resid_pre"``, ``"ln1.hook_scale"``...)."""
    from transformer_lens.hook_points import HookPoint

    return [name for name, module in model.blocks[0].named_modules() if isinstance(module, HookPoint)]


def resolve_hook(model, hook: str, *, need_position: bool = True) -> str:
    """The block-relative name of ``hook`` (``"h"``, ``"hook_h"``, ``"ln1.scale"`` → ``"hook_h"``, ``"ln1.hook_scale"``).

    Raises ``ValueError`` naming the valid hooks when ``hook`` is not a per-block
    hook of ``model``, when it names a layer (``"blocks.3.hook_h"``: pass the layer
    in ``layers=``), and, with ``need_position``, for ``hook_ssm_mask`` (no position axis).
    """
    if not isinstance(hook, str) or not hook:
        raise ValueError(f"hook must be a hook name such as 'resid_pre' or 'hook_h', got {hook!r}")
    names = block_hook_names(model)
    if hook.startswith("blocks."):
        raise ValueError(
            f"hook {hook!r} names a layer: give the hook without it (e.g. {hook.split('.', 2)[-1]!r}) and the "
            "layers in layers=")
    candidates = [hook, "hook_" + hook]
    if "." in hook:
        prefix, last = hook.rsplit(".", 1)
        candidates.append(f"{prefix}.hook_{last}")
    for candidate in candidates:
        if candidate in names:
            if need_position and candidate in _NO_POSITION_HOOKS:
                heads = "1" if model.cfg.family == "mamba1" else "h"
                raise ValueError(
                    f"{candidate} [b, {heads}, p, p] has no position axis to patch or ablate position by position; "
                    "remove hidden-attention edges with tl_mamba.Knockout instead")
            return candidate
    if hook in ("embed", "hook_embed") or hook.startswith("ln_final"):
        raise ValueError(f"{hook!r} is a model-level hook; these helpers take per-block hooks: {', '.join(names)}")
    import difflib

    close = difflib.get_close_matches(hook, names + [n[5:] for n in names if n.startswith("hook_")], n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"{hook!r} is not a per-block hook of {type(model).__name__}.{hint} "
                     f"Per-block hooks: {', '.join(names)}")


@dataclass(frozen=True)
class FeatureAxis:
    """Where a hook's heads (Mamba-2) or channels (Mamba-1) are.

    ``kind`` is ``"head"`` or ``"channel"``; ``size`` the number of heads or
    channels; ``split`` is ``(h, hd)`` when axis 2 holds ``e = h·hd`` head-major
    channels that must be viewed as ``[h, hd]`` (Mamba-2 ``hook_y_gated``,
    ``hook_y_normed``), else None.
    """

    kind: str
    size: int
    split: Optional[Tuple[int, int]] = None

    def view(self, act: Tensor) -> Tensor:
        """``act`` with the features on axis 2 (a view of ``act``)."""
        return act.unflatten(2, self.split) if self.split is not None else act

    def unview(self, act: Tensor) -> Tensor:
        return act.flatten(2, 3) if self.split is not None else act


def feature_axis(model, hook: str) -> Optional[FeatureAxis]:
    """The head (Mamba-2) or channel (Mamba-1) axis of a resolved block hook, None if it has none."""
    cfg = model.cfg
    if cfg.family == "mamba1":
        return FeatureAxis("channel", cfg.d_inner) if hook in _MAMBA1_CHANNEL_HOOKS else None
    if hook in _MAMBA2_HEAD_HOOKS:
        return FeatureAxis("head", cfg.n_heads)
    if hook in _MAMBA2_FLAT_HEAD_HOOKS:
        return FeatureAxis("head", cfg.n_heads, split=(cfg.n_heads, cfg.d_head))
    return None


def _feature_hooks(model) -> str:
    if model.cfg.family == "mamba1":
        return ", ".join(_MAMBA1_CHANNEL_HOOKS)
    return ", ".join(_MAMBA2_HEAD_HOOKS + _MAMBA2_FLAT_HEAD_HOOKS)


def require_feature_axis(model, hook: str, asked: str) -> FeatureAxis:
    """The feature axis of ``hook`` for a request of ``asked`` (``"heads"``, ``"channels"``,
    ``"channel_groups"``); ``ValueError`` when the family or the hook has no such axis."""
    family = model.cfg.family
    if asked == "heads" and family == "mamba1":
        raise ValueError(
            "heads were asked of a Mamba-1 model, which has no heads: restrict Mamba-1 hooks to channels "
            "(channels=... for ablation, channel_groups=G for patching)")
    if asked in ("channels", "channel_groups") and family == "mamba2":
        raise ValueError(
            f"{asked} were asked of a Mamba-2 model, whose features are heads: pass heads=... instead")
    axis = feature_axis(model, hook)
    if axis is None:
        what = "head" if family == "mamba2" else "channel (d_inner)"
        raise ValueError(
            f"{hook} has no {what} axis, so {asked} cannot be chosen on it. Hooks with one: {_feature_hooks(model)}")
    return axis


# --------------------------------------------------------------------- index checks
def check_layers(model, layers: LayerSpec) -> List[int]:
    """``layers`` (None = all, an int, or ints; negative from the end) as non-negative ints."""
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    if isinstance(layers, Tensor):
        layers = layers.reshape(-1).tolist()
    elif hasattr(layers, "__index__") or not hasattr(layers, "__iter__"):  # one layer (1.0 is refused below)
        layers = [layers]
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not hasattr(layer, "__index__"):
            raise NotAnIndexError(f"layers must be ints, got {layer!r}")
        layer = int(layer)
        if not -n <= layer < n:
            raise OutOfRangeError(f"layer {layer} is out of range for a model with {n} layers")
        out.append(layer % n)
    if not out:
        raise ValueError("layers is empty")
    return out


def check_indices(values: IndexSpec, size: int, what: str) -> List[int]:
    """``values`` (None = all, an int, ints, a range, an int or bool tensor) as ints in ``[0, size)``."""
    if values is None:
        return list(range(size))
    refuse_a_mapping(values, what, f"Give one list of {what}; for other {what} in other layers, call once per layer.")
    if type(values).__module__ == "numpy":  # an array (np.argsort(x)[-10:], a bool mask) or a numpy scalar
        values = torch.as_tensor(values)
    if isinstance(values, Tensor):
        if values.dtype == torch.bool:
            if values.shape != (size,):
                raise ValueError(f"a bool mask of {what} must have shape [{size}], got {tuple(values.shape)}")
            if not bool(values.any()):
                raise ValueError(f"{what} is empty (an all-False mask)")
            return values.nonzero()[:, 0].tolist()
        values = values.reshape(-1).tolist()
    elif hasattr(values, "__index__") or not hasattr(values, "__iter__"):  # one index (0.5 is refused below)
        values = [values]
    out = []
    for v in values:
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise NotAnIndexError(f"{what} must be ints, got {v!r}")
        out.append(check_index(v, size, what[:-1] if what.endswith("s") else what))
    if not out:
        raise ValueError(f"{what} is empty")
    return out


def _position_sets(sets: Mapping[str, Tensor], shape: Tuple[int, int]) -> Dict[str, Tensor]:
    """Named per-row position sets, each checked to be a bool mask of the batch's ``[b, p]``
    (an int tensor of 0 / 1 is taken as one); a ``ValueError`` naming the set otherwise."""
    if not sets:
        raise ValueError("positions is an empty dict: give at least one named [b, p] mask")
    out = {}
    for name, mask in sets.items():
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != shape:
            raise ValueError(f"positions[{name!r}] must be a bool mask of the batch's shape {list(shape)}, "
                             f"got {list(mask.shape)}")
        if mask.dtype != torch.bool:
            if mask.is_floating_point() or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(f"positions[{name!r}] must be a bool mask (or 0 / 1), got dtype {mask.dtype}")
            mask = mask.bool()
        out[name] = mask
    return out


def channel_group_slices(d_inner: int, groups: int) -> List[Tuple[int, int]]:
    """``[(start, stop)]`` of ``groups`` contiguous, equal channel groups of ``d_inner``.

    ``groups`` must divide ``d_inner``, as for ``Graph.from_model(..., channel_groups=G)``
    (``ValueError`` naming the nearest divisors otherwise): unequal groups would give scores
    of groups of different sizes, not comparable with each other or with the graph's."""
    check_channel_group_count(groups, d_inner)
    width = d_inner // groups
    return [(g * width, (g + 1) * width) for g in range(groups)]


def _check_tokens(clean_tokens, corrupted_tokens) -> Tuple[Tensor, Tensor]:
    for name, t in (("clean_tokens", clean_tokens), ("corrupted_tokens", corrupted_tokens)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a token tensor [b, p], got "
                             f"{type(t).__name__ if not isinstance(t, Tensor) else tuple(t.shape)}")
    if clean_tokens.shape != corrupted_tokens.shape:
        raise ValueError(f"clean_tokens {tuple(clean_tokens.shape)} and corrupted_tokens "
                         f"{tuple(corrupted_tokens.shape)} must have the same shape")
    return clean_tokens, corrupted_tokens


def check_cached_activation(name: str, act, b: int, p: int, what: str, tokens: str) -> None:
    """``ValueError`` unless the cached ``act`` is a tensor ``[b, p, ...]``: the batch and every
    position of the ``[b, p]`` ``tokens`` (a cache of other prompts, of another batch size, or
    cut by ``pos_slice`` would otherwise be broadcast or sliced silently)."""
    if not isinstance(act, Tensor):
        raise ValueError(f"{what}[{name!r}] must be a tensor, got {type(act).__name__}")
    if act.dim() < 2 or tuple(act.shape[:2]) != (b, p):
        shape = tuple(act.shape)
        hint = ""
        if act.dim() >= 2 and act.shape[0] == b and act.shape[1] < p:
            hint = " (a cache made with pos_slice? the patch needs every position)"
        elif act.dim() >= 1 and act.shape[0] == p and b == 1:
            hint = " (a remove_batch_dim=True cache as a plain dict? give each activation its batch axis: act[None])"
        raise ValueError(f"{what}[{name!r}] has shape {shape}, but {tokens} {(b, p)} need an activation "
                         f"[{b}, {p}, ...] (batch {b}, {p} positions): the cache must come from a run of these "
                         f"same {b} prompt(s) of {p} tokens{hint}")


# -------------------------------------------------------------------- patch engine
@dataclass(frozen=True)
class _Patch:
    layer: int
    positions: Optional[Union[Tuple[int, ...], Tensor]]  # None: every position; a bool [b, p]: each row its own
    features: Optional[Tuple[int, ...]]  # None: every feature (or the hook has none)


def _clean_activations(model, clean_tokens, names: List[str], attention_mask, clean_cache) -> Dict[str, Tensor]:
    if clean_cache is not None:
        b, p = clean_tokens.shape
        unbatched = getattr(clean_cache, "has_batch_dim", True) is False  # run_with_cache(remove_batch_dim=True)
        out = {}
        for n in names:
            try:
                act = clean_cache[n]
            except KeyError:
                raise ValueError(f"clean_cache lacks {n}; cache it with run_with_cache(names_filter=...)") from None
            if unbatched:
                act = act[None]
            check_cached_activation(n, act, b, p, "clean_cache", "clean_tokens")
            out[n] = act
        return out
    with torch.no_grad():
        last = max(int(n.split(".")[1]) for n in names)
        _, cache = model.run_with_cache(clean_tokens, names_filter=list(names), attention_mask=attention_mask,
                                        return_type=None, stop_at_layer=last + 1)
    return {n: cache[n] for n in names}


def _patch_hook(patches: List[Tuple[int, _Patch]], clean: Tensor, b: int, axis: Optional[FeatureAxis]):
    """A hook writing ``clean`` into the rows of each ``(copy k, patch)``: rows ``k·b .. (k+1)·b``."""

    def hook(act: Tensor, hook) -> Tensor:
        if tuple(clean.shape[1:]) != tuple(act.shape[1:]):
            raise ValueError(f"the clean activation of {hook.name} has shape {tuple(clean.shape)}, but this run's "
                             f"is {tuple(act.shape)} per copy of the batch: was the clean cache made with another "
                             "model?")
        new = act.clone()
        view = axis.view(new) if axis is not None else new
        source = (axis.view(clean) if axis is not None else clean).to(new.dtype)
        for k, patch in patches:
            rows = view[k * b:(k + 1) * b]
            if isinstance(patch.positions, Tensor):  # each row its own positions
                keep = patch.positions.to(act.device).view(b, -1, *[1] * (rows.dim() - 2))
                if patch.features is None:
                    rows.copy_(torch.where(keep, source, rows))
                else:
                    feat = torch.tensor(patch.features, device=act.device)
                    rows[:, :, feat] = torch.where(keep, source[:, :, feat], rows[:, :, feat])
                continue
            pos = slice(None) if patch.positions is None else torch.tensor(patch.positions, device=act.device)
            if patch.features is None:
                index = (slice(None), pos)
            else:
                feat = torch.tensor(patch.features, device=act.device)
                if patch.positions is None:
                    index = (slice(None), slice(None), feat)
                else:
                    index = (slice(None), pos[:, None], feat[None, :])
            rows[index] = source[index]
        return axis.unview(view) if axis is not None else view

    return hook


STATE_PATCH_BYTES = 2**26
"""The most bytes of ``hook_h`` that one patching forward holds (at least one copy of the
batch runs). An edit of ``hook_h`` materialises the states, ``[rows, p, *state]``, and a
comparison scan beside them, so ``batch_size`` rows cost several times the states' size.
Measured 2026-12-05 (Intel Xeon, 1 thread; toy-mamba2, b 4, p 512, 32 positions of one
layer, states 64 MB per copy of the batch): batch_size 64 took 9.97 s at a peak RSS of
6.20 GB, 16 7.34 s / 2.02 GB, 4 (one copy) 6.47 s / 0.84 GB. More rows only cost memory."""


def _run_patches(model, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: Metric, hook: str,
                 patches: Sequence[_Patch], axis: Optional[FeatureAxis], *, attention_mask=None, clean_cache=None,
                 batch_size: int = 64, progress: bool = True, desc: str = "patching") -> Tensor:
    """``metric`` of the corrupted run with each patch applied alone: a float64 tensor ``[len(patches)]``,
    or ``[len(patches), b]`` for a metric that returns one value per prompt."""
    from tqdm.auto import tqdm

    if not callable(metric):
        raise ValueError(f"metric must be a function logits [b, p, v] -> a scalar or [b], got {metric!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    device = model.W_E.device
    clean_tokens, corrupted_tokens = clean_tokens.to(device), corrupted_tokens.to(device)
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask, device=device)
    b = corrupted_tokens.shape[0]
    layers = sorted({p.layer for p in patches})
    names = {layer: f"blocks.{layer}.{hook}" for layer in layers}
    clean = _clean_activations(model, clean_tokens, list(names.values()), attention_mask, clean_cache)
    copies = max(1, batch_size // b)
    if hook == "hook_h" or hook.endswith(".hook_h"):
        per_copy = max(act.numel() * act.element_size() for act in clean.values())  # [b, p, *state]
        copies = max(1, min(copies, STATE_PATCH_BYTES // max(1, per_copy)))
    out: Optional[Tensor] = None
    starts = range(0, len(patches), copies)
    with torch.no_grad():
        for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
            chunk = list(patches[start:start + copies])
            k = len(chunk)
            tokens = corrupted_tokens.repeat(k, 1)
            mask = None if attention_mask is None else attention_mask.repeat(k, 1)
            by_layer: Dict[int, List[Tuple[int, _Patch]]] = {}
            for i, patch in enumerate(chunk):
                by_layer.setdefault(patch.layer, []).append((i, patch))
            fwd_hooks = [(names[layer], _patch_hook(items, clean[names[layer]].to(device), b, axis))
                         for layer, items in by_layer.items()]
            logits = model.run_with_hooks(tokens, fwd_hooks=fwd_hooks, attention_mask=mask)
            for i in range(k):
                value = torch.as_tensor(metric(logits[i * b:(i + 1) * b])).detach().double().cpu()
                if value.ndim != 0 and tuple(value.shape) != (b,):  # ([b] with b = 1 keeps its prompt axis)
                    raise ValueError(f"metric must return a scalar or one value per prompt ([{b}]), got shape "
                                     f"{tuple(value.shape)}")
                if out is None:
                    out = torch.zeros((len(patches), *value.shape), dtype=torch.float64)
                elif value.shape != out.shape[1:]:
                    raise ValueError("metric returned a scalar for some patches and one value per prompt for others")
                out[start + i] = value
    return torch.zeros(0, dtype=torch.float64) if out is None else out


# -------------------------------------------------------------------- public API
def _warn_if_columns_on_padding(model, columns: Sequence[int], tokens: Tensor,
                                attention_mask: Optional[Tensor]) -> None:
    """Warn when a patch position given as an int (a column of the batch) falls on padding in
    some row of ``tokens [b, p]``: its ``attention_mask``, or the padding the forward infers from
    pad tokens (and ``to_tokens``' trailing pad runs). There is no token there to patch."""
    from tl_mamba.circuits.ablation import _real_positions  # (ablation imports this module)

    if not columns:
        return
    if attention_mask is not None:
        real = torch.as_tensor(attention_mask)
        if tuple(real.shape) != tuple(tokens.shape):
            return  # (the run's own check names a mask of the wrong shape)
    else:
        real = _real_positions(model, tokens, None)
        if real is None:
            return
    chosen = torch.zeros(real.shape, dtype=torch.bool, device=real.device)
    chosen[:, list(columns)] = True
    hit = padding_hit(chosen, real)
    if hit is None:
        return
    import warnings

    row, found = hit
    warnings.warn(f"patch positions {found} fall on padding in row {row} (and maybe others): positions given as ints "
                  "are columns of the padded batch, and a pad column holds no token to patch. For prompts of "
                  "different lengths give named [b, p] bool masks, one row per prompt (positions={'S2': mask}).",
                  UserWarning, stacklevel=caller_stacklevel())


def patch_layer_position(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Metric,
    hook: str = "resid_pre",
    layers: LayerSpec = None,
    positions: Union[IndexSpec, Mapping[str, Tensor]] = None,
    *,
    attention_mask: Optional[Tensor] = None,
    clean_cache: Optional[Mapping[str, Tensor]] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Tensor:
    """Patch one per-block hook at one (layer, position) at a time: ``[n_layers, n_positions]``.

    Runs ``corrupted_tokens`` and, for every layer in ``layers`` and position in
    ``positions``, replaces ``blocks.{layer}.{hook}[:, pos]`` (every feature) by its
    value in the clean run, then records ``metric(logits)``. For ``hook="resid_pre"``
    this is ``transformer_lens.patching.get_act_patch_resid_pre``.

    Args:
        model: a ``HookedMamba`` or ``HookedMamba2``.
        clean_tokens, corrupted_tokens: ``[b, p]`` token tensors of the same shape.
        metric: ``logits [b, p, v]`` of one patched corrupted run → a scalar (or ``[b]``:
            one value per prompt, which adds a last axis of size b to the result).
        hook: any per-block hook with a position axis (``"resid_pre"``, ``"mixer_out"``,
            ``"h"`` (the state: ``[b, p, e, n]`` / ``[b, p, h, hd, n]``), ``"delta"``,
            ``"B"``, ``"conv"``, ``"ln1.hook_scale"`` ...), with or without ``hook_``.
        layers: layers to patch (None = all; ints, negative from the end). Rows of the result.
        positions: positions to patch (None = all ``p``; ints, negative from the end).
            Columns of the result. Positions are absolute columns of the batch. Or a dict of
            named position sets, each a bool mask ``[b, p]`` (each prompt its own positions, as a
            token's place differs across templates or padding: ``{"S2": ..., "IO": ...}``):
            one column per name, in the dict's order, patching each row at its ``True`` positions.
        attention_mask: ``[b, p]`` padding mask, used for both runs.
        clean_cache: activations of the clean run holding ``blocks.{l}.{hook}``
            (e.g. from ``run_with_cache``); computed when None. Each must be ``[b, p, ...]``,
            the batch and every position of ``clean_tokens`` (a cache of one prompt is not
            broadcast, nor one of longer prompts cut): ``ValueError`` naming the hook and both
            shapes otherwise, e.g. for a ``pos_slice`` cache. A ``remove_batch_dim=True`` cache
            of a single prompt (``b = 1``) is taken as ``[1, p, ...]``.
        batch_size: rows per forward; ``batch_size // b`` patches run together.
        progress: show a tqdm bar.

    Returns:
        float64 tensor ``[len(layers), len(positions)]`` of metric values (``[..., b]`` for a
        per-prompt metric).
    """
    clean_tokens, corrupted_tokens = _check_tokens(clean_tokens, corrupted_tokens)
    name = resolve_hook(model, hook)
    layer_list = check_layers(model, layers)
    if isinstance(positions, Mapping):  # named per-row position sets
        pos_list = list(_position_sets(positions, tuple(corrupted_tokens.shape)).values())
    else:
        pos_list = [(pos,) for pos in check_indices(positions, corrupted_tokens.shape[1], "positions")]
        if positions is not None:
            _warn_if_columns_on_padding(model, [pos for pos, in pos_list], corrupted_tokens, attention_mask)
    patches = [_Patch(layer, pos, None) for layer in layer_list for pos in pos_list]
    values = _run_patches(model, clean_tokens, corrupted_tokens, metric, name, patches, None,
                          attention_mask=attention_mask, clean_cache=clean_cache, batch_size=batch_size,
                          progress=progress, desc=f"patch {name} by layer x position")
    return values.reshape(len(layer_list), len(pos_list), *values.shape[1:])


def patch_heads(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Metric,
    hook: str = "y",
    layers: LayerSpec = None,
    heads: IndexSpec = None,
    positions: Union[IndexSpec, Mapping[str, Tensor]] = None,
    *,
    per_position: bool = False,
    channel_groups: Optional[int] = None,
    attention_mask: Optional[Tensor] = None,
    clean_cache: Optional[Mapping[str, Tensor]] = None,
    batch_size: int = 64,
    progress: bool = True,
) -> Tensor:
    """Patch one head (Mamba-2) or one channel group (Mamba-1) of a hook at a time.

    Runs ``corrupted_tokens`` and, for every layer and head, replaces that head's
    slice of ``blocks.{layer}.{hook}`` (axis 2: ``hook_y [b, p, h, hd]``,
    ``hook_delta [b, p, h]``, ``hook_h [b, p, h, hd, n]``...) by the clean run's,
    then records ``metric(logits)``.

    - Mamba-2: heads are the SSM heads; hooks with a head axis are ``hook_x``,
      ``hook_y``, ``hook_z``, ``hook_gate``, ``hook_delta``, ``hook_delta_raw``,
      ``hook_h``, and ``hook_y_gated`` / ``hook_y_normed`` (``[b, p, e]``, viewed as
      ``[b, p, h, hd]``). ``hook_B`` / ``hook_C`` have a group axis, the conv hooks
      mix x, B and C, so they have none.
    - Mamba-1 has no heads: pass ``channel_groups=G`` to split ``d_inner`` into ``G``
      contiguous, equal channel groups (``G`` must divide ``d_inner``) and patch one group at a time;
      hooks with a channel axis are ``hook_conv_in``, ``hook_conv``, ``hook_x``,
      ``hook_z``, ``hook_gate``, ``hook_delta``, ``hook_h``, ``hook_y``, ``hook_y_gated``.

    Args:
        hook: the hook (default ``"y"``: the head's output, including D·x).
        layers: None = all. Rows of the result.
        heads: heads (Mamba-2) or channel-group indices (Mamba-1) to patch; None = all.
        positions: positions patched (None = all). With ``per_position=False`` the head
            is patched at all of them together; with ``per_position=True`` at one
            position at a time, which adds a last axis. Or a dict of named per-row position
            sets, bool masks ``[b, p]`` as in :func:`patch_layer_position`: with
            ``per_position=True`` one column per name (each row patched at its own ``True``
            positions); with ``per_position=False`` the head is patched at every position of
            any set (their union), row by row.
        channel_groups: Mamba-1 only (required there), a divisor of ``d_inner``; ``ValueError`` on
            Mamba-2 or for a ``G`` that does not divide ``d_inner``.
        attention_mask, clean_cache, batch_size, progress: as :func:`patch_layer_position`.

    Returns:
        float64 tensor ``[len(layers), len(heads)]``, or ``[len(layers), len(heads),
        len(positions)]`` with ``per_position=True`` (``[..., b]`` for a per-prompt metric).
    """
    clean_tokens, corrupted_tokens = _check_tokens(clean_tokens, corrupted_tokens)
    name = resolve_hook(model, hook)
    if model.cfg.family == "mamba1":
        if channel_groups is None:
            raise ValueError(
                "Mamba-1 has no heads: pass channel_groups=G to patch G contiguous groups of d_inner channels")
        axis = require_feature_axis(model, name, "channel_groups")
        groups = channel_group_slices(model.cfg.d_inner, channel_groups)
        feature_sets = [tuple(range(a, z)) for a, z in groups]
        what = "channel groups"
    else:
        if channel_groups is not None:
            require_feature_axis(model, name, "channel_groups")  # raises: Mamba-2 has heads
        axis = require_feature_axis(model, name, "heads")
        feature_sets = [(h,) for h in range(model.cfg.n_heads)]
        what = "heads"
    layer_list = check_layers(model, layers)
    head_list = check_indices(heads, len(feature_sets), what)
    p = corrupted_tokens.shape[1]
    named = None  # named per-row position sets, bool [b, p] each
    columns = None  # positions given as ints: columns of the batch
    if isinstance(positions, Mapping):
        named = list(_position_sets(positions, tuple(corrupted_tokens.shape)).values())
    elif positions is not None:
        columns = check_indices(positions, p, "positions")
        _warn_if_columns_on_padding(model, columns, corrupted_tokens, attention_mask)
    if per_position:
        pos_list = named if named is not None else [(pos,) for pos in (range(p) if columns is None else columns)]
        patches = [_Patch(layer, pos, feature_sets[h]) for layer in layer_list for h in head_list
                   for pos in pos_list]
        shape: Tuple[int, ...] = (len(layer_list), len(head_list), len(pos_list))
    else:
        if named is not None:
            pos = torch.stack(named).any(0)
        else:
            pos = None if columns is None else tuple(columns)
        patches = [_Patch(layer, pos, feature_sets[h]) for layer in layer_list for h in head_list]
        shape = (len(layer_list), len(head_list))
    values = _run_patches(model, clean_tokens, corrupted_tokens, metric, name, patches, axis,
                          attention_mask=attention_mask, clean_cache=clean_cache, batch_size=batch_size,
                          progress=progress, desc=f"patch {name} by {what}")
    return values.reshape(*shape, *values.shape[1:])


def patch_channel_groups(model, clean_tokens: Tensor, corrupted_tokens: Tensor, metric: Metric, channel_groups: int,
                         hook: str = "y", layers: LayerSpec = None, groups: IndexSpec = None,
                         positions: Union[IndexSpec, Mapping[str, Tensor]] = None, **kwargs) -> Tensor:
    """Mamba-1 spelling of :func:`patch_heads`: patch ``channel_groups`` contiguous, equal groups of
    ``d_inner`` (it must divide ``d_inner``) one at a time. ``[len(layers), len(groups)]``
    (``[..., len(positions)]`` with ``per_position=True``)."""
    return patch_heads(model, clean_tokens, corrupted_tokens, metric, hook=hook, layers=layers, heads=groups,
                       positions=positions, channel_groups=channel_groups, **kwargs)
