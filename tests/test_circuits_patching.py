"""Patching and ablation helpers (tl_mamba.circuits.patching / .ablation) against independent references.

References: transformer_lens.patching (its own loop, one patch per forward), the
model's recurrent decoding path with a hand-built state (for hook_h patching),
hand-written hooks, and statistics computed by hand from a cache.
"""

from __future__ import annotations

import json
import math
import warnings
from importlib import resources

import pandas as pd
import pytest
import torch

from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig, Knockout
from tl_mamba.circuits.ablation import (
    ablate,
    class_conditional_ablation_hooks,
    class_conditional_hook_factory,
    delta_stats_by_class,
    mean_ablation_hooks,
    mean_activations,
    needle_accuracy,
    resample_ablation_hooks,
    token_class_mask,
    zero_ablation_hooks,
)
from tl_mamba.circuits.patching import patch_channel_groups, patch_heads, patch_layer_position
from tl_mamba.models.base import RecurrentState

B, P, V = 2, 7, 50


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)


def make_model(family: str, seed: int = 0):
    if family == "mamba1":
        cfg = HookedMambaConfig(n_layers=2, d_model=16, d_vocab=V, d_state=4, d_conv=4, expand=2, seed=seed)
        model = HookedMamba(cfg)
    else:
        cfg = HookedMambaConfig(family="mamba2", n_layers=2, d_model=16, d_vocab=V, d_state=4, d_conv=4,
                                expand=2, n_heads=4, n_groups=2, chunk_size=4, seed=seed)
        model = HookedMamba2(cfg)
    gen = torch.Generator().manual_seed(1000 + seed)  # the same model whichever tests ran before
    with torch.no_grad():  # move weights off their init so every path carries signal
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype).to(param.device) * 0.2)
    model.set_backend("torch")
    return model.double()


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {family: make_model(family) for family in ("mamba1", "mamba2")}


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(1, V, (B, P), generator=g)
    clean[:, 0] = 0  # BOS
    corrupted = clean.clone()
    corrupted[:, 2] = (clean[:, 2] + 7) % (V - 1) + 1
    corrupted[:, 4] = (clean[:, 4] + 11) % (V - 1) + 1
    return clean, corrupted


def metric(logits):
    return logits[:, -1, 5].mean() - logits[:, -1, 9].mean()


def tl_patch(model, corrupted, cache, setter, act, axes=None, index_df=None):
    from transformer_lens.patching import generic_activation_patch

    return generic_activation_patch(model, corrupted, cache, metric, setter, act, index_axis_names=axes,
                                    index_df=index_df).double()


# --------------------------------------------------------------- layer x position
@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_resid_pre_equals_transformer_lens(models, pair, family):
    from transformer_lens.patching import get_act_patch_resid_pre

    model = models[family]
    clean, corrupted = pair
    _, cache = model.run_with_cache(clean)
    expected = get_act_patch_resid_pre(model, corrupted, cache, metric).double()
    # batch_size 5: two patches per forward, and a last forward with one
    got = patch_layer_position(model, clean, corrupted, metric, hook="resid_pre", batch_size=5, progress=False)
    assert got.shape == (2, P)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)
    assert got.abs().max() > 1e-3  # the patches do something
    # a subset of layers and positions, negative indices, the hook spelled in full
    sub = patch_layer_position(model, clean, corrupted, metric, hook="hook_resid_pre", layers=[-1],
                               positions=[4, -1], progress=False)
    torch.testing.assert_close(sub, expected[[1]][:, [4, P - 1]], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("hook", ["resid_pre", "h"])
def test_named_per_row_position_sets(models, pair, family, hook):
    """``positions={"name": bool [b, p]}``: each prompt patched at its own positions (a token's place
    differs across templates), one column per name. Against hand-written hooks that copy the clean
    activation row by row; a set with the same column in every row equals that column patched."""
    model = models[family]
    clean, corrupted = pair
    name = f"blocks.{{}}.hook_{hook}"
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith(f"hook_{hook}"))
    first, second = torch.zeros(B, P, dtype=torch.bool), torch.zeros(B, P, dtype=torch.bool)
    for row in range(B):  # a different place in every row; the second set holds two positions per row
        first[row, 1 + row % (P - 1)] = True
        second[row, [2, 4 + row % (P - 4)]] = True
    same = torch.zeros(B, P, dtype=torch.bool)
    same[:, 4] = True
    sets = {"first": first, "second": second, "same": same.int()}
    got = patch_layer_position(model, clean, corrupted, metric, hook=hook, positions=sets, batch_size=5,
                               progress=False)
    assert got.shape == (2, 3)

    def by_hand(layer, mask):
        def hook_fn(act, hook):
            act = act.clone()
            for row in range(B):
                for pos in mask[row].nonzero()[:, 0].tolist():
                    act[row, pos] = cache[name.format(layer)][row, pos]
            return act

        with torch.no_grad():
            return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name.format(layer), hook_fn)])))

    for layer in range(2):
        for column, mask in enumerate((first, second, same)):
            assert float(got[layer, column]) == pytest.approx(by_hand(layer, mask), rel=1e-9, abs=1e-12)
    by_column = patch_layer_position(model, clean, corrupted, metric, hook=hook, positions=[4], progress=False)
    torch.testing.assert_close(got[:, 2:], by_column, rtol=1e-12, atol=1e-12)
    assert (got[:, 0] - got[:, 1]).abs().max() > 1e-6  # the sets differ in effect
    for bad, message in (({}, "empty dict"), ({"s": first[:, :-1]}, r"positions\['s'\] must be a bool mask of"),
                         ({"s": first.double()}, r"positions\['s'\] must be a bool mask \(or 0 / 1\)")):
        with pytest.raises(ValueError, match=message):
            patch_layer_position(model, clean, corrupted, metric, hook=hook, positions=bad, progress=False)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_per_prompt_metric_gives_each_prompt_its_own_patch_result(models, pair, family):
    """A metric returning [b] adds a last axis: prompt k's value equals patching prompt k on
    its own (a batch of one; TransformerLens's patching with a scalar metric as the reference)."""
    from transformer_lens.patching import get_act_patch_resid_pre

    model = models[family]
    clean, corrupted = pair
    per_prompt = patch_layer_position(model, clean, corrupted, lambda logits: logits[:, -1, 5] - logits[:, -1, 9],
                                      hook="resid_pre", batch_size=5, progress=False)
    assert per_prompt.shape == (2, P, B)
    for k in (0, B - 1):
        _, cache = model.run_with_cache(clean[k:k + 1])
        alone = get_act_patch_resid_pre(model, corrupted[k:k + 1], cache, metric).double()
        torch.testing.assert_close(per_prompt[..., k], alone, rtol=1e-6, atol=1e-8)
    assert float((per_prompt[..., 0] - per_prompt[..., B - 1]).abs().max()) > 1e-3  # prompts differ
    # a batch of one prompt keeps its prompt axis ([1] is one value per prompt, not a scalar)
    one = patch_layer_position(model, clean[:1], corrupted[:1], lambda logits: logits[:, -1, 5] - logits[:, -1, 9],
                               hook="resid_pre", progress=False)
    assert one.shape == (2, P, 1)
    torch.testing.assert_close(one[..., 0], per_prompt[..., 0], rtol=1e-6, atol=1e-8)
    if family == "mamba2":
        heads = patch_heads(model, clean, corrupted, lambda logits: logits[:, -1, 5], hook="y", progress=False)
        assert heads.shape == (2, model.cfg.n_heads, B)
        # prompt k's entry: its corrupted run with that head's hook_y (every position) from its clean run
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_y"))
        for layer, head, k in ((0, 0, 0), (1, model.cfg.n_heads - 1, B - 1)):
            def patch(y, hook, head=head, k=k):
                y = y.clone()
                y[:, :, head] = clean_cache[hook.name][k:k + 1, :, head]
                return y

            with torch.no_grad():
                hand = model.run_with_hooks(corrupted[k:k + 1], fwd_hooks=[(f"blocks.{layer}.hook_y", patch)])
            torch.testing.assert_close(heads[layer, head, k], hand[0, -1, 5].double(), rtol=1e-6, atol=1e-8)
        assert float((heads[..., 0] - heads[..., B - 1]).abs().max()) > 1e-3  # prompts differ
    with pytest.raises(ValueError, match="one value per prompt"):
        patch_layer_position(model, clean, corrupted, lambda logits: logits[:, -1, :2], progress=False)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_other_hooks_equal_transformer_lens(models, pair, family):
    from transformer_lens.patching import layer_pos_patch_setter

    model = models[family]
    clean, corrupted = pair
    names = lambda n: n.endswith(("hook_delta", "hook_B", "hook_h"))  # noqa: E731
    _, cache = model.run_with_cache(clean, names_filter=names)
    for hook in ("delta", "B", "h"):
        expected = tl_patch(model, corrupted, cache, layer_pos_patch_setter, hook, ["layer", "pos"])
        got = patch_layer_position(model, clean, corrupted, metric, hook=hook, progress=False, batch_size=64)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8, msg=hook)
        # positions 0 and 1 precede the corruption: patching them changes nothing
        base = float(metric(model(corrupted).detach()))
        torch.testing.assert_close(got[:, :2], torch.full((2, 2), base, dtype=torch.float64))
        assert (got[:, 2:] - base).abs().max() > 1e-4, hook


