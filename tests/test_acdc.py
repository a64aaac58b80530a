"""ACDC (tl_mamba.circuits.acdc) against a brute-force search written here.

Reference for a layer-level graph: the patched runs are made with hand-written hooks
(receiver r reads, for each removed edge s -> r, the corrupted run's output of s in
place of this run's), the KL from float64 log-probabilities, and the search is the
paper's loop: nodes from the logits back, each edge tried once, kept when removing it
moves the objective by the threshold or more. Other levels use ``patched_logits``
(tested against hand-written hooks in test_circuits_eap.py) inside the same loop.
"""

from __future__ import annotations

import pytest
import torch

from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig
from tl_mamba.circuits import Graph, acdc, evaluate_graph, patched_logits
from tl_mamba.circuits.acdc import acdc_order

B, P, V = 4, 7, 40


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


def tiny(family: str, n_layers: int = 3):
    if family == "mamba1":
        model = HookedMamba(HookedMambaConfig(n_layers=n_layers, d_model=16, d_vocab=V, d_state=4, expand=2, seed=3))
    else:
        model = HookedMamba2(HookedMambaConfig(family="mamba2", n_layers=n_layers, d_model=16, d_vocab=V, d_state=4,
                                               expand=2, n_heads=4, n_groups=2, chunk_size=4, seed=3))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.3)
    return model.double()


def pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, V, (B, P), generator=g)
    corrupted = clean.clone()
    corrupted[:, [1, 4]] = torch.randint(0, V, (B, 2), generator=g)
    return clean, corrupted


def metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 11]


def hand_patched_logits(model, clean, corrupted, removed_edges, positions=None):
    """Layer-level graph, by hooks: receiver ``m{l}`` (``hook_mixer_in``) or ``logits`` (the last
    ``hook_resid_post``) gets, for each removed edge ``s -> r``, s's corrupted output minus its
    output in this run (``hook_embed`` for the input, ``hook_mixer_out`` for a mixer); only at
    ``positions`` (columns) when given."""
    L = model.cfg.n_layers
    out_hook = {"input": "hook_embed", **{f"m{l}": f"blocks.{l}.hook_mixer_out" for l in range(L)}}
    _, corr = model.run_with_cache(corrupted, names_filter=list(out_hook.values()))
    seen = {}

    def record(name):
        def fn(act, hook):
            seen[name] = act
        return fn

    def receive(child):
        def fn(act, hook):
            for parent, c in removed_edges:
                if c == child:
                    delta = corr[out_hook[parent]] - seen[out_hook[parent]]
                    if positions is not None:
                        keep = torch.zeros(act.shape[1], dtype=torch.bool)
                        keep[positions] = True
                        delta = delta * keep[None, :, None]
                    act = act + delta
            return act
        return fn

    hooks = [(h, record(h)) for h in out_hook.values()]
    hooks += [(f"blocks.{l}.hook_mixer_in", receive(f"m{l}")) for l in range(L)]
    hooks.append((f"blocks.{L - 1}.hook_resid_post", receive("logits")))
    with torch.no_grad():
        return model.run_with_hooks(clean, fwd_hooks=hooks)


def kl_objective(clean_logits, logits):
    ref = clean_logits[:, -1].double().log_softmax(-1)
    new = logits[:, -1].double().log_softmax(-1)
    return float((ref.exp() * (ref - new)).sum(-1).mean())


