"""Information-flow experiments and the behaviour of knockouts on the shipped toy models."""

from __future__ import annotations

import random

import pytest
import torch

import tl_mamba
from tl_mamba import Knockout
from tl_mamba.experiments import (
    _encode,
    _span_mask,
    features_by_decay,
    information_flow,
    information_flow_per_token,
    layer_windows,
    plot_information_flow,
    plot_per_token_flow,
    summarize_information_flow,
)
from tl_mamba.toy import make_dataset
from tl_mamba.toy.shipped import shipped_metrics, shipped_models

SHIPPED = sorted(shipped_models())


@pytest.fixture(scope="module", params=SHIPPED)
def toy(request):
    return tl_mamba.from_pretrained(request.param)


def knockout_accuracy(toy, batch, sources, targets):
    """Argmax accuracy at the last position of an ``encode_prompts`` batch, clean
    (``sources`` None) or with ``sources`` → ``targets`` knocked out in every layer."""
    tokens, mask = batch["tokens"], batch["attention_mask"]
    with torch.no_grad():
        if sources is None:
            logits = toy(tokens, attention_mask=mask)
        else:
            ko = Knockout(range(toy.cfg.n_layers), sources=sources, targets=targets)
            logits = toy.run_with_knockout(tokens, ko, attention_mask=mask)
    return float((logits[:, -1].argmax(-1) == batch["answers"]).float().mean())


def test_layer_windows():
    assert layer_windows(4, 1) == [(0, [0]), (1, [1]), (2, [2]), (3, [3])]
    # clipped at the ends, as Geva et al.'s knockout windows: range(max(0, l - w // 2), min(n, l - w // 2 + w))
    assert layer_windows(5, 3) == [(0, [0, 1]), (1, [0, 1, 2]), (2, [1, 2, 3]), (3, [2, 3, 4]), (4, [3, 4])]
    assert layer_windows(4, 2) == [(0, [0]), (1, [0, 1]), (2, [1, 2]), (3, [2, 3])]
    assert layer_windows(3, 3)[0] == (0, [0, 1]) and layer_windows(3, 3)[2] == (2, [1, 2])
    with pytest.raises(ValueError, match="window"):
        layer_windows(4, 5)


