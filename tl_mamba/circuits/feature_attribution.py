"""Attribution patching on sparse-autoencoder features: which SAE features carry a task.

The workflow of the Mamba IOI reports (top-k SAEs on the inputs of the layers, then
attribution patching with integrated gradients on their features) and of sparse
feature circuits (Marks et al., 2024). Each hooked activation ``a`` is split by its
SAE into features and an error term,

    f = sae.encode(a)            a = sae.decode(f) + ε,   ε = a - sae.decode(f)

and the forward carries ``decode(f) + ε``, which is ``a`` itself: the model's outputs
do not change, but ``f`` and ``ε`` are now nodes with gradients. Scores follow the sign
convention of :func:`tl_mamba.circuits.attribute` (corrupted minus clean):

- ``"EAP"``: ``(f_corr - f_clean) · ∂metric/∂f`` at the clean run, one backward for
  every site at once: the first-order estimate of ``metric(that feature alone patched to
  its corrupted value) - metric(clean)``, good when the patch is small;
- ``"EAP-IG"``: the gradient averaged over ``ig_steps`` runs in which this site's
  features and error are interpolated together, ``f_corr + α (f_clean - f_corr)`` for
  α = k / ig_steps, k = 1..ig_steps, with everything upstream clean (one set of runs per
  site, as sparse feature circuits do). This splits the effect of patching the whole
  site among its features and error: at a site that cuts the whole computation (a
  ``hook_resid_pre``) they add up to ``metric(corrupted) - metric(clean)`` as ig_steps
  grows (completeness). Where features interact (the effect of patching several is not
  the sum of patching each), a feature's share is not the effect of patching it alone:
  on toy-mamba2's IOI, with an SAE at ``blocks.1.hook_resid_pre``, the top IG scores
  were 1.5-5x their single-feature patches, and ranked the top 10 better than EAP did.

Scores are summed over positions (``per_position=True`` keeps them ``[p, d_sae]``) and
averaged over prompts. ``frequency`` counts how often each feature fires on the clean
prompts (a share of real tokens): features that fire on one prompt only often score
high by chance, so :meth:`FeatureScores.top` can drop the rare ones.

An SAE is anything with ``encode(a) -> f`` and ``decode(f) -> a`` (an sae-lens
``SAE``, or a plain module). A hook with more than three dims (a per-head
``[b, p, h, hd]``) is flattened to ``[b, p, h*hd]`` for its SAE and back after. An
sae-lens SAE trained on one head (``hook_head_index=i`` in its config) reads that head
``[b, p, hd]``; the other heads are in its error term (so EAP-IG interpolates them with
the site).

``hook_h`` (the recurrent state) is refused for ``"EAP"``. A feature patched to its
corrupted value edits the state at every position where the feature changes, and an
edited state is pinned: an edit at t reaches later states only until the next edited
position. The gradient at the clean run, where nothing is edited, carries each state
through every later state, so it overestimates any patch that edits consecutive
positions (toy-mamba, layer 1, a feature changing at 36% of the positions: 0.259
against 0.061 by finite differences, 2026-12-06; an independent audit saw 3-6x).
``"EAP-IG"`` takes its steps off the clean run, where the interpolated site edits every
position, except the last (α = 1): it warns, and is close (toy-mamba: -23.75 with 5
steps, -22.62 with 50, against -22.48 for patching the site).

Data, metric, ``labels``, ``batch_size`` and ``attention_mask`` (left padding) are as in
:func:`tl_mamba.circuits.attribute`; padded positions score nothing and count nothing.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_mamba.circuits.progress import hide_progress
from tl_mamba.circuits.eap import _metric_values, _score_dtype, count_batches, iter_batches, method_steps
from tl_mamba.circuits.patching import _MAMBA2_HEAD_HOOKS as PER_HEAD_HOOKS  # [b, p, h, hd] and hook_h
from tl_mamba.errors import caller_stacklevel

METHODS = ("EAP", "EAP-IG")


@dataclass
class FeatureScores:
    """One site's attribution scores.

    Attributes:
        hook: the hook name the SAE reads.
        scores: ``[d_sae]`` (``[p, d_sae]`` when per position), the mean over prompts of
            each feature's score (EAP: its estimated effect of patching it alone to its
            corrupted value; EAP-IG: its share of the effect of patching the site; see the module).
        error: ``[]`` (``[p]``) the same for the SAE's error term ε.
        frequency: ``[d_sae]``, the share of real clean tokens on which the feature is non-zero.
        prompt_frequency: ``[d_sae]``, the share of clean prompts in which it is non-zero at some
            real token (the Mamba IOI report's count: a feature of the IO name fires on one token
            of each prompt, a share of tokens of about 1 / p but of prompts up to 1).
    """

    hook: str
    scores: Tensor
    error: Tensor
    frequency: Tensor
    prompt_frequency: Tensor

    def frequency_of(self, unit: str) -> Tensor:
        """``frequency`` (``unit="tokens"``) or ``prompt_frequency`` (``"prompts"``)."""
        if unit not in FREQUENCY_UNITS:
            raise ValueError(f"frequency_of must be one of {FREQUENCY_UNITS}, got {unit!r}")
        return self.frequency if unit == "tokens" else self.prompt_frequency

    def top(self, k: int = 20, min_frequency: float = 0.0, weight_by_frequency: bool = False,
            frequency_of: str = "tokens") -> List[Tuple[int, float, float]]:
        """The ``k`` features with the largest ``|score|`` (summed over positions) among those
        firing on at least ``min_frequency`` of the clean tokens (``frequency_of="prompts"``: of
        the clean prompts, the Mamba IOI report's filter): ``(feature, score, frequency)``, the
        frequency in that unit. ``weight_by_frequency`` ranks by ``|score| × frequency`` instead
        (the report's "attribution × count", which demotes features that score high on a prompt
        or two); the score returned is still the score."""
        frequency = self.frequency_of(frequency_of)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0 (how many features), got {k!r}")
        if not 0.0 <= min_frequency <= 1.0:
            raise ValueError(f"min_frequency is a share of {frequency_of} in [0, 1], got {min_frequency}")
        total = self.scores.sum(0) if self.scores.ndim == 2 else self.scores
        keep = torch.nonzero(frequency >= min_frequency).flatten()
        key = total[keep].abs() * (frequency[keep].to(total.dtype) if weight_by_frequency else 1)
        order = keep[key.argsort(descending=True, stable=True)][:k]
        return [(int(i), float(total[i]), float(frequency[i])) for i in order]


#: What ``FeatureScores.top`` / ``smallest_feature_circuit`` count a feature's frequency in.
FREQUENCY_UNITS = ("tokens", "prompts")


def feature_attribution(model, saes: Mapping[str, object], clean, corrupted=None, metric: Callable = None,
                        method: str = "EAP", ig_steps: Optional[int] = None, *, labels=None,
                        batch_size: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                        per_position: bool = False, quiet: Optional[bool] = None,
                        progress: Optional[bool] = None) -> Dict[str, FeatureScores]:
    """Score every feature of every SAE in ``saes`` (``{hook name: sae}``), as explained after the Returns.

    Returns:
        ``{hook name: FeatureScores}``.
    """
    quiet = hide_progress(quiet, progress, False)
    if metric is None:
        raise TypeError("feature_attribution() needs a metric: metric(logits) or metric(logits, labels)")
    steps = method_steps(method, ig_steps, METHODS)
    saes = check_saes(model, saes)
    for name in saes:
        if name.endswith("hook_h"):
            if steps == 1:
                given = f"method={method!r}" + ("" if method == "EAP" else " with ig_steps=1 (EAP)")
                raise ValueError(
                    f"{given} at {name}: patching a feature of the state edits every position where it "
                    "changes, and an edited state is pinned (an edit reaches later states only until the next "
                    "edited position), while the gradient at the clean run carries each state through every later "
                    "state: EAP overestimated such patches 3-6x on the toy models. Use method='EAP-IG', or an "
                    "SAE on hook_y (C·h + D·x) or hook_x (see the module docstring).")
            warnings.warn(
                f"EAP-IG at {name}: its last step (α = 1) takes the gradient at the clean states, the total "
                "derivative, where the other steps edit (pin) every state: the scores overshoot "
                "(5-12% with 5 steps on toy-mamba's IOI), less as ig_steps grows (1% at 50).", stacklevel=2)

    totals: Dict[str, List[Tensor]] = {}
    n_prompts = 0
    batches = iter_batches(clean, corrupted, labels, batch_size, attention_mask)
    # the bar counts gradient passes: one per batch for EAP, sites × ig_steps per batch for EAP-IG
    passes = 1 if steps == 1 else len(saes) * steps
    n_batches = count_batches(clean, batch_size)
    bar = tqdm(desc=f"{method} feature attribution", total=None if n_batches is None else n_batches * passes,
               disable=quiet, leave=False, unit="pass")
    for clean_tokens, corrupted_tokens, batch_labels, mask in batches:
        b = clean_tokens.shape[0]
        real = (torch.ones_like(clean_tokens) if mask is None else mask).to(torch.float64)  # [b, p]
        clean_parts = _sae_parts(model, saes, clean_tokens, mask)
        corrupted_parts = _sae_parts(model, saes, corrupted_tokens, mask)
        # which runs: EAP reads every site from one clean run; EAP-IG interpolates one site at a time
        runs = [None] if steps == 1 else list(saes)
        grads: Dict[str, Tuple[Tensor, Tensor]] = {}
        for site in runs:
            for k in range(1, steps + 1):
                alpha = k / steps
                step_grads = _site_grads(model, saes, clean_tokens, mask, metric, batch_labels, b,
                                         clean_parts, corrupted_parts, site, alpha)
                bar.update(1)
                for name, (g_f, g_err) in step_grads.items():
                    if name in grads:
                        grads[name] = (grads[name][0] + g_f, grads[name][1] + g_err)
                    else:
                        grads[name] = (g_f, g_err)
        for name in saes:
            f_clean, err_clean = clean_parts[name]
            f_corr, err_corr = corrupted_parts[name]
            g_f, g_err = (g / steps for g in grads[name])
            weight = real[..., None]
            per_pos_f = ((f_corr - f_clean).double() * g_f.double() * weight).sum(0)  # [p, d_sae]
            per_pos_err = ((err_corr - err_clean).double() * g_err.double() * weight).sum((0, 2))  # [p]
            live = (f_clean != 0).double() * weight  # [b, p, d_sae]
            fires = live.sum((0, 1))  # [d_sae]: tokens
            fires_in = (live.amax(1) > 0).double().sum(0)  # [d_sae]: prompts
            parts = [per_pos_f, per_pos_err, fires, real.sum(), fires_in]
            if not per_position:
                parts[0], parts[1] = per_pos_f.sum(0), per_pos_err.sum(0)
            elif name in totals and totals[name][0].shape != per_pos_f.shape:
                raise ValueError("per_position=True needs every batch to have the same length")
            totals[name] = parts if name not in totals else [t + u for t, u in zip(totals[name], parts)]
        n_prompts += b
    bar.close()
    if n_prompts == 0:
        raise ValueError("no prompts: the data was empty")
    dtype = _score_dtype(model)  # float32, float64 for a float64 model
    return {name: FeatureScores(hook=name, scores=(t[0] / n_prompts).to(dtype).cpu(),
                                error=(t[1] / n_prompts).to(dtype).cpu(), frequency=(t[2] / t[3]).to(dtype).cpu(),
                                prompt_frequency=(t[4] / n_prompts).to(dtype).cpu())
            for name, t in totals.items()}


def _sae_setting(sae, key: str):
    """``sae.cfg.metadata.<key>`` (sae-lens 6) or ``sae.cfg.<key>`` (earlier), else None."""
    cfg = getattr(sae, "cfg", None)
    metadata = getattr(cfg, "metadata", None)
    value = getattr(metadata, key, None) if metadata is not None else None
    return value if value is not None else getattr(cfg, key, None)


class _OneSlice:
    """An SAE trained on one slice of axis 2 of a hook (sae-lens's ``hook_head_index``: a Mamba-2
    head, or a group of ``hook_B`` / ``hook_C``, or a channel of Mamba-1's ``hook_h``), seen as an
    SAE of the flattened hook ``[b, p, size*width]``: it encodes its slice, and decodes into that
    slice with zeros elsewhere, so the rest of the hook is all in the error term."""

    def __init__(self, sae, index: int, size: int):
        self.sae, self.index, self.size = sae, index, size

    def encode(self, act: Tensor) -> Tensor:
        return self.sae.encode(act.unflatten(-1, (self.size, -1))[..., self.index, :])

    def decode(self, features: Tensor) -> Tensor:
        part = self.sae.decode(features)  # [b, p, width]
        out = part.new_zeros(*part.shape[:-1], self.size, part.shape[-1])
        out = out.index_copy(-2, torch.tensor([self.index], device=part.device), part.unsqueeze(-2))
        return out.flatten(-2)


def check_saes(model, saes: Mapping[str, object]) -> Dict[str, object]:
    """``{hook name: sae}`` checked (hook names, ``encode`` / ``decode``; a warning when an SAE's
    sae-lens config names another hook), with an SAE trained on one slice of axis 2
    (``hook_head_index``) seen over the whole flattened hook (:class:`_OneSlice`)."""
    if not isinstance(saes, Mapping) or not saes:
        raise ValueError("saes is empty (or not a mapping): give {hook name: sae}")
    views = {}
    for name, sae in saes.items():
        if not isinstance(name, str):  # a cache's shorthand, ("resid_pre", 1), say: re.match raised TypeError
            hint = (f": {f'blocks.{name[1]}.hook_{name[0]}'!r} for {name!r}" if isinstance(name, tuple) and
                    len(name) == 2 and isinstance(name[0], str) and isinstance(name[1], int) else "")
            raise TypeError(f"saes are keyed by full hook names (strings){hint}; got {name!r}")
        model.check_hook_name(name)
        if name.endswith("hook_ssm_mask"):
            raise ValueError(f"{name} is the knockout mask [b, h, p, p], not an activation: an SAE does not read it")
        if not (callable(getattr(sae, "encode", None)) and callable(getattr(sae, "decode", None))):
            raise TypeError(f"the SAE for {name} needs encode(act) and decode(features) methods, "
                            f"got {type(sae).__name__}")
        views[name] = _one_slice(model, name, sae)
    return views


def _one_slice(model, name: str, sae):
    """``sae``, or a :class:`_OneSlice` view of it when its config names a slice of axis 2; a
    warning when its config names another hook than ``name``.

    The axis' size comes from the config, not from a forward (which would run the user's hooks)."""
    trained_on = _sae_setting(sae, "hook_name")
    if isinstance(trained_on, str) and trained_on != name:
        warnings.warn(f"the SAE given for {name} was trained on {trained_on} (its config's hook_name)",
                      stacklevel=caller_stacklevel())
    index = _sae_setting(sae, "hook_head_index")
    if index is None:
        return sae
    cfg, hook = model.cfg, name.rsplit(".", 1)[-1]
    if cfg.family == "mamba2" and hook == "hook_h":
        raise ValueError(f"the SAE for {name} names head {index} (hook_head_index), but a head of Mamba-2's hook_h "
                         "is a [hd, n] matrix, which an SAE does not read (sae-lens cannot train one either)")
    if cfg.family == "mamba2" and hook in ("hook_B", "hook_C"):
        size, what = cfg.n_groups, "groups"
    elif cfg.family == "mamba2" and name.startswith("blocks.") and hook in PER_HEAD_HOOKS:
        size, what = cfg.n_heads, "heads"
    elif cfg.family == "mamba1" and name.startswith("blocks.") and hook == "hook_h":
        size, what = cfg.d_inner, "channels"
    else:
        raise ValueError(f"the SAE for {name} names slice {index} of axis 2 (hook_head_index), but {name} has no "
                         "head axis: give an SAE trained on the whole hook (no hook_head_index)")
    if isinstance(index, bool) or not hasattr(index, "__index__") or not 0 <= int(index) < size:
        raise ValueError(f"the SAE for {name} names slice {index!r} (hook_head_index); {name} has {size} {what}")
    return _OneSlice(sae, int(index), size)


def _flat(act: Tensor) -> Tensor:
    """``[b, p, ...]`` → ``[b, p, width]`` (a per-head hook's heads side by side)."""
    return act.reshape(*act.shape[:2], -1)


def _sae_parts(model, saes: Mapping[str, object], tokens: Tensor,
               attention_mask: Optional[Tensor]) -> Dict[str, Tuple[Tensor, Tensor]]:
    """``{hook: (features [b, p, d_sae], error [b, p, width])}`` of one unhooked run."""
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in saes, attention_mask=attention_mask)
        parts = {}
        for name, sae in saes.items():
            act = _flat(cache[name])
            features = _encode(sae, name, act)
            parts[name] = (features, act - sae.decode(features).to(act.dtype))
    return parts


def _encode(sae, name: str, act: Tensor) -> Tensor:
    try:
        return sae.encode(act)
    except RuntimeError as err:  # most often a width mismatch inside the SAE's matmul
        if isinstance(sae, _OneSlice):
            raise ValueError(f"the SAE for {name} could not encode slice {sae.index} of its activations "
                             f"[b, p, {sae.size}, {act.shape[-1] // sae.size}] (its config's hook_head_index; an SAE "
                             f"trained on the whole hook should not name one): {err}") from err
        raise ValueError(f"the SAE for {name} could not encode its activations [b, p, {act.shape[-1]}]: {err}") \
            from err


def _site_grads(model, saes, tokens, attention_mask, metric, labels, b, clean_parts, corrupted_parts,
                site: Optional[str], alpha: float) -> Dict[str, Tuple[Tensor, Tensor]]:
    """One clean run with every SAE spliced in (``site``'s features and error interpolated from
    corrupted to clean by ``alpha``); returns ∂(Σ metric)/∂(features, error) at each site."""
    leaves: Dict[str, Tuple[Tensor, Tensor]] = {}

    def splice(act: Tensor, hook) -> Tensor:
        f_clean, err_clean = clean_parts[hook.name]
        if hook.name == site:  # EAP-IG: this site's features and error, interpolated, replace it
            f_corr, err_corr = corrupted_parts[hook.name]
            f, err = f_corr + alpha * (f_clean - f_corr), err_corr + alpha * (err_clean - err_corr)
        else:
            f, err = f_clean, err_clean
        f, err = f.detach().clone().requires_grad_(True), err.detach().clone().requires_grad_(True)
        leaves[hook.name] = (f, err)
        recon = saes[hook.name].decode(f).to(err.dtype) + err  # decode(f) + ε
        if hook.name == site:
            return recon.reshape(act.shape).to(act.dtype)
        # EAP: the activation itself, plus a term of value zero that makes f and ε nodes. The
        # activation's own path stays, so earlier sites' gradients pass through this one
        # (returning decode(f) + ε alone would cut them off at their leaves).
        return act + (recon - recon.detach()).reshape(act.shape).to(act.dtype)

    with torch.inference_mode(False), torch.enable_grad():  # also under an outer inference_mode
        spliced = list(saes) if site is None else [site]  # elsewhere the splice would change no value
        logits = model.run_with_hooks(tokens, fwd_hooks=[(name, splice) for name in spliced],
                                      attention_mask=attention_mask)
        value = _metric_values(metric, logits, labels, b)
        inputs = [t for pair in leaves.values() for t in pair]
        grads = torch.autograd.grad(value, inputs, allow_unused=True)
    out = {}
    for i, name in enumerate(leaves):
        g_f, g_err = grads[2 * i], grads[2 * i + 1]
        if g_f is None and g_err is None:
            raise RuntimeError(f"no gradient reached the SAE at {name}: does the metric depend on the logits, "
                               "and does the hook feed them?")
        out[name] = (torch.zeros_like(leaves[name][0]) if g_f is None else g_f,
                     torch.zeros_like(leaves[name][1]) if g_err is None else g_err)
    return out


# The package exports this function under the module's own name, so ``tl_mamba.circuits.feature_attribution``
# is the function and ``help()`` would never reach the module's explanation: it follows the
# function's own docstring.
if feature_attribution.__doc__ and __doc__:  # None under python -OO
    feature_attribution.__doc__ += "\n\n" + __doc__
