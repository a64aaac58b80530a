"""tl_mamba.circuits: the graph, EAP / EAP-IG edge scores, exact edge patching, faithfulness.

References are independent of the code under test: hand-written hooks that patch one
edge (a residual-stream difference added at a receiver, or one head's or one Mamba-1
channel group's slice of out_proj), the fundamental theorem of calculus for EAP-IG, and exact patching.
"""

from __future__ import annotations

from collections import defaultdict

import warnings

import pytest
import torch

import tl_mamba
from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig
from tl_mamba.circuits import Graph, attribute, evaluate_baseline, evaluate_graph, faithfulness, patched_logits

from conftest import RowCounter

B, P = 6, 8


def tiny(family: str, seed: int = 0, n_layers: int = 3):
    if family == "mamba1":
        cfg = HookedMambaConfig(n_layers=n_layers, d_model=16, d_vocab=40, d_state=4, d_conv=4, expand=2, seed=seed)
        model = HookedMamba(cfg)
    else:
        cfg = HookedMambaConfig(family="mamba2", n_layers=n_layers, d_model=16, d_vocab=40, d_state=4, d_conv=4,
                                expand=2, n_heads=4, n_groups=2, chunk_size=4, seed=seed)
        model = HookedMamba2(cfg)
    gen = torch.Generator().manual_seed(1000 + seed)  # not the global stream: the same model whatever ran before
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.2)
    return model.double()


