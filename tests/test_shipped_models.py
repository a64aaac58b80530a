"""The shipped toy models load through the public API and reach their accuracies
on a small held-out sample (the full numbers are in each model's metrics.json)."""

import pytest
import torch

import tl_mamba
from tl_mamba import HookedMamba, HookedMamba2
from tl_mamba.toy import tasks
from tl_mamba.toy.shipped import shipped_metrics, shipped_models


def test_toy_mamba2_is_shipped_and_loads_by_name():
    assert "toy-mamba2" in shipped_models()
    model = tl_mamba.from_pretrained("toy-mamba2")
    assert isinstance(model, HookedMamba2) and model.tokenizer is not None
    assert model.to_str_tokens("what is key cug ? it is")[0] == "<bos>"


def test_toy_mamba_is_shipped_and_loads_by_name():
    assert "toy-mamba" in shipped_models()
    model = tl_mamba.from_pretrained("toy-mamba")
    assert isinstance(model, HookedMamba) and model.tokenizer is not None
    assert model.cfg.family == "mamba1"


@pytest.mark.parametrize("name", sorted(shipped_models()))
def test_config_token_ids_are_the_tokenizers(name):
    """cfg's ids come from the folder (generation_config.json), and name the tokenizer's
    special tokens: code reading model.cfg.eos_token_id must not get <bos>."""
    model = tl_mamba.from_pretrained(name)
    tok = model.tokenizer
    assert tok.convert_ids_to_tokens([model.cfg.bos_token_id, model.cfg.eos_token_id, model.cfg.pad_token_id]) == [
        tok.bos_token, tok.eos_token, tok.pad_token]
    assert len({model.cfg.bos_token_id, model.cfg.eos_token_id, model.cfg.pad_token_id}) == 3


@pytest.mark.parametrize("name", sorted(shipped_models()))
def test_long_prompts_tokenize_without_a_length_warning(name, capfd, caplog):
    """The tokenizer sets no length limit (a recurrent model has none): a prompt past 1024 tokens,
    as the longer needle prompts are, draws no transformers warning of "indexing errors" (a log
    record, which pytest captures, or stderr where transformers' logging does not propagate)."""
    import logging

    model = tl_mamba.from_pretrained(name)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        tokens = model.to_tokens(" ".join(["key"] * 3000))
    assert tokens.shape == (1, 3001)
    assert "maximum sequence length" not in capfd.readouterr().err + caplog.text


@pytest.mark.parametrize("name", sorted(shipped_models()))
@pytest.mark.parametrize("task, n", [("facts", 96), ("ioi", 96), ("needle", 64)])
def test_heldout_accuracy_matches_the_recorded_one(name, task, n):
    """A fresh held-out sample (other seeds than training's evaluation) reaches the accuracy
    recorded in metrics.json, within sampling noise: n = 64-96 gives a standard error of
    3-5 points, so the floor is the recorded accuracy minus 12 points. Tasks a model did
    not learn (recorded below 50%) are skipped, with the recorded number as the reason."""
    recorded = shipped_metrics(name)
    value = recorded["needle_by_length"]["128"] if task == "needle" else recorded[task]
    if value < 0.5:
        pytest.skip(f"{name} did not learn {task} (recorded {100 * value:.0f}% held out)")
    torch.manual_seed(0)
    model = tl_mamba.from_pretrained(name)
    kw = {"length": 128} if task == "needle" else {}
    prompts = tasks.make_dataset(task, "heldout", n, seed=123, **kw)
    accuracy = tasks.evaluate(model, prompts, progress=False)
    assert accuracy >= value - 0.12, (name, task, accuracy, value)


def test_shipped_weights_are_small():
    total = sum(f.stat().st_size for d in shipped_models().values() for f in d.iterdir())
    assert total <= 10 * 2**20
