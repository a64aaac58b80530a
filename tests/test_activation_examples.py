"""top_activations (tl_mamba.circuits.activation_examples) against a brute-force reference: every
prompt run on its own, unpadded, with run_with_cache; every usable position's feature value
listed in Python and sorted; context windows cut from the unpadded prompt."""

from __future__ import annotations

import math

import pytest
import torch

from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig
from tl_mamba.circuits import TopActivations, top_activations
from tl_mamba.circuits.activation_examples import OUTSIDE

from conftest import make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)

V, BOS = 40, 0


def tiny(family, tokenizer=None):
    common = dict(n_layers=3, d_model=16, d_vocab=V, d_state=4, expand=2, seed=3, bos_token_id=BOS,
                  eos_token_id=1, pad_token_id=2)
    if family == "mamba1":
        model = HookedMamba(HookedMambaConfig(**common), tokenizer=tokenizer)
    else:
        model = HookedMamba2(HookedMambaConfig(family="mamba2", n_heads=4, n_groups=2, chunk_size=4, **common),
                             tokenizer=tokenizer)
    return model.double().eval()


def prompts(n=9, seed=0, lo=3, hi=11):
    """Unpadded prompts of different lengths, each a BOS then random ids (BOS and pad excluded)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [[BOS] + torch.randint(3, V, (m - 1,), generator=g).tolist() for m in lengths]


def left_padded(rows, pad=2):
    p = max(map(len, rows))
    tokens = torch.full((len(rows), p), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), p, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, p - len(r):] = torch.tensor(r)
        mask[i, p - len(r):] = 1
    return tokens, mask


FEATURES = {}  # (id(rows), prompt) -> that prompt's features [len, F], run alone: for the context values


def reference(model, hook, rows, featurize, ignore_bos=True, first_prompt=0):
    """``[(value, prompt, position)]`` of every usable position, one feature list per feature:
    ``{feature: [...]}``, and the count of usable positions. Each prompt is run alone."""
    listing, counted = {}, 0
    for i, r in enumerate(rows):
        _, cache = model.run_with_cache(torch.tensor([r]), names_filter=[hook])
        feats = featurize(cache[hook])[0]  # [p, F]
        FEATURES[(id(rows), first_prompt + i)] = feats
        for t in range(len(r)):
            if ignore_bos and r[t] == BOS:
                continue
            counted += 1
            for f in range(feats.shape[-1]):
                listing.setdefault(f, []).append((float(feats[t, f]), first_prompt + i, t))
    return listing, counted


def window(row, t, before, after):
    return [row[j] if 0 <= j < len(row) else OUTSIDE for j in range(t - before, t + after + 1)]


def check_against(top: TopActivations, listing, rows, k, largest=True, before=12, after=4, features=None,
                  threshold=None, column_of=lambda f: f):
    """``column_of(feature)``: its column in what the reference's ``featurize`` returned."""
    features = list(listing) if features is None else features
    assert top.features.tolist() == features
    for i, f in enumerate(features):
        entries = listing[f]
        if threshold is not None:
            entries = [e for e in entries if (e[0] > threshold if largest else e[0] < threshold)]
        ranked = sorted(entries, key=lambda e: -e[0] if largest else e[0])
        expected = [e[0] for e in ranked[:k]]
        got = top.values[i].tolist()
        n = len(expected)
        assert got[:n] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        assert all(math.isnan(v) for v in got[n:]) and (top.prompt[i, n:] == -1).all()
        # each example is a distinct real position that holds the value reported (ties may be in any order)
        value_at = {(pr, pos): v for v, pr, pos in entries}
        places = list(zip(top.prompt[i, :n].tolist(), top.position[i, :n].tolist()))
        assert len(set(places)) == n
        for rank, ((pr, pos), v) in enumerate(zip(places, got[:n])):
            assert value_at[(pr, pos)] == pytest.approx(v, rel=1e-9, abs=1e-12)
            assert top.context[i, rank].tolist() == window(rows[pr], pos, before, after)
            feats = FEATURES[(id(rows), pr)][:, column_of(f)]
            expected_values = [float(feats[j]) if 0 <= j < len(rows[pr]) else math.nan
                               for j in range(pos - before, pos + after + 1)]
            assert top.context_values[i, rank].tolist() == pytest.approx(expected_values, rel=1e-9, abs=1e-12,
                                                                        nan_ok=True)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_raw_channels_of_a_padded_batch_match_each_prompt_run_alone(family):
    model = tiny(family)
    rows = prompts()
    tokens, mask = left_padded(rows)
    hook = "blocks.1.hook_y"  # Mamba-2: [b, p, h, hd], flattened heads side by side
    top = top_activations(model, hook, tokens, attention_mask=mask, k=4, batch_size=4, quiet=True)
    listing, counted = reference(model, hook, rows, lambda a: a.reshape(*a.shape[:2], -1))
    check_against(top, listing, rows, k=4)
    assert top.n_positions == counted == sum(len(r) - 1 for r in rows)
    fired = torch.tensor([sum(v > 0 for v, _, _ in listing[f]) for f in sorted(listing)], dtype=torch.float64)
    assert torch.allclose(top.frequency, fired / counted)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_an_sae_with_feature_subset_and_smallest_values(family):
    model = tiny(family)
    width = model.cfg.d_model
    g = torch.Generator().manual_seed(1)
    W, b = torch.randn(width, 12, generator=g, dtype=torch.float64), torch.randn(12, generator=g, dtype=torch.float64)

    class SAE:
        def encode(self, a):
            return torch.relu(a @ W + b)

        def decode(self, f):
            return f @ W.T

    rows = prompts(seed=2)
    tokens, mask = left_padded(rows)
    hook = "blocks.2.hook_resid_pre"
    chosen = [7, 0, 11]
    listing, _ = reference(model, hook, rows, lambda a: torch.relu(a @ W + b))
    listing = {f: listing[f] for f in chosen}
    for largest in (True, False):
        top = top_activations(model, hook, tokens, SAE(), features=chosen, k=5, largest=largest,
                              attention_mask=mask, batch_size=3, quiet=True)
        check_against(top, listing, rows, k=5, largest=largest, features=chosen)