def pair(seed=0, change=(2, 5)):
    """Clean tokens and a corrupted copy that differs at a few positions."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 40, (B, P), generator=g)
    corrupted = clean.clone()
    for pos in change:
        corrupted[:, pos] = torch.randint(0, 40, (B,), generator=g)
    return clean, corrupted


def small_corruption(model, eps=1e-4):
    """Clean tokens, and a corrupted copy whose token at position 4 has an embedding
    ``eps`` away from the clean one (the model's embedding row 39 is rewritten)."""
    clean, _ = pair()
    clean[:, 4] = 5
    corrupted = clean.clone()
    corrupted[:, 4] = 39
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        model.embed.W_E[39] = model.embed.W_E[5] + eps * torch.randn(model.cfg.d_model, generator=gen).double()
    return clean, corrupted


def last_logit_metric(target=7):
    return lambda logits: logits[:, -1, target] - logits[:, -1].mean(-1)


def pearson(a, b):
    return float(torch.corrcoef(torch.stack([a.flatten().double(), b.flatten().double()]))[0, 1])


FAMILIES = ["mamba1", "mamba2"]
GROUPS = 4  # Mamba-1 channel groups of the tiny model's d_inner = 32: 8 channels each


def make_graph(model, level, **kw):
    """``Graph.from_model``; a Mamba-1 head-level graph gets ``GROUPS`` channel groups."""
    if level == "head" and isinstance(model, HookedMamba) and not isinstance(model, HookedMamba2):
        kw.setdefault("channel_groups", GROUPS)
    return Graph.from_model(model, level, **kw)


# ------------------------------------------------------------------ structure
@pytest.mark.parametrize("family", FAMILIES)
def test_graph_structure(family):
    model = tiny(family)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    layer = Graph.from_model(model, "layer")
    assert len(layer.edges) == (L + 1) * (L + 2) // 2  # receiver r reads the embedding and r mixers
    assert {"input->m0", "m0->m2", "m2->logits", "input->logits"} <= set(layer.edges)
    assert "m2->m1" not in layer.edges and "m1->m1" not in layer.edges
    comp = Graph.from_model(model, "component")
    per_layer = 6 if family == "mamba2" else 5
    assert len(comp.edges) == len(layer.edges) + per_layer * L
    assert comp.edge("m1.conv->m1.ssm").hook == "blocks.1.hook_conv"
    if family == "mamba2":
        head = Graph.from_model(model, "head")
        assert len(head.edges) == sum(1 + r * H for r in range(L + 1))
        assert head.edge("m1.h3->m2").hook == "blocks.2.hook_mixer_in"
    else:
        G = GROUPS
        head = Graph.from_model(model, "head", channel_groups=G)
        assert len(head.edges) == sum(1 + r * G for r in range(L + 1))
        assert head.edge("m1.c3->m2").hook == "blocks.2.hook_mixer_in"
        assert head.groups[2].hook == "blocks.1.hook_y_gated" and head.groups[2].units == G
        assert [n for n in head.nodes if n.startswith("m1")] == ["m1"] + [f"m1.c{j}" for j in range(G)]
        assert "4 channel groups of 8 channels" in repr(head)
        with pytest.raises(ValueError, match="channel_groups"):
            Graph.from_model(model, "head")  # Mamba-1 has no heads
        with pytest.raises(ValueError, match=r"d_inner=32.*\[4, 8\]"):
            Graph.from_model(model, "head", channel_groups=5)
        for bad in (0, -2, 2.0, True):
            with pytest.raises(ValueError, match="channel_groups"):
                Graph.from_model(model, "head", channel_groups=bad)
        for level in ("layer", "component"):
            with pytest.raises(ValueError, match="level='head'"):
                Graph.from_model(model, level, channel_groups=G)
    if family == "mamba2":
        with pytest.raises(ValueError, match="Mamba-1 only"):
            Graph.from_model(model, "head", channel_groups=4)
    with pytest.raises(ValueError, match="n_pos"):
        Graph.from_model(model, "layer", positional=True)
    with pytest.raises(ValueError, match="level"):
        Graph.from_model(model, "neuron")
    with pytest.raises(KeyError, match="m0->"):
        layer.edge("m0->m9")


@pytest.mark.parametrize("family,unit", [("mamba2", "h"), ("mamba1", "c")])
def test_topn_threshold_prune_and_json(tmp_path, family, unit):
    graph = make_graph(tiny(family), "head")
    torch.manual_seed(0)
    graph.scores = torch.randn(len(graph.edges))
    graph.apply_topn(10, prune=False)
    assert graph.count_included_edges() == 10
    chosen = set(graph.included_edges())
    top = {name for name, _ in graph.top_edges(10)}
    assert chosen == top
    graph.apply_threshold(1.0, prune=False)
    assert graph.count_included_edges() == int((graph.scores.abs() >= 1.0).sum())

    # pruning: an edge into a node that nothing carries on from is dropped
    graph.reset(empty=True)
    for name in ("input->m0", f"m0.{unit}1->m2", f"m2.{unit}0->logits", f"m0.{unit}2->m1"):
        graph.in_graph[graph.edge(name).index] = True
    graph.prune()
    assert set(graph.included_edges()) == {"input->m0", f"m0.{unit}1->m2", f"m2.{unit}0->logits"}

    # choosing only edges that pruning drops warns (an empty circuit scores like the corrupted run)
    graph.scores = torch.zeros(len(graph.edges))
    graph.scores[graph.edge(f"m0.{unit}2->m1").index] = 1.0
    with pytest.warns(UserWarning, match="removed all 1 chosen edges"):
        graph.apply_topn(1)
    assert graph.count_included_edges() == 0
    with pytest.warns(UserWarning, match="removed all 1 chosen edges"):
        graph.apply_threshold(0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph.apply_topn(0)  # nothing chosen: nothing to warn about
        graph.apply_topn(1, prune=False)
    graph.reset(empty=True)
    for name in ("input->m0", f"m0.{unit}1->m2", f"m2.{unit}0->logits"):
        graph.in_graph[graph.edge(name).index] = True

    path = graph.to_json(tmp_path / "g.json")
    back = Graph.from_json(path)
    assert torch.equal(back.scores, graph.scores) and torch.equal(back.in_graph, graph.in_graph)
    assert list(back.edges) == list(graph.edges) and back.nodes == graph.nodes
    assert back.groups == graph.groups and repr(back) == repr(graph)
    assert (back.channel_groups, back.d_inner) == ((None, None) if family == "mamba2" else (GROUPS, 32))
    png = graph.to_image(tmp_path / "g.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ patching one edge, against hand-written hooks
def patch_one_edge(model, level, edge, clean, corrupted):
    """Logits with only ``edge`` carrying its corrupted value (every other edge kept)."""
    graph = make_graph(model, level)
    keep = torch.ones_like(graph.in_graph)
    keep[graph.edge(edge).index] = False
    return patched_logits(model, graph, clean, corrupted, in_graph=keep)


@pytest.mark.parametrize("family", FAMILIES)
def test_resid_edge_patch_matches_hand_written_hook(family):
    model = tiny(family)
    clean, corrupted = pair()
    ours = patch_one_edge(model, "layer", "m0->m2", clean, corrupted)

    with torch.no_grad():
        _, corr_cache = model.run_with_cache(corrupted, names_filter="blocks.0.hook_mixer_out")
        _, clean_cache = model.run_with_cache(clean, names_filter="blocks.0.hook_mixer_out")
        shift = corr_cache["blocks.0.hook_mixer_out"] - clean_cache["blocks.0.hook_mixer_out"]
        ref = model.run_with_hooks(clean, fwd_hooks=[("blocks.2.hook_mixer_in", lambda x, hook: x + shift)])
        plain = model(clean)
    torch.testing.assert_close(ours, ref)
    assert (ours - plain).abs().max() > 1e-4  # the edge carries something


@pytest.mark.parametrize("family", FAMILIES)
def test_float64_scores_keep_float64_precision(family):
    """A float64 model's scores are float64 and match hand-written float64 computations of the
    edge m0 -> m2 to 1e-10 (they were rounded to float32: about 1e-7 relative)."""
    model = tiny(family)
    clean, corrupted = pair()
    metric = last_logit_metric()
    with torch.no_grad():
        _, corr_cache = model.run_with_cache(corrupted, names_filter="blocks.0.hook_mixer_out")
        _, clean_cache = model.run_with_cache(clean, names_filter="blocks.0.hook_mixer_out")
        shift = corr_cache["blocks.0.hook_mixer_out"] - clean_cache["blocks.0.hook_mixer_out"]
        patched = model.run_with_hooks(clean, fwd_hooks=[("blocks.2.hook_mixer_in", lambda x, hook: x + shift)])
        exact_ref = (metric(patched) - metric(model(clean))).mean()
    leaf = {}

    def make_leaf(x, hook):
        leaf["x"] = x.detach().requires_grad_(True)
        return leaf["x"]

    with torch.enable_grad():
        value = metric(model.run_with_hooks(clean, fwd_hooks=[("blocks.2.hook_mixer_in", make_leaf)])).sum()
        (grad,) = torch.autograd.grad(value, leaf["x"])
    eap_ref = (shift * grad).sum() / clean.shape[0]
    index = Graph.from_model(model, "layer").edge("m0->m2").index
    for method, ref in (("EAP", eap_ref), ("exact", exact_ref)):
        scores_graph = attribute(model, Graph.from_model(model, "layer"), clean, corrupted, metric, method=method,
                                 quiet=True)
        scores = scores_graph.scores
        assert scores.dtype == torch.float64
        torch.testing.assert_close(scores[index], ref, rtol=1e-10, atol=1e-12)
    values = evaluate_graph(model, Graph.from_model(model, "layer"), clean, corrupted, metric, quiet=True)
    assert values.dtype == torch.float64
    # the JSON round trip keeps them float64, to the last bit
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        read = Graph.from_json(scores_graph.to_json(f"{folder}/graph.json"))
    assert read.scores.dtype == torch.float64 and torch.equal(read.scores, scores_graph.scores)


def test_patched_logits_refuses_a_non_bool_in_graph():
    """~ of an int 0/1 tensor is -1/-2: every edge would be "removed" with weight -2."""
    model = tiny("mamba2")
    clean, corrupted = pair()
    graph = Graph.from_model(model, "layer")
    with pytest.raises(TypeError, match="bool"):
        patched_logits(model, graph, clean, corrupted, in_graph=torch.ones_like(graph.in_graph, dtype=torch.long))


def test_head_edge_patch_matches_hand_written_hook():
    model = tiny("mamba2")
    clean, corrupted = pair()
    ours = patch_one_edge(model, "head", "m1.h2->logits", clean, corrupted)

    hd = model.cfg.d_head
    cols = slice(2 * hd, 3 * hd)  # head 2's channels of y_normed, and out_proj's columns for them
    w = model.blocks[1].mixer.out_proj.weight[:, cols]
    with torch.no_grad():
        _, corr_cache = model.run_with_cache(corrupted, names_filter="blocks.1.hook_y_normed")
        _, clean_cache = model.run_with_cache(clean, names_filter="blocks.1.hook_y_normed")
        shift = (corr_cache["blocks.1.hook_y_normed"][..., cols] - clean_cache["blocks.1.hook_y_normed"][..., cols]) @ w.T
        last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
        ref = model.run_with_hooks(clean, fwd_hooks=[(last, lambda x, hook: x + shift)])
    torch.testing.assert_close(ours, ref)


def test_head_writes_sum_to_the_mixer_output():
    """The premise of head-level edges: out_proj of each head's channels of hook_y_normed,
    summed over heads, is hook_mixer_out (less the bias)."""
    model = tiny("mamba2")
    clean, _ = pair()
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    out_proj = model.blocks[1].mixer.out_proj
    yn = cache["blocks.1.hook_y_normed"]
    hd = model.cfg.d_head
    total = sum(yn[..., j * hd:(j + 1) * hd] @ out_proj.weight[:, j * hd:(j + 1) * hd].T
                for j in range(model.cfg.n_heads))
    if out_proj.bias is not None:
        total = total + out_proj.bias
    torch.testing.assert_close(total, cache["blocks.1.hook_mixer_out"])


@pytest.mark.parametrize("edge", ["m1.c2->m2", "m0.c1->logits"])
def test_channel_group_edge_patch_matches_hand_written_hook(edge):
    """Mamba-1 channel group j of layer l writes out_proj.weight[:, group] @ y_gated[..., group]:
    patching the edge to a receiver adds that write's corrupted-minus-clean difference at the
    receiver's input, and nowhere else."""
    model = tiny("mamba1")
    clean, corrupted = pair()
    ours = patch_one_edge(model, "head", edge, clean, corrupted)

    sender, receiver = edge.split("->")
    layer, j = int(sender[1]), int(sender.split(".c")[1])
    width = model.cfg.d_inner // GROUPS
    cols = slice(j * width, (j + 1) * width)
    w = model.blocks[layer].mixer.out_proj.weight[:, cols]
    y_gated = f"blocks.{layer}.hook_y_gated"
    at = (f"blocks.{model.cfg.n_layers - 1}.hook_resid_post" if receiver == "logits"
          else f"blocks.{receiver[1:]}.hook_mixer_in")
    with torch.no_grad():
        _, corr_cache = model.run_with_cache(corrupted, names_filter=y_gated)
        _, clean_cache = model.run_with_cache(clean, names_filter=y_gated)
        shift = (corr_cache[y_gated][..., cols] - clean_cache[y_gated][..., cols]) @ w.T
        ref = model.run_with_hooks(clean, fwd_hooks=[(at, lambda x, hook: x + shift)])
        plain = model(clean)
    torch.testing.assert_close(ours, ref)
    assert (ours - plain).abs().max() > 1e-4  # the edge carries something
    whole = patch_one_edge(model, "layer", f"m{layer}->{receiver}", clean, corrupted)
    assert (ours - whole).abs().max() > 1e-4  # ... and less than the whole mixer


def test_channel_group_writes_sum_to_the_mixer_output():
    """The premise of Mamba-1 channel-group edges: out_proj of each group's channels of
    hook_y_gated, summed over groups, is hook_mixer_out (less the bias). So removing the
    edges of every group of a layer is removing the layer's edge."""
    model = tiny("mamba1")
    clean, corrupted = pair()
    out_proj = model.blocks[1].mixer.out_proj
    width = model.cfg.d_inner // GROUPS
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
        yg = cache["blocks.1.hook_y_gated"]
        writes = [yg[..., j * width:(j + 1) * width] @ out_proj.weight[:, j * width:(j + 1) * width].T
                  for j in range(GROUPS)]
    assert min(float(w.abs().max()) for w in writes) > 1e-3
    total = sum(writes)
    if out_proj.bias is not None:
        total = total + out_proj.bias
    torch.testing.assert_close(total, cache["blocks.1.hook_mixer_out"])

    groups, layer = make_graph(model, "head"), Graph.from_model(model, "layer")
    keep_groups, keep_layer = torch.ones_like(groups.in_graph), torch.ones_like(layer.in_graph)
    for receiver in ("m2", "logits"):
        keep_layer[layer.edge(f"m1->{receiver}").index] = False
        for j in range(GROUPS):
            keep_groups[groups.edge(f"m1.c{j}->{receiver}").index] = False
    torch.testing.assert_close(patched_logits(model, groups, clean, corrupted, in_graph=keep_groups),
                               patched_logits(model, layer, clean, corrupted, in_graph=keep_layer))


def test_channel_group_graph_refuses_a_model_of_another_width():
    model = tiny("mamba1")
    wider = HookedMamba(HookedMambaConfig(n_layers=3, d_model=16, d_vocab=40, d_state=4, d_conv=4, expand=3))
    clean, corrupted = pair()
    with pytest.raises(ValueError, match="d_inner=32"):
        patched_logits(wider, make_graph(model, "head").reset(empty=True), clean, corrupted)


@pytest.mark.parametrize("family", FAMILIES)
def test_internal_edge_patch_is_the_corrupted_activation(family):
    model = tiny(family)
    clean, corrupted = pair()
    ours = patch_one_edge(model, "component", "m1.gate->m1.out", clean, corrupted)
    with torch.no_grad():
        _, corr_cache = model.run_with_cache(corrupted, names_filter="blocks.1.hook_gate")
        ref = model.run_with_hooks(clean, fwd_hooks=[("blocks.1.hook_gate",
                                                      lambda x, hook: corr_cache["blocks.1.hook_gate"])])
    torch.testing.assert_close(ours, ref)


# ------------------------------------------------------------------ faithfulness
@pytest.mark.parametrize("family,level", [("mamba1", "layer"), ("mamba1", "head"), ("mamba1", "component"),
                                          ("mamba2", "layer"), ("mamba2", "head"), ("mamba2", "component")])
def test_full_graph_is_faithful_and_empty_graph_is_not(family, level):
    model = tiny(family)
    clean, corrupted = pair()
    metric = last_logit_metric()
    graph = make_graph(model, level)
    assert faithfulness(model, graph.reset(empty=False), clean, corrupted, metric) == pytest.approx(1.0, abs=1e-9)
    assert faithfulness(model, graph.reset(empty=True), clean, corrupted, metric) == pytest.approx(0.0, abs=1e-9)
    # empty graph == the corrupted run itself, prompt by prompt
    torch.testing.assert_close(evaluate_graph(model, graph, clean, corrupted, metric),
                               evaluate_baseline(model, clean, corrupted, metric, run_corrupted=True))


# ------------------------------------------------------------------ scores
@pytest.mark.parametrize("family,level", [("mamba1", "component"), ("mamba1", "layer"), ("mamba1", "head"),
                                          ("mamba2", "head"), ("mamba2", "component")])
def test_eap_matches_exact_patching_for_a_small_corruption(family, level):
    """EAP is the first-order Taylor estimate of each edge's patching effect, so for a
    small corruption it must agree with exact patching edge by edge. The corrupted token
    gets an embedding 1e-4 away from the clean one: every effect is then first order. The
    measured worst error, relative to the largest effect, falls with the size of the
    corruption as a second-order error should (mamba2: 0.31, 0.014, 0.0012 at 1e-2, 1e-3,
    1e-4), so a 1e-2 tolerance at 1e-4 has a margin of ~8x. A sign error, a wrong receiver
    or a wrong head decomposition breaks this completely. (For large corruptions EAP is
    known to be poor; see the toy-model test below.)"""
    model = tiny(family)
    clean, corrupted = small_corruption(model)
    metric = last_logit_metric()
    graph = make_graph(model, level)
    eap = attribute(model, graph, clean, corrupted, metric, method="EAP", quiet=True).scores.clone()
    exact = attribute(model, graph, clean, corrupted, metric, method="exact", quiet=True).scores.clone()
    assert exact.abs().max() > 1e-6
    assert pearson(eap, exact) > 0.999
    torch.testing.assert_close(eap.double(), exact.double(), atol=1e-2 * float(exact.abs().max()), rtol=0)


@pytest.mark.parametrize("method", ["EAP", "EAP-IG"])
def test_channel_group_scores_add_up_to_the_layer_scores(method):
    """The groups' writes sum to the mixer's (test above), and an edge score is linear in
    the sender's write difference at a fixed receiver gradient: the scores of the edges
    m{l}.c{j} -> r, summed over j, are the score of m{l} -> r in the layer-level graph."""
    model = tiny("mamba1")
    clean, corrupted = pair()
    kw = dict(method=method, quiet=True, **({"ig_steps": 3} if method == "EAP-IG" else {}))
    layer = attribute(model, Graph.from_model(model, "layer"), clean, corrupted, last_logit_metric(), **kw)
    groups = attribute(model, make_graph(model, "head"), clean, corrupted, last_logit_metric(), **kw)
    spread = [float(groups.score(f"m0.c{j}->logits")) for j in range(GROUPS)]
    assert max(spread) - min(spread) > 1e-3  # the groups differ
    for name, e in layer.edges.items():
        if e.parent == "input":
            expected = groups.score(name)
        else:
            expected = sum(groups.score(f"{e.parent}.c{j}->{e.child}") for j in range(GROUPS))
        assert float(layer.scores[e.index]) == pytest.approx(float(expected), rel=1e-4, abs=1e-6), name


def test_positional_channel_group_scores_match_exact_patching():
    model = tiny("mamba1")
    clean, corrupted = small_corruption(model)
    metric = last_logit_metric()
    flat = attribute(model, make_graph(model, "head"), clean, corrupted, metric, quiet=True)
    pos = attribute(model, make_graph(model, "head", positional=True, n_pos=P), clean, corrupted, metric, quiet=True)
    torch.testing.assert_close(pos.scores.sum(-1), flat.scores, atol=1e-5, rtol=1e-4)
    assert float(pos.scores[:, :4].abs().max()) < 1e-6  # nothing before the changed token differs
    exact = attribute(model, make_graph(model, "head", positional=True, n_pos=P), clean, corrupted, metric,
                      method="exact", quiet=True)
    assert exact.scores.abs().max() > 1e-6
    assert pearson(pos.scores, exact.scores) > 0.999


def test_eap_ig_with_one_step_is_eap():
    model = tiny("mamba2")
    clean, corrupted = pair()
    metric = last_logit_metric()
    g1 = attribute(model, Graph.from_model(model, "head"), clean, corrupted, metric, method="EAP", quiet=True)
    g2 = attribute(model, Graph.from_model(model, "head"), clean, corrupted, metric, method="EAP-IG", ig_steps=1,
                   quiet=True)
    torch.testing.assert_close(g1.scores, g2.scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_eap_ig_converges_to_exact_patching_on_a_linearised_model(family):
    """Zero every out_proj: the mixers write nothing, and the only path from the input to
    the logits is the edge input->logits. Interpolating the input is then interpolating
    that edge alone, so EAP-IG's Riemann sum converges to metric(corrupted) - metric(clean),
    which is exactly the effect of patching that edge, as the steps grow (error O(1/steps)).
    """
    model = tiny(family)
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.out_proj.weight.zero_()
    clean, corrupted = pair(change=(2, P - 1))  # the last token changes: the direct path carries it
    metric = lambda logits: logits[:, -1].log_softmax(-1)[:, 3]  # noqa: E731  (nonlinear in the residual)
    graph = Graph.from_model(model, "layer")
    exact = float(attribute(model, graph, clean, corrupted, metric, method="exact", quiet=True).score("input->logits"))
    ig = {steps: float(attribute(model, graph, clean, corrupted, metric, method="EAP-IG", ig_steps=steps,
                                 quiet=True).score("input->logits")) for steps in (8, 16, 32, 64)}
    errors = {steps: abs(value - exact) for steps, value in ig.items()}
    assert abs(exact) > 1e-2
    assert errors[8] > errors[16] > errors[32] > errors[64]
    assert errors[64] < 0.6 * errors[32]  # O(1/steps): halves when the steps double
    # Richardson extrapolation cancels the O(1/steps) term; what is left is the limit
    # (measured: 2e-4 of the effect for both families)
    assert abs(2 * ig[64] - ig[32] - exact) < 0.005 * abs(exact)


def test_positional_scores_sum_to_the_unsplit_scores_and_match_exact():
    model = tiny("mamba1")
    clean, corrupted = small_corruption(model)
    metric = last_logit_metric()
    flat = attribute(model, Graph.from_model(model, "layer"), clean, corrupted, metric, quiet=True)
    pos = attribute(model, Graph.from_model(model, "layer", positional=True, n_pos=P), clean, corrupted, metric,
                    quiet=True)
    assert pos.scores.shape == (len(flat.edges), P)
    torch.testing.assert_close(pos.scores.sum(-1), flat.scores, atol=1e-5, rtol=1e-4)
    assert float(pos.scores[:, :4].abs().max()) < 1e-6  # nothing before the changed token differs
    exact = attribute(model, Graph.from_model(model, "layer", positional=True, n_pos=P), clean, corrupted, metric,
                      method="exact", quiet=True)
    assert pearson(pos.scores, exact.scores) > 0.999
    with pytest.raises(ValueError, match="positional"):
        attribute(model, Graph.from_model(model, "layer", positional=True, n_pos=P + 1), clean, corrupted, metric,
                  quiet=True)
    # the top (edge, position) pairs, by brute force over the score table
    top = pos.top_edges(5, per_position=True)
    brute = sorted(((name, t, float(pos.scores[e.index, t])) for name, e in pos.edges.items() for t in range(P)),
                   key=lambda item: -abs(item[2]))[:5]
    assert [(n, t) for n, t, _ in top] == [(n, t) for n, t, _ in brute]
    assert [v for _, _, v in top] == pytest.approx([v for _, _, v in brute])
    pos.apply_topn(3, prune=False)
    assert [(n, t) for n, t, _ in pos.top_edges(10, per_position=True, only_in_graph=True)] == \
        [(n, t) for n, t, _ in brute[:3]]
    with pytest.raises(ValueError, match="positional graph"):
        flat.top_edges(5, per_position=True)


def test_dataloader_and_labels_give_the_same_scores_as_tensors():
    model = tiny("mamba2")
    clean, corrupted = pair()
    targets = torch.arange(B) % 40
    metric = lambda logits, labels: logits[:, -1].gather(1, labels[:, None])[:, 0]  # noqa: E731
    a = attribute(model, Graph.from_model(model, "layer"), clean, corrupted, metric, labels=targets,
                  batch_size=4, quiet=True)
    loader = [(clean[:3], corrupted[:3], targets[:3]), (clean[3:], corrupted[3:], targets[3:])]
    b = attribute(model, Graph.from_model(model, "layer"), loader, None, metric, quiet=True)
    torch.testing.assert_close(a.scores, b.scores, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="same shape|one shape"):
        attribute(model, Graph.from_model(model, "layer"), clean, corrupted[:, :-1], metric, labels=targets)
    with pytest.raises(ValueError, match="one value per prompt"):
        attribute(model, Graph.from_model(model, "layer"), clean, corrupted, lambda logits: logits[:, -1, :3],
                  quiet=True)
    with pytest.raises(ValueError, match="method"):
        attribute(model, Graph.from_model(model, "layer"), clean, corrupted, metric, method="ACDC", labels=targets)


def left_padded(long_pair, short_pair, pad=0):
    """Two groups of pairs of different lengths in one batch, the short one padded on the left."""
    (clean_a, corrupted_a), (clean_b, corrupted_b) = long_pair, short_pair
    extra = clean_a.shape[1] - clean_b.shape[1]
    padding = torch.full((clean_b.shape[0], extra), pad, dtype=clean_b.dtype)
    clean = torch.cat([clean_a, torch.cat([padding, clean_b], 1)])
    corrupted = torch.cat([corrupted_a, torch.cat([padding, corrupted_b], 1)])
    mask = torch.ones_like(clean)
    mask[clean_a.shape[0]:, :extra] = 0
    return clean, corrupted, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["EAP-IG", "exact"])
def test_left_padded_batch_scores_like_its_unpadded_prompts(family, method):
    """Prompts of two lengths in one left-padded batch with an attention_mask get the scores
    (and per-prompt circuit metrics) of the two groups run unpadded, weighted by their sizes."""
    model = tiny(family)
    long_pair = pair(seed=3, change=(1, 6))
    short_clean, short_corrupted = pair(seed=4, change=(2,))
    short_pair = (short_clean[:4, :5], short_corrupted[:4, :5])
    clean, corrupted, mask = left_padded(long_pair, short_pair)
    metric = last_logit_metric()
    level = "component" if method == "EAP-IG" else "layer"
    kw = dict(method=method, quiet=True, **({"ig_steps": 3} if method == "EAP-IG" else {}))
    padded = attribute(model, Graph.from_model(model, level), clean, corrupted, metric, attention_mask=mask,
                       batch_size=7, **kw)
    parts = [attribute(model, Graph.from_model(model, level), c, k, metric, **kw) for c, k in (long_pair, short_pair)]
    expected = (B * parts[0].scores.double() + 4 * parts[1].scores.double()) / (B + 4)
    assert float(expected.abs().max()) > 1e-3
    torch.testing.assert_close(padded.scores.double(), expected, rtol=1e-5, atol=1e-7)
    graph = parts[0].apply_topn(3, prune=False)  # pruned, these 3 edges would leave an empty circuit
    values = evaluate_graph(model, graph, clean, corrupted, metric, attention_mask=mask, quiet=True)
    unpadded = torch.cat([evaluate_graph(model, graph, c, k, metric, quiet=True) for c, k in (long_pair, short_pair)])
    torch.testing.assert_close(values.double(), unpadded.double(), rtol=1e-6, atol=1e-8)


def test_attention_mask_errors_name_the_problem():
    model = tiny("mamba2")
    clean, corrupted = pair()
    graph = Graph.from_model(model, "layer")
    right_padded = torch.ones_like(clean)
    right_padded[0, -2:] = 0
    with pytest.raises(ValueError, match="pad on the left"):
        attribute(model, graph, clean, corrupted, last_logit_metric(), attention_mask=right_padded, quiet=True)
    with pytest.raises(ValueError, match="attention_mask must have"):
        attribute(model, graph, clean, corrupted, last_logit_metric(), attention_mask=right_padded[:, 1:], quiet=True)
    with pytest.raises(TypeError, match="attention_mask"):
        attribute(model, graph, [(clean, corrupted)], None, last_logit_metric(), attention_mask=right_padded)
    # a positional graph's position is a column: a padded batch (here left-padded) would mix tokens
    left_padded_mask = torch.ones_like(clean)
    left_padded_mask[1, :2] = 0
    positional = Graph.from_model(model, "layer", positional=True, n_pos=clean.shape[1])
    for run in (lambda: attribute(model, positional, clean, corrupted, last_logit_metric(),
                                  attention_mask=left_padded_mask, quiet=True),
                lambda: evaluate_graph(model, positional, clean, corrupted, last_logit_metric(),
                                       attention_mask=left_padded_mask, quiet=True),
                lambda: attribute(model, positional, clean, corrupted, last_logit_metric(), method="exact",
                                  attention_mask=left_padded_mask, quiet=True)):
        with pytest.raises(ValueError, match=r"positional over .* rows \[1\] of this batch are padded"):
            run()
    # the padding the forward infers (to_tokens' right padding here) is refused alike
    import tl_mamba

    toy = tl_mamba.from_pretrained("toy-mamba2")
    padded = toy.to_tokens(["The capital of Kor Mav Vor is", "Vel is"])
    toy_graph = Graph.from_model(toy, "layer", positional=True, n_pos=padded.shape[1])
    with pytest.raises(ValueError, match=r"positional over .* rows \[1\] of this batch are padded"):
        attribute(toy, toy_graph, padded, padded.flip(0), last_logit_metric(), quiet=True)
    full = torch.ones_like(clean)  # a mask with no padding is no problem
    attribute(model, positional, clean, corrupted, last_logit_metric(), attention_mask=full, quiet=True)
    # evaluate_baseline takes the quiet= that evaluate_graph and faithfulness take
    torch.testing.assert_close(evaluate_baseline(model, clean, corrupted, last_logit_metric(), quiet=False),
                               last_logit_metric()(model(clean)).double(), check_dtype=False)


# ------------------------------------------------------------------ batch_size on a list of batches
def labelled_metric(logits, labels):
    """Per prompt: the logit of the prompt's own target minus the mean logit."""
    last = logits[:, -1]
    return last.gather(1, labels[:, None])[:, 0] - last.mean(-1)


def m0_m2_references(model, clean, corrupted, targets, ig_steps):
    """Hand-written references for the edge m0 -> m2 over ALL prompts at once (no
    tl_mamba.circuits code): its exact patching effect, its EAP and EAP-IG scores (means over
    prompts), and the per-prompt metric with that edge alone patched."""
    with torch.no_grad():
        _, corr_cache = model.run_with_cache(corrupted, names_filter="blocks.0.hook_mixer_out")
        _, clean_cache = model.run_with_cache(clean, names_filter="blocks.0.hook_mixer_out")
        shift = corr_cache["blocks.0.hook_mixer_out"] - clean_cache["blocks.0.hook_mixer_out"]
        patched = labelled_metric(model.run_with_hooks(
            clean, fwd_hooks=[("blocks.2.hook_mixer_in", lambda x, hook: x + shift)]), targets)
        clean_values = labelled_metric(model(clean), targets)
        corrupted_values = labelled_metric(model(corrupted), targets)
        e_clean, e_corr = model.embed.W_E[clean], model.embed.W_E[corrupted]

    def grad_at_m2(embed):
        leaf = {}

        def make_leaf(x, hook):
            leaf["x"] = x.detach().requires_grad_(True)
            return leaf["x"]

        with torch.enable_grad():
            logits = model.run_with_hooks(clean, fwd_hooks=[("hook_embed", lambda x, hook: embed),
                                                            ("blocks.2.hook_mixer_in", make_leaf)])
            (grad,) = torch.autograd.grad(labelled_metric(logits, targets).sum(), leaf["x"])
        return grad

    n = clean.shape[0]
    eap = float((shift * grad_at_m2(e_clean)).sum()) / n
    ig = sum(float((shift * grad_at_m2(e_corr + k / ig_steps * (e_clean - e_corr))).sum())
             for k in range(1, ig_steps + 1)) / ig_steps / n
    return dict(exact=float((patched - clean_values).mean()), EAP=eap, ig=ig, patched=patched,
                clean=clean_values, corrupted=corrupted_values)


def test_batch_size_splits_every_given_batch_of_a_list():
    """batch_size caps the rows of every forward when the data is a list of batches too (it was
    ignored there): a batch larger than batch_size is cut, tokens, labels and all, and every
    result is the unsplit one (chunks of 2, 2, 1 and 1 rows: a mean of chunk means would
    weigh the single rows double) and matches hand-written references over all prompts."""
    model = tiny("mamba2")
    clean, corrupted = pair()
    targets = (torch.arange(B) * 7 + 3) % 40
    loader = [(clean[:5], corrupted[:5], targets[:5]), (clean[5:], corrupted[5:], targets[5:])]
    ref = m0_m2_references(model, clean, corrupted, targets, ig_steps=3)
    index = Graph.from_model(model, "layer").edge("m0->m2").index
    for method, kw, expected in (("EAP", {}, ref["EAP"]), ("EAP-IG", {"ig_steps": 3}, ref["ig"]),
                                 ("exact", {}, ref["exact"])):
        with RowCounter(model) as rows:
            split = attribute(model, Graph.from_model(model, "layer"), loader, None, labelled_metric, method=method,
                              batch_size=2, quiet=True, **kw).scores
        assert rows and max(rows) <= 2, (method, rows)
        whole = attribute(model, Graph.from_model(model, "layer"), loader, None, labelled_metric, method=method,
                          quiet=True, **kw).scores
        torch.testing.assert_close(split, whole, rtol=1e-9, atol=1e-12)
        assert abs(expected) > 1e-4
        assert float(split[index]) == pytest.approx(expected, rel=1e-9, abs=1e-12), method
    # a scalar metric (the mean over the rows of a forward) stays a mean over all prompts
    mean_metric = lambda logits, labels: labelled_metric(logits, labels).mean()  # noqa: E731
    scalar = attribute(model, Graph.from_model(model, "layer"), loader, None, mean_metric, batch_size=2, quiet=True)
    assert float(scalar.scores[index]) == pytest.approx(ref["EAP"], rel=1e-9, abs=1e-12)

    graph = Graph.from_model(model, "layer")
    graph.in_graph[index] = False  # every edge kept but m0 -> m2
    with RowCounter(model) as rows:
        values = evaluate_graph(model, graph, loader, None, labelled_metric, batch_size=2, quiet=True)
        clean_values = evaluate_baseline(model, loader, None, labelled_metric, batch_size=2)
        corrupted_values = evaluate_baseline(model, loader, None, labelled_metric, batch_size=2, run_corrupted=True)
        faithful = faithfulness(model, graph, loader, None, labelled_metric, batch_size=2, quiet=True)
    assert rows and max(rows) <= 2, rows
    torch.testing.assert_close(values, ref["patched"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(values, evaluate_graph(model, graph, loader, None, labelled_metric, quiet=True))
    torch.testing.assert_close(clean_values, ref["clean"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(corrupted_values, ref["corrupted"], rtol=1e-9, atol=1e-12)
    gap = ref["clean"].mean() - ref["corrupted"].mean()
    expected = float((ref["patched"].mean() - ref["corrupted"].mean()) / gap)
    assert abs(1 - expected) > 1e-3  # the edge matters
    assert faithful == pytest.approx(expected, rel=1e-9)
    assert faithful == pytest.approx(faithfulness(model, graph, loader, None, labelled_metric, quiet=True), rel=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_size_splits_dict_batches_with_their_masks(family):
    """A left-padded dict batch (tokens, labels, attention_mask) cut by batch_size=3 scores like
    its two groups of prompts run unpadded and whole (the reference of the padding test above);
    two parallel lists of token tensors are cut as well."""
    model = tiny(family)
    long_pair = pair(seed=3, change=(1, 6))
    short_clean, short_corrupted = pair(seed=4, change=(2,))
    short_pair = (short_clean[:4, :5], short_corrupted[:4, :5])
    clean, corrupted, mask = left_padded(long_pair, short_pair)
    targets = torch.arange(clean.shape[0]) % 40
    loader = [{"clean": clean, "corrupted": corrupted, "labels": targets, "attention_mask": mask}]
    kw = dict(method="EAP-IG", ig_steps=2, quiet=True)
    with RowCounter(model) as rows:
        split = attribute(model, Graph.from_model(model, "layer"), loader, None, labelled_metric, batch_size=3, **kw)
        values = evaluate_graph(model, split, loader, None, labelled_metric, batch_size=3, quiet=True)
    assert rows and max(rows) <= 3, rows
    parts = [attribute(model, Graph.from_model(model, "layer"), c, k, labelled_metric, labels=t, **kw)
             for c, k, t in ((*long_pair, targets[:B]), (*short_pair, targets[B:]))]
    expected = (B * parts[0].scores.double() + 4 * parts[1].scores.double()) / (B + 4)
    torch.testing.assert_close(split.scores.double(), expected, rtol=1e-5, atol=1e-7)
    unpadded = torch.cat([evaluate_graph(model, split, c, k, labelled_metric, labels=t, quiet=True)
                          for c, k, t in ((*long_pair, targets[:B]), (*short_pair, targets[B:]))])
    torch.testing.assert_close(values.double(), unpadded.double(), rtol=1e-6, atol=1e-8)
    with RowCounter(model) as rows:
        parallel = evaluate_baseline(model, [clean[:B], clean[B:, 1:]], [corrupted[:B], corrupted[B:, 1:]],
                                     last_logit_metric(), batch_size=4)
    assert max(rows) <= 4 and len(parallel) == B + 4, rows


# ------------------------------------------------------------------ the shipped toy model
def ioi_batch(model, n=48, seed=1, limit=12):
    from tl_mamba.toy import make_ioi

    by_len = defaultdict(list)
    for prompt in make_ioi(n, seed=seed, split="heldout"):
        by_len[prompt.n_tokens].append(prompt)
    prompts = max(by_len.values(), key=len)[:limit]
    clean = torch.tensor([p.token_ids() for p in prompts])
    corrupted = torch.cat([model.to_tokens(p.corrupted) for p in prompts])
    io = torch.tensor([model.to_single_token(p.meta["IO"]) for p in prompts])
    s = torch.tensor([model.to_single_token(p.meta["S"]) for p in prompts])

    def logit_diff(logits):
        last = logits[:, -1]
        return last.gather(1, io[:, None])[:, 0] - last.gather(1, s[:, None])[:, 0]
    return clean, corrupted, logit_diff


def test_eap_ig_finds_a_faithful_ioi_circuit_on_toy_mamba2():
    """On toy-mamba2's IOI task, EAP-IG layer-level scores track exact edge patching on 12
    prompts of one length (head level, 5 steps, 25 prompts: Pearson 0.996, against 0.15 for
    plain EAP, the usual gap when a corruption is large), and a handful of top edges keeps
    most of the behaviour."""
    model = tl_mamba.from_pretrained("toy-mamba2")
    clean, corrupted, metric = ioi_batch(model)
    graph = Graph.from_model(model, "layer")
    ig = attribute(model, graph, clean, corrupted, metric, method="EAP-IG", ig_steps=5, quiet=True).scores.clone()
    exact = attribute(model, graph, clean, corrupted, metric, method="exact", quiet=True).scores.clone()
    assert pearson(ig, exact) > 0.9
    graph.scores = ig
    graph.apply_topn(8)
    value = faithfulness(model, graph, clean, corrupted, metric)
    assert value > 0.8
    known = (float(evaluate_baseline(model, clean, corrupted, metric).mean()),
             float(evaluate_baseline(model, clean, corrupted, metric, run_corrupted=True).mean()))
    assert faithfulness(model, graph, clean, corrupted, metric, baselines=known) == pytest.approx(value)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("steps", [1, 2, 3])
def test_eap_ig_averages_the_gradient_at_k_over_steps(family, steps):
    """EAP-IG's interpolation points are α = k / ig_steps, k = 1..ig_steps (EAP: the clean end
    alone). A left Riemann sum ((k - 1) / N) has the same steps → ∞ limit, so it is checked
    here at small N. Reference: with every out_proj zeroed the final residual stream is the
    embedding and input->logits is the only edge reading it; its score is
    -(1/N) Σ_k f'(k/N) / B with f(α) = Σ_b metric_b(hook_embed = corr + α (clean - corr)),
    f' by autograd on the scalar α (no tl_mamba.circuits code involved)."""
    model = tiny(family, n_layers=2)
    with torch.no_grad():
        for block in model.blocks:
            block.mixer.out_proj.weight.zero_()
    clean, corrupted = pair(change=(P - 1,))
    metric = lambda logits: logits[:, -1].log_softmax(-1)[:, 3]  # noqa: E731
    graph = Graph.from_model(model, "layer")
    kw = {"method": "EAP"} if steps == 1 else {"method": "EAP-IG", "ig_steps": steps}
    score = float(attribute(model, graph, clean, corrupted, metric, quiet=True, **kw).score("input->logits"))

    e_clean, e_corr = model.embed.W_E[clean].detach(), model.embed.W_E[corrupted].detach()
    total = 0.0
    for k in range(1, steps + 1):
        alpha = torch.tensor(k / steps, dtype=torch.float64, requires_grad=True)
        logits = model.run_with_hooks(clean, fwd_hooks=[("hook_embed",
                                                         lambda act, hook: e_corr + alpha * (e_clean - e_corr))])
        (d_alpha,) = torch.autograd.grad(metric(logits).sum(), alpha)
        total += float(d_alpha)
    expected = -total / steps / B
    assert abs(expected) > 1e-3
    assert score == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_threshold_keeps_edges_at_the_threshold():
    """apply_threshold keeps edges whose score is at least the threshold (absolute by default,
    signed with absolute=False); the expected edge sets are written by hand."""
    def graph():
        g = Graph(family="mamba", n_layers=2, n_heads=1, level="layer")
        scores = {"input->m0": 0.5, "input->m1": -0.25, "m0->m1": 0.75, "input->logits": 0.125,
                  "m0->logits": -0.5, "m1->logits": 0.5}
        for name, value in scores.items():
            g.scores[g.edge(name).index] = value
        return g

    assert set(graph().apply_threshold(0.5, prune=False).included_edges()) == \
        {"input->m0", "m0->m1", "m0->logits", "m1->logits"}
    assert set(graph().apply_threshold(0.5, absolute=False, prune=False).included_edges()) == \
        {"input->m0", "m0->m1", "m1->logits"}
    pruned = graph().apply_threshold(0.5)  # all four lie on input -> logits paths
    assert set(pruned.included_edges()) == {"input->m0", "m0->m1", "m0->logits", "m1->logits"}


# ------------------------------------------------------------------ needle (key-value retrieval) pairs
def test_task_batches_ioi_corruption_passes_to_make_ioi():
    """corruption="S2_IO" (S2 replaced by the IO name: the corrupted answer is S) gives make_ioi's
    prompts with that corruption; labels stay (IO, S). Other tasks refuse it."""
    from tl_mamba.circuits import task_batches
    from tl_mamba.toy import make_ioi

    model = tl_mamba.from_pretrained("toy-mamba2")
    prompts = make_ioi(6, 2, split="heldout", corruption="S2_IO")
    batches = task_batches(model, "ioi", n=6, seed=2, corruption="S2_IO")
    rows = {model.to_string(c[i, 1:]): (k[i], lab[i]) for c, k, lab in batches for i in range(c.shape[0])}
    assert len(rows) == 6
    for prompt in prompts:
        corrupted, (answer, wrong) = rows[prompt.text]
        assert model.to_string(corrupted[1:]) == prompt.corrupted
        assert model.to_string(answer[None]) == prompt.answer
        io_word, s2_place = prompt.answer.strip(), prompt.spans["S2"][0]  # (spans count the BOS)
        assert model.to_string(corrupted[s2_place:s2_place + 1]).strip() == io_word  # S2 is now IO
        assert wrong != answer
    default = task_batches(model, "ioi", n=6, seed=2)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(default, batches))  # ABC corrupts otherwise
    with pytest.raises(ValueError, match="corruption= applies to task='ioi' only"):
        task_batches(model, "facts", n=2, corruption="S2_IO")


def test_task_batches_needle_pairs_are_make_needles_prompts():
    """task_batches(model, "needle") encodes make_needle's held-out prompts and their
    corruptions (the needle's value replaced by one found nowhere in the prompt), with labels
    (value, corrupted value); make_needle's length, depth and n_pairs pass through."""
    from tl_mamba.circuits import task_batches
    from tl_mamba.toy import make_needle

    model = tl_mamba.from_pretrained("toy-mamba2")
    prompts = make_needle(12, 3, length=48, split="heldout", depth=0.25, n_pairs=2)
    batches = task_batches(model, "needle", n=12, seed=3, length=48, depth=0.25, n_pairs=2, batch_size=5)
    assert [tuple(c.shape) for c, _, _ in batches] == [(5, 48), (5, 48), (2, 48)]
    rows = [(c[i], k[i], lab[i]) for c, k, lab in batches for i in range(c.shape[0])]
    bos = model.tokenizer.bos_token_id
    for prompt, (clean, corrupted, (answer, wrong)) in zip(prompts, rows):
        assert int(clean[0]) == bos and int(corrupted[0]) == bos
        assert model.to_string(clean[1:]) == prompt.text
        assert model.to_string(corrupted[1:]) == prompt.corrupted
        assert torch.nonzero(clean != corrupted).flatten().tolist() == prompt.spans["needle_value"]
        assert model.to_string(answer[None]) == prompt.answer
        assert model.to_string(wrong[None]) == prompt.corrupted_answer
        assert answer != wrong and wrong not in clean
        assert prompt.meta["n_pairs"] == 2
    # a (lo, hi) range: make_needle's prompts of several lengths, each batch of one length
    prompts = make_needle(10, 4, length=(40, 56), split="heldout")
    batches = task_batches(model, "needle", n=10, seed=4, length=(40, 56), batch_size=4)
    lengths = [c.shape[1] for c, _, _ in batches]
    assert lengths == sorted(lengths) and sum(c.shape[0] for c, _, _ in batches) == 10
    decoded = sorted(model.to_string(row[1:]) for c, _, _ in batches for row in c)
    assert decoded == sorted(p.text for p in prompts)
    assert len({p.n_tokens for p in prompts}) > 1


def test_eap_ig_needle_circuit_runs_on_toy_mamba2():
    """The state-sink workflow's first step: toy-mamba2 retrieves the needle (held-out accuracy
    98-100% at 64 tokens, docs/toy_models.md), so the logit difference value − corrupted value
    is clearly positive on the clean prompts and negative on the corrupted ones (the model
    reads the value it is given); EAP-IG scores its head-level graph (batch_size cutting the
    given batch), and the top-40 circuit keeps most of the behaviour."""
    from tl_mamba.circuits import logit_diff, task_batches

    model = tl_mamba.from_pretrained("toy-mamba2")
    batches = task_batches(model, "needle", n=6, seed=0, length=64)
    clean_values = evaluate_baseline(model, batches, None, logit_diff)
    corrupted_values = evaluate_baseline(model, batches, None, logit_diff, run_corrupted=True)
    assert float(clean_values.mean()) > 2 and float((clean_values > 0).float().mean()) >= 5 / 6
    assert float(corrupted_values.mean()) < 0
    graph = Graph.from_model(model, level="head")
    with RowCounter(model) as rows:
        attribute(model, graph, batches, None, logit_diff, method="EAP-IG", ig_steps=3, batch_size=4, quiet=True)
    assert max(rows) <= 4
    assert bool(torch.isfinite(graph.scores).all()) and float(graph.scores.abs().max()) > 0.1
    baselines = (float(clean_values.mean()), float(corrupted_values.mean()))
    assert faithfulness(model, graph.reset(empty=False), batches, None, logit_diff, baselines=baselines,
                        quiet=True) == pytest.approx(1.0, abs=1e-4)
    graph.apply_topn(40)
    top = faithfulness(model, graph, batches, None, logit_diff, baselines=baselines, quiet=True)
    assert top > 0.8
    # 40 edges drawn at random keep far less: the scores, not the circuit's size, make it faithful
    graph.scores = torch.rand(graph.scores.shape, generator=torch.Generator().manual_seed(0)).to(graph.scores.dtype)
    graph.apply_topn(40)
    assert faithfulness(model, graph, batches, None, logit_diff, baselines=baselines, quiet=True) < top - 0.5
