"""Knockout attribution: the gradient of a metric with respect to ``hook_ssm_mask``.

(a) The mask gradient against an independent reference: ∂metric/∂M[i, j] =
    Σ_features ∂metric/∂y_i · α[i, j] · x_j, with α built from explicit products of
    the per-step decays (no cumulative sums, nothing from tl_mamba's scan code) and
    ∂metric/∂y from autograd on the plain model; and against central finite
    differences of the metric in single mask entries. Both families, every backend
    that runs on CPU (Triton in its interpreter, on tiny shapes).
(b) On the shipped toy Mamba-2, attribution scores of single-edge knockouts into the
    last token rank-correlate with the real knockouts.
(c) Shapes, head selection, batching, memory guard, errors and the plot.
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest
import torch

import tl_mamba
from tl_mamba import HookedMamba, HookedMambaConfig
from tl_mamba.circuits.knockout_attribution import (knockout_attribution, knockout_attribution_vs_knockout,
                                                    plot_knockout_attribution, rank_correlation)
from test_knockout import brute_alpha, make_model  # tiny float64 models; α by explicit decay products

B, P = 2, 6
BACKENDS = ["reference", "torch"] + (["triton"] if importlib.util.find_spec("triton") else [])


def metric(logits):
    """Per prompt: a logit difference at the last position (nonlinear in every mask)."""
    return logits[:, -1, 3] - logits[:, -1, 7] + 0.5 * logits[:, -2, 11]


def reference_scores(model, tokens, layer):
    """-mean_b ∂metric/∂M from α (explicit products), x and ∂metric/∂y (autograd, reference backend)."""
    cfg = model.cfg
    model.set_backend("reference")
    seen = {}

    def grab(value, hook):
        seen[hook.name.split(".")[-1]] = value
        if hook.name.endswith("hook_y"):
            value.retain_grad()
        return value

    prefix = f"blocks.{layer}."
    hooks = [(prefix + name, grab) for name in ("hook_x", "hook_delta", "hook_B", "hook_C", "hook_y")]
    logits = model.run_with_hooks(tokens, fwd_hooks=hooks)
    metric(logits).sum().backward()
    gy = seen["hook_y"].grad.detach()
    x, delta, Bm, C = (seen[k].detach() for k in ("hook_x", "hook_delta", "hook_B", "hook_C"))
    A = -torch.exp(model.blocks[layer].mixer.A_log.detach().double())
    model.zero_grad(set_to_none=True)
    if cfg.family == "mamba1":
        alpha = brute_alpha("mamba1", delta, A, Bm, C)  # [b, e, i, j]
        grad = torch.einsum("bie,beij,bje->bij", gy, alpha, x)
    else:
        alpha = brute_alpha("mamba2", delta, A, Bm, C, cfg.n_heads // cfg.n_groups)  # [b, h, i, j]
        grad = torch.einsum("bihd,bhij,bjhd->bhij", gy, alpha, x)
    return -grad.mean(0)


def metric_with_mask_entry(model, tokens, layer, head, i, j, value):
    """Mean metric with mask entry [:, head, i, j] of ``layer`` set to ``value`` (all rows)."""
    def set_entry(mask, hook):
        mask = mask.double()  # a float32 mask would round 1 ± eps
        mask[:, head, i, j] = value
        return mask

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_ssm_mask", set_entry)])
    return float(metric(logits).mean())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_mask_gradient_matches_brute_force(family, backend):
    torch.manual_seed(1)
    model = make_model(family)
    tokens = torch.randint(0, model.cfg.d_vocab, (B, P))
    expected = torch.stack([reference_scores(model, tokens, layer) for layer in range(model.cfg.n_layers)])
    model.set_backend(backend)
    scores = knockout_attribution(model, tokens, metric)
    # the triton kernel accumulates in fp32 even for float64 inputs
    tol = dict(rtol=1e-4, atol=1e-5) if backend == "triton" else dict(rtol=1e-8, atol=1e-10)
    if family == "mamba1":
        assert scores.shape == (2, P, P)
    else:
        assert scores.shape == (2, model.cfg.n_heads, P, P)
    assert scores.dtype == torch.float64
    torch.testing.assert_close(scores, expected.to(scores.dtype), **tol)
    assert float(expected.abs().max()) > 1e-3  # the comparison has signal
    upper = ~torch.ones(P, P, dtype=torch.bool).tril()
    assert bool((scores[..., upper] == 0).all())

    # finite differences of the metric in single mask entries: score ≈ metric(1 - eps) - metric(1) per eps
    eps = 1e-4 if backend != "triton" else 1e-2
    for layer, head, i, j in [(0, 0, P - 1, 1), (1, model.cfg.n_heads - 1 if family == "mamba2" else 0, P - 1, P - 1),
                              (0, 0, 3, 2)]:
        up = metric_with_mask_entry(model, tokens, layer, head, i, j, 1 + eps)
        down = metric_with_mask_entry(model, tokens, layer, head, i, j, 1 - eps)
        finite = -(up - down) / (2 * eps)
        value = float(scores[layer, i, j] if family == "mamba1" else scores[layer, head, i, j])
        assert abs(finite - value) <= (1e-6 if backend != "triton" else 1e-3) * max(1.0, abs(value)), \
            (layer, head, i, j, finite, value)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_attribution_under_existing_knockout_and_batching(family):
    """Edges already removed by another hook score 0; batching and heads/layers selection agree."""
    model = make_model(family)
    model.set_backend("torch")
    tokens = torch.randint(0, model.cfg.d_vocab, (5, P), generator=torch.Generator().manual_seed(3))
    full = knockout_attribution(model, tokens, metric)
    assert torch.allclose(knockout_attribution(model, tokens, metric, batch_size=2), full, rtol=1e-9, atol=1e-12)
    # a metric with per-prompt data: closed over (one batch), or indexed by rows (any batching)
    answers = torch.tensor([3, 7, 11, 3, 5])
    rows_all = torch.arange(5)
    closed = knockout_attribution(model, tokens, lambda logits: logits[rows_all, -1, answers])
    by_rows = knockout_attribution(model, tokens, lambda logits, rows: logits[torch.arange(len(rows)), -1, answers[rows]],
                                   batch_size=2)
    assert torch.allclose(by_rows, closed, rtol=1e-9, atol=1e-12)
    # a scalar metric is taken as the batch mean of the per-prompt metric
    scalar = knockout_attribution(model, tokens, lambda logits: metric(logits).mean(), batch_size=3)
    assert torch.allclose(scalar, full, rtol=1e-9, atol=1e-12)
    picked = knockout_attribution(model, tokens, metric, layers=[-1])
    torch.testing.assert_close(picked, full[1:])
    if family == "mamba2":
        heads = knockout_attribution(model, tokens, metric, layers=1, heads=[2, 0])
        torch.testing.assert_close(heads, full[1:, [2, 0]])

    def zero_edge(mask, hook):
        mask = mask.clone()
        mask[:, :, P - 1, 2] = 0
        return mask

    model.add_hook("blocks.0.hook_ssm_mask", zero_edge)
    try:
        under = knockout_attribution(model, tokens, metric, layers=[0])
    finally:
        model.reset_hooks()
    assert bool((under[0][..., P - 1, 2] == 0).all())
    assert float(full[0][..., P - 1, 2].abs().max()) > 0


def test_all_ones_gradient_mask_changes_no_value():
    """A mask that requires grad but removes nothing leaves the logits exactly as they are."""
    for family in ("mamba1", "mamba2"):
        model = make_model(family)
        tokens = torch.randint(0, model.cfg.d_vocab, (B, P), generator=torch.Generator().manual_seed(0))
        clean = model(tokens)

        def leaf(mask, hook):
            return torch.ones_like(mask, requires_grad=True)

        hooked = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_ssm_mask", leaf)])
        assert torch.equal(hooked, clean)


def test_mamba1_shapes_and_vs_knockout():
    model = make_model("mamba1")
    model.set_backend("torch")
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 7), generator=torch.Generator().manual_seed(5))
    scores = knockout_attribution(model, tokens, metric, layers=[1, 0])
    assert scores.shape == (2, 7, 7)
    check = knockout_attribution_vs_knockout(model, tokens, metric, layer=1, target=-1)
    assert check.sources == list(range(7)) and check.target == 6
    assert check.attribution.shape == check.knockout.shape == (7,)
    torch.testing.assert_close(check.attribution, scores[0, 6])
    # a tiny random model is close to linear in its masks: attribution ≈ real knockout
    assert check.spearman > 0.9


def test_progress_bars_over_batches_and_sources(capsys):
    """Both functions run for a minute on real inputs: a tqdm bar, off with progress=False, as in
    patch_layer_position and needle_accuracy."""
    model = make_model("mamba2")
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 6), generator=torch.Generator().manual_seed(3))
    quiet = knockout_attribution(model, tokens, metric, batch_size=2, progress=False)
    check = knockout_attribution_vs_knockout(model, tokens, metric, layer=1, progress=False)
    assert capsys.readouterr().err == ""
    torch.testing.assert_close(knockout_attribution(model, tokens, metric, batch_size=2), quiet)
    assert "knockout attribution" in capsys.readouterr().err
    loud = knockout_attribution_vs_knockout(model, tokens, metric, layer=1)
    err = capsys.readouterr().err
    assert "knockout attribution" in err and "knockouts of layer 1" in err
    torch.testing.assert_close(loud.knockout, check.knockout)


def test_errors_and_memory_guard():
    model = make_model("mamba2")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6))
    with pytest.raises(ValueError, match="one value per prompt"):
        knockout_attribution(model, tokens, lambda logits: logits[:, -1])
    # a NaN metric for one prompt would make that prompt's scores NaN: refused as attribute() refuses it
    with pytest.raises(ValueError, match=r"the metric returned nan for prompt\(s\) \[1\]"):
        knockout_attribution(model, tokens, lambda logits: metric(logits) * torch.tensor([1.0, float("nan")]))
    with pytest.raises(IndexError, match="out of range"):
        knockout_attribution(model, tokens, metric, layers=[5])
    with pytest.raises(IndexError, match="heads"):
        knockout_attribution(model, tokens, metric, heads=[9])
    with pytest.raises(IndexError, match=r"target 6 is out of range \[0, 6\)"):
        knockout_attribution_vs_knockout(model, tokens, metric, layer=0, target=6)
    with pytest.raises(IndexError, match=r"sources \[9\] out of range for 6"):  # not wrapped round to 3
        knockout_attribution_vs_knockout(model, tokens, metric, layer=0, sources=[1, 9])
    with pytest.raises(ValueError, match="heads= is for Mamba-2"):
        knockout_attribution(make_model("mamba1"), tokens, metric, heads=[0])
    # MASK_COPIES masks per prompt and layer, each [H=4, 6, 6] float64: one prompt over two layers does not fit
    from tl_mamba.circuits.knockout_attribution import MASK_COPIES

    assert MASK_COPIES >= 5  # 5.6 masks' worth of peak memory measured; 3 let calls peak at 1.8x the limit
    model.heavy_hook_memory_limit = MASK_COPIES * 2 * 4 * 36 * 8 - 1
    with pytest.raises(MemoryError, match="too long"):
        knockout_attribution(model, tokens, metric)
    with pytest.raises(MemoryError, match="batch_size=1"):  # one layer fits one prompt, not both
        knockout_attribution(model, tokens, metric, layers=[0])
    knockout_attribution(model, tokens, metric, layers=[0], batch_size=8)  # shrunk to 1
    with pytest.raises(ValueError, match="after the target"):
        knockout_attribution_vs_knockout(model, tokens, metric, layer=0, target=2, sources=[4])


def test_a_label_closure_split_by_batch_size_says_why():
    """logit_diff over [n] labels fails on a batch of fewer prompts with its own message; the
    note says batch_size split the prompts and how to give the metric its rows."""
    from tl_mamba.circuits import logit_diff

    model = make_model("mamba2")
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 6), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[3, 7], [5, 1], [2, 9], [4, 4]])
    closure = lambda logits: logit_diff(logits, labels)  # noqa: E731
    whole = knockout_attribution(model, tokens, closure, progress=False)  # one batch: fine
    for call in (lambda: knockout_attribution(model, tokens, closure, batch_size=2, progress=False),
                 lambda: knockout_attribution_vs_knockout(model, tokens, closure, layer=0, batch_size=3,
                                                          progress=False)):
        with pytest.raises(ValueError, match="label rows") as info:
            call()
        note = " ".join(getattr(info.value, "__notes__", []))
        assert "prompts 0..1 of 4" in note or "prompts 0..2 of 4" in note
        assert "metric(logits, rows)" in note
    by_rows = knockout_attribution(model, tokens, lambda logits, rows: logit_diff(logits, labels[rows]),
                                   batch_size=2, progress=False)
    torch.testing.assert_close(by_rows, whole)


def test_constant_effects_warn_that_correlations_are_nan():
    model = make_model("mamba1")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 5), generator=torch.Generator().manual_seed(2))
    with pytest.warns(UserWarning, match="all equal"):
        check = knockout_attribution_vs_knockout(model, tokens, lambda logits: logits[:, 0, 3], layer=0,
                                                 target=0, sources=[0, 0], progress=False)
    assert check.spearman != check.spearman  # NaN


def test_prompts_of_different_lengths_raise(tokenizer):
    cfg = HookedMambaConfig(n_layers=1, d_model=16, d_vocab=48, d_state=4, d_conv=3, seed=0,
                            bos_token_id=0, eos_token_id=1, pad_token_id=2)
    model = HookedMamba(cfg, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="one length"):
        knockout_attribution(model, ["the cat sat", "the cat sat on the mat"], lambda logits: logits[:, -1, 5])
    scores = knockout_attribution(model, ["the cat sat", "a dog ran"], lambda logits: logits[:, -1, 5])
    assert scores.shape == (1, 4, 4)  # BOS + 3 words


def test_rank_correlation():
    assert rank_correlation(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert rank_correlation(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    # ties get their average rank: ranks [0.5, 0.5, 2] against [0, 1, 2]
    assert rank_correlation(torch.tensor([1.0, 1, 2]), torch.tensor([1.0, 2, 3])) == pytest.approx(0.8660254, abs=1e-6)


def test_plot(tmp_path):
    scores = torch.randn(2, 3, 5, 5)
    paths = plot_knockout_attribution(scores, tmp_path / "plots", str_tokens=list("abcde"), layers=[4, 7])
    assert [p.name for p in paths] == ["layer4.png", "layer7.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    paths = plot_knockout_attribution(scores[:, 0], str(tmp_path / "attr_{layer}.png"), head=None)
    assert paths[1].name == "attr_1.png" and paths[1].exists()


# ------------------------------------------------------------------ (b) the shipped toy Mamba-2
def _same_length(prompts, k):
    length = Counter(p.n_tokens for p in prompts).most_common(1)[0][0]
    return [p for p in prompts if p.n_tokens == length][:k]


def _pooled_correlation(model, tokens, metric_fn):
    attribution, knockout = [], []
    for layer in range(model.cfg.n_layers):
        check = knockout_attribution_vs_knockout(model, tokens, metric_fn, layer, target=-1)
        attribution.append(check.attribution)
        knockout.append(check.knockout)
    return rank_correlation(torch.cat(attribution), torch.cat(knockout))


@pytest.fixture(scope="module")
def toy_mamba2():
    model = tl_mamba.from_pretrained("toy-mamba2")
    model.set_backend("torch")
    return model


def test_toy_mamba2_attribution_ranks_real_knockouts(toy_mamba2):
    """Every edge j → last token of every layer (4 × 15 on IOI, 4 × 9 on facts), pooled.

    Measured Spearman correlations (8 held-out prompts each, torch backend): IOI with
    the logit difference IO − S: 0.83 (per layer 0.98, 1.00, 0.72, 0.71); facts with the
    answer's log-probability: 0.69 (per layer 0.95, 0.98, 0.57, 0.67). The misses are the
    few large edges of the later layers (knocking out the IO name moves the logit
    difference by several units, where the metric is far from linear); the thresholds
    keep a margin of about 0.2 below the measured values (the computation is deterministic;
    the margin covers backend and platform rounding of the near-zero edges) while staying
    above what unrelated scores give (the two-sided 5% critical value of ρ is 0.25 for 60
    pairs, 0.33 for 36). The toy Mamba-1 gives 0.76 on the same IOI prompts.
    """
    from tl_mamba.toy import tasks

    model = toy_mamba2
    rows = torch.arange(8)

    ioi = _same_length(tasks.make_ioi(60, seed=0, split="heldout"), 8)
    batch = tasks.encode_prompts(ioi, model.tokenizer)
    tokens, answers = batch["tokens"], batch["answers"]
    subject = tokens[rows, torch.tensor([p.spans["S1"][0] for p in ioi])]

    def logit_diff(logits):  # [b]
        return logits[rows, -1, answers] - logits[rows, -1, subject]

    rho_ioi = _pooled_correlation(model, tokens, logit_diff)
    assert rho_ioi > 0.6, rho_ioi

    facts = _same_length(tasks.make_facts(80, seed=0, split="heldout"), 8)
    batch = tasks.encode_prompts(facts, model.tokenizer)
    tokens, answers = batch["tokens"], batch["answers"]

    def log_prob(logits):  # [b]
        return logits[rows, -1].log_softmax(-1)[rows, answers]

    rho_facts = _pooled_correlation(model, tokens, log_prob)
    assert rho_facts > 0.45, rho_facts


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_hook_h_gradient_unchanged_by_attribution_mask(family):
    """hook_h's gradient (the total derivative) is the same with an all-ones grad mask on the layer."""
    model = make_model(family)
    model.set_backend("torch")
    tokens = torch.randint(0, model.cfg.d_vocab, (B, P), generator=torch.Generator().manual_seed(2))
    grads = []
    for with_mask in (False, True):
        seen = {}

        def grab(states, hook):
            states.retain_grad()
            seen["h"] = states
            return states

        def leaf(mask, hook):
            seen["mask"] = torch.ones_like(mask, requires_grad=True)
            return seen["mask"]

        hooks = [("blocks.0.hook_h", grab)] + ([("blocks.0.hook_ssm_mask", leaf)] if with_mask else [])
        metric(model.run_with_hooks(tokens, fwd_hooks=hooks)).sum().backward()
        grads.append(seen["h"].grad)
        model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[1], grads[0])


