"""Token-to-token knockout: ``Knockout`` and the hooks it installs.

A knockout removes what source tokens j contribute to target tokens i inside the
mixers of some layers:

- ``path="ssm"``: the hidden-attention terms α[i, j]·x_j (α[i, i] included) of
  the scan. This *is* a hook on ``blocks.{l}.hook_ssm_mask`` that zeroes the
  entries ``[b, head, i, j]``; a hand-written TransformerLens hook doing the same
  gives the same result. When every hook on the mask is a Knockout (and nothing
  caches the mask), the block never builds the p×p mask: by linearity the removed
  part is ``1_T ⊙ scan(x ⊙ 1_S)``, one extra scan per knockout (per disjoint piece of
  overlapping knockouts); a knockout with
  few edges (a few sources → the last token) sums ``α[i, j]·x_j`` over its edges
  instead, with no scan.
- ``path="conv"``: the depthwise causal-conv taps that carry j into i (including
  i = j). For Mamba-2 the conv runs over x, B and C together, so all three lose
  those taps. The changed conv output flows into everything computed from it
  (Δ, B, C for Mamba-1; x, B, C for Mamba-2). Implemented as a hook on
  ``hook_conv`` that subtracts ``1_T ⊙ conv(conv_in ⊙ 1_S)`` (no bias), where
  ``conv_in`` is the tensor the conv read: ``hook_conv_in``'s value after every
  hook on it, which the block hands to the hook point (:func:`run_hook_conv`).
- ``path="both"``: both.

What remains after a knockout (by design; this is the definition the Mamba
Knockout paper uses, made exact):

- the D·x skip of every token (its own path);
- information about j that reached a *non-source* position k before this layer
  or through this layer's conv (for ``path="ssm"``): α[i, k]·x_k still flows,
  and x_k, B_k may carry j through the conv window when ``path="ssm"``;
- Δ_i, B_i, C_i of the target itself, which for ``path="ssm"`` are still computed
  from a conv window that includes sources within ``d_conv - 1`` positions;
- with ``heads=`` on Mamba-2's conv path, B and C are shared by the heads of a
  group, so their taps are removed only for groups whose heads are all chosen;
  the chosen heads' x channels always lose them.

Several knockouts (several ``Knockout`` objects, or hooks) remove the union of
their edges: knockouts of one layer that share edges are split into disjoint pieces
(:func:`tl_mamba.ops.knockout.disjoint_removals`), on both paths.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from tl_mamba.errors import NotAnIndexError, OutOfRangeError, caller_stacklevel, refuse_a_mapping, reusable
from tl_mamba.models.tokens import padding_hit
from tl_mamba.ops.conv import causal_conv1d
from tl_mamba.ops.knockout import EdgeRemoval, disjoint_removals, outside

Positions = Union[int, Sequence[int], Tensor]
PATHS = ("ssm", "conv", "both")


def _index_list(values, what: str, owner: str = "Knockout", mask_ok: bool = True) -> List[int]:
    """``values`` (an int, a sequence of ints, an int tensor) as a list of Python ints.

    ``TypeError`` for anything that is not an integer (a float such as ``1.7`` would be
    truncated, a Python bool read as position 0 or 1). ``owner`` and ``what`` name the
    argument in the message; ``mask_ok``: whether a bool mask is another way to give it.
    """
    unit = "positions" if what in ("sources", "targets") else what
    or_mask = " or a bool mask" if mask_ok else ""
    if isinstance(values, Mapping):  # (the hint is built only for the error)
        if owner == "Knockout" and what == "layers":
            hint = ("Give the layers as a list; for other heads or channels in other layers, give the mapping as "
                    "heads= / channels=: Knockout(layers=list(per_layer), heads=per_layer, ...).")
        elif what in ("heads", "channels"):
            hint = f"Give one list of {unit}; for other {unit} in other layers, call once per layer."
        else:
            hint = f"Give a list of {unit}{or_mask}."
        refuse_a_mapping(values, f"{owner} {what}", hint)
    if hasattr(values, "tolist") and not isinstance(values, Tensor):  # numpy arrays and scalars
        values = values.tolist()
    if isinstance(values, Tensor):
        if values.is_floating_point() or values.is_complex() or (values.dtype == torch.bool and not mask_ok):
            raise NotAnIndexError(f"{owner} {what}: give integer {unit}{or_mask}, not a {values.dtype} tensor "
                                  f"({values.flatten()[:4].tolist()}...)")
        return [int(v) for v in values.flatten().tolist()]
    if isinstance(values, bool) or (not isinstance(values, (list, tuple, range)) and hasattr(values, "__index__")):
        values = [values]
    elif not isinstance(values, Iterable) or isinstance(values, (str, bytes)):
        raise NotAnIndexError(f"{owner} {what}: give an integer, a list of integers{or_mask}, "
                              f"got {type(values).__name__}")
    out = []
    for v in values:
        if isinstance(v, Tensor) or hasattr(v, "tolist"):  # a 0-d tensor or numpy scalar: its Python value
            v = v.item() if getattr(v, "ndim", 0) == 0 else v
        if isinstance(v, bool) or isinstance(v, Tensor) or not hasattr(v, "__index__"):
            hint = (" (a list of bools: pass a bool tensor, torch.tensor(mask, dtype=torch.bool), to give a mask)"
                    if isinstance(v, bool) and mask_ok else "")
            raise NotAnIndexError(f"{owner} {what}: integer {unit} needed, got {v!r} of type "
                                  f"{type(v).__name__}{hint}")
        out.append(int(v))
    return out


def _resolve_layers(layers: Iterable[int], n_layers: int, what: str) -> List[int]:
    """``layers`` (negative from the end) as indices in ``[0, n_layers)``, in order;
    :class:`OutOfRangeError` naming ``what`` for any outside ``[-n_layers, n_layers)``."""
    layers = list(layers)
    bad = [layer for layer in layers if not -n_layers <= layer < n_layers]
    if bad:
        raise OutOfRangeError(f"{what} {bad} out of range: the model has {n_layers} layers")
    return [layer % n_layers for layer in layers]


def _check_index_type(given, what: str) -> None:
    """The types of ``sources`` / ``targets`` / ``heads`` / ``channels`` (their ranges and repeats
    are checked when the sizes are known): None, a bool mask, or what :func:`_index_list` reads."""
    if given is not None and not (isinstance(given, Tensor) and given.dtype == torch.bool):
        _index_list(given, what)


def _refuse_an_int_mask(given: List[int], size: int, what: str, unit: str, owner: str = "Knockout") -> None:
    """``ValueError`` when ``given`` looks like a 0/1 mask passed as ints: three or more entries,
    only 0s and 1s, with a repeat. Ints are indices, and read as indices such a "mask" would
    silently knock out position 0 and / or 1 instead. Other repeats are a union and allowed:
    ``[7, -1]`` at p = 8 names position 7 once, and so does ``[1, 1]`` position 1 (two spans
    of one token that coincide, as an IOI prompt's first token and S1 do)."""
    if len(given) < 3 or len(set(given)) == len(given) or not set(given) <= {0, 1}:
        return
    length = f"{len(given)} entries" + ("" if len(given) == size else f", where the layer has {size} {unit}")
    raise ValueError(f"{owner} {what}: {given[:12]}{' ...' if len(given) > 12 else ''} looks like a 0/1 mask "
                     f"({length}), but an int tensor or list gives {unit}, and this one names {unit} "
                     f"{sorted(set(given))} more than once. A mask must be a bool tensor (mask.bool()); if you "
                     f"meant {unit} {sorted(set(given))}, name each once.")


def resolve_positions(positions: Positions, b: int, p: int, what: str, device=None) -> Tensor:
    """Turn sources/targets into a ``[b, p]`` bool tensor.

    Accepts an int, a list of ints (negative counts from the end; a position named twice,
    e.g. ``[7, -1]`` at p = 8, is knocked out once), a 1-D int tensor of positions, or a
    bool tensor ``[p]`` or ``[b, p]`` (one row per batch element). Positions index the
    columns of the (padded) batch. ``TypeError`` for non-integer positions (floats);
    ``ValueError`` for an int tensor of more than one dimension, or ints that look like a
    0/1 mask (masks must be bool: see :func:`_refuse_an_int_mask`).
    """
    if isinstance(positions, Tensor) and positions.dtype == torch.bool:
        if positions.dim() == 1:
            if positions.shape[0] != p:
                raise ValueError(f"Knockout {what}: a bool mask [p] must have p = {p} entries, got {positions.shape[0]}")
            return positions.to(device)[None].expand(b, p)
        if positions.dim() == 2:
            if tuple(positions.shape) != (b, p):
                raise ValueError(f"Knockout {what}: a bool mask [b, p] must have shape {(b, p)}, "
                                 f"got {tuple(positions.shape)}")
            return positions.to(device)
        raise ValueError(f"Knockout {what}: a bool mask must be [p] or [b, p], got shape {tuple(positions.shape)}")
    if isinstance(positions, Tensor) and positions.dim() > 1:
        raise ValueError(f"Knockout {what}: an int tensor gives positions and must be 1-D, got shape "
                         f"{tuple(positions.shape)}; a per-row mask [b, p] must be a bool tensor (mask.bool())")
    given = _index_list(positions, what)
    _refuse_an_int_mask(given, p, what, "positions")
    index = []
    for pos in given:
        if not -p <= pos < p:
            raise OutOfRangeError(f"Knockout {what}: position {pos} is out of range for a sequence of {p} tokens")
        index.append(pos % p)
    out = torch.zeros(b, p, dtype=torch.bool)  # built on the host: indexing a GPU tensor with a list waits for it
    if index:
        out[:, index] = True
    return _to_device(out, device)


def _to_device(host: Tensor, device) -> Tensor:
    """A host tensor on ``device`` without waiting for the device's queue (the copy is staged)."""
    return host if device is None else host.to(device, non_blocking=True)


def _feature_mask(chosen: Optional[Sequence[int]], size: int, what: str, device=None) -> Optional[Tensor]:
    """``heads`` / ``channels`` as a float ``[size]`` mask (None: every feature)."""
    if chosen is None:
        return None
    if isinstance(chosen, Tensor) and chosen.dtype == torch.bool:
        if chosen.shape != (size,):
            raise ValueError(f"Knockout {what}: a bool mask must have {size} entries, got {tuple(chosen.shape)}")
        return chosen.to(device=device, dtype=torch.float32)
    given = _index_list(chosen, what)
    bad = [i for i in given if not -size <= i < size]
    if bad:
        raise OutOfRangeError(f"Knockout {what} {bad} out of range: the layer has {size}")
    _refuse_an_int_mask(given, size, what, what)
    index = [i % size for i in given]
    out = torch.zeros(size, dtype=torch.float32)
    out[index] = 1.0
    return _to_device(out, device)


@dataclass(eq=False)  # compared and hashed by identity: its positions may be tensors
class Knockout:
    """Remove source → target edges inside the mixers of ``layers``.

    Args:
        layers: a layer index, or an iterable of them (negative counts from the end).
        sources, targets: positions (ints, negatives allowed; one named twice counts once), a
            1-D int tensor of positions, or bool masks ``[p]`` / ``[b, p]`` (one knockout per
            batch row). A mask must be a bool tensor: ints are positions, and ints that look
            like a 0/1 mask (three or more, only 0s and 1s, repeated) raise ``ValueError``; non-integer
            positions (floats) raise ``TypeError``.
        path: ``"ssm"`` (hidden-attention terms), ``"conv"`` (conv taps) or ``"both"``.
        heads: Mamba-2 only: restrict to these heads (ints, or a bool mask ``[h]``).
        channels: Mamba-1 only: restrict to these d_inner channels (ints, or a bool
            mask ``[e]``). An empty list of heads or channels removes nothing (with a warning).
            Either may be a mapping ``{layer: heads}`` that gives each layer its own (say, each
            layer's fast-decay features from ``tl_mamba.experiments.features_by_decay``): its keys
            must be exactly ``layers`` (negative keys count from the end, as layers do).

    Positions are columns of the batch as the model sees it, padding included: in a
    left-padded batch ``sources=[0]`` is the pad column of every padded row, not that
    prompt's first token, and the knockout removes nothing there (padding feeds nothing
    into the conv or the scan). For prompts of different lengths give ``[b, p]`` bool
    masks, one row per prompt (e.g. ``(attention_mask.cumsum(1) == k + 1) & (attention_mask == 1)``
    for each prompt's own token k). A padded forward (an ``attention_mask``, or padded
    strings) with the knockout attached, however it was attached, warns once per Knockout
    when a source or target given as positions or a CPU mask falls on padding in some row
    (masks already on the GPU are not checked: that would wait for the device).

    Use with ``model.run_with_knockout(tokens, ko)`` or ``with model.knockouts(ko):``;
    ``ko.hooks(model)`` gives the plain ``(name, fn)`` hooks.
    """

    layers: Union[int, Iterable[int]]
    sources: Positions
    targets: Positions = -1
    path: str = "ssm"
    heads: Optional[Union[Sequence[int], Tensor, Mapping]] = None
    channels: Optional[Union[Sequence[int], Tensor, Mapping]] = None
    _layers: Tuple[int, ...] = field(init=False, repr=False, default=())
    _warned_no_edges: bool = field(init=False, repr=False, compare=False, default=False)
    _warned_padding: bool = field(init=False, repr=False, compare=False, default=False)
    _warned_no_features: bool = field(init=False, repr=False, compare=False, default=False)
    _warned_partial_groups: bool = field(init=False, repr=False, compare=False, default=False)
    _warned_unshown_channels: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"Knockout path must be one of {PATHS}, got {self.path!r}")
        if self.heads is not None and self.channels is not None:
            raise ValueError("Knockout takes heads= (Mamba-2) or channels= (Mamba-1), not both")
        # the types now (floats, bools in a list); ranges and repeats when the sizes are known
        for what in ("sources", "targets", "heads", "channels"):
            given = reusable(getattr(self, what))  # (a generator: kept as a list, or the check would use it up)
            if what in ("heads", "channels") and isinstance(given, Mapping):  # one list per layer
                keys = _index_list(list(given), f"{what} keys (layers)", mask_ok=False)
                given = {key: reusable(value) for key, value in zip(keys, given.values())}
                for key, value in given.items():
                    _check_index_type(value, f"{what}[{key}]")
            else:
                _check_index_type(given, what)
            setattr(self, what, given)
        layers = _index_list(self.layers, "layers", mask_ok=False)
        if not layers:
            raise ValueError("Knockout needs at least one layer")
        self._layers = tuple(layers)

    def __repr__(self) -> str:
        """The arguments, with a tensor summarised (a ``[29, 15]`` mask in full would flood
        every warning that names this knockout)."""
        def show(value) -> str:
            if not isinstance(value, Tensor):
                return repr(value)
            if value.dtype == torch.bool:
                # counting the set entries of a GPU mask would wait for the device
                count = f", {int(value.sum())} set" if value.device.type == "cpu" else f", on {value.device}"
                return f"<bool mask {list(value.shape)}{count}>"
            return repr(value.tolist()) if value.numel() <= 8 else f"<{value.dtype} tensor {list(value.shape)}>"

        args = ", ".join(f"{name}={show(getattr(self, name))}"
                         for name in ("layers", "sources", "targets", "path", "heads", "channels"))
        return f"Knockout({args})"

    # ----------------------------------------------------------------- resolution
    def resolved_layers(self, n_layers: int) -> List[int]:
        return sorted(set(_resolve_layers(self._layers, n_layers, "Knockout layers")))

    def _check_family(self, cfg) -> None:
        if cfg.family == "mamba1" and self.heads is not None:
            raise ValueError("heads= restricts a Mamba-2 knockout; for Mamba-1 use channels= (d_inner channels)")
        if cfg.family == "mamba2" and self.channels is not None:
            raise ValueError("channels= restricts a Mamba-1 knockout; for Mamba-2 use heads=")
        self._per_layer_features(cfg)

    def _per_layer_features(self, cfg) -> Optional[dict]:
        """A per-layer ``heads=`` / ``channels=`` mapping with its keys resolved (``{layer: chosen}``),
        checked to name exactly this knockout's layers; None when one choice serves every layer."""
        what = "heads" if cfg.family == "mamba2" else "channels"
        chosen = getattr(self, what)
        if not isinstance(chosen, Mapping):
            return None
        resolved = {}
        for key, layer, value in zip(chosen, _resolve_layers(chosen, cfg.n_layers, f"Knockout {what}: layer keys"),
                                     chosen.values()):
            if layer in resolved:
                raise ValueError(f"Knockout {what}: layer {layer} has two entries (keys "
                                 f"{[k for k in chosen if k % cfg.n_layers == layer]})")
            resolved[layer] = value
        layers = self.resolved_layers(cfg.n_layers)
        missing, extra = [l for l in layers if l not in resolved], sorted(set(resolved) - set(layers))
        if missing or extra:
            raise ValueError(f"Knockout {what}: a per-layer mapping needs one entry for each of the knockout's layers "
                             f"{layers}; " + "; ".join(
                                 ([f"layers {missing} have none"] if missing else []) +
                                 ([f"keys {extra} are not among them"] if extra else [])))
        return resolved

    def features(self, cfg, layer: Optional[int], device=None) -> Optional[Tensor]:
        """``heads=`` (Mamba-2) / ``channels=`` (Mamba-1) in ``layer`` (resolved, 0..n_layers-1) as a
        float mask ``[h]`` / ``[e]``; None: every feature. ``layer`` may be None only when one
        choice serves every layer."""
        what, size = ("heads", cfg.n_heads) if cfg.family == "mamba2" else ("channels", cfg.d_inner)
        per_layer = self._per_layer_features(cfg)
        if per_layer is None:
            return _feature_mask(getattr(self, what), size, what, device)
        if layer is None:
            raise ValueError(f"{self!r}: its features differ by layer, so its removal needs the layer")
        return _feature_mask(per_layer[layer], size, f"{what}[{layer}]", device)

    def removal(self, cfg, b: int, p: int, device=None, layer: Optional[int] = None) -> EdgeRemoval:
        """This knockout's SSM edges in ``layer`` for a batch of ``b`` sequences of ``p`` tokens
        (``layer`` matters only for per-layer ``heads=`` / ``channels=``).

        Positions given as ints (or masks on the CPU) are resolved on the host, which
        also gives the removal its host-side position lists: on a GPU, the knockout then
        never waits for the device (no ``nonzero``, no blocking copy).
        """
        (sources, host_sources), (targets, host_targets) = (self.masks(what, b, p, device)
                                                            for what in ("sources", "targets"))
        source_positions = None if host_sources is None else host_sources.any(0).nonzero()[:, 0]
        target_positions = None if host_targets is None else host_targets.any(0).nonzero()[:, 0]
        if host_sources is not None and host_targets is not None:
            self.warn_if_no_edges(host_sources, host_targets)
        return EdgeRemoval(sources=sources.float(), targets=targets.float(), features=self.features(cfg, layer, device),
                           source_positions=source_positions, target_positions=target_positions)

    def masks(self, what: str, b: int, p: int, device=None) -> Tuple[Tensor, Optional[Tensor]]:
        """``sources`` or ``targets`` as ``([b, p] mask on device, the same on the CPU or None)``.

        Positions given as ints (or masks on the CPU) are resolved on the host, so that on a
        GPU the knockout never waits for the device (no ``nonzero``, no blocking copy); a
        mask already on the device stays there, with no CPU copy.
        """
        given = getattr(self, what)
        if isinstance(given, Tensor) and given.dtype == torch.bool and given.device.type != "cpu":
            return resolve_positions(given, b, p, what, device), None
        host = resolve_positions(given, b, p, what)
        return _to_device(host, device), host

    def warn_if_no_edges(self, sources: Tensor, targets: Tensor, window: Optional[int] = None) -> None:
        """Warn (once per Knockout) when no source precedes a target in any row, so that the
        knockout removes nothing: say, sources and targets swapped, or an empty source list.
        ``sources``, ``targets``: the resolved ``[b, p]`` masks, on the CPU (positions given as
        device masks are not checked: that would wait for the device). ``window``: only edges
        with ``i - window < j ≤ i`` count (the conv path's taps)."""
        if self._warned_no_edges:
            return
        p = sources.shape[1]
        before = torch.cumsum(sources.long(), dim=1)  # sources at or before each position
        seen = before  # ... and, on the conv path, after i - window
        if window is not None:
            seen = before - torch.nn.functional.pad(before, (window, 0))[:, :p]
        if bool((targets.bool() & (seen > 0)).any()):
            return
        import warnings

        self._warned_no_edges = True
        empty = [what for what, chosen in (("sources", sources), ("targets", targets)) if not bool(chosen.any())]
        if empty:
            why = f"it has no {' and no '.join(empty)} (an empty list, or an all-False mask)."
        elif window is not None and bool((targets.bool() & (before > 0)).any()):
            # sources do precede targets, only too far back for the conv's taps
            why = (f"every source is more than {window - 1} positions before every target, and the conv "
                   f"(d_conv = {window}) carries a token only {window - 1} positions forward. On the conv path "
                   "only nearby edges exist; path='ssm' reaches any earlier source.")
        else:
            reach = "" if window is None else f" within the conv window ({window} positions)"
            why = (f"no source comes at or before a target{reach} in any row. An edge runs from a source j "
                   "to a later (or the same) target i; were sources and targets swapped?")
        warnings.warn(f"{self!r} removes no edges from these {p}-token inputs: {why}", UserWarning, stacklevel=2)

    def warn_if_no_features(self, cfg) -> None:
        """Warn (once per Knockout, like :meth:`warn_if_no_edges`) when ``heads=`` / ``channels=``
        chooses no feature, so that the knockout removes nothing; check their ranges."""
        what = "heads" if cfg.family == "mamba2" else "channels"
        if getattr(self, what) is None or self._warned_no_features:
            return
        layers = self.resolved_layers(cfg.n_layers)
        empty = [layer for layer in layers if not bool(self.features(cfg, layer).any())]
        if not empty:
            return
        import warnings

        self._warned_no_features = True
        where = "" if self._per_layer_features(cfg) is None else f" in layers {empty}"
        warnings.warn(f"{self!r} removes no edges{where}: {what}= chooses no {what[:-1]} (an empty list or an "
                      f"all-False mask); pass {what}=None for every {what[:-1]}.", UserWarning, stacklevel=3)

    def warn_if_partial_groups(self, cfg, subject: Optional[str] = None) -> None:
        """Warn (once per Knockout) when a Mamba-2 conv-path knockout's ``heads=`` chooses some but
        not all heads of a group: B and C are convolved once per group and shared by its heads, so
        their taps stay, and the sources still reach the chosen heads through B_i and C_i (only the
        chosen heads' x channels lose their taps). With one group, as in the released Mamba-2
        checkpoints, that is every proper subset of heads. ``subject``: what the message names
        (default this Knockout's repr; a run of many knockouts warns once in their name)."""
        if cfg.family != "mamba2" or self.heads is None or self.path == "ssm" or self._warned_partial_groups:
            return
        for layer in self.resolved_layers(cfg.n_layers):
            chosen = self.features(cfg, layer).view(cfg.n_groups, -1)  # [g, heads per group]
            partial = [g for g in range(cfg.n_groups) if 0 < float(chosen[g].sum()) < chosen.shape[1]]
            if partial:
                break
        else:
            return
        import warnings

        self._warned_partial_groups = True
        per_group = chosen.shape[1]
        warnings.warn(
            f"{subject or repr(self)}: on the conv path, heads= removes the sources' taps from the chosen heads' x channels, but "
            f"B and C are convolved once per group and shared by its {per_group} heads, so group(s) {partial} keep "
            "their B / C taps: the sources still reach the chosen heads through B_i and C_i. For a complete conv "
            f"knockout choose whole groups (heads {per_group * partial[0]}..{per_group * partial[0] + per_group - 1} "
            f"form group {partial[0]}), or heads=None.", UserWarning, stacklevel=3)

    def warn_if_on_padding(self, attention_mask: Tensor) -> None:
        """Warn (once per Knockout) when a source or target falls on a padded position of some row.

        ``attention_mask``: ``[b, p]`` on the CPU, 1 at real tokens. Positions are columns of the
        padded batch, so ``sources=[0]`` in a left-padded row is padding, and there is nothing to
        remove there. Positions given as device masks are not checked (that would wait for the device).
        """
        if self._warned_padding:
            return
        b, p = attention_mask.shape
        found = []
        for what in ("sources", "targets"):
            _, host = self.masks(what, b, p)
            hit = None if host is None else padding_hit(host, attention_mask)
            if hit is not None:
                found.append(f"{what} {hit[1]} in row {hit[0]}")
        if not found:
            return
        import warnings

        self._warned_padding = True
        if bool((attention_mask[:, -1] == 0).any()):  # right padding: the last tokens sit in different columns
            example = ("with right padding, position -1 is a pad in every padded row (strings are padded on the "
                       "tokenizer's side: padding_side='left' makes -1 every prompt's last token)")
        else:
            example = "with left padding, position 0 is a pad in every padded row"
        warnings.warn(
            f"{self!r}: {' and '.join(found)} fall on padding (attention_mask 0), where there is nothing to remove. "
            f"Knockout positions are columns of the padded batch, not positions within each prompt: {example}. "
            "For prompts of different lengths give sources / targets as [b, p] bool masks, one row per prompt.",
            UserWarning, stacklevel=caller_stacklevel())

    # ---------------------------------------------------------------------- hooks
    def hooks(self, model) -> List[Tuple[str, "object"]]:
        """The ``(hook name, hook function)`` pairs that implement this knockout on ``model``."""
        cfg = model.cfg
        self._check_family(cfg)
        self.warn_if_no_features(cfg)
        self.warn_if_partial_groups(cfg)
        hooks: List[Tuple[str, object]] = []
        for layer in self.resolved_layers(cfg.n_layers):
            if self.path in ("ssm", "both"):
                hooks.append((f"blocks.{layer}.hook_ssm_mask", SSMMaskKnockoutHook(self, cfg, layer)))
            if self.path in ("conv", "both"):
                hooks.append((f"blocks.{layer}.hook_conv", ConvKnockoutHook(self, cfg, model.blocks[layer], layer)))
        return hooks


