"""docs/hooks.md is generated from a live model and must match the code, and the
contract's hook table (../shared/API.md) must be fully present on HookedMamba."""

from pathlib import Path

import torch

from tl_mamba import HookedMamba, HookedMambaConfig
from tl_mamba.hooks_doc import render_markdown

ROOT = Path(__file__).resolve().parents[1]

# The Mamba-1 and model-level rows of the contract, with their symbolic shapes.
CONTRACT_MAMBA1 = {
    "hook_embed": "b,p,d",
    "ln_final.hook_scale": "b,p,1",
    "ln_final.hook_normalized": "b,p,d",
    "blocks.{l}.hook_resid_pre": "b,p,d",
    "blocks.{l}.hook_mixer_in": "b,p,d",
    "blocks.{l}.ln1.hook_scale": "b,p,1",
    "blocks.{l}.ln1.hook_normalized": "b,p,d",
    "blocks.{l}.hook_conv_in": "b,p,e",
    "blocks.{l}.hook_conv": "b,p,e",
    "blocks.{l}.hook_x": "b,p,e",
    "blocks.{l}.hook_z": "b,p,e",
    "blocks.{l}.hook_gate": "b,p,e",
    "blocks.{l}.hook_dt_low": "b,p,r",
    "blocks.{l}.hook_delta": "b,p,e",
    "blocks.{l}.hook_B": "b,p,n",
    "blocks.{l}.hook_C": "b,p,n",
    "blocks.{l}.hook_ssm_mask": "b,1,p,p",
    "blocks.{l}.hook_h": "b,p,e,n",
    "blocks.{l}.hook_y": "b,p,e",
    "blocks.{l}.hook_y_gated": "b,p,e",
    "blocks.{l}.hook_mixer_out": "b,p,d",
    "blocks.{l}.hook_resid_post": "b,p,d",
}


def test_hooks_doc_is_current():
    committed = (ROOT / "docs" / "hooks.md").read_text()
    assert committed == render_markdown(), "docs/hooks.md is stale: run `python -m tl_mamba.hooks_doc > docs/hooks.md`"


def test_every_contract_hook_with_its_shape():
    cfg = HookedMambaConfig(n_layers=3, d_model=10, d_vocab=30, d_state=7, dt_rank=2, expand=3, seed=0)
    model = HookedMamba(cfg)
    b, p = 2, 5
    sizes = {"b": b, "p": p, "d": 10, "e": 30, "n": 7, "r": 2, "1": 1}
    shapes = model.hook_shapes(torch.zeros(b, p, dtype=torch.long))
    for generic, symbolic in CONTRACT_MAMBA1.items():
        expected = tuple(sizes[s] for s in symbolic.split(","))
        layers = range(cfg.n_layers) if "{l}" in generic else [None]
        for layer in layers:
            name = generic.replace("{l}", str(layer))
            assert name in shapes, f"{name} missing"
            assert shapes[name] == expected, f"{name}: {shapes[name]} != {expected}"
