"""Circuits of SAE features: evaluate a set of kept features, and find the smallest set that
reaches a target faithfulness.

The evaluation of the Mamba IOI report (Ensign, 2024) and of sparse feature circuits (Marks
et al., 2024): run the clean prompts with every SAE spliced in; at each site the features *in*
the circuit keep their live value, every other feature takes its value on the corrupted
prompt, and so does the SAE's error term unless ``keep_error``:

    a' = decode(where(kept, f_live, f_corr)) + (ε_live if keep_error else ε_corr)

With every feature (and the error) kept the run is the clean one; with none kept and the
error patched, every site holds its corrupted activation. Sites are patched together, in
one forward, so a later site's live features see the earlier sites' patches.

``faithfulness = (metric(circuit) - metric(corrupted)) / (metric(clean) - metric(corrupted))``
of the means over prompts, as :func:`tl_mamba.circuits.faithfulness` for edge circuits.

:func:`smallest_feature_circuit` ranks the features of every site together by
``|score|`` (from :func:`~tl_mamba.circuits.feature_attribution`, optionally only those
firing on at least ``min_frequency`` of the tokens, or of the prompts) and binary-searches
the smallest top-k reaching ``target``. The search assumes faithfulness grows with k, which
is typical but not guaranteed: it returns the curve it measured, so a non-monotone case shows.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_mamba.circuits.progress import hide_progress
from tl_mamba.circuits.eap import (_per_prompt, circuit_faithfulness, count_batches, iter_batches, mean_baselines,
                                   read_once)
from tl_mamba.circuits.feature_attribution import FeatureScores, _encode, _flat, _sae_parts, _sae_setting, check_saes
from tl_mamba.errors import OutOfRangeError, caller_stacklevel
from tl_mamba.knockout import _index_list, _refuse_an_int_mask

Kept = Mapping[str, Sequence[int]]


def evaluate_features(model, saes: Mapping[str, object], kept: Kept, clean, corrupted=None,
                      metric: Callable = None, *, keep_error: bool = False, labels=None,
                      batch_size: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                      quiet: Optional[bool] = None, progress: Optional[bool] = None) -> Tensor:
    """Per-prompt metric ``[N]`` of the clean prompts with only the ``kept`` features clean.

    Args:
        saes: ``{hook name: sae}`` (as for :func:`~tl_mamba.circuits.feature_attribution`).
        kept: ``{hook name: feature indices}`` kept at their live value; a site of ``saes``
            missing here keeps none (all its features take their corrupted values).
        keep_error: keep each SAE's error term live too (default: corrupted, so that an empty
            circuit is the corrupted run).
        clean, corrupted, metric, labels, batch_size, attention_mask: as in
            :func:`~tl_mamba.circuits.evaluate_graph`.
    """
    quiet = hide_progress(quiet, progress, False)
    if metric is None:
        raise TypeError("evaluate_features() needs a metric")
    saes, kept_indices = _check_kept(model, saes, kept)
    masks: Dict[str, Tensor] = {}
    out: List[Tensor] = []
    batches = iter_batches(clean, corrupted, labels, batch_size, attention_mask)
    for clean_tokens, corrupted_tokens, batch_labels, mask in tqdm(
            batches, desc="evaluate features", total=count_batches(clean, batch_size), disable=quiet,
            leave=False, unit="batch"):
        corrupted_parts = _sae_parts(model, saes, corrupted_tokens, mask)  # {hook: (features, error)}
        for name, (features, _) in corrupted_parts.items():
            if name not in masks:
                masks[name] = _kept_mask(name, kept_indices[name], features.shape[-1])
        with torch.no_grad():

            def splice(act: Tensor, hook) -> Tensor:
                sae = saes[hook.name]
                flat = _flat(act)
                live = _encode(sae, hook.name, flat)
                f_corr, err_corr = corrupted_parts[hook.name]
                keep = masks[hook.name].to(live.device)
                features = torch.where(keep, live, f_corr.to(live.dtype))
                error = flat - sae.decode(live).to(flat.dtype) if keep_error else err_corr.to(flat.dtype)
                return (sae.decode(features).to(flat.dtype) + error).reshape(act.shape)

            logits = model.run_with_hooks(clean_tokens, fwd_hooks=[(name, splice) for name in saes],
                                          attention_mask=mask)
        out.append(_per_prompt(metric, logits, batch_labels, clean_tokens.shape[0]))
    if not out:
        raise ValueError("no prompts: the data was empty")
    return torch.cat(out)


def feature_faithfulness(model, saes: Mapping[str, object], kept: Kept, clean, corrupted=None,
                         metric: Callable = None, *, keep_error: bool = False, labels=None,
                         batch_size: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                         baselines: Optional[Tuple[float, float]] = None, quiet: Optional[bool] = None,
                         progress: Optional[bool] = None) -> float:
    """``(circuit - corrupted) / (clean - corrupted)`` of the mean metric, the circuit being
    :func:`evaluate_features` of ``kept``; ``baselines`` = ``(clean, corrupted)`` means when known."""
    quiet = hide_progress(quiet, progress, False)
    if metric is None:
        raise TypeError("feature_faithfulness() needs a metric")
    return circuit_faithfulness(
        model, lambda clean, corrupted, **kw: evaluate_features(model, saes, kept, clean, corrupted, metric,
                                                                keep_error=keep_error, quiet=quiet, **kw),
        clean, corrupted, metric, labels=labels, batch_size=batch_size, attention_mask=attention_mask,
        baselines=baselines)


@dataclass
class FeatureCircuit:
    """What :func:`smallest_feature_circuit` found.

    Attributes:
        k: the number of features kept (``None`` if even every ranked feature misses ``target``).
        kept: ``{hook name: feature indices}`` of that circuit (empty lists where none).
        faithfulness: its faithfulness.
        curve: every ``(k, faithfulness)`` measured, by k.
        ranked: the ranked features ``(hook name, feature, score)``, most important first.
    """

    k: Optional[int]
    kept: Dict[str, List[int]]
    faithfulness: float
    curve: List[Tuple[int, float]] = field(default_factory=list)
    ranked: List[Tuple[str, int, float]] = field(default_factory=list)


def smallest_feature_circuit(model, saes: Mapping[str, object], scores: Mapping[str, FeatureScores], clean,
                             corrupted=None, metric: Callable = None, *, target: float = 0.8,
                             min_frequency: float = 0.0, weight_by_frequency: bool = False,
                             frequency_of: str = "tokens", keep_error: bool = False, labels=None,
                             batch_size: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                             progress: Optional[bool] = None, quiet: Optional[bool] = None) -> FeatureCircuit:
    """The smallest top-k of the features, ranked across sites by ``|score|``, whose
    :func:`feature_faithfulness` reaches ``target`` (binary search: about log2 of the number of
    ranked features evaluations, plus the two baselines).

    Args:
        scores: ``{hook name: FeatureScores}`` from :func:`~tl_mamba.circuits.feature_attribution`
            (each site's features summed over positions), for the sites of ``saes``.
        target: the faithfulness to reach (default 0.8).
        min_frequency: rank only features firing on at least this share of the clean tokens
            (``FeatureScores.frequency``), or of the clean prompts with ``frequency_of="prompts"``
            (``prompt_frequency``): features firing on a prompt or two often score high by chance.
            The Mamba IOI report's filter counts prompts: ``min_frequency=0.1,
            frequency_of="prompts"`` (a share of tokens of 0.1 leaves out a feature that fires on
            the IO name in every prompt, one token of ~15).
        weight_by_frequency: rank by ``|score| × frequency`` (the report's "attribution × count",
            about 10% smaller circuits there) instead of ``|score|``.
        frequency_of: ``"tokens"`` (default) or ``"prompts"``: the frequency both use.
        keep_error: keep each SAE's error term live too, as in :func:`evaluate_features`.
        labels, batch_size, attention_mask: the data arguments of
            :func:`~tl_mamba.circuits.feature_attribution` (and :func:`tl_mamba.circuits.attribute`).
        progress: a tqdm bar over the evaluations (default); ``quiet=True``, as the other feature
            tools spell it, is ``progress=False``.
    """
    progress = not hide_progress(quiet, progress, False)
    if metric is None:
        raise TypeError("smallest_feature_circuit() needs a metric")
    if isinstance(scores, FeatureScores):
        raise TypeError("scores must be {hook name: FeatureScores}, as feature_attribution returns it, got one "
                        "FeatureScores: pass the whole dict (or {hook: scores} for one site)")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"target must be a finite faithfulness (e.g. 0.8), got {target!r}")
    missing, extra = sorted(set(saes) - set(scores)), sorted(set(scores) - set(saes))
    if missing or extra:
        raise ValueError(f"scores and saes must name the same sites: no scores for {missing}, no SAE for {extra} "
                         "(pass feature_attribution's result for these SAEs)")
    for name, site in scores.items():
        if not isinstance(site, FeatureScores):
            raise TypeError(f"scores[{name!r}] must be the FeatureScores feature_attribution returns, "
                            f"got {type(site).__name__}")
        width = _declared_width(saes[name])
        if width is not None and site.frequency.numel() != width:
            raise ValueError(f"scores[{name!r}] are for {site.frequency.numel()} features, but the SAE given for "
                             f"{name} has {width}: pass feature_attribution's result for these SAEs")
        if not bool(torch.isfinite(site.scores).all()):
            bad = torch.nonzero(~torch.isfinite(site.scores.reshape(-1, site.scores.shape[-1])).any(0)).flatten()
            raise ValueError(f"scores[{name!r}] has NaN or infinite scores (features {bad[:8].tolist()}): they "
                             "cannot be ranked")
    ranked = [(name, feature, score, frequency) for name in saes for feature, score, frequency
              in scores[name].top(scores[name].frequency.numel(), min_frequency, weight_by_frequency, frequency_of)]
    # across sites (stable: a site's order kept on ties)
    ranked.sort(key=lambda item: -abs(item[2]) * (item[3] if weight_by_frequency else 1))
    ranked = [item[:3] for item in ranked]
    clean, corrupted, kw = read_once(clean, corrupted, labels, batch_size, attention_mask)
    baselines = mean_baselines(model, clean, corrupted, metric, **kw)
    measured: Dict[int, float] = {}
    bar = tqdm(desc="feature circuit search", disable=not progress, leave=False, unit="circuit")

    def faithfulness_of(k: int) -> float:
        if k not in measured:
            measured[k] = feature_faithfulness(model, saes, _kept(ranked[:k], saes), clean, corrupted, metric,
                                               keep_error=keep_error, baselines=baselines, quiet=True, **kw)
            bar.update(1)
        return measured[k]

    low, high = 0, len(ranked)  # invariant: faithfulness_of(high) >= target, or high == len(ranked) unchecked
    if faithfulness_of(high) < target:
        bar.close()
        warnings.warn(f"all {len(ranked)} ranked features together reach a faithfulness of {measured[high]:.3f}, "
                      f"under the target {target}: the full set does not ("
                      + ("with keep_error=True every feature kept is the clean run, faithfulness 1"
                         if keep_error else "what the SAEs do not explain, their error terms, is patched; "
                         "keep_error=True keeps it live")
                      + ("; min_frequency left features out" if min_frequency > 0 else "") + ")",
                      stacklevel=2)
        return FeatureCircuit(k=None, kept=_kept(ranked, saes), faithfulness=measured[high],
                              curve=sorted(measured.items()), ranked=ranked)
    if not keep_error and abs(faithfulness_of(0)) > 0.1:
        warnings.warn(
            f"with no feature kept the circuit already reaches a faithfulness of {measured[0]:.3f}: the SAE sites "
            f"{sorted(saes)} do not cut every path from the input to the logits (one hook_mixer_out leaves the "
            "residual stream around it clean; even hook_mixer_out of every layer leaves the embedding's direct "
            "path), so k counts only what these sites add to that. A hook_resid_pre site is a cut: with it the "
            "empty circuit is the corrupted run",
            stacklevel=caller_stacklevel())
    while low < high:
        middle = (low + high) // 2
        if faithfulness_of(middle) >= target:
            high = middle
        else:
            low = middle + 1
    bar.close()
    return FeatureCircuit(k=high, kept=_kept(ranked[:high], saes), faithfulness=faithfulness_of(high),
                          curve=sorted(measured.items()), ranked=ranked)


def _declared_width(sae) -> Optional[int]:
    """The SAE's number of features where it says (sae-lens' ``cfg.d_sae``, or a ``W_dec``
    ``[d_sae, d_in]``), else None (known only once it encodes)."""
    width = _sae_setting(sae, "d_sae")
    if width is None and isinstance(getattr(sae, "W_dec", None), Tensor):
        width = sae.W_dec.shape[0]
    return int(width) if width is not None else None


def _kept(ranked: Sequence[Tuple[str, int, float]], saes) -> Dict[str, List[int]]:
    kept: Dict[str, List[int]] = {name: [] for name in saes}
    for name, feature, _ in ranked:
        kept[name].append(feature)
    return kept


def _check_kept(model, saes: Mapping[str, object], kept: Kept) -> Tuple[Dict[str, object], Dict[str, object]]:
    """The checked SAEs (:func:`~tl_mamba.circuits.feature_attribution.check_saes`) and what ``kept``
    gives for each site (read against the SAE's width once it is known: :func:`_kept_mask`)."""
    views = check_saes(model, saes)
    if not isinstance(kept, Mapping):
        raise TypeError(f"kept must be {{hook name: feature indices or a bool mask}}, got {type(kept).__name__}")
    unknown = sorted(set(kept) - set(views))
    if unknown:
        raise ValueError(f"kept names sites without an SAE: {unknown} (the SAEs are at {sorted(views)})")
    return views, {name: kept.get(name, []) for name in views}


def _kept_mask(name: str, chosen, d_sae: int) -> Tensor:
    """``[d_sae]`` bool, True at the kept features: ``chosen`` is feature indices (negative count
    from the end) or a bool mask ``[d_sae]`` (e.g. ``scores.frequency > 0.1``)."""
    if isinstance(chosen, Tensor) and chosen.dtype == torch.bool:
        if tuple(chosen.shape) != (d_sae,):
            raise ValueError(f"kept[{name!r}]: a bool mask must have the SAE's {d_sae} entries, "
                             f"got shape {tuple(chosen.shape)}")
        return chosen.cpu()
    given = _index_list(chosen, "features", owner=f"kept[{name!r}]")
    outside = [i for i in given if not -d_sae <= i < d_sae]
    if outside:
        raise OutOfRangeError(f"kept features {outside} of {name} are outside its SAE's {d_sae} features")
    _refuse_an_int_mask(given, d_sae, "features", "features", owner=f"kept[{name!r}]")  # (acts > 0).long()
    mask = torch.zeros(d_sae, dtype=torch.bool)
    mask[[i % d_sae for i in given]] = True
    return mask