class SSMMaskKnockoutHook:
    """A hook on ``hook_ssm_mask`` that zeroes a Knockout's edges.

    It also carries the knockout's structure (``removal``), so a block whose mask is
    hooked only by such hooks skips building the mask (see ``structured_removals``).
    """

    def __init__(self, knockout: Knockout, cfg, layer: int):
        self.knockout, self.cfg, self.layer = knockout, cfg, layer

    def removal(self, b: int, p: int, device) -> EdgeRemoval:
        return self.knockout.removal(self.cfg, b, p, device, self.layer)

    def writes_mask(self) -> bool:
        """Whether this knockout can be written into the mask: not a Mamba-1 ``channels=``
        knockout, whose ``[b, 1, p, p]`` mask has no channel axis (:func:`channel_knockouts_beside_mask`)."""
        return not (self.cfg.family == "mamba1" and self.knockout.channels is not None)

    def __call__(self, mask: Tensor, hook) -> Tensor:
        b, H, p, _ = mask.shape
        if not self.writes_mask():
            if any(fn is self for fn in _knockout_hooks_on(hook)):
                return mask  # the block applies it beside the mask (channel_knockouts_beside_mask)
            raise ValueError(
                f"{hook.name}: a channels= knockout cannot be written into the [b, 1, p, p] mask, and this one was "
                "attached in a way that leaves no trace of the Knockout (on transformer-lens 3.x, Knockout hooks "
                "given to run_with_hooks or model.hooks), so the block cannot apply it beside the mask: attach it "
                "with model.knockouts or run_with_knockout.")
        removal = self.removal(b, p, mask.device)
        return mask * (1 - removal.dense(H).to(mask.dtype))


