"""TransformerLens behaviour that must hold unchanged on HookedMamba and HookedMamba2
(transformer-lens 3.9 and 4.x): the ``model`` fixture runs every test on both families.

Covers: run_with_hooks / hooks() / add_hook / reset_hooks / backward hooks,
run_with_cache and its options, cache shorthand keys, the residual-stream
analysis helpers of ``ActivationCache``, the folded ``W_U``, and
``transformer_lens.patching``. Every check compares against an independent
reference: a manual computation from weights, a separate run, or autograd.
"""

from __future__ import annotations

import math

import re

import pytest
import torch
import torch.nn.functional as F
import transformer_lens
import transformer_lens.patching as tl_patching

from tl_mamba import HookedMamba, HookedMamba2

from conftest import tiny_config

ATOL = 1e-5
RTOL = 1e-4
HEAVY = ("hook_h", "hook_ssm_mask")


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def perturb_(model, scale=0.1, seed=0):
    """Noise on every parameter, so that unit norm weights / D = 1 cannot hide a bug."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return model


def final_norm_weight(model):
    params = [p for name, p in model.named_parameters() if name.startswith("ln_final")]
    assert len(params) == 1, "expected exactly one parameter (the weight) in ln_final"
    return params[0]


def manual_rms(x, eps):
    x = x.float()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.fixture(params=["mamba1", "mamba2"])
def model(request, tiny_model, tokenizer):
    if request.param == "mamba1":
        return perturb_(tiny_model)
    torch.manual_seed(0)  # two groups of three heads: the group axis is not a no-op
    mamba2 = HookedMamba2(tiny_config(family="mamba2", d_head=8, n_groups=2, chunk_size=4), tokenizer=tokenizer)
    return perturb_(mamba2.eval())


@pytest.fixture
def mamba1_model(tiny_model):
    """For the checks of Mamba-1's own config fields and hook shapes."""
    return perturb_(tiny_model)


@pytest.fixture
def tokens(model):
    return model.to_tokens(["the cat sat on the mat and then ran", "mary gave john a drink to the park"])


def is_heavy(name):
    return name.rsplit(".", 1)[-1] in HEAVY


# --------------------------------------------------------------------------- hooks


def test_run_with_hooks_by_name_edit_flows_downstream(model, tokens):
    """Zeroing the last mixer's write gives logits = unembed(final norm(resid_pre of the last block))."""
    n = model.cfg.n_layers
    clean = model(tokens)
    _, cache = model.run_with_cache(tokens)
    resid = cache[f"blocks.{n - 1}.hook_resid_pre"]
    w = final_norm_weight(model)
    expected = (manual_rms(resid, model.cfg.eps) * w) @ model.W_E.T  # tied embeddings

    def zero(act, hook):
        return torch.zeros_like(act)

    edited = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{n - 1}.hook_mixer_out", zero)])
    close(edited, expected)
    assert not torch.allclose(edited, clean, atol=1e-4)
    # the hook is gone afterwards
    close(model(tokens), clean, atol=0, rtol=0)


def test_run_with_hooks_filter_function(model, tokens):
    seen = {}

    def record(act, hook):
        seen[hook.name] = tuple(act.shape)

    model.run_with_hooks(tokens, return_type=None, fwd_hooks=[(lambda name: name.endswith("hook_x"), record)])
    b, p = tokens.shape
    x_shape = (b, p, model.cfg.n_heads, model.cfg.d_head) if isinstance(model, HookedMamba2) else (b, p, model.cfg.d_inner)
    assert seen == {f"blocks.{l}.hook_x": x_shape for l in range(model.cfg.n_layers)}

    # zeroing every SSM output (filter) leaves only the embedding in the residual stream:
    # mixer_out = out_proj(0) (+ bias if any)
    def zero(act, hook):
        return torch.zeros_like(act)

    out, cache = None, None
    with model.hooks(fwd_hooks=[(lambda name: name.endswith("hook_y"), zero)]):
        out, cache = model.run_with_cache(tokens)
    resid = cache["hook_embed"].clone()
    for l in range(model.cfg.n_layers):
        bias = model.blocks[l].mixer.out_proj.bias
        if bias is not None:
            resid = resid + bias
    expected = (manual_rms(resid, model.cfg.eps) * final_norm_weight(model)) @ model.W_E.T
    close(out, expected)


def test_hooks_context_and_add_hook_reset_hooks(model, tokens):
    clean = model(tokens)
    calls = []

    def scale(act, hook):
        calls.append(hook.name)
        return act * 0.5

    name = "blocks.0.hook_conv"
    with model.hooks(fwd_hooks=[(name, scale)]):
        in_context = model(tokens)
    after_context = model(tokens)
    assert calls == [name]
    assert not torch.allclose(in_context, clean, atol=1e-5)
    close(after_context, clean, atol=0, rtol=0)

    # same edit through run_with_hooks: identical logits (independent mechanism)
    close(model.run_with_hooks(tokens, fwd_hooks=[(name, lambda a, hook: a * 0.5)]), in_context, atol=0, rtol=0)

    model.add_hook(name, scale)
    persistent_1 = model(tokens)
    persistent_2 = model(tokens)
    close(persistent_1, in_context, atol=0, rtol=0)
    close(persistent_2, in_context, atol=0, rtol=0)
    assert calls == [name] * 3
    model.reset_hooks()
    close(model(tokens), clean, atol=0, rtol=0)
    assert len(calls) == 3