def brute_force(model, graph, clean, corrupted, threshold, use_kl, run):
    """The ACDC loop, written out: ``run(removed edge names)`` gives the patched logits."""
    with torch.no_grad():
        clean_logits = model(clean)

    def objective(removed):
        logits = run(removed)
        return kl_objective(clean_logits, logits) if use_kl else float(metric(logits).double().mean())

    removed, kept_scores = [], {}
    current = objective(removed)
    nodes = graph.nodes
    for child in reversed(nodes):
        parents = [e.parent for e in graph.edges.values() if e.child == child]
        for parent in sorted(parents, key=nodes.index, reverse=True):
            name = f"{parent}->{child}"
            value = objective(removed + [name])
            kept_scores[name] = value - current
            if (value - current if use_kl else abs(value - current)) < threshold:
                removed.append(name)
                current = value
    return set(removed), kept_scores, current


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("use_kl, threshold", [(True, 0.002), (False, 0.05)])
def test_layer_graph_matches_the_hand_written_search(family, use_kl, threshold):
    model = tiny(family)
    clean, corrupted = pair()
    graph = Graph.from_model(model, "layer")
    run = lambda removed: hand_patched_logits(model, clean, corrupted,  # noqa: E731
                                              [tuple(name.split("->")) for name in removed])
    removed, scores, objective = brute_force(model, graph, clean, corrupted, threshold, use_kl, run)
    got = acdc(model, graph, clean, corrupted, "kl" if use_kl else metric, threshold, quiet=True)
    assert set(got.edges) - set(got.included_edges()) == removed
    assert 0 < len(removed) < len(got.edges)  # the threshold separates the edges here
    for name, change in scores.items():
        assert float(got.score(name)) == pytest.approx(change, rel=1e-7, abs=1e-10), name
    assert got.metadata["acdc"]["objective"] == pytest.approx(objective, rel=1e-7, abs=1e-10)
    # one forward per trial, none for an edge into a node that no longer reaches the logits
    skipped = got.metadata["acdc"]["skipped"]
    assert got.metadata["acdc"]["forwards"] + skipped == len(got.edges) + 1
    # (a node's path to the logits is settled before its own edges are tried)
    assert skipped == sum(1 for e in got.edges.values() if e.child not in got.reaching_logits())
    # the circuit's own evaluation agrees with the objective ACDC reports
    if not use_kl:
        assert float(evaluate_graph(model, got, clean, corrupted, metric, quiet=True).mean()) == \
            pytest.approx(objective, rel=1e-7, abs=1e-10)


@pytest.mark.parametrize("family, level, extra", [("mamba2", "head", {}), ("mamba1", "head", {"channel_groups": 4}),
                                                  ("mamba1", "component", {}),
                                                  ("mamba2", "layer", {"positional": True, "n_pos": P})])
def test_other_graphs_match_the_search_over_patched_logits(family, level, extra):
    model = tiny(family, n_layers=2)
    clean, corrupted = pair(1)
    graph = Graph.from_model(model, level, **extra)

    def cells_of(removed):
        keep = torch.ones_like(graph.in_graph)
        for name in removed:
            index, _, pos = name.partition("@")
            keep[(graph.edge(index).index, int(pos)) if pos else graph.edge(index).index] = False
        return keep

    def run(removed):
        return patched_logits(model, graph, clean, corrupted, in_graph=cells_of(removed))

    if graph.positional:  # the loop over (edge, position) cells, latest position first
        with torch.no_grad():
            clean_logits = model(clean)
        removed, current = [], kl_objective(clean_logits, clean_logits)
        for index, pos in acdc_order(graph):
            name = f"{list(graph.edges)[index]}@{pos}"
            value = kl_objective(clean_logits, run(removed + [name]))
            if value - current < 0.001:
                removed.append(name)
                current = value
        got = acdc(model, graph, clean, corrupted, threshold=0.001, quiet=True)
        assert (~got.in_graph).sum() == len(removed)
        torch.testing.assert_close(got.in_graph, cells_of(removed))
    else:
        removed, _, _ = brute_force(model, graph, clean, corrupted, 0.001, True, run)
        got = acdc(model, graph, clean, corrupted, threshold=0.001, quiet=True)
        assert set(got.edges) - set(got.included_edges()) == removed
    assert 0 < (~got.in_graph).sum() < got.in_graph.numel()


def test_order_visits_children_from_the_logits_back():
    model = tiny("mamba2", n_layers=2)
    graph = Graph.from_model(model, "layer")
    names = [list(graph.edges)[index] for (index,) in acdc_order(graph)]
    assert names == ["m1->logits", "m0->logits", "input->logits", "m0->m1", "input->m1", "input->m0"]


def test_extreme_thresholds_and_batches():
    """Threshold 0 keeps every edge whose removal raises the KL; a threshold above every
    change removes them all (the circuit is the corrupted run: its KL is the corrupted
    model's). Batches of 1 row give the same search."""
    model = tiny("mamba1")
    clean, corrupted = pair(2)
    none = acdc(model, Graph.from_model(model, "layer"), clean, corrupted, threshold=float("inf"), quiet=True)
    assert none.count_included_edges() == 0
    with torch.no_grad():
        corrupted_kl = kl_objective(model(clean), model(corrupted))
    assert none.metadata["acdc"]["objective"] == pytest.approx(corrupted_kl, rel=1e-7)
    every = acdc(model, Graph.from_model(model, "layer"), clean, corrupted, threshold=0.0, quiet=True)
    assert every.count_included_edges() == int((every.scores >= 0).sum()) - every.metadata["acdc"]["skipped"]
    split = acdc(model, Graph.from_model(model, "layer"), clean, corrupted, threshold=0.002, batch_size=1,
                 quiet=True)
    whole = acdc(model, Graph.from_model(model, "layer"), clean, corrupted, threshold=0.002, quiet=True)
    assert torch.equal(split.in_graph, whole.in_graph)
    torch.testing.assert_close(split.scores, whole.scores, rtol=1e-9, atol=1e-12)


