"""Input checks of the circuit tools, Knockout and hidden_attention: inputs that used to be
broadcast, sliced, truncated or ignored silently (or failed with an opaque error) now raise
an error that names the problem, or warn."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig, Knockout
from tl_mamba.circuits import Graph, attribute, knockout_attribution
from tl_mamba.circuits.feature_attribution import feature_attribution
from tl_mamba.circuits.patching import patch_heads, patch_layer_position

B, P = 2, 6


def make_model(family: str):
    if family == "mamba1":
        cfg = HookedMambaConfig(n_layers=2, d_model=16, d_vocab=50, d_state=4, d_conv=4, seed=0)
        return HookedMamba(cfg)
    cfg = HookedMambaConfig(family="mamba2", n_layers=2, d_model=16, d_vocab=50, d_state=4, d_conv=4, d_head=8,
                            n_groups=1, chunk_size=4, seed=0)
    return HookedMamba2(cfg)


@pytest.fixture(params=["mamba1", "mamba2"])
def family(request):
    return request.param


def tokens(seed: int, b: int = B, p: int = P) -> torch.Tensor:
    return torch.randint(3, 50, (b, p), generator=torch.Generator().manual_seed(seed))


def metric(logits):
    return logits[:, -1, 5] - logits[:, -1, 6]


# ------------------------------------------------------------------- patching: clean_cache
def test_patch_clean_cache_of_other_prompts_raises_naming_hook_and_shapes(family):
    model = make_model(family)
    clean, corrupted = tokens(1), tokens(2)
    _, one_prompt = model.run_with_cache(clean[:1])
    _, longer = model.run_with_cache(tokens(3, p=P + 2))
    _, last_only = model.run_with_cache(clean, pos_slice=-1)
    for cache, shape in ((one_prompt, (1, P, 16)), (longer, (B, P + 2, 16)), (last_only, (B, 1, 16))):
        with pytest.raises(ValueError) as err:
            patch_layer_position(model, clean, corrupted, metric, clean_cache=cache, progress=False)
        message = str(err.value)
        assert "blocks.0.hook_resid_pre" in message and str(shape) in message and str((B, P)) in message
    with pytest.raises(ValueError, match="pos_slice"):
        patch_layer_position(model, clean, corrupted, metric, clean_cache=last_only, progress=False)


def test_patch_heads_checks_its_clean_cache_too():
    model = make_model("mamba2")
    clean, corrupted = tokens(1), tokens(2)
    _, one_prompt = model.run_with_cache(clean[:1])
    with pytest.raises(ValueError, match=r"blocks\.\d\.hook_y.*\(1, 6, 4, 8\)"):
        patch_heads(model, clean, corrupted, metric, hook="y", clean_cache=one_prompt, progress=False)


def test_patch_with_a_matching_cache_equals_the_computed_one(family):
    """A cache of the clean prompts (batched, or one prompt without its batch axis) gives the
    numbers patch_layer_position computes itself."""
    model = make_model(family)
    clean, corrupted = tokens(1), tokens(2)
    reference = patch_layer_position(model, clean, corrupted, metric, progress=False)
    _, cache = model.run_with_cache(clean)
    torch.testing.assert_close(patch_layer_position(model, clean, corrupted, metric, clean_cache=cache,
                                                    progress=False), reference)
    one = patch_layer_position(model, clean[:1], corrupted[:1], metric, progress=False)
    _, unbatched = model.run_with_cache(clean[:1], remove_batch_dim=True)
    torch.testing.assert_close(patch_layer_position(model, clean[:1], corrupted[:1], metric, clean_cache=unbatched,
                                                    progress=False), one)


# ------------------------------------------------------------------------------ Knockout
def test_empty_channels_or_heads_warn_that_nothing_is_removed(family):
    model = make_model(family)
    kw = dict(channels=[]) if family == "mamba1" else dict(heads=[])
    ko = Knockout(layers=[0, 1], sources=[1], path="both", **kw)
    with pytest.warns(UserWarning, match="removes no edges"):
        with torch.no_grad():
            out = model.run_with_knockout(tokens(0), ko)
    torch.testing.assert_close(out, model(tokens(0)), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_generators_are_read_as_their_lists(family):
    """sources / targets / heads / channels given as generators knock out what their lists do
    (the type check used to exhaust them, and the knockout then removed nothing)."""
    model = make_model(family)
    feature = dict(heads=[1, 2]) if family == "mamba2" else dict(channels=[0, 3, 5])
    name, chosen = next(iter(feature.items()))
    path = "ssm" if family == "mamba2" else "both"  # (part of a group's heads on the conv path warns)
    as_list = Knockout(layers=[0, 1], sources=[1, 2], targets=[4, 5], path=path, **feature)
    as_generators = Knockout(layers=[0, 1], sources=(j for j in (1, 2)), targets=(j for j in (4, 5)), path=path,
                             **{name: (i for i in chosen)})
    with torch.no_grad():
        want = model.run_with_knockout(tokens(0), as_list)
        assert (want - model(tokens(0))).abs().max() > 1e-4  # the knockout changes something
        torch.testing.assert_close(model.run_with_knockout(tokens(0), as_generators), want)


def test_int_zero_one_tensor_is_not_taken_for_a_mask():
    model = make_model("mamba2")
    with pytest.raises(ValueError, match=r"sources: \[0, 1, 0, 0, 0, 0\] looks like a 0/1 mask.*bool"):
        model.run_with_knockout(tokens(0), Knockout(layers=[0, 1], sources=torch.tensor([0, 1, 0, 0, 0, 0])))
    with pytest.raises(ValueError, match=r"targets: \[1, 0, 1\] looks like a 0/1 mask \(3 entries, where.*bool"):
        model.run_with_knockout(tokens(0), Knockout(layers=0, sources=[0], targets=[1, 0, 1]))
    with pytest.raises(ValueError, match=r"heads: \[1, 0, 0, 0\] looks like a 0/1 mask.*bool"):
        model.run_with_knockout(tokens(0), Knockout(layers=0, sources=[1], heads=torch.tensor([1, 0, 0, 0])))
    with pytest.raises(ValueError, match=r"heads: \[1, 0, 1\] looks like a 0/1 mask.*names heads \[0, 1\] more than once"):
        model.run_with_knockout(tokens(0), Knockout(layers=0, sources=[1], heads=[1, 0, 1]))
    # two entries are a union, not a mask: position 1 named by two one-token spans (an IOI prompt's
    # first token and S1), head 1 twice
    with torch.no_grad():
        for twice, once in ((dict(sources=[1, 1]), dict(sources=[1])), (dict(sources=[0, 0]), dict(sources=[0])),
                            (dict(sources=[2], heads=[1, 1]), dict(sources=[2], heads=[1]))):
            torch.testing.assert_close(model.run_with_knockout(tokens(0), Knockout(layers=[0, 1], **twice)),
                                       model.run_with_knockout(tokens(0), Knockout(layers=[0, 1], **once)))
    with pytest.raises(ValueError, match=r"must be 1-D, got shape \(2, 6\).*bool"):
        model.run_with_knockout(tokens(0), Knockout(layers=0, sources=torch.zeros(2, P, dtype=torch.long)))
    # the bool mask is read as a mask
    mask = torch.tensor([0, 1, 0, 0, 0, 0]).bool()
    with torch.no_grad():
        torch.testing.assert_close(model.run_with_knockout(tokens(0), Knockout(layers=[0, 1], sources=mask)),
                                   model.run_with_knockout(tokens(0), Knockout(layers=[0, 1], sources=[1])))


def test_a_position_named_twice_is_knocked_out_once(family):
    """Positions are a set: ``[3, -1]`` and ``[5, -1]`` at p = 6 name positions 3 and 5 once,
    as a hand-written ``hook_ssm_mask`` hook zeroing those edges does."""
    model = make_model(family)
    toks = tokens(0)

    def zero_edges(mask, hook):
        mask = mask.clone()
        mask[:, :, [3, P - 1], 1] = 0
        return mask

    with torch.no_grad():
        expected = model.run_with_hooks(toks, fwd_hooks=[(f"blocks.{l}.hook_ssm_mask", zero_edges) for l in (0, 1)])
        assert not torch.allclose(expected, model(toks))  # the edges matter
        for sources, targets in (([1, 1 - P], [3, P - 1, -1]), ([1], [-1, 3, 3])):
            got = model.run_with_knockout(toks, Knockout(layers=[0, 1], sources=sources, targets=targets))
            torch.testing.assert_close(got, expected, msg=f"sources={sources}, targets={targets}")
        feature = dict(channels=[2, 2, -1]) if family == "mamba1" else dict(heads=[1, 1 - model.cfg.n_heads])
        once = dict(channels=[2, model.cfg.d_inner - 1]) if family == "mamba1" else dict(heads=[1])
        torch.testing.assert_close(model.run_with_knockout(toks, Knockout(layers=0, sources=[1], **feature)),
                                   model.run_with_knockout(toks, Knockout(layers=0, sources=[1], **once)))


@pytest.mark.parametrize("kwargs, what", [
    (dict(sources=[1.7]), "sources"),
    (dict(sources=1.0), "sources"),
    (dict(sources=[1], targets=[torch.tensor(5.0)]), "targets"),
    (dict(sources=[1], heads=torch.tensor([0.5])), "heads"),
    (dict(sources=[1], heads=[1.2]), "heads"),
])
def test_float_positions_or_heads_raise_type_error(kwargs, what):
    with pytest.raises(TypeError, match=rf"Knockout {what}: .*integer"):
        Knockout(layers=0, **kwargs)


def test_float_channels_raise_type_error():
    with pytest.raises(TypeError, match="Knockout channels: .*integer"):
        Knockout(layers=0, sources=[1], channels=torch.tensor([3.5]))


def test_knockout_position_on_padding_warns_and_row_masks_match_the_prompt_alone(family):
    model = make_model(family)
    toks = tokens(4, b=2, p=7)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[1, :2] = 0  # row 1 is left-padded by 2
    with torch.no_grad():
        ko = Knockout(layers=[0, 1], sources=[0], targets=[-1], path="both")
        with pytest.warns(UserWarning, match=r"sources \[0\] in row 1 fall on padding.*with left padding, position 0"):
            model.run_with_knockout(toks, ko, attention_mask=attention_mask)
        with warnings.catch_warnings(record=True) as caught:  # once per Knockout
            warnings.simplefilter("always")
            model.run_with_knockout(toks, ko, attention_mask=attention_mask)
        assert not [w for w in caught if "padding" in str(w.message)]

        # each prompt's own first token, as the docstring says: no warning, and row 1 gets
        # what its prompt gets alone
        first = (attention_mask.cumsum(1) == 1) & (attention_mask == 1)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            padded = model.run_with_knockout(toks, Knockout(layers=[0, 1], sources=first, targets=[-1], path="both"),
                                             attention_mask=attention_mask)
        alone = model.run_with_knockout(toks[1:, 2:], Knockout(layers=[0, 1], sources=[0], targets=[-1], path="both"))
        torch.testing.assert_close(padded[1, -1], alone[0, -1], rtol=1e-4, atol=1e-5)


def test_knockout_attached_by_hand_warns_on_padding_too():
    """The check lives in the forward, so hooks from ko.hooks(model) attached with model.hooks
    warn as run_with_knockout does."""
    model = make_model("mamba2")
    attention_mask = torch.ones(B, P, dtype=torch.long)
    attention_mask[1, :3] = 0
    ko = Knockout(layers=1, sources=[1], targets=[-1])
    with torch.no_grad(), model.hooks(fwd_hooks=ko.hooks(model)):
        with pytest.warns(UserWarning, match=r"sources \[1\] in row 1 fall on padding"):
            model(tokens(0), attention_mask=attention_mask)


def test_knockout_target_on_right_padding_warns():
    model = make_model("mamba1")
    attention_mask = torch.ones(B, P, dtype=torch.long)
    attention_mask[0, -2:] = 0  # row 0 is right-padded
    with pytest.warns(UserWarning, match=r"targets \[5\] in row 0 fall on padding.*with right padding, position -1"):
        with torch.no_grad():
            model.run_with_knockout(tokens(0), Knockout(layers=0, sources=[1], targets=[-1]),
                                    attention_mask=attention_mask)


# --------------------------------------------------------------------------- attribution
def test_eap_with_a_detached_or_float_metric_says_so(family):
    model = make_model(family)
    graph = Graph.from_model(model)
    clean, corrupted = tokens(1), tokens(2)
    with pytest.raises(ValueError, match="detached"):
        attribute(model, graph, clean, corrupted, lambda lg: metric(lg).detach(), quiet=True)
    with pytest.raises(TypeError, match="Python number"):
        attribute(model, graph, clean, corrupted, lambda lg: float(metric(lg).mean().detach()), quiet=True)


class IdentitySAE(torch.nn.Module):
    def encode(self, a):
        return a

    def decode(self, f):
        return f


def test_feature_attribution_with_a_detached_metric_says_so():
    model = make_model("mamba1")
    saes = {"blocks.1.hook_resid_pre": IdentitySAE()}
    clean, corrupted = tokens(1), tokens(2)
    with pytest.raises(ValueError, match="detached"):
        feature_attribution(model, saes, clean, corrupted, lambda lg: metric(lg).detach(), quiet=True)
    with pytest.raises(ValueError, match="ig_steps"):
        feature_attribution(model, saes, clean, corrupted, metric, method="EAP-IG", ig_steps=2.5, quiet=True)


def test_eap_with_no_prompts_or_zero_ig_steps_raises(family):
    model = make_model(family)
    graph = Graph.from_model(model)
    clean, corrupted = tokens(1), tokens(2)
    with pytest.raises(ValueError, match="no prompts"):
        attribute(model, graph, clean[:0], corrupted[:0], metric, quiet=True)
    with pytest.raises(ValueError, match=r"ig_steps must be >= 1"):
        attribute(model, graph, clean, corrupted, metric, method="EAP-IG", ig_steps=0, quiet=True)


def test_batches_and_batch_size_are_checked_whatever_the_data_form():
    """batch_size is checked for a list of batches too (it used to be ignored there), labels=
    beside a dataloader is refused (its batches carry their own; it was ignored), and labels
    that batch_size cannot cut by prompt are named."""
    from tl_mamba.circuits import iter_batches
    from tl_mamba.circuits.eap import count_batches

    model = make_model("mamba2")
    graph = Graph.from_model(model)
    clean, corrupted = tokens(1, b=5), tokens(2, b=5)
    loader = [(clean, corrupted)]
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            attribute(model, graph, loader, None, metric, batch_size=bad, quiet=True)
    with pytest.raises(TypeError, match="labels= goes with token tensors"):
        attribute(model, graph, loader, None, lambda lg, lab: metric(lg), labels=torch.zeros(5, dtype=torch.long),
                  quiet=True)
    with pytest.raises(ValueError, match="got 4 labels for 5 prompts"):
        list(iter_batches([(clean, corrupted, [1, 2, 3, 4])], batch_size=2))
    with pytest.raises(TypeError, match="cannot split labels of type object"):
        list(iter_batches([(clean, corrupted, object())], batch_size=2))
    # labels with one entry per prompt are cut with the prompts (also inside a dict); a number,
    # shared by every prompt, goes to every chunk; a batch that fits is passed on as it is
    labels = {"good": torch.arange(5), "names": list("abcde"), "shared": 7}
    chunks = list(iter_batches([(clean, corrupted, labels, torch.ones_like(clean))], batch_size=2))
    assert [c.shape[0] for c, _, _, _ in chunks] == [2, 2, 1]
    assert [lab["names"] for _, _, lab, _ in chunks] == [["a", "b"], ["c", "d"], ["e"]]
    assert [lab["good"].tolist() for _, _, lab, _ in chunks] == [[0, 1], [2, 3], [4]]
    assert [lab["shared"] for _, _, lab, _ in chunks] == [7, 7, 7]
    assert [m.shape[0] for _, _, _, m in chunks] == [2, 2, 1]
    torch.testing.assert_close(torch.cat([k for _, k, _, _ in chunks]), corrupted)
    (whole,) = iter_batches([(clean, corrupted, object())], batch_size=5)
    assert whole[0] is clean
    # the progress bars count the chunks
    assert count_batches([(clean, corrupted), (clean[:2], corrupted[:2])], 2) == 3 + 1
    assert count_batches([(clean, corrupted), (clean[:2], corrupted[:2])]) == 2
    assert count_batches(clean, 2) == 3


def test_task_batches_checks_the_needle_options():
    import tl_mamba
    from tl_mamba.circuits import task_batches

    model = tl_mamba.from_pretrained("toy-mamba2")
    with pytest.raises(ValueError, match=r"\['depth', 'length'\] apply to task='needle' only"):
        task_batches(model, "ioi", n=2, length=64, depth=0.5)
    for bad, what in ((8, "outside"), (5000, "outside"), ((80, 40), "lo <= hi"), ((40, 60, 80), "one int or"),
                      (64.0, "an int or")):
        with pytest.raises(ValueError, match=what):
            task_batches(model, "needle", n=2, length=bad)
    with pytest.raises(ValueError, match="depth"):
        task_batches(model, "needle", n=2, length=32, depth=1.5)


def test_knockout_attribution_of_empty_prompts_raises(family):
    model = make_model(family)
    with pytest.raises(ValueError, match="no positions"):
        knockout_attribution(model, tokens(0)[:, :0], lambda lg: lg[:, -1, 0])


# ------------------------------------------------------------------------ hidden_attention
def test_hidden_attention_of_an_unbatched_cache_matches_the_batched_one(family):
    model = make_model(family)
    toks = tokens(5, b=1)
    _, cache = model.run_with_cache(toks)
    _, unbatched = model.run_with_cache(toks, remove_batch_dim=True)
    for layer in range(2):
        torch.testing.assert_close(model.hidden_attention(unbatched, layer), model.hidden_attention(cache, layer))
        torch.testing.assert_close(model.conv_attention(unbatched, layer), model.conv_attention(cache, layer))


def test_hidden_attention_of_a_cut_cache_raises(family):
    model = make_model(family)
    toks = tokens(6)
    for pos_slice in (-1, slice(2, None)):
        _, cache = model.run_with_cache(toks, pos_slice=pos_slice)
        with pytest.raises(ValueError, match="whole sequence.*pos_slice"):
            model.hidden_attention(cache, 0)
        with pytest.raises(ValueError, match="whole sequence.*pos_slice"):
            model.conv_attention(cache, 1)
    # a prefix is a whole (shorter) sequence: its α is the prefix's own
    _, prefix = model.run_with_cache(toks, pos_slice=slice(0, 4))
    torch.testing.assert_close(model.hidden_attention(prefix, 1), model.hidden_attention(toks[:, :4], 1))


def test_float_layers_and_heads_are_refused_not_truncated():
    """layers=[1.5] used to be read as layer 1 (Knockout and knockout_attribution), and
    heads=[0.5] as head 0."""
    model = make_model("mamba2")
    with pytest.raises(TypeError, match=r"Knockout layers: integer layers needed, got 1\.5"):
        Knockout(layers=[1.5], sources=[0], targets=[-1])
    with pytest.raises(TypeError, match=r"knockout_attribution layers: integer layers needed"):
        knockout_attribution(model, tokens(0), lambda lg: lg[:, -1, 0], layers=[1.5])
    with pytest.raises(TypeError, match=r"knockout_attribution heads: integer heads needed"):
        knockout_attribution(model, tokens(0), lambda lg: lg[:, -1, 0], heads=[0.5])
    assert Knockout(layers=torch.tensor([0, 1]), sources=[0], targets=[-1]).resolved_layers(2) == [0, 1]
    # hidden_attention read heads=[1.9] as head 1 and heads=[True] as head 1; ablate's layers=1.0 failed
    # on iterating a float; every tool raises the shared NotAnIndexError / OutOfRangeError
    from tl_mamba import NotAnIndexError, OutOfRangeError
    from tl_mamba.circuits import ablate

    for heads in ([1.9], [True], torch.tensor([1.0])):
        with pytest.raises(NotAnIndexError, match="hidden_attention heads: "):
            model.hidden_attention(tokens(0), 0, heads=heads)
    with pytest.raises(NotAnIndexError, match="conv_attention channels: "):
        make_model("mamba1").conv_attention(tokens(0), 0, channels=[2.5])
    with pytest.raises(NotAnIndexError, match="layers must be ints, got 1.0"):
        ablate(model, tokens(0), "y", layers=1.0)
    _, cache = model.run_with_cache(tokens(0))
    for method in ("accumulated_resid", "decompose_resid"):  # a KeyError for a missing hook, before
        with pytest.raises(OutOfRangeError, match=rf"{method}: layer must be in \[0, 2\]"):
            getattr(cache, method)(layer=99)
        with pytest.raises(NotAnIndexError):
            getattr(cache, method)(layer=1.0)
    assert issubclass(OutOfRangeError, IndexError) and issubclass(OutOfRangeError, ValueError)
    assert issubclass(NotAnIndexError, TypeError) and issubclass(NotAnIndexError, ValueError)


def test_logit_diff_checks_its_labels_against_the_logits():
    """logit_diff is the metric every circuit recipe builds on: labels for fewer prompts, a third
    column, float or out-of-vocabulary ids raise instead of scoring a subset of the prompts."""
    from tl_mamba.circuits import logit_diff

    logits = torch.randn(3, 4, 10, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[1, 2], [9, 0], [4, 4]])
    expected = torch.stack([logits[i, -1, int(a)] - logits[i, -1, int(b)] for i, (a, b) in enumerate(labels)])
    torch.testing.assert_close(logit_diff(logits, labels), expected)
    for bad, error, message in [
        (labels[:1], ValueError, "1 label rows for 3 prompts"),
        (torch.cat([labels, labels[:, :1]], 1), ValueError, r"labels \[b, 2\].*\[3, 3\]"),
        (labels[:, 0], ValueError, r"labels \[b, 2\].*\[3\]"),
        (labels.float(), TypeError, "integer token ids"),
        (labels + 5, ValueError, r"\[0, 10\).*from 5 to 14"),
        ([[1, 2]] * 3, ValueError, "labels.*got list"),
    ]:
        with pytest.raises(error, match=message):
            logit_diff(logits, bad)
    with pytest.raises(ValueError, match=r"logits \[b, p, v\].*\[3, 10\]"):
        logit_diff(logits[:, -1], labels)
    # attention_mask: each row's last real token (right padding), by hand
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    ends = [3, 1, 0]
    expected = torch.stack([logits[i, ends[i], int(a)] - logits[i, ends[i], int(b)] for i, (a, b) in enumerate(labels)])
    torch.testing.assert_close(logit_diff(logits, labels, attention_mask=mask), expected)
    with pytest.raises(ValueError, match=r"attention_mask must be \[b, p\]"):
        logit_diff(logits, labels, attention_mask=mask[:, :3])
    with pytest.raises(ValueError, match="no real token"):
        logit_diff(logits, labels, attention_mask=mask * torch.tensor([[1], [1], [0]]))


# ------------------------------------------------- blind bad-input pass: silent or cryptic inputs
def test_channel_groups_that_do_not_divide_d_inner_raise_everywhere():
    """patch_channel_groups / patch_heads / delta_stats_by_class split d_inner=32 into 3 unequal
    groups silently, though Graph.from_model refuses the same G: one check for all of them."""
    from tl_mamba.circuits import delta_stats_by_class, patch_channel_groups

    model = make_model("mamba1")  # d_inner 32
    clean, corrupted = tokens(1), tokens(2)
    calls = [
        lambda: patch_channel_groups(model, clean, corrupted, metric, 3, progress=False),
        lambda: patch_heads(model, clean, corrupted, metric, channel_groups=7, progress=False),
        lambda: delta_stats_by_class(model, clean, {"bos": "bos"}, channel_groups=3, progress=False),
        lambda: Graph.from_model(model, "head", channel_groups=3),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"does not divide d_inner=32 into equal groups; divisors of 32 near it"):
            call()
    assert patch_channel_groups(model, clean, corrupted, metric, 4, progress=False).shape == (2, 4, B)


def test_top_edges_with_a_negative_count_raises():
    """top_edges(-3) returned every edge but the last three (a negative slice)."""
    graph = Graph.from_model(make_model("mamba2"))
    graph.scores = torch.arange(len(graph.edges), dtype=torch.float32)
    for kwargs in ({}, {"only_in_graph": True}):
        with pytest.raises(ValueError, match=r"k must be >= 0 \(the number of edges to return\), got -3"):
            graph.top_edges(-3, **kwargs)
        assert graph.top_edges(0, **kwargs) == []
    assert len(graph.top_edges(2)) == 2


def test_token_class_ids_outside_the_vocabulary_raise():
    """Ids >= d_vocab (or < 0) made an empty class silently."""
    from tl_mamba.circuits import token_class_mask

    model = make_model("mamba2")  # d_vocab 50
    for bad in ([99999], 99999, torch.tensor([3, 50]), [-1, 4]):
        with pytest.raises(ValueError, match=r"token_class ids \[(99999|50|-1)\] are outside the vocabulary "
                                             r"\(d_vocab=50"):
            token_class_mask(model, tokens(0), bad)
    assert token_class_mask(model, tokens(0), [3, 49]).shape == (B, P)


def test_eap_with_a_nan_metric_raises_naming_the_value(family):
    """A NaN metric gave NaN scores for every edge, with no warning."""
    model = make_model(family)
    clean, corrupted = tokens(1), tokens(2)
    with pytest.raises(ValueError, match=r"metric returned nan for prompt\(s\) \[1\].*every attribution score"):
        attribute(model, Graph.from_model(model), clean, corrupted,
                  lambda lg: metric(lg) * torch.tensor([1.0, float("nan")]), quiet=True)
    with pytest.raises(ValueError, match=r"metric returned -?inf: its gradient"):  # a scalar metric
        attribute(model, Graph.from_model(model), clean, corrupted, lambda lg: metric(lg).mean() / 0.0,
                  method="EAP-IG", ig_steps=2, quiet=True)


def test_a_corrupted_baseline_without_corrupted_prompts_raises():
    from tl_mamba.circuits import evaluate_baseline

    model = make_model("mamba2")
    with pytest.raises(ValueError, match=r"evaluate_baseline\(run_corrupted=True\) runs the corrupted prompts, but corrupted is None"):
        evaluate_baseline(model, tokens(1), None, metric, run_corrupted=True)
    clean = evaluate_baseline(model, tokens(1), None, metric)  # the clean baseline needs none
    with torch.no_grad():
        torch.testing.assert_close(clean, metric(model(tokens(1))))


def test_parallel_lists_of_batches_of_different_lengths_raise(family):
    from tl_mamba.circuits import evaluate_baseline

    model = make_model(family)
    clean = [tokens(1), tokens(2), tokens(3)]
    with pytest.raises(ValueError, match=r"clean has more batches than corrupted \(corrupted ends after 2\)"):
        attribute(model, Graph.from_model(model), clean, clean[:2], metric)
    with pytest.raises(ValueError, match="corrupted has more batches than clean"):
        evaluate_baseline(model, clean[:2], clean, metric)
    paired = evaluate_baseline(model, clean, [tokens(4), tokens(5), tokens(6)], metric)  # equal lengths: as before
    assert paired.shape == (3 * B,)


def test_single_indices_are_refused_with_the_index_errors_not_truncated(tmp_path):
    """quickstart.md promises OutOfRangeError / NotAnIndexError for an out-of-range or
    non-integer layer, head or position given to the tools (2026-12-07 docs audit)."""
    from tl_mamba.circuits import knockout_attribution_vs_knockout, plot_knockout_attribution, resample_ablation_hooks
    from tl_mamba.errors import NotAnIndexError, OutOfRangeError
    from tl_mamba.experiments import features_by_decay

    model = make_model("mamba2")
    scores = torch.zeros(1, model.cfg.n_heads, P, P)
    with pytest.raises(OutOfRangeError, match="head 9"):
        plot_knockout_attribution(scores, tmp_path, head=9)
    with pytest.raises(NotAnIndexError, match="head"):
        plot_knockout_attribution(scores, tmp_path, head=1.5)
    with pytest.raises(NotAnIndexError, match="layer"):
        features_by_decay(model, 1.5)
    with pytest.raises(OutOfRangeError, match="layer 9"):
        features_by_decay(model, 9)
    prompts = tokens(0)
    for kwargs, error, pattern in (
            (dict(layer=0, target=1.5), NotAnIndexError, "^target must be an integer"),
            (dict(layer=0, sources=[2.7, 3.2]), NotAnIndexError, "sources"),
            (dict(layer=9), OutOfRangeError, r"^layer 9"),
            (dict(layer=1.5), NotAnIndexError, r"^layer")):
        with pytest.raises(error, match=pattern):
            knockout_attribution_vs_knockout(model, prompts, metric, progress=False, **kwargs)
    with pytest.raises(NotAnIndexError, match="source_rows"):
        resample_ablation_hooks(model, "y", prompts, layers=[0], source_rows=[0, 1.5])


def test_reference_and_source_masks_are_named_in_their_errors():
    from tl_mamba.circuits import class_conditional_ablation_hooks, mean_ablation_hooks, resample_ablation_hooks

    model = make_model("mamba2")
    prompts, bad = tokens(0), torch.ones(3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="^reference_attention_mask must have"):
        mean_ablation_hooks(model, "y", prompts, layers=[0], reference_attention_mask=bad)
    with pytest.raises(ValueError, match="^source_attention_mask must have"):
        resample_ablation_hooks(model, "y", prompts, layers=[0], source_attention_mask=bad)
    with pytest.raises(ValueError, match="^reference_attention_mask must have"):
        class_conditional_ablation_hooks(model, prompts, {0: [0]}, token_class=[5], kind="mean",
                                         reference_tokens=prompts, reference_attention_mask=bad)


def test_similarity_by_class_on_a_hook_without_heads_names_hook():
    from tl_mamba.circuits import similarity_by_class

    with pytest.raises(ValueError, match=r"similarity_by_class\(hook='B'\): hook_B has no head axis"):
        similarity_by_class(make_model("mamba2"), tokens(0), {"a": [5]}, hook="B", progress=False)


def test_hidden_attention_of_a_cache_refuses_an_attention_mask(family):
    from tl_mamba import conv_attention, hidden_attention

    model = make_model(family)
    _, cache = model.run_with_cache(tokens(0))
    for fn in (hidden_attention, conv_attention):
        with pytest.raises(ValueError, match="attention_mask goes with token or text input"):
            fn(model, cache, 0, attention_mask=torch.ones(B, P, dtype=torch.long))


def test_a_metric_that_cannot_take_the_labels_says_how_it_is_called(family):
    model = make_model(family)
    clean, corrupted = tokens(0), tokens(1)
    labels = torch.tensor([[5, 6], [6, 5]])
    graph = Graph.from_model(model, "layer")
    with pytest.raises(TypeError, match=r"cannot be called as metric\(logits, labels\): these data carry labels"):
        attribute(model, graph, clean, corrupted, metric, labels=labels, quiet=True)

    def needs_labels(logits, labels):
        return logits[:, -1, 5]

    with pytest.raises(TypeError, match=r"cannot be called as metric\(logits\): these data have no labels"):
        attribute(model, graph, clean, corrupted, needs_labels, quiet=True)

    def broken(logits, labels):  # a TypeError of the metric's own is left as it is
        return logits[:, -1, 5] + "x"

    with pytest.raises(TypeError, match="unsupported operand"):
        attribute(model, graph, clean, corrupted, broken, labels=labels, quiet=True)


def test_the_mask_hook_has_no_position_to_ablate(family):
    """hook_ssm_mask, [b, 1, p, p] for Mamba-1 and [b, h, p, p] for Mamba-2, has no position axis:
    ablating it at positions is refused with the family's own shape and what to use instead."""
    from tl_mamba.circuits import zero_ablation_hooks

    model = make_model(family)
    shape = "[b, 1, p, p]" if model.cfg.family == "mamba1" else "[b, h, p, p]"
    with pytest.raises(ValueError, match=rf"hook_ssm_mask {re.escape(shape)} has no position axis.*Knockout"):
        zero_ablation_hooks(model, "ssm_mask", positions=[1])
