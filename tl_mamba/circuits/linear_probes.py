"""Linear probes: is a property of the prompt linearly readable from an activation at a position?

The Mamba IOI paper found "the name entities are stored linearly in Layer 39's SSM": a linear
probe on the recurrent state decodes which name is the indirect object. :func:`linear_probe`
collects one activation per prompt (the hook at a chosen position, flattened), holds out a
seeded, stratified share of the prompts, and fits a multinomial logistic regression (integer
labels: which class) or a ridge regression (float labels: a quantity), with an L2 penalty on
standardised inputs:

    from tl_mamba.circuits import linear_probe
    probe = linear_probe(model, "blocks.3.hook_h", tokens, io_name_ids, positions=-1)
    probe.test_accuracy, probe.majority  # held-out accuracy, and always guessing the commonest class
    probe.direction(a, b)                # [*act shape]: class a's weights less class b's
    probe.predict(acts)                  # acts [..., *act shape] -> class labels

:func:`probe_activations` collects the activations alone and :func:`fit_probe` fits on them, to
sweep ``l2``, fit a control task (shuffled labels) or use another classifier without running
the model again. The direction lives in the hook's own shape (a Mamba-1 state ``[e, n]``), so
:func:`top_activations` reads it and a ``hook_h`` hook can edit along it. A probe that reads a
property says it is there, not that the model uses it: patch or ablate to test that.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from tl_mamba.circuits.progress import hide_progress
from tl_mamba.circuits.ablation import _device_tokens, check_batch_size
from tl_mamba.circuits.activation_examples import _check_hook, _real_tokens
from tl_mamba.errors import NotAnIndexError, OutOfRangeError, caller_stacklevel, reusable
from tl_mamba.models.tokens import leading_padding

__all__ = ["LinearProbe", "fit_probe", "linear_probe", "probe_activations"]


@dataclass
class LinearProbe:
    """A fitted probe. ``weight`` and ``bias`` act on the raw activation (the standardisation is
    folded in): ``score = weight · act + bias``.

    Attributes:
        kind: ``"classification"`` or ``"regression"``.
        classes: ``[C]`` the label values seen in training (``weight[i]`` scores ``classes[i]``),
            or None for regression.
        weight: ``[C, *act shape]`` (regression: ``[T, *act shape]``, one row per target column).
        bias: ``[C]`` (``[T]``).
        metric: ``"accuracy"`` (the share of prompts labelled right) or ``"r2"`` (1 - residual /
            total sum of squares, averaged over target columns; NaN where the targets are constant).
        train_score, test_score: that metric on each split (NaN with no test prompts).
        majority: classification: the test share of the training split's most common class, the
            score of always guessing it (the chance level with unbalanced classes); else NaN.
        train_rows, test_rows: the prompts of each split (rows of the activations).
        class_counts: ``[C]`` training prompts per class (classification), else None.
        input_mean, input_std: ``[*act shape]``: the training activations' mean and the scale
            each entry was divided by (1 where it is constant): ``weight · input_std`` is the
            probe on standardised inputs.
        l2: the penalty used. converged: whether L-BFGS met its gradient tolerance (regression:
            True, solved exactly). hook: the hook read (``linear_probe``), else None.
        single_target: a regression fitted on ``[N]`` labels (``predict`` then returns ``[...]``).
    """

    kind: str
    classes: Optional[Tensor]
    weight: Tensor
    bias: Tensor
    metric: str
    train_score: float
    test_score: float
    majority: float
    train_rows: Tensor
    test_rows: Tensor
    class_counts: Optional[Tensor]
    input_mean: Tensor
    input_std: Tensor
    l2: float
    converged: bool
    hook: Optional[str] = None
    single_target: bool = False

    @property
    def train_accuracy(self) -> float:
        return self._accuracy(self.train_score)

    @property
    def test_accuracy(self) -> float:
        return self._accuracy(self.test_score)

    def _accuracy(self, score: float) -> float:
        if self.metric != "accuracy":
            raise AttributeError("a regression probe has no accuracy: its train_score / test_score are R²")
        return score

    def scores(self, acts: Tensor) -> Tensor:
        """``acts`` ``[..., *act shape]`` → ``[..., C]`` (class scores, or the regression's outputs)."""
        shape = tuple(self.weight.shape[1:])
        if tuple(acts.shape[acts.dim() - len(shape):]) != shape:
            raise ValueError(f"acts must end in the probed activation's shape {shape}, got {tuple(acts.shape)}")
        flat = acts.reshape(*acts.shape[:acts.dim() - len(shape)], -1).to(self.weight.dtype)
        return flat @ self.weight.reshape(self.weight.shape[0], -1).to(flat.device).T + self.bias.to(flat.device)

    def predict(self, acts: Tensor) -> Tensor:
        """``acts`` ``[..., *act shape]`` → the predicted labels ``[...]`` (regression on ``[N, T]``
        targets: ``[..., T]``)."""
        scores = self.scores(acts)
        if self.kind == "regression":
            return scores[..., 0] if self.single_target else scores
        return self.classes.to(scores.device)[scores.argmax(-1)]

    def direction(self, a, b=None) -> Tensor:
        """Class ``a``'s weights less class ``b``'s (``[*act shape]``), or less the mean of the
        other classes' when ``b`` is None: the direction the probe *reads* (on raw activations, so
        large on entries of small variance). To *write* along it (an edit of ``hook_h``), mind its
        scale: ``direction * input_std**2`` is the same direction in standardised units, mapped back."""
        if self.kind != "classification":
            raise ValueError("direction(a, b) compares classes; a regression probe's weight[t] is its direction")
        i = self._index(a)
        if b is not None:
            return self.weight[i] - self.weight[self._index(b)]
        others = [j for j in range(self.weight.shape[0]) if j != i]
        return self.weight[i] - self.weight[others].mean(0)

    def _index(self, label) -> int:
        if isinstance(label, Tensor) and label.numel() == 1:
            label = label.item()
        if isinstance(label, bool) or not hasattr(label, "__index__"):
            raise ValueError(f"a class is one of the integer labels {self.classes.tolist()[:10]}, got {label!r}")
        hits = (self.classes == int(label)).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(f"{label!r} is not one of the probe's classes {self.classes.tolist()[:10]} (the "
                             "labels of its training prompts)")
        return int(hits[0])


def probe_activations(model, hook: Union[str, Sequence[str]], tokens: Tensor, positions: Union[int, Tensor] = -1,
                      *, attention_mask: Optional[Tensor] = None, batch_size: int = 32,
                      quiet: Optional[bool] = None,
                      progress: Optional[bool] = None) -> Union[Tensor, Dict[str, Tensor]]:
    """``hook`` (any hook with a position axis) at one position of each prompt: ``[N, *act
    shape]``, on the model's device; for a list of hooks (every layer's ``hook_h``, say), a dict
    ``{hook: [N, *act shape]}`` from the same forward passes.

    Args:
        hook: a full hook name (``"blocks.3.hook_h"``), or a list of them; the model runs only up
            to the last one's layer.
        tokens: ``[N, p]``.
        positions: one position for every prompt, or ``[N]`` ints, one per prompt, counted among
            the prompt's real tokens (0 = its first; negative from its last, -1 = the last), so
            padding does not move them.
        attention_mask: ``[N, p]``, 1 = real token. None: the padding the forward infers (leading
            pad tokens, read as left padding only when the tokenizer pads on the left:
            ``model.tokenizer.padding_side``, else a warning), and each row's trailing run of the
            pad id (``to_tokens``' right padding). Left-padded tokens want their mask.
        batch_size: prompts per forward.
        quiet / progress: hide / show the progress bar (either spelling; ``tl_mamba.circuits.progress``).
    """
    quiet = hide_progress(quiet, progress, True)
    from tqdm.auto import tqdm

    names = [hook] if isinstance(hook, str) else list(dict.fromkeys(hook)) if isinstance(hook, (list, tuple)) else None
    if not names:
        raise ValueError(f"hook must be a full hook name or a non-empty list of them, got {hook!r}")
    stops = [_check_hook(model, name) for name in names]
    stop = None if None in stops else max(stops)
    tokens = _device_tokens(model, tokens)
    batch_size = check_batch_size(batch_size)
    device = tokens.device
    n = tokens.shape[0]
    real = _real_tokens(model, tokens, None if attention_mask is None else attention_mask.to(device))
    columns = _columns(positions, real)
    out: Dict[str, List[Tensor]] = {name: [] for name in names}
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc="probe activations", disable=quiet, leave=False,
                          unit="batch"):
            rows = slice(start, start + batch_size)

            def take(act: Tensor, hook) -> None:
                picked = act[torch.arange(act.shape[0], device=act.device), columns[rows].to(act.device)]
                out[hook.name].append(picked.clone())

            mask = None if attention_mask is None else attention_mask[rows].to(device)
            model.run_with_hooks(tokens[rows], fwd_hooks=[(name, take) for name in names], attention_mask=mask,
                                 return_type=None, stop_at_layer=stop)
    acts = {name: torch.cat(parts) for name, parts in out.items()}
    return acts[names[0]] if isinstance(hook, str) else acts