@pytest.mark.parametrize("hook_name", ["blocks.0.hook_x", "blocks.1.hook_B", "blocks.0.hook_resid_post", "blocks.1.hook_h"])
def test_backward_hook_matches_autograd(model, tokens, hook_name):
    # reference: retain the forward activation and differentiate the loss w.r.t. it
    stored = {}

    def keep(act, hook):
        stored["act"] = act
        return act

    loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(hook_name, keep)])
    (expected,) = torch.autograd.grad(loss, stored["act"])
    assert expected.abs().sum() > 0

    grads = []

    def grab(grad, hook):
        grads.append(grad.detach().clone())

    model.add_hook(hook_name, grab, dir="bwd")
    try:
        loss2 = model(tokens, return_type="loss")
        loss2.backward()
    finally:
        model.reset_hooks(including_permanent=False)
        model.zero_grad(set_to_none=True)
    assert len(grads) == 1
    assert grads[0].shape == stored["act"].shape
    close(grads[0], expected, atol=1e-6, rtol=1e-4)


def test_torch_hooks_registered_on_a_hook_point_fire_as_transformer_lens_hooks(model, tokens):
    # A hook point is an nn.Module: a hook registered with torch's register_forward_hook (as some
    # tools do) must be called where add_hook's is, heavy hooks and the fused gate included.
    expected_logits, expected = _record_all(model, tokens)
    seen, handles = {}, []
    for name, hook_point in model.hook_dict.items():
        def record(module, inputs, output, name=name):
            seen[name] = output.detach().clone()
        handles.append(hook_point.register_forward_hook(record))
    try:
        with torch.no_grad():
            logits = model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(seen) == sorted(expected)
    for name in expected:
        close(seen[name], expected[name], atol=0, rtol=0)
    close(logits, expected_logits, atol=0, rtol=0)

    # an edit returned by a torch hook acts as the same edit made by run_with_hooks
    def zero_edge(mask):
        mask = mask.clone()
        mask[..., 5, 1] = 0
        return mask

    for name, edit in [("blocks.1.hook_h", lambda h: h * 0.5), ("blocks.0.hook_y", lambda y: y * 0.5),
                       ("blocks.0.hook_ssm_mask", zero_edge)]:
        with torch.no_grad():
            by_lens = model.run_with_hooks(tokens, fwd_hooks=[(name, lambda act, hook, edit=edit: edit(act))])
            handle = model.hook_dict[name].register_forward_hook(lambda module, inputs, output, edit=edit: edit(output))
            try:
                by_torch = model(tokens)
            finally:
                handle.remove()
        assert not torch.allclose(by_lens, expected_logits, atol=1e-4), name
        close(by_torch, by_lens, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["blocks.1.hook_h", "blocks.1.hook_y"])
def test_hooks_added_or_forwards_run_inside_a_hook_behave_as_at_any_hook_point(model, tokens, name):
    """hook_h runs its forward hooks one at a time (a hook after an edit gets the continued states).
    As torch runs a module's hooks: one added by a hook during the forward runs from the next forward
    on and stays, and a forward run from inside a hook sees every hook. (hook_y is the plain case.)"""
    calls = []

    def adder(act, hook):
        calls.append("adder")
        if not any(c == "added" for c in calls) and calls.count("adder") == 1:
            hook.add_hook(lambda act, hook: calls.append("added"))

    def nested(act, hook):
        calls.append("nested")
        if calls.count("nested") == 1:
            model(tokens[:, :4])

    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(name, adder), (name, lambda act, hook: calls.append("other"))],
                             reset_hooks_end=False)
        model(tokens)
    model.reset_hooks()
    assert calls == ["adder", "other", "adder", "other", "added"]
    calls.clear()
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(name, nested), (name, lambda act, hook: calls.append("other"))])
    assert calls == ["nested", "nested", "other", "other"]


def test_in_place_edits_under_autograd_act_as_returned_edits(model, tokens):
    # ``act[:, 4] += 0.5``, the usual TransformerLens edit, with gradients on: at hooks given a
    # part of a split projection, autograd refused it (a view of a multi-output op). Checked
    # against the same edit returned as a new tensor: the loss and a parameter's gradient.
    weight = model.blocks[0].mixer.in_proj.weight
    for name in model.hook_dict:
        if not name.startswith("blocks.0.") or is_heavy(name) or name.endswith("hook_scale"):
            continue  # (an in-place edit of ln's hook_scale fails on HookedTransformer too)

        def in_place(act, hook):
            act[:, 4] += 0.5

        def returned(act, hook):
            bump = torch.zeros_like(act)
            bump[:, 4] = 0.5
            return act + bump

        results = []
        for edit in (in_place, returned):
            model.zero_grad(set_to_none=True)
            loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(name, edit)])
            loss.backward()
            results.append((loss.detach(), weight.grad.clone()))
        close(results[0][0], results[1][0], atol=0, rtol=0)
        close(results[0][1], results[1][1], atol=1e-6, rtol=1e-5)
    model.zero_grad(set_to_none=True)


def test_every_cached_activation_can_be_flattened_with_view(model, tokens):
    # sae-lens and TransformerLens code reshape activations with .view: a strided slice refuses it
    _, cache = model.run_with_cache(tokens)
    for name, act in cache.items():
        act.view(act.shape[0], -1)  # one row per prompt
        act.view(-1, act.shape[-1])


# --------------------------------------------------------------------------- run_with_cache


def _record_all(model, tokens):
    """Every hook's value (heavy included) captured with plain forward hooks."""
    acts = {}

    def record(act, hook):
        acts[hook.name] = act.detach().clone()

    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, record)])
    return logits, acts