def state_continuation_patch(model, clean_cache, corrupted, layer, t):
    """Logits at positions t.. of the corrupted run whose layer-``layer`` state after step t is the
    clean one, via the recurrent decoding path: decode up to t-1, then choose the state entering
    step t so that the update h_t = exp(ΔA) h_{t-1} + Δ B x (written out here from hooked Δ, B, x)
    lands exactly on the clean h_t."""
    cfg = model.cfg
    _, cc = model.run_with_cache(corrupted, names_filter=lambda n: n.startswith(f"blocks.{layer}."))
    pre = f"blocks.{layer}."
    delta, Bm, x = cc[pre + "hook_delta"][:, t], cc[pre + "hook_B"][:, t], cc[pre + "hook_x"][:, t]
    A = -torch.exp(model.blocks[layer].mixer.A_log.double())
    h_clean = clean_cache[pre + "hook_h"][:, t]
    if cfg.family == "mamba1":  # h [b, e, n]; delta, x [b, e]; B [b, n]; A [e, n]
        decay = torch.exp(delta[:, :, None] * A)
        write = delta[:, :, None] * Bm[:, None, :] * x[:, :, None]
    else:  # h [b, h, hd, n]; delta [b, h]; x [b, h, hd]; B [b, g, n]; A [h]
        Bh = Bm.repeat_interleave(cfg.n_heads // cfg.n_groups, dim=1)  # [b, h, n]
        decay = torch.exp(delta * A)[:, :, None, None]
        write = delta[:, :, None, None] * x[:, :, :, None] * Bh[:, :, None, :]
    state = RecurrentState.empty(cfg.n_layers)
    with torch.no_grad():
        model(corrupted[:, :t], state=state)
        state.layers[layer]["ssm"] = (h_clean - write) / decay
        return model(corrupted[:, t:], state=state)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_state_patch_equals_recurrent_continuation(models, pair, family):
    model = models[family]
    clean, corrupted = pair
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_h"))
    got = patch_layer_position(model, clean, corrupted, metric, hook="hook_h", clean_cache=cache, progress=False)
    for layer in range(2):
        for t in (2, 3, 5):
            logits = state_continuation_patch(model, cache, corrupted, layer, t)
            assert got[layer, t].item() == pytest.approx(float(metric(logits)), rel=1e-6, abs=1e-8)
    assert (got[:, 2:] - got[:, :1]).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_state_patches_run_in_smaller_forwards(models, pair, family, monkeypatch):
    """hook_h patches hold the states and a comparison scan per row, so a forward takes at most
    STATE_PATCH_BYTES of states (here: one copy of the batch); the values are those of the
    recurrent continuation (test above), whatever the rows per forward."""
    import tl_mamba.circuits.patching as patching_module

    model = models[family]
    clean, corrupted = pair
    rows = []
    record = ("hook_embed", lambda act, hook: rows.append(act.shape[0]))
    with model.hooks(fwd_hooks=[record]):
        wide = patch_layer_position(model, clean, corrupted, metric, hook="h", positions=[2, 5], progress=False)
        assert max(rows) == 2 * 2 * B  # 4 patches of a B-row batch, in one forward
        rows.clear()
        monkeypatch.setattr(patching_module, "STATE_PATCH_BYTES", 1)
        narrow = patch_layer_position(model, clean, corrupted, metric, hook="h", positions=[2, 5], progress=False)
    assert set(rows[1:]) == {B}  # (the first forward caches the clean states)
    torch.testing.assert_close(narrow, wide, rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------------- heads
def test_heads_equal_transformer_lens(models, pair):
    from transformer_lens.patching import layer_head_vector_patch_setter, layer_pos_head_vector_patch_setter

    model = models["mamba2"]
    clean, corrupted = pair
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith(("hook_y", "hook_delta", "hook_h")))
    for hook in ("y", "delta"):
        expected = tl_patch(model, corrupted, cache, layer_head_vector_patch_setter, hook, ["layer", "head"])
        got = patch_heads(model, clean, corrupted, metric, hook=hook, batch_size=6, progress=False)
        assert got.shape == (2, 4)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8, msg=hook)
    expected = tl_patch(model, corrupted, cache, layer_pos_head_vector_patch_setter, "y", ["layer", "pos", "head"])
    got = patch_heads(model, clean, corrupted, metric, hook="y", per_position=True, progress=False)
    assert got.shape == (2, 4, P)
    torch.testing.assert_close(got, expected.permute(0, 2, 1), rtol=1e-6, atol=1e-8)
    # the state of chosen heads at chosen positions
    index_df = pd.DataFrame([(1, t, h) for h in (0, 2) for t in (2, 5)], columns=["layer", "pos", "head"])
    expected = tl_patch(model, corrupted, cache, layer_pos_head_vector_patch_setter, "h", index_df=index_df)
    got = patch_heads(model, clean, corrupted, metric, hook="h", layers=[1], heads=[0, 2], positions=[2, 5],
                      per_position=True, progress=False)
    torch.testing.assert_close(got.reshape(-1), expected, rtol=1e-6, atol=1e-8)