def _columns(positions, real: Tensor) -> Tensor:
    """Each prompt's column of ``positions`` (counted among its real tokens): ``[N]`` long."""
    n = real.shape[0]
    positions = reusable(positions)  # (a generator of one position per prompt)
    if isinstance(positions, (list, tuple)) or type(positions).__module__ == "numpy":
        positions = torch.as_tensor(positions)
    if isinstance(positions, Tensor) and positions.dim() == 0 and not positions.is_floating_point() \
            and positions.dtype != torch.bool:
        positions = int(positions)
    if isinstance(positions, Tensor):
        if positions.is_floating_point() or positions.dtype == torch.bool or positions.shape != (n,):
            raise ValueError(f"positions must be one int or [N] = [{n}] ints, got {positions.dtype} "
                             f"{tuple(positions.shape)}")
        given = positions.to(real.device).long()
    elif isinstance(positions, bool) or type(positions).__name__ == "bool_" or not hasattr(positions, "__index__"):
        raise NotAnIndexError(f"positions must be one int or [N] ints, got {positions!r}")
    else:
        given = torch.full((n,), int(positions), dtype=torch.long, device=real.device)
    length = real.long().sum(1)
    outside = ((given < -length) | (given >= length)).nonzero().flatten()
    if outside.numel():
        i = int(outside[0])
        raise OutOfRangeError(f"position {int(given[i])} is outside prompt {i}'s {int(length[i])} real tokens")
    index = torch.where(given < 0, given + length, given)  # among the real tokens
    return leading_padding(real) + index