def test_run_with_cache_type_and_default_contents(model, tokens):
    logits_ref, acts = _record_all(model, tokens)
    logits, cache = model.run_with_cache(tokens)
    assert isinstance(cache, transformer_lens.ActivationCache)
    close(logits, logits_ref, atol=1e-6, rtol=1e-5)
    expected_names = {name for name in model.hook_dict if not is_heavy(name)}
    assert set(cache.keys()) == expected_names
    assert any(is_heavy(name) for name in model.hook_dict)  # the heavy hooks exist, just not cached by default
    for name in expected_names:
        close(cache[name], acts[name], atol=1e-6, rtol=1e-5)
    b, p = tokens.shape
    cfg = model.cfg
    if isinstance(model, HookedMamba2):
        assert cache["blocks.0.hook_x"].shape == (b, p, cfg.n_heads, cfg.d_head)
        assert cache["blocks.0.hook_B"].shape == (b, p, cfg.n_groups, cfg.d_state)
        assert cache["blocks.0.hook_delta_raw"].shape == (b, p, cfg.n_heads)
    else:
        assert cache["blocks.0.hook_x"].shape == (b, p, cfg.d_inner)
        assert cache["blocks.0.hook_B"].shape == (b, p, cfg.d_state)
        assert cache["blocks.0.hook_dt_low"].shape == (b, p, cfg.dt_rank)
    assert cache["ln_final.hook_scale"].shape == (b, p, 1)


def test_run_with_cache_names_filter_forms(model, tokens):
    _, c_str = model.run_with_cache(tokens, names_filter="blocks.1.hook_conv")
    assert set(c_str.keys()) == {"blocks.1.hook_conv"}

    wanted = ["hook_embed", "blocks.0.hook_z", "blocks.1.hook_h"]
    _, c_list = model.run_with_cache(tokens, names_filter=wanted)
    assert set(c_list.keys()) == set(wanted)
    b, p = tokens.shape
    cfg = model.cfg
    state = (cfg.n_heads, cfg.d_head) if isinstance(model, HookedMamba2) else (cfg.d_inner,)
    assert c_list["blocks.1.hook_h"].shape == (b, p, *state, cfg.d_state)

    _, c_fn = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_delta"))
    assert set(c_fn.keys()) == {f"blocks.{l}.hook_delta" for l in range(model.cfg.n_layers)}

    _, full = model.run_with_cache(tokens)
    for cache in (c_str, c_list, c_fn):
        for name in cache.keys():
            if name in full.cache_dict:
                close(cache[name], full[name], atol=1e-6, rtol=1e-5)


