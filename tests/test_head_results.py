"""TransformerLens' per-head / per-component cache methods on a ``MambaActivationCache``.

``stack_head_results``, ``compute_head_results`` and ``get_full_resid_decomposition``
split a mixer's write through ``out_proj``: per SSM head for Mamba-2 (from
``hook_y_normed``), per ``d_inner`` channel for Mamba-1 (from ``hook_y_gated``).
Everything is checked against what the forward pass itself cached
(``hook_mixer_out``, ``hook_resid_pre`` / ``hook_resid_post``, the norms' scales,
the logits) and against per-head / per-channel products written out here.
"""

from __future__ import annotations

import pytest
import torch

from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig

B, P, V = 3, 7, 50


def make_model(family: str, n_groups: int = 1, proj_bias: bool = False, dtype=torch.float64, seed: int = 0):
    if family == "mamba1":
        cfg = HookedMambaConfig(n_layers=2, d_model=16, d_vocab=V, d_state=4, d_conv=4, expand=2,
                                proj_bias=proj_bias, seed=seed)
        model = HookedMamba(cfg)
    else:
        cfg = HookedMambaConfig(family="mamba2", n_layers=2, d_model=16, d_vocab=V, d_state=4, d_conv=4,
                                expand=2, d_head=8, n_groups=n_groups, chunk_size=4, proj_bias=proj_bias,
                                seed=seed)
        model = HookedMamba2(cfg)
    with torch.no_grad():  # move weights (and the zero-initialised biases) off their init
        gen = torch.Generator().manual_seed(seed + 1)
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    return model.to(dtype).eval()


def tokens(batch: int = B, seed: int = 0):
    return torch.randint(1, V, (batch, P), generator=torch.Generator().manual_seed(seed))


def close(a, b, atol=1e-10, rtol=1e-8):
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def resid_at(cache, model, layer):
    n = model.cfg.n_layers
    return cache[f"blocks.{layer}.hook_resid_pre"] if layer < n else cache[f"blocks.{n - 1}.hook_resid_post"]


def out_bias(model, layer):
    bias = model.blocks[layer].mixer.out_proj.bias
    return torch.zeros(model.cfg.d_model, dtype=model.cfg.dtype) if bias is None else bias.detach()


def brute_heads(model, cache, layer):
    """``[h, ..., d]``: head i writes ``W[:, i*hd:(i+1)*hd] @ y_normed[..., i*hd:(i+1)*hd]``, one at a time."""
    hd = model.cfg.d_head
    W = model.blocks[layer].mixer.out_proj.weight.detach()
    y = cache[f"blocks.{layer}.hook_y_normed"]
    return torch.stack([y[..., i * hd:(i + 1) * hd] @ W[:, i * hd:(i + 1) * hd].T for i in range(model.cfg.n_heads)])


def brute_channels(model, cache, layer):
    """``[e, ..., d]``: channel c writes ``W[:, c] * y_gated[..., c]``."""
    W = model.blocks[layer].mixer.out_proj.weight.detach()
    y = cache[f"blocks.{layer}.hook_y_gated"]
    return torch.einsum("...c,dc->c...d", y, W)


# ----------------------------------------------------------------------------- Mamba-2 heads
@pytest.mark.parametrize("n_groups", [1, 2])
@pytest.mark.parametrize("proj_bias", [False, True])
def test_stack_head_results_match_heads_and_sum_to_mixer_out(n_groups, proj_bias):
    model = make_model("mamba2", n_groups=n_groups, proj_bias=proj_bias)
    h, n = model.cfg.n_heads, model.cfg.n_layers
    assert h == 4
    _, cache = model.run_with_cache(tokens())
    stack, labels = cache.stack_head_results(return_labels=True)
    assert stack.shape == (n * h, B, P, model.cfg.d_model)
    assert labels == [f"L{l}H{i}" for l in range(n) for i in range(h)]
    for l in range(n):
        close(stack[l * h:(l + 1) * h], brute_heads(model, cache, l))
        # the heads and the out_proj bias make up the mixer's write (the norm's scale is held fixed)
        close(stack[l * h:(l + 1) * h].sum(0) + out_bias(model, l), cache[f"blocks.{l}.hook_mixer_out"])
    # layer=1: the heads of layer 0 only
    close(cache.stack_head_results(layer=1), stack[:h])
    close(cache.stack_head_results(layer=-1), stack)
    empty = cache.stack_head_results(layer=0)
    assert empty.shape == (0, B, P, model.cfg.d_model)
    with pytest.raises(ValueError, match="layer"):
        cache.stack_head_results(layer=n + 1)


