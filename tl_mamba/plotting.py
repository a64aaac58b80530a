"""PNG plots shared by the command line, the experiments and the circuit tools (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch


def new_figure(figsize):
    """``(figure, axes)`` of a figure of its own, drawn off-screen: made without pyplot, so no
    backend is chosen (a notebook's stays as it is) and nothing is left open in pyplot's list."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    return figure, figure.subplots()


def layer_position_heatmap(values: torch.Tensor, path, title: str, xlabels: Optional[Sequence[str]] = None,
                           xlabel: str = "position", ylabel: str = "layer") -> Path:
    """A ``[layers, positions]`` heatmap, diverging colours centred on 0, written as a PNG."""
    fig, ax = new_figure((2 + 0.5 * values.shape[1], 1.5 + 0.45 * values.shape[0]))
    bound = float(values.abs().max()) or 1.0
    image = ax.imshow(values.detach().float().cpu().numpy(), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)))
        ax.set_xticklabels(xlabels, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(values.shape[0]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
