"""Knockout attribution: every token → token edge of every layer scored in one backward pass.

``hook_ssm_mask`` (1 = edge kept) multiplies each hidden-attention term α[i, j]·x_j
of a layer's scan (Mamba-1 ``[b, 1, p, p]``, Mamba-2 ``[b, h, p, p]``, one mask per
head). Knocking out the edge j → i sets ``mask[i, j]`` from 1 to 0, so to first
order

    metric(knocked out) - metric(clean) ≈ -∂metric/∂mask[i, j]   =: score[i, j]

(attribution patching, applied to knockouts). One forward and one backward per
batch give the score of every edge in every chosen layer: the hook on each layer's
mask returns a tensor of ones that requires grad, and the scan dispatchers give it
its gradient ``Σ_features ∂metric/∂y_i · α[i, j]·x_j`` (``tl_mamba.ops.knockout``).

Only the causal lower triangle (j ≤ i) holds edges; the scores above the diagonal
are 0, and the plots leave them blank. The estimate is exact for a metric linear in
the layer's output with nothing downstream nonlinear; otherwise check it against
real knockouts with :func:`knockout_attribution_vs_knockout`.

Metric: ``metric(logits [b, p, v])`` returns one value per prompt ``[b]`` (or a
scalar, taken as the mean over the batch). By default all prompts run in one
batch, so a metric may close over per-prompt data (answer ids ``[b]``). With
``batch_size`` the metric sees consecutive slices of the prompts; a metric that
needs per-prompt data then takes a second argument ``rows`` (the indices of this
batch's prompts, a LongTensor), e.g. ``lambda logits, rows: logits[:, -1].gather(
-1, answers[rows, None])[:, 0]``.

Memory: each chosen layer's mask and its gradient (``[b, H, p, p]`` each, with the
scan's working copies) are held from the forward to the backward, so a batch needs about
``MASK_COPIES (6) · n_layers · b · H · p²`` values (4 bytes each, 8 for a float64 model)
on top of the usual activations, checked
against ``model.heavy_hook_memory_limit`` (the limit of the heavy hooks): a given
``batch_size`` is shrunk to fit; without one, a batch that does not fit raises
``MemoryError``, as does a single prompt that does not fit.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_mamba.circuits.eap import _score_dtype, metric_sum
from tl_mamba.errors import OutOfRangeError, check_index
from tl_mamba.knockout import _index_list
from tl_mamba.ops.buffers import format_bytes

Tokens = Union[Tensor, str, Sequence[str]]
Metric = Callable[[Tensor], Tensor]


# ----------------------------------------------------------------------------- inputs
def _as_tokens(model, tokens: Tokens, per_prompt: bool = False):
    """``([b, p] token ids, [b, p] attention mask or None)``. Strings of different lengths are
    left-padded only for ``per_prompt`` scores (a mean over prompts would mix their positions)."""
    if isinstance(tokens, str):
        tokens = [tokens]
    if isinstance(tokens, (list, tuple)):
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise TypeError("tokens must be a [b, p] token tensor, a string or a list of strings")
        ids, mask = model.to_tokens(list(tokens), padding_side="left", return_attention_mask=True)
        lengths = sorted(set(mask.sum(1).tolist()))
        if len(lengths) > 1 and not per_prompt:
            raise ValueError(f"knockout attribution needs prompts of one length (scores are averaged per position "
                             f"pair); these tokenize to lengths {lengths}. Group the prompts by length, or pass "
                             "per_prompt=True for each prompt's own scores (left-padded).")
        return ids, (mask if len(lengths) > 1 else None)
    if not isinstance(tokens, Tensor):
        raise TypeError(f"tokens must be a [b, p] token tensor, a string or a list of strings, "
                        f"got {type(tokens).__name__}")
    if tokens.dim() == 1:
        tokens = tokens[None]
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [b, p], got shape {tuple(tokens.shape)}")
    return tokens, None


def _layers(model, layers) -> List[int]:
    n = model.cfg.n_layers
    if layers is None:
        return list(range(n))
    layers = _index_list(layers, "layers", owner="knockout_attribution", mask_ok=False)
    if not layers:
        raise ValueError("layers is empty")
    bad = [layer for layer in layers if not -n <= layer < n]
    if bad:
        raise OutOfRangeError(f"layers {bad} out of range for a model of {n} layers")
    return [layer % n for layer in layers]


def _heads(model, heads) -> Optional[List[int]]:
    """The chosen heads (Mamba-2), or None for all (and always None for Mamba-1)."""
    cfg = model.cfg
    if cfg.family != "mamba2":
        if heads is not None:
            raise ValueError("heads= is for Mamba-2; a Mamba-1 mask has no head axis (its edges cover every channel)")
        return None
    if heads is None:
        return None
    heads = _index_list(heads, "heads", owner="knockout_attribution", mask_ok=False)
    if not heads:
        raise ValueError("heads is empty")
    bad = [h for h in heads if not -cfg.n_heads <= h < cfg.n_heads]
    if bad:
        raise OutOfRangeError(f"heads {bad} out of range for {cfg.n_heads} heads")
    return [h % cfg.n_heads for h in heads]


def _mask_heads(model) -> int:
    return model.cfg.n_heads if model.cfg.family == "mamba2" else 1


#: the [H, p, p] masks' worth of memory a prompt and layer take (see _fitting_batch)
MASK_COPIES = 6


def _fitting_batch(model, n_layers: int, n: int, p: int, batch_size: Optional[int], dtype: torch.dtype) -> int:
    """The largest batch ≤ batch_size whose masks fit ``model.heavy_hook_memory_limit``
    (all ``n`` prompts, or ``MemoryError``, when batch_size is None)."""
    limit = model.heavy_hook_memory_limit
    itemsize = torch.finfo(dtype).bits // 8
    # per prompt and layer: the hooked mask, the ones it is multiplied by, the gradient, and the
    # masked scan's forward and backward scratch: 5.6 masks' worth of peak RSS measured
    # (toy-mamba2, p 2048, CPU, 2026-12-06), so 6; counting only the first three let a call the
    # guard passed peak at 1.8x the limit
    per_prompt = MASK_COPIES * n_layers * _mask_heads(model) * p * p * itemsize
    if per_prompt > limit:
        raise MemoryError(
            f"knockout attribution over {n_layers} layer(s) of a {p}-token sequence would need "
            f"{format_bytes(per_prompt)} per prompt for the [H={_mask_heads(model)}, p, p] masks, their "
            f"gradients and the scans' scratch, over model.heavy_hook_memory_limit ({format_bytes(limit)}). The "
            "sequence is too long for this many layers: choose fewer layers (layers=[...]), shorten the prompts, "
            "or raise the limit if you have the memory.")
    fits = limit // per_prompt
    if batch_size is None:
        if n > fits:
            raise MemoryError(
                f"knockout attribution of {n} prompts of {p} tokens over {n_layers} layer(s) would need "
                f"{format_bytes(n * per_prompt)} for the masks, their gradients and the scans' scratch, over "
                f"model.heavy_hook_memory_limit ({format_bytes(limit)}); pass batch_size={fits} or less (see the "
                "module docstring on metrics that need per-prompt data), choose fewer layers, or raise the limit.")
        return n
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return max(1, min(batch_size, fits))


def _metric_takes_rows(metric: Metric) -> bool:
    """Whether ``metric`` has a second positional parameter without a default (``rows``)."""
    try:
        parameters = list(inspect.signature(metric).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [q for q in parameters if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 and positional[1].default is inspect.Parameter.empty


def _batch_metric(metric: Metric, logits: Tensor, rows: Tensor, takes_rows: bool, n_prompts: int) -> Tensor:
    """The sum over the batch of the per-prompt metric (``rows`` of the ``n_prompts``), checked
    by :func:`~tl_mamba.circuits.eap.metric_sum` (to differentiate, unless grad is off: the
    knockouts that check the attribution)."""
    try:
        value = metric(logits, rows.to(logits.device)) if takes_rows else metric(logits)
    except Exception as error:
        if not takes_rows and rows.numel() < n_prompts:
            # A metric closing over [n] labels fails on a batch of fewer prompts with its own
            # message (e.g. "4 label rows for 2 prompts"), which does not say why it got fewer.
            note = (f"the metric was called on prompts {int(rows[0])}..{int(rows[-1])} of {n_prompts}: with "
                    "batch_size it sees one batch at a time. A metric that needs per-prompt data (labels) should "
                    "take a second argument rows, the indices of the batch's prompts: metric(logits, rows).")
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(note)
            else:
                raise type(error)(f"{error} ({note})") from error
        raise
    return metric_sum(value, rows.numel(), differentiable=torch.is_grad_enabled())


# -------------------------------------------------------------------------- attribution
def knockout_attribution(
    model,
    tokens: Tokens,
    metric: Metric,
    layers: Optional[Union[int, Sequence[int]]] = None,
    heads: Optional[Union[int, Sequence[int]]] = None,
    batch_size: Optional[int] = None,
    per_prompt: bool = False,
    attention_mask: Optional[Tensor] = None,
    progress: bool = True,
) -> Tensor:
    """First-order knockout effect of every edge j → i in the chosen layers, from one backward pass.

    ``score[l, (head,) i, j] ≈ metric(with edge j → i of layer l knocked out) - metric(clean)``,
    the mean over the prompts (or each prompt's own, ``per_prompt``), as
    ``-∂metric/∂hook_ssm_mask[i, j]``. Mamba-2 scores each head's edge (its own mask entry);
    summing over heads scores knocking the edge out in all of them.

    Args:
        model: a ``HookedMamba`` or ``HookedMamba2``.
        tokens: ``[b, p]`` token ids, or strings that all tokenize to the same length p
            (strings of different lengths only with ``per_prompt``: they are left-padded).
        metric: ``metric(logits [b, p, v])`` → one value per prompt ``[b]`` (preferred), or a
            scalar, which is taken to be the *mean* over the batch of a per-prompt metric
            (e.g. a mean logit difference). The scores estimate the change of the mean per-prompt
            metric. A scalar *sum* over the batch would make the scores b times too large.
            ``metric(logits, rows)`` (a second parameter without default) also gets the indices
            of the batch's prompts, for per-prompt data when ``batch_size`` splits the prompts.
        layers: layer indices (default all); negative counts from the end.
        heads: Mamba-2 only: keep these heads of the head axis (default all).
        batch_size: prompts per forward/backward (shrunk to fit ``model.heavy_hook_memory_limit``);
            default None: all prompts in one batch (``MemoryError`` if that does not fit).
        per_prompt: return every prompt's scores, with a leading prompt axis, instead of their
            mean: the gradient of the mask of row r is prompt r's alone, so this costs nothing
            more than the output's memory.
        attention_mask: ``[b, p]`` padding mask of ``tokens`` (1 = real token). Scores are in
            the padded batch's positions; edges from or to padding score 0. With left padding
            the prompts' positions do not line up, so prefer ``per_prompt=True``.
        progress: show a tqdm bar over the batches.

    Returns:
        Mamba-1: ``[n_layers_selected, p, p]``; Mamba-2: ``[n_layers_selected, n_heads_selected, p, p]``;
        with ``per_prompt`` a leading ``[b]`` axis. Target i on axis -2, source j on axis -1; 0 above
        the diagonal (no edge from the future). float32 on the CPU (float64 for a float64 model).

    Raises:
        MemoryError: a single prompt's masks over all chosen layers exceed
            ``model.heavy_hook_memory_limit`` (the sequence is too long for that many layers).
    """
    tokens, padding = _as_tokens(model, tokens, per_prompt)
    if attention_mask is not None:
        if padding is not None:
            raise ValueError("attention_mask goes with a token tensor; strings are padded (and masked) here")
        padding = torch.as_tensor(attention_mask)
        if tuple(padding.shape) != tuple(tokens.shape):
            raise ValueError(f"attention_mask must be {tuple(tokens.shape)} like tokens, got {tuple(padding.shape)}")
    layer_list = _layers(model, layers)
    head_list = _heads(model, heads)
    n, p = tokens.shape
    if n == 0:
        raise ValueError(f"no prompts: tokens {tuple(tokens.shape)} has 0 rows")
    if p == 0:
        raise ValueError(f"tokens {tuple(tokens.shape)} have no positions (p = 0): there are no edges to score")
    dtype = _score_dtype(model)
    batch = _fitting_batch(model, len(layer_list), n, p, batch_size, dtype)
    takes_rows = _metric_takes_rows(metric)
    shape = (len(layer_list), _mask_heads(model), p, p)
    if per_prompt:
        needed = n * len(layer_list) * _mask_heads(model) * p * p * (torch.finfo(dtype).bits // 8)
        if needed > model.heavy_hook_memory_limit:
            raise MemoryError(
                f"per-prompt knockout attribution of {n} prompts would return {format_bytes(needed)} of scores, "
                f"over model.heavy_hook_memory_limit ({format_bytes(model.heavy_hook_memory_limit)}); call it "
                "on fewer prompts at a time or choose fewer layers (or heads), or raise the limit.")
    total = torch.zeros((n, *shape) if per_prompt else shape, dtype=dtype)
    for start in tqdm(range(0, n, batch), desc="knockout attribution", disable=not progress, leave=False,
                      unit="batch"):
        chunk = tokens[start:start + batch]
        chunk_mask = None if padding is None else padding[start:start + batch]
        leaves = {}

        def attribution_hook(mask: Tensor, hook) -> Tensor:
            leaf = torch.ones(mask.shape, dtype=dtype, device=mask.device, requires_grad=True)
            leaves[hook.name] = leaf
            # times the incoming mask, so edges that another hook already removed keep a zero score
            return mask.to(dtype) * leaf

        names = [f"blocks.{layer}.hook_ssm_mask" for layer in layer_list]
        with torch.inference_mode(False), torch.enable_grad():
            logits = model.run_with_hooks(chunk, fwd_hooks=[(name, attribution_hook) for name in names],
                                          attention_mask=chunk_mask)
            value = _batch_metric(metric, logits, torch.arange(start, start + chunk.shape[0]), takes_rows, n)
            grads = torch.autograd.grad(value, [leaves[name] for name in names], allow_unused=True)
        for k, grad in enumerate(grads):
            if grad is None:
                continue
            if per_prompt:  # [b, H, p, p] into [n, layers, H, p, p]
                total[start:start + chunk.shape[0], k] = -grad.detach().to("cpu", dtype)
            else:
                total[k] -= grad.detach().sum(0).to("cpu", dtype)
    scores = total if per_prompt else total / n
    heads_axis = 2 if per_prompt else 1
    if model.cfg.family != "mamba2":
        return scores.select(heads_axis, 0)
    return scores if head_list is None else scores.index_select(heads_axis, torch.tensor(head_list))


# ----------------------------------------------------------------------------- validation
def rank_correlation(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-d tensors (ties get their average rank); NaN if one is constant."""
    a, b = torch.as_tensor(a).flatten().double(), torch.as_tensor(b).flatten().double()
    if a.numel() != b.numel():
        raise ValueError(f"rank_correlation: {a.numel()} values against {b.numel()}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float("nan") if denominator == 0 else float((ra * rb).sum()) / denominator


def _ranks(v: Tensor) -> Tensor:
    """Ranks 0..n-1 with ties averaged."""
    order = torch.argsort(v, stable=True)
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(v.numel(), dtype=v.dtype)
    values, inverse = torch.unique(v, return_inverse=True)
    sums = torch.zeros(values.numel(), dtype=v.dtype).index_add_(0, inverse, ranks)
    counts = torch.zeros(values.numel(), dtype=v.dtype).index_add_(0, inverse, torch.ones_like(v))
    return (sums / counts)[inverse]


@dataclass
class AttributionCheck:
    """Attribution against real knockouts for the edges ``sources[k] → target`` of one layer.

    Attributes:
        layer, target: the layer and the (non-negative) target position.
        sources: the source positions ``[n]``.
        attribution: ``[n]`` first-order estimate of metric(knocked out) - metric(clean).
        knockout: ``[n]`` the real change, from ``model.run_with_knockout`` (SSM path).
        spearman: rank correlation of the two. pearson: their linear correlation.
        clean_metric: the mean per-prompt metric without knockout.
    """

    layer: int
    target: int
    sources: List[int]
    attribution: Tensor
    knockout: Tensor
    spearman: float
    pearson: float
    clean_metric: float


def _mean_metric(model, tokens: Tensor, metric: Metric, batch: int, knockout=None) -> float:
    """The mean per-prompt metric, with ``knockout`` applied when given."""
    total = 0.0
    takes_rows = _metric_takes_rows(metric)
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch):
            chunk = tokens[start:start + batch]
            logits = model(chunk) if knockout is None else model.run_with_knockout(chunk, knockout)
            rows = torch.arange(start, start + chunk.shape[0])
            total += float(_batch_metric(metric, logits, rows, takes_rows, tokens.shape[0]))
    return total / tokens.shape[0]


def knockout_attribution_vs_knockout(
    model,
    tokens: Tokens,
    metric: Metric,
    layer: int,
    target: int = -1,
    sources: Optional[Sequence[int]] = None,
    heads: Optional[Union[int, Sequence[int]]] = None,
    batch_size: Optional[int] = None,
    progress: bool = True,
) -> AttributionCheck:
    """Score the edges ``j → target`` of one layer by attribution and by real knockouts.

    One call to validate attribution against brute force: the attribution comes from
    :func:`knockout_attribution` (one backward); each source j is then knocked out for real,
    ``model.run_with_knockout(tokens, Knockout(layers=[layer], sources=[j], targets=[target],
    heads=heads))``, one forward per source, and both are compared by rank correlation.

    Source positions are columns of the batch, shared by every prompt: use prompts that share
    one template (the same word at each position), or a position averages different roles
    across prompts and the correlation says little. On a mixed-template IOI batch of one
    length (the largest of ``task_batches(model, "ioi", n=32)``), layer 3 of toy-mamba2 gave
    Spearman −0.13; on prompts of one template, 1.00 (docs/circuits.md, section 2).

    Args:
        tokens, metric, batch_size: as in :func:`knockout_attribution` (same reduction of the metric).
        layer: the layer. target: the target position (default the last).
        sources: source positions (default every j ≤ target, the target itself included).
        heads: Mamba-2: knock out (and sum the attribution over) these heads only; default all heads.
        progress: show tqdm bars over the attribution's batches and over the sources knocked out.

    Returns:
        :class:`AttributionCheck` with ``attribution [n]``, ``knockout [n]`` and their correlations.
    """
    from tl_mamba.knockout import Knockout

    tokens, _ = _as_tokens(model, tokens)
    p = tokens.shape[1]
    target = check_index(target, p, "target")
    if sources is None:
        sources = list(range(target + 1))
    sources = _index_list(sources, "sources", owner="knockout_attribution_vs_knockout", mask_ok=False)
    outside = [j for j in sources if not -p <= j < p]
    if outside:
        raise OutOfRangeError(f"sources {outside} out of range for {p} positions")
    sources = [j % p for j in sources]
    late = [j for j in sources if j > target]
    if late:
        raise ValueError(f"sources {late} come after the target {target}: there is no such edge")
    layer = check_index(layer, model.cfg.n_layers, "layer")
    head_list = _heads(model, heads)
    scores = knockout_attribution(model, tokens, metric, layers=[layer], heads=head_list, batch_size=batch_size,
                                  progress=progress)[0]
    if model.cfg.family == "mamba2":
        scores = scores.sum(0)  # knocking the edge out in every chosen head
    attribution = scores[target, sources]
    batch = tokens.shape[0] if batch_size is None else max(1, batch_size)
    clean = _mean_metric(model, tokens, metric, batch)
    effects = []
    for j in tqdm(sources, desc=f"knockouts of layer {layer}", disable=not progress, leave=False, unit="source"):
        knockout = Knockout(layers=[layer], sources=[j], targets=[target], path="ssm", heads=head_list)
        effects.append(_mean_metric(model, tokens, metric, batch, knockout) - clean)
    effect = torch.tensor(effects, dtype=attribution.dtype)
    pearson = torch.corrcoef(torch.stack([attribution.double(), effect.double()]))[0, 1]
    for name, values in (("attribution", attribution), ("real knockout effects", effect)):
        if values.numel() > 1 and bool((values == values[0]).all()):
            warnings.warn(f"layer {layer}: the {name} of the {values.numel()} edges -> {target} are all equal "
                          f"({float(values[0]):.3g}), so their correlations are NaN", stacklevel=2)
    return AttributionCheck(layer=layer, target=target, sources=sources, attribution=attribution, knockout=effect,
                            spearman=rank_correlation(attribution, effect), pearson=float(pearson),
                            clean_metric=clean)


# ------------------------------------------------------------------------------ plotting
def plot_knockout_attribution(
    scores: Tensor,
    path,
    str_tokens: Optional[Sequence[str]] = None,
    layers: Optional[Sequence[int]] = None,
    head: Optional[int] = None,
    title: str = "knockout attribution",
) -> List[Path]:
    """One PNG heatmap per layer of :func:`knockout_attribution` scores (target rows, source columns).

    Diverging colours centred on 0 (red: knocking the edge out lowers the metric, blue: raises it,
    with matplotlib's ``RdBu``), one colour scale per layer. Only the causal lower triangle
    (j ≤ i) holds edges; the cells above the diagonal are blank (NaN).

    Args:
        scores: ``[L, p, p]`` (Mamba-1) or ``[L, h, p, p]`` (Mamba-2); a single ``[p, p]`` is one layer.
        path: a directory (created; files ``layer{l}.png``) or a file name containing ``{layer}``.
        str_tokens: ``p`` labels for the axes (e.g. ``model.to_str_tokens(tokens[0])``).
        layers: the layer numbers of the L panels, for file names and titles (default 0..L-1).
        head: Mamba-2: plot this index of the head axis; default the sum over heads (the score of
            knocking the edge out in every head).
        title: prefix of each plot's title.

    Returns:
        The paths written.
    """
    from tl_mamba.plotting import new_figure

    scores = scores.detach().float().cpu()
    if scores.dim() == 2:
        scores = scores[None]
    if scores.dim() == 4:
        scores = scores.sum(1) if head is None else scores[:, check_index(head, scores.shape[1], "head")]
    elif head is not None:
        raise ValueError("head= needs Mamba-2 scores [L, h, p, p]")
    if scores.dim() != 3 or scores.shape[-1] != scores.shape[-2]:
        raise ValueError(f"scores must be [L, p, p] or [L, h, p, p], got {tuple(scores.shape)}")
    L, p, _ = scores.shape
    layers = list(range(L)) if layers is None else list(layers)
    if len(layers) != L:
        raise ValueError(f"{len(layers)} layer labels for {L} layers of scores")
    if str_tokens is not None and len(str_tokens) != p:
        raise ValueError(f"{len(str_tokens)} str_tokens for {p} positions")
    template = str(path)
    if "{layer}" not in template:
        Path(template).mkdir(parents=True, exist_ok=True)
        template = str(Path(template) / "layer{layer}.png")
    upper = ~torch.ones(p, p, dtype=torch.bool).tril()
    written = []
    for values, layer in zip(scores, layers):
        shown = values.masked_fill(upper, float("nan"))
        bound = float(values.abs().max()) or 1.0
        size = 2.5 + 0.32 * p
        fig, ax = new_figure((size + 1.2, size))
        image = ax.imshow(shown.numpy(), cmap="RdBu", vmin=-bound, vmax=bound)
        labels = list(str_tokens) if str_tokens is not None else [str(k) for k in range(p)]
        ax.set_xticks(range(p))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(p))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel("source j")
        ax.set_ylabel("target i")
        ax.set_title(f"{title}: layer {layer}" + (f", head {head}" if head is not None else ""), fontsize=10)
        fig.colorbar(image, ax=ax, label="≈ metric(knocked out) − metric(clean)")
        fig.tight_layout()
        out = Path(template.format(layer=layer))
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=120)
        written.append(out)
    return written


__all__ = ["knockout_attribution", "knockout_attribution_vs_knockout", "plot_knockout_attribution",
           "rank_correlation", "AttributionCheck"]