def test_the_recurrent_state_and_directions_with_a_stream_of_batches_of_different_lengths():
    model = tiny("mamba1")
    e, n = model.cfg.d_inner, model.cfg.d_state
    hook = "blocks.0.hook_h"  # [b, p, e, n] → feature c·n + i
    directions = torch.randn(e * n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    batches = [prompts(n=3, seed=5, lo=4, hi=5), prompts(n=2, seed=6, lo=7, hi=8), prompts(n=4, seed=7, lo=2, hi=3)]
    rows = [r for batch in batches for r in batch]
    stream = (torch.tensor(batch) for batch in batches)  # each batch unpadded, its own length
    top = top_activations(model, hook, stream, directions, k=6, context=(2, 1), quiet=True)
    listing, _ = reference(model, hook, rows, lambda a: a.reshape(*a.shape[:2], -1) @ directions)
    check_against(top, listing, rows, k=6, before=2, after=1)
    # and the raw entries, by their flattened index
    stream = [(torch.tensor(batch), torch.ones(len(batch), len(batch[0]), dtype=torch.long)) for batch in batches]
    entries = [5, n * 3 + 2]
    top = top_activations(model, hook, stream, features=entries, k=3, context=0, ignore=None, quiet=True)
    listing, _ = reference(model, hook, rows, lambda a: a.reshape(*a.shape[:2], -1)[..., entries], ignore_bos=False)
    listing = {entries[i]: v for i, v in listing.items()}
    check_against(top, listing, rows, k=3, before=0, after=0, features=entries, column_of=entries.index)


def test_more_slots_than_positions_are_left_empty():
    model = tiny("mamba2")
    rows = [[BOS, 5, 6], [BOS, 7]]
    tokens, mask = left_padded(rows)
    top = top_activations(model, "blocks.0.hook_x", tokens, attention_mask=mask, features=[0], k=5, quiet=True)
    assert (top.prompt[0] >= 0).sum() == 3 and top.values.shape == (1, 5)  # three real non-BOS positions
    assert torch.isnan(top.values[0, 3:]).all() and (top.position[0, 3:] == -1).all()
    assert (top.context[0, 3:] == OUTSIDE).all()


def test_strings_are_tokenized_and_positions_count_real_tokens():
    tok = make_tokenizer()
    model = tiny("mamba2", tokenizer=tok)
    texts = ["the cat sat on the mat", "mary gave john a drink", "one two", "red blue green one two three four"]
    top = top_activations(model, "blocks.1.hook_resid_post", texts, features=[0, 3], k=4, batch_size=3,
                          quiet=True)
    rows = [model.to_tokens(t)[0].tolist() for t in texts]
    listing, _ = reference(model, "blocks.1.hook_resid_post", rows, lambda a: a[..., [0, 3]])
    listing = {[0, 3][i]: v for i, v in listing.items()}
    check_against(top, listing, rows, k=4, features=[0, 3], column_of=[0, 3].index)
    # decoded examples and the table name the token at (prompt, position)
    ex = top.examples(3, model)
    assert [e["token"] for e in ex] == [model.to_single_str_token(rows[e["prompt"]][e["position"]]) for e in ex]
    assert ex[0]["before"] == model.to_string([t for t in rows[ex[0]["prompt"]][:ex[0]["position"]]][-12:])
    df = top.to_dataframe(model)
    assert list(df[df.feature == 3].token) == [e["token"] for e in ex]
    text = top.show(3, model)
    assert text.count("«") == len(ex) and f"«{ex[0]['token']}»" in text.splitlines()[1]


def test_only_the_layers_up_to_the_hook_run():
    model = tiny("mamba1")
    tokens = torch.tensor(prompts(n=2, lo=5, hi=6))
    ran = []
    with model.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", lambda a, hook: ran.append(hook.name))]):
        top_activations(model, "blocks.0.hook_conv", tokens, features=[0], k=1, quiet=True)
        assert ran == []
        top_activations(model, "ln_final.hook_normalized", tokens, features=[0], k=1, quiet=True)
        assert ran == ["blocks.2.hook_resid_pre"]


def test_errors_name_the_problem():
    model = tiny("mamba2")
    tokens = torch.tensor(prompts(n=2, lo=5, hi=6))
    with pytest.raises(ValueError, match="not a hook"):
        top_activations(model, "blocks.0.hook_yy", tokens, quiet=True)
    with pytest.raises(ValueError, match="knockout mask"):
        top_activations(model, "blocks.0.hook_ssm_mask", tokens, quiet=True)
    with pytest.raises(ValueError, match="k must be"):
        top_activations(model, "blocks.0.hook_x", tokens, k=0, quiet=True)
    with pytest.raises(ValueError, match="context"):
        top_activations(model, "blocks.0.hook_x", tokens, context=(1, -1), quiet=True)
    with pytest.raises(ValueError, match="out of range"):
        top_activations(model, "blocks.0.hook_resid_pre", tokens, features=[16], quiet=True)
    with pytest.raises(ValueError, match="width 5"):
        top_activations(model, "blocks.0.hook_resid_pre", tokens, torch.randn(5, dtype=torch.float64), quiet=True)
    with pytest.raises(ValueError, match=r"\[b, p, F\]"):
        top_activations(model, "blocks.0.hook_resid_pre", tokens, lambda a: a[0], quiet=True)
    with pytest.raises(ValueError, match="token ids"):
        top_activations(model, "blocks.0.hook_x", tokens.double(), quiet=True)
    with pytest.raises(ValueError, match="attention_mask= goes with a token tensor"):
        top_activations(model, "blocks.0.hook_x", [tokens], attention_mask=torch.ones_like(tokens), quiet=True)
    with pytest.raises(ValueError, match=r"feature 0 of blocks.0.hook_x is nan at prompt 0, position 1"):
        top_activations(model, "blocks.0.hook_x", tokens, lambda a: a.flatten(2) / 0 * 0, quiet=True)
    with pytest.raises(ValueError, match="empty"):
        top_activations(model, "blocks.0.hook_x", [], quiet=True)
    top = top_activations(model, "blocks.0.hook_x", tokens, features=[1, 2], k=1, quiet=True)
    with pytest.raises(ValueError, match="feature 5 is not in this result"):
        top.examples(5, model)


def test_a_threshold_leaves_the_slots_of_a_rare_feature_empty():
    """An SAE-like ReLU feature that fires at a few positions: with threshold=0 its examples are
    only those, strongest first, the other slots empty (no ties at zero filling them)."""
    model = tiny("mamba1")
    rows = prompts(seed=8)
    tokens, mask = left_padded(rows)
    hook = "blocks.1.hook_resid_post"

    raw, _ = reference(model, hook, rows, lambda a: a[..., :2])
    # feature f fires above the (5, 3)-th largest value of channel f: at a few counted positions
    shift = torch.tensor([sorted((v for v, _, _ in raw[f]), reverse=True)[n] for f, n in ((0, 4), (1, 2))],
                         dtype=torch.float64)

    def relu_shifted(a):
        return torch.relu(a[..., :2] - shift)

    listing, _ = reference(model, hook, rows, relu_shifted)
    fires = [sum(v > 0 for v, _, _ in listing[f]) for f in (0, 1)]
    assert 0 < min(fires) and max(fires) < 8, fires  # (fewer where prompts share a prefix: equal values)
    top = top_activations(model, hook, tokens, relu_shifted, attention_mask=mask, k=8, threshold=0.0,
                          batch_size=4, quiet=True)
    check_against(top, listing, rows, k=8, threshold=0.0)
    for f in (0, 1):
        assert int((top.prompt[f] >= 0).sum()) == fires[f] and torch.isnan(top.values[f, fires[f]:]).all()
    # and for the smallest values, the threshold is an upper bound
    top = top_activations(model, hook, tokens, lambda a: a[..., :2], attention_mask=mask, k=5, largest=False,
                          threshold=-0.5, quiet=True)
    listing, _ = reference(model, hook, rows, lambda a: a[..., :2])
    check_against(top, listing, rows, k=5, largest=False, threshold=-0.5)


def test_the_other_dataset_forms_give_the_token_tensor_result():
    """(tokens, attention_mask) as the dataset, a tokenizer's dict, an iterable of dict batches and
    of 1-tuples (DataLoader(TensorDataset(tokens))), and to_tokens' right padding without a mask."""
    tok = make_tokenizer()
    model = tiny("mamba2", tokenizer=tok)
    texts = ["the cat sat on the mat", "mary gave john a drink", "one two", "red blue green one two three four",
             "the dog ran to the park"]
    rows = [model.to_tokens(t)[0].tolist() for t in texts]
    hook, chosen = "blocks.0.hook_resid_post", [1, 6]
    listing, _ = reference(model, hook, rows, lambda a: a[..., chosen])
    listing = {chosen[i]: v for i, v in listing.items()}

    def check(top):
        check_against(top, listing, rows, k=6, features=chosen, column_of=chosen.index)

    left = model.to_tokens(texts, padding_side="left", return_attention_mask=True)
    check(top_activations(model, hook, left, features=chosen, k=6, batch_size=2, quiet=True))
    check(top_activations(model, hook, {"input_ids": left[0], "attention_mask": left[1]}, features=chosen, k=6,
                          quiet=True))
    batches = [{"input_ids": left[0][:3], "attention_mask": left[1][:3]},
               {"input_ids": left[0][3:], "attention_mask": left[1][3:]}]
    check(top_activations(model, hook, batches, features=chosen, k=6, quiet=True))
    right = model.to_tokens(texts)  # right padding, the default here, and no mask
    assert model.tokenizer.padding_side == "right" and (right == tok.pad_token_id).any()
    check(top_activations(model, hook, right, features=chosen, k=6, quiet=True))
    check(top_activations(model, hook, [(right[:2],), (right[2:],)], features=chosen, k=6, quiet=True))


def test_a_nan_at_padding_is_no_error_but_one_at_a_counted_position_is():
    """A cosine to the activation is NaN where it is zero: hook_x is zero at left padding. Only
    counted positions must be finite."""
    model = tiny("mamba2")
    rows = prompts(seed=9)
    tokens, mask = left_padded(rows)
    hook = "blocks.0.hook_x"

    def cosine(a):  # [b, p, F]: the cosine of each position's activation to two fixed directions
        flat = a.reshape(*a.shape[:2], -1)
        return (flat / flat.norm(dim=-1, keepdim=True))[..., :2]

    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=[hook])
    assert torch.isnan(cosine(cache[hook])).any()  # at the padding
    top = top_activations(model, hook, tokens, cosine, attention_mask=mask, k=4, quiet=True)
    listing, _ = reference(model, hook, rows, cosine)
    check_against(top, listing, rows, k=4)
    with pytest.raises(ValueError, match=r"feature 1 of blocks.0.hook_x is nan at prompt 2, position 3"):
        top_activations(model, hook, tokens, lambda a: torch.where(
            (torch.arange(a.shape[0])[:, None, None] == 2) & (torch.arange(a.shape[1])[None, :, None] ==
                                                              a.shape[1] - len(rows[2]) + 3)
            & (torch.arange(2) == 1), float("nan"), cosine(a).nan_to_num()), attention_mask=mask, quiet=True)