def channel_knockouts_beside_mask(hook_point, hooked_mask: Tensor, b: int, p: int,
                                  device) -> Optional[List[EdgeRemoval]]:
    """Mamba-1's ``channels=`` Knockouts on a mask that other hooks observe, in structured form.

    Mamba-1's ``hook_ssm_mask`` is ``[b, 1, p, p]``, shared by every channel, so a knockout of
    some channels cannot be written into it: such Knockouts leave the mask as it is, and a
    cache (or any hook that only reads the mask) sees the other Knockouts' edges only. When
    nothing but Knockouts changed the mask, every Knockout on it is applied in structured form,
    the route a mask hooked by Knockouts alone takes, and this returns their disjoint removals.

    Args:
        hooked_mask: ``[b, 1, p, p]``, what the hook point returned for a mask of ones.

    Returns:
        None when no ``channels=`` Knockout is attached (the mask is the knockout).

    Raises:
        ValueError: a hook other than the Knockouts changed the mask, or the mask needs its
            gradient (a backward hook): an edit of the shared mask and a knockout of some
            channels cannot be combined edge by edge, so neither is applied silently.
    """
    knockouts = [fn for fn in _knockout_hooks_on(hook_point) if isinstance(fn, SSMMaskKnockoutHook)]
    beside = [fn for fn in knockouts if not fn.writes_mask()]
    if not beside:
        return None
    removals = [fn.removal(b, p, device) for fn in knockouts]
    written = torch.ones_like(hooked_mask)
    for fn, removal in zip(knockouts, removals):
        if fn.writes_mask():
            written = written * (1 - removal.dense(1).to(written.dtype))
    edited = not torch.equal(hooked_mask.detach(), written)
    if edited or hooked_mask.requires_grad:
        why = "a hook other than the Knockouts changed the mask" if edited else \
            "the mask needs its gradient (a backward hook on it)"
        raise ValueError(
            f"{hook_point.name}: a channels= knockout is applied beside Mamba-1's [b, 1, p, p] mask (which has no "
            f"channel axis), and {why}: the two cannot be combined edge by edge. Knock the channels out with "
            "tl_mamba.Knockout alone, or edit the mask without it.")
    for fn in beside:
        ko = fn.knockout
        if not ko._warned_unshown_channels:
            import warnings

            ko._warned_unshown_channels = True
            warnings.warn(f"{hook_point.name}: {ko!r} knocks out some channels, which Mamba-1's [b, 1, p, p] mask "
                          "cannot show (it has no channel axis): the mask that hooks and caches see leaves its "
                          "edges at 1, and the knockout is applied beside it.", UserWarning,
                          stacklevel=caller_stacklevel())
    return disjoint_removals(removals)