@pytest.mark.parametrize("proj_bias", [False, True])
def test_stack_head_results_remainder_is_resid_minus_heads(proj_bias):
    model = make_model("mamba2", n_groups=2, proj_bias=proj_bias)
    h, n = model.cfg.n_heads, model.cfg.n_layers
    _, cache = model.run_with_cache(tokens())
    for layer in range(n + 1):
        stack, labels = cache.stack_head_results(layer, return_labels=True, incl_remainder=True)
        assert stack.shape[0] == layer * h + 1 and labels[-1] == "remainder"
        close(stack.sum(0), resid_at(cache, model, layer))
        # what is not a head: the embedding and the out_proj biases of the layers before
        bias = sum((out_bias(model, l) for l in range(layer)), torch.zeros(model.cfg.d_model, dtype=torch.float64))
        close(stack[-1], cache["hook_embed"] + bias)


def test_compute_head_results_fills_the_result_shorthand():
    model = make_model("mamba2", n_groups=2)
    _, cache = model.run_with_cache(tokens())
    assert ("result", 1) not in cache
    cache.compute_head_results()
    for l in range(model.cfg.n_layers):
        assert ("result", l) in cache
        result = cache["result", l]
        assert result.shape == (B, P, model.cfg.n_heads, model.cfg.d_model)
        assert cache[f"blocks.{l}.hook_result"] is result
        close(result.movedim(-2, 0), brute_heads(model, cache, l))
    # stack_head_results reads what is stored
    cache.cache_dict["blocks.0.hook_result"] = cache["result", 0] * 2
    close(cache.stack_head_results()[0], 2 * brute_heads(model, cache, 0)[0])


@pytest.mark.parametrize("pos_slice", [-1, slice(1, 4), [0, 5]])
def test_stack_head_results_pos_slice_and_apply_ln(pos_slice):
    model = make_model("mamba2", n_groups=2, proj_bias=True)
    _, cache = model.run_with_cache(tokens())
    full = cache.stack_head_results(incl_remainder=True)  # [c, b, p, d]
    index = pos_slice if not isinstance(pos_slice, list) else torch.tensor(pos_slice)
    sliced = cache.stack_head_results(incl_remainder=True, pos_slice=pos_slice)
    close(sliced, full[:, :, index])
    # apply_ln divides by the cached scale of the norm that reads the stream at `layer`
    final_scale = cache["ln_final.hook_scale"][:, index]  # [b, (p,) 1]
    close(cache.stack_head_results(incl_remainder=True, pos_slice=pos_slice, apply_ln=True),
          full[:, :, index] / final_scale)
    layer1 = cache.stack_head_results(1, incl_remainder=True)
    close(cache.stack_head_results(1, incl_remainder=True, pos_slice=pos_slice, apply_ln=True),
          layer1[:, :, index] / cache["blocks.1.ln1.hook_scale"][:, index])
    # the final norm of the whole stream is the normalized stream
    normed = cache.stack_head_results(incl_remainder=True, apply_ln=True).sum(0)
    close(normed, cache["ln_final.hook_normalized"])


