"""Legitimate but unusual calls that used to leave wrong numbers or crash (found by a
robustness audit): in-place hook edits, hooks writing into padding, an empty batch,
gradient methods under ``torch.inference_mode``, a hook that re-enters the model, and
models built from one config object.

References are the model run another way that does not involve the fixed code path:
the prompt run alone (no padding), an edit returned as a new tensor, a fresh model.
"""

from __future__ import annotations

import pytest
import torch

import tl_mamba
from tl_mamba import HookedMamba, HookedMambaConfig, Knockout

TOY = ["toy-mamba", "toy-mamba2"]


@pytest.fixture(scope="module", params=TOY)
def toy(request):
    return tl_mamba.from_pretrained(request.param)


def prompts(model, seed=1):
    """A 10-token and a 6-token prompt, and the batch of both left-padded to 10 with its mask."""
    g = torch.Generator().manual_seed(seed)
    long = torch.randint(4, model.cfg.d_vocab, (1, 10), generator=g)
    short = torch.randint(4, model.cfg.d_vocab, (1, 6), generator=g)
    batch = torch.cat([long, torch.cat([torch.full((1, 4), model._pad_id()), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    return long, short, batch, mask


def test_in_place_edit_of_hook_mixer_in_reaches_only_the_mixer(toy):
    """hook_mixer_in is a copy of resid_pre for this block's mixer: an in-place edit there must
    not change the residual stream (resid_post = the clean resid_pre + mixer_out) nor the
    cached hook_resid_pre, and it acts like the same edit returned as a new tensor."""
    tokens, _, _, _ = prompts(toy)

    def in_place(x, hook):
        x[:, 3] = 0

    def as_copy(x, hook):
        x = x.clone()
        x[:, 3] = 0
        return x

    names = ["blocks.1.hook_resid_pre", "blocks.1.hook_mixer_out", "blocks.1.hook_resid_post"]
    with torch.no_grad():
        _, clean = toy.run_with_cache(tokens, names_filter=names)
        with toy.hooks(fwd_hooks=[("blocks.1.hook_mixer_in", in_place)]):
            logits, edited = toy.run_with_cache(tokens, names_filter=names)
        copied = toy.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_mixer_in", as_copy)])
    torch.testing.assert_close(edited["blocks.1.hook_resid_pre"], clean["blocks.1.hook_resid_pre"], rtol=0, atol=0)
    torch.testing.assert_close(edited["blocks.1.hook_resid_post"],
                               clean["blocks.1.hook_resid_pre"] + edited["blocks.1.hook_mixer_out"])
    assert (edited["blocks.1.hook_mixer_out"] - clean["blocks.1.hook_mixer_out"]).abs().max() > 1e-3
    torch.testing.assert_close(logits, copied, rtol=0, atol=0)


@pytest.mark.parametrize("hooks", [["hook_conv_in"], ["hook_x", "hook_B"]])
def test_hooks_writing_into_left_padding_leave_the_real_tokens_alone(toy, hooks):
    """A steering hook adds to every position, pads included. At the real tokens a left-padded
    batch must still give the prompt run alone with the same hook (API.md): the conv must not
    read what a hook wrote at a pad, and a pad must not write into the state."""
    _, short, batch, mask = prompts(toy)
    fwd_hooks = [(f"blocks.1.{name}", lambda t, hook: t + 0.3) for name in hooks]
    with torch.no_grad():
        alone = toy.run_with_hooks(short, fwd_hooks=fwd_hooks)[0]
        padded = toy.run_with_hooks(batch, attention_mask=mask, fwd_hooks=fwd_hooks)[1, 4:]
        unhooked = toy(short)[0]
    assert (alone - unhooked).abs().max() > 1e-2  # the hook does something
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)


def test_an_empty_batch_gives_empty_logits(toy):
    """b = 0 with a model whose tokenizer has a pad token (the padding check read max() of nothing)."""
    with torch.no_grad():
        logits = toy(torch.zeros(0, 5, dtype=torch.long))
    assert logits.shape == (0, 5, toy.cfg.d_vocab)


def test_gradient_methods_run_under_inference_mode(toy):
    """attribute and feature_attribution differentiate inside: an outer inference_mode must
    give the same scores as no context at all."""
    from tl_mamba.circuits import Graph, attribute, feature_attribution

    long, _, _, _ = prompts(toy)
    clean = torch.cat([long, long])
    corrupted = clean.clone()
    corrupted[:, 2] = (corrupted[:, 2] + 1) % toy.cfg.d_vocab

    def metric(logits):
        return logits[:, -1, 5] - logits[:, -1, 6]

    class SAE:  # a fixed random ReLU SAE on the residual stream
        def __init__(self, d, width=8):
            g = torch.Generator().manual_seed(0)
            self.enc = torch.randn(d, width, generator=g) / d ** 0.5
            self.dec = torch.randn(width, d, generator=g) / width ** 0.5

        def encode(self, x):
            return torch.relu(x @ self.enc)

        def decode(self, f):
            return f @ self.dec

    saes = {"blocks.1.hook_resid_pre": SAE(toy.cfg.d_model)}
    graph = attribute(toy, Graph.from_model(toy, "layer"), clean, corrupted, metric, quiet=True)
    features = feature_attribution(toy, saes, clean, corrupted, metric, quiet=True)
    with torch.inference_mode():
        graph_inf = attribute(toy, Graph.from_model(toy, "layer"), clean, corrupted, metric, quiet=True)
        features_inf = feature_attribution(toy, saes, clean, corrupted, metric, quiet=True)
    assert graph.scores.abs().max() > 0
    torch.testing.assert_close(graph_inf.scores, graph.scores)
    name = "blocks.1.hook_resid_pre"
    torch.testing.assert_close(features_inf[name].scores, features[name].scores)


def test_a_hook_that_runs_the_model_again_keeps_the_conv_knockout(toy):
    """A hook on hook_conv may run the model on other tokens (a lazy patch source); the conv
    knockout of the outer forward still finds its conv input afterwards."""
    tokens, _, _, _ = prompts(toy)
    other = tokens.flip(1)
    ko = Knockout(layers=[1], sources=[3], targets=[4], path="conv")
    busy = [False]

    def reenter(conv, hook):
        if not busy[0]:
            busy[0] = True
            try:
                toy.run_with_cache(other, names_filter=[hook.name])
            finally:
                busy[0] = False
        return conv

    with torch.no_grad():
        expected = toy.run_with_knockout(tokens, ko)
        with toy.hooks(fwd_hooks=[("blocks.1.hook_conv", reenter)]), toy.knockouts(ko):
            got = toy(tokens)
    assert (expected - toy(tokens)).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_models_built_from_one_config_do_not_share_it():
    """.double() keeps cfg.dtype in step with the weights: of this model only."""
    cfg = HookedMambaConfig(n_layers=1, d_model=16, d_vocab=32, seed=0)
    a, b = HookedMamba(cfg), HookedMamba(cfg)
    a.double()
    assert a.cfg.dtype == torch.float64
    assert b.cfg.dtype == torch.float32 and cfg.dtype in (None, torch.float32)
    assert b.embed.W_E.dtype == torch.float32


def test_an_empty_list_input_names_the_problem(toy):
    with pytest.raises(ValueError, match="empty list"):
        toy([])


def test_a_config_asking_to_normalise_before_the_gate_is_refused():
    """norm_before_gate=True was accepted and silently ignored (the model always gates first)."""
    with pytest.raises(ValueError, match="norm_before_gate"):
        HookedMambaConfig(family="mamba2", n_layers=1, d_model=32, d_vocab=16, d_head=16, norm_before_gate=True)


def test_a_hook_h_edit_written_into_left_padding_leaves_the_real_tokens_alone(toy):
    """An edit of the state at pad positions (here: the pads only, and the pads plus a real
    position) must not decay into the real tokens: they equal the prompt run alone with the
    real position's edit (it used to override the pads' states too)."""
    _, short, batch, mask = prompts(toy)

    def at(columns):
        def fn(h, hook):
            h = h.clone()
            h[:, columns] = h[:, columns] + 0.5
            return h
        return [("blocks.0.hook_h", fn)]

    with torch.no_grad():
        alone = toy(short)[0]
        pads_only = toy.run_with_hooks(batch, attention_mask=mask, fwd_hooks=at([0, 1, 2, 3]))[1, 4:]
        with_real = toy.run_with_hooks(batch, attention_mask=mask, fwd_hooks=at([0, 1, 2, 3, 6]))[1, 4:]
        real_alone = toy.run_with_hooks(short, fwd_hooks=at([2]))[0]
    assert (real_alone - alone).abs().max() > 1e-3
    torch.testing.assert_close(pads_only, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(with_real, real_alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_ssm_mask_is_in_the_scans_precision(family):
    """hook_ssm_mask is fp32, float64 in a float64 model: knockout attribution's float64 mask is then
    read as it is (a hook's return is read in the given dtype), and its gradients keep float64."""
    from test_knockout import make_model

    tokens = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(0))
    for dtype, expected in ((torch.float64, torch.float64), (torch.float32, torch.float32),
                            (torch.bfloat16, torch.float32)):
        model = make_model(family).to(dtype)
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_ssm_mask")
        assert cache["blocks.0.hook_ssm_mask"].dtype == expected, dtype


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_an_inf_written_at_one_position_stays_in_its_chunk(toy, backend):
    """docs/quickstart.md, "Backends": an inf reaches no position before its own (reference, and
    every Mamba-1 backend) or, in the chunked Mamba-2 form, none before its chunk's start.
    Reference: the clean run, position by position."""
    from tl_mamba.ops.ssd.chunked import DEFAULT_CHUNK

    toy.set_backend(backend)
    try:
        tokens = torch.randint(4, toy.cfg.d_vocab, (1, 2 * DEFAULT_CHUNK + 8), generator=torch.Generator().manual_seed(3))
        t = DEFAULT_CHUNK + 20

        def inf_at_t(x, hook):
            x = x.clone()
            x[:, t] = float("inf")
            return x

        with torch.no_grad():
            clean = toy(tokens)
            hit = toy.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_x", inf_at_t)])
        chunked = backend == "torch" and toy.cfg.family == "mamba2"
        first_touched = DEFAULT_CHUNK if chunked else t
        assert torch.equal(hit[:, :first_touched], clean[:, :first_touched])
        assert not torch.isfinite(hit[:, t]).all()
        if not chunked:
            assert torch.isfinite(hit[:, :t]).all()
    finally:
        toy.set_backend(None)