class ConvTaps:
    """What the conv knockouts of one block share during one call of its ``hook_conv``:
    the tensor the conv read (``conv_input`` ``[b, p, c]``) and the removals already applied
    (channel-level :class:`EdgeRemoval` s), so that knockouts sharing taps remove them once."""

    def __init__(self, conv_input: Tensor):
        self.conv_input = conv_input
        self.removed: List[EdgeRemoval] = []
        self.applied: set = set()  # ids of the knockout hooks already applied in this call


def run_hook_conv(hook_point, conv: Tensor, conv_input: Tensor) -> Tensor:
    """``hook_point(conv)``, with ``conv_input`` (what the conv read, after every hook on
    ``hook_conv_in``) at hand for the conv knockouts hooked there (:class:`ConvKnockoutHook`).

    The blocks call this in place of ``hook_conv(conv)``. The knockouts attached to the hook
    point are applied first, before any other hook on it, whichever was added first: the
    hooks then see the knocked-out conv, as hooks on ``hook_y`` see the knocked-out y (a patch
    or an edit of ``hook_conv`` is not knocked out afterwards). Their taps are computed from the
    conv's real input, whatever hooks edit ``hook_conv_in``. (A knockout attached in a way
    that leaves no trace of the Knockout, e.g. ``ko.hooks(model)`` given to ``model.hooks`` on
    transformer-lens 3.x, is applied in its turn among the hooks.)
    """
    if not hook_point.fwd_hooks:
        return hook_point(conv)
    outer = getattr(hook_point, "conv_taps", None)  # a hook may run the model again from inside
    taps = hook_point.conv_taps = ConvTaps(conv_input)
    try:
        for knockout_hook in _knockout_hooks_on(hook_point):
            conv = knockout_hook.remove_taps(conv, taps)
        return hook_point(conv)
    finally:
        hook_point.conv_taps = outer


