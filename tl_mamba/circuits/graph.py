"""The computational graph of a Mamba model, for edge attribution and circuit evaluation.

Shaped like the EAP-IG library's ``Graph`` (``from_model``, ``apply_topn``,
``apply_threshold``, ``prune``, ``to_json``), but built from Mamba's own
structure. A Mamba block adds its mixer's output to the residual stream, so every
node that *writes* the residual stream (a sender: the embedding, a mixer, a
Mamba-2 head, a group of Mamba-1 channels) has an edge to every later node that
*reads* it (a receiver: a mixer's input ``hook_mixer_in``, or the logits, read
from the last ``hook_resid_post``). Patching edge ``s -> r`` means that receiver ``r`` sees
sender ``s``'s corrupted output in place of its clean one, while everything else
``r`` reads stays as it is.

Levels (``Graph.from_model(model, level=...)``):

- ``"layer"``: nodes ``input``, ``m0 .. m{L-1}`` (each mixer, read at
  ``hook_mixer_in`` and written at ``hook_mixer_out``), ``logits``.
- ``"head"`` (Mamba-2): each head ``m{l}.h{j}`` is its own sender. Its write to the
  residual stream is ``out_proj`` restricted to that head's channels of
  ``hook_y_normed`` — the head's output ``hook_y``, gated and normed — so the heads'
  writes sum exactly to ``hook_mixer_out`` (less the out_proj bias, which no
  patch changes). The gated RMSNorm's divisor is shared by the heads: a head's
  write is taken with the divisor of the run it comes from, as TransformerLens
  treats LayerNorm scales in its decompositions. All heads of a layer read the
  same normalised residual through one ``in_proj``, so the receiver is the layer
  (``m{l}``), not the head.
- ``"head"`` with ``channel_groups=G`` (Mamba-1, which has no heads): the ``d_inner``
  channels are split into ``G`` contiguous, equal groups (``G`` must divide
  ``d_inner``), and each group ``m{l}.c{j}`` is its own sender. Its write is
  ``out_proj.weight[:, group] @ y_gated[..., group]``, read at ``hook_y_gated``
  (out_proj's input; no norm comes between), so the groups' writes sum exactly to
  ``hook_mixer_out`` less the out_proj bias. The receiver is again the layer.
- ``"component"``: the residual edges of ``"layer"`` (nodes ``m{l}.in`` and
  ``m{l}.out``) plus the paths inside each mixer, each patched at one hook:
  ``m{l}.in -> m{l}.conv`` (``hook_conv_in``), ``m{l}.conv -> m{l}.ssm``
  (``hook_conv``: the conv output, which feeds x and, after it, Δ, B and C for
  Mamba-1, and x, B, C for Mamba-2), ``m{l}.in -> m{l}.ssm`` (Mamba-2 only:
  ``hook_delta_raw``, Δ comes straight from in_proj), ``m{l}.ssm -> m{l}.out``
  (``hook_y``, the SSM output including D·x), ``m{l}.in -> m{l}.gate``
  (``hook_z``) and ``m{l}.gate -> m{l}.out`` (``hook_gate``).

``positional=True`` gives every edge one score and one in-graph flag per position
(``n_pos`` positions; all prompts must then have that length).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

LEVELS = ("layer", "head", "component")


@dataclass(frozen=True)
class SenderGroup:
    """Senders whose outputs come from one hook.

    ``units`` senders share ``hook`` (1 for the embedding or a whole mixer). With
    ``per_head``, the hook is out_proj's input ``[b, p, e]`` and its last axis splits
    into ``units`` equal contiguous slices, each mapped to the residual stream by its
    columns of that layer's ``out_proj`` weight: ``n_heads`` heads of a Mamba-2 layer
    (``hook_y_normed``) or ``channel_groups`` channel groups of a Mamba-1 layer
    (``hook_y_gated``).
    """

    hook: str
    units: int
    layer: Optional[int]  # None for the embedding
    per_head: bool = False


@dataclass(frozen=True)
class Edge:
    """One edge. ``kind`` is ``"resid"`` (sender -> receiver through the residual stream)
    or ``"internal"`` (a path inside a mixer, patched at ``hook``)."""

    index: int
    name: str
    parent: str
    child: str
    kind: str
    hook: str  # receiver hook (resid) or the patched hook (internal)
    group: int = -1  # resid: sender group index
    unit: int = 0  # resid: sender index within its group
    receiver: int = -1  # resid: receiver index


class Graph:
    """Nodes and edges of a Mamba model, with one score and one in-graph flag per edge.

    ``graph.scores`` is ``[n_edges]`` (``[n_edges, n_pos]`` when positional), float32
    (float64 once a float64 model scored it);
    ``graph.in_graph`` is a bool tensor of the same shape. ``graph.edges`` maps edge
    names (``"m0->m2"``, ``"m1.h3->logits"``, ``"m1.c3->m2"``, ``"m2.conv->m2.ssm"``) to :class:`Edge`.

    ``channel_groups`` and ``d_inner`` describe a Mamba-1 head-level graph (both None otherwise).
    """

    def __init__(self, *, family: str, n_layers: int, n_heads: int, level: str,
                 positional: bool = False, n_pos: Optional[int] = None,
                 channel_groups: Optional[int] = None, d_inner: Optional[int] = None):
        if level not in LEVELS:
            raise ValueError(f"unknown graph level {level!r}: choose from {LEVELS}")
        _check_channel_groups(family, level, channel_groups, d_inner)
        if positional and (n_pos is None or int(n_pos) < 1):
            raise ValueError("a positional graph needs n_pos (the prompt length, in tokens)")
        self.family, self.n_layers, self.n_heads, self.level = family, int(n_layers), int(n_heads), level
        self.positional, self.n_pos = bool(positional), (int(n_pos) if positional else None)
        self.channel_groups = None if channel_groups is None else int(channel_groups)
        self.d_inner = None if channel_groups is None else int(d_inner)
        self.groups: List[SenderGroup] = []
        self.receivers: List[Tuple[str, str]] = []  # (node name, hook)
        self.edges: Dict[str, Edge] = {}
        self.nodes: List[str] = []
        self._build()
        shape = (len(self.edges), self.n_pos) if self.positional else (len(self.edges),)
        self.scores = torch.zeros(shape, dtype=torch.float32)
        self.in_graph = torch.ones(shape, dtype=torch.bool)
        # how the scores were made (model, task, method, seed, ...): free-form, JSON-serialisable,
        # written by to_json and read back by from_json, so a saved circuit says where it came from
        self.metadata: Dict[str, Any] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model, level: str = "layer", positional: bool = False,
                   n_pos: Optional[int] = None, channel_groups: Optional[int] = None) -> "Graph":
        """The graph of ``model`` (a ``HookedMamba`` or ``HookedMamba2``) at ``level``.

        Args:
            level: ``"layer"``, ``"head"`` or ``"component"`` (see the module docstring).
            positional: one score per edge and position; then ``n_pos`` (the prompt length) is required.
            channel_groups: Mamba-1 with ``level="head"`` only (required there): split each
                layer's ``d_inner`` channels into this many contiguous, equal groups, each a
                sender ``m{l}.c{j}``.
        """
        return cls(family=graph_family(model), n_layers=model.cfg.n_layers, n_heads=model.cfg.n_heads, level=level,
                   positional=positional, n_pos=n_pos, channel_groups=channel_groups,
                   d_inner=model.cfg.d_inner if channel_groups is not None else None)

    @property
    def units_per_layer(self) -> int:
        """Senders per layer at ``level="head"``: heads (Mamba-2) or channel groups (Mamba-1)."""
        return self.channel_groups if self.channel_groups is not None else self.n_heads

    def unit_nodes(self, layer: int) -> List[str]:
        """The sender nodes of one layer of a head-level graph (``m{l}.h{j}`` or ``m{l}.c{j}``)."""
        kind = "c" if self.channel_groups is not None else "h"
        return [f"m{layer}.{kind}{j}" for j in range(self.units_per_layer)]

    def _sender_name(self, group: SenderGroup, unit: int) -> str:
        if group.layer is None:
            return "input"
        if group.per_head:
            return self.unit_nodes(group.layer)[unit]
        return f"m{group.layer}.out" if self.level == "component" else f"m{group.layer}"

    def _receiver_node(self, layer: int) -> str:
        return f"m{layer}.in" if self.level == "component" else f"m{layer}"

    def _add_edge(self, parent: str, child: str, kind: str, hook: str, **where) -> None:
        name = f"{parent}->{child}"
        self.edges[name] = Edge(len(self.edges), name, parent, child, kind, hook, **where)

    def _build(self) -> None:
        L = self.n_layers
        self.groups.append(SenderGroup("hook_embed", 1, None))
        for layer in range(L):
            if self.level == "head":
                hook = "hook_y_gated" if self.channel_groups is not None else "hook_y_normed"
                self.groups.append(SenderGroup(f"blocks.{layer}.{hook}", self.units_per_layer, layer, per_head=True))
            else:
                self.groups.append(SenderGroup(f"blocks.{layer}.hook_mixer_out", 1, layer))
        self.receivers = [(self._receiver_node(layer), f"blocks.{layer}.hook_mixer_in") for layer in range(L)]
        self.receivers.append(("logits", f"blocks.{L - 1}.hook_resid_post"))

        self.nodes = ["input"]
        for layer in range(L):
            if self.level == "component":
                self.nodes += [f"m{layer}.{part}" for part in ("in", "conv", "ssm", "gate", "out")]
            elif self.level == "head":
                self.nodes += [f"m{layer}"] + self.unit_nodes(layer)
            else:
                self.nodes.append(f"m{layer}")
        self.nodes.append("logits")

        for r, (receiver, hook) in enumerate(self.receivers):
            reads_up_to = r  # receiver r (layer r, or logits = L) reads senders of layers < r
            for g, group in enumerate(self.groups):
                if group.layer is not None and group.layer >= reads_up_to:
                    continue
                for unit in range(group.units):
                    self._add_edge(self._sender_name(group, unit), receiver, "resid", hook,
                                   group=g, unit=unit, receiver=r)
            if self.level == "component" and r < L:
                self._add_internal_edges(r)

    def _add_internal_edges(self, layer: int) -> None:
        m, hook = f"m{layer}", f"blocks.{layer}.hook_"
        self._add_edge(f"{m}.in", f"{m}.conv", "internal", hook + "conv_in")
        self._add_edge(f"{m}.conv", f"{m}.ssm", "internal", hook + "conv")
        if self.family == "mamba2":
            self._add_edge(f"{m}.in", f"{m}.ssm", "internal", hook + "delta_raw")
        self._add_edge(f"{m}.ssm", f"{m}.out", "internal", hook + "y")
        self._add_edge(f"{m}.in", f"{m}.gate", "internal", hook + "z")
        self._add_edge(f"{m}.gate", f"{m}.out", "internal", hook + "gate")

    # ------------------------------------------------------------------ queries
    def __repr__(self) -> str:
        pos = f", positional over {self.n_pos} positions" if self.positional else ""
        groups = "" if self.channel_groups is None else \
            f", {self.channel_groups} channel groups of {self.d_inner // self.channel_groups} channels"
        return (f"Graph({self.family}, level={self.level!r}{groups}, {len(self.nodes)} nodes, {len(self.edges)} edges, "
                f"{self.count_included_edges()} in graph{pos})")

    def edge(self, name: str) -> Edge:
        """The edge called ``name`` (``"parent->child"``); a KeyError lists close names."""
        try:
            return self.edges[name]
        except KeyError:
            parent = name.split("->")[0]
            close = [e for e in self.edges if e.startswith(parent + "->")][:8]
            raise KeyError(f"no edge {name!r} in this {self.level}-level graph; edges from {parent!r}: {close}") from None

    def score(self, name: str) -> Tensor:
        """Score of one edge (a scalar, or ``[n_pos]`` when positional)."""
        return self.scores[self.edge(name).index]

    def count_included_edges(self) -> int:
        """Edges in the graph (for a positional graph: (edge, position) pairs)."""
        return int(self.in_graph.sum())

    def included_edges(self) -> List[str]:
        """Names of the edges in the graph (at any position, when positional)."""
        flags = self.in_graph.any(-1) if self.positional else self.in_graph
        return [name for name, e in self.edges.items() if bool(flags[e.index])]

    def top_edges(self, k: int = 10, absolute: bool = True, only_in_graph: bool = False,
                  per_position: bool = False) -> List[tuple]:
        """The ``k`` highest-scoring edges as ``(name, score)`` (positional scores summed over positions).

        ``per_position`` (positional graphs): the ``k`` highest-scoring (edge, position) pairs
        instead, as ``(name, position, score)``, as positional EAP reports them.
        ``k = 0`` gives an empty list; a negative ``k`` is a ``ValueError``.
        """
        if k < 0:  # a negative slice would return all edges but the last |k|
            raise ValueError(f"k must be >= 0 (the number of edges to return), got {k}")
        if per_position:
            if not self.positional:
                raise ValueError("per_position=True needs a positional graph (Graph.from_model(..., positional=True))")
            key = (self.scores.abs() if absolute else self.scores).flatten()
            if only_in_graph:
                key = key.masked_fill(~self.in_graph.flatten(), float("-inf"))
            order = torch.argsort(key, descending=True)[:k].tolist()
            names = list(self.edges)
            return [(names[i // self.n_pos], i % self.n_pos, float(self.scores.flatten()[i])) for i in order
                    if key[i] != float("-inf")]
        total = self.scores.sum(-1) if self.positional else self.scores
        key = total.abs() if absolute else total
        order = torch.argsort(key, descending=True).tolist()
        names = list(self.edges)
        flags = self.in_graph.any(-1) if self.positional else self.in_graph
        out = [(names[i], float(total[i])) for i in order if not only_in_graph or bool(flags[i])]
        return out[:k]

    # ------------------------------------------------------------------ selection
    def reset(self, empty: bool = True) -> "Graph":
        """Remove every edge (``empty=True``) or put every edge back."""
        self.in_graph.fill_(not empty)
        return self

    def apply_topn(self, n: int, absolute: bool = True, prune: bool = True) -> "Graph":
        """Keep the ``n`` highest-scoring edges ((edge, position) pairs when positional), then,
        with ``prune`` (default), drop those on no ``input`` → ``logits`` path: fewer than ``n``
        may remain (``count_included_edges()``; for small ``n`` possibly none)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        key = self.scores.abs() if absolute else self.scores
        flat = key.flatten()
        keep = torch.zeros_like(flat, dtype=torch.bool)
        if n > 0:
            keep[torch.topk(flat, min(n, flat.numel())).indices] = True
        self.in_graph = keep.view_as(self.in_graph)
        return self._prune_chosen() if prune else self

    def apply_threshold(self, threshold: float, absolute: bool = True, prune: bool = True) -> "Graph":
        """Keep the edges whose score (its absolute value by default) is at least ``threshold``
        (then pruned as in :meth:`apply_topn`)."""
        key = self.scores.abs() if absolute else self.scores
        self.in_graph = key >= threshold
        return self._prune_chosen() if prune else self

    def _prune_chosen(self) -> "Graph":
        """:meth:`prune`, warning when it drops every chosen edge (an empty circuit scores as the
        corrupted run: faithfulness ~0, which reads like a finding rather than a pruned-away choice)."""
        chosen = int(self.in_graph.sum())
        self.prune()
        if chosen and not bool(self.in_graph.any()):
            warnings.warn(f"pruning removed all {chosen} chosen edges: none lies on an input -> logits path "
                          "through the others. Choose more edges, or pass prune=False to keep them.", stacklevel=3)
        return self

    def _implicit_edges(self) -> List[Tuple[str, str]]:
        """Always-present links that are not scored: a layer's input feeds its heads (channel groups)."""
        if self.level != "head":
            return []
        return [(f"m{l}", unit) for l in range(self.n_layers) for unit in self.unit_nodes(l)]

    def _live_links(self, in_graph: Optional[Tensor] = None) -> List[Tuple[str, str]]:
        """``(parent, child)`` of the edges in ``in_graph`` (default ``self.in_graph``; at any position
        when positional), with the implicit links."""
        flags = self.in_graph if in_graph is None else in_graph
        flags = flags.any(-1) if self.positional else flags
        return [(e.parent, e.child) for e in self.edges.values() if bool(flags[e.index])] + self._implicit_edges()

    def reaching_logits(self, in_graph: Optional[Tensor] = None) -> set:
        """The nodes with a path to ``logits`` through the edges of ``in_graph`` (default
        ``self.in_graph``) and the implicit links (a layer's input feeds its heads)."""
        return _reachable("logits", [(c, p) for p, c in self._live_links(in_graph)])

    def prune(self) -> "Graph":
        """Drop edges that are not on a path from ``input`` to ``logits`` through edges in the graph.

        For a positional graph a node counts as reached if any of its edges is in the
        graph at any position (patching acts position by position, but information
        moves across positions inside a mixer).
        """
        links = self._live_links()
        forward = _reachable("input", links)
        backward = _reachable("logits", [(c, p) for p, c in links])
        for e in self.edges.values():
            if not (e.parent in forward and e.child in backward):
                self.in_graph[e.index] = False
        return self

    # ------------------------------------------------------------------ export
    def to_dict(self) -> dict:
        def value(t: Tensor):
            return t.tolist()

        return {
            "format": "tl_mamba.circuits.Graph/1",
            "family": self.family, "n_layers": self.n_layers, "n_heads": self.n_heads, "level": self.level,
            "positional": self.positional, "n_pos": self.n_pos,
            "channel_groups": self.channel_groups, "d_inner": self.d_inner,
            "scores_dtype": str(self.scores.dtype).removeprefix("torch."),  # a float64 model's scores stay float64
            "metadata": self.metadata,
            "nodes": self.nodes,
            "edges": {name: {"score": value(self.scores[e.index]), "in_graph": value(self.in_graph[e.index])}
                      for name, e in self.edges.items()},
        }

    def to_json(self, path: Union[str, Path]) -> Path:
        """Write the graph (structure, scores, in-graph flags, :attr:`metadata`) as JSON; read it
        back with :meth:`from_json`. ``TypeError`` names a metadata entry JSON cannot hold."""
        path = Path(path)
        for key, value in self.metadata.items():
            try:
                json.dumps(value)
            except (TypeError, ValueError) as err:
                raise TypeError(f"Graph.metadata[{key!r}] cannot be written as JSON ({err}); "
                                "store plain numbers, strings, lists or dicts") from None
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def from_json(cls, path: Union[str, Path]) -> "Graph":
        data = json.loads(Path(path).read_text())
        if data.get("format") != "tl_mamba.circuits.Graph/1":
            raise ValueError(f"{path} is not a tl_mamba circuit graph (format {data.get('format')!r})")
        graph = cls(family=data["family"], n_layers=data["n_layers"], n_heads=data["n_heads"], level=data["level"],
                    positional=data["positional"], n_pos=data["n_pos"],
                    channel_groups=data.get("channel_groups"), d_inner=data.get("d_inner"))
        scores_dtype = {"float32": torch.float32, "float64": torch.float64}.get(data.get("scores_dtype", "float32"))
        if scores_dtype is None:
            raise ValueError(f"{path}: scores_dtype must be float32 or float64, got {data['scores_dtype']!r}")
        graph.scores = graph.scores.to(scores_dtype)
        graph.metadata = dict(data.get("metadata") or {})  # (files written before metadata existed have none)
        missing = set(graph.edges) ^ set(data["edges"])
        if missing:
            raise ValueError(f"{path}: edges do not match a {data['level']}-level graph: {sorted(missing)[:5]}")
        for name, e in graph.edges.items():
            graph.scores[e.index] = torch.tensor(data["edges"][name]["score"], dtype=scores_dtype)
            graph.in_graph[e.index] = torch.tensor(data["edges"][name]["in_graph"], dtype=torch.bool)
        return graph

    def to_image(self, path: Union[str, Path], title: Optional[str] = None, max_edges: int = 200) -> Path:
        """Draw the edges in the graph as a PNG: nodes by layer (input at the bottom,
        logits on top), edge width by |score|, blue for positive and red for negative scores."""
        from tl_mamba.circuits.draw import draw_graph

        return draw_graph(self, Path(path), title=title, max_edges=max_edges)