def test_errors_name_the_problem():
    model = tiny("mamba1", n_layers=2)
    clean, corrupted = pair()
    graph = Graph.from_model(model, "layer")
    for bad in (-1, float("nan"), True, "0.1"):
        with pytest.raises(ValueError, match="threshold must be a number >= 0"):
            acdc(model, graph, clean, corrupted, threshold=bad)
    import numpy as np  # numpy and 0-d torch scalars are numbers: the same search as the float
    reference = acdc(model, Graph.from_model(model, "layer"), clean, corrupted, threshold=0.002, quiet=True)
    for scalar in (np.float32(0.002), torch.tensor(0.002, dtype=torch.float64)):
        again = acdc(model, Graph.from_model(model, "layer"), clean, corrupted, threshold=scalar, quiet=True)
        assert torch.equal(again.in_graph, reference.in_graph)
    with pytest.raises(ValueError, match="metric must be 'kl' or a function"):
        acdc(model, graph, clean, corrupted, metric="logit_diff")
    right = torch.ones_like(clean)
    right[0, -2:] = 0  # right padding: the last position of row 0 is padding
    with pytest.raises(ValueError, match="pad on the left"):
        acdc(model, graph, clean, corrupted, attention_mask=right)
    with pytest.raises(ValueError, match="built for a mamba2 model"):
        acdc(model, Graph.from_model(tiny("mamba2", n_layers=2), "layer"), clean, corrupted)