class ConvKnockoutHook:
    """The conv path of a Knockout: a hook on ``hook_conv`` that removes the source taps."""

    def __init__(self, knockout: Knockout, cfg, block, layer: int):
        self.knockout, self.cfg, self.block, self.layer = knockout, cfg, block, layer

    def channel_mask(self, n_channels: int, device) -> Optional[Tensor]:
        """Which conv channels lose their taps: all, Mamba-1 ``channels``, or Mamba-2 ``heads``."""
        cfg, ko = self.cfg, self.knockout
        features = ko.features(cfg, self.layer, device)
        if cfg.family == "mamba1" or features is None:
            return features
        heads = features
        x_channels = heads.repeat_interleave(cfg.d_head)  # [e]
        # B and C are shared by a group's heads: only groups whose heads are all chosen lose their taps
        whole_groups = heads.view(cfg.n_groups, -1).min(-1).values  # [g]
        bc = whole_groups.repeat_interleave(cfg.d_state)  # [g * n]
        return torch.cat([x_channels, bc, bc])

    def __call__(self, conv: Tensor, hook) -> Tensor:
        taps = getattr(hook, "conv_taps", None)
        if taps is None or taps.conv_input.shape != conv.shape:
            raise RuntimeError(f"{hook.name}: a conv knockout needs the conv input of this forward, which the "
                               "block hands to hook_conv; this hook point was called outside a block's forward")
        return self.remove_taps(conv, taps)

    def remove_taps(self, conv: Tensor, taps: ConvTaps) -> Tensor:
        """``conv`` less this knockout's taps that no other knockout removed in this call (once)."""
        if id(self) in taps.applied:  # run_hook_conv applied it before the other hooks
            return conv
        taps.applied.add(id(self))
        b, p, c = conv.shape
        (sources, host_sources), (targets, host_targets) = (self.knockout.masks(what, b, p, conv.device)
                                                            for what in ("sources", "targets"))
        if self.knockout.path == "conv" and host_sources is not None and host_targets is not None:
            # (with "both", sources beyond the conv window are the SSM path's edges, not an error)
            self.knockout.warn_if_no_edges(host_sources, host_targets, window=self.block.mixer.conv1d.weight.shape[-1])
        mine = EdgeRemoval(sources=sources.to(conv.dtype), targets=targets.to(conv.dtype),
                           features=self.channel_mask(c, conv.device),
                           source_positions=None if host_sources is None else host_sources.any(0).nonzero()[:, 0],
                           target_positions=None if host_targets is None else host_targets.any(0).nonzero()[:, 0])
        pieces = outside(mine, taps.removed)  # less the taps another knockout here removed already
        taps.removed.append(mine)
        weight = self.block.mixer.conv1d.weight
        for piece in pieces:
            carried, _ = causal_conv1d(taps.conv_input * piece.sources[..., None].to(conv.dtype), weight, None)
            removed = carried * piece.targets[..., None].to(conv.dtype)  # [b, p, c]
            if piece.features is not None:
                removed = removed * piece.features.to(conv.dtype)
            conv = conv - removed.to(conv.dtype)
        return conv


