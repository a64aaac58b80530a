"""The forward contract of HookedMamba: return types, input forms, padding,
start/stop layers, tokenizer helpers and error messages.

References are independent of the code path under test: a manual cross
entropy, the same prompt run alone (unpadded), the cache of a full run, the
tokenizer itself.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tl_mamba import HookedMamba

from conftest import WORDS, tiny_config

ATOL = 1e-5
RTOL = 1e-4
BOS, EOS, PAD = 0, 1, 2


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


def perturb_(model, scale=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture
def model(tiny_model):
    return perturb_(tiny_model)


def word_id(tokenizer, word):
    return tokenizer.convert_tokens_to_ids(word)


def manual_ce(logits, tokens):
    """Per-token next-token cross entropy ``[b, p-1]``."""
    b, p, v = logits.shape
    return F.cross_entropy(logits[:, :-1].reshape(-1, v), tokens[:, 1:].reshape(-1), reduction="none").view(b, p - 1)


# --------------------------------------------------------------------------- return types


def test_return_types(model):
    tokens = torch.tensor([[0, 5, 9, 12, 7, 30, 4], [0, 22, 8, 8, 41, 3, 17]])
    logits = model(tokens)
    assert logits.shape == (2, 7, model.cfg.d_vocab)
    assert model(tokens, return_type="logits").shape == logits.shape
    assert model(tokens, return_type=None) is None

    loss = model(tokens, return_type="loss")
    assert loss.dim() == 0
    close(loss, manual_ce(logits, tokens).mean())

    both = model(tokens, return_type="both")
    assert isinstance(both, tuple) and len(both) == 2
    close(both[0], logits, atol=0, rtol=0)
    close(both[1], loss, atol=1e-6, rtol=1e-6)
    assert both.logits is both[0] and both.loss is both[1]  # named, as HookedTransformer's Output

    per_token = model(tokens, return_type="loss", loss_per_token=True)
    assert per_token.shape == (2, 6)
    close(per_token, manual_ce(logits, tokens))


def test_one_dim_token_input_is_one_batch_row(model):
    tokens = torch.tensor([0, 5, 9, 12])
    close(model(tokens), model(tokens[None]), atol=0, rtol=0)


# --------------------------------------------------------------------------- strings


def test_string_and_list_input_equal_token_input(model, tokenizer):
    text = "the cat sat on the mat"
    ids = [BOS] + [word_id(tokenizer, w) for w in text.split()]
    tokens = torch.tensor([ids])
    assert torch.equal(model.to_tokens(text), tokens)
    close(model(text), model(tokens), atol=0, rtol=0)

    texts = ["the cat sat on the mat", "a dog ran to the park"]  # same length: no padding
    batch = torch.tensor([[BOS] + [word_id(tokenizer, w) for w in t.split()] for t in texts])
    assert torch.equal(model.to_tokens(texts), batch)
    close(model(texts), model(batch), atol=0, rtol=0)
    close(model(texts, return_type="loss"), model(batch, return_type="loss"), atol=0, rtol=0)


def test_prepend_bos(model, tokenizer):
    text = "mary went to the store"
    ids = [word_id(tokenizer, w) for w in text.split()]
    assert model.cfg.default_prepend_bos is True
    assert model.to_tokens(text).tolist() == [[BOS] + ids]
    assert model.to_tokens(text, prepend_bos=True).tolist() == [[BOS] + ids]
    assert model.to_tokens(text, prepend_bos=False).tolist() == [ids]
    close(model(text, prepend_bos=False), model(torch.tensor([ids])), atol=0, rtol=0)
    close(model(text, prepend_bos=True), model(torch.tensor([[BOS] + ids])), atol=0, rtol=0)
    assert not torch.allclose(model(text, prepend_bos=False)[:, -1], model(text)[:, -1], atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_string_batch_matches_each_prompt_alone(model, side):
    texts = ["when mary and john went to the store", "the cat", "one two three four"]
    logits = model(texts, padding_side=side)
    tokens = model.to_tokens(texts, padding_side=side)
    width = max(len(t.split()) for t in texts) + 1
    assert logits.shape == (3, width, model.cfg.d_vocab)
    for row, text in enumerate(texts):
        alone_tokens = model.to_tokens(text)
        alone = model(alone_tokens)
        n = alone_tokens.shape[1]
        real = slice(0, n) if side == "right" else slice(width - n, width)
        assert torch.equal(tokens[row, real], alone_tokens[0])
        pad_part = tokens[row, n:] if side == "right" else tokens[row, : width - n]
        assert bool((pad_part == PAD).all())
        close(logits[row, real], alone[0])


LEFT_TEXTS = ["when mary and john went to the store", "the cat", "one two three four"]


def test_left_padded_tokens_without_mask_warn(model):
    """Left pads run through the recurrence, so a left-padded batch without its mask gives other
    logits than each prompt alone (checked here, so that the warning is about something real)."""
    import warnings

    tokens = model.to_tokens(LEFT_TEXTS, padding_side="left")
    with pytest.warns(UserWarning, match="left-padded batch given without an attention_mask"):
        logits = model(tokens)
    alone = model(model.to_tokens(LEFT_TEXTS[1]))
    assert not torch.allclose(logits[1, -1], alone[0, -1], atol=1e-3)
    with pytest.warns(UserWarning, match="left-padded"):  # no BOS after the pads: a run of 2 or more
        model(model.to_tokens(LEFT_TEXTS, padding_side="left", prepend_bos=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for right padding, a mask, one row, or a pad token by chance
        chance = torch.randint(4, model.cfg.d_vocab, (3, 6), generator=torch.Generator().manual_seed(0))
        chance[0, 0] = PAD  # random token ids that happen to start with the pad id, not followed by a BOS
        model(chance)
        model(model.to_tokens(LEFT_TEXTS, padding_side="right"))
        model(*model.to_tokens(LEFT_TEXTS, padding_side="left", return_attention_mask=True)[:1],
              attention_mask=model.to_tokens(LEFT_TEXTS, padding_side="left", return_attention_mask=True)[1])
        model(tokens[1:2])


@pytest.mark.parametrize("pad_is_bos", [False, True])
def test_left_padding_side_infers_the_mask_from_pad_tokens(model, tokenizer, pad_is_bos):
    """With cfg.default_padding_side = "left" (TransformerLens infers the mask then too), left-padded
    tokens without a mask give each prompt's logits alone, also when the pad token is the BOS."""
    import copy

    if pad_is_bos:
        model.tokenizer = copy.deepcopy(tokenizer)
        model.tokenizer.pad_token = model.tokenizer.bos_token
        assert model.tokenizer.pad_token_id == model.tokenizer.bos_token_id == BOS
    model.cfg.default_padding_side = "left"
    tokens = model.to_tokens(LEFT_TEXTS)
    logits = model(tokens)
    width = tokens.shape[1]
    for row, text in enumerate(LEFT_TEXTS):
        alone_tokens = model.to_tokens(text)
        n = alone_tokens.shape[1]
        assert torch.equal(tokens[row, width - n:], alone_tokens[0])
        close(logits[row, width - n:], model(alone_tokens)[0])
    # hidden attention of a padded batch: each prompt's own α, nothing to or from its padding
    alpha = model.hidden_attention(tokens, 1, channels=[0, 5])
    assert alpha.shape == (3, 2, width, width)
    for row, text in enumerate(LEFT_TEXTS):
        alone = model.hidden_attention(model.to_tokens(text), 1, channels=[0, 5])[0]
        n = alone.shape[-1]
        assert alone.abs().max() > 0
        close(alpha[row, :, width - n:, width - n:], alone)
        assert not alpha[row, :, :, :width - n].any() and not alpha[row, :, :width - n].any()