def test_finds_a_faithful_ioi_circuit_on_toy_mamba2():
    """On toy-mamba2's IOI prompts, ACDC's layer-level circuit (KL threshold 0.01) keeps a third
    of the edges and most of the logit difference, measured by evaluate_graph's faithfulness."""
    import tl_mamba
    from tl_mamba.circuits import faithfulness
    from test_circuits_eap import ioi_batch

    model = tl_mamba.from_pretrained("toy-mamba2")
    clean, corrupted, logit_diff = ioi_batch(model)
    graph = acdc(model, Graph.from_model(model, "layer"), clean, corrupted, threshold=0.01, quiet=True)
    assert graph.count_included_edges() <= len(graph.edges) // 2
    assert faithfulness(model, graph, clean, corrupted, logit_diff, quiet=True) > 0.7


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_path_patch_matches_hand_written_hooks(family):
    """Path patching of sender set → receiver set equals the hook-written run in which the
    receivers read the senders' corrupted outputs; all heads (channel groups) of a layer as
    senders equal the whole layer (their writes sum to its output, less the unchanged bias)."""
    from tl_mamba.circuits import path_patch

    model = tiny(family)
    clean, corrupted = pair(3)
    senders, receivers = ["input", "m0"], ["m2", "logits"]
    got = path_patch(model, clean, corrupted, metric, senders=senders, receivers=receivers, quiet=True)
    edges = [(s, r) for s in senders for r in receivers]
    expected = metric(hand_patched_logits(model, clean, corrupted, edges)).double()
    torch.testing.assert_close(got.double(), expected, rtol=1e-9, atol=1e-10)
    with torch.no_grad():
        assert (got - metric(model(clean))).abs().max() > 1e-3  # the paths carry something
    groups = {"channel_groups": 4} if family == "mamba1" else {}
    units = [f"m0.{'c' if family == 'mamba1' else 'h'}{j}" for j in range(4)]
    by_units = path_patch(model, clean, corrupted, metric, senders=units, receivers=["m1"], level="head",
                          quiet=True, **groups)
    whole = metric(hand_patched_logits(model, clean, corrupted, [("m0", "m1")])).double()
    torch.testing.assert_close(by_units.double(), whole, rtol=1e-8, atol=1e-9)
    for kwargs, message in (({"senders": ["m9"], "receivers": ["m1"]}, r"senders \['m9'\]: not senders"),
                            ({"senders": ["m1"], "receivers": ["input"]}, r"receivers \['input'\]: not receivers"),
                            ({"senders": ["m2"], "receivers": ["m1"]}, "no residual path")):
        with pytest.raises(ValueError, match=message):
            path_patch(model, clean, corrupted, metric, quiet=True, **kwargs)
    for kwargs in ({"senders": [], "receivers": ["m1"]}, {"senders": ["m0"], "receivers": []}):  # nothing patched
        with torch.no_grad():
            torch.testing.assert_close(path_patch(model, clean, corrupted, metric, quiet=True, **kwargs).double(),
                                       metric(model(clean)).double(), rtol=1e-9, atol=1e-10)
    with pytest.raises(TypeError, match="wrap it"):
        path_patch(model, clean, corrupted, metric, senders="m0", receivers=["m1"])


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_path_patch_at_chosen_positions_matches_hand_written_hooks(family):
    """positions=: the receivers read the senders' corrupted outputs at those columns only."""
    from tl_mamba.circuits import path_patch

    model = tiny(family)
    clean, corrupted = pair(3)
    p = clean.shape[1]
    senders, receivers = ["input", "m0"], ["m2", "logits"]
    edges = [(s, r) for s in senders for r in receivers]
    for positions, columns in (([2, -1], [2, p - 1]), (torch.arange(p) % 3 == 0, list(range(0, p, 3)))):
        got = path_patch(model, clean, corrupted, metric, senders=senders, receivers=receivers,
                         positions=positions, quiet=True)
        expected = metric(hand_patched_logits(model, clean, corrupted, edges, positions=columns)).double()
        torch.testing.assert_close(got.double(), expected, rtol=1e-9, atol=1e-10)
    everywhere = path_patch(model, clean, corrupted, metric, senders=senders, receivers=receivers, quiet=True)
    assert (everywhere - got).abs().max() > 1e-4  # the positions matter
    with pytest.raises(IndexError, match="out of range"):
        path_patch(model, clean, corrupted, metric, senders=senders, receivers=receivers, positions=[p], quiet=True)
    with pytest.raises(ValueError, match="not an iterator"):
        path_patch(model, iter([(clean, corrupted)]), None, metric, senders=senders, receivers=receivers,
                   positions=[1], quiet=True)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_left_padded_batch_searches_as_its_prompts_apart(family):
    """Prompts of two lengths, left-padded into one batch with an attention mask, give the search
    that the same prompts give as two batches of their own lengths (a list of batches)."""
    model = tiny(family)
    clean, corrupted = pair(4)
    short_clean, short_corrupted = clean[2:, 3:], corrupted[2:, 3:]  # two prompts of 4 tokens
    apart = acdc(model, Graph.from_model(model, "layer"),
                 [(clean[:2], corrupted[:2]), (short_clean, short_corrupted)], threshold=0.002, quiet=True)
    padded_clean, padded_corrupted = clean.clone(), corrupted.clone()
    padded_clean[2:, :3] = padded_corrupted[2:, :3] = 0
    mask = torch.ones_like(clean)
    mask[2:, :3] = 0
    together = acdc(model, Graph.from_model(model, "layer"), padded_clean, padded_corrupted, threshold=0.002,
                    attention_mask=mask, quiet=True)
    assert torch.equal(together.in_graph, apart.in_graph)
    torch.testing.assert_close(together.scores, apart.scores, rtol=1e-7, atol=1e-10)
    assert 0 < together.count_included_edges() < len(together.edges)


def test_edges_into_a_node_cut_off_from_the_logits_are_not_tried():
    """A node whose every edge out is already removed reads nothing that reaches the output: its
    edges in go without a forward each (the paper's rule), at any threshold."""
    model = tiny("mamba2")
    clean, corrupted = pair(5)
    graph = Graph.from_model(model, "layer")
    graph.in_graph[graph.edge("m2->logits").index] = False  # m2's only edge out
    got = acdc(model, graph, clean, corrupted, threshold=0.0, quiet=True)
    into_m2 = [name for name, e in got.edges.items() if e.child == "m2"]
    assert got.metadata["acdc"]["skipped"] == len(into_m2) == 3
    assert not any(bool(got.in_graph[got.edge(name).index]) for name in into_m2)
    assert got.metadata["acdc"]["forwards"] == len(got.edges) - 1 - 3 + 1  # tried edges, and the start
