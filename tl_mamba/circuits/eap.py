"""Edge attribution patching (EAP, EAP-IG), exact edge patching, and circuit evaluation.

Everything here runs the model's ordinary forward with TransformerLens hooks: the
senders' outputs are read at their hooks (``hook_embed``, ``hook_mixer_out``,
``hook_y_normed`` for Mamba-2 heads, ``hook_y_gated`` for Mamba-1 channel groups),
and each receiver's input is edited at ``hook_mixer_in`` (or the last
``hook_resid_post`` for the logits). No private forward.

Data: ``clean`` and ``corrupted`` are token tensors ``[N, p]`` of the same shape, or
``clean`` is an iterable of batches ``(clean, corrupted)``, ``(clean, corrupted, labels)``
or ``(clean, corrupted, labels, attention_mask)`` (or dicts with those keys; what
:func:`tl_mamba.circuits.task_batches` returns) and ``corrupted`` is None. Batches may
differ in length unless the graph is positional. ``labels=`` and ``attention_mask=`` go
with token tensors; a dataloader's batches carry their own. Prompts of different lengths
share a batch by padding on the left, with ``attention_mask`` ``[N, p]`` (1 = real
token; one mask for a clean prompt and its corruption, which must have the same length):
padded positions feed nothing into the conv or the SSM, so every real position, and the
last one the metric reads, is what it is unpadded, and so are the scores.

``batch_size`` caps the rows of one forward whatever form the data takes: token
tensors, and every given batch with more rows, are cut into consecutive chunks of at
most ``batch_size`` rows (the tokens, corrupted tokens, labels and mask alike:
:func:`split_batch`); None runs each batch whole. Results do not depend on it (up to
rounding): scores are sums over all prompts divided by their number, and per-prompt
values are concatenated, never means of chunk means. (A metric that returns a scalar is
taken as the mean over the rows it was given, so it should be a mean over rows.)

Metric: ``metric(logits)`` — or ``metric(logits, labels)`` when labels are given —
returns one value per prompt (``[b]``) or the batch mean (a scalar). Scores are
means over prompts of first-order estimates of
``metric(edge patched to corrupted) - metric(clean)``.
"""

from __future__ import annotations

import numbers
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_mamba.circuits.progress import hide_progress
from tl_mamba.circuits.graph import Graph, graph_family
from tl_mamba.circuits.patching import check_indices
from tl_mamba.ops.precision import upcast

Batch = Tuple[Tensor, Tensor, object, Optional[Tensor]]  # clean, corrupted, labels, attention_mask
METHODS = ("EAP", "EAP-IG", "exact")


# ---------------------------------------------------------------------- data
def iter_batches(clean, corrupted=None, labels=None, batch_size: Optional[int] = None,
                 attention_mask: Optional[Tensor] = None) -> Iterator[Batch]:
    """Yield ``(clean [b, p], corrupted [b, p], labels or None, attention_mask [b, p] or None)``
    from tensors or a dataloader (see the module docstring), at most ``batch_size`` rows each:
    token tensors and every larger batch of a dataloader are split by :func:`split_batch`."""
    step = rows_per_forward(batch_size)
    if attention_mask is not None and not isinstance(clean, Tensor):
        raise TypeError("attention_mask= goes with token tensors; a dataloader's batches carry their own masks")
    if labels is not None and not isinstance(clean, Tensor):
        raise TypeError("labels= goes with token tensors; a dataloader's batches carry their own labels "
                        "((clean, corrupted, labels) or a dict with 'labels')")
    if isinstance(clean, Tensor):
        if not isinstance(corrupted, Tensor):
            raise TypeError("clean is a token tensor, so corrupted must be a token tensor of the same shape")
        if clean.ndim != 2 or clean.shape != corrupted.shape:
            raise ValueError(f"clean and corrupted must be [batch, pos] token tensors of one shape, got "
                             f"{tuple(clean.shape)} and {tuple(corrupted.shape)}")
        n = clean.shape[0]
        if n == 0:
            raise ValueError(f"no prompts: clean and corrupted are {tuple(clean.shape)} token tensors with 0 rows")
        _label_rows(labels, slice(0, n), n)  # one per prompt (or shared by all): checked before any forward
        batches: Iterable[tuple] = [(clean, corrupted, labels, attention_mask)]
    elif corrupted is not None and not isinstance(corrupted, Tensor):  # two parallel iterables
        batches = ((c, k, None, None) for c, k in _same_length_pairs(clean, corrupted))
    elif corrupted is not None:
        raise TypeError("corrupted is a tensor but clean is not; pass two token tensors or one dataloader")
    else:
        batches = (_unpack(item) for item in clean)
    for batch in batches:
        yield from split_batch(_check_pair(*batch), step)


def _same_length_pairs(clean, corrupted) -> Iterator[tuple]:
    """``zip(clean, corrupted)`` of two parallel iterables of batches, refusing lists of different
    lengths (zip would drop the longer one's last batches without a word)."""
    clean_batches, corrupted_batches = iter(clean), iter(corrupted)
    for index, clean_batch in enumerate(clean_batches):
        corrupted_batch = next(corrupted_batches, None)
        if corrupted_batch is None:
            raise ValueError(f"clean has more batches than corrupted (corrupted ends after {index})")
        yield clean_batch, corrupted_batch
    if next(corrupted_batches, None) is not None:
        raise ValueError("corrupted has more batches than clean")