def test_hook_h_readout_gives_y(model, tokens):
    """hook_h is the state after each step: y_t = h_t · C_t + D x_t (manual readout from the cache)."""
    names = ["blocks.0.hook_h", "blocks.0.hook_C", "blocks.0.hook_x", "blocks.0.hook_y"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    h, C, x, y = (cache[n] for n in names)
    D = model.blocks[0].mixer.D
    if isinstance(model, HookedMamba2):  # C per group, each group's heads read it; D per head
        C = C.repeat_interleave(model.cfg.n_heads // model.cfg.n_groups, dim=2)  # [b, p, h, n]
        close(torch.einsum("bphdn,bphn->bphd", h, C) + D[:, None] * x, y, atol=1e-5, rtol=1e-4)
    else:
        close(torch.einsum("bpen,bpn->bpe", h, C) + D * x, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pos_slice", [3, -1, slice(2, 6), [0, 4, 5]], ids=["int", "neg-int", "slice", "list"])
def test_run_with_cache_pos_slice_cuts_every_hook(model, tokens, pos_slice):
    everything = lambda name: True  # noqa: E731  (heavy hooks included)
    _, full = model.run_with_cache(tokens, names_filter=everything)
    _, sliced = model.run_with_cache(tokens, names_filter=everything, pos_slice=pos_slice)
    assert set(sliced.keys()) == set(full.keys())
    for name in ("blocks.0.hook_h", "blocks.1.hook_z", "blocks.0.hook_x", "ln_final.hook_scale", "hook_embed"):
        assert name in full.cache_dict
    index = [pos_slice] if isinstance(pos_slice, int) else pos_slice  # an int keeps the axis, as in TL
    for name in full.keys():
        value = full[name]
        if name.endswith("hook_ssm_mask"):  # [b, 1, target, source]: the target axis is cut
            expected = value[:, :, index]
        else:
            expected = value[:, index]
        assert sliced[name].shape == expected.shape, name
        close(sliced[name], expected, atol=1e-6, rtol=1e-5)


def test_run_with_cache_pos_slice_out_of_range_is_named(model, tokens):
    p = tokens.shape[1]
    with pytest.raises(IndexError, match=rf"pos_slice={p + 3} is out of range for hook_embed, which has {p} positions"):
        model.run_with_cache(tokens, pos_slice=p + 3)
    assert not [name for name, hp in model.hook_dict.items() if hp.fwd_hooks]  # nothing left attached


def test_run_with_cache_remove_batch_dim(model, tokens):
    one = tokens[:1]
    _, full = model.run_with_cache(one, names_filter=lambda n: True)
    _, nobatch = model.run_with_cache(one, names_filter=lambda n: True, remove_batch_dim=True)
    assert set(nobatch.keys()) == set(full.keys())
    for name in full.keys():
        assert nobatch[name].shape == full[name].shape[1:], name
        close(nobatch[name], full[name][0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
def test_add_caching_hooks_remove_batch_dim_as_transformer_lens(model, tokens, rows):
    """add_caching_hooks(remove_batch_dim=True) drops a batch axis of size 1 only; a larger batch
    keeps it (transformer-lens 4.x; 3.x always took row 0, "only works for batch_size==1").
    Reference: TransformerLens's own HookedRootModule.add_caching_hooks on the same model, where
    its version defines the case, and plain forward hooks on the hook points."""
    try:
        from transformer_lens.HookedRootModule import HookedRootModule
    except ImportError:  # transformer-lens 3.x
        from transformer_lens.hook_points import HookedRootModule

    names = ["hook_embed", "blocks.0.hook_x", "blocks.1.hook_resid_post"]
    tokens = tokens[:rows]
    seen = {}
    handles = [model.hook_dict[name].register_forward_hook(
        lambda module, inp, out, name=name: seen.__setitem__(name, out.detach().clone())) for name in names]
    with torch.no_grad():
        model(tokens)
    for handle in handles:
        handle.remove()
    caches = []
    for add in (model.add_caching_hooks, lambda **kw: HookedRootModule.add_caching_hooks(model, **kw)):
        caches.append(add(names_filter=names, remove_batch_dim=True))
        with torch.no_grad():
            model(tokens)
        model.reset_hooks()
    ours, theirs = caches
    from importlib.metadata import version

    tl_defines_it = rows == 1 or int(version("transformer-lens").split(".")[0]) >= 4
    assert set(ours) == set(names) == set(theirs)
    for name in names:
        want = seen[name][0] if rows == 1 else seen[name]
        assert ours[name].shape == want.shape, name
        close(ours[name], want, atol=0, rtol=0)
        if tl_defines_it:
            close(ours[name], theirs[name], atol=0, rtol=0)


def test_run_with_cache_incl_bwd(model, tokens):
    loss, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True)
    assert loss.dim() == 0
    fwd_names = [n for n in cache.keys() if not n.endswith("_grad")]
    grad_names = {n for n in cache.keys() if n.endswith("_grad")}
    assert grad_names == {n + "_grad" for n in fwd_names}
    model.zero_grad(set_to_none=True)

    for name in ("blocks.0.hook_x", "blocks.1.hook_resid_pre", "ln_final.hook_normalized"):
        stored = {}

        def keep(act, hook):
            stored["act"] = act
            return act

        ref_loss = model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(name, keep)])
        (expected,) = torch.autograd.grad(ref_loss, stored["act"])
        assert cache[name + "_grad"].shape == cache[name].shape
        close(cache[name + "_grad"], expected, atol=1e-6, rtol=1e-4)
    close(loss.detach(), ref_loss.detach(), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- shorthand keys


def test_cache_shorthand_keys(model, tokens):
    _, cache = model.run_with_cache(tokens)
    n = model.cfg.n_layers
    pairs = [
        (("conv", 1), "blocks.1.hook_conv"),
        (("resid_pre", -1), f"blocks.{n - 1}.hook_resid_pre"),
        (("resid_post", 0), "blocks.0.hook_resid_post"),
        (("z", 0), "blocks.0.hook_z"),
        (("x", 1), "blocks.1.hook_x"),
        (("scale", 0, "ln1"), "blocks.0.ln1.hook_scale"),
        (("normalized", 1, "ln1"), "blocks.1.ln1.hook_normalized"),
    ]
    for key, name in pairs:
        assert key in cache, key
        assert cache[key] is cache[name] or torch.equal(cache[key], cache[name]), key
    assert torch.equal(cache["embed"], cache["hook_embed"])
    # z is the gate branch: SiLU(z) is the cached gate (independent check that the fallback hits the right hook)
    close(F.silu(cache["z", 0]), cache["blocks.0.hook_gate"], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- residual-stream analysis


def test_accumulated_resid_and_logit_lens(model, tokens):
    logits, cache = model.run_with_cache(tokens)
    n = model.cfg.n_layers
    acc, labels = cache.accumulated_resid(return_labels=True)
    assert acc.shape == (n + 1, *tokens.shape, model.cfg.d_model)
    assert len(labels) == n + 1
    for l in range(n):
        close(acc[l], cache[f"blocks.{l}.hook_resid_pre"], atol=1e-6, rtol=1e-5)
    close(acc[n], cache[f"blocks.{n - 1}.hook_resid_post"], atol=1e-6, rtol=1e-5)

    acc_ln = cache.accumulated_resid(apply_ln=True)
    close(acc_ln[-1] @ model.W_U, logits)
    # logit lens: every layer's residual normalized by its own RMS (TransformerLens 3.9+ recomputes the final norm)
    for l in range(n + 1):
        close(acc_ln[l], manual_rms(acc[l], model.cfg.eps), atol=1e-5, rtol=1e-4)


def test_decompose_resid_sums_to_final_resid(model, tokens):
    _, cache = model.run_with_cache(tokens)
    n = model.cfg.n_layers
    dec, labels = cache.decompose_resid(return_labels=True)
    assert dec.shape == (n + 1, *tokens.shape, model.cfg.d_model)
    assert len(labels) == n + 1
    close(dec[0], cache["hook_embed"], atol=1e-6, rtol=1e-5)
    for l in range(n):
        close(dec[l + 1], cache[f"blocks.{l}.hook_mixer_out"], atol=1e-6, rtol=1e-5)
    close(dec.sum(0), cache[f"blocks.{n - 1}.hook_resid_post"])


def test_bf16_decomposition_is_stacked_in_the_residual_dtype(model, tokens):
    """bf16 weights with the residual stream kept in fp32 (the checkpoints' residual_in_fp32): the
    decomposition is stacked in fp32, so it sums to the cached residual (in bf16 it missed by ~0.1)."""
    model = model.to(torch.bfloat16)
    model.cfg.residual_in_fp32 = True
    _, cache = model.run_with_cache(tokens)
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    assert resid.dtype == torch.float32 and cache["hook_embed"].dtype == torch.bfloat16
    dec = cache.decompose_resid()
    assert dec.dtype == torch.float32
    manual = cache["hook_embed"].float() + sum(cache[f"blocks.{l}.hook_mixer_out"].float()
                                                for l in range(model.cfg.n_layers))
    close(dec.sum(0), manual, atol=1e-6, rtol=1e-6)
    close(dec.sum(0), resid, atol=1e-2, rtol=1e-2)


def test_logit_attrs_of_decomposition_sum_to_logit(model, tokens):
    logits, cache = model.run_with_cache(tokens)
    b = tokens.shape[0]
    rows = torch.arange(b)
    correct = torch.tensor([model.to_single_token("park"), model.to_single_token("store")])
    wrong = torch.tensor([model.to_single_token("dog"), model.to_single_token("mat")])

    dec = cache.decompose_resid(pos_slice=-1)  # [c, b, d]
    assert dec.shape == (model.cfg.n_layers + 1, b, model.cfg.d_model)
    # apply_ln_to_stack divides by the cached final scale: its unembedding sums to the logits
    dec_ln = cache.apply_ln_to_stack(dec, layer=None, pos_slice=-1)
    close((dec_ln @ model.W_U).sum(0), logits[:, -1])
    close(dec_ln, dec / cache["ln_final.hook_scale"][:, -1], atol=1e-6, rtol=1e-5)

    # logit_attrs (which applies the final norm's scale itself) sums to the logit ...
    attrs = cache.logit_attrs(dec, tokens=correct, pos_slice=-1)
    assert attrs.shape == (model.cfg.n_layers + 1, b)
    close(attrs.sum(0), logits[rows, -1, correct])
    # ... and to the logit difference with incorrect_tokens
    diff = cache.logit_attrs(dec, tokens=correct, incorrect_tokens=wrong, pos_slice=-1)
    close(diff.sum(0), logits[rows, -1, correct] - logits[rows, -1, wrong])
    # a single token given as a string
    attrs_str = cache.logit_attrs(dec, tokens="park", pos_slice=-1)
    close(attrs_str.sum(0), logits[:, -1, model.to_single_token("park")])

    # every position at once: attributions of the next token sum to its logit
    dec_all = cache.decompose_resid()  # [c, b, p, d]
    next_tokens = tokens[:, 1:]
    attrs_all = cache.logit_attrs(dec_all[:, :, :-1], tokens=next_tokens, pos_slice=slice(0, -1))
    expected = logits[:, :-1].gather(-1, next_tokens[..., None])[..., 0]
    close(attrs_all.sum(0), expected)
    # decompose_resid(apply_ln=True) is the decomposition divided by the final scale
    close(cache.decompose_resid(apply_ln=True), dec_all / cache["ln_final.hook_scale"], atol=1e-6, rtol=1e-5)


def test_stack_activation(model, tokens):
    _, cache = model.run_with_cache(tokens)
    stack = cache.stack_activation("conv")
    cfg = model.cfg  # Mamba-2 convolves x, B and C together
    width = cfg.d_inner + 2 * cfg.n_groups * cfg.d_state if isinstance(model, HookedMamba2) else cfg.d_inner
    assert stack.shape == (cfg.n_layers, *tokens.shape, width)
    for l in range(model.cfg.n_layers):
        assert torch.equal(stack[l], cache[f"blocks.{l}.hook_conv"])


# --------------------------------------------------------------------------- W_U and directions


def test_W_U_folds_the_final_norm_weight(model, tokens):
    w = final_norm_weight(model)
    assert not torch.allclose(w, torch.ones_like(w))  # the fold must matter in this test
    logits, cache = model.run_with_cache(tokens)
    close(cache["ln_final.hook_normalized"] @ model.W_U, logits)
    # independent reference from the weights: RMS-normalize, scale by w, project on the tied embedding
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    close(cache["ln_final.hook_normalized"], manual_rms(resid, model.cfg.eps), atol=1e-6, rtol=1e-5)
    close(cache["ln_final.hook_scale"], torch.sqrt(resid.pow(2).mean(-1, keepdim=True) + model.cfg.eps))
    close((manual_rms(resid, model.cfg.eps) * w) @ model.W_E.T, logits)
    assert model.W_U.shape == (model.cfg.d_model, model.cfg.d_vocab)


def test_transformer_lens_readout_idioms(model, tokens):
    """model.unembed(model.ln_final(x)) and model.unembed.W_U read the residual stream as the
    model does; the reference is the weights, as above."""
    w = final_norm_weight(model)
    logits, cache = model.run_with_cache(tokens)
    resid = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"]
    close(model.unembed(model.ln_final(resid)), logits)
    close(model.unembed.W_U, (w[:, None] * model.W_E.T).to(model.W_U.dtype))
    assert torch.equal(model.double().unembed.W_U, model.W_U)  # the same fold, float64 kept
    model.float()
    mid = cache["blocks.0.hook_resid_post"]
    close(model.unembed(model.ln_final(mid)), (manual_rms(mid, model.cfg.eps) * w) @ model.W_E.T,
          atol=1e-5, rtol=1e-4)


def test_cache_logit_lens(model, tokens):
    """transformer-lens 4.x's ``ActivationCache.logit_lens`` reads each layer's stream through the
    final norm and the folded unembedding (3.x has no such method)."""
    w = final_norm_weight(model)
    logits, cache = model.run_with_cache(tokens)
    if not hasattr(cache, "logit_lens"):
        pytest.skip("this transformer-lens has no ActivationCache.logit_lens")
    mid = cache["blocks.0.hook_resid_post"]
    lens = cache.logit_lens(return_type="logits")  # default: the last position of every layer
    values = lens.values if hasattr(lens, "values") else lens
    close(values[-1].reshape(logits[:, -1].shape), logits[:, -1], atol=1e-4, rtol=1e-4)
    close(values[1].reshape(logits[:, -1].shape), (manual_rms(mid, model.cfg.eps) * w)[:, -1] @ model.W_E.T,
          atol=1e-4, rtol=1e-4)  # after block 0


def test_tokens_to_residual_directions(model, tokens):
    cat = model.to_single_token("cat")
    d_int = model.tokens_to_residual_directions(cat)
    d_str = model.tokens_to_residual_directions("cat")
    assert d_int.shape == (model.cfg.d_model,)
    close(d_int, model.W_U[:, cat], atol=0, rtol=0)
    close(d_str, d_int, atol=0, rtol=0)

    d_1d = model.tokens_to_residual_directions(tokens[0])
    assert d_1d.shape == (tokens.shape[1], model.cfg.d_model)
    d_2d = model.tokens_to_residual_directions(tokens)
    assert d_2d.shape == (*tokens.shape, model.cfg.d_model)
    close(d_2d[1, 3], model.W_U[:, tokens[1, 3]], atol=0, rtol=0)

    # meaning: normalized final residual · direction = that token's logit
    logits, cache = model.run_with_cache(tokens)
    normalized = cache["ln_final.hook_normalized"]
    close((normalized * d_2d).sum(-1), logits.gather(-1, tokens[..., None])[..., 0])


# --------------------------------------------------------------------------- patching


@pytest.fixture
def patch_setup(model):
    clean = model.to_tokens("when mary and john went to store john gave")
    corrupted = clean.clone()
    diff_pos = 4
    corrupted[0, diff_pos] = model.to_single_token("paris")  # "john" -> "paris"
    answer = model.to_single_token("mary")

    def metric(logits):
        return logits[:, -1, answer].mean()

    clean_logits, clean_cache = model.run_with_cache(clean)
    corrupted_logits = model(corrupted)
    return clean, corrupted, diff_pos, metric, clean_logits, clean_cache, corrupted_logits


def _manual_patch(model, corrupted, clean_cache, name, pos, metric):
    def patch(act, hook):
        act = act.clone()
        act[:, pos] = clean_cache[name][:, pos]
        return act

    with torch.no_grad():
        return metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)]))


