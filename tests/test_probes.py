"""similarity_by_class (tl_mamba.circuits.probes) against cosine matrices built position by
position from a cache, with torch.nn.functional.cosine_similarity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig
from tl_mamba.circuits import similarity_by_class

V = 30


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


def tiny(family):
    if family == "mamba1":
        model = HookedMamba(HookedMambaConfig(n_layers=2, d_model=16, d_vocab=V, d_state=4, expand=2, seed=1))
    else:
        model = HookedMamba2(HookedMambaConfig(family="mamba2", n_layers=2, d_model=16, d_vocab=V, d_state=4,
                                               expand=2, n_heads=4, n_groups=2, chunk_size=4, seed=1))
    return model.double()


def brute_force(vectors, mask_a, mask_b, same):
    """Mean pairwise cosine and cosine of the means, from the explicit [n_a, n_b] matrix."""
    va, vb = vectors[mask_a], vectors[mask_b]  # [n, D]
    cos = F.cosine_similarity(va[:, None], vb[None], dim=-1, eps=1e-300)
    cos = torch.where((va.norm(dim=-1)[:, None] > 0) & (vb.norm(dim=-1)[None] > 0), cos, torch.zeros_like(cos))
    if same:
        off = ~torch.eye(len(va), dtype=torch.bool)
        return float(cos[off].mean()) if len(va) > 1 else math.nan, math.nan
    return float(cos.mean()), float(F.cosine_similarity(va.mean(0), vb.mean(0), dim=0))


@pytest.mark.filterwarnings("ignore:similarity_by_class. class 'bos' holds")  # (its BOS are all at position 0)
@pytest.mark.parametrize("family, hook, extra", [("mamba2", "y", {}), ("mamba2", "h", {}),
                                                 ("mamba2", "y_normed", {}),
                                                 ("mamba1", "x", {"channel_groups": 4}), ("mamba1", "h", {})])
def test_matches_explicit_cosine_matrices(family, hook, extra):
    model = tiny(family)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, V, (3, 9), generator=g)
    tokens[:, 0] = 1  # a "bos" class
    tokens[0, 4] = tokens[2, 6] = 2  # a "two" class
    mask = torch.ones_like(tokens)
    mask[1, :2] = 0  # left padding: in no class
    tokens[1, :2] = 2  # (padding tokens of the "two" class must not count)
    classes = {"bos": [1], "two": [2]}
    df = similarity_by_class(model, tokens, classes, hook=hook, attention_mask=mask, batch_size=2, progress=False,
                             **extra)
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n.endswith(f"hook_{hook}"))
    real = mask.bool()
    masks = {"bos": (tokens == 1) & real, "two": (tokens == 2) & real}
    masks["other"] = real & ~masks["bos"] & ~masks["two"]
    groups = extra.get("channel_groups", 1) if family == "mamba1" else None
    n_units = groups if family == "mamba1" else model.cfg.n_heads
    assert len(df) == model.cfg.n_layers * n_units * 6  # 3 classes: 6 pairs a <= b
    for layer in range(model.cfg.n_layers):
        act = cache[f"blocks.{layer}.hook_{hook}"].double()
        if family == "mamba2":
            act = act.reshape(*act.shape[:2], model.cfg.n_heads, -1)  # y_normed [b, p, e]: head-major
        else:
            act = act.reshape(*act.shape[:2], groups, -1)
        for unit in range(n_units):
            for a, b in itertools.combinations_with_replacement(["bos", "two", "other"], 2):
                row = df[(df.layer == layer) & (df["head"] == unit) & (df.class_a == a) & (df.class_b == b)]
                assert len(row) == 1
                mean_cos, of_means = brute_force(act[:, :, unit], masks[a], masks[b], a == b)
                assert row.count_a.item() == int(masks[a].sum()) and row.count_b.item() == int(masks[b].sum())
                assert row.mean_cosine.item() == pytest.approx(mean_cos, rel=1e-9, abs=1e-12, nan_ok=True)
                assert row.cosine_of_means.item() == pytest.approx(of_means, rel=1e-9, abs=1e-12, nan_ok=True)
    assert df.mean_cosine.std() > 0.01  # the heads and classes differ


def test_identical_vectors_and_errors():
    """A hook that writes one vector at every BOS makes the BOS-BOS mean cosine 1 and the
    BOS-other cosine that of the vectors; errors name the problem."""
    model = tiny("mamba2")
    tokens = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(1))
    tokens[:, [0, 3]] = 1
    direction = torch.randn(model.cfg.d_head, generator=torch.Generator().manual_seed(2)).double()

    def write(y, hook):
        y = y.clone()
        y[tokens == 1] = direction  # every head, at every BOS
        y[tokens != 1] = -direction
        return y

    with model.hooks(fwd_hooks=[("blocks.0.hook_y", write)]), \
            pytest.warns(UserWarning, match="class 'bos' holds the same activation at each of its positions"):
        df = similarity_by_class(model, tokens, {"bos": [1]}, layers=[0], progress=False)
    same = df[(df.class_a == "bos") & (df.class_b == "bos")]
    cross = df[(df.class_a == "bos") & (df.class_b == "other")]
    assert same.mean_cosine.tolist() == pytest.approx([1.0] * 4)
    assert cross.mean_cosine.tolist() == pytest.approx([-1.0] * 4)
    assert cross.cosine_of_means.tolist() == pytest.approx([-1.0] * 4)
    with pytest.raises(ValueError, match="has no head axis"):
        similarity_by_class(model, tokens, {"bos": [1]}, hook="B")
    with pytest.raises(ValueError, match="channel_groups apply to Mamba-1"):
        similarity_by_class(model, tokens, {"bos": [1]}, channel_groups=2)
    with pytest.raises(ValueError, match="non-empty mapping"):
        similarity_by_class(model, tokens, {})
    with pytest.raises(ValueError, match="named 'other'"):
        similarity_by_class(model, tokens, {"other": [1]})


@pytest.mark.filterwarnings("ignore:similarity_by_class. class 'bos' holds")
def test_inferred_padding_and_repeated_layers():
    """Without an attention_mask, a model that pads on the left leaves out the padding its forward
    infers from pad tokens (as with the mask given); a layer named twice counts once. Both for
    similarity_by_class and for delta_stats_by_class, which share the class masks."""
    import tl_mamba
    from tl_mamba.circuits import delta_stats_by_class

    model = tl_mamba.from_pretrained("toy-mamba2")
    model.cfg.default_padding_side = "left"
    model.tokenizer.padding_side = "left"
    tokens, mask = model.to_tokens(["key 1 is 2", "key 3 is 4 key 5 is 6 key 7 is 8"], padding_side="left",
                                   return_attention_mask=True)
    assert not bool(mask.all())  # the first prompt is padded
    for fn in (similarity_by_class, delta_stats_by_class):
        inferred = fn(model, tokens, {"bos": "bos"}, layers=[0], progress=False)
        given = fn(model, tokens, {"bos": "bos"}, layers=[0], attention_mask=mask, progress=False)
        assert inferred.equals(given), fn.__name__
        counts = inferred["count_a" if fn is similarity_by_class else "count"]
        assert counts.max() < int(mask.sum())  # "other" counts real tokens only
        twice = fn(model, tokens, {"bos": "bos"}, layers=[0, -4], attention_mask=mask, progress=False)
        assert twice.equals(given), fn.__name__
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        similarity_by_class(model, tokens, {"bos": "bos"}, batch_size=0)


def test_a_class_of_one_context_is_named():
    """A BOS at position 0 of every prompt has one context, so one activation: its within-class cosine
    is 1 in every head by construction (a researcher copying the study's BOS probe read it as a
    detection score). A class whose positions have other contexts is not warned about."""
    import warnings

    model = tiny("mamba2")
    tokens = torch.randint(3, V, (3, 7), generator=torch.Generator().manual_seed(4))
    tokens[:, 0] = 1
    with pytest.warns(UserWarning, match="class 'bos' holds the same activation"):
        df = similarity_by_class(model, tokens, {"bos": [1]}, progress=False)
    same = df[(df.class_a == "bos") & (df.class_b == "bos")]
    assert same.mean_cosine.min() == pytest.approx(1.0, abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # one value per head (hook_delta, softplus: positive): every cosine is 1, yet the values differ
        delta = similarity_by_class(model, tokens, {"some": list(range(5, 11))}, hook="delta", progress=False)
        assert delta.mean_cosine.dropna().min() == pytest.approx(1.0)
        tokens[1, 0] = 5  # one prompt starts otherwise, and a BOS later in another: contexts differ
        tokens[2, 3] = 1
        df = similarity_by_class(model, tokens, {"bos": [1]}, progress=False)
    assert df[(df.class_a == "bos") & (df.class_b == "bos")].mean_cosine.min() < 1 - 1e-6
