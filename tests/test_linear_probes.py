"""linear_probe / probe_activations (tl_mamba.circuits.linear_probes). References: the activations
of each prompt run alone, unpadded, with run_with_cache; the logistic fit checked by the gradient
of its objective (recomputed here with autograd from those activations) vanishing at the result,
the ridge fit by the primal normal equations solved here."""

from __future__ import annotations

import warnings

import pytest
import torch

from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig
from tl_mamba.circuits import LinearProbe, fit_probe, linear_probe, probe_activations
from tl_mamba.errors import NotAnIndexError, OutOfRangeError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors (conftest)

V, BOS = 40, 0


def tiny(family):
    common = dict(n_layers=2, d_model=16, d_vocab=V, d_state=4, expand=2, seed=5, bos_token_id=BOS,
                  eos_token_id=1, pad_token_id=2)
    if family == "mamba1":
        return HookedMamba(HookedMambaConfig(**common)).double().eval()
    return HookedMamba2(HookedMambaConfig(family="mamba2", n_heads=4, n_groups=2, chunk_size=4, **common)).double().eval()


def prompts(n, seed=0, lo=4, hi=9):
    g = torch.Generator().manual_seed(seed)
    return [[BOS] + torch.randint(3, V, (int(m) - 1,), generator=g).tolist()
            for m in torch.randint(lo, hi, (n,), generator=g)]


def left_padded(rows):
    p = max(map(len, rows))
    tokens = torch.full((len(rows), p), 2, dtype=torch.long)
    mask = torch.zeros(len(rows), p, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, p - len(r):], mask[i, p - len(r):] = torch.tensor(r), 1
    return tokens, mask


def alone(model, hook, rows, positions):
    """Each prompt run alone, unpadded: its activation at its position, stacked."""
    out = []
    for r, t in zip(rows, positions):
        _, cache = model.run_with_cache(torch.tensor([r]), names_filter=[hook])
        out.append(cache[hook][0, t])
    return torch.stack(out)


@pytest.mark.parametrize("family,hook", [("mamba1", "blocks.1.hook_h"), ("mamba2", "blocks.0.hook_y"),
                                         ("mamba2", "blocks.1.hook_resid_post")])
def test_activations_at_positions_among_real_tokens_match_each_prompt_alone(family, hook):
    model = tiny(family)
    rows = prompts(7)
    tokens, mask = left_padded(rows)
    per_prompt = torch.tensor([1, -1, 0, -2, 2, -3, 3])
    got = probe_activations(model, hook, tokens, per_prompt, attention_mask=mask, batch_size=3)
    expected = alone(model, hook, rows, [int(t) % len(r) for t, r in zip(per_prompt, rows)])
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    last = probe_activations(model, hook, tokens, -1, attention_mask=mask)
    torch.testing.assert_close(last, alone(model, hook, rows, [len(r) - 1 for r in rows]), rtol=1e-10, atol=1e-12)