def test_a_tokenizer_without_a_pad_token_pads_with_its_eos_and_the_mask_is_inferred(model, tokenizer):
    """GPT-NeoX's tokenizer (the state-spaces checkpoints') has no pad token: to_tokens pads with
    the EOS, and a left-padded batch without a mask is read with the same id (it was left
    unmasked, the pads running through the recurrence, without a warning)."""
    import copy

    model.tokenizer = copy.deepcopy(tokenizer)
    model.tokenizer.pad_token = None
    model.cfg.pad_token_id = None  # (a config naming a pad id would be used before the EOS)
    assert model.tokenizer.pad_token_id is None
    tokens, mask = model.to_tokens(LEFT_TEXTS, padding_side="left", return_attention_mask=True)
    assert (tokens[~mask.bool()] == model.tokenizer.eos_token_id).all() and not mask.all()
    expected = model(tokens, attention_mask=mask)
    close(model(tokens, padding_side="left"), expected)
    with pytest.warns(UserWarning, match="pass padding_side='left'"):
        model(tokens)
    width = tokens.shape[1]
    for row, text in enumerate(LEFT_TEXTS):
        alone = model.to_tokens(text)
        close(expected[row, width - alone.shape[1]:], model(alone)[0])


def test_padding_side_left_in_the_call_infers_the_mask_of_tokens(model):
    """forward(tokens, padding_side="left") reads the pads as padding, as HookedTransformer does
    (the argument was applied to strings only, so a tokenizer padding on the right ran the pads
    through the recurrence); run_with_cache and run_with_hooks take it the same way."""
    assert model._padding_side() == "right"
    tokens, mask = model.to_tokens(LEFT_TEXTS, padding_side="left", return_attention_mask=True)
    expected = model(tokens, attention_mask=mask)
    close(model(tokens, padding_side="left"), expected)
    close(model.run_with_cache(tokens, padding_side="left")[0], expected)
    close(model.run_with_hooks(tokens, padding_side="left"), expected)
    with pytest.warns(UserWarning, match="pass padding_side='left'"):
        model(tokens)


def test_inferred_mask_follows_prepend_bos_and_keeps_all_pad_rows(model, tokenizer):
    """The BOS kept at the end of a pad run only when the forward prepends one (TransformerLens
    reads the forward's prepend_bos); a row of nothing but pads (zeros fed in) is not padding."""
    import copy

    model.tokenizer = copy.deepcopy(tokenizer)
    model.tokenizer.pad_token = model.tokenizer.bos_token
    model.cfg.default_padding_side = "left"
    texts = ["the cat sat on the mat", "a dog ran"]
    tokens, mask = model.to_tokens(texts, prepend_bos=False, return_attention_mask=True)
    torch.testing.assert_close(model(tokens, prepend_bos=False), model(tokens, attention_mask=mask))
    assert not torch.allclose(model(tokens)[1, -1], model(tokens, attention_mask=mask)[1, -1], atol=1e-4)
    pads = torch.full((2, 5), BOS)
    torch.testing.assert_close(model(pads), model(pads, attention_mask=torch.ones(2, 5)))
    assert model.hook_shapes()["blocks.0.hook_h"][1] == 4


def test_float64_model_gives_a_float64_loss(model):
    """A float64 model keeps float64 through the loss (finite-difference checks need it)."""
    model = model.double()
    tokens = torch.randint(4, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(1))
    loss = model(tokens, return_type="loss")
    assert loss.dtype == torch.float64
    expected = manual_ce(model(tokens).double(), tokens).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)


def _random_padded_batch(lengths, side, vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    # the pad positions hold random (non-pad) tokens: only the mask may say what is padding
    tokens = torch.randint(4, vocab, (len(lengths), width), generator=gen)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, width - n :] = 1
    return tokens, mask


def _real(side, width, n):
    return slice(0, n) if side == "right" else slice(width - n, width)


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_mask_padding_does_not_leak(model, side, backend):
    model.set_backend(backend)
    assert model.backend == backend
    lengths = [9, 5, 2]
    tokens, mask = _random_padded_batch(lengths, side, model.cfg.d_vocab)
    width = tokens.shape[1]
    logits = model(tokens, attention_mask=mask)
    for row, n in enumerate(lengths):
        real = _real(side, width, n)
        alone = model(tokens[row : row + 1, real])
        close(logits[row, real], alone[0])
    if side == "left":
        # without the mask, the pad tokens do leak (so the check above is meaningful)
        unmasked = model(tokens)
        real = _real(side, width, lengths[1])
        assert not torch.allclose(unmasked[1, real], logits[1, real], atol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_mask_padding_every_hook_matches_alone(model, side):
    """Not only the logits: every per-position activation at a real token equals the prompt run alone."""
    lengths = [7, 3]
    tokens, mask = _random_padded_batch(lengths, side, model.cfg.d_vocab, seed=1)
    width = tokens.shape[1]
    _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n.endswith(("hook_h", "hook_y", "hook_conv", "hook_resid_post")))
    row, n = 1, lengths[1]
    real = _real(side, width, n)
    _, alone = model.run_with_cache(tokens[row : row + 1, real], names_filter=lambda n: n.endswith(("hook_h", "hook_y", "hook_conv", "hook_resid_post")))
    for name in alone.keys():
        close(cache[name][row, real], alone[name][0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_loss_with_attention_mask_ignores_padding(model, side):
    lengths = [8, 4, 3]
    tokens, mask = _random_padded_batch(lengths, side, model.cfg.d_vocab, seed=2)
    width = tokens.shape[1]
    per_token = model(tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
    assert per_token.shape == (3, width - 1)
    alone_losses = []
    for row, n in enumerate(lengths):
        real = _real(side, width, n)
        alone = model(tokens[row : row + 1, real], return_type="loss", loss_per_token=True)[0]  # [n-1]
        alone_losses.append(alone)
        # per-token loss at position t predicts t+1: the valid window is real minus its last position
        start = 0 if side == "right" else width - n
        close(per_token[row, start : start + n - 1], alone)
    mean = model(tokens, attention_mask=mask, return_type="loss")
    close(mean, torch.cat(alone_losses).mean())
    # and the padded garbage would change it
    assert not torch.allclose(mean, model(tokens, return_type="loss"), atol=1e-4)


def test_string_batch_loss_ignores_padding(model):
    texts = ["the cat sat on the mat and then ran", "a dog"]
    alone = torch.cat([model(t, return_type="loss", loss_per_token=True)[0] for t in texts])
    for side in ("left", "right"):
        close(model(texts, return_type="loss", padding_side=side), alone.mean())


# --------------------------------------------------------------------------- start / stop at layer


def test_stop_and_start_at_layer(model):
    tokens = torch.tensor([[0, 5, 9, 12, 7, 30, 4], [0, 22, 8, 8, 41, 3, 17]])
    n = model.cfg.n_layers
    logits, cache = model.run_with_cache(tokens)
    for k in range(n):
        resid = model(tokens, stop_at_layer=k)
        close(resid, cache[f"blocks.{k}.hook_resid_pre"], atol=1e-6, rtol=1e-5)
        close(model(resid, start_at_layer=k), logits)
    close(model(tokens, stop_at_layer=0), cache["hook_embed"], atol=1e-6, rtol=1e-5)
    # negative indices count from the end
    resid = model(tokens, stop_at_layer=-1)
    close(resid, cache[f"blocks.{n - 1}.hook_resid_pre"], atol=1e-6, rtol=1e-5)
    close(model(resid, start_at_layer=-1), logits)
    # start and stop together: one block
    mid = model(cache["blocks.0.hook_resid_pre"], start_at_layer=0, stop_at_layer=1)
    close(mid, cache["blocks.1.hook_resid_pre"], atol=1e-5, rtol=1e-4)


def test_start_stop_with_attention_mask(model):
    lengths = [6, 3]
    tokens, mask = _random_padded_batch(lengths, "left", model.cfg.d_vocab, seed=3)
    full = model(tokens, attention_mask=mask)
    resid = model(tokens, attention_mask=mask, stop_at_layer=1)
    resumed = model(resid, attention_mask=mask, start_at_layer=1)
    real = _real("left", tokens.shape[1], 3)
    close(resumed[1, real], full[1, real])
    close(resumed[0], full[0])


def test_start_at_layer_hooks_only_later_blocks(model):
    tokens = torch.tensor([[0, 5, 9, 12]])
    resid = model(tokens, stop_at_layer=1)
    fired = []
    model.run_with_hooks(resid, start_at_layer=1, fwd_hooks=[(lambda name: name.endswith("hook_x"), lambda a, hook: fired.append(hook.name))])
    assert fired == ["blocks.1.hook_x"]


# --------------------------------------------------------------------------- tokenizer helpers


def test_tokenizer_helpers(model, tokenizer):
    text = "the capital of france is paris"
    ids = [word_id(tokenizer, w) for w in text.split()]
    assert model.tokenizer is tokenizer
    assert model.to_tokens(text).tolist() == [[BOS] + ids]
    assert model.to_string(torch.tensor(ids)) == text
    assert model.to_string(torch.tensor([ids, ids])) == [text, text]
    assert model.to_str_tokens(text) == ["<bos>"] + text.split()
    assert model.to_str_tokens(text, prepend_bos=False) == text.split()
    assert model.to_str_tokens(torch.tensor([BOS] + ids)) == ["<bos>"] + text.split()
    assert model.to_single_token("paris") == word_id(tokenizer, "paris")
    assert model.to_single_token("cat") == WORDS.index("cat") + 4
    with pytest.raises(ValueError, match="2 tokens"):
        model.to_single_token("the cat")


def test_model_without_tokenizer(tiny_model):
    bare = HookedMamba(tiny_config())
    assert bare.tokenizer is None
    tokens = torch.tensor([[0, 5, 9, 12]])
    assert bare(tokens).shape == (1, 4, 48)
    # with the fixture's weights it gives the fixture's logits: the tokenizer plays no part
    bare.load_state_dict(tiny_model.state_dict())
    close(bare(tokens), tiny_model(tokens), atol=0, rtol=0)
    with pytest.raises((ValueError, RuntimeError, TypeError), match="(?i)tokenizer"):
        bare("the cat")
    with pytest.raises((ValueError, RuntimeError, TypeError), match="(?i)tokenizer"):
        bare(["the cat", "a dog"])
    with pytest.raises((ValueError, RuntimeError, TypeError), match="(?i)tokenizer"):
        bare.to_tokens("the cat")


# --------------------------------------------------------------------------- errors


def test_error_messages(model):
    tokens = torch.tensor([[0, 5, 9, 12]])
    with pytest.raises(ValueError, match=r"(?i)shape|dim|batch"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises((TypeError, ValueError), match=r"(?i)int|dtype|float"):
        model(torch.tensor([[0.0, 5.0, 9.0]]))
    with pytest.raises((ValueError, IndexError), match=r"(?i)token|vocab"):
        model(torch.tensor([[0, 5, 50]]))
    with pytest.raises((ValueError, IndexError), match=r"(?i)token|vocab"):
        model(torch.tensor([[0, -1, 5]]))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(1, 4\).*got \(1, 3\)$"):
        model(tokens, attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"shape \(2, 4\).*got \(4,\) \(a 1-D mask is one prompt's\)"):
        model(tokens.repeat(2, 1), attention_mask=torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(tokens, attention_mask=torch.tensor([[1, 0, 1, 1]]))
    with pytest.raises(ValueError, match="attention_mask"):
        model(tokens, attention_mask=torch.tensor([[0, 1, 0, 1]]))
    with pytest.raises(ValueError, match="return_type"):
        model(tokens, return_type="logprobs")
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(tokens, stop_at_layer=model.cfg.n_layers + 1)
    with pytest.raises(ValueError, match="start_at_layer"):
        model(torch.zeros(1, 4, model.cfg.d_model), start_at_layer=model.cfg.n_layers + 5)
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(tokens, stop_at_layer=-model.cfg.n_layers - 1)
    with pytest.raises(ValueError, match="nope"):
        model.set_backend("nope")
    assert model.backend != "nope"
    # the model still works after all of that
    assert model(tokens).shape == (1, 4, model.cfg.d_vocab)


def test_set_backend_and_backend_property(model):
    tokens = torch.tensor([[0, 5, 9, 12, 7, 30, 4, 11, 19]])
    model.set_backend("reference")
    assert model.backend == "reference"
    ref = model(tokens)
    model.set_backend("torch")
    assert model.backend == "torch"
    close(model(tokens), ref)


def test_heavy_hook_memory_guard(model):
    tokens = torch.tensor([[0, 5, 9, 12, 7, 30]])
    b, p = tokens.shape
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_h")
    assert cache["blocks.0.hook_h"].shape == (b, p, model.cfg.d_inner, model.cfg.d_state)
    model.heavy_hook_memory_limit = 1000
    nbytes = b * p * model.cfg.d_inner * model.cfg.d_state * 4  # float32 states
    with pytest.raises(MemoryError, match=rf"hook_h would need {nbytes / 1024:.2f} KiB .* limit of 1000 bytes"):
        model.run_with_cache(tokens, names_filter="blocks.0.hook_h")
    with pytest.raises(MemoryError, match="hook_h"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_h", lambda a, hook: a)])
    # light hooks are unaffected by the limit, and nothing stays attached
    _, cache = model.run_with_cache(tokens)
    assert "blocks.0.hook_x" in cache
    assert model(tokens).shape == (b, p, model.cfg.d_vocab)
    # the limit counts an edit's working memory (EDIT_WORKING_FACTOR x the tensor: measured peaks were
    # 2-2.7x), so a limit that holds the tensor but not the edit lets a cache through and refuses
    # the edit before any work on it
    from tl_mamba.models.heavy_hooks import EDIT_WORKING_FACTOR

    assert EDIT_WORKING_FACTOR["hook_h"] >= 2 and EDIT_WORKING_FACTOR["hook_ssm_mask"] >= 2.5
    mask_bytes = b * 1 * p * p * 4
    model.heavy_hook_memory_limit = 1.5 * max(nbytes, mask_bytes)
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_h", "blocks.0.hook_ssm_mask"])
    assert cache["blocks.0.hook_ssm_mask"].shape == (b, 1, p, p)

    def edit(value, hook):  # the state at position 2; the edge 1 -> 3
        if hook.name.endswith("hook_h"):
            value[:, 2] = 0
        else:
            value[..., 3, 1] = 0

    for name, size in (("hook_h", nbytes), ("hook_ssm_mask", mask_bytes)):
        model.heavy_hook_memory_limit = 1.5 * size
        with pytest.raises(MemoryError, match=rf"applying the edit a hook made to blocks.1.{name} \("):
            model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.1.{name}", edit)])
        model.heavy_hook_memory_limit = EDIT_WORKING_FACTOR[name] * size
        model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.1.{name}", edit)])
    # None lifts the limit; nonsense is refused when set, not at the next forward
    model.heavy_hook_memory_limit = None
    assert model.heavy_hook_memory_limit == float("inf")
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_h")
    assert cache["blocks.0.hook_h"].shape == (b, p, model.cfg.d_inner, model.cfg.d_state)
    for bad, error in (("8GB", TypeError), (0, ValueError), (-1.0, ValueError), (float("nan"), ValueError)):
        with pytest.raises(error, match="heavy_hook_memory_limit"):
            model.heavy_hook_memory_limit = bad


def test_entry_point_signatures_follow_the_contract(tmp_path):
    """API.md writes ``tl_mamba.from_pretrained(name_or_path, device=None, dtype=torch.float32)``;
    the class methods take the same arguments, by position too."""
    import inspect

    import tl_mamba
    from tl_mamba import HookedMamba2

    for fn in (tl_mamba.from_pretrained, HookedMamba.from_pretrained, HookedMamba2.from_pretrained):
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["name_or_path", "device", "dtype"], fn
        assert params["device"].default is None and params["dtype"].default is torch.float32, fn
        assert all(params[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for name in ("device", "dtype")), fn
    HookedMamba(tiny_config()).save_pretrained(tmp_path)
    for fn in (tl_mamba.from_pretrained, HookedMamba.from_pretrained):
        assert fn(str(tmp_path), "cpu", torch.float64).W_U.dtype == torch.float64, fn
