"""Checkpoint loading: layouts, config translation, strict conversion, hub resolution.

Everything is offline. Checkpoints are written here in the exact layouts tl_mamba
reads: transformers ``save_pretrained`` directories of tiny random models, and
hand-written mamba_ssm directories (config.json + pytorch_model.bin). References are
independent of the code under test: the transformers models themselves (logits and
tensors), and name tables written out literally below.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import tl_mamba
from tl_mamba import HookedMamba
from tl_mamba.loading import (
    CheckpointFilesError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    UnsupportedArchitectureError,
    WrongModelClassError,
    auto_model_class,
    config_from_checkpoint,
    convert_state_dict,
    detect_layout,
    from_hf,
    load_any,
    load_pretrained,
    load_state_dict_files,
    read_checkpoint_config,
    resolve_checkpoint,
)
from tl_mamba.ops.ssd.chunked import DEFAULT_CHUNK

from checkpoint_writers import (
    mamba_ssm_config,
    save_state_dict,
    tiny_transformers_model,
    transformers_to_mamba_ssm_keys,
    write_mamba_ssm_checkpoint,
    write_word_tokenizer,
)

TOKENS = torch.tensor([[3, 17, 0, 55, 8, 8, 21, 40, 1], [50, 2, 9, 33, 12, 4, 46, 5, 30]])


def hf_logits(hf_model, tokens=TOKENS):
    with torch.no_grad():
        return hf_model(tokens).logits


def our_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


def assert_close(actual, expected, atol=1e-5):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def hf_mamba():
    return tiny_transformers_model("mamba", tie=True, seed=1)


@pytest.fixture(scope="module")
def hf_mamba_untied():
    return tiny_transformers_model("mamba", tie=False, seed=2, use_bias=True)


@pytest.fixture(scope="module")
def hf_falcon():
    return tiny_transformers_model("falcon_mamba", seed=3)


@pytest.fixture(scope="module")
def hf_mamba2():
    return tiny_transformers_model("mamba2", seed=4)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, hf_mamba, hf_mamba_untied, hf_falcon, hf_mamba2):
    """``save_pretrained`` directories (transformers layout) of the fixture models."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for name, model, kw in [
        ("mamba", hf_mamba, {}),
        ("mamba_sharded", hf_mamba, {"max_shard_size": "4KB"}),
        ("mamba_untied", hf_mamba_untied, {}),
        ("falcon", hf_falcon, {}),
        ("mamba2", hf_mamba2, {}),
    ]:
        model.save_pretrained(root / name, **kw)
        dirs[name] = root / name
    return dirs


def mamba1_names(n_layers: int, ckpt_embed: str, *, biases=("conv1d.bias",), untied=False):
    """Our name -> checkpoint name, written out from the brief's table (independent of the package)."""
    names = {"embed.W_E": ckpt_embed, "ln_final.w": "backbone.norm_f.weight"}
    mixer = ["in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D",
             "out_proj.weight", *biases]
    for layer in range(n_layers):
        names[f"blocks.{layer}.ln1.w"] = f"backbone.layers.{layer}.norm.weight"
        for m in mixer:
            names[f"blocks.{layer}.mixer.{m}"] = f"backbone.layers.{layer}.mixer.{m}"
    if untied:
        names["unembed.weight"] = "lm_head.weight"
    return names


def mamba2_names(n_layers: int, ckpt_embed: str, *, untied=False):
    names = {"embed.W_E": ckpt_embed, "ln_final.w": "backbone.norm_f.weight"}
    mixer = ["in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
             "out_proj.weight"]
    for layer in range(n_layers):
        names[f"blocks.{layer}.ln1.w"] = f"backbone.layers.{layer}.norm.weight"
        for m in mixer:
            names[f"blocks.{layer}.mixer.{m}"] = f"backbone.layers.{layer}.mixer.{m}"
    if untied:
        names["unembed.weight"] = "lm_head.weight"
    return names


# --------------------------------------------------------------------------- resolve


def test_resolve_local_directory(tmp_path):
    assert resolve_checkpoint(tmp_path) == tmp_path.resolve()
    assert resolve_checkpoint(str(tmp_path)) == tmp_path.resolve()


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "~/no_such_tl_mamba_dir", "a/b/c"])
def test_resolve_missing_local_path(name):
    with pytest.raises(CheckpointNotFoundError, match="does not exist") as info:
        resolve_checkpoint(name)
    assert name in str(info.value)


def test_resolve_file_instead_of_directory(tmp_path):
    file = tmp_path / "config.json"
    file.write_text("{}")
    with pytest.raises(CheckpointNotFoundError, match="is a file"):
        resolve_checkpoint(file)


def test_resolve_invalid_hub_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(CheckpointNotFoundError, match="neither an existing local directory nor a valid hub id"):
        resolve_checkpoint("not a repo id!")


def test_resolve_offline_uncached_hub_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(FileNotFoundError) as info:
        resolve_checkpoint("state-spaces/mamba-130m-hf")
    assert isinstance(info.value, CheckpointNotFoundError)
    message = str(info.value)
    assert "state-spaces/mamba-130m-hf" in message
    assert "HF_HUB_OFFLINE" in message
    assert "local directory path" in message
    # and through the public entry points
    with pytest.raises(CheckpointNotFoundError, match="state-spaces/mamba-130m-hf"):
        HookedMamba.from_pretrained("state-spaces/mamba-130m-hf")
    with pytest.raises(CheckpointNotFoundError, match="local directory path"):
        tl_mamba.from_pretrained("state-spaces/mamba-130m-hf")