def test_flat_head_hook_and_channel_groups_equal_manual_slices(models, pair):
    model = models["mamba2"]
    clean, corrupted = pair
    hd = model.cfg.d_head
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_y_normed"))

    def head_slice(act, index, clean_act):  # y_normed is [b, p, e]: head h is channels h*hd .. (h+1)*hd
        act[:, :, index[1] * hd:(index[1] + 1) * hd] = clean_act[:, :, index[1] * hd:(index[1] + 1) * hd]
        return act

    expected = tl_patch(model, corrupted, cache, head_slice, "y_normed", ["layer", "head"])
    got = patch_heads(model, clean, corrupted, metric, hook="y_normed", progress=False)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)

    model = models["mamba1"]  # d_inner 32 in 4 groups of 8 channels (G must divide d_inner)
    bounds = [(0, 8), (8, 16), (16, 24), (24, 32)]
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith(("hook_x", "hook_h")))
    for hook in ("x", "h"):
        def group_slice(act, index, clean_act):
            a, z = bounds[index[1]]
            act[:, :, a:z] = clean_act[:, :, a:z]
            return act

        index_df = pd.DataFrame([(layer, g) for layer in range(2) for g in range(4)], columns=["layer", "group"])
        expected = tl_patch(model, corrupted, cache, group_slice, hook, index_df=index_df).reshape(2, 4)
        got = patch_heads(model, clean, corrupted, metric, hook=hook, channel_groups=4, progress=False)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8, msg=hook)
        alias = patch_channel_groups(model, clean, corrupted, metric, 4, hook=hook, groups=[2], progress=False)
        torch.testing.assert_close(alias, expected[:, [2]], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_heads_at_named_per_row_position_sets(models, pair, family):
    """``patch_heads(positions={"name": bool [b, p]})``: one head (or channel group) patched at each
    row's own positions. ``per_position=True`` gives one column per name; ``False`` patches the union
    of the sets. Against hand-written hooks that copy the clean slice row by row and position by
    position; a set with one column in every row equals ``positions=[col]``."""
    model = models[family]
    clean, corrupted = pair
    hook, width = ("x", 8) if family == "mamba1" else ("y", 1)  # channels per group / one head
    extra = {"channel_groups": 4} if family == "mamba1" else {}
    name = f"blocks.{{}}.hook_{hook}"
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith(f"hook_{hook}"))
    first, second = torch.zeros(B, P, dtype=torch.bool), torch.zeros(B, P, dtype=torch.bool)
    for row in range(B):
        first[row, 2 + 2 * row] = True  # S-like: a different place in every row
        second[row, [4, 3 - row]] = True
    same = torch.zeros(B, P, dtype=torch.bool)
    same[:, 4] = True
    sets = {"first": first, "second": second, "same": same}
    got = patch_heads(model, clean, corrupted, metric, hook=hook, heads=[0, 2], positions=sets, per_position=True,
                      batch_size=5, progress=False, **extra)
    assert got.shape == (2, 2, 3)
    union = patch_heads(model, clean, corrupted, metric, hook=hook, heads=[0, 2], positions=sets, progress=False,
                        **extra)
    assert union.shape == (2, 2)

    def by_hand(layer, head, mask):
        lo, hi = head * width, (head + 1) * width

        def hook_fn(act, hook):
            act = act.clone()
            for row in range(B):
                for pos in mask[row].nonzero()[:, 0].tolist():
                    act[row, pos, lo:hi] = cache[name.format(layer)][row, pos, lo:hi]
            return act

        with torch.no_grad():
            return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name.format(layer), hook_fn)])))

    for layer in range(2):
        for i, head in enumerate((0, 2)):
            for column, mask in enumerate((first, second, same)):
                assert float(got[layer, i, column]) == pytest.approx(by_hand(layer, head, mask), rel=1e-9,
                                                                     abs=1e-12)
            assert float(union[layer, i]) == pytest.approx(by_hand(layer, head, first | second | same), rel=1e-9,
                                                           abs=1e-12)
    by_column = patch_heads(model, clean, corrupted, metric, hook=hook, heads=[0, 2], positions=[4],
                            per_position=True, progress=False, **extra)
    torch.testing.assert_close(got[..., 2:], by_column, rtol=1e-12, atol=1e-12)
    assert (got[..., 0] - got[..., 1]).abs().max() > 1e-6  # the sets differ in effect
    with pytest.raises(ValueError, match=r"positions\['s'\] must be a bool mask of"):
        patch_heads(model, clean, corrupted, metric, hook=hook, positions={"s": first[:1]}, progress=False, **extra)


