"""TransformerLens idioms that must give the same answers on a Mamba model.

Each test compares against something independent of the code under test: the
tokenizer's own output, TransformerLens's own ``utilities`` functions, or the
same prompt run (or generated) alone, unpadded.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from transformer_lens import utilities as tl_utils
from transformer_lens.utilities import Slice

from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig
from tl_mamba.cache import MambaActivationCache

from conftest import make_tokenizer, tiny_config

BOS, EOS, PAD = 0, 1, 2
TEXTS = ["when mary and john went to the store", "the cat", "one two three four"]


def perturbed(model, scale=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return model


def fresh_model(padding_side="right", **cfg):
    """A model with a tokenizer of its own (tests here change padding sides), shipped with ``padding_side``."""
    tokenizer = make_tokenizer()
    tokenizer.padding_side = padding_side
    torch.manual_seed(0)
    return perturbed(HookedMamba(tiny_config(**cfg), tokenizer=tokenizer))


def tokenizer_reference(model, texts):
    """The tokenizer's own padded batch of ``<bos> text`` (tokens and mask), on its padding side."""
    enc = model.tokenizer(["<bos> " + t for t in texts], padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def last_real_logits(model, texts):
    """TransformerLens's idiom: read the padding side off the tokenizer before taking the last logit."""
    tokens = model.to_tokens(texts)
    logits = model(tokens)
    if model.tokenizer.padding_side == "left":
        return logits[:, -1]
    mask = tl_utils.get_attention_mask(model.tokenizer, tokens, True)
    return logits[torch.arange(len(texts)), mask.sum(1) - 1]


def alone_last_logits(model, texts):
    return torch.stack([model(model.to_tokens(t))[0, -1] for t in texts])


# --------------------------------------------------------------------------- padding side


def test_tokenizer_padding_side_is_set_from_the_config():
    """A tokenizer shipped padding on the left, a config saying right: as TransformerLens's
    set_tokenizer, the model sets the tokenizer's side, so the two agree from the start."""
    model = fresh_model(padding_side="left")
    assert model.cfg.default_padding_side == "right"
    assert model.tokenizer.padding_side == "right"
    tokens, mask = model.to_tokens(TEXTS, return_attention_mask=True)
    ref_tokens, ref_mask = tokenizer_reference(model, TEXTS)
    assert torch.equal(tokens, ref_tokens) and torch.equal(mask, ref_mask)
    assert torch.equal(tl_utils.get_attention_mask(model.tokenizer, tokens, True), mask)
    torch.testing.assert_close(last_real_logits(model, TEXTS), alone_last_logits(model, TEXTS))


def test_setting_tokenizer_padding_side_left_pads_left_and_infers_the_mask():
    """``model.tokenizer.padding_side = "left"`` (TransformerLens's way to pad left): to_tokens pads
    left, the config follows, and a forward on the tokens without a mask infers it, as
    TransformerLens's forward does, so ``logits[:, -1]`` is each prompt's last token alone."""
    model = fresh_model()
    model.tokenizer.padding_side = "left"
    tokens, mask = model.to_tokens(TEXTS, return_attention_mask=True)
    ref_tokens, ref_mask = tokenizer_reference(model, TEXTS)
    assert torch.equal(tokens, ref_tokens) and torch.equal(mask, ref_mask)
    assert model.cfg.default_padding_side == "left"
    assert torch.equal(tl_utils.get_attention_mask(model.tokenizer, tokens, True), mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inferred, so no "left-padded batch without a mask" warning
        logits = model(tokens)
    torch.testing.assert_close(logits[:, -1], alone_last_logits(model, TEXTS))
    torch.testing.assert_close(last_real_logits(model, TEXTS), alone_last_logits(model, TEXTS))
    width = tokens.shape[1]
    for row, text in enumerate(TEXTS):  # every real position, not only the last
        alone = model(model.to_tokens(text))[0]
        torch.testing.assert_close(logits[row, width - alone.shape[0]:], alone)

    model.tokenizer.padding_side = "right"  # and back
    assert torch.equal(model.to_tokens(TEXTS), tokenizer_reference(model, TEXTS)[0])
    assert model.cfg.default_padding_side == "right"


def test_setting_the_config_side_moves_the_tokenizer():
    model = fresh_model()
    model.cfg.default_padding_side = "left"
    tokens = model.to_tokens(TEXTS)
    assert model.tokenizer.padding_side == "left"
    assert torch.equal(tokens, tokenizer_reference(model, TEXTS)[0])
    torch.testing.assert_close(last_real_logits(model, TEXTS), alone_last_logits(model, TEXTS))


@pytest.mark.parametrize("side", ["left", "right"])
def test_set_tokenizer(side):
    model = fresh_model()
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left" if side == "right" else "right"
    assert model.set_tokenizer(tokenizer, default_padding_side=side) is None
    assert model.tokenizer is tokenizer
    assert tokenizer.padding_side == model.cfg.default_padding_side == side
    assert torch.equal(model.to_tokens(TEXTS), tokenizer_reference(model, TEXTS)[0])
    other = make_tokenizer()
    other.padding_side = "left" if side == "right" else "right"
    model.tokenizer = other  # plain assignment: set_tokenizer with the config's side
    assert other.padding_side == side
    with pytest.raises(ValueError, match="default_padding_side"):
        model.set_tokenizer(tokenizer, default_padding_side="middle")
    model.set_tokenizer(None)
    assert model.tokenizer is None


# --------------------------------------------------------------------------- run_with_cache


@pytest.mark.parametrize("form", ["strings", "strings_kw", "tokens_kw", "tokens"])
def test_remove_batch_dim_refuses_a_batch_in_every_input_form(tiny_model, form):
    tokens = tiny_model.to_tokens(TEXTS[:2])
    args, kwargs = {
        "strings": ((TEXTS[:2],), {}),
        "strings_kw": ((), {"input": TEXTS[:2]}),
        "tokens_kw": ((), {"input": tokens}),
        "tokens": ((tokens,), {}),
    }[form]
    with pytest.raises(ValueError, match="batch size 1"):
        tiny_model.run_with_cache(*args, remove_batch_dim=True, **kwargs)


def test_remove_batch_dim_with_one_prompt_in_every_form(tiny_model):
    text = TEXTS[0]
    tokens = tiny_model.to_tokens(text)
    _, ref = tiny_model.run_with_cache(tokens)
    for args, kwargs in [((text,), {}), (([text],), {}), ((), {"input": text}), ((), {"input": tokens[0]})]:
        _, cache = tiny_model.run_with_cache(*args, remove_batch_dim=True, **kwargs)
        assert cache.has_batch_dim is False
        torch.testing.assert_close(cache["blocks.1.hook_resid_post"], ref["blocks.1.hook_resid_post"][0])


def test_cache_records_its_pos_slice(tiny_model):
    tokens = tiny_model.to_tokens(TEXTS[:2])
    _, full = tiny_model.run_with_cache(tokens)
    assert isinstance(full, MambaActivationCache) and full.pos_slice is None
    _, same = tiny_model.run_with_cache(tokens, pos_slice=Slice(None))
    assert same.pos_slice is None  # Slice(None) cuts nothing
    for pos_slice in (-1, (1, 4), Slice([0, 2])):
        _, cut = tiny_model.run_with_cache(tokens, pos_slice=pos_slice)
        assert isinstance(cut.pos_slice, Slice)  # recorded as applied: (1, 4) is slice(1, 4)
        expected = Slice.unwrap(pos_slice).apply(full["blocks.0.hook_x"], dim=1)  # an int keeps the axis
        torch.testing.assert_close(cut["blocks.0.hook_x"], expected)
        torch.testing.assert_close(cut.pos_slice.apply(full["blocks.0.hook_x"], dim=1), expected)
        row = cut.apply_slice_to_batch_dim(0)  # keeps the class and the record
        assert isinstance(row, MambaActivationCache) and row.pos_slice is cut.pos_slice
    assert MambaActivationCache({}, tiny_model).pos_slice is None


# --------------------------------------------------------------------------- add_caching_hooks


def test_add_caching_hooks_default_leaves_heavy_hooks_out_as_run_with_cache(tiny_model):
    tokens = tiny_model.to_tokens(TEXTS[:2])
    _, ref = tiny_model.run_with_cache(tokens)
    cache = tiny_model.add_caching_hooks()
    tiny_model(tokens)
    tiny_model.reset_hooks()
    assert sorted(cache) == sorted(ref.cache_dict)
    assert not any(name.endswith(("hook_h", "hook_ssm_mask")) for name in cache)
    for name in ref.cache_dict:
        torch.testing.assert_close(cache[name], ref.cache_dict[name])
    named = tiny_model.add_caching_hooks(names_filter=["blocks.0.hook_h", "blocks.1.hook_y"])
    tiny_model(tokens)
    tiny_model.reset_hooks()
    assert sorted(named) == ["blocks.0.hook_h", "blocks.1.hook_y"]
    assert named["blocks.0.hook_h"].shape == (*tokens.shape, tiny_model.cfg.d_inner, tiny_model.cfg.d_state)
    assert not any(hp.fwd_hooks for hp in tiny_model.hook_dict.values())


# --------------------------------------------------------------------------- tokens


def test_to_str_tokens_of_a_0d_tensor(tiny_model, tokenizer):
    logits = tiny_model(tiny_model.to_tokens(TEXTS[0]))
    top = logits.argmax(-1)[0, -1]
    assert top.dim() == 0
    assert tiny_model.to_str_tokens(top) == [tokenizer.decode([int(top)])]
    assert tiny_model.to_str_tokens(torch.tensor(5)) == [tokenizer.decode([5])]
    assert tiny_model.to_str_tokens(5) == [tokenizer.decode([5])]


def test_to_single_str_token(tiny_model, tokenizer):
    for token in (0, 5, 17):
        assert tiny_model.to_single_str_token(token) == tokenizer.decode([token])
    assert tiny_model.to_single_str_token(torch.tensor(5)) == tokenizer.decode([5])
    with pytest.raises(TypeError):
        tiny_model.to_single_str_token("cat")


def test_unknown_words_warn_in_to_tokens_and_are_refused_by_to_single_token(tiny_model, tokenizer):
    """A word-level vocabulary reads a word it lacks as <unk>: to_tokens says so (the prompt
    still runs), and to_single_token refuses it (an answer token that is <unk> scores nothing)."""
    unk = tokenizer.unk_token_id
    assert tokenizer("zebra", add_special_tokens=False)["input_ids"] == [unk]  # the premise
    with pytest.warns(UserWarning, match=r"1 of 2 inputs hold words the tokenizer does not know.*'<unk>'"):
        tokens = tiny_model.to_tokens(["the cat sat", "the zebra sat"])
    assert tokens[1].tolist() == [0] + tokenizer("the zebra sat", add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match="'zebra' is not in the tokenizer's vocabulary"):
        tiny_model.to_single_token("zebra")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known words, and an <unk> the text spells out, are quiet
        tiny_model.to_tokens(["the cat sat", "the <unk> sat"])
        assert tiny_model.to_single_token("cat") == tokenizer.convert_tokens_to_ids("cat")
        assert tiny_model.to_single_token("<unk>") == unk


def test_get_token_position(tiny_model, tokenizer):
    text = "the cat sat on the mat"
    ids = [BOS] + tokenizer(text, add_special_tokens=False)["input_ids"]
    the = tokenizer.convert_tokens_to_ids("the")
    first, last = ids.index(the), len(ids) - 1 - ids[::-1].index(the)
    assert (first, last) == (1, 5)
    assert tiny_model.get_token_position("the", text) == first
    assert tiny_model.get_token_position("the", text, mode="last") == last
    assert tiny_model.get_token_position(the, text, prepend_bos=False) == first - 1
    tokens = tiny_model.to_tokens(text)
    assert tiny_model.get_token_position(the, tokens, mode="last") == last
    assert tiny_model.get_token_position(torch.tensor(the), tokens[0]) == first
    with pytest.raises(ValueError, match="does not occur"):
        tiny_model.get_token_position("dog", text)
    with pytest.raises(ValueError, match="mode"):
        tiny_model.get_token_position("the", text, mode="middle")


# --------------------------------------------------------------------------- loss_fn


def test_loss_fn_matches_transformer_lens(tiny_model):
    tokens, mask = tiny_model.to_tokens(TEXTS, return_attention_mask=True)
    logits = tiny_model(tokens, attention_mask=mask)
    for attention_mask in (None, mask):
        for per_token in (False, True):
            expected = tl_utils.lm_cross_entropy_loss(logits, tokens, attention_mask, per_token)
            got = tiny_model.loss_fn(logits, tokens, attention_mask=attention_mask, per_token=per_token)
            torch.testing.assert_close(got, expected)
    torch.testing.assert_close(tiny_model(tokens, attention_mask=mask, return_type="loss"),
                               tiny_model.loss_fn(logits, tokens, mask))
    with pytest.raises(ValueError):
        tiny_model.loss_fn(logits[:, :1], tokens[:, :1])


# --------------------------------------------------------------------------- generate


def test_generate_strings_of_a_left_padded_batch_are_each_prompt_alone():
    tiny_model = fresh_model()
    texts = ["when mary and john went to the store", "a dog", "one two three"]
    kwargs = dict(max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    batch = tiny_model.generate(texts, **kwargs)
    assert batch == [tiny_model.generate(text, **kwargs) for text in texts]
    generated = tiny_model.generate(texts, return_type="tokens", **kwargs)[:, -4:]
    assert not (generated == PAD).any()  # so a "<pad>" in the text could only be padding
    assert not any("<pad>" in s for s in batch)
    tokens, mask = tiny_model.to_tokens(texts, padding_side="left", return_attention_mask=True)
    from_tokens = tiny_model.generate(tokens, attention_mask=mask, return_type="str", **kwargs)
    assert from_tokens == batch


def test_generate_strings_leave_out_the_fill_after_a_rows_eos():
    """A row that stops at its EOS while others go on is filled; its string ends at its EOS, as alone."""
    tiny_model = fresh_model()
    texts = ["when mary and john went to the store", "a dog"]
    kwargs = dict(max_new_tokens=6, do_sample=False, verbose=False)
    free = tiny_model.generate(texts[1], stop_at_eos=False, return_type="tokens", **kwargs)
    n_prompt = tiny_model.to_tokens(texts[1]).shape[1]
    eos = int(free[0, n_prompt])  # the short prompt's first new token ends it at once
    batch = tiny_model.generate(texts, eos_token_id=eos, **kwargs)
    alone = [tiny_model.generate(text, eos_token_id=eos, **kwargs) for text in texts]
    assert batch == alone
    # the prompt and its EOS (an ordinary token here), decoded as TransformerLens decodes: no BOS
    assert batch[1] == tiny_model.tokenizer.decode(free[0, : n_prompt + 1].tolist(), skip_special_tokens=True)


def test_mamba2_remove_batch_dim_and_padding_side():
    cfg = HookedMambaConfig(family="mamba2", n_layers=2, d_model=32, d_vocab=48, d_state=8, d_head=16, seed=0,
                            bos_token_id=0, eos_token_id=1, pad_token_id=2)
    tokenizer = make_tokenizer()
    tokenizer.padding_side = "left"
    model = perturbed(HookedMamba2(cfg, tokenizer=tokenizer))
    assert tokenizer.padding_side == "right"
    with pytest.raises(ValueError, match="batch size 1"):
        model.run_with_cache(TEXTS, remove_batch_dim=True)
    model.tokenizer.padding_side = "left"
    torch.testing.assert_close(model(model.to_tokens(TEXTS))[:, -1], alone_last_logits(model, TEXTS))
