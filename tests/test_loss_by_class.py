"""loss_by_class: next-token loss and accuracy by token class, against hand computations.

The references are the model's own TransformerLens loss path (``return_type="loss"``,
``loss_per_token=True``) and ``F.cross_entropy`` on logits, selected with masks built by hand
from the token ids; the padded batch is checked against each prompt run alone.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tl_mamba
from tl_mamba.circuits import class_conditional_ablation_hooks, class_conditional_hook_factory, loss_by_class

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["key fen is 4 . key vix is 1 . what is key fen ? it is 4",
         "key bif is 3 . what is key bif ? it is 3 . key fen is 7",
         "the tall lamp sits near the road . key vix is 9 . what is key vix ? it is 9"]


@pytest.fixture(scope="module")
def toys():
    return {name: tl_mamba.from_pretrained(name, dtype=torch.float64) for name in ("toy-mamba", "toy-mamba2")}


def _row(df, name):
    rows = df[df["class"] == name]
    assert len(rows) == 1, df
    return rows.iloc[0]


@pytest.mark.parametrize("name", ["toy-mamba", "toy-mamba2"])
@pytest.mark.parametrize("by", ["target", "context"])
def test_loss_and_accuracy_by_class_match_hand_selection(toys, name, by):
    model = toys[name]
    tokens = model.to_tokens([TEXTS[0]] * 2)  # one length: no padding
    tokens[1, 5] = model.to_single_token("9")
    digits = [model.to_single_token(str(d)) for d in range(10)]
    is_id = model.to_single_token("is")
    df = loss_by_class(model, tokens, {"digits": digits, "is": ["is"], "bos": "bos"}, by=by, progress=False)

    with torch.no_grad():
        per_token = model(tokens, return_type="loss", loss_per_token=True).double()  # [b, p-1], TL's path
        logits = model(tokens).double()[:, :-1]
    nexts = tokens[:, 1:]
    right = logits.argmax(-1) == nexts
    at = tokens[:, 1:] if by == "target" else tokens[:, :-1]  # the token that classes each prediction
    masks = {"digits": torch.isin(at, torch.tensor(digits)), "is": at == is_id,
             "bos": at == model.tokenizer.bos_token_id}
    masks["other"] = ~(masks["digits"] | masks["is"] | masks["bos"])
    assert list(df["class"]) == ["digits", "is", "bos", "other"] and set(df["by"]) == {by}
    for cname, mask in masks.items():
        row = _row(df, cname)
        assert row["count"] == int(mask.sum())
        if not mask.any():
            assert math.isnan(row["loss"]) and math.isnan(row["accuracy"])
            continue
        assert row["loss"] == pytest.approx(float(per_token[mask].mean()), rel=1e-9)
        assert row["loss"] == pytest.approx(float(F.cross_entropy(logits[mask], nexts[mask])), rel=1e-9)
        assert row["accuracy"] == pytest.approx(float(right[mask].double().mean()), abs=1e-12)
    assert int(df["count"].sum()) == tokens.numel() - tokens.shape[0]  # every prediction once
    if by == "target":  # nothing predicts BOS
        assert _row(df, "bos")["count"] == 0
    else:
        assert _row(df, "bos")["count"] == tokens.shape[0]


def test_a_padded_batch_counts_each_prompt_as_if_run_alone(toys):
    """Left padding with its mask, and right padding inferred from the pad tokens: predictions
    from or to a pad are not counted, and the sums are those of the prompts run one by one."""
    model = toys["toy-mamba2"]
    classes = {"digits": [str(d) for d in range(10)], "dot": ["."]}
    sums = {}
    for text in TEXTS:
        alone = loss_by_class(model, model.to_tokens(text), classes, progress=False)
        for _, row in alone.iterrows():
            count, total = sums.get(row["class"], (0, 0.0))
            sums[row["class"]] = (count + row["count"], total + row["count"] * row["loss"])
    left, mask = model.to_tokens(TEXTS, padding_side="left", return_attention_mask=True)
    assert not bool(mask.all())
    right = model.to_tokens(TEXTS, padding_side="right")
    for df in (loss_by_class(model, left, classes, attention_mask=mask, batch_size=2, progress=False),
               loss_by_class(model, right, classes, progress=False)):
        for cname, (count, total) in sums.items():
            row = _row(df, cname)
            assert row["count"] == count
            assert row["loss"] == pytest.approx(total / count, rel=1e-7)


def test_hooks_and_a_per_batch_factory_give_the_ablated_models_loss(toys):
    """``fwd_hooks`` as fixed hooks (one forward) and as a factory built per batch (batch_size 1)
    give the loss of the ablated run, computed by hand with ``run_with_hooks``; the ablation changes it."""
    model = toys["toy-mamba2"]
    tokens = model.to_tokens([TEXTS[0], TEXTS[0].replace("4", "6")])
    digits = [model.to_single_token(str(d)) for d in range(10)]
    heads = {0: [0, 1], 2: [3]}
    hooks = class_conditional_ablation_hooks(model, tokens, heads, token_class=digits, hook="delta")
    factory = class_conditional_hook_factory(model, heads, token_class=digits, hook="delta")
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=hooks).double()[:, :-1]
    nexts = tokens[:, 1:]
    target_digit = torch.isin(nexts, torch.tensor(digits))
    want = float(F.cross_entropy(logits[target_digit], nexts[target_digit]))
    clean = _row(loss_by_class(model, tokens, {"digits": digits}, progress=False), "digits")["loss"]
    for fwd_hooks, batch_size in ((hooks, 2), (factory, 1)):
        df = loss_by_class(model, tokens, {"digits": digits}, fwd_hooks=fwd_hooks, batch_size=batch_size,
                           progress=False)
        assert _row(df, "digits")["loss"] == pytest.approx(want, rel=1e-9)
    assert abs(want - clean) > 1e-3


def test_bad_arguments_are_named(toys):
    model = toys["toy-mamba"]
    tokens = model.to_tokens(TEXTS[0])
    with pytest.raises(ValueError, match="by must be one of"):
        loss_by_class(model, tokens, {"bos": "bos"}, by="source", progress=False)
    with pytest.raises(ValueError, match="p >= 2"):
        loss_by_class(model, tokens[:, :1], {"bos": "bos"}, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        loss_by_class(model, tokens, {"bos": "bos"}, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="non-empty mapping"):
        loss_by_class(model, tokens, {}, progress=False)


def test_hook_arguments_that_cannot_work_are_named(toys):
    """Shared by the statistics under hooks (loss_by_class, delta_stats_by_class, needle_accuracy ...):
    None is no hooks; a lone (name, fn) pair, a non-pair and a factory whose second argument is
    not ``attention_mask`` are refused by name, not by an unpacking error deep in the run."""
    from tl_mamba.circuits import delta_stats_by_class

    model = toys["toy-mamba"]
    tokens = model.to_tokens(TEXTS[0])
    classes = {"is": ["is"]}
    clean = loss_by_class(model, tokens, classes, fwd_hooks=None, progress=False)
    assert clean.equals(loss_by_class(model, tokens, classes, progress=False))
    zero = ("blocks.0.hook_y", lambda act, hook: act * 0)
    with pytest.raises(ValueError, match=r"one \(name, fn\) pair; pass a list of pairs"):
        loss_by_class(model, tokens, classes, fwd_hooks=zero, progress=False)
    with pytest.raises(ValueError, match="must hold \\(hook name, hook fn\\) pairs"):
        delta_stats_by_class(model, tokens, classes, fwd_hooks=["blocks.0.hook_y"], progress=False)
    with pytest.raises(ValueError, match="name the second one attention_mask"):
        loss_by_class(model, tokens, classes, fwd_hooks=lambda toks, mask: [zero], progress=False)
    # a factory naming it attention_mask gets the batch's mask; a tokens-only one works too
    seen = []
    loss_by_class(model, tokens, classes, progress=False,
                  fwd_hooks=lambda toks, attention_mask=None: seen.append(attention_mask) or [zero])
    assert seen == [None]
    ablated = loss_by_class(model, tokens, classes, fwd_hooks=lambda toks: [zero], progress=False)
    assert ablated.equals(loss_by_class(model, tokens, classes, fwd_hooks=[zero], progress=False))
    assert not ablated.equals(clean)


def test_an_integer_zero_one_tensor_of_the_tokens_shape_warns_that_it_is_read_as_ids(toys):
    from tl_mamba.circuits import token_class_mask

    model = toys["toy-mamba"]
    tokens = model.to_tokens([TEXTS[0]] * 2)
    last = torch.zeros_like(tokens)
    last[:, -1] = 1
    with pytest.warns(UserWarning, match="read as the token ids 0 and 1, not as positions"):
        got = token_class_mask(model, tokens, last)
    assert torch.equal(got, torch.isin(tokens, torch.tensor([0, 1])))  # ids, as documented
    assert torch.equal(token_class_mask(model, tokens, last.bool()), last.bool())  # a bool mask: positions
