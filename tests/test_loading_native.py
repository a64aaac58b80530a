"""Mistral's native checkpoint layout (Mamba-Codestral): params.json + consolidated.safetensors.

``mistralai/Mamba-Codestral-7B-v0.1``'s model card downloads ``params.json``,
``consolidated.safetensors`` and ``tokenizer.model.v3``; its hub repo also holds the
transformers files. The references here are independent of tl_mamba's loader:

* a transformers ``Mamba2ForCausalLM`` whose config the test derives from params.json itself,
  the way mistral_inference (mamba_ssm's defaults for everything params.json does not name)
  and transformers' ``convert_mamba2_ssm_checkpoint_to_pytorch.py`` do;
* weight files whose names are written by the test's helpers (``model.`` + mamba_ssm names).
"""

from __future__ import annotations

import fnmatch
import json
import math
import warnings

import pytest
import torch

import tl_mamba
from tl_mamba import HookedMamba2
from tl_mamba.loading import (
    CheckpointConfigError,
    CheckpointFilesError,
    UnsupportedArchitectureError,
    load_state_dict_files,
    read_checkpoint_config,
)
from tl_mamba.loading.hub import weight_patterns_for

from checkpoint_writers import perturb_, write_mistral_native_checkpoint, write_word_tokenizer

TOKENS = torch.tensor([[3, 17, 0, 35, 8, 8, 21, 39, 1], [30, 2, 9, 33, 12, 4, 36, 5, 30]])

# A Codestral in miniature. Codestral's params.json has these keys (dim 4096, 64 layers,
# vocab 32768, n_groups 8, no padding, untied); mistral_inference takes everything else from
# mamba_ssm's Mamba2 defaults: d_state 128, headdim 64, expand 2, d_conv 4, chunk 256.
PARAMS = {"dim": 64, "n_layers": 2, "vocab_size": 37, "n_groups": 2, "rms_norm": True, "residual_in_fp32": True,
          "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": False, "model_type": "mamba"}


