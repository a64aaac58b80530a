"""PNG plots shared by the command line and the experiments (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch


def layer_position_heatmap(values: torch.Tensor, path, title: str, xlabels: Optional[Sequence[str]] = None,
                           xlabel: str = "position", ylabel: str = "layer") -> Path:
    """A ``[layers, positions]`` heatmap, diverging colours centred on 0, written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2 + 0.5 * values.shape[1], 1.5 + 0.45 * values.shape[0]))
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
    plt.close(fig)
    return path