def test_get_act_patch_resid_pre(model, patch_setup):
    clean, corrupted, diff_pos, metric, clean_logits, clean_cache, corrupted_logits = patch_setup
    n, p = model.cfg.n_layers, clean.shape[1]
    result = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    assert result.shape == (n, p)
    clean_m, corrupted_m = float(metric(clean_logits.detach())), float(metric(corrupted_logits.detach()))
    assert abs(clean_m - corrupted_m) > 1e-5  # the corruption matters
    # layer 0: resid_pre is the embedding; only diff_pos differs, and patching it restores the clean run
    for pos in range(p):
        want = clean_m if pos == diff_pos else corrupted_m
        assert math.isclose(float(result[0, pos]), want, rel_tol=1e-4, abs_tol=1e-5), pos
    # causality: positions before the corruption are identical at every layer
    for l in range(n):
        for pos in range(diff_pos):
            assert math.isclose(float(result[l, pos]), corrupted_m, rel_tol=1e-4, abs_tol=1e-5)
    # one entry against a manual run_with_hooks patch
    manual = _manual_patch(model, corrupted, clean_cache, f"blocks.{n - 1}.hook_resid_pre", p - 1, metric)
    assert math.isclose(float(result[n - 1, p - 1]), float(manual), rel_tol=1e-4, abs_tol=1e-5)