def test_information_flow_rows_equal_single_knockouts(toy, tmp_path):
    """Each batched row equals the same knockout run alone on its prompt (unpadded)."""
    prompts = make_dataset("facts", "heldout", 6, seed=1)
    df = information_flow(toy, prompts, window=2, sources=("subject", "context"), batch_size=5, progress=False)
    n_layers = toy.cfg.n_layers
    assert len(df) == len(prompts) * n_layers * 2
    assert set(df.columns) >= {"prompt", "layer", "layers", "source", "p", "p_ko", "change", "log_odds",
                               "log_odds_ko"}

    def log_odds(logits):  # log p - log(1 - p) of the answer, in float64 from the log-probabilities
        log_p = logits[0, -1].double().log_softmax(-1)[answer]
        return float(log_p - torch.log(-torch.expm1(log_p)))

    for _, row in df.sample(5, random_state=0).iterrows():
        prompt = prompts[row.prompt]
        tokens = toy.to_tokens(prompt.text)
        answer = toy.to_single_token(prompt.answer)
        last = tokens.shape[1] - 1
        with torch.no_grad():
            clean_logits = toy(tokens)
            p = clean_logits[0, -1].softmax(-1)[answer]
            ko = Knockout(layers=list(row.layers), sources=prompt.spans[row.source], targets=[last])
            ko_logits = toy.run_with_knockout(tokens, ko)
            p_ko = ko_logits[0, -1].softmax(-1)[answer]
        assert row.p == pytest.approx(float(p), rel=1e-4, abs=1e-6)
        assert row.p_ko == pytest.approx(float(p_ko), rel=1e-4, abs=1e-6)
        assert row.change == pytest.approx((float(p_ko) - float(p)) / float(p), rel=1e-3, abs=1e-5)
        assert row.log_odds == pytest.approx(log_odds(clean_logits), rel=1e-4, abs=1e-4)
        assert row.log_odds_ko == pytest.approx(log_odds(ko_logits), rel=1e-4, abs=1e-4)
    pooled = summarize_information_flow(df, "pooled")
    subset = df[(df.layer == 1) & (df.source == "subject")]
    assert float(pooled.loc[1, "subject"]) == pytest.approx(100 * (subset.p_ko.sum() / subset.p.sum() - 1), rel=1e-6)
    assert float(summarize_information_flow(df, "median").loc[1, "subject"]) == pytest.approx(
        100 * subset.change.median(), rel=1e-6)
    assert float(summarize_information_flow(df, "log_odds").loc[1, "subject"]) == pytest.approx(
        (subset.log_odds_ko - subset.log_odds).mean(), rel=1e-9)  # in nats, not %
    # one class by name is that class (not its letters), and the summary keeps its columns
    alone = information_flow(toy, prompts[:2], window=2, sources="subject", progress=False)
    assert set(alone.source) == {"subject"}
    for bad, error, message in ((dict(batch_size=0), ValueError, "batch_size must be a positive int"),
                                (dict(window=1.5), TypeError, "window must be a whole number of layers")):
        with pytest.raises(error, match=message):
            information_flow(toy, prompts[:2], progress=False, **{"window": 2, **bad})
    path = plot_information_flow(df, tmp_path / "flow.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    for call in (plot_information_flow, summarize_information_flow):  # given the summary: a bare KeyError
        with pytest.raises(ValueError, match=r"expected information_flow's DataFrame.*lacks \['layer', 'source'"):
            call(pooled, tmp_path / "again.png") if call is plot_information_flow else call(pooled)


@pytest.mark.parametrize("per_layer", [False, True], ids=["one list", "per layer"])
def test_information_flow_of_some_features_equals_a_hand_written_knockout(toy, per_layer):
    """heads= (Mamba-2) / channels= (Mamba-1) knock out the edges in those features only: each row
    equals a forward of its prompt alone with hand-written hooks. Mamba-2: a hook on hook_ssm_mask
    zeroing subject → last in the chosen heads. Mamba-1 (whose mask has no channel axis): a hook on
    hook_y taking the chosen channels' subject terms α[last, j]·x_j out of y, with α written out from
    the same forward's Δ, A, B and C (α = Σ_n C_i exp(A Σ_{k=j+1..i} Δ_k) Δ_j B_j). ``per_layer``:
    the features given as ``{layer: features}``, other ones in each layer (keys negative from the end)."""
    prompts = make_dataset("facts", "heldout", 3, seed=4)
    mamba2, n_layers = toy.cfg.family == "mamba2", toy.cfg.n_layers

    def chosen_in(layer):
        if mamba2:
            return sorted({layer % toy.cfg.n_heads, (layer + 3) % toy.cfg.n_heads}) if per_layer else [1, 3]
        return list(range(layer % 3 if per_layer else 0, toy.cfg.d_inner, 3))

    chosen = {layer - n_layers: chosen_in(layer) for layer in range(n_layers)} if per_layer else chosen_in(0)
    features = {"heads": chosen} if mamba2 else {"channels": chosen}
    df = information_flow(toy, prompts, window=2, sources=("subject",), batch_size=4, progress=False, **features)
    everything = information_flow(toy, prompts, window=2, sources=("subject",), batch_size=4, progress=False)
    assert (df.p_ko - everything.p_ko).abs().max() > 1e-4  # fewer features: another result
    assert (df.p_ko - df.p).abs().max() > 1e-4  # and still a knockout
    for _, row in df.iterrows():
        prompt = prompts[row.prompt]
        tokens = toy.to_tokens(prompt.text)
        answer, last, subject = toy.to_single_token(prompt.answer), tokens.shape[1] - 1, prompt.spans["subject"]
        seen, hooks = {}, []
        for layer in row.layers:
            if mamba2:
                def zero_edges(mask, hook, chosen=chosen_in(layer)):
                    mask = mask.clone()
                    for j in subject:
                        mask[:, chosen, last, j] = 0
                    return mask
                hooks.append((f"blocks.{layer}.hook_ssm_mask", zero_edges))
                continue
            for part in ("x", "delta", "B", "C"):
                hooks.append((f"blocks.{layer}.hook_{part}", lambda act, hook: seen.update({hook.name: act})))

            def remove_terms(y, hook, layer=layer, chosen=chosen_in(layer)):
                get = lambda part: seen[f"blocks.{layer}.hook_{part}"][0].double()  # [p, ...]
                x, delta, B, C = (get(part)[:, chosen] if part in ("x", "delta") else get(part)
                                  for part in ("x", "delta", "B", "C"))
                A = -torch.exp(toy.blocks[layer].mixer.A_log.double())[chosen]  # [c, n]
                y = y.clone()
                for j in subject:
                    decay = torch.exp(A * delta[j + 1:last + 1].sum(0)[:, None])  # [c, n]
                    alpha = (C[last] * decay * delta[j][:, None] * B[j]).sum(-1)  # [c]
                    y[0, last, chosen] -= (alpha * x[j]).to(y.dtype)
                return y
            hooks.append((f"blocks.{layer}.hook_y", remove_terms))
        with torch.no_grad():
            logits = toy.run_with_hooks(tokens, fwd_hooks=hooks)
        assert row.p_ko == pytest.approx(float(logits[0, -1].softmax(-1)[answer]), rel=1e-4, abs=1e-6)
    per_token = information_flow_per_token(toy, prompts[0], window=2, progress=False, **features)
    assert per_token.shape == (toy.cfg.n_layers, toy.to_tokens(prompts[0].text).shape[1])
    if per_layer:  # every window's layers need an entry; each layer must choose some
        what = "heads" if mamba2 else "channels"
        for bad, message in (({0: chosen_in(0)}, r"one entry for each of the knockout's layers .*have none"),
                             ({**{layer: chosen_in(layer) for layer in range(n_layers)}, 0: []},
                              "chooses no (head|channel) in layer 0")):
            with pytest.raises(ValueError, match=message):
                information_flow(toy, prompts, progress=False, **{what: bad})
        return
    with pytest.raises(ValueError, match="channels= restricts a Mamba-1 knockout" if mamba2 else "heads= restricts"):
        information_flow(toy, prompts, **({"channels": [0]} if mamba2 else {"heads": [0]}), progress=False)
    with pytest.raises(tl_mamba.OutOfRangeError):
        information_flow(toy, prompts, **({"heads": [99]} if mamba2 else {"channels": [10 ** 6]}), progress=False)
    for nothing in ([], torch.zeros(toy.cfg.n_heads if mamba2 else toy.cfg.d_inner, dtype=torch.bool)):
        with pytest.raises(ValueError, match="chooses no (head|channel): nothing would be knocked out"):
            information_flow(toy, prompts, **({"heads": nothing} if mamba2 else {"channels": nothing}), progress=False)
    if mamba2:  # part of a group on the conv path: said once for the run (each layer's knockout said it)
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            information_flow(toy, prompts, window=1, sources=("subject",), path="conv", heads=[0], progress=False)
        partial = [w for w in caught if "B and C are convolved once per group" in str(w.message)]
        assert len(partial) == 1 and "the knockouts (path='conv'" in str(partial[0].message)


def test_per_token_flow(toy, tmp_path):
    prompt = make_dataset("facts", "heldout", 1, seed=2)[0]
    values = information_flow_per_token(toy, prompt, window=1, progress=False)
    assert values.shape == (toy.cfg.n_layers, prompt.n_tokens)
    tokens = toy.to_tokens(prompt.text)
    answer = toy.to_single_token(prompt.answer)
    layer, pos = toy.cfg.n_layers - 1, prompt.spans["subject"][-1]
    with torch.no_grad():
        p = toy(tokens)[0, -1].softmax(-1)[answer]
        p_ko = toy.run_with_knockout(tokens, Knockout(layer, [pos], [-1]))[0, -1].softmax(-1)[answer]
    assert float(values[layer, pos]) == pytest.approx(float((p_ko - p) / p), rel=1e-3, abs=1e-5)
    labels = toy.to_str_tokens(tokens[0])
    assert plot_per_token_flow(values, labels, tmp_path / "tok.png").read_bytes()[:4] == b"\x89PNG"
    # the answer may be given as its token id, with the model's tokenizer or without one (the toy encoding)
    import copy
    import dataclasses

    by_id = dataclasses.replace(prompt, answer=answer)
    torch.testing.assert_close(information_flow_per_token(toy, by_id, window=1, progress=False), values)
    bare = copy.copy(toy)
    bare.__dict__["_tokenizer"] = None
    torch.testing.assert_close(information_flow_per_token(bare, by_id, window=1, progress=False), values)


def test_features_by_decay_ranks_by_delta_times_A(toy):
    order, rates = features_by_decay(toy, 1)
    mixer = toy.blocks[1].mixer
    A = torch.exp(mixer.A_log.float())
    if toy.cfg.family == "mamba1":
        expected = torch.nn.functional.softplus(mixer.dt_proj.bias.float()) * A.mean(-1)
    else:
        expected = torch.nn.functional.softplus(mixer.dt_bias.float()) * A
    torch.testing.assert_close(rates, expected)
    assert torch.all(rates[order][:-1] >= rates[order][1:])
    tokens = toy.to_tokens("The capital of Zor Vel Quen is")
    _, with_tokens = features_by_decay(toy, 1, tokens)
    with torch.no_grad():
        _, cache = toy.run_with_cache(tokens, names_filter="blocks.1.hook_delta")
    typical = cache["blocks.1.hook_delta"].float().flatten(0, 1).mean(0)
    torch.testing.assert_close(with_tokens, typical * (A.mean(-1) if toy.cfg.family == "mamba1" else A))
    # a padded batch: the mean over the real tokens, that of the prompts run alone (the pads were
    # averaged in, 34-49% off, and attention_mask was not taken)
    prompts = ["The capital of Zor Vel Quen is", "Vel is"]
    with torch.no_grad():
        alone = torch.cat([toy.run_with_cache(p, names_filter="blocks.1.hook_delta")[1]["blocks.1.hook_delta"][0]
                           for p in prompts]).float().mean(0)
    expected = alone * (A.mean(-1) if toy.cfg.family == "mamba1" else A)
    tokens, mask = toy.to_tokens(prompts, padding_side="left", return_attention_mask=True)
    for given in (dict(tokens=tokens, attention_mask=mask), dict(tokens=prompts)):
        torch.testing.assert_close(features_by_decay(toy, 1, **given)[1], expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="attention_mask marks the padding of tokens, and no tokens were given"):
        features_by_decay(toy, 1, attention_mask=mask)
    # to_tokens' default right padding given without its mask: the trailing pads are left out too
    right, right_mask = toy.to_tokens(prompts, return_attention_mask=True)
    assert bool((right_mask[:, -1] == 0).any())
    torch.testing.assert_close(features_by_decay(toy, 1, right)[1], expected, rtol=1e-4, atol=1e-6)
    with pytest.warns(UserWarning, match="left-padded batch given without an attention_mask"):
        unmasked = features_by_decay(toy, 1, tokens)[1]
    assert (unmasked - expected).abs().max() > 1e-3  # pads read as tokens: not it


def test_a_float64_model_keeps_float64_effects(toy):
    """On a float64 model (what one turns to for effects below float32's resolution) the
    probabilities, changes and decay rates stay float64: against a plain float64 forward and
    knockout, and Δ·|A| from the parameters, to 1e-12 (they were rounded to float32, ~5% off on a
    change of 3e-7)."""
    model = tl_mamba.from_pretrained(toy.cfg.model_name, dtype=torch.float64)
    prompt = make_dataset("facts", "heldout", 1, seed=3)[0]
    df = information_flow(model, [prompt], window=1, sources=("first",), progress=False)
    tokens = model.to_tokens(prompt.text)
    answer = model.to_single_token(prompt.answer)
    with torch.no_grad():
        p = model(tokens)[0, -1].softmax(-1)[answer]
        ko = Knockout(layers=[0], sources=prompt.spans["first"], targets=[tokens.shape[1] - 1])
        p_ko = model.run_with_knockout(tokens, ko)[0, -1].softmax(-1)[answer]
    row = df[df.layer == 0].iloc[0]
    assert row.p == pytest.approx(float(p), rel=1e-12) and row.p_ko == pytest.approx(float(p_ko), rel=1e-12)
    assert row.change == pytest.approx(float((p_ko - p) / p), rel=1e-9, abs=1e-15)
    per_token = information_flow_per_token(model, prompt, window=1, progress=False)
    assert per_token.dtype == torch.float64
    assert float(per_token[0, prompt.spans["first"][0]]) == pytest.approx(float((p_ko - p) / p), rel=1e-9, abs=1e-15)
    _, rates = features_by_decay(model, 1)
    mixer = model.blocks[1].mixer
    bias = mixer.dt_proj.bias if model.cfg.family == "mamba1" else mixer.dt_bias
    A = torch.exp(mixer.A_log.detach())
    expected = torch.nn.functional.softplus(bias.detach()) * (A.mean(-1) if model.cfg.family == "mamba1" else A)
    assert rates.dtype == torch.float64
    torch.testing.assert_close(rates, expected, rtol=1e-12, atol=0)


def test_an_answer_outside_the_vocabulary_is_refused(toy):
    """A typo in the answer reads as the unknown token on a word-level vocabulary: its
    probability would be scored, with no warning. Refused, naming the answer."""
    prompt = make_dataset("facts", "heldout", 1, seed=3)[0]
    typo = type(prompt)(text=prompt.text, answer="Brevikk", task=prompt.task, spans=prompt.spans)
    for call in (lambda: information_flow(toy, [typo], window=1, progress=False),
                 lambda: information_flow_per_token(toy, typo, window=1, progress=False)):
        with pytest.raises(ValueError, match=r"answer 'Brevikk' is not in the tokenizer's vocabulary.*unknown token"):
            call()


def test_subject_knockout_collapses_factual_recall(toy):
    """Knocking out subject → last in every layer destroys factual recall; a size-matched
    knockout of context tokens (neither subject, relation, BOS nor last) does not.

    Thresholds: the models recall ≥ 95% of held-out facts. Without the subject the answer
    can only be guessed from the relation (8 attributes per relation: chance 12.5%), so
    "collapse" is ≤ 45%. The control keeps ≥ 60% (it measured ~70% on toy-mamba2: the
    template words carry some of the relation), and the gap must be ≥ 25 points.

    This is a property of toy-mamba2's circuit, not of every model: toy-mamba (Mamba-1)
    recalls facts as well (100%) but relays the subject through other tokens (the last
    token's conv window holds it), so direct subject → last knockouts in every layer leave
    83% (SSM path) / 58% (both paths), no more than size-matched context knockouts do
    (70% / 68%); see docs/toy_models.md. For toy-mamba the test checks that instead: the
    SSM-path subject knockout keeps ≥ 60% and hurts no more than the context control.
    """
    recorded = shipped_metrics(toy.cfg.model_name)["facts"]
    assert recorded >= 0.9
    prompts = make_dataset("facts", "heldout", 128, seed=3)
    batch, offsets = _encode(toy, prompts)
    width = batch["tokens"].shape[1]
    subject, last = (_span_mask(prompts, offsets, width, name) for name in ("subject", "last"))
    rng = random.Random(0)
    context = torch.zeros_like(subject)  # per prompt, as many context tokens as its subject has
    for row, (prompt, offset) in enumerate(zip(prompts, offsets)):
        candidates = [i for i in prompt.spans["context"] if i not in (0, prompt.n_tokens - 1)]
        size = min(len(prompt.spans["subject"]), len(candidates))
        context[row, [offset + i for i in rng.sample(candidates, size)]] = True
    assert abs(float(subject.sum() - context.sum())) / float(subject.sum()) < 0.15  # size-matched

    def accuracy(sources):
        return knockout_accuracy(toy, batch, sources, last)

    clean, without_subject, without_context = accuracy(None), accuracy(subject), accuracy(context)
    assert clean >= 0.9
    if toy.cfg.model_name == "toy-mamba":  # relays the subject through other tokens (see above)
        assert without_subject >= 0.6 and without_subject >= without_context, (clean, without_subject, without_context)
        return
    assert without_subject <= 0.45, (clean, without_subject, without_context)
    assert without_context >= 0.6, (clean, without_subject, without_context)
    assert without_context - without_subject >= 0.25


def test_ioi_name_reaches_the_end_directly_or_through_its_conv_followers(toy):
    """Where the IO name reaches the last position, checked by knockout in every layer on
    96 held-out prompts (docs/toy_models.md, "What is known about their circuits"):

    - toy-mamba2 reads it straight from the IO token: cutting IO → last alone collapses
      IOI (measured 0%);
    - toy-mamba relays it: the conv copies the name into the d_conv - 1 tokens after it, so
      cutting IO → last alone changes nothing (measured 100%), and only cutting IO and its
      followers → last collapses IOI (measured 15%).

    Both share one floor: with the name's tokens cut, the answer is a guess between the two
    names at best, so "collapse" is ≤ 45% (clean ≥ 90%).
    """
    prompts = make_dataset("ioi", "heldout", 96, seed=4)
    batch, offsets = _encode(toy, prompts)
    width = batch["tokens"].shape[1]
    io, last = (_span_mask(prompts, offsets, width, name) for name in ("IO", "last"))
    io_and_followers = io.clone()
    for shift in range(1, toy.cfg.d_conv):  # the tokens whose conv window holds the name
        io_and_followers[:, shift:] |= io[:, :-shift]
    io_and_followers &= last.cumsum(-1) == 0  # only positions before the last

    def accuracy(sources):
        return knockout_accuracy(toy, batch, sources, last)

    clean, without_io, without_relay = accuracy(None), accuracy(io), accuracy(io_and_followers)
    assert clean >= 0.9
    assert without_relay <= 0.45, (clean, without_io, without_relay)
    if toy.cfg.family == "mamba1":
        assert without_io >= 0.9, (clean, without_io, without_relay)
    else:
        assert without_io <= 0.45, (clean, without_io, without_relay)


# ---------------------------------------------------------------------------- any tokenizer
FACT_TEXTS = [
    ("The Eiffel Tower is located in the city of", " Paris", "The Eiffel Tower"),
    ("Michael Jordan played the sport of", " basketball", "Michael Jordan"),
    ("In the morning, the Colosseum stood in the city of", " Rome", "the Colosseum"),
]


@pytest.fixture(scope="module")
def bpe_model():
    """A random Mamba-2 with a byte-level BPE tokenizer (trained here, offline) that, like
    GPT-NeoX's, has no word-level '<bos>': information_flow used to fail with KeyError '<bos>'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [text + answer for text, answer, _ in FACT_TEXTS] * 20
    backend.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                  pad_token="<|endoftext|>")
    cfg = tl_mamba.HookedMambaConfig(family="mamba2", n_layers=3, d_model=32, d_head=8, d_state=8, n_groups=1,
                                     d_vocab=len(tok), chunk_size=8, seed=3)
    model = tl_mamba.HookedMamba2(cfg, tokenizer=tok)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(4)))
    return model


def test_prompt_from_text_spans_cover_the_subject(bpe_model):
    from tl_mamba.experiments import prompt_from_text

    for text, answer, subject in FACT_TEXTS:
        prompt = prompt_from_text(bpe_model, text, answer, subject)
        str_tokens = bpe_model.to_str_tokens(text)
        n = len(str_tokens)
        assert prompt.spans["last"] == [n - 1] and prompt.spans["bos"] == [0]
        assert "".join(str_tokens[i] for i in prompt.spans["subject"]).strip() == subject
        assert "".join(str_tokens[i] for i in prompt.spans["relation"] + prompt.spans["last"]) == \
            text[text.index(subject) + len(subject):]
        covered = sorted(prompt.spans["context"] + prompt.spans["subject"] + prompt.spans["relation"] + [n - 1])
        assert covered == list(range(1, n))
    with pytest.raises(ValueError, match="not in the text"):
        prompt_from_text(bpe_model, FACT_TEXTS[0][0], " Paris", "Big Ben")
    with pytest.raises(ValueError, match="reaches the last token"):
        prompt_from_text(bpe_model, "Paris", " France", "Paris")


def test_information_flow_on_a_bpe_tokenizer_equals_single_knockouts(bpe_model):
    from tl_mamba.experiments import prompt_from_text

    model = bpe_model
    prompts = [prompt_from_text(model, *fact) for fact in FACT_TEXTS]
    lengths = {len(model.to_str_tokens(p.text)) for p in prompts}
    assert len(lengths) > 1  # the batch is left-padded: the spans must move with the padding
    df = information_flow(model, prompts, window=2, sources=("subject", "relation"), batch_size=4, progress=False)
    assert len(df) == len(prompts) * model.cfg.n_layers * 2
    for _, row in df.iterrows():
        prompt = prompts[row.prompt]
        tokens = model.to_tokens(prompt.text)
        answer = model.tokenizer(prompt.answer, add_special_tokens=False)["input_ids"][0]
        with torch.no_grad():
            p = model(tokens)[0, -1].softmax(-1)[answer]
            ko = Knockout(layers=list(row.layers), sources=prompt.spans[row.source], targets=[-1])
            p_ko = model.run_with_knockout(tokens, ko)[0, -1].softmax(-1)[answer]
        assert row.p == pytest.approx(float(p), rel=1e-4, abs=1e-7)
        assert row.p_ko == pytest.approx(float(p_ko), rel=1e-4, abs=1e-7)
    assert (df.p_ko != df.p).any()
    values = information_flow_per_token(model, prompts[0], window=1, progress=False)
    assert values.shape == (model.cfg.n_layers, len(model.to_str_tokens(prompts[0].text)))
    with pytest.raises(ValueError, match="is 2 tokens|tokens"):
        information_flow(model, [prompt_from_text(model, FACT_TEXTS[0][0], " Paris Rome", "The Eiffel Tower")],
                         progress=False)


def test_toy_prompts_on_another_tokenizer_are_refused(bpe_model):
    """Toy prompts' spans are word positions: on a tokenizer that splits words they would
    point at the wrong tokens, so they are refused rather than misread."""
    with pytest.raises(ValueError, match="toy-task prompt"):
        information_flow(bpe_model, make_dataset("facts", "heldout", 2, seed=0), progress=False)


def test_information_flow_given_strings_asks_for_prompts(bpe_model):
    """information_flow(model, ["text"]) failed with "'str' object has no attribute 'text'"."""
    with pytest.raises(TypeError, match=r"information_flow takes Prompt objects.*got str.*at prompt 1.*prompt_from_text"):
        information_flow(bpe_model, [make_dataset("facts", "heldout", 1, seed=0)[0], "The capital city of"],
                         progress=False)
    with pytest.raises(TypeError, match=r"information_flow_per_token takes Prompt objects.*prompt_from_text"):
        information_flow_per_token(bpe_model, "The capital", progress=False)


def test_plots_leave_the_users_matplotlib_backend_alone(tmp_path):
    """Every PNG writer draws on a figure of its own: a notebook's backend (svg stands in for
    inline here) is not switched to Agg, and pyplot is left with no open figures."""
    import matplotlib
    import matplotlib.pyplot as plt

    from tl_mamba.circuits import Graph, plot_knockout_attribution
    from tl_mamba.plotting import layer_position_heatmap

    before = matplotlib.get_backend()
    try:
        matplotlib.use("svg")
        model = tl_mamba.HookedMamba2(tl_mamba.HookedMambaConfig(family="mamba2", n_layers=2, d_model=16,
                                                                 d_vocab=20, d_head=8, seed=0))
        graph = Graph.from_model(model)
        graph.scores = torch.randn(graph.scores.shape, generator=torch.Generator().manual_seed(0))
        graph.in_graph[:] = True
        written = [layer_position_heatmap(torch.randn(2, 5), tmp_path / "heat.png", "t"),
                   graph.to_image(tmp_path / "graph.png"),
                   *plot_knockout_attribution(torch.randn(2, 4, 4), tmp_path / "ko")]
        for path in written:
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.get_backend() == "svg"
        assert plt.get_fignums() == []
    finally:
        matplotlib.use(before)