def rows_per_forward(batch_size) -> Optional[int]:
    """``batch_size`` checked: a positive int, or None (each batch whole)."""
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not hasattr(batch_size, "__index__") or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive int (or None: all prompts at once), got {batch_size!r}")
    return int(batch_size)


def split_batch(batch: Batch, batch_size: Optional[int]) -> Iterator[Batch]:
    """One checked batch ``(clean, corrupted, labels, attention_mask)`` as consecutive chunks
    of at most ``batch_size`` rows (the batch itself when it has no more rows, or when
    ``batch_size`` is None). Every per-row companion is cut alike: the labels (a tensor,
    array, list or tuple with one entry per prompt, or a dict of such; a number or a 0-dim
    tensor is shared by every row and goes to each chunk whole) and the mask."""
    clean, corrupted, labels, attention_mask = batch
    b = clean.shape[0]
    if batch_size is None or b <= batch_size:
        yield batch
        return
    for start in range(0, b, batch_size):
        rows = slice(start, start + batch_size)
        yield (clean[rows], corrupted[rows], _label_rows(labels, rows, b),
               None if attention_mask is None else attention_mask[rows])


def _label_rows(labels, rows: slice, b: int):
    """The labels of ``rows`` out of a batch of ``b`` prompts (see :func:`split_batch`)."""
    if labels is None or isinstance(labels, numbers.Number) or getattr(labels, "ndim", None) == 0:
        return labels  # shared by every prompt
    if isinstance(labels, Mapping):
        return {key: _label_rows(value, rows, b) for key, value in labels.items()}
    if isinstance(labels, (Tensor, list, tuple)) or (hasattr(labels, "shape") and hasattr(labels, "__getitem__")):
        if len(labels) != b:
            raise ValueError(f"got {len(labels)} labels for {b} prompts: labels need one entry per prompt "
                             "(batch_size splits them with the prompts)")
        return labels[rows]
    raise TypeError(f"cannot split labels of type {type(labels).__name__} by prompt (batch_size splits "
                    f"batches of {b} prompts by rows): give a tensor, array, list or tuple with one entry per "
                    "prompt (or a dict of such), or batches of at most batch_size prompts")


def _unpack(item) -> tuple:
    """One dataloader batch as ``(clean, corrupted, labels, attention_mask)``."""
    if isinstance(item, dict):
        item = (item["clean"], item["corrupted"], item.get("labels"), item.get("attention_mask"))
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3, 4):
        raise ValueError("each batch of the dataloader must be (clean, corrupted), (clean, corrupted, labels) "
                         "or (clean, corrupted, labels, attention_mask)")
    return tuple(item) + (None,) * (4 - len(item))


