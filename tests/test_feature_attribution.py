"""tl_mamba.circuits.feature_attribution: attribution patching on SAE features.

References are independent of the code under test: exact patching of one feature by a
hand-written hook (encode, swap the feature, decode, add the error back), the two
unhooked forwards whose metric difference EAP-IG must add up to (completeness), and
feature frequencies counted from a plain run_with_cache.
"""

from __future__ import annotations

import pytest
import torch

from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig
from tl_mamba.circuits import FeatureScores, feature_attribution

from conftest import RowCounter

B, P = 5, 7
FAMILIES = ["mamba1", "mamba2"]


def tiny(family: str):
    if family == "mamba1":
        cfg = HookedMambaConfig(n_layers=2, d_model=16, d_vocab=40, d_state=4, d_conv=4, expand=2, seed=0)
        model = HookedMamba(cfg)
    else:
        cfg = HookedMambaConfig(family="mamba2", n_layers=2, d_model=16, d_vocab=40, d_state=4, d_conv=4,
                                expand=2, n_heads=4, n_groups=2, chunk_size=4, seed=0)
        model = HookedMamba2(cfg)
    gen = torch.Generator().manual_seed(5)  # not the global stream: the same model whatever ran before
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * 0.2)
    return model.double()


class TinySAE(torch.nn.Module):
    """A ReLU SAE, as sae-lens writes one: f = relu((a - b_dec) W_enc + b_enc), â = f W_dec + b_dec."""

    def __init__(self, d_in: int, d_sae: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d_in, d_sae, generator=g, dtype=torch.float64) / d_in ** 0.5)
        self.b_enc = torch.nn.Parameter(torch.randn(d_sae, generator=g, dtype=torch.float64) * 0.1)
        self.W_dec = torch.nn.Parameter(torch.randn(d_sae, d_in, generator=g, dtype=torch.float64) / d_sae ** 0.5)
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, dtype=torch.float64))

    def encode(self, a):
        return torch.relu((a - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec + self.b_dec


def pair(seed=0, change=(2, 5)):
    g = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, 40, (B, P), generator=g)
    corrupted = clean.clone()
    for pos in change:
        corrupted[:, pos] = torch.randint(0, 40, (B,), generator=g)
    return clean, corrupted


def small_corruption(model):
    """Clean prompts with token 5 at position 3, and corrupted ones with token 39 there, whose
    embedding ``model`` now holds 1e-4 away from token 5's: first order is then exact enough
    to check EAP against real patching."""
    clean, _ = pair()
    clean[:, 3] = 5
    corrupted = clean.clone()
    corrupted[:, 3] = 39
    with torch.no_grad():
        model.embed.W_E[39] = model.embed.W_E[5] + 1e-4 * torch.randn(16, dtype=torch.float64,
                                                                       generator=torch.Generator().manual_seed(2))
    return clean, corrupted


def metric(logits):
    return logits[:, -1, 7] - logits[:, -1].mean(-1)


def patched_feature_metric(model, hook, sae, clean, corrupted, feature):
    """Mean metric of the clean run with one feature of ``hook``'s SAE set to its corrupted value."""
    with torch.no_grad():
        _, cache = model.run_with_cache(corrupted, names_filter=[hook])
        corrupted_features = sae.encode(cache[hook].reshape(B, P, -1))

        def swap(act, hook):
            flat = act.reshape(B, P, -1)
            features = sae.encode(flat)
            error = flat - sae.decode(features)
            features[..., feature] = corrupted_features[..., feature]
            return (sae.decode(features) + error).reshape(act.shape)

        return float(metric(model.run_with_hooks(clean, fwd_hooks=[(hook, swap)])).mean())


def exact_feature_effects(model, hook, sae, clean, corrupted, features):
    """``[len(features)]`` float64: the mean metric change of patching each feature alone."""
    with torch.no_grad():
        base = float(metric(model(clean)).mean())
    return torch.tensor([patched_feature_metric(model, hook, sae, clean, corrupted, f) - base for f in features],
                        dtype=torch.float64)


@pytest.mark.parametrize("family,hook,width", [("mamba1", "blocks.1.hook_resid_pre", 16),
                                               ("mamba2", "blocks.0.hook_x", 32)])
def test_eap_scores_match_exact_feature_patching_for_a_small_corruption(family, hook, width):
    """For a corruption 1e-4 away in embedding space, each feature's EAP score is the metric
    change of patching that feature alone (first order). Mamba-2's hook_x is per head
    ([b, p, h, hd]): the SAE reads it flattened."""
    model = tiny(family)
    clean, corrupted = small_corruption(model)
    sae = TinySAE(width, 24)
    result = feature_attribution(model, {hook: sae}, clean, corrupted, metric, quiet=True)[hook]
    assert isinstance(result, FeatureScores) and result.scores.shape == (24,) and result.error.shape == ()
    top = [f for f, _, _ in result.top(6)]
    exact = exact_feature_effects(model, hook, sae, clean, corrupted, top)
    assert float(exact.abs().max()) > 1e-8
    assert result.scores.dtype == torch.float64  # a float64 model's scores are not rounded to float32
    torch.testing.assert_close(result.scores[top], exact, rtol=2e-3, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_several_sites_score_as_each_alone(family):
    """SAEs at two layers: each site's EAP scores are those it gets alone (a later site's splice
    must not block the gradient to an earlier one), and so are its EAP-IG scores."""
    model = tiny(family)
    clean, corrupted = pair(seed=2)
    first, second = "blocks.0.hook_mixer_out", "blocks.1.hook_resid_pre"
    saes = {first: TinySAE(16, 12, seed=3), second: TinySAE(16, 10, seed=4)}
    for kw in (dict(method="EAP"), dict(method="EAP-IG", ig_steps=3)):
        both = feature_attribution(model, saes, clean, corrupted, metric, quiet=True, **kw)
        for name in saes:
            alone = feature_attribution(model, {name: saes[name]}, clean, corrupted, metric, quiet=True, **kw)[name]
            assert float(alone.scores.abs().max()) > 1e-4 and float(alone.error.abs()) > 1e-6
            torch.testing.assert_close(both[name].scores, alone.scores, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(both[name].error, alone.error, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("family", FAMILIES)
def test_eap_ig_scores_add_up_to_the_metric_difference_at_a_cut(family):
    """Every later computation reads hook_resid_pre of layer 1, so interpolating its features
    and error from corrupted to clean walks from the corrupted run to the clean one: with many
    IG steps the scores plus the error's add up to metric(corrupted) - metric(clean)."""
    model = tiny(family)
    clean, corrupted = pair(seed=1)
    hook = "blocks.1.hook_resid_pre"
    result = feature_attribution(model, {hook: TinySAE(16, 32, seed=1)}, clean, corrupted, metric,
                                 method="EAP-IG", ig_steps=200, quiet=True)[hook]
    with torch.no_grad():
        expected = float((metric(model(corrupted)) - metric(model(clean))).mean())
    assert abs(expected) > 1e-2
    total = float(result.scores.double().sum() + result.error.double())
    assert total == pytest.approx(expected, rel=2e-2)
    plain = feature_attribution(model, {hook: TinySAE(16, 32, seed=1)}, clean, corrupted, metric, quiet=True)[hook]
    assert not torch.allclose(plain.scores, result.scores, atol=1e-6)  # a different estimate, not EAP again


def test_per_position_scores_sum_to_the_totals_and_frequencies_are_counted():
    model = tiny("mamba2")
    clean, corrupted = pair()
    hook = "blocks.1.hook_mixer_in"
    sae = TinySAE(16, 20)
    totals = feature_attribution(model, {hook: sae}, clean, corrupted, metric, quiet=True)[hook]
    per_pos = feature_attribution(model, {hook: sae}, clean, corrupted, metric, per_position=True,
                                  batch_size=2, quiet=True)[hook]
    assert per_pos.scores.shape == (P, 20) and per_pos.error.shape == (P,)
    torch.testing.assert_close(per_pos.scores.sum(0), totals.scores, rtol=1e-5, atol=1e-7)
    assert float(per_pos.scores[:2].abs().max()) == 0.0  # nothing before the first corrupted token
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=[hook])
        counted = (sae.encode(cache[hook]) != 0).double().mean((0, 1))
    torch.testing.assert_close(totals.frequency.double(), counted, rtol=1e-6, atol=1e-7)
    common = [f for f, _, freq in totals.top(20, min_frequency=0.5)]
    assert common and all(counted[f] >= 0.5 for f in common)
    assert len(common) < len(totals.top(20))
    # the share of prompts in which a feature fires somewhere (the Mamba IOI report's count)
    with torch.no_grad():
        in_prompts = (sae.encode(cache[hook]) != 0).any(1).double().mean(0)
    torch.testing.assert_close(totals.prompt_frequency.double(), in_prompts, rtol=1e-6, atol=1e-7)
    assert bool((in_prompts > counted + 0.1).any())  # another quantity than the share of tokens
    by_prompts = totals.top(20, min_frequency=0.9, frequency_of="prompts")
    assert by_prompts and all(in_prompts[f] >= 0.9 and freq == pytest.approx(float(in_prompts[f]))
                              for f, _, freq in by_prompts)
    assert [f for f, _, _ in by_prompts] == [f for f, _, _ in totals.top(20) if in_prompts[f] >= 0.9][:len(by_prompts)]
    with pytest.raises(ValueError, match=r"frequency_of must be one of \('tokens', 'prompts'\), got 'tokenz'"):
        totals.top(5, frequency_of="tokenz")


@pytest.mark.parametrize("method", ["EAP", "EAP-IG"])
def test_left_padded_batch_scores_like_its_unpadded_prompts(method):
    model = tiny("mamba1")
    hook = "blocks.1.hook_resid_pre"
    sae = TinySAE(16, 12)
    long_clean, long_corrupted = pair(seed=3, change=(1, 6))
    short_clean, short_corrupted = pair(seed=4, change=(2,))
    short_clean, short_corrupted = short_clean[:3, :4], short_corrupted[:3, :4]
    pad = torch.zeros(3, P - 4, dtype=torch.long)
    clean = torch.cat([long_clean, torch.cat([pad, short_clean], 1)])
    corrupted = torch.cat([long_corrupted, torch.cat([pad, short_corrupted], 1)])
    mask = torch.ones_like(clean)
    mask[B:, :P - 4] = 0
    kw = dict(method=method, quiet=True, **({"ig_steps": 3} if method == "EAP-IG" else {}))
    padded = feature_attribution(model, {hook: sae}, clean, corrupted, metric, attention_mask=mask, **kw)[hook]
    parts = [feature_attribution(model, {hook: sae}, c, k, metric, **kw)[hook]
             for c, k in ((long_clean, long_corrupted), (short_clean, short_corrupted))]
    expected = (B * parts[0].scores.double() + 3 * parts[1].scores.double()) / (B + 3)
    assert float(expected.abs().max()) > 1e-3
    torch.testing.assert_close(padded.scores.double(), expected, rtol=1e-5, atol=1e-8)
    # the frequency is a share of real tokens: B·P of the long prompts, 3·4 of the short ones
    expected_freq = (B * P * parts[0].frequency.double() + 12 * parts[1].frequency.double()) / (B * P + 12)
    torch.testing.assert_close(padded.frequency.double(), expected_freq, rtol=1e-5, atol=1e-7)
    # the share of prompts: B long prompts and 3 short ones, padding no prompt's token
    expected_in = (B * parts[0].prompt_frequency.double() + 3 * parts[1].prompt_frequency.double()) / (B + 3)
    torch.testing.assert_close(padded.prompt_frequency.double(), expected_in, rtol=1e-5, atol=1e-7)


def test_bad_input_names_the_problem():
    model = tiny("mamba1")
    clean, corrupted = pair()
    sae = TinySAE(16, 8)
    with pytest.raises(ValueError, match="hook_resid_pree"):
        feature_attribution(model, {"blocks.0.hook_resid_pree": sae}, clean, corrupted, metric, quiet=True)
    with pytest.raises(TypeError, match="encode"):
        feature_attribution(model, {"blocks.0.hook_resid_pre": torch.nn.Linear(16, 8)}, clean, corrupted, metric)
    # a cache's shorthand key (it raised "expected string or bytes-like object, got 'tuple'")
    with pytest.raises(TypeError, match=r"full hook names \(strings\): 'blocks.0.hook_resid_pre' for \('resid_pre', 0\)"):
        feature_attribution(model, {("resid_pre", 0): sae}, clean, corrupted, metric, quiet=True)
    with pytest.raises(ValueError, match=r"could not encode .*\[b, p, 32\]"):
        feature_attribution(model, {"blocks.0.hook_y_gated": sae}, clean, corrupted, metric, quiet=True)
    with pytest.raises(ValueError, match="ig_steps applies"):
        feature_attribution(model, {"blocks.0.hook_resid_pre": sae}, clean, corrupted, metric, ig_steps=3)
    with pytest.raises(TypeError, match="needs a metric"):
        feature_attribution(model, {"blocks.0.hook_resid_pre": sae}, clean, corrupted)
    with pytest.raises(ValueError, match="saes is empty"):
        feature_attribution(model, {}, clean, corrupted, metric)
    with pytest.raises(ValueError, match="min_frequency"):
        feature_attribution(model, {"blocks.0.hook_resid_pre": sae}, clean, corrupted, metric,
                            quiet=True)["blocks.0.hook_resid_pre"].top(min_frequency=2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("steps", [2, 3])
def test_feature_eap_ig_is_the_riemann_sum_at_k_over_steps(family, steps):
    """EAP-IG over SAE features averages the gradient at α = k / ig_steps, k = 1..ig_steps (a
    left Riemann sum passes the steps → ∞ completeness check). The SAE reconstructs the site
    exactly (decode(f) + error), so interpolating features and error interpolates the site,
    a(α) = a_corr + α (a_clean - a_corr); then the feature and error scores add up to
    -(1/N) Σ_k f'(k/N) / B, f(α) = Σ_b metric_b(site = a(α)), f' by autograd on α."""
    model = tiny(family)
    hook = "blocks.0.hook_mixer_out"
    clean, corrupted = pair(change=(2, P - 1))
    sae = TinySAE(16, 24)
    scores = feature_attribution(model, {hook: sae}, clean, corrupted, metric, method="EAP-IG", ig_steps=steps,
                                 quiet=True)[hook]
    total_score = float(scores.scores.sum() + scores.error.sum())

    with torch.no_grad():
        _, c_clean = model.run_with_cache(clean, names_filter=[hook])
        _, c_corr = model.run_with_cache(corrupted, names_filter=[hook])
    a_clean, a_corr = c_clean[hook], c_corr[hook]
    total = 0.0
    for k in range(1, steps + 1):
        alpha = torch.tensor(k / steps, dtype=torch.float64, requires_grad=True)
        logits = model.run_with_hooks(clean, fwd_hooks=[(hook, lambda act, hook: a_corr + alpha * (a_clean - a_corr))])
        (d_alpha,) = torch.autograd.grad(metric(logits).sum(), alpha)
        total += float(d_alpha)
    expected = -total / steps / B
    assert abs(expected) > 1e-3
    assert total_score == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", ["EAP", "EAP-IG"])
def test_batch_size_splits_every_given_batch_of_a_list(method):
    """batch_size caps the rows per forward for a list of batches too (it was ignored): batches
    of 3 and 2 prompts run as 2 + 1 + 2 rows, and the scores and frequencies are those of all 5
    prompts at once (not a mean of chunk means), checked against the references above: exact
    feature patching for a small corruption (EAP), the Riemann sum at k / ig_steps (EAP-IG)
    and frequencies counted from a plain run_with_cache."""
    model = tiny("mamba2")
    hook = "blocks.0.hook_mixer_out"
    sae = TinySAE(16, 24)
    if method == "EAP":
        clean, corrupted = small_corruption(model)
        kw = {}
    else:
        clean, corrupted = pair(change=(2, P - 1))
        kw = {"ig_steps": 3}
    loader = [(clean[:3], corrupted[:3]), (clean[3:], corrupted[3:])]
    with RowCounter(model) as rows:
        split = feature_attribution(model, {hook: sae}, loader, None, metric, method=method, batch_size=2,
                                    quiet=True, **kw)[hook]
    assert rows and max(rows) <= 2, rows
    whole = feature_attribution(model, {hook: sae}, loader, None, metric, method=method, quiet=True, **kw)[hook]
    for field in ("scores", "error", "frequency", "prompt_frequency"):
        torch.testing.assert_close(getattr(split, field), getattr(whole, field), rtol=1e-9, atol=1e-12)
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=[hook])
        counted = (sae.encode(cache[hook]) != 0).double().mean((0, 1))
    torch.testing.assert_close(split.frequency.double(), counted, rtol=1e-9, atol=1e-12)
    if method == "EAP":
        top = [f for f, _, _ in split.top(6)]
        exact = exact_feature_effects(model, hook, sae, clean, corrupted, top)
        assert float(exact.abs().max()) > 1e-8
        torch.testing.assert_close(split.scores[top], exact, rtol=2e-3, atol=1e-10)
        return
    with torch.no_grad():
        _, c_corr = model.run_with_cache(corrupted, names_filter=[hook])
    a_clean, a_corr = cache[hook], c_corr[hook]
    total = 0.0
    for k in range(1, 4):
        alpha = torch.tensor(k / 3, dtype=torch.float64, requires_grad=True)
        logits = model.run_with_hooks(clean, fwd_hooks=[(hook, lambda act, hook: a_corr + alpha * (a_clean - a_corr))])
        (d_alpha,) = torch.autograd.grad(metric(logits).sum(), alpha)
        total += float(d_alpha)
    expected = -total / 3 / B
    assert abs(expected) > 1e-3
    assert float(split.scores.sum() + split.error.sum()) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_an_sae_trained_on_one_head_reads_that_head():
    """sae-lens's hook_head_index: the SAE reads head 2 of hook_x [b, p, h, hd]. Reference: the same
    SAE written out by hand over the flattened hook (zero weights outside head 2), whose features
    are the same and whose error holds the other heads too; and, for EAP, real feature patches."""
    from types import SimpleNamespace

    model = tiny("mamba2")
    hook, head, hd = "blocks.0.hook_x", 2, 8
    clean, corrupted = small_corruption(model)
    sae = TinySAE(hd, 12)
    sae.cfg = SimpleNamespace(metadata=SimpleNamespace(hook_head_index=head, hook_name=hook))
    flat = TinySAE(4 * hd, 12)
    with torch.no_grad():
        for weight in (flat.W_enc, flat.W_dec, flat.b_dec):
            weight.zero_()
        flat.W_enc[head * hd:(head + 1) * hd] = sae.W_enc
        flat.W_dec[:, head * hd:(head + 1) * hd] = sae.W_dec
        flat.b_enc.copy_(sae.b_enc)
    for method in ("EAP", "EAP-IG"):
        ours = feature_attribution(model, {hook: sae}, clean, corrupted, metric, method=method, quiet=True)[hook]
        by_hand = feature_attribution(model, {hook: flat}, clean, corrupted, metric, method=method, quiet=True)[hook]
        assert float(ours.scores.abs().max()) > 1e-10
        torch.testing.assert_close(ours.scores, by_hand.scores, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(ours.error, by_hand.error, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(ours.frequency, by_hand.frequency)
    top = [f for f, _, _ in ours.top(4)]
    eap = feature_attribution(model, {hook: sae}, clean, corrupted, metric, quiet=True)[hook]
    torch.testing.assert_close(eap.scores[top], exact_feature_effects(model, hook, flat, clean, corrupted, top),
                               rtol=2e-3, atol=1e-10)
    sae.cfg.metadata.hook_head_index = 4
    with pytest.raises(ValueError, match=r"names slice 4 \(hook_head_index\); blocks.0.hook_x has 4 heads"):
        feature_attribution(model, {hook: sae}, clean, corrupted, metric, quiet=True)
    sae.cfg.metadata.hook_head_index, sae.cfg.metadata.hook_name = 0, "blocks.0.hook_mixer_in"
    with pytest.raises(ValueError, match="has no head axis"):
        feature_attribution(model, {"blocks.0.hook_mixer_in": sae}, clean, corrupted, metric, quiet=True)
    sae.cfg.metadata.hook_name = "blocks.0.hook_h"
    with pytest.raises(ValueError, match=r"a head of Mamba-2's hook_h is a \[hd, n\] matrix"):
        feature_attribution(model, {"blocks.0.hook_h": sae}, clean, corrupted, metric, method="EAP-IG", quiet=True)
    # an SAE over the whole hook whose config still names a head: the message says which slice it got
    flat.cfg = SimpleNamespace(metadata=SimpleNamespace(hook_head_index=1, hook_name=hook))
    with pytest.raises(ValueError, match=r"could not encode slice 1 of its activations \[b, p, 4, 8\]"):
        feature_attribution(model, {hook: flat}, clean, corrupted, metric, quiet=True)

    # the head count comes from the config: no extra forward runs the user's hooks on a dummy batch
    batches_seen = []
    sae.cfg.metadata.hook_name, sae.cfg.metadata.hook_head_index = hook, head
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda act, hook: batches_seen.append(act.shape[0]))]):
        feature_attribution(model, {hook: sae}, clean, corrupted, metric, quiet=True)
    assert batches_seen and set(batches_seen) == {B}


def test_an_sae_trained_on_another_hook_warns():
    from types import SimpleNamespace

    model = tiny("mamba1")
    clean, corrupted = pair()
    sae = TinySAE(16, 8)
    sae.cfg = SimpleNamespace(metadata=SimpleNamespace(hook_name="blocks.0.hook_resid_pre"))
    with pytest.warns(UserWarning, match="trained on blocks.0.hook_resid_pre"):
        feature_attribution(model, {"blocks.1.hook_resid_pre": sae}, clean, corrupted, metric, quiet=True)


def test_eap_at_hook_h_is_refused_and_eap_ig_warns():
    """A feature patch at hook_h pins the states it edits; the gradient at the clean run carries each
    state through every later one. Shown here first (so that the refusal is about something real):
    the gradient at the clean states, dotted with a patch that edits consecutive positions, is not
    the finite-difference effect of that patch, while the gradient taken where those positions are
    edited is."""
    model = tiny("mamba1")
    clean, _ = pair()
    hook = "blocks.0.hook_h"
    with torch.no_grad():
        _, cache = model.run_with_cache(clean, names_filter=[hook])
    states = cache[hook]
    delta = torch.randn(states.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def value(h):
        with torch.no_grad():
            return float(metric(model.run_with_hooks(clean, fwd_hooks=[(hook, lambda a, hook: h)])).mean())

    def gradient_at(h):
        with torch.enable_grad():
            x = h.clone().requires_grad_(True)
            out = metric(model.run_with_hooks(clean, fwd_hooks=[(hook, lambda a, hook: a - a.detach() + x)])).mean()
            return torch.autograd.grad(out, x)[0]

    eps = 1e-6
    finite_difference = (value(states + eps * delta) - value(states)) / eps
    at_clean = float((gradient_at(states) * delta).sum())
    edited = states + 1e-3 * delta  # every entry edited: there the gradient is the patch's derivative
    assert float((gradient_at(edited) * delta).sum()) == pytest.approx(
        (value(edited + eps * delta) - value(edited)) / eps, rel=1e-4)
    assert abs(at_clean - finite_difference) > abs(finite_difference)  # 0.35 against 0.037

    sae = TinySAE(states[0, 0].numel(), 8)
    corrupted = pair(seed=1)[0]
    with pytest.raises(ValueError, match="method='EAP' at blocks.0.hook_h"):
        feature_attribution(model, {hook: sae}, clean, corrupted, metric, quiet=True)
    with pytest.warns(UserWarning, match="EAP-IG at blocks.0.hook_h"):
        feature_attribution(model, {hook: sae}, clean, corrupted, metric, method="EAP-IG", ig_steps=2, quiet=True)


def test_top_refuses_a_negative_count():
    model = tiny("mamba1")
    clean, corrupted = pair()
    scores = feature_attribution(model, {"blocks.1.hook_resid_pre": TinySAE(16, 6)}, clean, corrupted, metric,
                                 quiet=True)["blocks.1.hook_resid_pre"]
    assert len(scores.top(0)) == 0 and len(scores.top(3)) == 3
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="k must be an int >= 0"):
            scores.top(bad)
