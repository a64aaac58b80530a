"""ACDC: automatic circuit discovery by pruning edges one at a time with exact patching.

Conmy et al. (2023), "Towards Automated Circuit Discovery for Mechanistic
Interpretability". Starting from the whole graph, the nodes are visited from the
logits back to the input; for each node, each edge into it is removed on trial
(patched to its corrupted value, as in :func:`tl_mamba.circuits.evaluate_graph`),
and stays removed if the circuit's output moves less than ``threshold``:

- ``metric="kl"`` (the default, as in the paper): the objective is the mean over
  prompts of KL(clean model ‖ circuit) of the next-token distribution at the last
  position; an edge goes when removing it raises the KL by less than ``threshold``.
- ``metric=callable`` (``logits -> [b]`` or a scalar, ``(logits, labels)`` with labels):
  the objective is the metric's mean; an edge goes when removing it moves the mean by
  less than ``threshold`` in absolute value.

Each trial is one patched forward of every batch, so a graph of E edges costs E
forwards per batch (E × n_pos for a positional graph), against one forward and
one backward for EAP: ACDC is the exact, slow reference that EAP approximates.

    from tl_mamba.circuits import Graph, acdc
    graph = acdc(model, Graph.from_model(model, "head"), clean, corrupted, threshold=0.02)
    graph.included_edges(); graph.prune(); graph.to_image("acdc.png")
"""

from __future__ import annotations

import numbers
from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tl_mamba.circuits.progress import hide_progress
from tl_mamba.circuits.eap import (
    _corrupted_activations,
    _patched_logits,
    _per_prompt,
    _score_dtype,
    _Wiring,
    iter_batches,
)
from tl_mamba.circuits.graph import Graph
from tl_mamba.ops.precision import upcast

__all__ = ["acdc", "acdc_order"]


def acdc_order(graph: Graph) -> List[Tuple[int, ...]]:
    """The cells ACDC tries, in order: ``(edge index,)``, or ``(edge index, position)`` for a
    positional graph. Children from the logits back to the input (``graph.nodes`` reversed);
    a child's edges from its latest parent to its earliest; positions from last to first."""
    rank = {node: i for i, node in enumerate(graph.nodes)}
    edges = sorted(graph.edges.values(), key=lambda e: (-rank[e.child], -rank[e.parent]))
    if not graph.positional:
        return [(e.index,) for e in edges]
    return [(e.index, pos) for e in edges for pos in reversed(range(graph.n_pos))]