def count_batches(clean, batch_size: Optional[int] = None) -> Optional[int]:
    """How many batches :func:`iter_batches` yields (a progress bar's total): ``ceil(N /
    batch_size)`` for token tensors; for a list or tuple of batches, its length, or with
    ``batch_size`` the sum of each batch's ``ceil(rows / batch_size)``; the length of any
    other dataloader that has one when ``batch_size`` is None; else None."""
    try:
        step = rows_per_forward(batch_size)
    except ValueError:
        return None  # iter_batches says why
    if isinstance(clean, Tensor):
        n = clean.shape[0] if clean.ndim else 0
        return -(-n // step) if step else min(n, 1)
    if step is None:
        try:
            return len(clean)
        except TypeError:
            return None
    if not isinstance(clean, (list, tuple)):
        return None  # counting its batches' rows would use the dataloader up
    try:
        return sum(-(-_rows(item) // step) for item in clean)
    except (TypeError, KeyError, IndexError, AttributeError, ValueError):
        return None


def _rows(item) -> int:
    """Prompts in one dataloader batch (or one tensor of two parallel lists)."""
    return int((item if isinstance(item, Tensor) else _unpack(item)[0]).shape[0])


def _check_pair(clean: Tensor, corrupted: Tensor, labels, attention_mask: Optional[Tensor]) -> Batch:
    if clean.ndim != 2 or clean.shape != corrupted.shape:
        raise ValueError(f"a batch's clean and corrupted tokens must be [batch, pos] of one shape, got "
                         f"{tuple(clean.shape)} and {tuple(corrupted.shape)}")
    if clean.shape[0] == 0 or clean.shape[1] == 0:
        raise ValueError(f"a batch of tokens {tuple(clean.shape)} is empty: every batch needs at least one prompt "
                         "of at least one token")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != tuple(clean.shape):
            raise ValueError(f"attention_mask must have the tokens' shape {tuple(clean.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        if clean.shape[1] and not bool((attention_mask[:, -1] == 1).all()):
            raise ValueError("attention_mask: pad on the left (padding_side='left'); the metric reads the last "
                             "position, which must be a real token in every row")
    return clean, corrupted, labels, attention_mask


def call_metric(metric: Callable, logits: Tensor, labels):
    """``metric(logits)``, or ``metric(logits, labels)`` when the data carry labels. A metric that
    cannot take those arguments is a ``TypeError`` saying how it is called (a TypeError raised
    inside a metric that can take them is left as it is)."""
    args = (logits,) if labels is None else (logits, labels)
    try:
        return metric(*args)
    except TypeError:
        import inspect

        try:
            inspect.signature(metric).bind(*args)
        except TypeError:
            raise TypeError(
                f"the metric {getattr(metric, '__name__', type(metric).__name__)} cannot be called as "
                + ("metric(logits): these data have no labels" if labels is None else
                   "metric(logits, labels): these data carry labels (labels=, or a third item in each batch)")
                + "; the circuit tools call metric(logits, labels) when there are labels, metric(logits) "
                  "otherwise") from None
        except ValueError:  # no signature to read (a builtin): the original error stands
            pass
        raise


def _metric_values(metric: Callable, logits: Tensor, labels, b: int) -> Tensor:
    """The metric of one batch as a sum over its prompts, to differentiate: :func:`metric_sum`."""
    return metric_sum(call_metric(metric, logits, labels), b)


def metric_sum(value, b: int, differentiable: bool = True) -> Tensor:
    """A metric's value on a batch of ``b`` prompts as their sum (a scalar metric is taken as the
    batch mean): ``TypeError`` for a value that is not a tensor (a Python float carries no
    gradient), ``ValueError`` for a tensor of another shape than ``[]`` or ``[b]``, NaN or
    infinite (which would make every score NaN), or, when it is to be ``differentiable``,
    detached from the logits."""
    if not isinstance(value, Tensor):
        raise TypeError(f"the metric must return a tensor computed from the logits (a scalar or one value per "
                        f"prompt [b]), got {type(value).__name__}"
                        + (": attribution differentiates the metric, and a Python number (.item(), float(...)) "
                           "carries no gradient" if differentiable else ""))
    if differentiable and not value.requires_grad:
        raise ValueError("the metric does not depend on the logits through autograd (detached? computed under "
                         "torch.no_grad(), or with .detach() / .item() / numpy?): attribution differentiates the "
                         "metric with respect to the logits")
    if value.ndim != 0 and value.shape != (b,):
        raise ValueError(f"the metric must return one value per prompt ([{b}]) or a scalar, got {tuple(value.shape)}")
    finite = torch.isfinite(value.detach())
    if not bool(finite.all()):
        where = "" if value.ndim == 0 else f" for prompt(s) {(~finite).nonzero()[:, 0].tolist()[:8]} of this batch"
        consequence = ("its gradient, and so every attribution score, would be NaN" if differentiable else
                       "every score computed from it would be NaN")
        raise ValueError(f"the metric returned {value.detach().flatten()[~finite.flatten()][0].item()}{where}: "
                         f"{consequence}. Make the metric finite on the clean and corrupted prompts (a log of a zero "
                         "probability? a division by zero? labels or positions that read padding?)")
    return value * b if value.ndim == 0 else value.sum()


def _per_prompt(metric: Callable, logits: Tensor, labels, b: int) -> Tensor:
    value = call_metric(metric, logits, labels)
    value = upcast(torch.as_tensor(value).detach()).cpu()  # fp32, float64 for a float64 model's metric
    return value.expand(b).clone() if value.ndim == 0 else value.reshape(b)


# ---------------------------------------------------------------------- senders / receivers
class _Wiring:
    """How the graph's edges map onto the model's hooks, for one batch."""

    def __init__(self, model, graph: Graph, tokens: Tensor, attention_mask: Optional[Tensor] = None):
        p = tokens.shape[1]
        if graph.n_layers != model.cfg.n_layers or graph.family != graph_family(model):
            raise ValueError(f"this graph was built for a {graph.family} model with {graph.n_layers} layers; the "
                             f"model is {graph_family(model)} with {model.cfg.n_layers} layers")
        if graph.positional and p != graph.n_pos:
            raise ValueError(f"the graph is positional over {graph.n_pos} positions but this batch has {p}; "
                             "positional graphs need prompts of exactly that length")
        if graph.positional and attention_mask is None:
            # the padding the forward infers from pad tokens (leading), or to_tokens' trailing pad runs
            from tl_mamba.circuits.ablation import _real_positions

            attention_mask = _real_positions(model, tokens, None)
        if graph.positional and attention_mask is not None and not bool(attention_mask.bool().all()):
            # a position of the graph is a column: in a padded batch the rows' tokens sit in different columns
            rows = (~attention_mask.bool()).any(1).nonzero()[:, 0].tolist()
            raise ValueError(f"the graph is positional over {graph.n_pos} positions, but rows {rows[:8]} of this "
                             "batch are padded (attention_mask 0): a position is a column, and the rows' tokens "
                             "would sit in different columns. Positional graphs need prompts of exactly n_pos "
                             "tokens: group the prompts by length (tl_mamba.circuits.task_batches does), one "
                             "graph per length")
        if graph.level == "head":  # the senders split out_proj's input, which must be as wide as the graph's
            what = "d_inner" if graph.channel_groups is not None else "n_heads"
            if getattr(graph, what) != getattr(model.cfg, what):
                raise ValueError(f"this graph was built for a model with {what}={getattr(graph, what)}; the model "
                                 f"has {what}={getattr(model.cfg, what)}")
        self.model, self.graph = model, graph
        self.resid = [e for e in graph.edges.values() if e.kind == "resid"]
        self.internal = [e for e in graph.edges.values() if e.kind == "internal"]
        self.sender_hooks = [g.hook for g in graph.groups]
        self.internal_hooks = sorted({e.hook for e in self.internal})

    def out_proj(self, layer: int) -> Tensor:
        return self.model.blocks[layer].mixer.out_proj.weight  # [d, e]

    def to_resid(self, g: int, diff: Tensor, weight: Optional[Tensor] = None) -> Tensor:
        """Sum of the residual writes of group ``g``'s senders, from ``diff`` (the group hook's
        activation difference), each sender weighted by ``weight`` ([units] or [p, units])."""
        group = self.graph.groups[g]
        if not group.per_head:
            return diff if weight is None else diff * _expand(weight[..., 0])
        b, p, e = diff.shape
        h = group.units
        heads = diff.reshape(b, p, h, e // h)
        if weight is not None:
            heads = heads * (weight[..., None] if weight.ndim == 2 else weight[:, None])
        w_out = self.out_proj(group.layer)
        return heads.reshape(b, p, e).to(w_out.dtype) @ w_out.T

    def pull_back(self, g: int, diff: Tensor, grad: Tensor) -> Tensor:
        """``[units, p]``: sum over batch (and width) of each sender's write difference times ``grad``."""
        group = self.graph.groups[g]
        if not group.per_head:
            return torch.einsum("bpd,bpd->p", upcast(diff), upcast(grad))[None]
        b, p, e = diff.shape
        h = group.units
        grad_e = grad.to(self.out_proj(group.layer).dtype) @ self.out_proj(group.layer)  # [b, p, e]
        return torch.einsum("bphk,bphk->hp", upcast(diff.reshape(b, p, h, e // h)),
                            upcast(grad_e.reshape(b, p, h, e // h)))


def _expand(weight: Tensor) -> Tensor:
    """A scalar or ``[p]`` weight broadcast over ``[b, p, d]``."""
    return weight[None, :, None] if weight.ndim == 1 else weight


def _score_dtype(model) -> torch.dtype:
    """Scores come in float32, or float64 for a float64 model (no rounding below its precision)."""
    return torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32


def _run_cached(model, tokens: Tensor, names: Sequence[str], attention_mask: Optional[Tensor]) -> Dict[str, Tensor]:
    wanted = set(names)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in wanted, attention_mask=attention_mask)
    return {n: cache[n] for n in names}


# ---------------------------------------------------------------------- attribution
def attribute(model, graph: Graph, clean, corrupted=None, metric: Callable = None, method: str = "EAP",
              ig_steps: Optional[int] = None, *, labels=None, batch_size: Optional[int] = None,
              attention_mask: Optional[Tensor] = None, quiet: Optional[bool] = None,
              progress: Optional[bool] = None) -> Graph:
    """Score every edge of ``graph`` in place (``graph.scores``) and return the graph.

    Args:
        method: ``"EAP"`` (one gradient at the clean input: ``(a_corr - a_clean) · ∂metric/∂receiver``),
            ``"EAP-IG"`` (the gradient averaged over ``ig_steps`` inputs interpolated between the
            corrupted and clean embeddings, α = k / ig_steps for k = 1..ig_steps; ``ig_steps=1`` is EAP),
            or ``"exact"`` (patch each edge alone, one forward per edge: slow, the reference).
        ig_steps: EAP-IG steps, an int >= 1 (default None: 5).
        labels, batch_size, attention_mask: see the module docstring.

    Scores estimate ``metric(edge patched to corrupted) - metric(clean)``, averaged over prompts.
    A metric value that is NaN or infinite raises ``ValueError`` (every score would be NaN).
    """
    quiet = hide_progress(quiet, progress, False)
    if metric is None:
        raise TypeError("attribute() needs a metric: metric(logits) or metric(logits, labels)")
    steps = method_steps(method, ig_steps)
    if method == "exact":
        return _attribute_exact(model, graph, clean, corrupted, metric, labels, batch_size, attention_mask, quiet)

    total = torch.zeros_like(graph.scores, dtype=torch.float64)
    n_prompts = 0
    batches = iter_batches(clean, corrupted, labels, batch_size, attention_mask)
    for clean_tokens, corrupted_tokens, batch_labels, mask in tqdm(
            batches, desc=f"{method} attribution", total=count_batches(clean, batch_size), disable=quiet,
            leave=False, unit="batch"):
        b, p = clean_tokens.shape
        wiring = _Wiring(model, graph, clean_tokens, mask)
        names = wiring.sender_hooks + wiring.internal_hooks  # sender_hooks[0] is hook_embed
        clean_acts = _run_cached(model, clean_tokens, names, mask)
        corrupted_acts = _run_cached(model, corrupted_tokens, names, mask)
        grads = _receiver_grads(model, wiring, clean_tokens, clean_acts["hook_embed"],
                                corrupted_acts["hook_embed"], metric, batch_labels, steps, mask)
        scores = torch.zeros_like(total)
        for e in wiring.resid:
            hook = wiring.graph.groups[e.group].hook
            diff = corrupted_acts[hook] - clean_acts[hook]
            scores[e.index] = _reduce_pos(wiring.pull_back(e.group, diff, grads[e.hook])[e.unit], graph)
        for e in wiring.internal:
            diff = upcast(corrupted_acts[e.hook] - clean_acts[e.hook])
            per_pos = (diff * upcast(grads[e.hook])).reshape(b, p, -1).sum((0, 2))
            scores[e.index] = _reduce_pos(per_pos, graph)
        total += scores.double().cpu()
        n_prompts += b
    if n_prompts == 0:
        raise ValueError("no prompts: the data was empty")
    graph.scores = (total / n_prompts).to(_score_dtype(model))
    return graph


def method_steps(method: str, ig_steps, methods: Sequence[str] = METHODS) -> int:
    """The gradient steps of ``method`` (one of ``methods``): 1 for ``"EAP"`` (and ``"exact"``,
    which takes none), ``ig_steps`` for ``"EAP-IG"`` (an int >= 1, or 5 when None). ``ig_steps``
    given with another method is a ``ValueError`` (``ig_steps=1`` with EAP is EAP)."""
    if method not in methods:
        raise ValueError(f"unknown method {method!r}: choose from {tuple(methods)}")
    if method != "EAP-IG":
        if ig_steps is not None and not (method == "EAP" and ig_steps == 1):
            raise ValueError("ig_steps applies to method='EAP-IG' only")
        return 1
    if ig_steps is None:
        return 5
    if isinstance(ig_steps, bool) or not hasattr(ig_steps, "__index__"):
        raise ValueError(f"ig_steps must be an int >= 1 (or None for 5), got {ig_steps!r}")
    if int(ig_steps) < 1:
        raise ValueError(f"ig_steps must be >= 1 (or None for 5), got {ig_steps}")
    return int(ig_steps)


def _reduce_pos(per_pos: Tensor, graph: Graph) -> Tensor:
    return per_pos.detach().cpu() if graph.positional else per_pos.sum().detach().cpu()


def _receiver_grads(model, wiring: _Wiring, tokens: Tensor, clean_embed: Tensor, corrupted_embed: Tensor,
                    metric: Callable, labels, steps: int, attention_mask: Optional[Tensor]) -> Dict[str, Tensor]:
    """∂(Σ metric)/∂(each receiver hook and patched internal hook), summed over the IG steps and divided by ``steps``."""
    watched = sorted({e.hook for e in wiring.resid} | set(wiring.internal_hooks))
    grads: Dict[str, Tensor] = {}

    def capture(act: Tensor, hook) -> Tensor:
        # A fresh tensor: the hook's output feeds only this receiver (the mixer behind
        # hook_mixer_in, or ln_final), while ``act`` itself also flows down the residual
        # stream. Its gradient is the receiver's alone.
        act = act.clone()

        def store(grad: Tensor) -> None:
            grads[hook.name] = grads[hook.name] + grad.detach() if hook.name in grads else grad.detach()
        act.register_hook(store)
        return act

    b = tokens.shape[0]
    for k in range(1, steps + 1):
        alpha = k / steps
        start = corrupted_embed + alpha * (clean_embed - corrupted_embed) if steps > 1 else clean_embed
        leaf = start.detach().clone().requires_grad_(True)
        hooks = [("hook_embed", lambda act, hook, leaf=leaf: leaf)] + [(name, capture) for name in watched]
        with torch.inference_mode(False), torch.enable_grad():  # also under an outer inference_mode
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=attention_mask)
            value = _metric_values(metric, logits, labels, b)
            torch.autograd.grad(value, leaf)
    missing = [n for n in watched if n not in grads]
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:3]}: does the metric depend on the logits?")
    return {name: g / steps for name, g in grads.items()}


# ---------------------------------------------------------------------- patched runs
def patched_logits(model, graph: Graph, clean_tokens: Tensor, corrupted_tokens: Tensor,
                   in_graph: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None) -> Tensor:
    """Logits of the clean run in which every edge NOT in the graph carries its corrupted value.

    Receivers read ``Σ_{s in graph} a_s(this run) + Σ_{s not in graph} a_s(corrupted run)``;
    internal edges not in the graph get the corrupted run's activation at their hook.
    ``in_graph`` overrides ``graph.in_graph`` (same shape). ``attention_mask``: ``[b, p]``,
    left padding (see the module docstring).
    """
    b, p = clean_tokens.shape
    wiring = _Wiring(model, graph, clean_tokens, attention_mask)
    keep = graph.in_graph if in_graph is None else in_graph
    if keep.shape != graph.in_graph.shape:
        raise ValueError(f"in_graph must have shape {tuple(graph.in_graph.shape)}, got {tuple(keep.shape)}")
    if keep.dtype != torch.bool:  # ~ of an int 0/1 tensor is -1/-2, not "removed"
        raise TypeError(f"in_graph must be a bool tensor (True = edge kept), got {keep.dtype}")
    removed = ~keep.to(clean_tokens.device)
    if not bool(removed.any()):
        with torch.no_grad():
            return model(clean_tokens, attention_mask=attention_mask)
    internal_hooks = [e.hook for e in wiring.internal if bool(removed[e.index].any())]
    corrupted_acts = _run_cached(model, corrupted_tokens, wiring.sender_hooks + internal_hooks, attention_mask)
    return _patched_logits(model, graph, wiring, clean_tokens, corrupted_acts, removed, attention_mask)


def _corrupted_activations(model, wiring: "_Wiring", corrupted_tokens: Tensor,
                           attention_mask: Optional[Tensor]) -> Dict[str, Tensor]:
    """The corrupted run's values at every hook :func:`_patched_logits` may read (each sender's
    and each internal edge's): one forward, shared by every patched run of these prompts."""
    return _run_cached(model, corrupted_tokens, wiring.sender_hooks + [e.hook for e in wiring.internal],
                       attention_mask)


def _patched_logits(model, graph: Graph, wiring: "_Wiring", clean_tokens: Tensor, corrupted_acts: Dict[str, Tensor],
                    removed: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """:func:`patched_logits` given the corrupted run's activations and ``removed`` (``~in_graph``,
    some edge removed)."""
    p = clean_tokens.shape[1]
    diffs: Dict[int, Tensor] = {}
    # weights[r][g]: [units] or [p, units], 1 where the edge from that sender to receiver r is removed
    weights: Dict[int, Dict[int, Tensor]] = {}
    for e in wiring.resid:
        w = removed[e.index].float()
        if bool(w.any()):
            group = graph.groups[e.group]
            shape = (group.units,) if not graph.positional else (p, group.units)
            slot = weights.setdefault(e.receiver, {}).setdefault(
                e.group, torch.zeros(shape, device=clean_tokens.device))
            slot[..., e.unit] = w

    def record(g: int):
        def hook_fn(act: Tensor, hook) -> None:
            diffs[g] = corrupted_acts[hook.name] - act
        return hook_fn

    def receive(r: int):
        def hook_fn(act: Tensor, hook) -> Tensor:
            for g, w in weights[r].items():
                act = act + wiring.to_resid(g, diffs[g], w).to(act.dtype)
            return act
        return hook_fn

    def replace(e_index: int):
        def hook_fn(act: Tensor, hook) -> Tensor:
            where = removed[e_index]
            if not graph.positional:
                return corrupted_acts[hook.name]
            mask = where.view(1, p, *([1] * (act.ndim - 2)))
            return torch.where(mask, corrupted_acts[hook.name], act)
        return hook_fn

    needed_groups = sorted({g for ws in weights.values() for g in ws})
    hooks = [(graph.groups[g].hook, record(g)) for g in needed_groups]
    hooks += [(graph.receivers[r][1], receive(r)) for r in weights]
    hooks += [(e.hook, replace(e.index)) for e in wiring.internal if bool(removed[e.index].any())]
    with torch.no_grad():
        return model.run_with_hooks(clean_tokens, fwd_hooks=hooks, attention_mask=attention_mask)


def evaluate_graph(model, graph: Graph, clean, corrupted=None, metric: Callable = None, *, labels=None,
                   batch_size: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                   quiet: Optional[bool] = None, progress: Optional[bool] = None) -> Tensor:
    """The metric of the circuit: clean runs with every edge outside the graph patched to
    its corrupted value. Returns per-prompt values ``[N]`` (a scalar metric's batch value is
    given to each of its prompts), in the metric's own dtype, at least float32 (float64 for a
    float64 model's logits)."""
    quiet = hide_progress(quiet, progress, False)
    if metric is None:
        raise TypeError("evaluate_graph() needs a metric")
    out: List[Tensor] = []
    batches = iter_batches(clean, corrupted, labels, batch_size, attention_mask)
    for clean_tokens, corrupted_tokens, batch_labels, mask in tqdm(
            batches, desc="evaluate graph", total=count_batches(clean, batch_size), disable=quiet, leave=False,
            unit="batch"):
        logits = patched_logits(model, graph, clean_tokens, corrupted_tokens, attention_mask=mask)
        out.append(_per_prompt(metric, logits, batch_labels, clean_tokens.shape[0]))
    return torch.cat(out)


def path_patch(model, clean, corrupted=None, metric: Callable = None, *, senders: Sequence[str],
               receivers: Sequence[str], level: str = "layer", channel_groups: Optional[int] = None,
               positions=None, labels=None, batch_size: Optional[int] = None,
               attention_mask: Optional[Tensor] = None, quiet: Optional[bool] = None,
               progress: Optional[bool] = None) -> Tensor:
    """Path patching (Wang et al., 2022): the metric of the clean run in which the ``receivers``
    read the ``senders``' corrupted outputs along their direct residual paths, every other edge
    as in this run. Per prompt, ``[N]``.

    With one receiver, or receivers that do not feed each other, this is Wang et al.'s path
    patching. Receivers that feed each other (``["m1", "m3"]``) differ: here m1's changed
    output reaches m3 (the edge m1 -> m3 is in the graph and carries this run's value), where
    Wang et al. freeze every node but the senders when they compute the receivers' inputs.
    For their version, patch one receiver at a time.

    Nodes are named as in ``Graph.from_model(model, level, channel_groups=...)``: senders
    ``"input"``, ``"m{l}"`` (``"m{l}.out"`` at ``level="component"``), heads ``"m{l}.h{j}"`` /
    channel groups ``"m{l}.c{j}"`` at ``level="head"``; receivers ``"m{l}"`` (``"m{l}.in"``)
    and ``"logits"``. Every edge from a sender to a receiver is patched (a sender after a
    receiver has none: such a pair adds nothing). It is :func:`evaluate_graph` of the full
    graph less those edges; :func:`attribute` with ``method="exact"`` gives every single
    edge's change at once.

    ``positions`` (ints, negative from the end, or a bool mask ``[p]``): patch the paths at
    these positions only (the receivers read the senders' corrupted outputs there, their own
    run's elsewhere), as Wang et al. patch at the S2 or END token. They are columns of the
    prompts, which must then all have one length ``p`` (a positional graph's ``n_pos``).

    Empty ``senders`` (or ``receivers``) patch nothing: the clean run's metric, the base case of
    a loop over growing sender sets.
    """
    quiet = hide_progress(quiet, progress, False)
    n_pos = None
    if positions is not None:
        n_pos = _prompt_length(clean)
    graph = Graph.from_model(model, level, channel_groups=channel_groups, positional=n_pos is not None, n_pos=n_pos)
    for what, names, side in (("senders", senders, "parent"), ("receivers", receivers, "child")):
        if isinstance(names, str):
            raise TypeError(f"{what} must be a list of node names, got the string {names!r} (wrap it: [{names!r}])")
        known = {getattr(e, side) for e in graph.edges.values() if e.kind == "resid"}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{what} {unknown}: not {what} of this {level}-level graph; its {what} are "
                             f"{sorted(known, key=graph.nodes.index)}")
    paths = [e for e in graph.edges.values() if e.kind == "resid" and e.parent in senders and e.child in receivers]
    if not paths and len(senders) and len(receivers):  # (none given: nothing to patch, the clean run)
        raise ValueError(f"no residual path from {list(senders)} to {list(receivers)}: every sender comes after "
                         "every receiver")
    where = () if n_pos is None else (check_indices(positions, n_pos, "positions"),)
    for e in paths:
        graph.in_graph[(e.index, *where)] = False
    return evaluate_graph(model, graph, clean, corrupted, metric, labels=labels, batch_size=batch_size,
                          attention_mask=attention_mask, quiet=quiet)


def _prompt_length(clean) -> int:
    """The length of the prompts of ``clean`` (a token tensor, or a list of batches: the first's),
    for a positional graph; ``evaluate_graph`` refuses batches of another length."""
    if isinstance(clean, Tensor):
        first = clean
    elif isinstance(clean, (list, tuple)) and clean:
        first = _unpack(clean[0])[0]
    else:
        raise ValueError("positions= needs the prompts as a token tensor [N, p] or a list of batches (their "
                         "length sets the positions), not an iterator")
    if not isinstance(first, Tensor) or first.dim() != 2:
        raise ValueError(f"positions= needs token tensors [N, p], got {type(first).__name__}")
    return int(first.shape[1])


def evaluate_baseline(model, clean, corrupted=None, metric: Callable = None, *, run_corrupted: bool = False,
                      labels=None, batch_size: Optional[int] = None,
                      attention_mask: Optional[Tensor] = None, quiet: Optional[bool] = None,
                      progress: Optional[bool] = None) -> Tensor:
    """The metric of the unpatched model on the clean prompts (or the corrupted ones), per prompt ``[N]``.

    ``quiet`` / ``progress`` are taken so that the keyword arguments of :func:`evaluate_graph` and
    :func:`faithfulness` serve here too; one forward per batch shows no progress bar."""
    hide_progress(quiet, progress, True)  # (checked only: they must not contradict each other)
    if metric is None:
        raise TypeError("evaluate_baseline() needs a metric")
    out: List[Tensor] = []
    if isinstance(clean, Tensor) and corrupted is None:
        if run_corrupted:
            raise ValueError("evaluate_baseline(run_corrupted=True) runs the corrupted prompts, but corrupted is None")
        corrupted = clean  # the clean baseline needs no corrupted prompts
    for clean_tokens, corrupted_tokens, batch_labels, mask in iter_batches(clean, corrupted, labels, batch_size,
                                                                           attention_mask):
        with torch.no_grad():
            logits = model(corrupted_tokens if run_corrupted else clean_tokens, attention_mask=mask)
        out.append(_per_prompt(metric, logits, batch_labels, clean_tokens.shape[0]))
    return torch.cat(out)


def faithfulness(model, graph: Graph, clean, corrupted=None, metric: Callable = None, *, labels=None,
                 batch_size: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                 quiet: Optional[bool] = None, progress: Optional[bool] = None,
                 baselines: Optional[Tuple[float, float]] = None) -> float:
    """``(circuit - corrupted) / (clean - corrupted)`` of the mean metric: 1 for the full graph,
    0 for the empty one.

    ``baselines``: the mean metric on the clean and on the corrupted prompts, when already
    known (from :func:`evaluate_baseline`); a faithfulness curve over many graphs then runs
    the two unpatched baselines once instead of once per graph.
    """
    quiet = hide_progress(quiet, progress, False)
    return circuit_faithfulness(
        model, lambda clean, corrupted, **kw: evaluate_graph(model, graph, clean, corrupted, metric, quiet=quiet, **kw),
        clean, corrupted, metric, labels=labels, batch_size=batch_size, attention_mask=attention_mask,
        baselines=baselines)


def read_once(clean, corrupted=None, labels=None, batch_size: Optional[int] = None,
              attention_mask: Optional[Tensor] = None) -> Tuple[object, object, dict]:
    """``(clean, corrupted, kw)`` for evaluating the same data several times: token tensors as they
    are (``kw`` carries labels, batch_size, attention_mask), a dataloader read into a list of
    batches once (``kw`` then empty: the batches carry their own)."""
    if isinstance(clean, Tensor):
        return clean, corrupted, dict(labels=labels, batch_size=batch_size, attention_mask=attention_mask)
    return list(iter_batches(clean, corrupted, labels, batch_size, attention_mask)), None, {}


def mean_baselines(model, clean, corrupted, metric: Callable, **kw) -> Tuple[float, float]:
    """The mean metric on the clean and on the corrupted prompts (:func:`evaluate_baseline`)."""
    return (float(evaluate_baseline(model, clean, corrupted, metric, **kw).mean()),
            float(evaluate_baseline(model, clean, corrupted, metric, run_corrupted=True, **kw).mean()))


def circuit_faithfulness(model, evaluate_circuit: Callable[..., Tensor], clean, corrupted, metric: Callable, *,
                         labels=None, batch_size: Optional[int] = None, attention_mask: Optional[Tensor] = None,
                         baselines: Optional[Tuple[float, float]] = None) -> float:
    """``(circuit - corrupted) / (clean - corrupted)`` of the mean metric, where
    ``evaluate_circuit(clean, corrupted, **kw)`` gives the circuit's per-prompt values (an edge
    circuit's :func:`evaluate_graph`, a feature circuit's ``evaluate_features``)."""
    clean, corrupted, kw = read_once(clean, corrupted, labels, batch_size, attention_mask)
    circuit = float(evaluate_circuit(clean, corrupted, **kw).mean())
    clean_value, corrupted_value = (mean_baselines(model, clean, corrupted, metric, **kw) if baselines is None
                                    else baselines)
    gap = float(clean_value - corrupted_value)
    if abs(gap) < 1e-8:
        raise ValueError("the metric is the same on clean and corrupted prompts: faithfulness is undefined")
    return (circuit - float(corrupted_value)) / gap


def _attribute_exact(model, graph: Graph, clean, corrupted, metric, labels, batch_size, attention_mask,
                     quiet) -> Graph:
    """Patch one edge (one (edge, position) when positional) at a time; score = metric change,
    averaged over prompts. Batch by batch: the corrupted run once per batch, not once per
    edge (it was half of every edge's cost), and one batch's activations held at a time."""
    batches = list(iter_batches(clean, corrupted, labels, batch_size, attention_mask))
    cells = [(e.index, pos) for e in graph.edges.values()
             for pos in (range(graph.n_pos) if graph.positional else [None])]
    total = torch.zeros_like(graph.scores, dtype=torch.float64)  # Σ over prompts of the metric change
    n_prompts = 0
    with tqdm(total=len(cells) * len(batches), desc="exact edge patching", disable=quiet, leave=False) as bar:
        for c, k, lab, mask in batches:
            wiring = _Wiring(model, graph, c, mask)  # (its checks before any forward)
            baseline = evaluate_baseline(model, c, k, metric, labels=lab, attention_mask=mask)
            corrupted_acts = _corrupted_activations(model, wiring, k, mask)
            for index, pos in cells:
                cell = (index,) if pos is None else (index, pos)
                removed = torch.zeros_like(graph.in_graph, device=c.device)
                removed[cell] = True
                logits = _patched_logits(model, graph, wiring, c, corrupted_acts, removed, mask)
                total[cell] += float((_per_prompt(metric, logits, lab, c.shape[0]) - baseline).double().sum())
                bar.update()
            n_prompts += c.shape[0]
    graph.scores = (total / n_prompts).to(_score_dtype(model))
    return graph


__all__ = ["attribute", "evaluate_graph", "evaluate_baseline", "faithfulness", "patched_logits", "path_patch",
           "iter_batches", "split_batch", "METHODS"]