def test_errors_name_the_problem(models, pair):
    m1, m2 = models["mamba1"], models["mamba2"]
    clean, corrupted = pair
    cases = [
        (lambda: patch_heads(m1, clean, corrupted, metric, hook="y"), "Mamba-1 has no heads"),
        (lambda: patch_heads(m2, clean, corrupted, metric, hook="y", channel_groups=2), "Mamba-2"),
        (lambda: patch_heads(m2, clean, corrupted, metric, hook="B"), "hook_B has no head axis"),
        (lambda: patch_heads(m1, clean, corrupted, metric, hook="B", channel_groups=2), "hook_B has no channel"),
        (lambda: patch_layer_position(m2, clean, corrupted, metric, hook="nope"), "not a per-block hook"),
        (lambda: patch_layer_position(m2, clean, corrupted, metric, hook="blocks.0.hook_h"), "names a layer"),
        (lambda: patch_layer_position(m2, clean, corrupted, metric, hook="ssm_mask"), "Knockout"),
        (lambda: patch_layer_position(m2, clean, corrupted, metric, layers=[2]), "layer 2 is out of range"),
        (lambda: patch_layer_position(m2, clean, corrupted, metric, positions=[P]), "position 7 is out of range"),
        (lambda: patch_heads(m2, clean, corrupted, metric, heads=[4]), "head 4 is out of range"),
        (lambda: patch_layer_position(m2, clean, corrupted[:, :-1], metric), "same shape"),
        (lambda: zero_ablation_hooks(m1, "y", heads=[0]), "Mamba-1 model, which has no heads"),
        (lambda: zero_ablation_hooks(m2, "y", channels=[0]), "whose features are heads"),
        (lambda: zero_ablation_hooks(m2, "mixer_out", heads=[0]), "no head axis"),
        (lambda: mean_ablation_hooks(m2, "y"), "reference_tokens"),
        (lambda: token_class_mask(m2, clean, "newline"), "tokenizer"),
        (lambda: token_class_mask(m2, clean, "commas"), "expected 'bos'"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()
    hooks = zero_ablation_hooks(m2, "y", positions=torch.ones(3, P, dtype=torch.bool))  # a mask for 3 rows
    with pytest.raises(ValueError, match="build the hooks for this batch"):
        m2.run_with_hooks(clean, fwd_hooks=hooks)


# ---------------------------------------------------------------------- ablation
def record(store, key):
    def fn(act, hook):
        store[key] = act.detach().clone()
    return fn


def test_zero_ablation_equals_manual_and_touches_only_chosen(models, pair):
    model = models["mamba2"]
    tokens, _ = pair
    manual = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_y", lambda a, hook: torch.zeros_like(a))])
    got = ablate(model, tokens, "y", layers=[1])
    torch.testing.assert_close(got, manual, rtol=0, atol=0)
    assert (got - model(tokens)).abs().max() > 1e-3
    # heads 1 and 3 at positions 2 and 4 of layer 0
    seen = {}
    hooks = zero_ablation_hooks(model, "y", layers=[0], heads=[1, 3], positions=[2, 4])
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_y", record(seen, "pre"))] + hooks
                         + [("blocks.0.hook_y", record(seen, "post"))])
    expected = seen["pre"].clone()
    for t in (2, 4):
        expected[:, t, [1, 3]] = 0
    assert torch.equal(seen["post"], expected)
    assert (seen["pre"][:, [2, 4]][:, :, [1, 3]] != 0).all()


def test_state_zero_ablation_leaves_the_skip(models, pair):
    """Zeroing a head's state h_t leaves y_t = D·x_t for that head (y = h·C + D·x)."""
    model = models["mamba2"]
    tokens, _ = pair
    seen = {}
    hooks = zero_ablation_hooks(model, "h", heads={1: [2]}, positions=[3])
    model.run_with_hooks(tokens, fwd_hooks=hooks + [("blocks.1.hook_y", record(seen, "y")),
                                                    ("blocks.1.hook_x", record(seen, "x"))])
    D = model.blocks[1].mixer.D.detach()
    torch.testing.assert_close(seen["y"][:, 3, 2], D[2] * seen["x"][:, 3, 2], rtol=1e-10, atol=1e-12)
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_y", "blocks.1.hook_x"])
    assert (cache["blocks.1.hook_y"][:, 3, 2] - D[2] * cache["blocks.1.hook_x"][:, 3, 2]).abs().max() > 1e-4
    # the recurrence continues from the zero state: later positions change too, earlier ones do not
    assert torch.equal(seen["y"][:, :3], cache["blocks.1.hook_y"][:, :3])
    assert (seen["y"][:, 4:, 2] - cache["blocks.1.hook_y"][:, 4:, 2]).abs().max() > 1e-6


def test_mean_and_resample_ablation(models, pair):
    model = models["mamba1"]
    tokens, other = pair
    g = torch.Generator().manual_seed(3)
    reference = torch.randint(1, V, (3, P), generator=g)
    ref_mask = torch.ones(3, P, dtype=torch.long)
    ref_mask[0, :2] = 0  # left padding in the first reference row
    _, ref_cache = model.run_with_cache(reference, attention_mask=ref_mask, names_filter=lambda n: "hook_x" in n)
    ref_x = ref_cache["blocks.0.hook_x"]  # [3, p, e]
    w = ref_mask.double()[:, :, None]
    mean = (ref_x * w).sum((0, 1)) / w.sum()
    # per position: the mean of each prompt's token t (the left-padded row's tokens start at its column 2)
    by_token, w_token = ref_x.clone(), torch.ones(3, P, 1, dtype=torch.float64)
    by_token[0, :P - 2], w_token[0, P - 2:] = ref_x[0, 2:], 0
    per_pos = (by_token * w_token).sum(0) / w_token.sum(0)
    seen = {}
    for kind, hooks, value in [
        ("mean", mean_ablation_hooks(model, "x", reference, layers=[0], channels=[0, 5],
                                     reference_attention_mask=ref_mask), mean.expand(P, -1)),
        ("per_pos", mean_ablation_hooks(model, "x", reference, layers=[0], channels=[0, 5], per_position=True,
                                        reference_attention_mask=ref_mask), per_pos),
    ]:
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_x", record(seen, "pre"))] + hooks
                             + [("blocks.0.hook_x", record(seen, "post"))])
        expected = seen["pre"].clone()
        expected[:, :, [0, 5]] = value[None][:, :, [0, 5]]
        torch.testing.assert_close(seen["post"], expected, rtol=1e-12, atol=0, msg=kind)
    # resample: row i takes the other prompt's activation at the chosen channels and positions
    _, other_cache = model.run_with_cache(other, names_filter="blocks.1.hook_delta")
    hooks = resample_ablation_hooks(model, "delta", other, layers=[1], channels=range(4), positions=[1, 6])
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_delta", record(seen, "pre"))] + hooks
                         + [("blocks.1.hook_delta", record(seen, "post"))])
    expected = seen["pre"].clone()
    expected[:, [1, 6], :4] = other_cache["blocks.1.hook_delta"][:, [1, 6], :4]
    torch.testing.assert_close(seen["post"], expected, rtol=0, atol=0)
    # the ablation composes with a Knockout (ordinary hooks on other hook points)
    ko = Knockout(layers=[1], sources=[1], targets=[-1])
    both = model.run_with_knockout(tokens, ko, fwd_hooks=hooks)
    assert (both - model.run_with_knockout(tokens, ko)).abs().max() > 1e-6
    assert (both - model.run_with_hooks(tokens, fwd_hooks=hooks)).abs().max() > 1e-6


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_ablation_positions_are_places_of_the_sequence_under_a_state(models, family):
    """Under a ``RecurrentState`` (generate's decoding) each forward sees a few positions of a longer
    sequence; the ablation hooks read ``model.position_offset`` so that their positions name places
    of the whole sequence. Reference: one forward of the whole sequence with the same hooks (no
    state): by causality, prefill + one-token steps must give its logits."""
    from tl_mamba.circuits.ablation import mean_activations

    model = models[family]
    gen = torch.Generator().manual_seed(21)
    tokens, other = torch.randint(1, V, (B, 9), generator=gen), torch.randint(1, V, (B, 9), generator=gen)
    heads = {"heads": [1]} if family == "mamba2" else {"channels": [0, 3]}
    mask7 = torch.zeros(7, dtype=torch.bool)
    mask7[[1, 6]] = True
    rows = torch.zeros(B, 9, dtype=torch.bool)
    rows[0, 2], rows[1, [4, 7]] = True, True
    means = mean_activations(model, other, "y", [0], per_position=True)
    cases = {
        "zero ints": zero_ablation_hooks(model, "y", [0], positions=[2, 6], **heads),
        "zero mask [7]": zero_ablation_hooks(model, "x", [1], positions=mask7),
        "zero mask [b, 9]": zero_ablation_hooks(model, "delta", [0], positions=rows),
        "mean per position": mean_ablation_hooks(model, "y", None, [0], positions=[3, 7], means=means, **heads),
        "resample": resample_ablation_hooks(model, "h", other, [1], positions=[1, 8]),
    }
    offsets = []
    spy = ("blocks.0.hook_y", lambda act, hook: offsets.append(model.position_offset))
    for what, hooks in cases.items():
        with torch.no_grad():
            if what == "zero mask [7]":  # the mask covers the first 7 places, none later
                whole = model.run_with_hooks(tokens, fwd_hooks=zero_ablation_hooks(
                    model, "x", [1], positions=torch.cat([mask7, torch.zeros(2, dtype=torch.bool)])))
            else:
                whole = model.run_with_hooks(tokens, fwd_hooks=hooks)
            state = RecurrentState.empty(model.cfg.n_layers)
            with model.hooks(fwd_hooks=hooks + [spy]):
                offsets.clear()
                steps = [model(tokens[:, :5], state=state)] + [model(tokens[:, t:t + 1], state=state)
                                                               for t in range(5, 9)]
        torch.testing.assert_close(torch.cat(steps, 1), whole, rtol=1e-9, atol=1e-10, msg=what)
        assert offsets == [0, 5, 6, 7, 8], what
        assert (whole - model(tokens).detach()).abs().max() > 1e-6, what  # the ablation does something
    assert model.position_offset is None  # outside a forward, and in one without a state:
    model.run_with_hooks(tokens, fwd_hooks=[spy])
    assert offsets[-1] is None
    # a plain run shorter than the sources lines up with their prefix (activations are causal)
    hooks = resample_ablation_hooks(model, "y", other, [0], positions=[1, 3])
    _, cache = model.run_with_cache(other[:, :5], names_filter="blocks.0.hook_y")

    def by_hand(act, hook):
        act = act.clone()
        act[:, [1, 3]] = cache["blocks.0.hook_y"][:, [1, 3]]
        return act

    with torch.no_grad():
        torch.testing.assert_close(model.run_with_hooks(tokens[:, :5], fwd_hooks=hooks),
                                   model.run_with_hooks(tokens[:, :5], fwd_hooks=[("blocks.0.hook_y", by_hand)]),
                                   rtol=1e-12, atol=1e-12)
    # places past the sources / reference are refused, under generate too; and generate runs the hooks
    short = resample_ablation_hooks(model, "y", other[:, :6], [0])
    with pytest.raises(ValueError, match="source prompts cover 6 positions, but this run ablates position 6 of "
                                         r"its sequence \(generate went past them\)"):
        with model.hooks(fwd_hooks=short):
            model.generate(tokens[:, :5], max_new_tokens=3, verbose=False, stop_at_eos=False)
    with pytest.raises(ValueError, match="per-position means .* cover 9 positions, but this run ablates position 9"):
        model.run_with_hooks(torch.cat([tokens, tokens[:, :1]], 1),
                             fwd_hooks=mean_ablation_hooks(model, "y", None, [0], means=means))
    wrong = (9, 3) if family == "mamba1" else (9, 3, 3)  # hook_y [b, p, e] / [b, p, h, hd]
    with pytest.raises(ValueError, match=rf"means \(reference prompts\) have shape \({', '.join(map(str, wrong))}\)"):
        model.run_with_hooks(tokens, fwd_hooks=mean_ablation_hooks(model, "y", None, [0],
                                                                   means={0: torch.zeros(wrong)}))
    # negative positions count from an end that moves at every step: recurrent decoding and re-running
    # the sequence would read them differently, so both refuse them
    for cached in (True, False):
        with pytest.raises(ValueError, match=r"position -1 counts from the end .* new tokens are range\(P, P \+ n\)"):
            with model.hooks(fwd_hooks=zero_ablation_hooks(model, "y", [0], positions=[-1])):
                model.generate(tokens[:, :5], max_new_tokens=2, verbose=False, stop_at_eos=False,
                               use_past_kv_cache=cached)
    # a forward that a hook starts during generate is a whole sequence of its own (offset None)
    inner = []

    def nested(act, hook):
        if not inner:
            inner.append("running")  # (the inner forward calls this hook too)
            with torch.no_grad():
                model.run_with_hooks(tokens[:, :3], fwd_hooks=[spy])
            inner[0] = offsets[-1]
        return act

    for cached in (True, False):
        inner.clear()
        with model.hooks(fwd_hooks=[("blocks.1.hook_y", nested)]):
            model.generate(tokens[:, :5], max_new_tokens=2, verbose=False, stop_at_eos=False,
                           use_past_kv_cache=cached)
        assert inner == [None]
    assert model.position_offset is None and not model._sequence_grows
    with model.hooks(fwd_hooks=cases["zero ints"]):  # place 6 is a generated token: ablated at its step
        recurrent = model.generate(tokens[:, :5], max_new_tokens=3, verbose=False, stop_at_eos=False,
                                   do_sample=False)
        recomputed = model.generate(tokens[:, :5], max_new_tokens=3, verbose=False, stop_at_eos=False,
                                    do_sample=False, use_past_kv_cache=False)
    assert torch.equal(recurrent, recomputed)


