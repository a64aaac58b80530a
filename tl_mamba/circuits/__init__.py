"""Circuit discovery on Mamba: edge attribution (EAP, EAP-IG), circuit evaluation,
knockout attribution, patching and ablation helpers.

    from tl_mamba.circuits import Graph, attribute, evaluate_graph, evaluate_baseline
    graph = Graph.from_model(model, level="layer")          # or "head" (Mamba-2), "component"
    attribute(model, graph, clean, corrupted, metric, method="EAP-IG", ig_steps=5)
    graph.apply_topn(10)
    faithfulness(model, graph, clean, corrupted, metric)
    graph.to_json("circuit.json"); graph.to_image("circuit.png")
"""

from tl_mamba.circuits.eap import (
    METHODS,
    attribute,
    evaluate_baseline,
    evaluate_graph,
    faithfulness,
    iter_batches,
    patched_logits,
)
from tl_mamba.circuits.graph import LEVELS, Edge, Graph

__all__ = [
    "Edge",
    "Graph",
    "LEVELS",
    "METHODS",
    "attribute",
    "evaluate_baseline",
    "evaluate_graph",
    "faithfulness",
    "iter_batches",
    "patched_logits",
]
