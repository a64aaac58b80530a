"""Input checks at the edges of the forward, hooks, generation, saving and loading.

Each case used to give a silent wrong result (a weighted mask, a loss over the
wrong tokens, a broadcast hook return, a stale tokenizer, a NaN loss) or an
error that blamed something else. References are independent of the code under
test: the unpadded prompt run alone, a full forward, the files on disk.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tl_mamba
from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig

from conftest import make_tokenizer, tiny_config


def mamba1(**overrides):
    return HookedMamba(tiny_config(**overrides))


def mamba2(**overrides):
    base = dict(n_layers=2, d_model=16, d_vocab=48, family="mamba2", d_state=4, d_head=8, chunk_size=4, seed=0,
                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    base.update(overrides)
    return HookedMamba2(HookedMambaConfig(**base))


FAMILIES = [pytest.param(mamba1, id="mamba1"), pytest.param(mamba2, id="mamba2")]


def tokens(b=2, p=6, seed=0, low=3, high=40):
    return torch.randint(low, high, (b, p), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- attention_mask values
@pytest.mark.parametrize("make", FAMILIES)
@pytest.mark.parametrize("mask, shown", [
    ([[0, 2, 2, 2, 2, 2]], "2"),
    ([[0, 0.5, 1, 1, 1, 1]], "0.5"),
    ([[0, -1, -1, -1, -1, -1]], "-1"),
    ([[0.5, 1, 1, 1, 1, 1]], "0.5"),  # was taken for "no padding"
    ([[0, float("nan"), 1, 1, 1, 1]], "nan"),
])
def test_attention_mask_must_be_zeros_and_ones(make, mask, shown):
    model = make()
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0 .* and 1") as err:
        model(tokens(1), attention_mask=torch.tensor(mask))
    assert shown in str(err.value)


@pytest.mark.parametrize("make", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bool, torch.long, torch.int32, torch.float32, torch.float64])
def test_binary_masks_of_any_dtype_match_the_unpadded_run(make, dtype):
    model = make()
    t = tokens(1)
    alone = model(t[:, 2:])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]]).to(dtype)
    torch.testing.assert_close(model(t, attention_mask=mask)[:, 2:], alone, atol=1e-5, rtol=1e-4)


def test_mask_values_checked_with_start_at_layer_and_string_input(tokenizer):
    model = HookedMamba(tiny_config(), tokenizer=tokenizer)
    resid = model(tokens(1), stop_at_layer=1)
    with pytest.raises(ValueError, match="only 0"):
        model(resid, start_at_layer=1, attention_mask=torch.tensor([[0, 2, 2, 2, 2, 2]]))
    n = model.to_tokens("the cat sat").shape[1]
    with pytest.raises(ValueError, match="only 0"):
        model("the cat sat", attention_mask=torch.full((1, n), 0.5))


# ---------------------------------------------------------------- start_at_layer / stop_at_layer
@pytest.mark.parametrize("make", FAMILIES)
def test_loss_tokens_must_match_the_residual_positions(make):
    model = make()
    t = tokens()
    resid = model(t, stop_at_layer=1)
    torch.testing.assert_close(model(resid, start_at_layer=1, return_type="loss", tokens=t),
                               model(t, return_type="loss"))
    for wrong in (t[:, :3], t[:1], t[:, :, None]):
        with pytest.raises(ValueError, match=r"tokens has shape .* \(2, 6\)"):
            model(resid, start_at_layer=1, return_type="loss", tokens=wrong)
    with pytest.raises(TypeError, match="integer tensor"):
        model(resid, start_at_layer=1, return_type="loss", tokens=t.float())
    with pytest.raises(ValueError, match=r"must lie in \[0, 48\)"):
        model(resid, start_at_layer=1, return_type="loss", tokens=t + 100)


@pytest.mark.parametrize("make", FAMILIES)
def test_start_after_stop_is_an_error(make):
    model = make()
    t = tokens()
    resid = model(t, stop_at_layer=1)
    with pytest.raises(ValueError, match="start_at_layer=2 is after stop_at_layer=1"):
        model(resid, start_at_layer=2, stop_at_layer=1)
    with pytest.raises(ValueError, match="after stop_at_layer"):
        model(resid, start_at_layer=-1, stop_at_layer=0)
    # equal runs no block, as in TransformerLens (a slice [start:stop] of the blocks)
    torch.testing.assert_close(model(resid, start_at_layer=1, stop_at_layer=1), resid)
    # a non-integer layer is named, not blamed on the input or truncated
    with pytest.raises(TypeError, match=r"start_at_layer must be an integer layer index, got 1\.5"):
        model(resid, start_at_layer=1.5)
    with pytest.raises(TypeError, match=r"stop_at_layer must be an integer layer index, got '1'"):
        model(t, stop_at_layer="1")
    with pytest.raises(TypeError, match=r"hidden_attention: layer must be an integer, got '1'"):
        model.hidden_attention(t, "1")
    torch.testing.assert_close(model(resid, start_at_layer=torch.tensor(1)), model(t))


# ---------------------------------------------------------------- tokenizers that do not fit
def test_save_without_tokenizer_removes_an_earlier_tokenizer(tmp_path):
    tl_mamba.from_pretrained("toy-mamba").save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    mamba1(d_vocab=56).save_pretrained(tmp_path)
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}, left
    back = tl_mamba.from_pretrained(str(tmp_path))
    assert back.tokenizer is None and back.cfg.d_vocab == 56


def test_save_with_tokenizer_keeps_its_files_and_drops_foreign_ones(tmp_path):
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")  # left by an earlier (BPE) tokenizer
    (tmp_path / "vocab.json").write_text("{}")
    model = HookedMamba(tiny_config(), tokenizer=make_tokenizer())
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert "tokenizer.json" in names and not names & {"merges.txt", "vocab.json"}, names
    # saving into the folder it was loaded from keeps its tokenizer
    back = tl_mamba.from_pretrained(str(tmp_path))
    back.save_pretrained(tmp_path)
    again = tl_mamba.from_pretrained(str(tmp_path))
    assert again.to_str_tokens("the cat", prepend_bos=False) == ["the", "cat"]


def test_loading_warns_when_the_tokenizer_is_larger_than_the_vocabulary(tmp_path):
    mamba1(d_vocab=16).save_pretrained(tmp_path)
    make_tokenizer().save_pretrained(str(tmp_path))  # 40 tokens for a 16-row embedding
    with pytest.warns(UserWarning, match=r"tokenizer has \d+ tokens but the model's embedding only 16 rows"):
        tl_mamba.from_pretrained(str(tmp_path))
    with pytest.warns(UserWarning, match="16 rows"):
        HookedMamba.from_pretrained(str(tmp_path), tokenizer=make_tokenizer())
    with warnings.catch_warnings():  # a tokenizer smaller than d_vocab is normal (padded vocabularies)
        warnings.simplefilter("error")
        tl_mamba.from_pretrained("toy-mamba")


@pytest.mark.parametrize("make", FAMILIES)
def test_string_input_beyond_the_vocabulary_is_a_clear_error(make):
    model = make(d_vocab=8)
    model.tokenizer = make_tokenizer()  # ids up to ~40
    with pytest.raises(ValueError, match=r"tokenizer gave token ids up to \d+, but the model has d_vocab=8"):
        model("the cat sat on the mat")
    with pytest.raises(ValueError, match="d_vocab=8"):
        model.generate("the cat sat on the mat", max_new_tokens=1, verbose=False)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 8\)"):
        model(torch.tensor([[1, 2, 30]]))


# ---------------------------------------------------------------- what hooks return
SHAPE_HOOKS = {
    mamba1: ["hook_embed", "blocks.0.hook_conv_in", "blocks.0.hook_x", "blocks.0.hook_y", "blocks.0.hook_B",
             "blocks.0.ln1.hook_scale", "blocks.1.hook_mixer_out", "ln_final.hook_normalized"],
    mamba2: ["hook_embed", "blocks.0.hook_conv", "blocks.0.hook_x", "blocks.0.hook_y", "blocks.0.hook_B",
             "blocks.0.hook_delta", "blocks.0.hook_y_gated", "blocks.1.hook_resid_post"],
}


@pytest.mark.parametrize("make", FAMILIES)
@pytest.mark.parametrize("change", ["drop_position", "first_row", "extra_axis"])
def test_a_hook_returning_another_shape_is_named(make, change):
    model = make()
    t = tokens()
    edit = {"drop_position": lambda x: x[:, :-1], "first_row": lambda x: x[:1],
            "extra_axis": lambda x: x[..., None]}[change]
    for name in SHAPE_HOOKS[make]:
        seen = {}

        def hook(x, hook):
            seen["shape"] = tuple(x.shape)
            return edit(x)

        with pytest.raises(ValueError, match=rf"a hook on {name} returned shape") as err:
            model.run_with_hooks(t, fwd_hooks=[(name, hook)])
        assert f"expected {seen['shape']}" in str(err.value)
        model.reset_hooks()


@pytest.mark.parametrize("make", FAMILIES)
def test_a_hook_returning_a_tensor_on_another_device_is_named(make):
    """A patch from a cache kept on another device (CPU cache, CUDA model): "meta" stands in."""
    model = make()
    for name in SHAPE_HOOKS[make] + ["blocks.0.hook_h", "blocks.0.hook_ssm_mask"]:
        with pytest.raises(ValueError, match=rf"a hook on {name} returned a tensor on meta.* is on cpu"):
            model.run_with_hooks(tokens(), fwd_hooks=[(name, lambda x, hook: x.to("meta"))])
        model.reset_hooks()


@pytest.mark.parametrize("make", FAMILIES)
@pytest.mark.parametrize("value", [3, 0.5, "text", [1.0]])
def test_a_hook_returning_a_non_tensor_is_named(make, value):
    model = make()
    for name in ("blocks.0.hook_y", "blocks.0.hook_B"):
        with pytest.raises(TypeError, match=rf"a hook on {name} returned \w+, expected a tensor of shape"):
            model.run_with_hooks(tokens(), fwd_hooks=[(name, lambda x, hook: value)])


@pytest.mark.parametrize("make", FAMILIES)
def test_hooks_may_change_dtype_and_edit_in_place(make):
    model = make()
    t = tokens()
    reference = model(t)
    for name in SHAPE_HOOKS[make]:
        out = model.run_with_hooks(t, fwd_hooks=[(name, lambda x, hook: x.double())])
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)

    def scale_(x, hook):
        x.mul_(0.5)

    def scale(x, hook):
        return x * 0.5

    torch.testing.assert_close(model.run_with_hooks(t, fwd_hooks=[("blocks.0.hook_x", scale_)]),
                               model.run_with_hooks(t, fwd_hooks=[("blocks.0.hook_x", scale)]))


def test_backward_hooks_still_see_the_activation_shape():
    model = mamba2()
    shapes = []
    model.run_with_hooks(tokens(), return_type="loss",
                         bwd_hooks=[("blocks.0.hook_y", lambda g, hook: shapes.append(tuple(g.shape)))]).backward()
    assert shapes == [model.hook_shapes(tokens())["blocks.0.hook_y"]]


# ---------------------------------------------------------------- token dtypes, empty losses
@pytest.mark.parametrize("make", FAMILIES)
def test_uint8_tokens_are_refused(make):
    model = make()
    with pytest.raises(TypeError, match="uint8.*mask"):
        model(tokens().to(torch.uint8))


@pytest.mark.parametrize("make", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_other_integer_tokens_are_token_ids(make, dtype):
    model = make()
    t = tokens()
    torch.testing.assert_close(model(t.to(dtype)), model(t))


@pytest.mark.parametrize("make", FAMILIES)
def test_a_loss_needs_something_to_predict(make):
    model = make()
    t = tokens()
    for kwargs in ({}, {"loss_per_token": True}):
        with pytest.raises(ValueError, match="at least 2 positions"):
            model(t[:, :1], return_type="loss", **kwargs)
        with pytest.raises(ValueError, match="at least 2 positions"):
            model(t[:, :1], return_type="both", **kwargs)
    with pytest.raises(ValueError, match=r"empty batch \(b=0\)"):
        model(t[:0], return_type="loss")
    assert model(t[:0], return_type="loss", loss_per_token=True).shape == (0, 5)
    assert model(t[:, :1]).shape == (2, 1, 48)  # logits of one position are fine
    resid = model(t[:, :1], stop_at_layer=1)
    with pytest.raises(ValueError, match="at least 2 positions"):
        model(resid, start_at_layer=1, return_type="loss", tokens=t[:, :1])


# ---------------------------------------------------------------- generate arguments
@pytest.mark.parametrize("make", FAMILIES)
def test_generate_argument_checks(make):
    model = make()
    t = tokens()
    with pytest.raises(ValueError, match="eos_token_id is empty"):
        model.generate(t, max_new_tokens=2, eos_token_id=[], verbose=False)
    for eos in (99999, [1, -2]):  # ids the model cannot produce: generation would never stop at them
        with pytest.raises(ValueError, match=r"eos_token_id must lie in \[0, 48\)"):
            model.generate(t, max_new_tokens=2, eos_token_id=eos, verbose=False)
    with pytest.raises(TypeError, match="eos_token_id must be an integer tensor"):
        model.generate(t, max_new_tokens=2, eos_token_id=[1.5], verbose=False)
    with pytest.raises(TypeError, match="max_new_tokens must be an int, got 2.5"):
        model.generate(t, max_new_tokens=2.5, verbose=False)
    for top_k in (-3, 0, 1.5):
        with pytest.raises(ValueError, match="top_k must be a positive int"):
            model.generate(t, max_new_tokens=2, top_k=top_k, verbose=False)
    with pytest.raises(ValueError, match="return_type must be 'input', 'str' or 'tokens', got 'junk'"):
        model.generate(t, max_new_tokens=2, return_type="junk", verbose=False)
    greedy = model.generate(t, max_new_tokens=2, do_sample=False, stop_at_eos=False, verbose=False)
    for return_type in ("input", "tokens", None):
        assert torch.equal(model.generate(t, max_new_tokens=2, do_sample=False, stop_at_eos=False,
                                          return_type=return_type, verbose=False), greedy)
    assert torch.equal(model.generate(t, max_new_tokens=2, do_sample=False, eos_token_id=torch.tensor(47),
                                      verbose=False)[:, :7], greedy[:, :7])


# ---------------------------------------------------------------- from_pretrained dtype
def test_from_pretrained_dtype_names_and_auto(tmp_path):
    assert tl_mamba.from_pretrained("toy-mamba", dtype="auto").cfg.dtype == torch.float32
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16), ("torch.float64", torch.float64),
                        ("float32", torch.float32)):
        model = tl_mamba.from_pretrained("toy-mamba", dtype=name)
        assert model.cfg.dtype == dtype and model.W_E.dtype == dtype
    # "auto" is the checkpoint's own dtype: config.json's torch_dtype (transformers layout) ...
    mamba2().to(torch.bfloat16).save_pretrained(tmp_path / "hf", layout="transformers")
    assert tl_mamba.from_pretrained(str(tmp_path / "hf"), dtype="auto").W_E.dtype == torch.bfloat16
    # ... or, with no dtype in the config (mamba_ssm layout), that of the weights
    mamba1().to(torch.float16).save_pretrained(tmp_path / "ssm")
    assert tl_mamba.from_pretrained(str(tmp_path / "ssm"), dtype="auto").W_E.dtype == torch.float16
    assert HookedMamba.from_pretrained(str(tmp_path / "ssm"), dtype="float64").W_E.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, "int8", "fp8", "autos", 3])
def test_from_pretrained_refuses_non_float_dtypes(dtype):
    with pytest.raises((ValueError, TypeError), match=r"floating-point torch dtype, 'auto', or one of 'float32'"):
        tl_mamba.from_pretrained("toy-mamba", dtype=dtype)


def test_from_hf_dtype_names():
    transformers = pytest.importorskip("transformers")
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=1, state_size=4, expand=2, conv_kernel=3))
    assert HookedMamba.from_hf(hf).W_E.dtype == torch.float32
    from tl_mamba.loading import from_hf

    assert from_hf(HookedMamba, hf, dtype="auto").W_E.dtype == torch.float32
    assert from_hf(HookedMamba, hf, dtype="bfloat16").W_E.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="floating-point"):
        from_hf(HookedMamba, hf, dtype=torch.int32)


def test_a_config_with_an_integer_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype=torch.int64 is not a floating-point dtype"):
        tiny_config(dtype=torch.int64)
    cfg = tiny_config()
    cfg.dtype = torch.int64  # set after the config checked it
    with pytest.raises(TypeError, match="cfg.dtype must be a floating-point torch dtype"):
        HookedMamba(cfg)
    # the config reads the names from_pretrained reads ("bf16" was looked up as torch.bf16)
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("torch.float64", torch.float64),
                        ("auto", torch.float32)):
        assert tiny_config(dtype=name).dtype == dtype


@pytest.mark.parametrize("make", FAMILIES)
def test_tokens_or_mask_on_the_meta_device_are_refused_by_name(make):
    """A meta tensor has no values: token ids or a mask on it failed deep in the id check
    ("Tensor.item() cannot be called on meta tensors", "Cannot copy out of meta tensor")."""
    model = make()
    with pytest.raises(ValueError, match="token ids: the tensor is on the meta device"):
        model(tokens().to("meta"))
    with pytest.raises(ValueError, match="attention_mask: the tensor is on the meta device"):
        model(tokens(), attention_mask=torch.ones(2, 6, device="meta"))


# ---------------------------------------------------------------- decoding and looking up ids
def test_token_helpers_refuse_ids_they_would_drop_or_misread():
    """to_string / to_str_tokens decode an id past the tokenizer's vocabulary as nothing, so a
    wrong id vanished from the text; tokens_to_residual_directions raised a raw IndexError and
    to_single_token(5) "'int' object is not iterable"."""
    model = HookedMamba(tiny_config(), tokenizer=make_tokenizer())
    tok, v = model.tokenizer, model.cfg.d_vocab
    ids = [5, 9, 12]
    assert model.to_string(ids) == tok.decode(ids)  # what is right stays as the tokenizer has it
    assert model.to_str_tokens(torch.tensor(ids)) == [tok.decode([i]) for i in ids]
    assert model.to_string([]) == tok.decode([])
    torch.testing.assert_close(model.tokens_to_residual_directions(torch.tensor(ids)), model.W_U[:, ids].T)
    for call in (model.to_string, model.to_str_tokens):
        with pytest.raises(ValueError, match=rf"{call.__name__}: token ids must lie in \[0, {v}\), got min 5 max 9999"):
            call([5, 9999, 12])
        with pytest.raises(TypeError, match=rf"{call.__name__}: the tokens must be an integer tensor"):
            call(torch.tensor([1.0, 2.0]))
        with pytest.raises(ValueError, match=rf"{call.__name__} takes token ids \[p\] or \[b, p\], got shape \(1, 1, 3\)"):
            call(torch.tensor([[ids]]))
    for bad in (9999, torch.tensor([3, -1])):
        with pytest.raises(ValueError, match=rf"tokens_to_residual_directions: token ids must lie in \[0, {v}\)"):
            model.tokens_to_residual_directions(bad)
    with pytest.raises(TypeError, match="to_single_token takes a string, got int.*to_single_str_token"):
        model.to_single_token(5)
    for call in (model.to_string, model.to_str_tokens):  # the forward's hint is not theirs
        with pytest.raises(TypeError) as err:
            call(torch.tensor([1.0, 2.0]))
        assert "start_at_layer" not in str(err.value)
    with pytest.raises(TypeError, match="to feed residual activations use start_at_layer"):
        model(torch.ones(1, 3))


@pytest.mark.parametrize("bad, named", [(5, "got int"), (torch.tensor([5]), "got Tensor"), ([], "got an empty list"),
                                        (["a", 3], "got a list of int, str")])
def test_to_tokens_names_what_it_was_given(bad, named):
    """to_tokens(5) raised "'int' object is not iterable"."""
    model = HookedMamba(tiny_config(), tokenizer=make_tokenizer())
    with pytest.raises(ValueError, match=f"to_tokens takes a string or a non-empty list of strings, {named}$"):
        model.to_tokens(bad)
    assert model.to_tokens(("the", "cat")).shape[0] == 2  # a tuple of strings is a list of strings


# ---------------------------------------------------------------- configs
def test_config_refuses_a_zero_dt_rank_and_mamba2_settings_on_mamba1():
    """dt_rank=0 failed in the weight init with a ZeroDivisionError; n_heads=4 on Mamba-1 was
    silently replaced by 1."""
    for dt_rank in (0, -2, 1.5):
        with pytest.raises(ValueError, match=rf"dt_rank must be a positive int .* got {dt_rank}"):
            tiny_config(dt_rank=dt_rank)
    for wrong in (dict(n_heads=4), dict(n_groups=2)):
        with pytest.raises(ValueError, match="Mamba-1 has no heads or groups.*family='mamba2'"):
            tiny_config(**wrong)
    cfg = tiny_config(n_heads=1)  # what to_dict() writes back: n_heads 1, d_head d_inner
    assert HookedMambaConfig.from_dict(cfg.to_dict()) == cfg and cfg.n_heads == 1