# ------------------------------------------------------------ class-conditional
def test_class_conditional_mean_factory_takes_its_means_once(models, pair):
    """A mean over each batch would make a prompt's result depend on its batch: the factory
    refuses kind="mean" without reference_tokens (or means); with them, a prompt ablated in a
    batch of its own equals the same prompt ablated with the others."""
    model = models["mamba2"]
    tokens, _ = pair
    with pytest.raises(ValueError, match=r"kind='mean'\) needs reference_tokens \(or means\)"):
        class_conditional_hook_factory(model, {0: [1]}, kind="mean")
    factory = class_conditional_hook_factory(model, {0: [1], 1: [0]}, token_class="bos", kind="mean",
                                             reference_tokens=tokens)
    with torch.no_grad():
        together = model.run_with_hooks(tokens, fwd_hooks=factory(tokens))
        alone = torch.cat([model.run_with_hooks(tokens[r:r + 1], fwd_hooks=factory(tokens[r:r + 1]))
                           for r in range(tokens.shape[0])])
        assert not torch.allclose(together, model(tokens))
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)


def test_class_conditional_touches_only_chosen_positions_and_heads(models, pair):
    model = models["mamba2"]
    tokens, _ = pair
    tokens = tokens.clone()
    tokens[0, 4] = 0  # a second BOS in row 0
    tokens[1, 3] = 17
    bos = torch.zeros(B, P, dtype=torch.bool)
    bos[:, 0] = True
    bos[0, 4] = True
    assert torch.equal(token_class_mask(model, tokens, "bos"), bos)
    assert torch.equal(token_class_mask(model, tokens, lambda t: t == 0), bos)
    assert torch.equal(token_class_mask(model, tokens, [17]), tokens == 17)
    pad = torch.ones(B, P, dtype=torch.long)
    pad[1, 0] = 0
    assert torch.equal(token_class_mask(model, tokens, "bos", attention_mask=pad), bos & pad.bool())

    layer_heads = {0: [1], 1: [0, 2]}
    _, clean = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_delta"))
    for kind in ("zero", "mean"):
        hooks = class_conditional_ablation_hooks(model, tokens, layer_heads, token_class="bos", kind=kind)
        seen = {}
        fwd = []
        for layer in (0, 1):
            name = f"blocks.{layer}.hook_delta"
            fwd.append((name, record(seen, ("pre", layer))))
        fwd += hooks
        for layer in (0, 1):
            fwd.append((f"blocks.{layer}.hook_delta", record(seen, ("post", layer))))
        model.run_with_hooks(tokens, fwd_hooks=fwd)
        assert torch.equal(seen[("pre", 0)], clean["blocks.0.hook_delta"])  # nothing upstream changed
        for layer, heads in layer_heads.items():
            pre, post = seen[("pre", layer)], seen[("post", layer)]
            chosen = bos[:, :, None] & torch.isin(torch.arange(4), torch.tensor(heads))[None, None, :]
            assert torch.equal(post[~chosen], pre[~chosen]), (kind, layer)
            if kind == "zero":
                assert (post[chosen] == 0).all() and (pre[chosen] > 0).all()
            else:  # the head's mean Δ over every position of the clean run
                means = clean[f"blocks.{layer}.hook_delta"].mean((0, 1))
                torch.testing.assert_close(post[chosen], means.expand(B, P, 4)[chosen], rtol=1e-12, atol=0)
                assert (post[chosen] != pre[chosen]).all()


def test_delta_stats_by_class_agree_with_hand_averages(models, pair):
    tokens, _ = pair
    classes = {"bos": "bos", "seventeen": [17, 23], "mask": torch.rand(B, P, generator=torch.Generator()
                                                                          .manual_seed(5)) > 0.5}
    tokens = tokens.clone()
    tokens[0, 3], tokens[1, 5] = 17, 23
    for family in ("mamba2", "mamba1"):
        model = models[family]
        groups = None if family == "mamba2" else 2
        df = delta_stats_by_class(model, tokens, classes, channel_groups=groups, progress=False)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_delta"))
        masks = {"bos": tokens == 0, "seventeen": (tokens == 17) | (tokens == 23), "mask": classes["mask"]}
        masks["other"] = ~(masks["bos"] | masks["seventeen"] | masks["mask"])
        n_feat = 4 if family == "mamba2" else 2
        assert len(df) == 2 * n_feat * 4
        for layer in range(2):
            delta = cache[f"blocks.{layer}.hook_delta"]
            absA = torch.exp(model.blocks[layer].mixer.A_log.detach())
            for f in range(n_feat):
                if family == "mamba2":
                    d, rate = delta[..., f], delta[..., f] * absA[f]
                else:  # channels 0-15 and 16-31; |A| of a channel is its mean over the state entries
                    sl = slice(16 * f, 16 * (f + 1))
                    d = delta[..., sl].mean(-1)
                    rate = (delta[..., sl, None] * absA[sl]).mean((-1, -2))
                for name, mask in masks.items():
                    row = df[(df.layer == layer) & (df["head"] == f) & (df["class"] == name)].iloc[0]
                    assert row["count"] == int(mask.sum())
                    assert row.mean_delta == pytest.approx(float(d[mask].mean()), rel=1e-9)
                    assert row.mean_decay == pytest.approx(float(rate[mask].mean()), rel=1e-9)
                    assert row.rel_delta == pytest.approx(float(d[mask].mean() / d.mean()), rel=1e-9)
    with pytest.raises(ValueError, match="channel_groups apply to Mamba-1"):
        delta_stats_by_class(models["mamba2"], tokens, {"bos": "bos"}, channel_groups=2)