def standardised(X, train):
    mean, std = X[train].mean(0), X[train].std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean, std


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.1.hook_h"])  # 16 inputs; 128 (> prompts)
def test_the_logistic_probe_is_the_optimum_of_its_objective(hook):
    model = tiny("mamba1")
    rows = prompts(60, seed=1)
    tokens, mask = left_padded(rows)
    acts = alone(model, hook, rows, [len(r) - 1 for r in rows])
    X = acts.reshape(60, -1)
    labels = torch.tensor([r[-1] % 3 for r in rows]) * 10 + 7  # three classes, ids 7, 17, 27: the last token's
    l2 = 0.05
    probe = linear_probe(model, hook, tokens, labels, attention_mask=mask, l2=l2, test_fraction=0.25, seed=3)
    assert isinstance(probe, LinearProbe) and probe.kind == "classification"
    assert probe.classes.tolist() == [7, 17, 27] and probe.weight.shape == (3, *acts.shape[1:])
    train, test = probe.train_rows, probe.test_rows
    assert len(test) == 15 and sorted(train.tolist() + test.tolist()) == list(range(60))
    # the objective in the standardised inputs, from these activations: its gradient is zero at the fit
    mean, std = standardised(X, train)
    W_raw, b_raw = probe.weight.reshape(3, -1).double(), probe.bias.double()
    W = (W_raw * std).requires_grad_(True)
    b = (b_raw + W_raw @ mean).requires_grad_(True)
    target = torch.tensor([[7, 17, 27].index(int(v)) for v in labels])
    Z = (X - mean) / std
    loss = torch.nn.functional.cross_entropy(Z[train] @ W.T + b, target[train]) + 0.5 * l2 * W.pow(2).sum()
    gW, gb = torch.autograd.grad(loss, (W, b))
    assert float(gW.abs().max()) < 1e-6 and float(gb.abs().max()) < 1e-6
    # its accuracies and predictions, computed here
    scores = X @ W_raw.T + b_raw
    assert probe.train_accuracy == pytest.approx(float((scores[train].argmax(-1) == target[train]).double().mean()))
    assert probe.test_accuracy == pytest.approx(float((scores[test].argmax(-1) == target[test]).double().mean()))
    # labels that are a linear function of the activation: read without error (separable, weak penalty)
    planted = (X @ torch.randn(X.shape[1], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
               ).argmax(-1)
    fit = linear_probe(model, hook, tokens, planted, attention_mask=mask, l2=1e-6, test_fraction=0.0)
    assert fit.train_accuracy == 1.0
    assert probe.predict(acts).tolist() == [[7, 17, 27][i] for i in scores.argmax(-1).tolist()]
    torch.testing.assert_close(probe.direction(17, 27), probe.weight[1] - probe.weight[2])
    torch.testing.assert_close(probe.direction(7), probe.weight[0] - probe.weight[1:].mean(0))


@pytest.mark.parametrize("n", [30, 200])  # fewer and more prompts than the 128 inputs
def test_the_ridge_probe_solves_its_normal_equations(n):
    model = tiny("mamba1")
    rows = prompts(n, seed=2)
    tokens, mask = left_padded(rows)
    hook = "blocks.0.hook_h"
    X = alone(model, hook, rows, [len(r) - 2 for r in rows]).reshape(n, -1)
    g = torch.Generator().manual_seed(4)
    Y = X @ torch.randn(X.shape[1], 2, generator=g, dtype=torch.float64) + 0.1 * torch.randn(n, 2, generator=g,
                                                                                             dtype=torch.float64)
    l2 = 0.01
    probe = linear_probe(model, hook, tokens, Y, positions=-2, attention_mask=mask, l2=l2, test_fraction=0.2)
    assert probe.kind == "regression" and probe.classes is None
    train, test = probe.train_rows, probe.test_rows
    mean, std = standardised(X, train)
    Z = (X[train] - mean) / std
    Zc, Yc = Z - Z.mean(0), Y[train] - Y[train].mean(0)
    W = torch.linalg.solve(Zc.T @ Zc + len(train) * l2 * torch.eye(X.shape[1], dtype=torch.float64), Zc.T @ Yc).T
    W_raw = probe.weight.reshape(2, -1).double()
    torch.testing.assert_close(W_raw * std, W, rtol=1e-6, atol=1e-8)
    pred = X @ W_raw.T + probe.bias.double()
    torch.testing.assert_close(pred[train].mean(0), Y[train].mean(0))  # the intercept
    r2 = 1 - (Y[test] - pred[test]).pow(2).sum(0) / (Y[test] - Y[test].mean(0)).pow(2).sum(0)
    assert probe.metric == "r2" and probe.test_score == pytest.approx(float(r2.mean()))


def test_bad_probe_inputs_are_named():
    model = tiny("mamba2")
    rows = prompts(6)
    tokens, mask = left_padded(rows)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    hook = "blocks.0.hook_resid_post"
    with pytest.raises(ValueError, match=r"labels must be \[N\]"):
        linear_probe(model, hook, tokens, labels[:5], attention_mask=mask)
    with pytest.raises(ValueError, match=r"hold one class \(0\): a probe needs at least two"):
        linear_probe(model, hook, tokens, torch.zeros(6, dtype=torch.long), attention_mask=mask)
    with pytest.raises(ValueError, match=r"ints .classes. or floats.*0 / 1 ints: labels.long\(\)"):
        linear_probe(model, hook, tokens, labels.bool(), attention_mask=mask)
    import numpy as np

    for strings in (["Mary", "John"] * 3, np.array(["Mary", "John"] * 3)):
        with pytest.raises(ValueError, match=r"labels are strings.*names.index"):
            linear_probe(model, hook, tokens, strings, attention_mask=mask)
    # generators of labels and of positions are read once, as lists would be
    from_lists = linear_probe(model, hook, tokens, labels.tolist(), positions=[-1, -2] * 3, attention_mask=mask)
    from_generators = linear_probe(model, hook, tokens, (int(v) for v in labels), positions=(p for p in [-1, -2] * 3),
                                   attention_mask=mask)
    assert torch.equal(from_lists.weight, from_generators.weight)
    with pytest.raises(OutOfRangeError, match=r"position 8 is outside prompt \d's \d real tokens"):
        linear_probe(model, hook, tokens, labels, positions=8, attention_mask=mask)
    with pytest.raises(NotAnIndexError, match="positions"):
        probe_activations(model, hook, tokens, 1.5, attention_mask=mask)
    # a row of nothing but pads (an empty prompt, no mask given) has no token to read
    import tl_mamba

    toy = tl_mamba.from_pretrained("toy-mamba2")
    empty = toy.to_tokens(["The capital of Kor Mav Vor is", "Vel is"])
    empty[1] = toy._pad_id()
    with pytest.warns(UserWarning, match="looks like a left-padded batch"):  # (the forward's reading of it)
        with pytest.raises(OutOfRangeError, match=r"position -1 is outside prompt 1's 0 real tokens"):
            probe_activations(toy, hook, empty, -1)
    with pytest.raises(ValueError, match="test_fraction"):
        linear_probe(model, hook, tokens, labels, attention_mask=mask, test_fraction=1.0)
    with pytest.raises(ValueError, match="knockout mask"):
        probe_activations(model, "blocks.0.hook_ssm_mask", tokens)
    probe = linear_probe(model, hook, tokens, labels, attention_mask=mask, test_fraction=0.0)
    assert probe.test_rows.numel() == 0 and probe.test_accuracy != probe.test_accuracy  # NaN
    with pytest.raises(ValueError, match="not one of the probe's classes"):
        probe.direction(5)


def test_a_probe_direction_in_the_state_shape_reads_positions_with_top_activations():
    """probe.direction(...) is [e, n] for a Mamba-1 state: top_activations takes it as one direction,
    and its values are the projections computed here."""
    from tl_mamba.circuits import top_activations

    model = tiny("mamba1")
    rows = prompts(20, seed=6)
    tokens, mask = left_padded(rows)
    hook = "blocks.0.hook_h"
    labels = torch.tensor([r[-1] % 2 for r in rows])
    direction = linear_probe(model, hook, tokens, labels, attention_mask=mask, test_fraction=0.0).direction(1)
    assert direction.shape == (model.cfg.d_inner, model.cfg.d_state)
    top = top_activations(model, hook, tokens, direction, attention_mask=mask, k=3, quiet=True)
    projections = sorted((float((alone(model, hook, [r], [t])[0] * direction).sum()) for r in rows
                          for t in range(1, len(r))), reverse=True)[:3]
    assert top.values[0].tolist() == pytest.approx(projections, rel=1e-9)


def test_right_padding_without_a_mask_and_positions_as_a_list():
    """to_tokens pads on the right by default: without a mask, each row's trailing pad run is
    padding, so position -1 is each prompt's last real token."""
    from conftest import make_tokenizer

    model = HookedMamba2(HookedMambaConfig(family="mamba2", n_layers=2, d_model=16, d_vocab=V, d_state=4, expand=2,
                                           n_heads=4, n_groups=2, chunk_size=4, seed=5),
                         tokenizer=make_tokenizer()).double().eval()
    texts = ["the cat sat on the mat", "john ran", "mary gave john a red drink"]
    tokens = model.to_tokens(texts)
    assert model.tokenizer.padding_side == "right" and (tokens[1] == model.tokenizer.pad_token_id).any()
    rows = [model.to_tokens(t)[0].tolist() for t in texts]
    hook = "blocks.1.hook_h"
    torch.testing.assert_close(probe_activations(model, hook, tokens, -1),
                               alone(model, hook, rows, [len(r) - 1 for r in rows]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(probe_activations(model, hook, tokens, [1, 2, -2]),
                               alone(model, hook, rows, [1, 2, len(rows[2]) - 2]), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(probe_activations(model, hook, tokens, torch.tensor(1)),
                               alone(model, hook, rows, [1, 1, 1]), rtol=1e-10, atol=1e-12)


def test_fit_probe_splits_by_class_and_reports_the_majority_baseline():
    g = torch.Generator().manual_seed(8)
    acts = torch.randn(40, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0] * 30 + [1] * 6 + [2] * 4)
    probe = fit_probe(acts, labels, test_fraction=0.25, seed=1)
    train, test = probe.train_rows, probe.test_rows
    assert len(test) == 10 and sorted(train.tolist() + test.tolist()) == list(range(40))
    assert [int((labels[test] == c).sum()) for c in range(3)] in ([7, 2, 1], [8, 1, 1], [7, 1, 2])  # ~ 1/4 of each
    assert probe.class_counts.tolist() == [int((labels[train] == c).sum()) for c in range(3)]
    assert probe.majority == pytest.approx(float((labels[test] == 0).double().mean()))
    # every class keeps a training prompt, even where that leaves the test split short of its share
    few = fit_probe(acts[:4].clone(), torch.tensor([0, 0, 1, 1]), test_fraction=0.75)
    assert sorted(torch.tensor([0, 0, 1, 1])[few.train_rows].tolist()) == [0, 1]
    # a class with one prompt: stratified, it is trained on; drawn into the test split, it warns
    single = torch.tensor([0] * 17 + [1] * 18 + [2])
    assert 35 in fit_probe(acts[:36].clone(), single, seed=0).train_rows.tolist()
    for seed in range(50):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit = fit_probe(acts[:36].clone(), single, seed=seed, stratify=False)
        if 35 in fit.test_rows.tolist():
            assert any("classes [2] are in the test prompts only" in str(w.message) for w in caught)
            assert fit.classes.tolist() == [0, 1]
            break
    else:
        pytest.fail("no seed of 50 drew the single prompt of class 2 into the test split")
    # the same split and fit from linear_probe's own activations
    model = tiny("mamba1")
    rows = prompts(12, seed=3)
    tokens, mask = left_padded(rows)
    lab = torch.tensor([r[1] % 2 for r in rows])
    via_model = linear_probe(model, "blocks.0.hook_resid_post", tokens, lab, attention_mask=mask, seed=4)
    direct = fit_probe(probe_activations(model, "blocks.0.hook_resid_post", tokens, attention_mask=mask), lab, seed=4)
    assert via_model.hook == "blocks.0.hook_resid_post" and direct.hook is None
    torch.testing.assert_close(via_model.weight, direct.weight)
    assert torch.equal(via_model.test_rows, direct.test_rows)


def test_fit_probe_refuses_what_it_cannot_fit():
    acts = torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    labels = torch.tensor([0, 1] * 5)
    nan_acts = acts.clone()
    nan_acts[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"activations of prompts \[3\] hold NaN"):
        fit_probe(nan_acts, labels)
    with pytest.raises(ValueError, match=r"labels of prompts \[2\] are NaN or infinite"):
        fit_probe(acts, torch.tensor([0.0, 1, float("inf")] + [0.0] * 7))
    for kwargs, pattern in ((dict(l2=float("inf")), "l2 must be a finite"), (dict(max_iter=0), "max_iter"),
                            (dict(seed=None), "seed must be an int"), (dict(test_fraction=1), "test_fraction")):
        with pytest.raises(ValueError, match=pattern):
            fit_probe(acts, labels, **kwargs)
    with pytest.raises(ValueError, match="no prompts"):
        fit_probe(acts[:0], labels[:0])
    with pytest.warns(UserWarning, match="before its gradient tolerance"):
        fit_probe(acts, labels, max_iter=1, l2=1e-6)
    probe = fit_probe(acts, labels)
    with pytest.raises(ValueError, match="integer labels"):
        probe.direction("a")
    with pytest.raises(AttributeError, match="no accuracy"):
        fit_probe(acts, acts[:, 0].clone()).test_accuracy
    # a regression on [N] targets predicts [...]; R² of constant test targets is NaN, not -1e300
    ridge = fit_probe(acts, torch.cat([acts[:, 0], torch.zeros(0, dtype=torch.float64)]), test_fraction=0.3)
    assert ridge.predict(acts).shape == (10,)
    constant = fit_probe(acts, torch.ones(10, dtype=torch.float64), test_fraction=0.3)
    assert constant.test_score != constant.test_score


def test_several_hooks_in_one_pass_give_each_hook_its_own_activations_and_probe():
    model = tiny("mamba2")
    rows = prompts(16, seed=11)
    tokens, mask = left_padded(rows)
    hooks = ["blocks.0.hook_h", "blocks.1.hook_resid_pre", "blocks.1.hook_y"]
    calls = []
    model.blocks[0].register_forward_hook(lambda *args: calls.append(1))
    acts = probe_activations(model, hooks, tokens, -1, attention_mask=mask, batch_size=8)
    assert list(acts) == hooks and len(calls) == 2  # two batches, one forward each
    for hook in hooks:
        torch.testing.assert_close(acts[hook], alone(model, hook, rows, [len(r) - 1 for r in rows]),
                                   rtol=1e-10, atol=1e-12)
    labels = torch.tensor([r[-1] % 2 for r in rows])
    probes = linear_probe(model, hooks, tokens, labels, attention_mask=mask, seed=2)
    assert list(probes) == hooks
    for hook in hooks:
        alone_probe = linear_probe(model, hook, tokens, labels, attention_mask=mask, seed=2)
        assert probes[hook].hook == hook and torch.equal(probes[hook].test_rows, alone_probe.test_rows)
        torch.testing.assert_close(probes[hook].weight, alone_probe.weight)
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # in a sweep, a fit's warning names its hook
        warnings.simplefilter("always")
        linear_probe(model, hooks, tokens, labels, attention_mask=mask, seed=2, max_iter=1, l2=1e-6)
    stopped = [str(w.message) for w in caught if "before its gradient tolerance" in str(w.message)]
    assert sorted(message.split(":")[0] for message in stopped) == sorted(hooks)
    with pytest.raises(ValueError, match="non-empty list"):
        probe_activations(model, [], tokens)


def test_a_bool_position_is_refused_and_an_unsplittable_set_warns():
    import numpy as np

    model = tiny("mamba1")
    tokens, mask = left_padded(prompts(4))
    for position in (torch.tensor(True), np.False_):
        with pytest.raises(ValueError, match="positions must be one int"):
            probe_activations(model, "blocks.0.hook_resid_post", tokens, position, attention_mask=mask)
    acts = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="no prompt could be held out"):
        probe = fit_probe(acts, torch.tensor([0, 1, 2, 3]), test_fraction=0.5)
    assert probe.test_rows.numel() == 0
