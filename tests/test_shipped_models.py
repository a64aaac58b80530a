"""The shipped toy models load through the public API and reach their accuracies
on a small held-out sample (the full numbers are in each model's metrics.json)."""

import pytest
import torch

import tl_mamba
from tl_mamba import HookedMamba2
from tl_mamba.toy import tasks
from tl_mamba.toy.shipped import shipped_metrics, shipped_models


def test_toy_mamba2_is_shipped_and_loads_by_name():
    assert "toy-mamba2" in shipped_models()
    model = tl_mamba.from_pretrained("toy-mamba2")
    assert isinstance(model, HookedMamba2) and model.tokenizer is not None
    assert model.to_str_tokens("what is key cug ? it is")[0] == "<bos>"


@pytest.mark.parametrize("task, n, floor", [("facts", 96, 0.9), ("ioi", 96, 0.9), ("needle", 48, 0.75)])
def test_toy_mamba2_heldout_accuracy(task, n, floor):
    torch.manual_seed(0)
    model = tl_mamba.from_pretrained("toy-mamba2")
    kw = {"length": 128} if task == "needle" else {}
    prompts = tasks.make_dataset(task, "heldout", n, seed=123, **kw)
    accuracy = tasks.evaluate(model, prompts, progress=False)
    # floors sit below the accuracies recorded at training (metrics.json) to absorb sampling noise
    assert accuracy >= floor, (task, accuracy, shipped_metrics("toy-mamba2"))


def test_shipped_weights_are_small():
    total = sum(f.stat().st_size for d in shipped_models().values() for f in d.iterdir())
    assert total <= 10 * 2**20
