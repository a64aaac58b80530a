"""Circuit discovery on Mamba: edge attribution (EAP, EAP-IG), circuit evaluation,
knockout attribution, patching and ablation helpers.

    from tl_mamba.circuits import Graph, attribute, faithfulness, task_batches, logit_diff
    batches = task_batches(model, "ioi", n=64)               # (clean, corrupted, labels) batches
    graph = Graph.from_model(model, level="layer")          # or "head" (Mamba-2), "component"
    attribute(model, graph, batches, None, logit_diff, method="EAP-IG", ig_steps=5)
    acdc(model, Graph.from_model(model, "layer"), batches, threshold=0.02)   # exact, edge by edge
    graph.apply_topn(10)
    faithfulness(model, graph, batches, None, logit_diff)
    graph.to_json("circuit.json"); graph.to_image("circuit.png")

    scores = knockout_attribution(model, tokens, metric)    # [layer, (head,) p, p], one backward
    feats = feature_attribution(model, {hook: sae}, clean, corrupted, metric, method="EAP-IG")
    found = smallest_feature_circuit(model, {hook: sae}, feats, clean, corrupted, metric, target=0.8)
    patch_layer_position(model, clean, corrupted, metric, hook="h")
    hooks = class_conditional_ablation_hooks(model, tokens, {3: [0, 5]}, token_class="bos")
    top = top_activations(model, "blocks.1.hook_resid_pre", tokens, sae, features=[3, 9], k=10)
    probe = linear_probe(model, "blocks.2.hook_h", tokens, labels, positions=-1)   # .test_accuracy
"""

from tl_mamba.circuits.ablation import (
    KINDS,
    ablate,
    ablation_hooks,
    class_conditional_ablation_hooks,
    class_conditional_hook_factory,
    delta_stats_by_class,
    loss_by_class,
    mean_ablation_hooks,
    mean_activations,
    needle_accuracy,
    resample_ablation_hooks,
    token_class_mask,
    zero_ablation_hooks,
)
from tl_mamba.circuits.acdc import acdc
from tl_mamba.circuits.data import logit_diff, task_batches
from tl_mamba.circuits.eap import (
    METHODS,
    attribute,
    evaluate_baseline,
    evaluate_graph,
    faithfulness,
    iter_batches,
    patched_logits,
    path_patch,
)
from tl_mamba.circuits.feature_attribution import FeatureScores, feature_attribution
from tl_mamba.circuits.feature_circuit import (
    FeatureCircuit,
    evaluate_features,
    feature_faithfulness,
    smallest_feature_circuit,
)
from tl_mamba.circuits.graph import LEVELS, Edge, Graph
from tl_mamba.circuits.knockout_attribution import (
    AttributionCheck,
    knockout_attribution,
    knockout_attribution_vs_knockout,
    plot_knockout_attribution,
    rank_correlation,
)
from tl_mamba.circuits.patching import patch_channel_groups, patch_heads, patch_layer_position
from tl_mamba.circuits.linear_probes import LinearProbe, fit_probe, linear_probe, probe_activations
from tl_mamba.circuits.probes import similarity_by_class
from tl_mamba.circuits.activation_examples import TopActivations, top_activations

__all__ = [
    "AttributionCheck",
    "Edge",
    "FeatureCircuit",
    "FeatureScores",
    "TopActivations",
    "Graph",
    "KINDS",
    "LEVELS",
    "LinearProbe",
    "METHODS",
    "ablate",
    "acdc",
    "ablation_hooks",
    "attribute",
    "class_conditional_ablation_hooks",
    "class_conditional_hook_factory",
    "delta_stats_by_class",
    "evaluate_baseline",
    "evaluate_features",
    "evaluate_graph",
    "faithfulness",
    "fit_probe",
    "feature_attribution",
    "feature_faithfulness",
    "iter_batches",
    "knockout_attribution",
    "knockout_attribution_vs_knockout",
    "linear_probe",
    "logit_diff",
    "loss_by_class",
    "mean_ablation_hooks",
    "mean_activations",
    "needle_accuracy",
    "patch_channel_groups",
    "patch_heads",
    "patch_layer_position",
    "patched_logits",
    "path_patch",
    "plot_knockout_attribution",
    "probe_activations",
    "rank_correlation",
    "resample_ablation_hooks",
    "similarity_by_class",
    "smallest_feature_circuit",
    "task_batches",
    "token_class_mask",
    "top_activations",
    "zero_ablation_hooks",
]