# ------------------------------------------------------------------ needle harness
def test_needle_accuracy_matches_shipped_metrics():
    import tl_mamba
    from tl_mamba.toy import tasks as toy_tasks

    model = tl_mamba.from_pretrained("toy-mamba2")
    metrics = json.loads(resources.files("tl_mamba.toy").joinpath("models/toy-mamba2/metrics.json").read_text())
    seed, n = metrics["seed"] + 1, 40  # evaluate_model used the training seed + 1
    calls = []

    def factory(tokens):  # hooks built per batch from its tokens; no-op hooks here
        calls.append(tuple(tokens.shape))
        return []

    acc = needle_accuracy(model, lengths=(64,), n=n, seed=seed, batch_size=20, fwd_hooks=factory, progress=False)
    expected = metrics["needle_by_length"]["64"]
    tolerance = 3 * math.sqrt(expected * (1 - expected) / n) + 1 / n
    assert abs(acc[64] - expected) <= tolerance, (acc, expected)
    assert calls == [(20, 64), (20, 64)]
    # the share of the same prompts whose argmax is the answer, counted by hand one prompt at a time
    prompts = toy_tasks.make_dataset("needle", "heldout", n, seed=seed, length=64)
    with torch.no_grad():
        correct = [model.to_string([int(model(model.to_tokens(p.text, prepend_bos=False))[0, -1].argmax())]).strip()
                   == p.answer.strip() for p in prompts]
    assert acc[64] == pytest.approx(sum(correct) / n)
    # ablating every layer's mixer output leaves no way to retrieve the needle
    zero = needle_accuracy(model, lengths=(64,), n=n, seed=seed, fwd_hooks=zero_ablation_hooks(model, "mixer_out"),
                           progress=False)
    assert zero[64] < 0.3
    # a class-conditional factory builds its mask per batch: removing the embedding of every digit
    # (the values) from the residual stream leaves nothing to retrieve
    digits = [str(i) for i in range(10)]
    hooked = needle_accuracy(model, lengths=(64,), n=n, seed=seed, batch_size=20, progress=False,
                             fwd_hooks=class_conditional_hook_factory(model, {0: None}, token_class=digits,
                                                                      hook="resid_pre"))
    assert hooked[64] < 0.5 < acc[64]


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_patch_heads_at_chosen_positions(models, pair, family):
    """patch_heads(positions=[...]) patches each head (Mamba-1: channel group) at those positions
    only, all at once. Reference: one hand-written hook per (layer, head), one forward each."""
    model = models[family]
    clean, corrupted = pair
    positions = [2, 4]
    if family == "mamba1":
        half = model.cfg.d_inner // 2
        features, kwargs = [list(range(half)), list(range(half, model.cfg.d_inner))], {"channel_groups": 2}
    else:
        features, kwargs = [[h] for h in range(model.cfg.n_heads)], {}
    got = patch_heads(model, clean, corrupted, metric, hook="y", positions=positions, progress=False, **kwargs)
    everywhere = patch_heads(model, clean, corrupted, metric, hook="y", progress=False, **kwargs)
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_y"))
    expected = torch.zeros(model.cfg.n_layers, len(features), dtype=torch.float64)
    for layer in range(model.cfg.n_layers):
        name = f"blocks.{layer}.hook_y"
        for j, feats in enumerate(features):
            def patch(act, hook, feats=feats, name=name):
                act = act.clone()
                for pos in positions:
                    act[:, pos, feats] = cache[name][:, pos, feats]
                return act

            with torch.no_grad():
                expected[layer, j] = float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])))
    assert not torch.allclose(everywhere, expected)  # restricting the positions matters here
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("b", [3, 4])
def test_resample_ablation_aligns_rows_by_default(models, family, b):
    """With as many source prompts as rows and no source_rows, row i takes source row i.
    Reference: a hand-written hook writing the source run's cached activation row by row."""
    model = models[family]
    gen = torch.Generator().manual_seed(11)
    tokens, source = torch.randint(4, V, (b, P), generator=gen), torch.randint(4, V, (b, P), generator=gen)
    name, positions = "blocks.0.hook_y", [2, 4]
    with torch.no_grad():
        _, cache = model.run_with_cache(source, names_filter=name)

        def by_hand(act, hook):
            act = act.clone()
            act[:, positions] = cache[name][:, positions]  # row i <- source row i
            return act

        expected = model.run_with_hooks(tokens, fwd_hooks=[(name, by_hand)])
        got = model.run_with_hooks(tokens, fwd_hooks=resample_ablation_hooks(model, "y", source, layers=[0],
                                                                             positions=positions))
    assert not torch.allclose(got, model(tokens))
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_resampling_a_prompt_from_itself_warns_that_nothing_changed(models, family):
    """Resample ablation with the run's own tokens as sources (rows lined up) leaves every row as it
    was; it warns, naming the rows. Other prompts as sources do not warn, and change the output."""
    import warnings

    model = models[family]
    gen = torch.Generator().manual_seed(12)
    tokens, other = torch.randint(4, V, (3, P), generator=gen), torch.randint(4, V, (3, P), generator=gen)
    with torch.no_grad():
        with pytest.warns(UserWarning, match=r"resample ablation of blocks.0.hook_y changed nothing in rows \[0, 1, 2\]"):
            same = model.run_with_hooks(tokens, fwd_hooks=resample_ablation_hooks(model, "y", tokens, layers=[0]))
        torch.testing.assert_close(same, model(tokens), rtol=0, atol=0)
        # a chosen source row that is the prompt itself: only that row is named
        mixed = torch.cat([tokens[:1], other[1:]])
        with pytest.warns(UserWarning, match=r"changed nothing in rows \[0\] of 3"):
            model.run_with_hooks(tokens, fwd_hooks=resample_ablation_hooks(model, "y", mixed, layers=[0]))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            changed = model.run_with_hooks(tokens, fwd_hooks=resample_ablation_hooks(model, "y", other, layers=[0]))
    assert not torch.allclose(changed, model(tokens))
    # sources that differ only after the ablated prefix: the warning names that cause too
    prefix = torch.cat([tokens[:, :2], other[:, 2:]], 1)
    with torch.no_grad(), pytest.warns(UserWarning, match="sources that share the ablated prefix"):
        model.run_with_hooks(tokens, fwd_hooks=resample_ablation_hooks(model, "y", prefix, layers=[0],
                                                                       positions=[0, 1]))


def test_needle_accuracy_and_task_batches_refuse_a_model_without_the_toy_vocabulary():
    """The needle prompts are toy-vocabulary words: with no tokenizer, or one lacking them (words
    would be read as <unk>), the accuracy would mean nothing, so it is refused by name."""
    from conftest import make_tokenizer

    from tl_mamba.circuits import task_batches

    model = make_model("mamba2")
    model.tokenizer = None
    with pytest.raises(ValueError, match="needle_accuracy: the model has no tokenizer"):
        needle_accuracy(model, lengths=(64,), n=4, progress=False)
    with pytest.raises(ValueError, match="task_batches: the model has no tokenizer"):
        task_batches(model, "needle", n=4, length=64)
    model.tokenizer = make_tokenizer()  # the tests' own small word-level vocabulary
    with pytest.raises(ValueError, match=r"tokenizer lacks \d+ words of the toy vocabulary"):
        needle_accuracy(model, lengths=(64,), n=4, progress=False)
    with pytest.raises(ValueError, match=r"task_batches: the model's tokenizer lacks \d+ words"):
        task_batches(model, "ioi", n=4)