def test_features_from_numpy_ignore_masks_per_prompt_and_the_sae_config_check():
    import numpy as np

    model = tiny("mamba1")
    rows = prompts(n=6, seed=10)
    tokens, mask = left_padded(rows)
    hook = "blocks.0.hook_resid_pre"
    listing, _ = reference(model, hook, rows, lambda a: a)
    by_numpy = top_activations(model, hook, tokens, features=np.argsort(np.arange(16.0))[-2:], k=3,
                               attention_mask=mask, quiet=True)
    check_against(by_numpy, {f: listing[f] for f in (14, 15)}, rows, k=3, features=[14, 15])
    # ignore= as a bool mask over the whole dataset [N, p], cut per batch: here, every prompt's last token
    last = torch.zeros_like(tokens, dtype=torch.bool)
    last[:, -1] = True
    top = top_activations(model, hook, tokens, features=[3], k=30, attention_mask=mask, ignore=last | (tokens == BOS),
                          batch_size=4, quiet=True)
    kept = {3: [e for e in listing[3] if e[2] != len(rows[e[1]]) - 1]}
    check_against(top, kept, rows, k=30, features=[3])
    assert top.n_positions == sum(len(r) - 2 for r in rows)
    with pytest.raises(ValueError, match=r"must have the dataset's shape \(6, 10\)"):
        top_activations(model, hook, tokens, ignore=last[:3], attention_mask=mask, quiet=True)

    class SAE:
        class cfg:
            hook_name = "blocks.1.hook_resid_pre"

        def encode(self, a):
            return torch.relu(a)

    with pytest.warns(UserWarning, match="trained on blocks.1.hook_resid_pre"):
        top_activations(model, hook, tokens, SAE(), attention_mask=mask, quiet=True)