def test_generic_patch_all_positions_restores_clean(model, patch_setup):
    clean, corrupted, diff_pos, metric, clean_logits, clean_cache, corrupted_logits = patch_setup

    def all_pos_setter(corrupted_activation, index, clean_activation):
        (layer,) = index
        corrupted_activation[:] = clean_activation
        return corrupted_activation

    result = tl_patching.generic_activation_patch(
        model, corrupted, clean_cache, metric, patch_setter=all_pos_setter,
        activation_name="resid_pre", index_axis_names=("layer",),
    )
    assert result.shape == (model.cfg.n_layers,)
    clean_m = float(metric(clean_logits.detach()))
    for l in range(model.cfg.n_layers):
        assert math.isclose(float(result[l]), clean_m, rel_tol=1e-4, abs_tol=1e-5), l


@pytest.mark.parametrize("activation_name", ["conv", "x"])
def test_generic_patch_mixer_activation(model, patch_setup, activation_name):
    clean, corrupted, diff_pos, metric, clean_logits, clean_cache, corrupted_logits = patch_setup
    n, p = model.cfg.n_layers, clean.shape[1]
    result = tl_patching.generic_activation_patch(
        model, corrupted, clean_cache, metric, patch_setter=tl_patching.layer_pos_patch_setter,
        activation_name=activation_name, index_axis_names=("layer", "pos"),
    )
    assert result.shape == (n, p)
    corrupted_m = float(metric(corrupted_logits.detach()))
    for l in range(n):
        for pos in range(diff_pos):  # unaffected by the corruption: patching is a no-op
            assert math.isclose(float(result[l, pos]), corrupted_m, rel_tol=1e-4, abs_tol=1e-5)
    for l, pos in [(0, diff_pos), (n - 1, p - 1)]:
        manual = _manual_patch(model, corrupted, clean_cache, f"blocks.{l}.hook_{activation_name}", pos, metric)
        assert math.isclose(float(result[l, pos]), float(manual), rel_tol=1e-4, abs_tol=1e-5), (l, pos)
    assert abs(float(result[0, diff_pos]) - corrupted_m) > 1e-6  # patching the corrupted position matters