def structured_removals(hook_point, b: int, p: int, device) -> Optional[List[EdgeRemoval]]:
    """The Knockouts on ``hook_ssm_mask`` in structured form, if they are all that hooks it
    (however attached: :func:`_knockout_hooks_on`).

    Returns None when the mask must be built: no hook, a hook that is not a
    Knockout (a user hook, a cache hook, a torch hook registered on the hook point
    directly) or a backward hook. Knockouts that share edges come back as disjoint
    pieces (their union, each edge once).
    """
    knockouts = [fn for fn in _knockout_hooks_on(hook_point) if isinstance(fn, SSMMaskKnockoutHook)]
    if not knockouts or hook_point._backward_hooks or len(knockouts) != len(hook_point._forward_hooks):
        return None
    return disjoint_removals([fn.removal(b, p, device) for fn in knockouts])


def _live_knockouts(hook_point) -> dict:
    """The Knockout hooks registered on ``hook_point`` that are still attached, by torch's
    handle id (forgetting those that ``reset_hooks`` removed)."""
    registry = getattr(hook_point, "_tl_mamba_knockouts", None)
    if not registry:
        return {}
    live = hook_point._forward_hooks  # keyed by those ids
    for key in [key for key in registry if key not in live]:
        del registry[key]
    return registry