def acdc(model, graph: Graph, clean, corrupted=None, metric: Union[str, Callable] = "kl", threshold: float = 0.01,
         *, labels=None, batch_size: Optional[int] = None, attention_mask: Optional[Tensor] = None,
         quiet: Optional[bool] = None, progress: Optional[bool] = None) -> Graph:
    """Prune ``graph`` with ACDC (explained after the Args); returns the same graph.

    Args:
        model: a ``HookedMamba`` or ``HookedMamba2``.
        graph: from ``Graph.from_model``, any level, positional or not. ACDC starts from its
            ``in_graph`` (every edge, for a new graph) and only ever removes edges.
        clean, corrupted, labels, batch_size, attention_mask: the data, as for
            :func:`tl_mamba.circuits.attribute` (token tensors, or batches).
        metric: ``"kl"`` or a metric function (see the module docstring).
        threshold: how much the objective may move when an edge is removed, >= 0.

    Returns:
        ``graph``, with ``in_graph`` the edges ACDC kept and ``scores`` the change of the
        objective its trial measured for each tried cell (KL: the rise of the KL, larger =
        more important; a metric: metric without the edge minus metric with it; 0 for the
        cells it did not try, those already out of the given graph: earlier scores, EAP's
        say, are replaced), and
        ``metadata["acdc"]`` = ``{"threshold", "metric", "objective", "forwards", "skipped"}``
        (``objective``: the final circuit's). Edges into a node left with no path to the logits
        are removed without a trial, as in the paper (what such a node reads cannot change the
        output); ``skipped`` counts them, and their score stays 0. Holds every batch's
        corrupted activations at the senders' and internal edges' hooks for the whole search.
    """
    quiet = hide_progress(quiet, progress, False)
    if isinstance(threshold, Tensor) and threshold.numel() == 1:
        threshold = threshold.item()  # (a 0-d tensor, as numpy scalars below, is a number too)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not float(threshold) >= 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    threshold = float(threshold)
    kl = isinstance(metric, str)
    if kl and metric != "kl":
        raise ValueError(f"metric must be 'kl' or a function of the logits, got {metric!r}")
    if not kl and not callable(metric):
        raise TypeError(f"metric must be 'kl' or a function of the logits, got {type(metric).__name__}")
    batches = []
    for clean_tokens, corrupted_tokens, batch_labels, mask in iter_batches(clean, corrupted, labels, batch_size,
                                                                           attention_mask):
        wiring = _Wiring(model, graph, clean_tokens, mask)
        reference = None
        if kl and mask is not None and not bool(mask[:, -1].all()):
            raise ValueError("metric='kl' compares the next-token distributions at the last position, which is "
                             "padding in some rows of this batch: pad on the left (every prompt ending at the last "
                             "column), as the attribution functions expect")
        if kl:  # the clean model's next-token log-probabilities at the last position (left padding: every row's)
            with torch.no_grad():
                reference = upcast(model(clean_tokens, attention_mask=mask)[:, -1]).log_softmax(-1)
        batches.append((clean_tokens, batch_labels, mask, wiring,
                        _corrupted_activations(model, wiring, corrupted_tokens, mask), reference))
    if not batches:
        raise ValueError("acdc needs at least one prompt")
    n_prompts = sum(c.shape[0] for c, *_ in batches)
    forwards = 0

    def objective(removed: Tensor) -> float:
        """The mean over prompts of the KL, or of the metric, of the circuit without ``removed``."""
        nonlocal forwards
        total = 0.0
        for clean_tokens, batch_labels, mask, wiring, corrupted_acts, reference in batches:
            if bool(removed.any()):
                logits = _patched_logits(model, graph, wiring, clean_tokens, corrupted_acts,
                                         removed.to(clean_tokens.device), mask)
            else:
                with torch.no_grad():
                    logits = model(clean_tokens, attention_mask=mask)
            forwards += 1
            if kl:
                circuit = upcast(logits[:, -1]).log_softmax(-1)
                values = (reference.exp() * (reference - circuit)).sum(-1)
            else:
                values = _per_prompt(metric, logits, batch_labels, clean_tokens.shape[0])
            total += float(values.double().sum())
        return total / n_prompts

    removed = ~graph.in_graph.clone()
    current = objective(removed)
    scores = torch.zeros_like(graph.scores, dtype=torch.float64)
    cells = [cell for cell in acdc_order(graph) if not bool(removed[cell])]
    child_of = [e.child for e in graph.edges.values()]
    child, alive, skipped = None, True, 0
    for cell in tqdm(cells, desc="ACDC", disable=quiet, leave=False, unit="edge"):
        if child_of[cell[0]] != child:  # a new node: its edges out were all decided before it
            child = child_of[cell[0]]
            alive = child in graph.reaching_logits(~removed)
        if not alive:  # no path left from it to the logits: what it reads cannot change the output
            removed[cell] = True
            skipped += 1
            continue
        removed[cell] = True
        value = objective(removed)
        change = value - current
        scores[cell] = change
        if (change if kl else abs(change)) < threshold:
            current = value  # the edge stays out
        else:
            removed[cell] = False
    graph.in_graph = ~removed
    graph.scores = scores.to(_score_dtype(model))
    graph.metadata["acdc"] = {"threshold": float(threshold), "metric": "kl" if kl else getattr(
        metric, "__name__", type(metric).__name__), "objective": current, "forwards": forwards,
        "skipped": skipped}
    return graph


# The package exports this function under the module's own name, so ``tl_mamba.circuits.acdc``
# is the function and ``help()`` would never reach the module's explanation: it follows the
# function's own docstring.
if acdc.__doc__ and __doc__:  # None under python -OO
    acdc.__doc__ += "\n\n" + __doc__