# --------------------------------------------------------------------------- cfg


def test_cfg_has_contract_fields(mamba1_model):
    model = mamba1_model
    cfg = model.cfg
    expected = tiny_config()
    assert cfg.n_layers == 2
    assert cfg.d_model == 24
    assert cfg.d_vocab == 48
    assert cfg.d_state == 5
    assert cfg.d_conv == 3
    assert cfg.dt_rank == 3
    assert cfg.d_inner == expected.d_inner == 2 * 24
    assert cfg.n_heads == 1
    assert cfg.normalization_type == "RMS"
    assert cfg.final_rms is True
    assert isinstance(cfg.default_prepend_bos, bool)
    assert cfg.dtype == torch.float32
    assert hasattr(cfg, "device")
    # the shapes of the weights agree with the cfg
    assert model.W_E.shape == (cfg.d_vocab, cfg.d_model)
    _, cache = model.run_with_cache(torch.tensor([[5, 6, 7]]), names_filter=["blocks.0.hook_x", "blocks.0.hook_dt_low"])
    assert cache["blocks.0.hook_x"].shape[-1] == cfg.d_inner
    assert cache["blocks.0.hook_dt_low"].shape[-1] == cfg.dt_rank


def test_cfg_from_constructor_without_tokenizer():
    model = HookedMamba(tiny_config(n_layers=3, d_model=16, d_state=4, d_conv=4, dt_rank=2))
    cfg = model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.d_state, cfg.d_conv, cfg.dt_rank, cfg.n_heads) == (3, 16, 4, 4, 2, 1)
    assert len(model.blocks) == 3


# --------------------------------------------------------------------------- unknown hook names


BAD = "blocks.0.hook_nope"