def test_resolve_unreachable_hub(monkeypatch, tmp_path):
    """Online mode, but the endpoint refuses connections (localhost port 9): same clear error."""
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint("acme/unreachable-mamba")
    assert "acme/unreachable-mamba" in str(info.value)
    assert "unreachable" in str(info.value) and "local directory path" in str(info.value)


def test_resolve_cached_hub_id_offline(monkeypatch, tmp_path, saved, hf_mamba):
    """A hub id present in the cache loads offline (hub cache layout written by hand)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-mamba"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in ("config.json", "model.safetensors"):
        (snapshot / file).write_bytes((saved["mamba"] / file).read_bytes())
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_checkpoint("acme/tiny-mamba") == snapshot
    model = HookedMamba.from_pretrained("acme/tiny-mamba")
    assert model.cfg.model_name == "acme/tiny-mamba"
    assert_close(our_logits(model), hf_logits(hf_mamba))


# --------------------------------------------------------------------------- detection


def test_detect_transformers_layouts(saved):
    assert detect_layout(read_checkpoint_config(saved["mamba"])) == ("transformers", "mamba1")
    assert detect_layout(read_checkpoint_config(saved["falcon"])) == ("transformers", "falcon_mamba")
    assert detect_layout(read_checkpoint_config(saved["mamba2"])) == ("transformers", "mamba2")


def test_detect_mamba_ssm_layouts():
    assert detect_layout(mamba_ssm_config(d_model=24, n_layer=2, vocab_size=50)) == ("mamba_ssm", "mamba1")
    cfg1 = mamba_ssm_config(d_model=24, n_layer=2, vocab_size=50, ssm_cfg={"layer": "Mamba1"})
    assert detect_layout(cfg1) == ("mamba_ssm", "mamba1")
    cfg2 = mamba_ssm_config(d_model=16, n_layer=2, vocab_size=50, ssm_cfg={"layer": "Mamba2", "headdim": 8})
    assert detect_layout(cfg2) == ("mamba_ssm", "mamba2")
    # the oldest state-spaces configs: no ssm_cfg.layer, no tie_embeddings, no attn keys
    old = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
           "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
    assert detect_layout(old) == ("mamba_ssm", "mamba1")


@pytest.mark.parametrize("model_type", ["jamba", "zamba", "zamba2", "bamba", "nemotron_h", "falcon_h1",
                                        "granitemoehybrid"])
def test_detect_hybrid_model_types(model_type):
    with pytest.raises(UnsupportedArchitectureError, match="hybrid") as info:
        detect_layout({"model_type": model_type, "hidden_size": 16})
    assert model_type in str(info.value)


def test_detect_unknown_model_type():
    with pytest.raises(UnsupportedArchitectureError, match="unknown model_type 'gpt2'"):
        detect_layout({"model_type": "gpt2"})
    with pytest.raises(UnsupportedArchitectureError, match="unrecognised config.json"):
        detect_layout({"hidden": 3})


def test_detect_mamba_ssm_hybrid_attention_layers():
    raw = mamba_ssm_config(d_model=24, n_layer=4, vocab_size=50, attn_layer_idx=[1, 3], attn_cfg={"num_heads": 4})
    with pytest.raises(UnsupportedArchitectureError, match=r"hybrid.*attn_layer_idx=\[1, 3\]"):
        detect_layout(raw)


@pytest.mark.parametrize(
    "change, option",
    [
        ({"d_intermediate": 64}, "d_intermediate=64"),
        ({"rms_norm": False}, "rms_norm=False"),
        ({"ssm_cfg": {"layer": "Mamba3"}}, "ssm_cfg.layer='Mamba3'"),
        ({"ssm_cfg": {"layer": "Mamba2", "headdim": 8, "d_ssm": 16}}, "ssm_cfg.d_ssm=16"),
        ({"ssm_cfg": {"layer": "Mamba2", "headdim": 8, "D_has_hdim": True}}, "D_has_hdim=True"),
        ({"ssm_cfg": {"layer": "Mamba2", "headdim": 8, "rmsnorm": False}}, "rmsnorm=False"),
        ({"ssm_cfg": {"layer": "Mamba2", "headdim": 8, "norm_before_gate": True}}, "norm_before_gate=True"),
    ],
)
def test_detect_unsupported_mamba_ssm_options(change, option):
    raw = mamba_ssm_config(d_model=16, n_layer=2, vocab_size=50, **change)
    with pytest.raises(UnsupportedArchitectureError) as info:
        detect_layout(raw)
    assert option in str(info.value)


def test_mamba2_supported_mamba_ssm_options_pass():
    raw = mamba_ssm_config(d_model=16, n_layer=2, vocab_size=50, ssm_cfg={
        "layer": "Mamba2", "headdim": 8, "d_ssm": 32, "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False})
    assert detect_layout(raw) == ("mamba_ssm", "mamba2")


# --------------------------------------------------------------------------- config


def test_config_mamba_ssm_mamba1_padding_dt_rank_eps_tie():
    raw = mamba_ssm_config(d_model=40, n_layer=2, vocab_size=50, ssm_cfg={"d_state": 8}, tie_embeddings=None)
    cfg = config_from_checkpoint(raw, "mamba_ssm", "mamba1", model_name="dir")
    assert cfg.family == "mamba1"
    assert cfg.d_vocab == 56 and cfg.d_vocab_out == 56  # 50 padded up to a multiple of 8
    assert cfg.dt_rank == 3  # "auto" = ceil(40 / 16)
    assert (cfg.n_layers, cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv) == (2, 40, 80, 8, 4)
    assert cfg.eps == 1e-5 and cfg.bcdt_rms_eps is None
    assert cfg.tie_embeddings is True  # mamba_ssm default
    assert cfg.conv_bias is True and cfg.proj_bias is False
    assert cfg.original_architecture == "MambaLMHeadModel" and cfg.model_name == "dir"
    assert cfg.extra["checkpoint_vocab_size"] == 50

    raw = mamba_ssm_config(d_model=40, n_layer=3, vocab_size=50, pad_vocab_size_multiple=16, tie_embeddings=False,
                           ssm_cfg={"dt_rank": 5, "expand": 3, "d_conv": 3, "bias": True, "conv_bias": False})
    cfg = config_from_checkpoint(raw, "mamba_ssm", "mamba1")
    assert cfg.d_vocab == 64 and cfg.dt_rank == 5 and cfg.d_inner == 120 and cfg.d_conv == 3
    assert cfg.tie_embeddings is False and cfg.proj_bias is True and cfg.conv_bias is False


def test_config_mamba_ssm_mamba2():
    raw = mamba_ssm_config(d_model=16, n_layer=2, vocab_size=50, pad_vocab_size_multiple=16,
                           ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8,
                                    "dt_limit": [0.01, 10.0]})
    cfg = config_from_checkpoint(raw, "mamba_ssm", "mamba2")
    assert cfg.family == "mamba2" and cfg.d_vocab == 64
    assert (cfg.d_inner, cfg.d_head, cfg.n_heads, cfg.n_groups, cfg.d_state) == (32, 8, 4, 2, 8)
    assert cfg.checkpoint_chunk_size == 8 and cfg.chunk_size == DEFAULT_CHUNK and cfg.dt_limit == (0.01, 10.0)
    assert cfg.eps == 1e-5 and cfg.tie_embeddings is True and cfg.norm_before_gate is False


def test_config_transformers_matches_hf_configs(hf_mamba, hf_falcon, hf_mamba2):
    for hf_model, family in [(hf_mamba, "mamba1"), (hf_falcon, "falcon_mamba")]:
        hc = hf_model.config
        cfg = config_from_checkpoint(hc.to_dict(), "transformers", family)
        assert (cfg.n_layers, cfg.d_model, cfg.d_vocab, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.dt_rank) == (
            hc.num_hidden_layers, hc.hidden_size, hc.vocab_size, hc.intermediate_size, hc.state_size,
            hc.conv_kernel, hc.time_step_rank)
        assert cfg.eps == hc.layer_norm_epsilon and cfg.tie_embeddings == hc.tie_word_embeddings
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (hc.bos_token_id, hc.eos_token_id,
                                                                          hc.pad_token_id)
    assert config_from_checkpoint(hf_mamba.config.to_dict(), "transformers", "mamba1").bcdt_rms_eps is None
    assert config_from_checkpoint(hf_falcon.config.to_dict(), "transformers", "falcon_mamba").bcdt_rms_eps == 1e-3

    hc = hf_mamba2.config
    cfg = config_from_checkpoint(hc.to_dict(), "transformers", "mamba2")
    assert (cfg.n_heads, cfg.d_head, cfg.n_groups, cfg.checkpoint_chunk_size, cfg.d_inner) == (4, 8, 2, 8, 32)
    assert cfg.chunk_size == DEFAULT_CHUNK  # the torch backend's own chunk length, not the checkpoint's
    assert cfg.dt_limit == (0.0, float("inf")) and cfg.tie_embeddings is False  # Mamba2Config default
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 2, 1)


def test_config_transformers_raw_json_values(saved):
    raw = read_checkpoint_config(saved["mamba2"])
    assert detect_layout(raw) == ("transformers", "mamba2")
    assert config_from_checkpoint(raw, "transformers", "mamba2").dt_limit == (0.0, float("inf"))
    raw["time_step_limit"] = [0.0, {"__float__": "Infinity"}]  # how transformers 5 writes inf
    assert config_from_checkpoint(raw, "transformers", "mamba2").dt_limit == (0.0, float("inf"))
    raw.update(layer_norm_epsilon=1e-4, time_step_limit=[0.001, 5.0], eos_token_id=[7, 9])
    cfg = config_from_checkpoint(raw, "transformers", "mamba2")
    assert cfg.eps == 1e-4 and cfg.dt_limit == (0.001, 5.0) and cfg.eos_token_id == 7
    assert cfg.original_architecture == "Mamba2ForCausalLM"
    raw1 = read_checkpoint_config(saved["mamba"])
    raw1["time_step_rank"] = "auto"
    del raw1["tie_word_embeddings"]
    cfg1 = config_from_checkpoint(raw1, "transformers", "mamba1")
    assert cfg1.dt_rank == 2 and cfg1.tie_embeddings is True  # ceil(24/16); MambaConfig default


def test_config_trusts_embedding_rows_over_config_vocab(hf_mamba):
    raw = hf_mamba.config.to_dict()
    raw["vocab_size"] = 50  # e.g. the tokenizer's size, smaller than the embedding's 56 rows
    sd = hf_mamba.state_dict()
    assert config_from_checkpoint(raw, "transformers", "mamba1").d_vocab == 50
    cfg = config_from_checkpoint(raw, "transformers", "mamba1", state_dict=sd)
    assert cfg.d_vocab == 56 and cfg.d_vocab_out == 56


def test_config_overrides_and_unknown_override(hf_mamba):
    raw = hf_mamba.config.to_dict()
    cfg = config_from_checkpoint(raw, "transformers", "mamba1", dtype=torch.float64, default_prepend_bos=False)
    assert cfg.dtype == torch.float64 and cfg.default_prepend_bos is False
    with pytest.raises(TypeError, match="not_a_field"):
        config_from_checkpoint(raw, "transformers", "mamba1", not_a_field=1)


# --------------------------------------------------------------------------- weight files


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "sharded_bin", "sharded_safetensors"])
def test_load_state_dict_files_formats(tmp_path, hf_mamba_untied, fmt):
    source = {k: v.detach().clone() for k, v in hf_mamba_untied.state_dict().items()}
    save_state_dict(source, tmp_path, fmt)
    loaded = load_state_dict_files(tmp_path)
    assert set(loaded) == set(source)
    for key, tensor in source.items():
        assert torch.equal(loaded[key], tensor), key


def test_load_state_dict_files_save_pretrained_sharded(saved, hf_mamba):
    assert (saved["mamba_sharded"] / "model.safetensors.index.json").is_file()
    assert len(list(saved["mamba_sharded"].glob("model-*.safetensors"))) > 1
    loaded = load_state_dict_files(saved["mamba_sharded"])
    reference = hf_mamba.state_dict()
    assert "lm_head.weight" not in loaded  # tied: save_pretrained drops it
    for key, tensor in loaded.items():
        assert torch.equal(tensor, reference[key]), key


def test_save_pretrained_over_a_sharded_checkpoint_loads_the_saved_weights(tmp_path, hf_mamba):
    """Editing a downloaded (sharded) checkpoint and saving it back: the old index and shards go,
    so loading the folder gives the edited weights, not the old ones."""
    import shutil

    folder = tmp_path / "ckpt"
    hf_mamba.save_pretrained(folder, max_shard_size="4KB")
    (folder / "pytorch_model.bin").write_bytes(b"stale")
    (folder / "notes.txt").write_text("keep me")
    model = tl_mamba.from_pretrained(folder)
    with torch.no_grad():
        model.blocks[0].mixer.D.mul_(3.0)
    model.save_pretrained(folder)
    assert not (folder / "model.safetensors.index.json").exists() and not list(folder.glob("model-*.safetensors"))
    assert not (folder / "pytorch_model.bin").exists() and (folder / "notes.txt").read_text() == "keep me"
    reloaded = tl_mamba.from_pretrained(folder)
    tokens = torch.arange(8)[None] % model.cfg.d_vocab
    torch.testing.assert_close(reloaded(tokens), model(tokens))
    # a save that cannot be written (a parameter no checkpoint name maps) leaves the folder as it was
    reloaded.probe = torch.nn.Linear(2, 2)
    with pytest.raises(KeyError, match="probe"):
        reloaded.save_pretrained(folder)
    torch.testing.assert_close(tl_mamba.from_pretrained(folder)(tokens), model(tokens))
    with torch.no_grad():
        assert not torch.allclose(hf_mamba(tokens).logits, model(tokens), atol=1e-4)
    shutil.rmtree(folder)


def test_load_state_dict_files_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(mamba_ssm_config(d_model=24, n_layer=2, vocab_size=50)))
    (tmp_path / "README.md").write_text("hi")
    with pytest.raises(CheckpointFilesError, match="no weight files") as info:
        load_state_dict_files(tmp_path)
    assert "config.json" in str(info.value) and "README.md" in str(info.value)
    with pytest.raises(FileNotFoundError, match="no weight files.*README.md"):
        HookedMamba.from_pretrained(tmp_path)


def test_load_state_dict_files_missing_shard(tmp_path, hf_mamba):
    save_state_dict(hf_mamba.state_dict(), tmp_path, "sharded_safetensors")
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointFilesError, match="model-00002-of-00003.safetensors"):
        load_state_dict_files(tmp_path)


def test_read_checkpoint_config_missing(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointFilesError, match="no config.json.*pytorch_model.bin"):
        read_checkpoint_config(tmp_path)


# --------------------------------------------------------------------------- conversion


def test_convert_transformers_mamba1_exact(hf_mamba, hf_mamba_untied):
    for hf_model, untied, biases in [
        (hf_mamba, False, ("conv1d.bias",)),
        (hf_mamba_untied, True, ("conv1d.bias", "in_proj.bias", "out_proj.bias")),
    ]:
        sd = hf_model.state_dict()
        cfg = config_from_checkpoint(hf_model.config.to_dict(), "transformers", "mamba1")
        ours = convert_state_dict(sd, cfg, "transformers", "mamba1")
        names = mamba1_names(2, "backbone.embeddings.weight", biases=biases, untied=untied)
        assert set(ours) == set(names)
        for our_key, ckpt_key in names.items():
            assert torch.equal(ours[our_key], sd[ckpt_key]), our_key


def test_convert_mamba_ssm_layout_exact(hf_mamba_untied):
    sd = transformers_to_mamba_ssm_keys(hf_mamba_untied.state_dict(), tie=False)
    raw = mamba_ssm_config(d_model=24, n_layer=2, vocab_size=56, tie_embeddings=False,
                           ssm_cfg={"d_state": 8, "bias": True})
    cfg = config_from_checkpoint(raw, "mamba_ssm", "mamba1")
    ours = convert_state_dict(sd, cfg, "mamba_ssm", "mamba1")
    names = mamba1_names(2, "backbone.embedding.weight", biases=("conv1d.bias", "in_proj.bias", "out_proj.bias"),
                         untied=True)
    assert set(ours) == set(names)
    for our_key, ckpt_key in names.items():
        assert torch.equal(ours[our_key], sd[ckpt_key]), our_key


def test_convert_transformers_mamba2_exact(hf_mamba2):
    sd = hf_mamba2.state_dict()
    cfg = config_from_checkpoint(hf_mamba2.config.to_dict(), "transformers", "mamba2")
    ours = convert_state_dict(sd, cfg, "transformers", "mamba2")
    names = mamba2_names(2, "backbone.embeddings.weight", untied=True)
    assert set(ours) == set(names)
    for our_key, ckpt_key in names.items():
        assert torch.equal(ours[our_key], sd[ckpt_key]), our_key


def test_convert_tied_lm_head_dropped_or_rejected(hf_mamba):
    sd = dict(hf_mamba.state_dict())
    assert "lm_head.weight" in sd  # in-memory state dict carries the tied head
    cfg = config_from_checkpoint(hf_mamba.config.to_dict(), "transformers", "mamba1")
    ours = convert_state_dict(sd, cfg, "transformers", "mamba1")
    assert "unembed.weight" not in ours
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    with pytest.raises(CheckpointMismatchError, match="lm_head.weight differs from the embedding") as info:
        convert_state_dict(sd, cfg, "transformers", "mamba1")
    assert "load it with tie_embeddings=False" in str(info.value)


def test_convert_untied_without_lm_head_is_missing(hf_mamba):
    sd = {k: v for k, v in hf_mamba.state_dict().items() if k != "lm_head.weight"}
    raw = dict(hf_mamba.config.to_dict(), tie_word_embeddings=False)
    cfg = config_from_checkpoint(raw, "transformers", "mamba1")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): lm_head.weight \(-> unembed.weight\)"):
        convert_state_dict(sd, cfg, "transformers", "mamba1")


def test_convert_reports_missing_unexpected_and_misshapen_together(hf_mamba):
    sd = dict(hf_mamba.state_dict())
    del sd["backbone.layers.1.mixer.D"]
    sd["backbone.layers.0.mixer.mystery.weight"] = torch.zeros(3)
    sd["backbone.extra_buffer"] = torch.zeros(1)
    sd["backbone.layers.0.mixer.A_log"] = torch.zeros(48, 9)
    cfg = config_from_checkpoint(hf_mamba.config.to_dict(), "transformers", "mamba1")
    with pytest.raises(CheckpointMismatchError) as info:
        convert_state_dict(sd, cfg, "transformers", "mamba1")
    err, message = info.value, str(info.value)
    assert "backbone.layers.1.mixer.D (-> blocks.1.mixer.D)" in message
    assert "backbone.layers.0.mixer.mystery.weight" in message and "backbone.extra_buffer" in message
    assert "backbone.layers.0.mixer.A_log -> blocks.0.mixer.A_log: expected (48, 8), got (48, 9)" in message
    assert len(err.missing) == 1 and len(err.unexpected) == 2 and len(err.misshapen) == 1


def test_convert_truncates_long_lists(hf_mamba):
    sd = {k: v for k, v in hf_mamba.state_dict().items() if ".layers." not in k}
    cfg = config_from_checkpoint(hf_mamba.config.to_dict(), "transformers", "mamba1")
    with pytest.raises(CheckpointMismatchError) as info:
        convert_state_dict(sd, cfg, "transformers", "mamba1")
    assert len(info.value.missing) == 2 * 10  # ln1 + 9 mixer tensors, both layers
    assert "... and 8 more" in str(info.value)
    assert str(info.value).count("backbone.layers.") == 12


def test_convert_falcon_ignores_ones_buffers_rejects_trained_ones(hf_falcon):
    sd = dict(hf_falcon.state_dict())
    cfg = config_from_checkpoint(hf_falcon.config.to_dict(), "transformers", "falcon_mamba")
    for layer in range(2):
        for norm in ("dt", "b", "c"):
            sd[f"backbone.layers.{layer}.mixer.{norm}_layernorm.weight"] = torch.ones(8 if norm != "dt" else 2)
    ours = convert_state_dict(sd, cfg, "transformers", "falcon_mamba")
    assert not any("layernorm" in key for key in ours)
    sd["backbone.layers.1.mixer.b_layernorm.weight"] = torch.full((8,), 2.0)
    with pytest.raises(CheckpointMismatchError, match="b_layernorm.weight is not all ones"):
        convert_state_dict(sd, cfg, "transformers", "falcon_mamba")
    # in a plain Mamba-1 checkpoint the same names are simply unexpected
    cfg1 = config_from_checkpoint(hf_falcon.config.to_dict(), "transformers", "mamba1")
    with pytest.raises(CheckpointMismatchError, match="unexpected keys"):
        convert_state_dict(sd, cfg1, "transformers", "mamba1")


def test_convert_backbone_only_state_dict(hf_mamba):
    """transformers ``MambaModel`` saves keys without the ``backbone.`` prefix and no lm_head."""
    sd = {k[len("backbone."):]: v for k, v in hf_mamba.state_dict().items() if k.startswith("backbone.")}
    cfg = config_from_checkpoint(hf_mamba.config.to_dict(), "transformers", "mamba1")
    ours = convert_state_dict(sd, cfg, "transformers", "mamba1")
    assert torch.equal(ours["embed.W_E"], sd["embeddings.weight"])
    assert torch.equal(ours["blocks.1.mixer.x_proj.weight"], sd["layers.1.mixer.x_proj.weight"])


# --------------------------------------------------------------------------- full loads (HookedMamba)


@pytest.mark.parametrize("name", ["mamba", "mamba_sharded", "mamba_untied", "falcon"])
def test_load_transformers_dir_matches_hf_logits(saved, request, name):
    hf_model = request.getfixturevalue(
        {"mamba": "hf_mamba", "mamba_sharded": "hf_mamba", "mamba_untied": "hf_mamba_untied",
         "falcon": "hf_falcon"}[name]
    )
    model = HookedMamba.from_pretrained(saved[name])
    assert isinstance(model, HookedMamba)
    assert model.cfg.original_architecture == type(hf_model).__name__
    assert model.cfg.model_name == str(saved[name])
    assert_close(our_logits(model), hf_logits(hf_model))


@pytest.mark.parametrize("tie, fmt", [(True, "bin"), (False, "bin"), (True, "sharded_bin"), (False, "safetensors")])
def test_load_mamba_ssm_dir_matches_hf_logits(tmp_path, hf_mamba, hf_mamba_untied, tie, fmt):
    """A mamba_ssm directory (vocab_size 50, padded to the 56 rows of the weights) gives the
    logits of the transformers model that holds the same weights."""
    hf_model = hf_mamba if tie else hf_mamba_untied
    sd = transformers_to_mamba_ssm_keys(hf_model.state_dict(), tie=tie)
    raw = mamba_ssm_config(d_model=24, n_layer=2, vocab_size=50, tie_embeddings=tie,
                           ssm_cfg={"d_state": 8, "bias": not tie})
    write_mamba_ssm_checkpoint(tmp_path, sd, raw, fmt=fmt)
    model = HookedMamba.from_pretrained(tmp_path)
    assert model.cfg.d_vocab == 56 and model.cfg.dt_rank == 2 and model.cfg.tie_embeddings is tie
    assert model.cfg.original_architecture == "MambaLMHeadModel"
    assert model.tokenizer is None
    assert_close(our_logits(model), hf_logits(hf_model))


def test_load_dtype_device_and_overrides(saved, hf_mamba):
    model = HookedMamba.from_pretrained(saved["mamba"], dtype=torch.float64, device="cpu", default_prepend_bos=False)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.cfg.dtype == torch.float64 and model.cfg.default_prepend_bos is False
    assert torch.equal(model.W_E, hf_mamba.backbone.embeddings.weight.double())
    assert_close(our_logits(model), hf_logits(hf_mamba))


def test_load_mismatched_weights_name_keys(tmp_path, hf_mamba):
    sd = transformers_to_mamba_ssm_keys(hf_mamba.state_dict(), tie=True)
    raw = mamba_ssm_config(d_model=24, n_layer=2, vocab_size=50, ssm_cfg={"d_state": 16})  # weights have 8
    write_mamba_ssm_checkpoint(tmp_path, sd, raw)
    with pytest.raises(CheckpointMismatchError) as info:
        HookedMamba.from_pretrained(tmp_path)
    message = str(info.value)
    assert "backbone.layers.0.mixer.A_log -> blocks.0.mixer.A_log: expected (48, 16), got (48, 8)" in message
    assert "backbone.layers.1.mixer.x_proj.weight" in message


def test_mamba2_checkpoint_with_mamba1_class(saved, tmp_path, hf_mamba2):
    with pytest.raises(WrongModelClassError, match="Mamba-2 checkpoint.*HookedMamba2.from_pretrained"):
        HookedMamba.from_pretrained(saved["mamba2"])
    sd = transformers_to_mamba_ssm_keys(hf_mamba2.state_dict(), tie=False)
    raw = mamba_ssm_config(d_model=16, n_layer=2, vocab_size=56, tie_embeddings=False,
                           ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2})
    write_mamba_ssm_checkpoint(tmp_path, sd, raw)
    with pytest.raises(WrongModelClassError, match=r"Mamba-2 checkpoint \(mamba_ssm layout\)"):
        HookedMamba.from_pretrained(tmp_path)
    with pytest.raises(WrongModelClassError, match="HookedMamba2"):
        HookedMamba.from_hf(hf_mamba2)


def test_hybrid_and_unsupported_dirs_fail_before_weights(tmp_path):
    raw = mamba_ssm_config(d_model=24, n_layer=2, vocab_size=50, d_intermediate=96)
    (tmp_path / "config.json").write_text(json.dumps(raw))  # no weights needed to refuse
    with pytest.raises(UnsupportedArchitectureError, match="d_intermediate=96"):
        HookedMamba.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "jamba"}))
    with pytest.raises(UnsupportedArchitectureError, match="'jamba' is a hybrid"):
        tl_mamba.from_pretrained(tmp_path)


def test_from_hf_matches_and_copies(hf_mamba, hf_falcon):
    for hf_model in (hf_mamba, hf_falcon):
        model = HookedMamba.from_hf(hf_model)
        assert model.cfg.original_architecture == type(hf_model).__name__
        assert_close(our_logits(model), hf_logits(hf_model))
    model = HookedMamba.from_hf(hf_mamba)
    with torch.no_grad():
        model.W_E.add_(1.0)  # a copy: the transformers model is untouched
    assert not torch.equal(model.W_E, hf_mamba.backbone.embeddings.weight)


def test_from_hf_dtype_follows_model():
    hf64 = tiny_transformers_model("mamba", seed=5).double()
    model = from_hf(HookedMamba, hf64)
    assert model.cfg.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert_close(our_logits(model), hf_logits(hf64))


def test_from_hf_wrong_model_types():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel.*unknown model_type 'gpt2'"):
        HookedMamba.from_hf(gpt2)
    with pytest.raises(TypeError, match="MambaForCausalLM"):
        HookedMamba.from_hf({"backbone.embeddings.weight": torch.zeros(2, 2)})


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_from_transformers_dir(tmp_path, hf_mamba):
    hf_mamba.save_pretrained(tmp_path)
    write_word_tokenizer(tmp_path, ["cat", "sat", "mat"])
    model = HookedMamba.from_pretrained(tmp_path)
    assert model.tokenizer is not None
    assert model.tokenizer("cat sat mat")["input_ids"] == [2, 3, 4]


def test_tokenizer_json_only_in_mamba_ssm_dir(tmp_path, hf_mamba):
    sd = transformers_to_mamba_ssm_keys(hf_mamba.state_dict(), tie=True)
    write_mamba_ssm_checkpoint(tmp_path, sd, mamba_ssm_config(d_model=24, n_layer=2, vocab_size=50,
                                                              ssm_cfg={"d_state": 8}))
    write_word_tokenizer(tmp_path, ["dog", "ran"], with_config=False)
    model = HookedMamba.from_pretrained(tmp_path)
    assert model.tokenizer("dog ran dog")["input_ids"] == [2, 3, 2]
    mine = object()
    assert HookedMamba.from_pretrained(tmp_path, tokenizer=mine).tokenizer is mine


# --------------------------------------------------------------------------- routing and Mamba-2


def test_load_any_and_auto_model_class(saved):
    assert auto_model_class(saved["mamba"]) == "mamba1"
    assert auto_model_class(saved["falcon"]) == "mamba1"
    assert auto_model_class(saved["mamba2"]) == "mamba2"
    assert auto_model_class(saved["mamba"]) == HookedMamba.family
    assert isinstance(load_any(saved["falcon"]), HookedMamba)
    assert isinstance(tl_mamba.from_pretrained(saved["mamba"]), HookedMamba)


class _Holder(nn.Module):
    pass


class DummyMamba2(nn.Module):
    """Stand-in for HookedMamba2 with the parameter names and shapes written out by hand."""

    family = "mamba2"

    def __init__(self, cfg, tokenizer=None):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        d, e, n, g, h, k, v = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.n_groups, cfg.n_heads, cfg.d_conv, cfg.d_vocab
        self.embed = _Holder()
        self.embed.W_E = nn.Parameter(torch.zeros(v, d, dtype=cfg.dtype))
        self.blocks = nn.ModuleList()
        for _ in range(cfg.n_layers):
            block = _Holder()
            block.ln1 = _Holder()
            block.ln1.w = nn.Parameter(torch.zeros(d, dtype=cfg.dtype))
            mixer = block.mixer = _Holder()
            mixer.in_proj = nn.Linear(d, 2 * e + 2 * g * n + h, bias=False, dtype=cfg.dtype)
            mixer.conv1d = nn.Conv1d(e + 2 * g * n, e + 2 * g * n, k, groups=e + 2 * g * n, dtype=cfg.dtype)
            mixer.dt_bias = nn.Parameter(torch.zeros(h, dtype=cfg.dtype))
            mixer.A_log = nn.Parameter(torch.zeros(h, dtype=cfg.dtype))
            mixer.D = nn.Parameter(torch.zeros(h, dtype=cfg.dtype))
            mixer.norm = _Holder()
            mixer.norm.weight = nn.Parameter(torch.zeros(e, dtype=cfg.dtype))
            mixer.out_proj = nn.Linear(e, d, bias=False, dtype=cfg.dtype)
            self.blocks.append(block)
        self.ln_final = _Holder()
        self.ln_final.w = nn.Parameter(torch.zeros(d, dtype=cfg.dtype))
        if not cfg.tie_embeddings:
            self.unembed = _Holder()
            self.unembed.weight = nn.Parameter(torch.zeros(v, d, dtype=cfg.dtype))


def test_mamba2_pipeline_into_hand_written_module(saved, tmp_path, hf_mamba2):
    """Both Mamba-2 layouts load strictly into a module whose shapes are written by hand."""
    sd = hf_mamba2.state_dict()
    names = mamba2_names(2, "backbone.embeddings.weight", untied=True)
    model = load_pretrained(DummyMamba2, saved["mamba2"])
    loaded = model.state_dict()
    for our_key, ckpt_key in names.items():
        assert torch.equal(loaded[our_key], sd[ckpt_key]), our_key
    assert model.cfg.n_groups == 2 and model.cfg.n_heads == 4

    ssm_sd = transformers_to_mamba_ssm_keys(sd, tie=False)
    raw = mamba_ssm_config(d_model=16, n_layer=2, vocab_size=50, tie_embeddings=False,
                           ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "ngroups": 2, "chunk_size": 8})
    write_mamba_ssm_checkpoint(tmp_path, ssm_sd, raw)
    model = load_pretrained(DummyMamba2, tmp_path)
    assert model.cfg.d_vocab == 56
    loaded = model.state_dict()
    for our_key, ckpt_key in mamba2_names(2, "backbone.embedding.weight", untied=True).items():
        assert torch.equal(loaded[our_key], ssm_sd[ckpt_key]), our_key
    with pytest.raises(WrongModelClassError, match="Falcon-Mamba checkpoint.*HookedMamba.from_pretrained"):
        load_pretrained(DummyMamba2, saved["falcon"])


def _hooked_mamba2():
    try:
        from tl_mamba.models.mamba2 import HookedMamba2
    except ImportError:
        return None
    return HookedMamba2


@pytest.mark.skipif(_hooked_mamba2() is None, reason="HookedMamba2 is not implemented yet")
def test_mamba2_loads_and_matches_hf_logits(saved, hf_mamba2):
    HookedMamba2 = _hooked_mamba2()
    model = HookedMamba2.from_pretrained(saved["mamba2"])
    assert_close(our_logits(model), hf_logits(hf_mamba2))
    assert_close(our_logits(HookedMamba2.from_hf(hf_mamba2)), hf_logits(hf_mamba2))
    assert isinstance(tl_mamba.from_pretrained(saved["mamba2"]), HookedMamba2)


@pytest.mark.skipif(_hooked_mamba2() is not None, reason="HookedMamba2 exists; covered by the logits test")
def test_mamba2_without_hooked_mamba2_says_so(saved):
    with pytest.raises(UnsupportedArchitectureError, match="Mamba-2 checkpoint.*HookedMamba2 is not available"):
        tl_mamba.from_pretrained(saved["mamba2"])
    assert auto_model_class(saved["mamba2"]) == "mamba2"


@pytest.mark.parametrize("kind, tie", [("mamba", True), ("mamba", False), ("falcon_mamba", True), ("mamba2", True)])
def test_save_pretrained_transformers_layout_loads_in_transformers(tmp_path, kind, tie):
    """layout='transformers': transformers' own from_pretrained reads the edited weights back (the
    independent reference), and so does tl_mamba. Falcon-Mamba had no layout to save to at all."""
    import transformers

    from checkpoint_writers import tiny_transformers_model

    extra = {"use_bias": True} if not tie else {}
    hf = tiny_transformers_model(kind, tie=tie, seed=5, **extra)
    model = (tl_mamba.HookedMamba2 if kind == "mamba2" else HookedMamba).from_hf(hf)
    with torch.no_grad():
        model.blocks[1].mixer.D.mul_(2.0)  # an edit: the saved weights are no longer hf's
    model.save_pretrained(tmp_path / "out", layout="transformers")
    cls = {"mamba": transformers.MambaForCausalLM, "falcon_mamba": transformers.FalconMambaForCausalLM,
           "mamba2": transformers.Mamba2ForCausalLM}[kind]
    reread = cls.from_pretrained(tmp_path / "out").eval()
    tokens = (torch.arange(11)[None] * 5) % model.cfg.d_vocab
    with torch.no_grad():
        ours = model(tokens)
        torch.testing.assert_close(reread(tokens).logits, ours, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(hf(tokens).logits, ours, atol=1e-3)
        torch.testing.assert_close(tl_mamba.from_pretrained(tmp_path / "out")(tokens), ours, rtol=1e-5, atol=1e-5)
    if kind == "falcon_mamba":
        with pytest.raises(ValueError, match="layout='transformers'"):
            model.save_pretrained(tmp_path / "ssm")
    with pytest.raises(ValueError, match="layout must be"):
        model.save_pretrained(tmp_path / "x", layout="gguf")
