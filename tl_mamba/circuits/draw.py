"""Drawing a circuit graph as a PNG with matplotlib (no graphviz needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple


def _layout(graph) -> Dict[str, Tuple[float, float]]:
    """Node positions: input at the bottom, one row per layer (components, heads or channel
    groups spread across it), logits on top."""
    pos: Dict[str, Tuple[float, float]] = {"input": (0.5, 0.0), "logits": (0.5, graph.n_layers + 1.0)}
    for layer in range(graph.n_layers):
        y = layer + 1.0
        if graph.level == "layer":
            pos[f"m{layer}"] = (0.5, y)
        elif graph.level == "head":
            pos[f"m{layer}"] = (0.5, y - 0.3)
            units = graph.unit_nodes(layer)
            for j, name in enumerate(units):
                pos[name] = ((j + 0.5) / len(units), y + 0.1)
        else:
            pos[f"m{layer}.in"] = (0.5, y - 0.35)
            pos[f"m{layer}.conv"] = (0.3, y - 0.1)
            pos[f"m{layer}.ssm"] = (0.3, y + 0.15)
            pos[f"m{layer}.gate"] = (0.7, y + 0.0)
            pos[f"m{layer}.out"] = (0.5, y + 0.35)
    return pos


def draw_graph(graph, path: Path, title: Optional[str] = None, max_edges: int = 200) -> Path:
    """Draw ``graph``'s in-graph edges (at most ``max_edges``, the highest |score| first) to ``path``."""
    from tl_mamba.plotting import new_figure

    pos = _layout(graph)
    flags = graph.in_graph.any(-1) if graph.positional else graph.in_graph
    totals = graph.scores.sum(-1) if graph.positional else graph.scores
    edges = [(e, float(totals[e.index])) for e in graph.edges.values() if bool(flags[e.index])]
    edges.sort(key=lambda item: -abs(item[1]))
    edges = edges[:max_edges]
    biggest = max((abs(s) for _, s in edges), default=1.0) or 1.0
    used = {"input", "logits"} | {n for e, _ in edges for n in (e.parent, e.child)}

    width = 6 if graph.level != "head" else max(6, graph.units_per_layer * 0.8)
    fig, ax = new_figure((width, 1.6 * (graph.n_layers + 2)))
    for e, score in edges:
        (x0, y0), (x1, y1) = pos[e.parent], pos[e.child]
        bend = 0.15 * (y1 - y0) if e.kind == "resid" and abs(x1 - x0) < 1e-6 else 0.0
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0),
                    arrowprops=dict(arrowstyle="->", lw=0.5 + 4.5 * abs(score) / biggest,
                                    color="tab:blue" if score >= 0 else "tab:red", alpha=0.75,
                                    connectionstyle=f"arc3,rad={bend}"))
    units = {name for layer in range(graph.n_layers) for name in graph.unit_nodes(layer)} \
        if graph.level == "head" else set()
    # a head-level layer's input feeds each of its heads (channel groups): not a scored edge, but
    # without a line the heads in the circuit float apart from their layer (thin, grey, dashed)
    for parent, child in graph._implicit_edges():
        if child in used:
            (x0, y0), (x1, y1) = pos[parent], pos[child]
            ax.plot([x0, x1], [y0, y1], color="grey", lw=0.6, ls="--", alpha=0.6, zorder=1)
            used.add(parent)
    for name, (x, y) in pos.items():
        if name not in used and name in units:
            continue  # unused heads (channel groups) would clutter wide layers
        face = "white" if name not in used else "#f3e3b5"
        ax.scatter([x], [y], s=260, color=face, edgecolors="black", zorder=3)
        # a label wider than its circle ("logits", "m3.h0") sits on a box of the node's colour, so
        # the circle's outline does not cut its first and last letters
        ax.text(x, y, name, ha="center", va="center", fontsize=6, zorder=4,
                bbox=dict(boxstyle="round,pad=0.15", facecolor=face, edgecolor="none"))
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.6, graph.n_layers + 1.6)
    ax.axis("off")
    n = graph.count_included_edges()
    ax.set_title(title or f"{graph.family} {graph.level}-level circuit: {n} edges "
                          f"(width = |score|; blue +, red -)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    return path