def test_bad_encoders_and_options_are_named():
    model = tiny("mamba2")
    tokens = torch.tensor(prompts(n=2, lo=5, hi=6))
    hook = "blocks.0.hook_resid_pre"
    with pytest.raises(ValueError, match="the encoder returned None"):
        top_activations(model, hook, tokens, lambda a: None, quiet=True)
    with pytest.raises(TypeError, match="got the string 'my_sae'"):
        top_activations(model, hook, tokens, "my_sae", quiet=True)
    with pytest.raises(TypeError, match="largest must be True or False"):
        top_activations(model, hook, tokens, largest="yes", quiet=True)
    with pytest.raises(ValueError, match=r"features \[1\] are named twice"):
        top_activations(model, hook, tokens, features=[1, 1], quiet=True)
    with pytest.raises(ValueError, match="no features"):
        top_activations(model, hook, tokens, lambda a: a[..., :0], quiet=True)
    with pytest.raises(ValueError, match="threshold must be a number"):
        top_activations(model, hook, tokens, threshold="0", quiet=True)


@pytest.mark.parametrize("cap", [1, 2])
def test_max_per_prompt_caps_the_examples_one_prompt_gives(cap):
    model = tiny("mamba2")
    rows = prompts(n=10, seed=12, lo=6, hi=12)
    tokens, mask = left_padded(rows)
    hook = "blocks.1.hook_y"
    top = top_activations(model, hook, tokens, features=[0, 5, 9], k=6, max_per_prompt=cap, attention_mask=mask,
                          batch_size=3, quiet=True)
    listing, _ = reference(model, hook, rows, lambda a: a.reshape(*a.shape[:2], -1)[..., [0, 5, 9]])
    capped = {}
    for i, f in enumerate([0, 5, 9]):
        by_prompt = {}
        for entry in listing[i]:
            by_prompt.setdefault(entry[1], []).append(entry)
        capped[f] = [e for entries in by_prompt.values() for e in sorted(entries, key=lambda e: -e[0])[:cap]]
    check_against(top, capped, rows, k=6, features=[0, 5, 9], column_of=[0, 5, 9].index)
    for i in range(3):
        kept = top.prompt[i][top.prompt[i] >= 0].tolist()
        assert max(kept.count(r) for r in kept) <= cap
    uncapped = top_activations(model, hook, tokens, features=[0, 5, 9], k=6, attention_mask=mask, quiet=True)
    assert any(max(r.tolist().count(v) for v in r.tolist()) > cap for r in uncapped.prompt)  # the cap matters here
    with pytest.raises(ValueError, match="max_per_prompt"):
        top_activations(model, hook, tokens, max_per_prompt=0, quiet=True)