def reference_model(params: dict, seed: int = 0):
    """The transformers model mistral_inference's params.json describes, derived here: hidden
    size dim, num_heads = 2 * dim / 64, vocab padded up to pad_vocab_size_multiple, mamba_ssm's
    Mamba2 defaults for the rest; random weights, perturbed so that no two tensors are alike."""
    import transformers

    multiple = params["pad_vocab_size_multiple"]
    vocab = math.ceil(params["vocab_size"] / multiple) * multiple
    config = transformers.Mamba2Config(
        hidden_size=params["dim"], num_hidden_layers=params["n_layers"], vocab_size=vocab,
        n_groups=params["n_groups"], head_dim=64, num_heads=2 * params["dim"] // 64, state_size=128, expand=2,
        conv_kernel=4, chunk_size=256, layer_norm_epsilon=1e-5, residual_in_fp32=params["residual_in_fp32"],
        tie_word_embeddings=params["tie_embeddings"], bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    torch.manual_seed(seed)
    return perturb_(transformers.Mamba2ForCausalLM(config).eval(), seed=seed)


def logits(model, tokens=TOKENS):
    with torch.no_grad():
        out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


def mistral_warnings(record):
    return [str(w.message) for w in record if "Mistral tokenizer" in str(w.message)]


@pytest.mark.parametrize("tie, stored", [(False, torch.float32), (True, torch.bfloat16)])
def test_native_dir_matches_transformers(tmp_path, tie, stored):
    """params.json + consolidated.safetensors (keys under ``model.``; bf16 as Codestral ships)
    load into a HookedMamba2 with the logits of the transformers model holding those weights."""
    params = dict(PARAMS, tie_embeddings=tie)
    ref = reference_model(params, seed=1 if tie else 2)
    if stored is not torch.float32:  # the reference holds the same (rounded) values
        with torch.no_grad():
            for p in ref.parameters():
                p.copy_(p.to(stored).float())
    sd = {k: v.to(stored) for k, v in ref.state_dict().items()}
    write_mistral_native_checkpoint(tmp_path, sd, params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["consolidated.safetensors", "params.json",
                                                          "tokenizer.model.v3"]
    with pytest.warns(UserWarning, match="Mistral tokenizer") as record:
        model = tl_mamba.from_pretrained(tmp_path)
    message = mistral_warnings(record)[0]
    assert "mistral_common" in message and "model.set_tokenizer" in message and "tokenizer.model.v3" in message
    assert type(model) is HookedMamba2 and model.tokenizer is None
    cfg = model.cfg
    assert (cfg.d_model, cfg.n_layers, cfg.d_vocab, cfg.n_groups, cfg.n_heads, cfg.d_head, cfg.d_state) == (
        64, 2, 40, 2, 2, 64, 128)
    assert cfg.tie_embeddings is tie and cfg.eps == 1e-5 and cfg.checkpoint_chunk_size == 256
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 0)  # Codestral's config.json's
    torch.testing.assert_close(logits(model), logits(ref), rtol=1e-5, atol=1e-5)
    auto = HookedMamba2.from_pretrained(tmp_path, dtype="auto", tokenizer=object())  # no warning with a tokenizer
    assert auto.W_E.dtype == stored


def test_native_tokenizer_through_mistral_common_when_installed(tmp_path, monkeypatch):
    """With mistral_common installed the tokenizer file is read by transformers'
    MistralCommonBackend (stood in for here: mistral_common is not installed)."""
    import transformers
    import transformers.utils.import_utils as import_utils

    calls = []

    class FakeBackend:
        @classmethod
        def from_pretrained(cls, path):
            calls.append(path)
            return cls()

    write_mistral_native_checkpoint(tmp_path, reference_model(PARAMS).state_dict(), PARAMS)
    monkeypatch.setattr(import_utils, "is_mistral_common_available", lambda: True)
    monkeypatch.setattr(transformers, "MistralCommonBackend", FakeBackend, raising=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = tl_mamba.from_pretrained(tmp_path)
    assert calls == [str(tmp_path.resolve())] and isinstance(model.tokenizer, FakeBackend)
    assert not mistral_warnings(record)


def test_transformers_files_win_over_native_files(tmp_path):
    """The hub repo holds both layouts: the transformers files (config.json, model.safetensors,
    tokenizer.json) are read; the native weights here are of another model and must not be."""
    ref = reference_model(PARAMS, seed=3)
    ref.save_pretrained(tmp_path)
    write_word_tokenizer(tmp_path, ["def", "return"])
    other = reference_model(PARAMS, seed=4)
    write_mistral_native_checkpoint(tmp_path, other.state_dict(), PARAMS)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = tl_mamba.from_pretrained(tmp_path)
    assert not mistral_warnings(record)
    assert model.cfg.extra["layout"] == "transformers"  # config.json read, not params.json
    assert model.cfg.original_architecture == "Mamba2ForCausalLM"
    assert model.tokenizer("def return")["input_ids"] == [2, 3]
    torch.testing.assert_close(logits(model), logits(ref), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(model), logits(other), atol=1e-3)


def test_config_json_with_consolidated_weights_only(tmp_path):
    """config.json downloaded with consolidated.safetensors but not the transformers shards:
    the native weights are read with the transformers config."""
    ref = reference_model(PARAMS, seed=5)
    ref.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    write_mistral_native_checkpoint(tmp_path, ref.state_dict(), PARAMS, tokenizer_file=None)
    (tmp_path / "params.json").unlink()
    model = tl_mamba.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(model), logits(ref), rtol=1e-5, atol=1e-5)
    (tmp_path / "consolidated.safetensors").unlink()
    with pytest.raises(CheckpointFilesError, match="no weight files.*consolidated.safetensors"):
        load_state_dict_files(tmp_path)


def test_params_json_errors_name_the_file_and_field(tmp_path):
    (tmp_path / "consolidated.safetensors").write_bytes(b"not safetensors")  # never read: the config fails first
    for field in ("dim", "n_layers", "vocab_size"):
        (tmp_path / "params.json").write_text(json.dumps({k: v for k, v in PARAMS.items() if k != field}))
        with pytest.raises(CheckpointConfigError, match=rf"params.json lacks the required field '{field}'"):
            tl_mamba.from_pretrained(tmp_path)
    # a Mistral transformer's params.json (mistral_inference TransformerArgs: no model_type)
    transformer = {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
                   "norm_eps": 1e-5, "vocab_size": 40}
    (tmp_path / "params.json").write_text(json.dumps(transformer))
    with pytest.raises(UnsupportedArchitectureError, match="model_type='transformer'.*Mamba models only"):
        tl_mamba.from_pretrained(tmp_path)
    # fields mistral_inference does not read are ignored, with a warning
    (tmp_path / "params.json").write_text(json.dumps(dict(PARAMS, d_state=64)))
    with pytest.warns(UserWarning, match="ignoring field.*d_state"):
        raw = read_checkpoint_config(tmp_path)
    assert raw["ssm_cfg"] == {"layer": "Mamba2", "ngroups": 2} and raw["d_model"] == 64
    # groups that do not divide the heads mamba_ssm's headdim 64 makes: said before the weights are read
    (tmp_path / "params.json").write_text(json.dumps(dict(PARAMS, n_groups=8)))
    with pytest.raises(UnsupportedArchitectureError, match=r"ngroups=8 does not divide the 2 heads.*headdim=64"):
        tl_mamba.from_pretrained(tmp_path)


def _fetched(files, patterns):
    return sorted(f for f in files if any(fnmatch.fnmatchcase(f, p) for p in patterns))


def test_hub_weight_file_choice():
    """Which weight files a hub download takes, for repo listings written out here."""
    codestral = ["README.md", "config.json", "consolidated.safetensors", "model-00001-of-00003.safetensors",
                 "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
                 "model.safetensors.index.json", "params.json", "special_tokens_map.json", "tokenizer.json",
                 "tokenizer.model.v3", "tokenizer_config.json"]
    assert _fetched(codestral, weight_patterns_for(codestral)) == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors",
        "model.safetensors.index.json"]
    native = ["params.json", "consolidated.safetensors", "tokenizer.model.v3"]
    assert _fetched(native, weight_patterns_for(native)) == ["consolidated.safetensors"]
    state_spaces = ["config.json", "pytorch_model.bin"]
    assert _fetched(state_spaces, weight_patterns_for(state_spaces)) == ["pytorch_model.bin"]
    from tl_mamba.loading.hub import CONFIG_PATTERNS, TOKENIZER_PATTERNS

    assert _fetched(native, CONFIG_PATTERNS + TOKENIZER_PATTERNS) == ["params.json", "tokenizer.model.v3"]


def test_save_over_a_native_dir_replaces_it(tmp_path):
    """Saving an edited model into the folder it came from: the native weights, their params.json
    and the Mistral tokenizer file go (the model has no tokenizer), and the folder loads as the
    saved model."""
    write_mistral_native_checkpoint(tmp_path, reference_model(PARAMS, seed=6).state_dict(), PARAMS)
    with pytest.warns(UserWarning, match="Mistral tokenizer"):
        model = tl_mamba.from_pretrained(tmp_path)
    with torch.no_grad():
        model.blocks[0].mixer.D.mul_(3.0)
    model.save_pretrained(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert not names & {"consolidated.safetensors", "params.json", "tokenizer.model.v3"}, names
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        back = tl_mamba.from_pretrained(tmp_path)
    assert not mistral_warnings(record) and back.tokenizer is None
    assert torch.equal(logits(back), logits(model))
    assert (back.cfg.bos_token_id, back.cfg.eos_token_id, back.cfg.pad_token_id) == (1, 2, 0)