@pytest.mark.parametrize("block", [4, 16])  # several blocks with a ragged last one; one block bigger than p
@pytest.mark.parametrize("chunk_bytes", [1, 2**28])  # one channel at a time; all channels at once
def test_edge_gradient_bpe_matches_explicit_products(block, chunk_bytes):
    """The blocked Mamba-1 mask gradient against Σ_e g_i[e] α_e[i, j] x_j[e], α by explicit decay
    products, with decays from about 1 down to e^-12 per step (the blocks' factors must not overflow)."""
    from tl_mamba.ops.knockout import edge_gradient_bpe

    gen = torch.Generator().manual_seed(51)
    b, p, e, n = 2, 23, 3, 4
    x, g = torch.randn(b, p, e, generator=gen, dtype=torch.float64), torch.randn(b, p, e, generator=gen, dtype=torch.float64)
    delta = torch.rand(b, p, e, generator=gen, dtype=torch.float64) * 3
    A = -torch.rand(e, n, generator=gen, dtype=torch.float64) * 4
    Bm, C = torch.randn(b, p, n, generator=gen, dtype=torch.float64), torch.randn(b, p, n, generator=gen, dtype=torch.float64)
    want = torch.einsum("bie,beij,bje->bij", g, brute_alpha("mamba1", delta, A, Bm, C), x)
    got = edge_gradient_bpe(g, x, delta, A, Bm, C, chunk_bytes=chunk_bytes, block=block)
    assert got.shape == (b, 1, p, p)
    torch.testing.assert_close(got[:, 0], want, rtol=1e-10, atol=1e-12)
    assert bool((got[:, 0].triu(1) == 0).all()) and want.abs().max() > 0
    got32 = edge_gradient_bpe(*(t.float() for t in (g, x, delta, A, Bm, C)), block=block)
    torch.testing.assert_close(got32[:, 0].double(), want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("mask_heads", [1, 4])  # a mask shared by the heads (summed over them); one per head
@pytest.mark.parametrize("chunk_bytes", [1, 2**28])  # one head at a time; all heads at once
def test_edge_gradient_bphd_matches_explicit_products(mask_heads, chunk_bytes):
    """The Mamba-2 mask gradient against g_i[h] · α_h[i, j] x_j[h], α by explicit decay products,
    2 groups; a shared mask's is the sum over the heads, head chunks accumulated as they come."""
    from tl_mamba.ops.knockout import edge_gradient_bphd

    gen = torch.Generator().manual_seed(52)
    b, p, h, hd, groups, n = 2, 9, 4, 3, 2, 5
    x, g = (torch.randn(b, p, h, hd, generator=gen, dtype=torch.float64) for _ in range(2))
    delta = torch.rand(b, p, h, generator=gen, dtype=torch.float64) * 2
    A = -torch.rand(h, generator=gen, dtype=torch.float64) * 3
    Bm, C = (torch.randn(b, p, groups, n, generator=gen, dtype=torch.float64) for _ in range(2))
    per_head = torch.einsum("bihd,bhij,bjhd->bhij", g, brute_alpha("mamba2", delta, A, Bm, C, h // groups), x)
    want = per_head if mask_heads == h else per_head.sum(1, keepdim=True)
    got = edge_gradient_bphd(g, x, delta, A, Bm, C, mask_heads=mask_heads, chunk_bytes=chunk_bytes)
    assert got.shape == (b, mask_heads, p, p) and want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_per_prompt_scores_match_brute_force_per_prompt(family):
    model = make_model(family)
    tokens = torch.randint(0, 50, (3, P), generator=torch.Generator().manual_seed(8))
    scores = knockout_attribution(model, tokens, metric, layers=[1], per_prompt=True, batch_size=2)
    H = model.cfg.n_heads if family == "mamba2" else None
    assert scores.shape == ((3, 1, H, P, P) if H else (3, 1, P, P))
    for row in range(3):
        expected = reference_scores(model, tokens[row:row + 1], 1)
        torch.testing.assert_close(scores[row, 0], expected, rtol=1e-7, atol=1e-10)
    model.set_backend("torch")
    torch.testing.assert_close(scores.mean(0), knockout_attribution(model, tokens, metric, layers=[1]),
                               rtol=1e-9, atol=1e-12)
    assert (scores[0] - scores[1]).abs().max() > 1e-3  # the prompts differ


def test_per_prompt_left_padded_strings_equal_each_prompt_alone(tokenizer):
    cfg = HookedMambaConfig(n_layers=2, d_model=16, d_vocab=48, d_state=4, d_conv=3, seed=0,
                            bos_token_id=0, eos_token_id=1, pad_token_id=2, dtype=torch.float64)
    model = HookedMamba(cfg, tokenizer=tokenizer)
    texts = ["the cat sat on the mat", "a dog ran"]
    scores = knockout_attribution(model, texts, metric, per_prompt=True)
    width = scores.shape[-1]
    for row, text in enumerate(texts):
        alone = knockout_attribution(model, text, metric)
        n = alone.shape[-1]
        torch.testing.assert_close(scores[row, :, width - n:, width - n:], alone, rtol=1e-7, atol=1e-10)
        assert scores[row, :, :, :width - n].abs().sum() == 0  # no edge from padding (row 1 has 3 pads)
    tokens, mask = model.to_tokens(texts, padding_side="left", return_attention_mask=True)
    torch.testing.assert_close(knockout_attribution(model, tokens, metric, per_prompt=True, attention_mask=mask),
                               scores, rtol=0, atol=0)
    # the returned scores count too: 8 prompts' scores (8 * 2 * 7 * 7 * 8 = 6272 bytes) over a limit that
    # one prompt's masks fit (MASK_COPIES * 2 * 7 * 7 * 8 = 4704 bytes)
    model.heavy_hook_memory_limit = 5000
    with pytest.raises(MemoryError, match="per-prompt"):
        knockout_attribution(model, texts * 4, metric, per_prompt=True, batch_size=1)
    assert knockout_attribution(model, texts, metric, per_prompt=True, batch_size=1).shape == scores.shape


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_mask_gradient_by_a_leaf_in_a_forward_hook_and_by_backward_hooks(family):
    """The documented recipe (a forward hook returning mask * leaf) gives ∂metric/∂mask, equal to the
    brute-force α reference; so do a backward hook on the mask and an ``incl_bwd`` cache naming it,
    as at any other TransformerLens hook."""
    model = make_model(family)
    tokens = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(2))
    leaves = {}

    def with_leaf(mask, hook):
        leaves[hook.name] = torch.ones_like(mask, dtype=torch.float64, requires_grad=True)
        return mask * leaves[hook.name]

    metric(model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_ssm_mask", with_leaf)])).sum().backward()
    got = -leaves["blocks.1.hook_ssm_mask"].grad.mean(0)
    expected = reference_scores(model, tokens, 1)  # -mean over the batch
    torch.testing.assert_close(got if family == "mamba2" else got[0], expected, rtol=1e-6, atol=1e-9)

    grads = {}
    model.add_hook("blocks.1.hook_ssm_mask", lambda grad, hook: grads.update({hook.name: grad.detach()}), dir="bwd")
    metric(model(tokens)).sum().backward()
    model.reset_hooks()
    got = -grads["blocks.1.hook_ssm_mask"].mean(0)
    torch.testing.assert_close(got if family == "mamba2" else got[0], expected.to(got.dtype), rtol=1e-5, atol=1e-7)

    # run_with_cache(incl_bwd=True) caches it under the TransformerLens name, and only where named
    _, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True,
                                    names_filter=["blocks.1.hook_ssm_mask", "blocks.1.hook_y"])
    assert {"blocks.1.hook_ssm_mask_grad", "blocks.1.hook_y_grad"} <= set(cache.keys())
    assert not any("hook_ssm_mask" in name for name in cache.keys() if not name.startswith("blocks.1."))
    H = model.cfg.n_heads if family == "mamba2" else 1
    assert cache["blocks.1.hook_ssm_mask_grad"].shape == (B, H, P, P)
    # the gradient of the loss with respect to the all-ones mask: a nonzero lower triangle only
    mask_grad = cache["blocks.1.hook_ssm_mask_grad"]
    assert float(mask_grad.abs().tril().sum()) > 0 and float(mask_grad.triu(1).abs().max()) == 0.0

    # and it is off the forward's path: the logits are those of a run without the hook
    model.add_hook("blocks.1.hook_ssm_mask", lambda grad, hook: None, dir="bwd")
    with_hook = model(tokens)
    model.reset_hooks()
    torch.testing.assert_close(with_hook, model(tokens), rtol=0, atol=0)