def test_a_tokenizers_batch_encoding_is_a_dataset_and_an_empty_mask_is_refused():
    tok = make_tokenizer()
    model = tiny("mamba2", tokenizer=tok)
    texts = ["the cat sat on the mat", "john ran", "mary gave john a red drink"]
    encoded = tok(texts, return_tensors="pt", padding=True)  # a BatchEncoding (a UserDict), right padded
    assert not isinstance(encoded, dict)
    hook = "blocks.0.hook_resid_post"
    rows = [model.to_tokens(t, prepend_bos=False)[0].tolist() for t in texts]
    listing, _ = reference(model, hook, rows, lambda a: a[..., [2, 4]])
    listing = {[2, 4][i]: v for i, v in listing.items()}
    for dataset in (encoded, [encoded]):
        top = top_activations(model, hook, dataset, features=[2, 4], k=5, quiet=True)
        check_against(top, listing, rows, k=5, features=[2, 4], column_of=[2, 4].index)
    with pytest.raises(ValueError, match=r"features is empty \(an all-False mask\)"):
        top_activations(model, hook, encoded, features=torch.zeros(16, dtype=torch.bool), quiet=True)


def test_features_ranked_a_slice_at_a_time_give_the_same_examples(monkeypatch):
    """With CHUNK_ELEMENTS forcing one feature per slice (a large dictionary's path), the examples,
    contexts and frequencies are still those of the reference."""
    import tl_mamba.circuits.activation_examples as examples

    model = tiny("mamba1")
    rows = prompts(seed=13)
    tokens, mask = left_padded(rows)
    hook = "blocks.1.hook_y"
    monkeypatch.setattr(examples, "CHUNK_ELEMENTS", 1)
    top = top_activations(model, hook, tokens, features=range(0, 32, 3), k=4, attention_mask=mask, batch_size=4,
                          quiet=True)
    listing, counted = reference(model, hook, rows, lambda a: a)
    chosen = list(range(0, 32, 3))
    check_against(top, {f: listing[f] for f in chosen}, rows, k=4, features=chosen)
    fired = torch.tensor([sum(v > 0 for v, _, _ in listing[f]) for f in chosen], dtype=torch.float64)
    assert torch.allclose(top.frequency, fired / counted)