def _knockout_hooks_on(hook_point) -> list:
    """The Knockout hook objects attached to ``hook_point`` (registered by ``add_knockout_hooks``,
    or found through TransformerLens' ``LensHandle.user_hook`` where it has one), each once."""
    found = []
    for fn in list(_live_knockouts(hook_point).values()) + [getattr(h, "user_hook", None) for h in hook_point.fwd_hooks]:
        if isinstance(fn, (SSMMaskKnockoutHook, ConvKnockoutHook)) and all(fn is not other for other in found):
            found.append(fn)
    return found


def active_knockouts(model) -> List[Knockout]:
    """The Knockouts whose hooks are attached to ``model``: by ``model.knockouts``,
    ``run_with_knockout``, or ``ko.hooks(model)`` given to ``model.hooks`` / ``add_hook``
    (found through TransformerLens' ``LensHandle.user_hook``, where it has one).

    Their positions index the whole sequence, so a recurrent ``generate`` step, which sees
    only the new token, cannot honour them (``sources=[0]`` would be the new token itself):
    ``generate`` re-runs the whole sequence at each step instead. Other hooks, a
    hand-written one on ``hook_ssm_mask`` included, see each step's one-token tensors.
    """
    found: List[Knockout] = []
    for layer in range(model.cfg.n_layers):
        for name in (f"blocks.{layer}.hook_ssm_mask", f"blocks.{layer}.hook_conv"):
            for fn in _knockout_hooks_on(model.mod_dict[name]):
                if all(fn.knockout is not other for other in found):
                    found.append(fn.knockout)
    return found