@pytest.fixture(scope="module")
def toy2_float64():
    import tl_mamba

    return tl_mamba.from_pretrained("toy-mamba2", dtype=torch.float64)


NEEDLE_TEXTS = ["The capital of Kor Mav Vor is", "Vel is", "The capital of Zor Vel Quen is the city"]


def test_per_position_means_and_resample_sources_line_up_by_token(toy2_float64):
    """A padded reference / source batch gives what its prompts give run alone: place t is each
    prompt's token t, whichever side the batch is padded on (left padding moved each row's tokens
    by its pads: means off by up to 231 on the needle task), and right padding given without a mask
    is left out of the means (to_tokens' default: pads were counted as tokens)."""
    model = toy2_float64
    alone = [model.run_with_cache(t, names_filter="blocks.1.hook_y")[1]["blocks.1.hook_y"][0] for t in NEEDLE_TEXTS]
    longest = max(a.shape[0] for a in alone)
    want = torch.stack([torch.stack([a[t] for a in alone if a.shape[0] > t]).mean(0) for t in range(longest)])
    for side in ("left", "right"):
        tokens, mask = model.to_tokens(NEEDLE_TEXTS, padding_side=side, return_attention_mask=True)
        for given in ([mask] if side == "left" else [mask, None]):  # right padding: inferred from the pad id
            means = mean_activations(model, tokens, "y", layers=[1], per_position=True, attention_mask=given)[1]
            torch.testing.assert_close(means, want, rtol=1e-10, atol=1e-12, msg=f"{side} {given is None}")
        # resample: the run (the first prompt, alone) takes source row 1's token t at its position t
        target = model.to_tokens(NEEDLE_TEXTS[0])
        hooks = resample_ablation_hooks(model, "y", tokens, layers=[1], heads=[2], positions=[0, 1],
                                        source_rows=[1], source_attention_mask=mask)
        seen = {}
        model.run_with_hooks(target, fwd_hooks=hooks + [("blocks.1.hook_y", record(seen, "post"))])
        torch.testing.assert_close(seen["post"][0, :2, 2], alone[1][:2, 2], rtol=1e-12, atol=0, msg=side)
    with pytest.raises(ValueError, match="reference_tokens .* or means= .*not both"):
        mean_ablation_hooks(model, "y", tokens, layers=[1], means={1: want[0]})


def test_class_statistics_leave_out_right_padding_without_a_mask(toy2_float64):
    """to_tokens pads on the right by default; given without its mask, the trailing pad tokens are
    padding for the statistics by class too (the "other" class counted them), as with the mask."""
    from tl_mamba.circuits import delta_stats_by_class, similarity_by_class

    model = toy2_float64
    tokens, mask = model.to_tokens(NEEDLE_TEXTS, return_attention_mask=True)
    assert not bool(mask.all()) and bool((mask[:, -1] == 0).any())  # right-padded
    classes = {"is": ["is"]}
    for stats in (lambda **kw: similarity_by_class(model, tokens, classes, layers=[1], progress=False, **kw),
                  lambda **kw: delta_stats_by_class(model, tokens, classes, layers=[1], progress=False, **kw)):
        with_mask, without = stats(attention_mask=mask), stats()
        pd.testing.assert_frame_equal(without, with_mask)
    assert int(with_mask[with_mask["class"] == "other"]["count"].iloc[0]) == int(mask.sum()) - 3


def test_place_based_ablations_of_a_padded_batch_equal_each_prompt_alone(toy2_float64):
    """Per-position means and resampled activations go to each prompt's own token t, in a left- or
    right-padded run and in the calls that continue a left-padded state (generate's steps: the
    state remembers each row's padding), as when each prompt runs alone; positions given as
    columns that fall on padding warn, as Knockout's do."""
    from tl_mamba.models.base import RecurrentState

    model = toy2_float64
    source = model.to_tokens(["Quen is the capital of Zor Vel and the city of Kor Mav Vor is"] * 3)
    hook_sets = {
        "mean": lambda: mean_ablation_hooks(model, "y", source, heads={1: [2]}, per_position=True),
        "resample": lambda: resample_ablation_hooks(model, "y", source, heads={1: [2], 2: [0]}),
    }
    alone = [model.to_tokens(t) for t in NEEDLE_TEXTS]
    for kind, hooks in hook_sets.items():
        for side in ("left", "right"):
            tokens, mask = model.to_tokens(NEEDLE_TEXTS, padding_side=side, return_attention_mask=True)
            logits = model.run_with_hooks(tokens, fwd_hooks=hooks(), attention_mask=mask)
            for row, prompt in enumerate(alone):
                want = model.run_with_hooks(prompt, fwd_hooks=hooks())[0]
                torch.testing.assert_close(logits[row][mask[row].bool()], want, rtol=1e-9, atol=1e-9,
                                           msg=f"{kind} {side} {row}")
        # a left-padded prefill, then one step of a new token per row, from the state
        tokens, mask = model.to_tokens(NEEDLE_TEXTS, padding_side="left", return_attention_mask=True)
        step = model.to_tokens(["the"] * 3, prepend_bos=False)
        state = RecurrentState.empty(model.cfg.n_layers)
        with model.hooks(fwd_hooks=hooks()):
            model(tokens, attention_mask=mask, state=state)
            stepped = model(step, state=state)[:, -1]
            for row, prompt in enumerate(alone):
                own = RecurrentState.empty(model.cfg.n_layers)
                model(prompt, state=own)
                torch.testing.assert_close(stepped[row], model(step[:1], state=own)[0, -1], rtol=1e-9, atol=1e-9,
                                           msg=f"{kind} step {row}")
    for side, positions in (("left", [0]), ("right", [-1])):
        tokens, mask = model.to_tokens(NEEDLE_TEXTS, padding_side=side, return_attention_mask=True)
        with pytest.warns(UserWarning, match=r"positions \[\d+\] fall on padding in row \d.*\[b, p\] bool mask"):
            model.run_with_hooks(tokens, fwd_hooks=zero_ablation_hooks(model, "y", heads=[2], positions=positions),
                                 attention_mask=mask)