@pytest.mark.parametrize("proj_bias", [False, True])
def test_full_resid_decomposition_mamba2_sums_to_resid(proj_bias):
    model = make_model("mamba2", n_groups=2, proj_bias=proj_bias)
    h, n, d = model.cfg.n_heads, model.cfg.n_layers, model.cfg.d_model
    _, cache = model.run_with_cache(tokens())
    for layer in [*range(n + 1), None, -1]:
        L = n if layer in (None, -1) else layer
        dec, labels = cache.get_full_resid_decomposition(layer, return_labels=True)
        assert dec.shape == (L * h + 2, B, P, d)
        assert labels == [f"L{l}H{i}" for l in range(L) for i in range(h)] + ["embed", "bias"]
        close(dec.sum(0), resid_at(cache, model, L))
        for l in range(L):
            close(dec[l * h:(l + 1) * h], brute_heads(model, cache, l))
        close(dec[-2], cache["hook_embed"])
        bias = sum((out_bias(model, l) for l in range(L)), torch.zeros(d, dtype=torch.float64))
        close(dec[-1], bias.expand(B, P, d))
        # expand_neurons means nothing without MLPs
        close(cache.get_full_resid_decomposition(layer, expand_neurons=False), dec)
    # apply_ln, pos_slice and project_output_onto
    dec = cache.get_full_resid_decomposition()
    close(cache.get_full_resid_decomposition(apply_ln=True, pos_slice=-1),
          dec[:, :, -1] / cache["ln_final.hook_scale"][:, -1])
    close(cache.get_full_resid_decomposition(1, apply_ln=True),
          cache.get_full_resid_decomposition(1) / cache["blocks.1.ln1.hook_scale"])
    v = torch.randn(d, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    close(cache.get_full_resid_decomposition(project_output_onto=v), dec @ v)
    close(cache.get_full_resid_decomposition(project_output_onto=v[:, 0]), dec @ v[:, 0])
    with pytest.raises(ValueError, match="MLP"):
        cache.get_full_resid_decomposition(1, mlp_input=True)


def test_logit_attrs_of_the_heads_sum_to_the_logit_difference():
    model = make_model("mamba2", n_groups=2, proj_bias=True)
    logits, cache = model.run_with_cache(tokens())
    rows = torch.arange(B)
    correct, wrong = torch.tensor([3, 7, 11]), torch.tensor([5, 2, 40])
    heads = cache.stack_head_results(pos_slice=-1)  # [L*h, b, d]
    bias = sum(out_bias(model, l) for l in range(model.cfg.n_layers))
    stack = torch.cat([heads, cache["hook_embed"][None, :, -1], bias.expand(1, B, -1)])
    attrs = cache.logit_attrs(stack, tokens=correct, incorrect_tokens=wrong, pos_slice=-1)
    assert attrs.shape == (heads.shape[0] + 2, B)
    close(attrs.sum(0), logits[rows, -1, correct] - logits[rows, -1, wrong])
    # the same through the remainder term and through get_full_resid_decomposition
    with_rest = cache.stack_head_results(pos_slice=-1, incl_remainder=True)
    close(cache.logit_attrs(with_rest, tokens=correct, incorrect_tokens=wrong, pos_slice=-1).sum(0),
          logits[rows, -1, correct] - logits[rows, -1, wrong])
    full = cache.get_full_resid_decomposition(pos_slice=-1)
    close(cache.logit_attrs(full, tokens=correct, pos_slice=-1).sum(0), logits[rows, -1, correct])
    # a head's attribution is its write, through the final scale, onto W_U[:, correct] - W_U[:, wrong]
    direction = model.W_U[:, correct] - model.W_U[:, wrong]  # [d, b]
    head5 = brute_heads(model, cache, 1)[1][:, -1]  # L1H1 [b, d]
    close(attrs[5], (head5 / cache["ln_final.hook_scale"][:, -1] * direction.T).sum(-1))


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_remove_batch_dim_cache(family):
    model = make_model(family, n_groups=2)
    _, batched = model.run_with_cache(tokens(1))
    _, cache = model.run_with_cache(tokens(1), remove_batch_dim=True)
    n, d = model.cfg.n_layers, model.cfg.d_model
    dec = cache.get_full_resid_decomposition()
    close(dec, batched.get_full_resid_decomposition()[:, 0])
    close(dec.sum(0), cache[f"blocks.{n - 1}.hook_resid_post"])
    assert dec.shape[1:] == (P, d)
    close(cache.get_full_resid_decomposition(1, apply_ln=True, pos_slice=slice(2, 5)),
          cache.get_full_resid_decomposition(1)[:, 2:5] / cache["blocks.1.ln1.hook_scale"][2:5])
    if family == "mamba2":
        stack = cache.stack_head_results(incl_remainder=True, pos_slice=-1, apply_ln=True)
        assert stack.shape == (n * model.cfg.n_heads + 1, d)
        close(stack, batched.stack_head_results(incl_remainder=True, pos_slice=-1, apply_ln=True)[:, 0])
        cache.compute_head_results()
        assert cache["result", 0].shape == (P, model.cfg.n_heads, d)


def test_float32_model_sums():
    model = make_model("mamba2", n_groups=2, proj_bias=True, dtype=torch.float32)
    _, cache = model.run_with_cache(tokens())
    dec = cache.get_full_resid_decomposition()
    assert dec.dtype == torch.float32
    close(dec.sum(0), cache["blocks.1.hook_resid_post"], atol=1e-5, rtol=1e-5)
    model1 = make_model("mamba1", proj_bias=True, dtype=torch.float32)
    _, cache1 = model1.run_with_cache(tokens())
    close(cache1.get_full_resid_decomposition().sum(0), cache1["blocks.1.hook_resid_post"], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- Mamba-1 channels
@pytest.mark.parametrize("proj_bias", [False, True])
def test_full_resid_decomposition_mamba1_channels(proj_bias):
    model = make_model("mamba1", proj_bias=proj_bias)
    e, n, d = model.cfg.d_inner, model.cfg.n_layers, model.cfg.d_model
    _, cache = model.run_with_cache(tokens())
    for layer in range(n + 1):
        dec, labels = cache.get_full_resid_decomposition(layer, return_labels=True)
        assert dec.shape == (layer * e + 2, B, P, d)
        assert labels == [f"L{l}C{c}" for l in range(layer) for c in range(e)] + ["embed", "bias"]
        close(dec.sum(0), resid_at(cache, model, layer))
        for l in range(layer):
            channels = dec[l * e:(l + 1) * e]
            close(channels, brute_channels(model, cache, l))
            close(channels.sum(0) + out_bias(model, l), cache[f"blocks.{l}.hook_mixer_out"])
        bias = sum((out_bias(model, l) for l in range(layer)), torch.zeros(d, dtype=torch.float64))
        close(dec[-1], bias.expand(B, P, d))
        close(dec[-2], cache["hook_embed"])

        # one term per mixer: the mixers' writes hold the biases
        mixers, labels = cache.get_full_resid_decomposition(layer, expand_neurons=False, return_labels=True)
        assert labels == [f"{l}_mixer_out" for l in range(layer)] + ["embed", "bias"]
        for l in range(layer):
            close(mixers[l], cache[f"blocks.{l}.hook_mixer_out"])
        close(mixers[-1], torch.zeros(B, P, d, dtype=torch.float64))
        close(mixers.sum(0), resid_at(cache, model, layer))

    dec = cache.get_full_resid_decomposition()
    close(cache.get_full_resid_decomposition(pos_slice=slice(1, 4), apply_ln=True),
          dec[:, :, 1:4] / cache["ln_final.hook_scale"][:, 1:4])
    # projecting folds into out_proj; same numbers as projecting the stack
    v = torch.randn(d, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    close(cache.get_full_resid_decomposition(project_output_onto=v, apply_ln=True),
          (dec / cache["ln_final.hook_scale"]) @ v)
    close(cache.get_full_resid_decomposition(project_output_onto=v[:, 1], pos_slice=-1), dec[:, :, -1] @ v[:, 1])
    with pytest.raises(ValueError, match="MLP"):
        cache.get_full_resid_decomposition(mlp_input=True)


def test_mamba1_has_no_heads():
    model = make_model("mamba1")
    _, cache = model.run_with_cache(tokens())
    for call in (cache.stack_head_results, cache.compute_head_results):
        with pytest.raises(ValueError, match="no heads") as info:
            call()
        assert "decompose_resid" in str(info.value) and "expand_neurons=True" in str(info.value)
    assert ("result", 0) not in cache


def test_memory_guard():
    model = make_model("mamba1")
    _, cache = model.run_with_cache(tokens())
    e, n, d = model.cfg.d_inner, model.cfg.n_layers, model.cfg.d_model
    nbytes = n * e * B * P * d * 8
    model.heavy_hook_memory_limit = nbytes - 1
    with pytest.raises(MemoryError, match="expand_neurons=False") as info:
        cache.get_full_resid_decomposition()
    assert 2**10 <= nbytes < 2**20  # so the message gives KiB (a small guard once read "0.00 GiB")
    assert f"{nbytes / 2**10:.2f} KiB" in str(info.value) and "heavy_hook_memory_limit" in str(info.value)
    # what fits: exactly at the limit, one mixer term each, fewer layers, fewer positions, a projection
    model.heavy_hook_memory_limit = nbytes
    full = cache.get_full_resid_decomposition()
    model.heavy_hook_memory_limit = nbytes - 1
    close(cache.get_full_resid_decomposition(expand_neurons=False).sum(0), full.sum(0))
    close(cache.get_full_resid_decomposition(1), full[list(range(e)) + [-2, -1]])  # no bias: the rows agree
    close(cache.get_full_resid_decomposition(pos_slice=-1), full[:, :, -1])
    v = torch.randn(d, dtype=torch.float64)
    close(cache.get_full_resid_decomposition(project_output_onto=v), full @ v)

    model2 = make_model("mamba2")
    _, cache2 = model2.run_with_cache(tokens())
    model2.heavy_hook_memory_limit = 100
    with pytest.raises(MemoryError, match="pos_slice"):
        cache2.stack_head_results()
    assert ("result", 0) not in cache2
    with pytest.raises(MemoryError):
        cache2.compute_head_results()


def test_missing_hooks_are_named():
    model = make_model("mamba2")
    _, cache = model.run_with_cache(tokens(), names_filter=["blocks.0.hook_y_normed", "hook_embed"])
    close(cache.stack_head_results(layer=1), brute_heads(model, cache, 0))  # all it needs is there
    with pytest.raises(KeyError, match=r"stack_head_results needs the cached hooks blocks\.1\.hook_y_normed"):
        cache.stack_head_results()
    with pytest.raises(KeyError, match=r"blocks\.1\.hook_y_normed"):
        cache.compute_head_results()
    with pytest.raises(KeyError, match=r"blocks\.0\.hook_resid_pre"):
        cache.stack_head_results(layer=0, incl_remainder=True)
    _, no_embed = model.run_with_cache(tokens(), names_filter=lambda name: name.endswith("hook_y_normed"))
    with pytest.raises(KeyError, match="get_full_resid_decomposition needs the cached hooks hook_embed"):
        no_embed.get_full_resid_decomposition()

    model1 = make_model("mamba1")
    _, cache1 = model1.run_with_cache(tokens(), names_filter=["hook_embed", "blocks.0.hook_y_gated"])
    with pytest.raises(KeyError, match=r"blocks\.1\.hook_y_gated"):
        cache1.get_full_resid_decomposition()
    with pytest.raises(KeyError, match=r"blocks\.0\.hook_mixer_out, blocks\.1\.hook_mixer_out"):
        cache1.get_full_resid_decomposition(expand_neurons=False)
    close(cache1.get_full_resid_decomposition(1)[:-2], brute_channels(model1, cache1, 0))