def warn_knockouts_on_padding(model, attention_mask: Tensor) -> None:
    """Warn (once per Knockout) for every Knockout attached to ``model`` whose sources or targets
    fall on padding in some row of ``attention_mask`` ``[b, p]`` (1 = real token): the
    model's forward calls this for padded input, so it holds however the knockout was attached."""
    waiting = [ko for ko in active_knockouts(model) if not ko._warned_padding]
    if waiting:
        host = attention_mask.detach().to("cpu")
        for ko in waiting:
            ko.warn_if_on_padding(host)


def add_knockout_hooks(model, knockouts: Sequence[Knockout]) -> List[Tuple[object, object]]:
    """Register the knockouts' hooks on ``model``; returns ``(hook point, handle)`` pairs.

    All or nothing: every Knockout is checked against the model (``ko.hooks(model)`` raises on a
    layer or head out of range) before any hook is registered, so a bad Knockout late in a list
    cannot leave the earlier ones attached to every later forward.
    """
    planned = [(name, fn) for ko in knockouts for name, fn in ko.hooks(model)]
    added: List[Tuple[object, object]] = []
    try:
        for name, fn in planned:
            hook_point = model.mod_dict[name]
            hook_point.add_hook(fn, dir="fwd")
            handle = hook_point.fwd_hooks[-1]
            # registered: the SSM hooks so that the block can skip the mask (structured_removals),
            # the conv ones so that generate knows to re-run the whole sequence (active_knockouts)
            if isinstance(fn, SSMMaskKnockoutHook) or name.endswith(".hook_conv"):
                if getattr(hook_point, "_tl_mamba_knockouts", None) is None:
                    hook_point._tl_mamba_knockouts = {}
                hook_point._tl_mamba_knockouts[handle.hook.id] = fn  # torch's handle id: never reused
            added.append((hook_point, handle))
    except BaseException:
        remove_knockout_hooks(added)
        raise
    return added


def remove_knockout_hooks(added: Sequence[Tuple[object, object]]) -> None:
    """Undo :func:`add_knockout_hooks`: remove exactly the hooks it registered."""
    for hook_point, handle in added:
        handle.hook.remove()
        hook_point.fwd_hooks[:] = [h for h in hook_point.fwd_hooks if h is not handle]
        (getattr(hook_point, "_tl_mamba_knockouts", None) or {}).pop(handle.hook.id, None)


def as_knockout_list(knockouts) -> List[Knockout]:
    if isinstance(knockouts, Knockout):
        return [knockouts]
    knockouts = list(knockouts)
    for ko in knockouts:
        if not isinstance(ko, Knockout):
            raise TypeError(f"expected a Knockout or a list of Knockouts, got {type(ko).__name__}")
    return knockouts


@contextlib.contextmanager
def knockouts_context(model, knockouts) -> Iterator[None]:
    """``with model.knockouts(ko):``: the knockouts' hooks are active inside the block."""
    added = add_knockout_hooks(model, as_knockout_list(knockouts))
    try:
        yield
    finally:
        remove_knockout_hooks(added)