def test_place_based_ablation_of_right_padding_past_the_sources(toy2_float64):
    """A right-padded run whose padded width is past the sources' and the reference's length: its pad
    columns hold no token, so nothing is taken for them (they raised 'this run ablates position p'
    and only positions=attention_mask worked), and each prompt gets what it gets alone. Per-position
    means of a padded reference stop at its longest prompt: a token past it raises, as with an
    unpadded reference (the padded width's places had a mean of 0, a silent zero ablation)."""
    model = toy2_float64
    texts = NEEDLE_TEXTS[:2]  # 8 and 3 tokens
    source = model.to_tokens(["Quen is the capital of Zor Vel and"] * 2)  # 9 tokens
    tokens, mask = model.to_tokens(texts, padding_side="right", return_attention_mask=True)
    wide = torch.cat([tokens, tokens.new_full((2, 3), model.tokenizer.pad_token_id)], 1)  # 11 columns > 9
    wide_mask = torch.cat([mask, mask.new_zeros(2, 3)], 1)
    hook_sets = {
        "mean": lambda: mean_ablation_hooks(model, "y", source, heads={1: [2]}, per_position=True),
        "resample": lambda: resample_ablation_hooks(model, "y", source, heads={1: [2], 2: [0]}),
    }
    for kind, hooks in hook_sets.items():
        for given in (wide_mask, None):  # without a mask, the trailing pad runs are the padding
            logits = model.run_with_hooks(wide, fwd_hooks=hooks(), attention_mask=given)
            for row, text in enumerate(texts):
                want = model.run_with_hooks(model.to_tokens(text), fwd_hooks=hooks())[0]
                torch.testing.assert_close(logits[row][wide_mask[row].bool()], want, rtol=1e-9, atol=1e-9,
                                           msg=f"{kind} {row} {given is None}")
    # the reference batch ablated by its own per-position means, no mask given
    own = mean_ablation_hooks(model, "y", wide, heads={1: [2]}, per_position=True)
    logits = model.run_with_hooks(wide, fwd_hooks=own)
    mean_of = mean_activations(model, wide, "y", layers=[1], per_position=True)[1]
    for row, text in enumerate(texts):
        edit = mean_ablation_hooks(model, "y", heads={1: [2]}, means={1: mean_of}, per_position=True)
        want = model.run_with_hooks(model.to_tokens(text), fwd_hooks=edit)[0]
        torch.testing.assert_close(logits[row][wide_mask[row].bool()], want, rtol=1e-9, atol=1e-9)
    # a reference of the two short prompts, padded to the width of a long one
    padded, padded_mask = model.to_tokens(texts + [NEEDLE_TEXTS[2]], padding_side="left", return_attention_mask=True)
    means = mean_activations(model, padded[:2], "y", layers=[1], per_position=True, attention_mask=padded_mask[:2])[1]
    assert means.shape[0] == 8 < padded.shape[1]
    hooks = mean_ablation_hooks(model, "y", padded[:2], layers=[1], per_position=True,
                                reference_attention_mask=padded_mask[:2])
    with pytest.raises(ValueError, match="cover 8 positions, but this run ablates position 8"):
        model.run_with_hooks(model.to_tokens(NEEDLE_TEXTS[2]), fwd_hooks=hooks)


def test_class_statistics_of_an_ablated_model(toy2_float64):
    """fwd_hooks= runs every batch of the class statistics under hooks (a list, or a factory per
    batch): Δ by class at layer 1 with layer 0's heads zeroed, against hook_delta recorded by hand
    in the same ablated forward; the cosine probe moves with it."""
    from tl_mamba.circuits import delta_stats_by_class, similarity_by_class

    model = toy2_float64
    tokens = model.to_tokens(["The capital of Kor Mav Vor is", "The capital of Zor Vel Quen is"])
    hooks = zero_ablation_hooks(model, "y", heads={0: [0, 1, 2, 3]})
    seen = {}
    model.run_with_hooks(tokens, fwd_hooks=hooks + [("blocks.1.hook_delta", record(seen, "delta"))])
    is_token = tokens == model.to_single_token("is")
    want = seen["delta"][is_token].mean(0)  # [h]
    classes = {"is": ["is"]}
    for given in (hooks, lambda batch: zero_ablation_hooks(model, "y", heads={0: [0, 1, 2, 3]})):
        stats = delta_stats_by_class(model, tokens, classes, layers=[1], progress=False, batch_size=1,
                                     fwd_hooks=given)
        got = torch.tensor(stats[stats["class"] == "is"].sort_values("head")["mean_delta"].to_numpy())
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    plain = delta_stats_by_class(model, tokens, classes, layers=[1], progress=False)
    assert (torch.tensor(plain[plain["class"] == "is"].sort_values("head")["mean_delta"].to_numpy()) - want).abs().max() > 1e-6
    edited = similarity_by_class(model, tokens, classes, layers=[1], progress=False, fwd_hooks=hooks)
    untouched = similarity_by_class(model, tokens, classes, layers=[1], progress=False)
    assert (edited["mean_cosine"] - untouched["mean_cosine"]).abs().max() > 1e-6


def test_place_based_ablation_edges(toy2_float64):
    """A run token past its source prompt's last real token is an error naming the row, whichever
    side the sources are padded on (it took the last token again, or a pad's value); a row whose
    only ablated column is padding is not reported as resampled from itself; the padding warning
    comes once per forward, not once per layer; positions given as a generator serve every layer."""
    model = toy2_float64
    short_and_long = ["Vel is", "The capital of Kor Mav Vor is"]
    run = model.to_tokens(short_and_long[1])
    for side in ("left", "right"):
        sources, mask = model.to_tokens(short_and_long, padding_side=side, return_attention_mask=True)
        hooks = resample_ablation_hooks(model, "y", sources, layers=[1], source_rows=[0], source_attention_mask=mask)
        with pytest.raises(ValueError, match=r"source prompts cover 3 positions, but this run ablates position 3 .*"
                                             r"source row 0's tokens"):
            model.run_with_hooks(run, fwd_hooks=hooks)
    tokens, mask = model.to_tokens(short_and_long, padding_side="left", return_attention_mask=True)
    other = model.to_tokens(["Quen is the capital of Zor Vel"] * 2)
    hooks = resample_ablation_hooks(model, "y", other, heads={1: [2], 2: [2]}, positions=[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=mask)
    messages = [str(w.message) for w in caught]
    assert sum("fall on padding" in m for m in messages) == 1, messages  # two hooked layers, one warning
    assert not any("changed nothing" in m for m in messages), messages  # row 0's column 1 is padding
    seen = {}
    zero = zero_ablation_hooks(model, "y", heads=[2], positions=(i for i in (1, 2)))
    model.run_with_hooks(run, fwd_hooks=zero + [(f"blocks.{layer}.hook_y", record(seen, layer))
                                                for layer in range(model.cfg.n_layers)])
    for layer in range(model.cfg.n_layers):
        assert (seen[layer][0, [1, 2], 2] == 0).all() and (seen[layer][0, [0, 3], 2] != 0).all(), layer


def test_patch_positions_on_padding_warn(toy2_float64):
    """Patch positions given as ints are columns of the padded batch: one that falls on padding in
    some row warns (as Knockout's and the ablations' do); named [b, p] sets, all positions and a
    batch without padding do not."""
    model = toy2_float64
    clean, mask = model.to_tokens(NEEDLE_TEXTS, padding_side="left", return_attention_mask=True)
    corrupted = clean.flip(0)
    metric = lambda logits: logits[:, -1, 5].mean()  # noqa: E731
    run = dict(layers=[1], attention_mask=mask, progress=False)
    with pytest.warns(UserWarning, match=r"patch positions \[0\] fall on padding in row 0 .*named \[b, p\]"):
        patch_layer_position(model, clean, corrupted, metric, "y", positions=[0, -1], **run)
    with pytest.warns(UserWarning, match=r"patch positions \[1\] fall on padding in row 0"):
        patch_heads(model, clean, corrupted, metric, "y", positions=[1, -1], heads=[0], **run)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_layer_position(model, clean, corrupted, metric, "y", positions=[-1], **run)
        patch_layer_position(model, clean, corrupted, metric, "y", **run)  # every column: nothing chosen
        patch_heads(model, clean, corrupted, metric, "y", positions={"last": mask.bool()}, heads=[0], **run)
    # the padding the forward infers warns alike: to_tokens' right padding, no mask given
    right = model.to_tokens(NEEDLE_TEXTS)
    with pytest.warns(UserWarning, match=r"patch positions \[9\] fall on padding in row 1"):
        patch_layer_position(model, right, right.flip(0), metric, "y", positions=[9], layers=[1], progress=False)
    # positions given as a generator serve the check and the patches alike
    for per_position in (True, False):
        listed = patch_heads(model, clean, corrupted, metric, "y", positions=[-2, -1], heads=[0],
                             per_position=per_position, **run)
        generated = patch_heads(model, clean, corrupted, metric, "y", positions=(p for p in [-2, -1]), heads=[0],
                                per_position=per_position, **run)
        assert torch.equal(listed, generated)