def linear_probe(model, hook: Union[str, Sequence[str]], tokens: Tensor, labels,
                 positions: Union[int, Tensor] = -1, *, attention_mask: Optional[Tensor] = None,
                 batch_size: int = 32, quiet: Optional[bool] = None,
                 progress: Optional[bool] = None, **fit) -> Union[LinearProbe, Dict[str, LinearProbe]]:
    """Fit a linear probe of ``labels`` on ``hook`` at ``positions``: :func:`probe_activations`
    then :func:`fit_probe` (whose keywords, ``test_fraction``, ``l2``, ``seed``, ``stratify`` and
    ``max_iter``, it passes on); see the module :mod:`tl_mamba.circuits.linear_probes`. For a list of
    hooks (a layer sweep), one probe per hook, ``{hook: LinearProbe}``, all on the same split,
    from the same forward passes."""
    quiet = hide_progress(quiet, progress, True)
    labels = _check_labels(labels, _device_tokens(model, tokens).shape[0])  # before the forward passes
    acts = probe_activations(model, hook, tokens, positions, attention_mask=attention_mask, batch_size=batch_size,
                             quiet=quiet)
    if isinstance(acts, Tensor):
        return _fit_at(hook, acts, labels, fit)
    return {name: _fit_at(name, site, labels, fit) for name, site in acts.items()}


def _fit_at(hook: str, acts: Tensor, labels: Tensor, fit: dict) -> LinearProbe:
    """:func:`fit_probe` of ``hook``'s activations, its warnings naming the hook (in a layer
    sweep, "L-BFGS stopped after max_iter" alone does not say which probe)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probe = fit_probe(acts, labels, **fit)
    for warning in caught:
        warnings.warn(f"{hook}: {warning.message}", warning.category, stacklevel=caller_stacklevel())
    probe.hook = hook
    return probe


def fit_probe(acts: Tensor, labels, *, test_fraction: float = 0.25, l2: float = 1e-3, seed: int = 0,
              stratify: bool = True, max_iter: int = 500) -> LinearProbe:
    """Fit a linear probe of ``labels`` on activations you have (``probe_activations``' result):
    sweep ``l2``, refit with shuffled labels as a control task, or probe other positions without
    running the model again.

    Args:
        acts: ``[N, *act shape]`` floats, one activation per prompt.
        labels: ``[N]`` ints (classes: multinomial logistic regression), or ``[N]`` / ``[N, T]``
            floats (ridge regression).
        test_fraction: the share of prompts held out, in ``[0, 1)``; at least one prompt when it is
            not 0 and some class has a prompt to spare (a warning when none has).
        l2: the penalty ``l2/2 · ‖W‖²`` on the weights of the standardised inputs (each entry
            centred and scaled to unit variance over the training prompts); the loss it is added to
            is the mean cross-entropy (half the mean squared error for regression).
        seed: the split's seed.
        stratify: classification: hold out about ``test_fraction`` of each class, and keep at
            least one prompt of every class for training.
        max_iter: L-BFGS iterations (classification); a warning when it stops before converging.

    Returns:
        :class:`LinearProbe` (``hook`` None).
    """
    if not isinstance(acts, Tensor) or acts.dim() < 2 or not acts.is_floating_point():
        raise ValueError(f"acts must be float activations [N, *shape], got "
                         f"{f'{acts.dtype} {tuple(acts.shape)}' if isinstance(acts, Tensor) else type(acts).__name__}")
    n = acts.shape[0]
    labels = _check_labels(labels, n)
    classify = not labels.is_floating_point()
    if not (isinstance(test_fraction, numbers.Real) and not isinstance(test_fraction, bool)
            and 0 <= test_fraction < 1):
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if isinstance(l2, bool) or not isinstance(l2, numbers.Real) or not (0 <= l2 < math.inf):
        raise ValueError(f"l2 must be a finite number >= 0, got {l2!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int (the split's), got {seed!r}")
    shape = tuple(acts.shape[1:])
    X = acts.reshape(n, -1).detach().double().cpu()
    bad = (~torch.isfinite(X)).any(1).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"the activations of prompts {bad[:8].tolist()} hold NaN or infinite values")
    train_rows, test_rows = _split(n, labels if classify and stratify else None, float(test_fraction), seed)
    if train_rows.numel() < 2:
        raise ValueError(f"{train_rows.numel()} training prompts: a probe needs at least two")
    if test_fraction > 0 and test_rows.numel() == 0:
        warnings.warn("no prompt could be held out: every class has one prompt, which the stratified split keeps "
                      "for training (test_score is NaN)", stacklevel=caller_stacklevel())
    mean = X[train_rows].mean(0)
    std = X[train_rows].std(0, unbiased=False)
    # entries constant over the training prompts (to rounding) carry nothing: left unscaled
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
    Z = (X[train_rows] - mean) / std  # the training prompts' only: a Mamba-2 state is 196k entries
    converged, counts, majority = True, None, float("nan")
    if classify:
        classes, counts = labels[train_rows].unique(return_counts=True)
        if classes.numel() < 2:
            raise ValueError(f"the training prompts hold one class ({int(classes[0])}): a probe needs at least two")
        unseen = sorted(set(labels[test_rows].tolist()) - set(classes.tolist()))
        if unseen:
            warnings.warn(f"classes {unseen[:8]} are in the test prompts only: the probe can never predict them",
                          stacklevel=caller_stacklevel())
        target = torch.searchsorted(classes, labels.clamp(int(classes[0]), int(classes[-1])))
        W, b, converged = _logistic(Z, target[train_rows], len(classes), float(l2), max_iter)
        if not converged:
            warnings.warn(f"L-BFGS stopped after max_iter={max_iter} iterations before its gradient tolerance: "
                          "raise max_iter (or l2)", stacklevel=caller_stacklevel())
        if test_rows.numel():
            majority = float((labels[test_rows] == classes[counts.argmax()]).double().mean())
    else:
        classes, target = None, labels.double().reshape(n, -1)
        W, b = _ridge(Z, target[train_rows], float(l2))
    weight = W / std  # [C, D] on the raw activations
    bias = b - weight @ mean
    dtype = torch.float64 if acts.dtype == torch.float64 else torch.float32

    def score(rows: Tensor) -> float:
        if rows.numel() == 0:
            return float("nan")
        predicted = X[rows] @ weight.T + bias
        if classify:
            return float((classes[predicted.argmax(-1)] == labels[rows]).double().mean())
        residual = (target[rows] - predicted).pow(2).sum(0)
        total = (target[rows] - target[rows].mean(0)).pow(2).sum(0)
        return float(torch.where(total > 0, 1 - residual / total, torch.nan).mean())

    return LinearProbe(kind="classification" if classify else "regression", classes=classes,
                       weight=weight.to(dtype).reshape(-1, *shape), bias=bias.to(dtype),
                       metric="accuracy" if classify else "r2", train_score=score(train_rows),
                       test_score=score(test_rows), majority=majority, train_rows=train_rows, test_rows=test_rows,
                       class_counts=counts, input_mean=mean.to(dtype).reshape(shape),
                       input_std=std.to(dtype).reshape(shape), l2=float(l2), converged=converged,
                       single_target=not classify and labels.dim() == 1)


def _check_labels(labels, n: int) -> Tensor:
    """``labels`` as a CPU tensor: ``[N]`` ints or ``[N]`` / ``[N, T]`` finite floats (a generator is
    read once; strings are refused with how to number them)."""
    labels = reusable(labels)
    if not isinstance(labels, Tensor) and hasattr(labels, "tolist"):  # numpy arrays, pandas Series
        labels = labels.tolist()
    if isinstance(labels, (list, tuple)) and any(isinstance(label, str) for label in labels):
        raise ValueError("labels are strings; a probe's classes are ints: number them, e.g. "
                         "names = sorted(set(labels)); labels = [names.index(label) for label in labels] "
                         "(names[k] is then class k)")
    labels = torch.as_tensor(labels).detach().cpu()
    if n == 0:
        raise ValueError("no prompts to probe")
    if labels.shape[:1] != (n,) or labels.dim() > 2:
        raise ValueError(f"labels must be [N] (or [N, T] for regression), N = {n} prompts, got {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be ints (classes) or floats (quantities), got {labels.dtype}"
                         + (" (a two-class probe takes 0 / 1 ints: labels.long())" if labels.dtype == torch.bool
                            else ""))
    if not labels.is_floating_point():
        if labels.dim() != 1:
            raise ValueError(f"class labels must be [N], got {tuple(labels.shape)}")
        return labels.long()
    bad = (~torch.isfinite(labels.reshape(n, -1))).any(1).nonzero().flatten()
    if bad.numel():
        raise ValueError(f"the labels of prompts {bad[:8].tolist()} are NaN or infinite")
    return labels


def _split(n: int, classes: Optional[Tensor], test_fraction: float, seed: int) -> Tuple[Tensor, Tensor]:
    """``(train rows, test rows)``, each ascending: a seeded draw of ``round(test_fraction · n)``
    test prompts (at least one when ``test_fraction > 0``); stratified by ``classes`` when given,
    each class giving its share (largest remainders first) and keeping one prompt for training."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    wanted = 0 if test_fraction == 0 else max(1, round(test_fraction * n))
    if classes is None:
        test = order[:wanted]
    else:
        shuffled = classes[order]
        groups = [order[shuffled == c] for c in shuffled.unique()]
        quota = [int(test_fraction * len(g)) for g in groups]  # < len(g): test_fraction < 1
        spare = sorted(range(len(groups)), key=lambda i: -(test_fraction * len(groups[i]) - quota[i]))
        for i in spare:
            if sum(quota) >= wanted:
                break
            if quota[i] < len(groups[i]) - 1:
                quota[i] += 1
        test = torch.cat([g[:q] for g, q in zip(groups, quota)])
    is_test = torch.zeros(n, dtype=torch.bool)
    is_test[test] = True
    return (~is_test).nonzero().flatten(), is_test.nonzero().flatten()


def _logistic(Z: Tensor, target: Tensor, n_classes: int, l2: float, max_iter: int) -> Tuple[Tensor, Tensor, bool]:
    """Multinomial logistic regression: argmin mean CE(Z Wᵀ + b) + l2/2 ‖W‖², by L-BFGS (float64).
    Returns ``(W [C, D], b [C], converged)``."""
    if Z.shape[0] < Z.shape[1]:
        # The penalised optimum's W lies in the span of the training inputs, so with fewer prompts
        # than inputs it is fitted on their coordinates in that span (Z = U S Vᵀ: scores Z Wᵀ =
        # (U S) Bᵀ and ‖W‖ = ‖B‖ for W = B Vᵀ), the same problem in n instead of D dimensions
        # (a 196k-entry Mamba-2 state: seconds, not hours).
        U, S, Vh = torch.linalg.svd(Z, full_matrices=False)
        B, b, converged = _logistic(U * S, target, n_classes, l2, max_iter)
        return B @ Vh, b, converged
    W = torch.zeros(n_classes, Z.shape[1], dtype=Z.dtype, requires_grad=True)
    b = torch.zeros(n_classes, dtype=Z.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        return torch.nn.functional.cross_entropy(Z @ W.T + b, target) + 0.5 * l2 * W.pow(2).sum()

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        gradient = max(float(g.abs().max()) for g in torch.autograd.grad(objective(), (W, b)))
    return W.detach(), b.detach(), gradient <= 1e-5


def _ridge(Z: Tensor, Y: Tensor, l2: float):
    """argmin mean ‖Y - (Z Wᵀ + b)‖² / 2 + l2/2 ‖W‖² in closed form (through the n × n Gram matrix
    when there are fewer prompts than inputs: a state of 196k entries stays cheap)."""
    n = Z.shape[0]
    Zc, Yc = Z - Z.mean(0), Y - Y.mean(0)
    if n <= Z.shape[1]:  # W = Zcᵀ (Zc Zcᵀ + n·l2 I)⁻¹ Yc
        gram = Zc @ Zc.T + n * l2 * torch.eye(n, dtype=Z.dtype)
        W = (Zc.T @ torch.linalg.lstsq(gram, Yc).solution).T
    else:  # W = (Zcᵀ Zc + n·l2 I)⁻¹ Zcᵀ Yc
        W = torch.linalg.lstsq(Zc.T @ Zc + n * l2 * torch.eye(Z.shape[1], dtype=Z.dtype), Zc.T @ Yc).solution.T
    b = Y.mean(0) - W @ Z.mean(0)
    return W, b
