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
firing on at least ``min_frequency`` of the tokens) and binary-searches the smallest top-k
reaching ``target``. The search assumes faithfulness grows with k, which is typical but not
guaranteed: it returns the curve it measured, so a non-monotone case shows.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_mamba.circuits.eap import _per_prompt, count_batches, evaluate_baseline, iter_batches
from tl_mamba.circuits.feature_attribution import FeatureScores, _encode, _flat, _one_head, _sae_parts

Kept = Mapping[str, Sequence[int]]


def evaluate_features(model, saes: Mapping[str, object], kept: Kept, clean, corrupted=None,
                      metric: Callable = None, *, keep_error: bool = False, labels=None,
                      batch_size: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                      quiet: bool = False) -> Tensor:
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
                masks[name] = _feature_mask(name, kept_indices[name], features.shape[-1])
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
                         baselines: Optional[Tuple[float, float]] = None, quiet: bool = False) -> float:
    """``(circuit - corrupted) / (clean - corrupted)`` of the mean metric, the circuit being
    :func:`evaluate_features` of ``kept``; ``baselines`` = ``(clean, corrupted)`` means when known."""
    kw = dict(labels=labels, batch_size=batch_size, attention_mask=attention_mask)
    if not isinstance(clean, Tensor):
        clean = list(iter_batches(clean, corrupted, labels, batch_size))  # iterate the dataloader once
        corrupted, kw = None, {}
    circuit = float(evaluate_features(model, saes, kept, clean, corrupted, metric, keep_error=keep_error,
                                      quiet=quiet, **kw).mean())
    clean_value, corrupted_value = baselines if baselines is not None else _baselines(model, clean, corrupted,
                                                                                       metric, kw)
    gap = clean_value - corrupted_value
    if abs(gap) < 1e-8:
        raise ValueError("the metric is the same on clean and corrupted prompts: faithfulness is undefined")
    return (circuit - corrupted_value) / gap


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
                             min_frequency: float = 0.0, keep_error: bool = False, labels=None,
                             batch_size: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                             progress: bool = True) -> FeatureCircuit:
    """The smallest top-k of the features, ranked across sites by ``|score|``, whose
    :func:`feature_faithfulness` reaches ``target`` (binary search: about log2 of the number of
    ranked features evaluations, plus the two baselines).

    Args:
        scores: ``{hook name: FeatureScores}`` from :func:`~tl_mamba.circuits.feature_attribution`
            (each site's features summed over positions), for the sites of ``saes``.
        target: the faithfulness to reach (default 0.8).
        min_frequency: rank only features firing on at least this share of the clean tokens
            (``FeatureScores.frequency``): features firing on a prompt or two often score high by
            chance (the Mamba IOI report kept features firing on more than a tenth of them).
        progress: a tqdm bar over the evaluations.
    """
    if metric is None:
        raise TypeError("smallest_feature_circuit() needs a metric")
    missing = sorted(set(saes) - set(scores))
    if missing:
        raise ValueError(f"no scores for the sites {missing}: pass feature_attribution's result for every SAE")
    ranked = []
    for name in saes:
        site = scores[name]
        total = site.scores.sum(0) if site.scores.ndim == 2 else site.scores
        for feature in torch.nonzero(site.frequency >= min_frequency).flatten().tolist():
            ranked.append((name, feature, float(total[feature])))
    ranked.sort(key=lambda item: -abs(item[2]))
    kw = dict(labels=labels, batch_size=batch_size, attention_mask=attention_mask)
    if not isinstance(clean, Tensor):
        clean = list(iter_batches(clean, corrupted, labels, batch_size))
        corrupted, kw = None, {}
    baselines = _baselines(model, clean, corrupted, metric, kw)
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
                      f"under the target {target}: no circuit of them does (what the SAEs do not explain, their "
                      "error terms, is patched" + ("" if keep_error else "; keep_error=True keeps it live")
                      + (", and min_frequency left features out" if min_frequency > 0 else "") + ")",
                      stacklevel=2)
        return FeatureCircuit(k=None, kept=_kept(ranked, saes), faithfulness=measured[high],
                              curve=sorted(measured.items()), ranked=ranked)
    while low < high:
        middle = (low + high) // 2
        if faithfulness_of(middle) >= target:
            high = middle
        else:
            low = middle + 1
    bar.close()
    return FeatureCircuit(k=high, kept=_kept(ranked[:high], saes), faithfulness=faithfulness_of(high),
                          curve=sorted(measured.items()), ranked=ranked)


def _kept(ranked: Sequence[Tuple[str, int, float]], saes) -> Dict[str, List[int]]:
    kept: Dict[str, List[int]] = {name: [] for name in saes}
    for name, feature, _ in ranked:
        kept[name].append(feature)
    return kept


def _baselines(model, clean, corrupted, metric, kw) -> Tuple[float, float]:
    clean_value = float(evaluate_baseline(model, clean, corrupted, metric, **kw).mean())
    corrupted_value = float(evaluate_baseline(model, clean, corrupted, metric, run_corrupted=True, **kw).mean())
    return clean_value, corrupted_value


def _check_kept(model, saes: Mapping[str, object], kept: Kept) -> Tuple[Dict[str, object], Dict[str, List[int]]]:
    """The SAEs (a one-head SAE viewed over its flattened hook) and the kept indices of each site."""
    if not saes:
        raise ValueError("saes is empty: give {hook name: sae}")
    if not isinstance(kept, Mapping):
        raise TypeError(f"kept must be {{hook name: feature indices}}, got {type(kept).__name__}")
    unknown = sorted(set(kept) - set(saes))
    if unknown:
        raise ValueError(f"kept names sites without an SAE: {unknown} (the SAEs are at {sorted(saes)})")
    views, indices = {}, {}
    for name, sae in saes.items():
        model.check_hook_name(name)
        if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
            raise TypeError(f"the SAE for {name} needs encode(act) and decode(features) methods, "
                            f"got {type(sae).__name__}")
        views[name] = _one_head(model, name, sae)
        indices[name] = [int(i) for i in torch.as_tensor(list(kept.get(name, [])), dtype=torch.long).tolist()]
    return views, indices


def _feature_mask(name: str, indices: List[int], d_sae: int) -> Tensor:
    """``[d_sae]`` bool, True at the kept features."""
    outside = [i for i in indices if not 0 <= i < d_sae]
    if outside:
        raise IndexError(f"kept features {outside} of {name} are outside its SAE's {d_sae} features")
    mask = torch.zeros(d_sae, dtype=torch.bool)
    mask[indices] = True
    return mask
