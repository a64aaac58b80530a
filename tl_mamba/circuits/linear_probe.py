"""Linear probes: is a property of the prompt linearly readable from an activation at a position?

The Mamba IOI paper found "the name entities are stored linearly in Layer 39's SSM": a linear
probe on the recurrent state decodes which name is the indirect object. :func:`linear_probe`
collects one activation per prompt (the hook at a chosen position, flattened), holds out a
share of the prompts, and fits a multinomial logistic regression (integer labels: which class)
or a ridge regression (float labels: a quantity), with an L2 penalty on standardised inputs:

    from tl_mamba.circuits import linear_probe
    probe = linear_probe(model, "blocks.3.hook_h", tokens, io_name_ids, positions=-1)
    probe.test_accuracy                  # held-out accuracy (chance: 1 / len(probe.classes))
    probe.direction(a, b)                # [*act shape]: class a's weights less class b's
    probe.predict(acts)                  # acts [..., *act shape] -> class labels

The direction lives in the hook's own shape (a Mamba-1 state ``[e, n]``), so it can edit the
state in a ``hook_h`` hook, or read positions with :func:`top_activations`. A probe that reads a
property says it is there, not that the model uses it: patch or ablate along the direction to
test that. :func:`probe_activations` returns the activations alone (for another classifier).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from tl_mamba.circuits.ablation import _real_positions
from tl_mamba.circuits.top_activations import _check_hook
from tl_mamba.errors import NotAnIndexError, OutOfRangeError

__all__ = ["LinearProbe", "linear_probe", "probe_activations"]


@dataclass
class LinearProbe:
    """A fitted probe. ``weight`` and ``bias`` act on the raw activation (the standardisation is
    folded in): ``score = weight · act + bias``.

    Attributes:
        hook: the hook read.
        kind: ``"classification"`` or ``"regression"``.
        classes: ``[C]`` the label values (classification; ``weight[i]`` scores ``classes[i]``), or None.
        weight: ``[C, *act shape]`` (regression: ``[T, *act shape]``, one row per target column).
        bias: ``[C]`` (``[T]``).
        train_accuracy, test_accuracy: classification: the share of prompts labelled right (NaN
            with no test prompts). Regression: R² instead (1 - residual / total sum of squares,
            per the mean over target columns).
        train_rows, test_rows: the prompts of each split (rows of the dataset).
        l2: the penalty used.
    """

    hook: str
    kind: str
    classes: Optional[Tensor]
    weight: Tensor
    bias: Tensor
    train_accuracy: float
    test_accuracy: float
    train_rows: Tensor
    test_rows: Tensor
    l2: float

    def scores(self, acts: Tensor) -> Tensor:
        """``acts`` ``[..., *act shape]`` → ``[..., C]`` (class scores, or the regression's outputs)."""
        shape = tuple(self.weight.shape[1:])
        if tuple(acts.shape[acts.dim() - len(shape):]) != shape:
            raise ValueError(f"acts must end in the hook's shape {shape}, got {tuple(acts.shape)}")
        flat = acts.reshape(*acts.shape[:acts.dim() - len(shape)], -1).to(self.weight.dtype)
        return flat @ self.weight.reshape(self.weight.shape[0], -1).to(flat.device).T + self.bias.to(flat.device)

    def predict(self, acts: Tensor) -> Tensor:
        """``acts`` ``[..., *act shape]`` → the predicted labels ``[...]`` (regression: ``[..., T]``)."""
        scores = self.scores(acts)
        if self.kind == "regression":
            return scores
        return self.classes.to(scores.device)[scores.argmax(-1)]

    def direction(self, a, b=None) -> Tensor:
        """Class ``a``'s weights less class ``b``'s (``[*act shape]``), or less the mean of the
        other classes' when ``b`` is None: the direction along which the probe tells ``a`` apart."""
        if self.kind != "classification":
            raise ValueError("direction(a, b) compares classes; a regression probe's weight[t] is its direction")
        i = self._index(a)
        if b is not None:
            return self.weight[i] - self.weight[self._index(b)]
        others = [j for j in range(self.weight.shape[0]) if j != i]
        return self.weight[i] - self.weight[others].mean(0)

    def _index(self, label) -> int:
        hits = (self.classes == label).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(f"{label!r} is not one of the probe's classes {self.classes.tolist()[:10]}")
        return int(hits[0])


def probe_activations(model, hook: str, tokens: Tensor, positions: Union[int, Tensor] = -1, *,
                      attention_mask: Optional[Tensor] = None, batch_size: int = 32,
                      quiet: bool = True) -> Tensor:
    """``blocks.{l}.hook_*`` (any hook with a position axis) at one position of each prompt:
    ``[N, *act shape]``, on the model's device.

    Args:
        hook: a full hook name (``"blocks.3.hook_h"``); the model runs only up to its layer.
        tokens: ``[N, p]``.
        positions: one position for every prompt, or ``[N]`` ints, one per prompt, counted among
            the prompt's real tokens (0 = its first; negative from its last, -1 = the last), so
            left padding does not move them.
        attention_mask: ``[N, p]``, 1 = real token (None: the padding the forward infers).
        batch_size: prompts per forward.
        quiet: no progress bar.
    """
    from tqdm.auto import tqdm

    layer = _check_hook(model, hook)
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be token ids [N, p], got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (prompts per forward), got {batch_size!r}")
    device = model.W_E.device
    tokens = tokens.to(device)
    n, p = tokens.shape
    real = _real_positions(model, tokens, None if attention_mask is None else attention_mask.to(device))
    real = torch.ones(n, p, dtype=torch.bool, device=device) if real is None else real.to(device).bool()
    columns = _columns(positions, real)
    out = []
    with torch.no_grad():
        for start in tqdm(range(0, n, batch_size), desc=f"probe activations {hook}", disable=quiet, leave=False,
                          unit="batch"):
            rows = slice(start, start + batch_size)
            taken = {}

            def take(act: Tensor, hook) -> None:
                taken["act"] = act[torch.arange(act.shape[0], device=act.device), columns[rows].to(act.device)]

            mask = None if attention_mask is None else attention_mask[rows].to(device)
            model.run_with_hooks(tokens[rows], fwd_hooks=[(hook, take)], attention_mask=mask, return_type=None,
                                 stop_at_layer=layer)
            out.append(taken["act"].clone())
    return torch.cat(out)


def _columns(positions, real: Tensor) -> Tensor:
    """Each prompt's column of ``positions`` (counted among its real tokens): ``[N]`` long."""
    n = real.shape[0]
    if isinstance(positions, Tensor):
        if positions.is_floating_point() or positions.dtype == torch.bool or positions.shape != (n,):
            raise ValueError(f"positions must be one int or [N] = [{n}] ints, got {positions.dtype} "
                             f"{tuple(positions.shape)}")
        given = positions.to(real.device).long()
    elif isinstance(positions, bool) or not hasattr(positions, "__index__"):
        raise NotAnIndexError(f"positions must be one int or [N] ints, got {positions!r}")
    else:
        given = torch.full((n,), int(positions), dtype=torch.long, device=real.device)
    length = real.long().sum(1)
    outside = ((given < -length) | (given >= length)).nonzero().flatten()
    if outside.numel():
        i = int(outside[0])
        raise OutOfRangeError(f"position {int(given[i])} is outside prompt {i}'s {int(length[i])} real tokens")
    index = torch.where(given < 0, given + length, given)  # among the real tokens
    first = real.long().argmax(1)  # left padding
    return first + index


def linear_probe(model, hook: str, tokens: Tensor, labels, positions: Union[int, Tensor] = -1, *,
                 attention_mask: Optional[Tensor] = None, test_fraction: float = 0.25, l2: float = 1e-3,
                 seed: int = 0, batch_size: int = 32, max_iter: int = 500, quiet: bool = True) -> LinearProbe:
    """Fit a linear probe of ``labels`` on ``hook`` at ``positions``; see the module.

    Args:
        hook, tokens, positions, attention_mask, batch_size: as in :func:`probe_activations`.
        labels: ``[N]`` ints (classes: multinomial logistic regression), or ``[N]`` / ``[N, T]``
            floats (ridge regression).
        test_fraction: the share of prompts held out (a seeded draw), in ``[0, 1)``.
        l2: the penalty ``l2/2 · ‖W‖²`` on the weights of the standardised inputs (each input
            entry centred and scaled to unit variance over the training prompts); the loss it is
            added to is the mean cross-entropy (the mean squared error for regression).
        seed: the split's seed.
        max_iter: L-BFGS iterations (classification).
        quiet: no progress bar while the activations are collected.

    Returns:
        :class:`LinearProbe`.
    """
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must be token ids [N, p], got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    labels = torch.as_tensor(labels)
    n = tokens.shape[0]
    if labels.shape[:1] != (n,) or labels.dim() > 2:
        raise ValueError(f"labels must be [N] (or [N, T] for regression), N = {n} prompts, got {tuple(labels.shape)}")
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be ints (classes) or floats (quantities), got {labels.dtype}")
    classify = not labels.is_floating_point()
    if classify and labels.dim() != 1:
        raise ValueError(f"class labels must be [N], got {tuple(labels.shape)}")
    if not (isinstance(test_fraction, (int, float)) and not isinstance(test_fraction, bool)
            and 0 <= test_fraction < 1):
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    if isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 >= 0:
        raise ValueError(f"l2 must be a number >= 0, got {l2!r}")
    if classify and labels.unique().numel() < 2:
        raise ValueError(f"a probe needs at least two classes; every label is {int(labels[0])}")
    acts = probe_activations(model, hook, tokens, positions, attention_mask=attention_mask, batch_size=batch_size,
                             quiet=quiet)
    shape = tuple(acts.shape[1:])
    X = acts.reshape(n, -1).double().cpu()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    n_test = int(round(test_fraction * n))
    if n - n_test < 2:
        raise ValueError(f"{n - n_test} training prompts: a probe needs at least two")
    test_rows, train_rows = order[:n_test].sort().values, order[n_test:].sort().values
    mean = X[train_rows].mean(0)
    std = X[train_rows].std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # a constant input entry carries nothing
    Z = (X - mean) / std
    if classify:
        classes, target = labels.unique(return_inverse=True)
        Z_train = Z[train_rows]
        if Z_train.shape[0] < Z_train.shape[1]:
            # The penalised optimum's W lies in the span of the training inputs, so with fewer
            # prompts than inputs it is fitted on their coordinates in that span (Z = U S Vᵀ: scores
            # Z Wᵀ = (U S) Bᵀ and ‖W‖ = ‖B‖ for W = B Vᵀ), the same problem in n instead of D
            # dimensions (a 196k-entry Mamba-2 state: seconds, not hours).
            U, S, Vh = torch.linalg.svd(Z_train, full_matrices=False)
            B, b = _logistic(U * S, target[train_rows], len(classes), float(l2), int(max_iter))
            W = B @ Vh
        else:
            W, b = _logistic(Z_train, target[train_rows], len(classes), float(l2), int(max_iter))
    else:
        classes, target = None, labels.double().reshape(n, -1)
        W, b = _ridge(Z[train_rows], target[train_rows], float(l2))
    weight = W / std  # [C, D] on the raw activations
    bias = b - weight @ mean
    dtype = torch.float64 if acts.dtype == torch.float64 else torch.float32

    def metric(rows: Tensor) -> float:
        if rows.numel() == 0:
            return float("nan")
        scores = X[rows] @ weight.T + bias
        if classify:
            return float((scores.argmax(-1) == target[rows]).double().mean())
        residual = (target[rows] - scores).pow(2).sum(0)
        total = (target[rows] - target[rows].mean(0)).pow(2).sum(0)
        return float((1 - residual / total.clamp_min(1e-300)).mean())

    return LinearProbe(hook=hook, kind="classification" if classify else "regression", classes=classes,
                       weight=weight.to(dtype).reshape(-1, *shape), bias=bias.to(dtype),
                       train_accuracy=metric(train_rows), test_accuracy=metric(test_rows), train_rows=train_rows,
                       test_rows=test_rows, l2=float(l2))


def _logistic(Z: Tensor, target: Tensor, n_classes: int, l2: float, max_iter: int):
    """Multinomial logistic regression: argmin mean CE(Z Wᵀ + b) + l2/2 ‖W‖², by L-BFGS (float64)."""
    W = torch.zeros(n_classes, Z.shape[1], dtype=Z.dtype, requires_grad=True)
    b = torch.zeros(n_classes, dtype=Z.dtype, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-10,
                                  tolerance_change=1e-14, history_size=20, line_search_fn="strong_wolfe")

    def objective():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(Z @ W.T + b, target) + 0.5 * l2 * W.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
    return W.detach(), b.detach()


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