def graph_family(model) -> str:
    """How a graph names ``model``'s family: ``"mamba2"``, or ``"mamba"`` for Mamba-1 (saved graphs
    carry it, so it stays as first written although ``cfg.family`` says ``"mamba1"``)."""
    return "mamba2" if model.cfg.family == "mamba2" else "mamba"


def _check_channel_groups(family: str, level: str, channel_groups, d_inner) -> None:
    """``ValueError`` unless ``channel_groups`` fits: given exactly for a Mamba-1 head-level
    graph, an int >= 1 that divides ``d_inner``."""
    if channel_groups is None:
        if level == "head" and family != "mamba2":
            raise ValueError("level='head' on Mamba-1 needs channel_groups=G: Mamba-1 has no heads (Mamba-2 has), "
                             "so pass channel_groups=G to make each of G contiguous groups of the d_inner channels "
                             "a sender, or use level='layer' or 'component'")
        return
    if family == "mamba2":
        raise ValueError("channel_groups applies to Mamba-1 only: a Mamba-2 graph at level='head' has one sender "
                         "per head already")
    if level != "head":
        raise ValueError(f"channel_groups goes with level='head' (channel-group senders), not level={level!r}")
    if d_inner is None:
        raise ValueError("a channel-group graph needs d_inner (the model's cfg.d_inner)")
    check_channel_group_count(channel_groups, d_inner)


def check_channel_group_count(channel_groups, d_inner: int) -> None:
    """``ValueError`` unless ``channel_groups`` is an int >= 1 that divides ``d_inner`` into equal
    groups (the message names the divisors of ``d_inner`` nearest to it). Shared by the graph,
    patching and Δ statistics, so that a Mamba-1 "head" is the same group of channels in each."""
    if isinstance(channel_groups, bool) or not isinstance(channel_groups, int) or channel_groups < 1:
        raise ValueError(f"channel_groups must be an int >= 1, got {channel_groups!r}")
    if d_inner % channel_groups:
        divisors = [k for k in range(1, d_inner + 1) if d_inner % k == 0]
        near = [max(k for k in divisors if k < channel_groups)] + [k for k in divisors if k > channel_groups][:1]
        raise ValueError(f"channel_groups={channel_groups} does not divide d_inner={d_inner} into equal groups; "
                         f"divisors of {d_inner} near it: {near}")


def _reachable(start: str, links: Sequence[Tuple[str, str]]) -> set:
    out: Dict[str, List[str]] = {}
    for a, b in links:
        out.setdefault(a, []).append(b)
    seen, stack = {start}, [start]
    while stack:
        for nxt in out.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen
