"""``HookedMamba.generate``: recurrent decoding that matches full forwards, with hooks firing.

References: a loop of full forwards over the growing prefix (argmax, or the
top-k / nucleus sets computed from those logits), the same prompt generated
alone, and the tokens that a hook forces.
"""

from __future__ import annotations

import pytest
import torch

from tl_mamba import HookedMamba2, RecurrentState

from conftest import tiny_config

ATOL = 1e-5
RTOL = 1e-4
EOS = 1


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


@pytest.fixture
def prompt(model):
    tokens = model.to_tokens(["the cat sat on the mat", "mary gave john a red drink"])
    assert tokens.shape == (2, 7)  # equal lengths: no padding
    return tokens


def gen(model, input, **kwargs):
    kwargs.setdefault("verbose", False)
    return model.generate(input, **kwargs)


@torch.no_grad()
def greedy_by_full_forwards(model, tokens, n_new, fwd_hooks=()):
    """Independent reference: rerun the whole prefix every step and take the argmax."""
    tokens = tokens.clone()
    for _ in range(n_new):
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


def force_token_hook(model, token, rows=None, from_call=0, until_call=None):
    """A hook on ``ln_final.hook_normalized`` that makes ``token`` the argmax at the last position.

    The replacement vector v solves v @ W_U ≈ 30 · onehot(token) in the least-squares sense.
    """
    target = torch.zeros(model.cfg.d_vocab)
    target[token] = 30.0
    with torch.no_grad():
        v = target @ torch.linalg.pinv(model.W_U.detach())
        assert int((v @ model.W_U).argmax()) == token  # precondition of the tests below
    calls = {"n": 0}

    def hook(act, hook):
        if calls["n"] >= from_call and (until_call is None or calls["n"] < until_call):
            act = act.clone()
            sel = slice(None) if rows is None else rows
            act[sel, -1] = v
        calls["n"] += 1
        return act

    return hook


# --------------------------------------------------------------------------- greedy


def test_greedy_equals_loop_of_full_forwards(model, prompt):
    out = gen(model, prompt, max_new_tokens=8, do_sample=False, stop_at_eos=False)
    expected = greedy_by_full_forwards(model, prompt, 8)
    assert out.shape == (2, prompt.shape[1] + 8)
    assert torch.equal(out, expected)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_greedy_single_prompt_per_backend(model, backend):
    model.set_backend(backend)
    tokens = model.to_tokens("when mary and john went to the store")
    out = gen(model, tokens, max_new_tokens=6, do_sample=False, stop_at_eos=False)
    assert torch.equal(out, greedy_by_full_forwards(model, tokens, 6))


def test_step_logits_equal_full_forward_via_hook(model, prompt):
    """The logits of every decoding step equal those of a full forward over the same prefix."""
    captured = []

    def grab(act, hook):
        captured.append(act[:, -1].detach().clone())

    n_new, P = 7, prompt.shape[1]
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", grab)]):
        out = gen(model, prompt, max_new_tokens=n_new, do_sample=False, stop_at_eos=False)
    assert len(captured) in (n_new, n_new + 1)  # prefill + one per fed token (the last may be skipped)
    with torch.no_grad():
        for step, normalized in enumerate(captured):
            full = model(out[:, : P + step])[:, -1]
            close(normalized @ model.W_U, full)


def test_step_logits_equal_full_forward_via_recurrent_state(model, prompt):
    """Drive the recurrence by hand: prefill, then one token at a time on a RecurrentState."""
    tokens = torch.cat([prompt, torch.tensor([[5, 9, 33, 17, 40], [44, 6, 6, 21, 12]])], dim=1)
    P = prompt.shape[1]
    state = RecurrentState.empty(model.cfg.n_layers)
    with torch.no_grad():
        logits = model(tokens[:, :P], state=state)
        close(logits, model(tokens[:, :P]))
        for t in range(P, tokens.shape[1]):
            step = model(tokens[:, t : t + 1], state=state)
            assert step.shape == (2, 1, model.cfg.d_vocab)
            close(step[:, -1], model(tokens[:, : t + 1])[:, -1])


def test_a_recurrent_state_of_another_batch_or_model_is_refused_by_name(model, prompt):
    """A RecurrentState carries one batch of one model: reusing it for another batch size, another
    model family or passing something else raised deep inside the conv (or an AttributeError)."""
    state = RecurrentState.empty(model.cfg.n_layers)
    with torch.no_grad():
        model(prompt, state=state)
        with pytest.raises(ValueError, match=r"state.layers\[0\]\['conv'\] has shape .*batch of 1.*another batch"):
            model(prompt[:1], state=state)
        other = HookedMamba2(tiny_config(family="mamba2", d_head=8, n_groups=1, dt_rank="auto"))
        with pytest.raises(ValueError, match=r"this mamba2 model on a batch of 2 needs"):
            other(prompt, state=state)
        with pytest.raises(TypeError, match="RecurrentState.empty.*got dict"):
            model(prompt, state={})
        with pytest.raises(ValueError, match="state has 1 layers"):
            model(prompt, state=RecurrentState.empty(1))


def test_a_state_that_would_come_out_wrong_is_refused(model, prompt):
    """Three stateful calls gave a wrong state silently (the next call's logits differed from the
    whole sequence by 0.1-10): layers skipped by start/stop_at_layer, padding after real tokens (it
    filled the conv window), and padding in a call that continues a state. Each now raises; left
    padding in the first call still gives each prompt's own state."""
    whole = torch.tensor([[7, 8, 9, 10, 11], [3, 4, 5, 6, 7]])
    with torch.no_grad():
        for kw in ({"stop_at_layer": 1}, {"start_at_layer": 1}):
            state = RecurrentState.empty(model.cfg.n_layers)
            x = whole[:, :3] if "stop_at_layer" in kw else model(whole[:, :3], stop_at_layer=1)
            with pytest.raises(ValueError, match=r"state= runs every layer.*blocks \[\d, \d\)"):
                model(x, state=state, **kw)
        state = RecurrentState.empty(model.cfg.n_layers)
        right = torch.tensor([[7, 8, 9, 0, 0], [3, 4, 5, 6, 7]])
        with pytest.raises(ValueError, match=r"rows \[0\] have padding after real tokens"):
            model(right, attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]), state=state)
        state = RecurrentState.empty(model.cfg.n_layers)
        model(whole[:, :3], state=state)
        with pytest.raises(ValueError, match="continues a state 3 tokens in, and its attention_mask has padding"):
            model(torch.tensor([[0, 10, 11], [5, 6, 7]]), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]),
                  state=state)
        # left padding when the state starts: row 0's continuation is that of its prompt alone
        state = RecurrentState.empty(model.cfg.n_layers)
        model(torch.tensor([[2, 2, 7, 8, 9], [3, 4, 5, 6, 7]]), attention_mask=torch.tensor([[0, 0, 1, 1, 1], [1] * 5]),
              state=state)
        step = model(torch.tensor([[10, 11], [8, 9]]), state=state)
        close(step[0], model(whole[:1])[0, 3:])


# --------------------------------------------------------------------------- hooks during decoding


def test_hooks_fire_during_decoding(model, prompt):
    shapes = []
    fed = []

    def count(act, hook):
        shapes.append(tuple(act.shape))

    def embed(act, hook):
        fed.append(act.detach().clone())

    n_new, P = 6, prompt.shape[1]
    with model.hooks(fwd_hooks=[("blocks.0.hook_x", count), ("hook_embed", embed)]):
        out = gen(model, prompt, max_new_tokens=n_new, do_sample=False, stop_at_eos=False)
    e = model.cfg.d_inner
    assert shapes[0] == (2, P, e)  # the prefill
    assert len(shapes) - 1 in (n_new - 1, n_new)  # then one call per fed new token
    assert all(s == (2, 1, e) for s in shapes[1:])
    # each decoding step is fed the token generated just before it
    for step, emb in enumerate(fed[1:]):
        close(emb[:, 0], model.W_E[out[:, P + step]], atol=0, rtol=0)


def test_editing_hook_changes_generation_like_full_forward(model, prompt):
    def zero_y(act, hook):
        return torch.zeros_like(act)

    hooks = [("blocks.1.hook_y", zero_y), ("blocks.0.hook_y", zero_y)]
    with model.hooks(fwd_hooks=hooks):
        edited = gen(model, prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False)
    plain = gen(model, prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False)
    assert torch.equal(edited, greedy_by_full_forwards(model, prompt, 6, fwd_hooks=hooks))
    assert not torch.equal(edited, plain)  # the edit mattered
    assert torch.equal(plain, greedy_by_full_forwards(model, prompt, 6))  # and is gone afterwards


def test_editing_conv_hook_during_decoding(model, prompt):
    """An edit of a conv-path hook at every step flows into the carried conv state consistently."""

    def scale_conv_in(act, hook):
        return act * 1.7

    hooks = [("blocks.0.hook_conv_in", scale_conv_in)]
    with model.hooks(fwd_hooks=hooks):
        edited = gen(model, prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False)
    assert torch.equal(edited, greedy_by_full_forwards(model, prompt, 6, fwd_hooks=hooks))


def test_constant_cost_per_token_structural(model):
    """After the prefill every hook sees p = 1, whatever the prefix length: no reprocessing."""

    def run(tokens, n_new):
        calls = []

        def record(act, hook):
            calls.append((hook.name, tuple(act.shape)))

        with model.hooks(fwd_hooks=[(lambda name: True, record)]):  # heavy hooks included
            gen(model, tokens, max_new_tokens=n_new, do_sample=False, stop_at_eos=False)
        return calls

    short = model.to_tokens("the cat")
    long = model.to_tokens(" ".join(["the cat sat on the mat and then ran to the park"] * 3))
    n_hooks = len(model.hook_dict)
    calls_short, calls_long = run(short, 5), run(long, 5)
    for tokens, calls in ((short, calls_short), (long, calls_long)):
        prefill, steps = calls[:n_hooks], calls[n_hooks:]
        assert {name for name, _ in prefill} == set(model.hook_dict)
        assert dict(prefill)["blocks.0.hook_x"][1] == tokens.shape[1]
        assert len(steps) >= 4 * n_hooks
        for name, shape in steps:
            assert shape[1] == 1, (name, shape)
            if name.endswith("hook_ssm_mask"):
                assert shape[2:] == (1, 1), (name, shape)
    # the per-step work is identical for a 3 and a 37 token prefix
    assert calls_short[len(model.hook_dict):] == calls_long[len(model.hook_dict):]


# --------------------------------------------------------------------------- sampling


def test_sampling_seed_is_reproducible(model, prompt):
    kw = dict(max_new_tokens=10, do_sample=True, stop_at_eos=False)
    torch.manual_seed(0)
    a = gen(model, prompt, seed=123, **kw)
    torch.manual_seed(999)  # the global RNG does not matter when seed= is given
    b = gen(model, prompt, seed=123, **kw)
    assert torch.equal(a, b)
    others = [gen(model, prompt, seed=s, **kw) for s in (1, 2)]
    assert any(not torch.equal(a, o) for o in others)
    greedy = gen(model, prompt, max_new_tokens=10, do_sample=False, stop_at_eos=False)
    assert not torch.equal(a, greedy)  # sampling really samples


def test_sampling_limits_equal_greedy(model, prompt):
    greedy = gen(model, prompt, max_new_tokens=8, do_sample=False, stop_at_eos=False)
    kw = dict(max_new_tokens=8, do_sample=True, stop_at_eos=False, seed=7)
    assert torch.equal(gen(model, prompt, top_k=1, **kw), greedy)
    assert torch.equal(gen(model, prompt, temperature=1e-6, **kw), greedy)
    assert torch.equal(gen(model, prompt, top_p=1e-3, **kw), greedy)


@torch.no_grad()
def test_top_k_and_top_p_respect_the_full_forward_distribution(model, prompt):
    P, n_new = prompt.shape[1], 12
    out_k = gen(model, prompt, max_new_tokens=n_new, do_sample=True, top_k=3, seed=0, stop_at_eos=False)
    out_p = gen(model, prompt, max_new_tokens=n_new, do_sample=True, top_p=0.2, seed=0, stop_at_eos=False)
    for out, kind in ((out_k, "k"), (out_p, "p")):
        for step in range(n_new):
            logits = model(out[:, : P + step])[:, -1]
            chosen = out[:, P + step]
            for row in range(out.shape[0]):
                if kind == "k":
                    allowed = set(logits[row].topk(3).indices.tolist())
                else:
                    probs, order = logits[row].softmax(-1).sort(descending=True)
                    keep = int((probs.cumsum(0) < 0.2).sum()) + 1  # smallest prefix reaching 0.2
                    allowed = set(order[:keep].tolist())
                assert int(chosen[row]) in allowed, (kind, step, row)


@torch.no_grad()
def test_sampling_follows_softmax_with_temperature(model):
    """Many one-step samples: their frequencies follow softmax(logits / T) of a full forward."""
    n, T = 20000, 0.5
    tokens = model.to_tokens("the cat sat").expand(n, -1).contiguous()
    out = gen(model, tokens, max_new_tokens=1, do_sample=True, temperature=T, seed=0, stop_at_eos=False)
    freq = torch.bincount(out[:, -1], minlength=model.cfg.d_vocab).float() / n
    logits = model(tokens[:1])[0, -1]
    tv = lambda p, q: 0.5 * float((p - q).abs().sum())  # noqa: E731
    assert tv(freq, (logits / T).softmax(-1)) < 0.03
    assert tv(freq, logits.softmax(-1)) > 0.05  # the temperature is applied (not T = 1)


# --------------------------------------------------------------------------- EOS


def test_stop_at_eos_with_forced_eos(model):
    tokens = model.to_tokens("the cat sat on the mat")
    P = tokens.shape[1]
    hook = force_token_hook(model, EOS)
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", hook)]):
        stopped = gen(model, tokens, max_new_tokens=8, do_sample=False, stop_at_eos=True)
    assert stopped.tolist() == [tokens[0].tolist() + [EOS]]

    hook = force_token_hook(model, EOS)
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", hook)]):
        unstopped = gen(model, tokens, max_new_tokens=8, do_sample=False, stop_at_eos=False)
    assert unstopped.shape == (1, P + 8)
    assert bool((unstopped[0, P:] == EOS).all())


def test_stop_at_eos_after_a_few_tokens(model):
    tokens = model.to_tokens("mary gave john a drink")
    P = tokens.shape[1]
    reference = greedy_by_full_forwards(model, tokens, 3)
    assert EOS not in reference[0, P:].tolist()
    hook = force_token_hook(model, EOS, from_call=3)  # calls 0..2 give the first three tokens
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", hook)]):
        out = gen(model, tokens, max_new_tokens=10, do_sample=False)
    assert out.tolist() == [reference[0].tolist() + [EOS]]


def test_stop_at_eos_in_a_batch_pads_finished_rows(model, prompt):
    P, n_new = prompt.shape[1], 6
    row1_alone = greedy_by_full_forwards(model, prompt[1:], n_new)
    assert EOS not in row1_alone[0, P:].tolist()
    # row 0 is pushed to EOS at the first step only; left alone it would go on with other tokens
    hook = force_token_hook(model, EOS, rows=0, until_call=1)
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", hook)]):
        out = gen(model, prompt, max_new_tokens=n_new, do_sample=False, stop_at_eos=True)
    assert out.shape == (2, P + n_new)  # row 1 never finishes
    assert torch.equal(out[1], row1_alone[0])
    assert out[0, P] == EOS
    assert bool((out[0, P:] == EOS).all())  # a finished row is filled with EOS, as in TransformerLens

    hook = force_token_hook(model, EOS, rows=0, until_call=1)
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", hook)]):
        unstopped = gen(model, prompt, max_new_tokens=n_new, do_sample=False, stop_at_eos=False)
    assert unstopped[0, P] == EOS
    assert not bool((unstopped[0, P + 1 :] == EOS).all())  # without stop_at_eos it goes on


def test_explicit_eos_token_id(model):
    # find a prompt whose greedy continuation has a token that did not occur earlier in it
    for text in ("mary gave john a drink", "one two three", "the capital of france is", "red blue green"):
        tokens = model.to_tokens(text)
        P = tokens.shape[1]
        reference = greedy_by_full_forwards(model, tokens, 10)
        new = reference[0, P:].tolist()
        fresh = [i for i in range(1, len(new)) if new[i] not in new[:i]]
        if fresh:
            break
    assert fresh, "no usable prompt"
    stop_at = fresh[0]
    eos = new[stop_at]
    out = gen(model, tokens, max_new_tokens=10, do_sample=False, stop_at_eos=True, eos_token_id=eos)
    assert out.tolist() == [reference[0, : P + stop_at + 1].tolist()]
    # a list of ids: the first one produced stops
    other = next(t for t in range(4, model.cfg.d_vocab) if t not in new)
    out_list = gen(model, tokens, max_new_tokens=10, do_sample=False, stop_at_eos=True, eos_token_id=[other, eos])
    assert out_list.tolist() == out.tolist()
    # stop_at_eos=False ignores it
    out_all = gen(model, tokens, max_new_tokens=10, do_sample=False, stop_at_eos=False, eos_token_id=eos)
    assert torch.equal(out_all, reference)


# --------------------------------------------------------------------------- strings and padding


def tl_decode(model, tokens):
    """How TransformerLens (3.x and 4.x) turns generated tokens into text: the tokenizer's
    decode with ``skip_special_tokens=True`` (no BOS, EOS or pad)."""
    return model.tokenizer.decode(tokens.tolist(), skip_special_tokens=True)


def test_string_input_returns_string(model):
    text = "the cat sat on the mat"
    out = gen(model, text, max_new_tokens=5, do_sample=False, stop_at_eos=False)
    assert isinstance(out, str)
    expected = greedy_by_full_forwards(model, model.to_tokens(text), 5)
    assert out == tl_decode(model, expected[0])
    assert out.startswith(text + " ")  # the prompt, with no BOS before it
    assert gen(model, text, max_new_tokens=5, do_sample=False, stop_at_eos=False, return_type="str") == out


def test_list_of_strings_returns_list(model):
    texts = ["the cat sat on the mat", "mary gave john a red drink"]  # same token count
    out = gen(model, texts, max_new_tokens=4, do_sample=False, stop_at_eos=False)
    assert isinstance(out, list) and len(out) == 2
    expected = greedy_by_full_forwards(model, model.to_tokens(texts), 4)
    assert out == [tl_decode(model, row) for row in expected]
    assert all(row.startswith(text + " ") for row, text in zip(out, texts))


def test_string_output_leaves_out_eos_and_the_fill_after_it(model):
    """A row stopped at EOS reads as its prompt and the tokens before the EOS, as it does alone."""
    texts = ["the cat sat on the mat", "mary gave john a red drink"]
    n_new = 4
    hook = force_token_hook(model, EOS, rows=0, from_call=2, until_call=3)  # row 0 stops at its third token
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", hook)]):
        tokens = gen(model, texts, max_new_tokens=n_new, do_sample=False, return_type="tokens")
    hook = force_token_hook(model, EOS, rows=0, from_call=2, until_call=3)
    with model.hooks(fwd_hooks=[("ln_final.hook_normalized", hook)]):
        strings = gen(model, texts, max_new_tokens=n_new, do_sample=False)
    P = tokens.shape[1] - n_new
    assert tokens[0, P + 2] == EOS and bool((tokens[0, P + 2:] == EOS).all())
    assert strings[0] == tl_decode(model, tokens[0, : P + 2])
    assert strings[1] == tl_decode(model, tokens[1])
    assert "<eos>" not in strings[0] and "<bos>" not in strings[0]


def test_left_padded_batch_generation_equals_alone(model):
    texts = ["when mary and john went to the store", "a dog", "one two three"]
    n_new = 6
    out = gen(model, texts, max_new_tokens=n_new, do_sample=False, stop_at_eos=False,
              padding_side="left", return_type="tokens")
    assert out.shape[1] == model.to_tokens(texts[0]).shape[1] + n_new
    for row, text in enumerate(texts):
        alone_tokens = model.to_tokens(text)
        alone = greedy_by_full_forwards(model, alone_tokens, n_new)
        assert torch.equal(out[row, -n_new:], alone[0, -n_new:]), row
        assert torch.equal(out[row, -(n_new + alone_tokens.shape[1]):], alone[0]), row


def test_left_padded_tensor_with_attention_mask_equals_alone(model):
    gen_ = torch.Generator().manual_seed(0)
    lengths, width, n_new = [7, 3], 7, 5
    tokens = torch.randint(4, model.cfg.d_vocab, (2, width), generator=gen_)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, width - n :] = 1
    out = gen(model, tokens, attention_mask=mask, max_new_tokens=n_new, do_sample=False, stop_at_eos=False)
    for row, n in enumerate(lengths):
        alone = greedy_by_full_forwards(model, tokens[row : row + 1, width - n :], n_new)
        assert torch.equal(out[row, width:], alone[0, n:]), row


def test_string_batch_generation_with_default_padding_equals_alone(model):
    """No padding_side given: a batch of prompts of different lengths still continues each prompt."""
    texts = ["when mary and john went to the store", "a dog"]
    n_new = 5
    out = gen(model, texts, max_new_tokens=n_new, do_sample=False, stop_at_eos=False, return_type="tokens")
    for row, text in enumerate(texts):
        alone = greedy_by_full_forwards(model, model.to_tokens(text), n_new)
        assert torch.equal(out[row, -n_new:], alone[0, -n_new:]), row
    strings = gen(model, texts, max_new_tokens=n_new, do_sample=False, stop_at_eos=False)
    for row, text in enumerate(texts):
        alone = gen(model, text, max_new_tokens=n_new, do_sample=False, stop_at_eos=False)
        assert strings[row].replace("<pad>", "").split() == alone.split(), row


def test_right_padded_tokens_are_refused_and_strings_padded_on_the_left(model):
    """Right padding cannot be continued in place (a short row's next token would follow its pads):
    generate refuses a right-padded token batch by name. Strings it tokenizes itself, so it pads them on
    the left whatever padding_side says, as TransformerLens 4.x does (it refused padding_side="right")."""
    texts = ["when mary and john went to the store", "a dog"]
    tokens, mask = model.to_tokens(texts, padding_side="right", return_attention_mask=True)
    with pytest.raises(ValueError, match="use left padding.*or give the prompts as strings"):
        gen(model, tokens, attention_mask=mask, max_new_tokens=4, do_sample=False, stop_at_eos=False)
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right', got 'middle'"):
        gen(model, texts, max_new_tokens=4, padding_side="middle")
    # either side given, the prompts generate what each does alone
    for side in ("right", "left"):
        out = gen(model, texts, max_new_tokens=4, do_sample=False, stop_at_eos=False, padding_side=side,
                  return_type="tokens")
        for row, text in enumerate(texts):
            alone = greedy_by_full_forwards(model, model.to_tokens(text), 4)
            assert out[row, -4:].tolist() == alone[0, -4:].tolist(), (side, row)
            assert out[row, -alone.shape[1]:].tolist() == alone[0].tolist(), (side, row)  # prompt ends at the new tokens


def test_generate_zero_new_tokens_and_bad_arguments(model, prompt):
    assert torch.equal(gen(model, prompt, max_new_tokens=0, do_sample=False), prompt)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gen(model, prompt, max_new_tokens=-1)
    with pytest.raises(ValueError, match="top_p"):
        gen(model, prompt, do_sample=True, top_p=1.5)


# ---------------------------------------------------------------------------- whole-sequence steps
def tiny_mamba2(tokenizer):
    from tl_mamba import HookedMamba2, HookedMambaConfig

    cfg = HookedMambaConfig(family="mamba2", n_layers=2, d_model=16, d_head=8, d_state=6, n_groups=2, d_conv=3,
                            d_vocab=48, chunk_size=4, seed=1, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return perturb_(HookedMamba2(cfg, tokenizer=tokenizer), seed=1)


@pytest.fixture(params=["mamba1", "mamba2"])
def any_model(request, model, tokenizer):
    return model if request.param == "mamba1" else tiny_mamba2(tokenizer)


@pytest.mark.parametrize("path", ["ssm", "conv", "both"])
def test_generate_under_knockout_equals_knocked_out_full_forwards(any_model, prompt, path):
    """A Knockout's positions index the whole sequence. A recurrent step sees one token, so
    generate re-runs the sequence: sources=[0, 1] stay the first two tokens (before, a step
    read them as positions of its one token: wrong tokens for [0], an IndexError for [1]).
    -2 is within the conv window of -1, so the conv path has edges to remove too."""
    from tl_mamba import Knockout

    model = any_model
    ko = Knockout(layers=range(model.cfg.n_layers), sources=[0, 1, -2], targets=[-1], path=path)
    n_new = 4
    with torch.no_grad():  # the reference: the knockout applied to every prefix, whole
        expected = prompt.clone()
        for _ in range(n_new):
            logits = model.run_with_knockout(expected, ko)[:, -1]
            expected = torch.cat([expected, logits.argmax(-1, keepdim=True)], dim=1)
        assert not torch.allclose(logits, model(expected[:, :-1])[:, -1], atol=1e-3)  # the knockout matters
    with model.knockouts(ko):
        out = gen(model, prompt, max_new_tokens=n_new, do_sample=False, stop_at_eos=False)
    assert torch.equal(out, expected)


def test_hand_written_mask_hook_without_past_cache_sees_the_whole_mask(any_model, prompt):
    """A hand-written hook on hook_ssm_mask sees one-token masks in recurrent steps (as every hook
    does; test_constant_cost_per_token_structural), and the whole mask with use_past_kv_cache=False."""
    model = any_model
    seen = []

    def cut_first_source(mask, hook):
        seen.append(tuple(mask.shape[-2:]))
        mask = mask.clone()
        mask[..., -1, 0] = 0
        return mask

    n_new = 3
    hooks = [(f"blocks.{l}.hook_ssm_mask", cut_first_source) for l in range(model.cfg.n_layers)]
    expected = greedy_by_full_forwards(model, prompt, n_new, fwd_hooks=hooks)
    seen.clear()
    with model.hooks(fwd_hooks=hooks):
        out = gen(model, prompt, max_new_tokens=n_new, do_sample=False, stop_at_eos=False, use_past_kv_cache=False)
    assert torch.equal(out, expected)
    p = prompt.shape[1]
    assert seen == [(q, q) for q in range(p, p + n_new) for _ in range(model.cfg.n_layers)]


def test_use_past_kv_cache_false_reruns_the_sequence(any_model, prompt):
    model = any_model
    lengths = []
    hook = ("blocks.0.hook_resid_pre", lambda resid, hook: lengths.append(resid.shape[1]))
    with model.hooks(fwd_hooks=[hook]):
        recurrent = gen(model, prompt, max_new_tokens=3, do_sample=False, stop_at_eos=False)
        assert lengths == [7, 1, 1]
        lengths.clear()
        whole = gen(model, prompt, max_new_tokens=3, do_sample=False, stop_at_eos=False, use_past_kv_cache=False)
        assert lengths == [7, 8, 9]
    assert torch.equal(whole, recurrent)
    assert torch.equal(whole, greedy_by_full_forwards(model, prompt, 3))


def test_knockout_generation_of_a_left_padded_batch_equals_alone(model):
    from tl_mamba import Knockout

    texts = ["when mary and john went to the store", "one two three"]
    ko = Knockout(layers=[0, 1], sources=[-2], targets=[-1])
    with model.knockouts(ko):
        out = gen(model, texts, max_new_tokens=3, do_sample=False, stop_at_eos=False, return_type="tokens")
        for row, text in enumerate(texts):
            alone = gen(model, text, max_new_tokens=3, do_sample=False, stop_at_eos=False, return_type="tokens")
            assert torch.equal(out[row, -3:], alone[0, -3:]), row


def test_knockout_hooks_added_by_hand_also_rerun_the_sequence(model, prompt):
    """ko.hooks(model) given to model.hooks: generate finds the Knockout through the handles
    (TransformerLens 4.x records the user's hook) and re-runs the sequence as under model.knockouts."""
    from tl_mamba import Knockout
    from tl_mamba.knockout import active_knockouts

    ko = Knockout(layers=[0, 1], sources=[0, 1, -2], targets=[-1], path="both")
    with model.knockouts(ko):
        expected = gen(model, prompt, max_new_tokens=3, do_sample=False, stop_at_eos=False)
    with model.hooks(fwd_hooks=ko.hooks(model)):
        if not any(getattr(h, "user_hook", None) is not None for h in model.mod_dict["blocks.0.hook_conv"].fwd_hooks):
            pytest.skip("this transformer-lens does not record the user's hook on the handle")
        assert active_knockouts(model) == [ko]
        out = gen(model, prompt, max_new_tokens=3, do_sample=False, stop_at_eos=False)
    assert torch.equal(out, expected)
    assert active_knockouts(model) == []


def test_generate_refuses_bool_mask_knockouts(model, prompt):
    from tl_mamba import Knockout

    sources = torch.zeros(prompt.shape[1], dtype=torch.bool)
    sources[1] = True
    with model.knockouts(Knockout(layers=[0], sources=sources, targets=[-1])):
        with pytest.raises(ValueError, match="bool-mask positions"):
            gen(model, prompt, max_new_tokens=2)


def test_frequency_penalty_is_subtracted_per_occurrence():
    """TransformerLens semantics: logits - freq_penalty · (count of the token so far). The
    sampling distribution is checked against that formula by hand; and with a huge penalty no
    generated token repeats one before it."""
    from tl_mamba import HookedMamba, HookedMambaConfig
    from tl_mamba.models.generation import sample_next_token

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    history = torch.tensor([[0, 0, 1]])
    penalty = 0.7
    expected = torch.softmax(logits - penalty * torch.tensor([[2.0, 1.0, 0.0, 0.0]]), -1)[0]
    gen_ = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next_token(logits, do_sample=True, top_k=None, top_p=None, temperature=1.0,
                                           freq_penalty=penalty, history=history, generator=gen_)
                         for _ in range(4000)])
    freq = torch.bincount(draws.flatten(), minlength=4).double() / draws.numel()
    assert (freq - expected.double()).abs().max() < 0.03, (freq, expected)  # 4000 draws: σ ≤ 0.008

    model = HookedMamba(HookedMambaConfig(n_layers=2, d_model=16, d_vocab=40, d_state=4, d_conv=4, seed=0)).eval()
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=8, do_sample=True, freq_penalty=1e4,
                         stop_at_eos=False, verbose=False, seed=0)
    seq = out[0].tolist()
    assert len(seq) == 11 and len(set(seq)) == len(seq), seq


def test_frequency_penalty_counts_each_rows_own_tokens_and_is_not_negative(model):
    """A shorter prompt's left padding is not part of it: with a penalty, its padding (the pad id
    penalised once per pad, as TransformerLens counts it) made a row's samples depend on the
    other rows' lengths. Each row of a padded batch now samples as its prompt alone."""
    from tl_mamba.models.generation import sample_next_token

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    history = torch.tensor([[0, 0, 1]])
    own = torch.tensor([[False, True, True]])  # the first 0 is padding
    draws = torch.stack([sample_next_token(logits, do_sample=True, top_k=None, top_p=None, temperature=1.0,
                                           freq_penalty=1.0, history=history, history_mask=own,
                                           generator=torch.Generator().manual_seed(k)) for k in range(4000)])
    expected = torch.softmax(logits - torch.tensor([[1.0, 1.0, 0.0, 0.0]]), -1)[0]
    freq = torch.bincount(draws.flatten(), minlength=4).double() / draws.numel()
    assert (freq - expected.double()).abs().max() < 0.03, (freq, expected)

    prompt = [44, 6, 44]
    pad = model.tokenizer.pad_token_id
    # near-uniform sampling: removing the pad id's share moves every later id's slice of the cumulative
    # distribution, so counting the 4 pads changes some of these 160 draws
    kw = dict(max_new_tokens=8, do_sample=True, freq_penalty=3.0, temperature=20.0, stop_at_eos=False, verbose=False)
    for seed in range(20):  # one row: the same draws from the generator, so the same tokens
        padded = model.generate(torch.tensor([[pad] * 4 + prompt]), attention_mask=torch.tensor([[0] * 4 + [1] * 3]),
                                seed=seed, **kw)
        alone = model.generate(torch.tensor([prompt]), seed=seed, **kw)
        assert torch.equal(padded[0, 4:], alone[0]), (seed, padded, alone)
    batch = torch.tensor([prompt])
    with pytest.raises(ValueError, match="freq_penalty must be >= 0"):
        model.generate(batch[:1], freq_penalty=-1.0, max_new_tokens=2, verbose=False)


def test_repetition_penalty_follows_the_transformers_rule(model, prompt):
    """TransformerLens 4.x's ``repetition_penalty`` (transformers' rule): a token already in the row
    has its positive logit divided by the penalty and its negative one multiplied, before sampling,
    greedy decoding included. Checked on fixed logits (and against TransformerLens' own sampler where
    it has one), then greedy generation against full forwards with the rule applied by hand."""
    from tl_mamba.models.generation import sample_next_token

    logits = torch.tensor([[2.0, 1.0, -0.5, -1.0]])
    history = torch.tensor([[0, 2, 0]])
    greedy = dict(do_sample=False, top_k=None, top_p=None, temperature=1.0)
    assert int(sample_next_token(logits, **greedy)) == 0
    assert int(sample_next_token(logits, repetition_penalty=4.0, history=history, **greedy)) == 1  # 2 / 4 < 1
    assert int(sample_next_token(logits, repetition_penalty=0.25, history=history, **greedy)) == 0
    own = torch.tensor([[False, True, False]])  # 0 appears only as padding: not penalised
    assert int(sample_next_token(logits, repetition_penalty=4.0, history=history, history_mask=own, **greedy)) == 0
    try:
        from transformer_lens.utilities.logits_utils import sample_logits
    except ImportError:
        sample_logits = None
    if sample_logits is not None and "repetition_penalty" in sample_logits.__code__.co_varnames:
        for penalty in (0.5, 1.3, 4.0):
            theirs = sample_logits(logits, temperature=0.0, repetition_penalty=penalty, tokens=history)
            assert int(sample_next_token(logits, repetition_penalty=penalty, history=history, **greedy)) == int(theirs)

    penalty, n_new = 1.7, 6
    with torch.no_grad():
        tokens = prompt.clone()
        for _ in range(n_new):
            last = model(tokens)[:, -1].float()
            for row in range(len(tokens)):
                seen = tokens[row].unique()
                last[row, seen] = torch.where(last[row, seen] > 0, last[row, seen] / penalty, last[row, seen] * penalty)
            tokens = torch.cat([tokens, last.argmax(-1, keepdim=True)], dim=1)
    ours = gen(model, prompt, max_new_tokens=n_new, do_sample=False, repetition_penalty=penalty, stop_at_eos=False)
    assert torch.equal(ours, tokens)
    assert not torch.equal(ours, gen(model, prompt, max_new_tokens=n_new, do_sample=False, stop_at_eos=False))
    for bad in (0.0, -1.0, True, "2"):
        with pytest.raises(ValueError, match="repetition_penalty must be a positive number"):
            gen(model, prompt, max_new_tokens=1, repetition_penalty=bad)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_recurrent_generate_with_d_conv_1(family):
    """d_conv = 1 carries an empty conv state between steps; greedy recurrent decoding equals one
    full forward per new token (the independent reference)."""
    from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig

    extra = {} if family == "mamba1" else {"family": "mamba2", "n_heads": 4, "n_groups": 2, "chunk_size": 4}
    cfg = HookedMambaConfig(n_layers=2, d_model=16, d_vocab=40, d_state=4, d_conv=1, seed=0, eos_token_id=1,
                            pad_token_id=2, bos_token_id=0, **extra)
    model = (HookedMamba if family == "mamba1" else HookedMamba2)(cfg)
    gen_ = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen_, dtype=param.dtype) * 0.3)
    model = model.double()
    tokens = torch.randint(4, 40, (2, 5), generator=torch.Generator().manual_seed(3))
    out = model.generate(tokens, max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(out, greedy_by_full_forwards(model, tokens, 4))


@pytest.mark.parametrize("use_past_kv_cache", [True, False])
def test_a_bos_asked_for_is_not_read_as_padding(model, tokenizer, use_past_kv_cache):
    """A model that pads on the left, with the pad token the BOS and default_prepend_bos=False:
    generate(prompt, prepend_bos=True) tokenizes with the BOS, and its forwards must keep it
    (they inferred padding again with the model's defaults, so the BOS was masked out)."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.pad_token = tok.bos_token
    model.set_tokenizer(tok, default_padding_side="left")
    model.cfg.default_prepend_bos = False
    tokens = model.to_tokens("the cat sat on the mat", prepend_bos=True)
    assert tokens[0, 0] == tok.bos_token_id == tok.pad_token_id
    expected = tokens.clone()  # reference: argmax of full forwards, every column read (explicit mask)
    with torch.no_grad():
        for _ in range(4):
            logits = model(expected, attention_mask=torch.ones_like(expected))
            expected = torch.cat([expected, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert not torch.allclose(model(tokens)[0, -1], model(tokens, attention_mask=torch.ones_like(tokens))[0, -1])
    seen = []  # the logits of generate's first forward, over the whole prompt
    handle = model.unembed.register_forward_hook(lambda module, inputs, output: seen.append(output.detach()))
    try:
        out = gen(model, "the cat sat on the mat", prepend_bos=True, max_new_tokens=4, do_sample=False,
                  stop_at_eos=False, return_type="tokens", use_past_kv_cache=use_past_kv_cache)
    finally:
        handle.remove()
    assert torch.equal(out, expected)
    close(seen[0][0, -1], model(tokens, attention_mask=torch.ones_like(tokens))[0, -1])