def test_unknown_hook_in_run_with_hooks(model, tokens):
    clean = model(tokens)
    with pytest.raises((ValueError, KeyError), match="hook_nope"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_x", lambda a, hook: a * 0), (BAD, lambda a, hook: a)])
    # nothing stays attached after the failure
    close(model(tokens), clean, atol=0, rtol=0)


def test_unknown_hook_in_names_filter(model, tokens):
    with pytest.raises((ValueError, KeyError), match="hook_nope"):
        model.run_with_cache(tokens, names_filter=BAD)
    with pytest.raises((ValueError, KeyError), match="blocks.9.hook_x"):
        model.run_with_cache(tokens, names_filter=["hook_embed", "blocks.9.hook_x"])


@pytest.mark.parametrize("name, says", [
    ("h", "a per-block hook: name a layer ('blocks.0.hook_h')"),  # cache["h", 0] works, names_filter="h" not
    ("hook_h", "lambda name: name.endswith('.hook_h')"),
    ("ln1.scale", "'blocks.0.ln1.hook_scale'"),
    ("scale", "name.endswith('.ln1.hook_scale')"),  # not ln_final's: the block-relative name
    ("blocks.5.attn.hook_z", "no layer 5"),  # before the transformer analogue
    ("blocks.1.h", "Did you mean 'blocks.1.hook_h'?"),
    ("blocks.1.delta", "Did you mean 'blocks.1.hook_delta'?"),
    ("embed", "Did you mean 'hook_embed'?"),
    ("blocks.3.hook_x", "no layer 3: its blocks are 0..1"),
])
def test_unknown_hook_names_say_what_was_meant(model, tokens, name, says):
    """A hook named without its layer or its ``hook_``, or at a layer the model lacks: the error
    (names_filter and add_hook alike) says the full name, and the named hook is a real one."""
    for call in (lambda: model.run_with_cache(tokens, names_filter=[name]),
                 lambda: model.add_hook(name, lambda a, hook: a)):
        with pytest.raises(ValueError) as info:
            call()
        assert says in str(info.value), str(info.value)
    suggested = re.findall(r"'((?:blocks\.\d+\.)?(?:ln1\.)?hook_\w+)'", says)
    assert all(n in model.hook_dict for n in suggested)
    model.reset_hooks()


def test_hook_name_hint_lists_every_block_hook_of_a_shared_name():
    """Two per-block hooks ending in the same name (none do in today's blocks): both are named."""
    from tl_mamba.models.base import hook_name_hint

    names = {"blocks.0.ln1.hook_scale", "blocks.0.mixer.norm.hook_scale", "blocks.1.ln1.hook_scale",
             "blocks.1.mixer.norm.hook_scale", "ln_final.hook_scale"}
    hint = hook_name_hint("scale", names, "mamba2")
    assert "'blocks.0.ln1.hook_scale'" in hint and "'blocks.0.mixer.norm.hook_scale'" in hint
    assert "ln_final" not in hint


def test_unknown_hook_in_add_hook(model, tokens):
    clean = model(tokens)
    with pytest.raises((ValueError, KeyError), match="hook_nope"):
        model.add_hook(BAD, lambda a, hook: a)
    with pytest.raises((ValueError, KeyError), match="hook_nope"):
        model.add_hook(BAD, lambda g, hook: None, dir="bwd")
    close(model(tokens), clean, atol=0, rtol=0)


@pytest.mark.parametrize("name, says, not_says", [
    ("blocks.0.attn.hook_z", "blocks.0.hook_y", "Did you mean"),  # not the near-spelled gate hook_z
    ("blocks.1.attn.hook_pattern", "hidden_attention", "Did you mean"),
    ("blocks.0.attn.hook_q", "blocks.0.hook_C", "Did you mean"),
    ("blocks.1.hook_mlp_out", "no MLP", "Did you mean"),
    ("blocks.0.hook_attn_out", "blocks.0.hook_mixer_out", "Did you mean"),
    ("blocks.0.hook_zz", "Did you mean 'blocks.0.hook_z'", "no MLP"),
])
def test_transformer_hook_names_point_to_the_mamba_analogue(model, tokens, name, says, not_says):
    """TransformerLens' patching helpers name attention hooks; the error says what Mamba has instead."""
    with pytest.raises(ValueError) as info:
        model.add_hook(name, lambda a, hook: a)
    assert says in str(info.value) and not_says not in str(info.value)


def test_tl_head_patching_helper_names_hook_y(model, tokens):
    from transformer_lens import patching

    _, cache = model.run_with_cache(tokens)
    with pytest.raises((KeyError, ValueError), match="hook_y"):  # the cache refuses attn.hook_z first
        patching.get_act_patch_attn_head_out_all_pos(model, tokens, cache, lambda logits: logits.sum())


def test_tl_patching_helpers_for_transformer_hooks_say_what_mamba_has(model, tokens):
    from transformer_lens import patching

    _, cache = model.run_with_cache(tokens)
    with pytest.raises(KeyError, match="hook_mixer_out"):
        patching.get_act_patch_block_every(model, tokens, cache, lambda logits: logits.sum())
    with pytest.raises(KeyError, match="no MLP"):
        cache["resid_mid", 0]


def test_unknown_cache_key_names_the_key(model, tokens):
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(KeyError, match="hook_nope"):
        cache[BAD]
    with pytest.raises(KeyError, match="hook_h"):
        cache["blocks.0.hook_h"]  # heavy hooks are not cached by default


def test_full_transformer_name_for_z_is_refused_not_remapped_to_the_gate(model, tokens):
    """``blocks.l.attn.hook_z`` (what TransformerLens's patching helpers ask for) is a head
    output in a transformer; Mamba's hook_z is the gate. The cache refuses the full name and
    names hook_y, as run_with_hooks does; the shorthand ("z", l) stays Mamba's gate."""
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(KeyError, match=r"blocks\.0\.hook_y"):
        cache["blocks.0.attn.hook_z"]
    assert "blocks.0.attn.hook_z" not in cache
    close(F.silu(cache["z", 0]), cache["blocks.0.hook_gate"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("key, says", [(("pattern", 1), r"hidden_attention\(tokens, 1\)"),
                                       (("attn_scores", 0), "hidden_attention"), (("q", 1), r"blocks\.1\.hook_C"),
                                       (("k", 0), r"blocks\.0\.hook_B"), (("v", 1), r"blocks\.1\.hook_x"),
                                       (("result", 0), r"blocks\.0\.hook_y")])
def test_attention_shorthand_keys_name_the_mamba_analogue(model, tokens, key, says):
    """``cache["pattern", l]`` (TransformerLens' shorthand for an attention hook that has no
    Mamba hook of the same name) says what Mamba has instead, as the full name does."""
    _, cache = model.run_with_cache(tokens)
    with pytest.raises(KeyError, match=says):
        cache[key]
    assert key not in cache


def test_accumulated_resid_with_incl_mid_is_the_whole_trajectory(model, tokens):
    """A Mamba block has no resid_mid, so incl_mid (which TransformerLens's direct logit
    attribution by layer passes) adds nothing: the stream is each layer's resid_pre, then the final one."""
    _, cache = model.run_with_cache(tokens)
    stack, labels = cache.accumulated_resid(incl_mid=True, return_labels=True)
    n = model.cfg.n_layers
    assert stack.shape[0] == n + 1 and len(labels) == n + 1
    for l in range(n):
        close(stack[l], cache[f"blocks.{l}.hook_resid_pre"], atol=0, rtol=0)
    close(stack[n], cache[f"blocks.{n - 1}.hook_resid_post"], atol=0, rtol=0)


@pytest.mark.parametrize("name, says", [("W_Q", "no attention weights.*hook_C"), ("OV", "no attention weights"),
                                        ("W_in", "no MLP"), ("W_pos", "no positional embedding"),
                                        ("set_use_attn_result", "compute_head_results"),
                                        ("set_use_split_qkv_input", "hook_mixer_in")])
def test_transformer_attributes_say_what_mamba_has(model, name, says):
    """A TransformerLens user's ``model.W_Q`` is an AttributeError (``hasattr`` stays False) that
    names the Mamba analogue; other missing names keep Python's plain message; parameters,
    submodules and properties resolve as before."""
    with pytest.raises(AttributeError, match=f"has no attribute {name!r}: .*{says}"):
        getattr(model, name)
    assert not hasattr(model, name)
    with pytest.raises(AttributeError, match="object has no attribute 'no_such_thing'$"):
        model.no_such_thing
    assert model.blocks[0] is model._modules["blocks"][0] and model.W_U.shape == (model.cfg.d_model, model.cfg.d_vocab)


def test_neuron_results_are_refused_naming_the_per_channel_writes(model, tokens):
    """TransformerLens' stack_neuron_results asserts on cfg.d_mlp; here it says what Mamba has."""
    _, cache = model.run_with_cache(tokens)
    for method in ("stack_neuron_results", "get_neuron_results"):
        with pytest.raises(ValueError, match=rf"{method}: Mamba blocks have no MLP.*expand_neurons=True"):
            getattr(cache, method)(0)
