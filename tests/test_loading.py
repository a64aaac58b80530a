"""Checkpoint loading: layouts, config translation, strict conversion, hub resolution.

Everything is offline. Checkpoints are written here in the exact layouts tl_mamba
reads: transformers ``save_pretrained`` directories of tiny random models, and
hand-written mamba_ssm directories (config.json + pytorch_model.bin). References are
independent of the code under test: the transformers models themselves (logits and
tensors), and name tables written out literally below.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from torch import nn

import tl_mamba
from tl_mamba import HookedMamba, HookedMambaConfig
from tl_mamba.loading import (
    CheckpointConfigError,
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
    perturb_,
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


def offline_hub_cache(monkeypatch, tmp_path, saved):
    """A hub cache written by hand under ``tmp_path`` (HF_HOME), offline, holding ``acme/tiny-mamba``
    at one commit that ``main`` points to; returns that snapshot's folder."""
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
    return snapshot


def test_resolve_cached_hub_id_offline(monkeypatch, tmp_path, saved, hf_mamba):
    """A hub id present in the cache loads offline (hub cache layout written by hand)."""
    snapshot = offline_hub_cache(monkeypatch, tmp_path, saved)
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
    with pytest.warns(UserWarning, match="embedding of 50 rows but its weights have 56: d_vocab is 56"):
        cfg = config_from_checkpoint(raw, "transformers", "mamba1", state_dict=sd)
    assert cfg.d_vocab == 56 and cfg.d_vocab_out == 56 and cfg.extra["config_d_vocab"] == 50
    # under a wrapper prefix the conversion strips (DDP's module., torch.compile's _orig_mod.) too
    for prefix in ("module.", "_orig_mod."):
        with pytest.warns(UserWarning, match="embedding of 50 rows but its weights have 56: d_vocab is 56"):
            wrapped = config_from_checkpoint(raw, "transformers", "mamba1", state_dict={prefix + k: v for k, v in sd.items()})
        assert wrapped.d_vocab == 56
    # mamba_ssm's layout pads vocab_size: 50 -> 56 agrees with the rows (no warning); 40 -> 40 does not
    sd_ssm = {"backbone.embedding.weight": sd["backbone.embeddings.weight"]}
    raw_ssm = mamba_ssm_config(d_model=24, n_layer=2, vocab_size=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_checkpoint(raw_ssm, "mamba_ssm", "mamba1", state_dict=sd_ssm).d_vocab == 56
    with pytest.warns(UserWarning, match=r"40 rows \(vocab_size 40 padded to a multiple of 8\) but its weights have 56"):
        config_from_checkpoint(dict(raw_ssm, vocab_size=40), "mamba_ssm", "mamba1", state_dict=sd_ssm)


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
    assert (folder / "notes.txt").read_text() == "keep me"
    # the mamba_ssm layout writes pytorch_model.bin (mamba_ssm reads it): the saved weights, not the stale bytes
    written = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert torch.equal(written["backbone.layers.0.mixer.D"], model.blocks[0].mixer.D)
    reloaded = tl_mamba.from_pretrained(folder)
    tokens = torch.arange(8)[None] % model.cfg.d_vocab
    torch.testing.assert_close(reloaded(tokens), model(tokens))
    # switching layouts in one folder: the transformers save's model.safetensors (read before a
    # .bin) goes when the mamba_ssm layout is written over it
    model.save_pretrained(folder, layout="transformers")
    with torch.no_grad():
        model.blocks[0].mixer.D.mul_(2.0)
    model.save_pretrained(folder)
    assert not (folder / "model.safetensors").exists()
    assert torch.equal(tl_mamba.from_pretrained(folder).blocks[0].mixer.D, model.blocks[0].mixer.D)
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
    assert "consolidated.safetensors" in str(info.value)  # Mistral's native weights are looked for too
    with pytest.raises(FileNotFoundError, match="no weight files.*README.md"):
        HookedMamba.from_pretrained(tmp_path)
    assert "cache snapshot" not in str(info.value)
    # a hub cache snapshot that holds only the config: the message says the weights were never fetched
    snapshot = tmp_path / "hub" / "models--acme--partial" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((tmp_path / "config.json").read_text())
    with pytest.raises(CheckpointFilesError, match="Hugging Face cache snapshot: the weights were never downloaded"):
        load_state_dict_files(snapshot)
    own = tmp_path / "snapshots" / "my_finetune"  # a folder of one's own that happens to sit in "snapshots"
    own.mkdir(parents=True)
    (own / "config.json").write_text((tmp_path / "config.json").read_text())
    with pytest.raises(CheckpointFilesError) as info:
        load_state_dict_files(own)
    assert "cache snapshot" not in str(info.value)


def test_load_state_dict_files_missing_shard(tmp_path, hf_mamba):
    save_state_dict(hf_mamba.state_dict(), tmp_path, "sharded_safetensors")
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointFilesError, match="model-00002-of-00003.safetensors"):
        load_state_dict_files(tmp_path)


@pytest.mark.parametrize("fmt, victim", [
    ("safetensors", "model.safetensors"),
    ("bin", "pytorch_model.bin"),
    ("sharded_safetensors", "model.safetensors.index.json"),
    ("sharded_safetensors", "model-00002-of-00003.safetensors"),
    ("sharded_bin", "pytorch_model-00001-of-00003.bin"),
])
def test_load_state_dict_files_truncated_file_is_named(tmp_path, hf_mamba, fmt, victim):
    """A weight file cut short (an interrupted download): the error names the file, where the
    libraries' own say "incomplete metadata" or "[Errno 22] Invalid argument" with no file."""
    save_state_dict(hf_mamba.state_dict(), tmp_path, fmt)
    file = tmp_path / victim
    assert file.is_file(), sorted(p.name for p in tmp_path.iterdir())
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(CheckpointFilesError, match="truncated or corrupt") as info:
        load_state_dict_files(tmp_path)
    assert str(file) in str(info.value)


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
    # (from_hf, the contract's one entry for in-memory models, gives the model's class instead:
    # test_from_hf_on_either_class_builds_the_family_of_the_model)


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


def _no_random_init(monkeypatch):
    """Make every random initialisation a loader could run fail the test (torch's own modules
    call theirs on construction; on the meta device it touches no memory and is allowed)."""
    from tl_mamba.models.base import HookedSSM

    def refuse(module, *args, **kwargs):
        if any(p.device.type != "meta" for p in module.parameters()):
            raise AssertionError(f"a loader ran a random initialisation of a {type(module).__name__}")

    monkeypatch.setattr(HookedSSM, "reset_parameters", refuse)
    monkeypatch.setattr(nn.Linear, "reset_parameters", refuse)
    monkeypatch.setattr(nn.Conv1d, "reset_parameters", refuse)


def _storages(module):
    return {t.untyped_storage().data_ptr() for t in module.state_dict().values()}


def test_loading_puts_the_weights_in_place_without_a_random_init(monkeypatch, saved, hf_mamba, hf_mamba2):
    # The model is built on the meta device and given the checkpoint's tensors: no random init
    # (minutes for a 7B model), no second copy. Every tensor ends up real, on the asked device,
    # in the asked dtype, and the logits are transformers'.
    from tl_mamba import HookedMamba2

    _no_random_init(monkeypatch)
    for cls, name, hf_model in ((HookedMamba, "mamba", hf_mamba), (HookedMamba2, "mamba2", hf_mamba2)):
        for model in (cls.from_pretrained(saved[name], device="cpu"), cls.from_hf(hf_model),
                      cls.from_pretrained(saved[name], dtype=torch.float64)):
            tensors = list(model.state_dict().values())
            assert tensors and all(t.device.type == "cpu" for t in tensors)
            assert all(t.dtype == model.cfg.dtype for t in tensors)
            assert model.cfg.device == "cpu" and not model.training
            assert all(p.requires_grad and isinstance(p, nn.Parameter) for p in model.parameters())
            assert_close(our_logits(model), hf_logits(hf_model))
        # from_hf's tensors are the model's own: no storage is shared with the transformers model
        assert not _storages(cls.from_hf(hf_model)) & _storages(hf_model)


def test_loaded_weights_are_the_models_own(tmp_path, saved, hf_mamba):
    # safetensors maps the file: a write into it in place afterwards (cp over it) must not reach a
    # loaded model's weights; an in-place edit of a parameter must not reach the file; saving
    # over the folder the model came from reloads what was saved
    import shutil

    folder = tmp_path / "mamba"
    shutil.copytree(saved["mamba"], folder)
    model = HookedMamba.from_pretrained(folder)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    weights = folder / "model.safetensors"
    header = 8 + int.from_bytes(weights.read_bytes()[:8], "little")  # the tensors' bytes follow it
    with open(weights, "r+b") as f:
        f.seek(header)
        f.write(bytes(weights.stat().st_size - header))
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    assert all(p.is_contiguous() for p in model.parameters())
    shutil.copytree(saved["mamba"], folder, dirs_exist_ok=True)
    model = HookedMamba.from_pretrained(folder)
    with torch.no_grad():
        model.W_E.mul_(2.0)
    edited = model.W_E.clone()
    assert torch.equal(HookedMamba.from_pretrained(folder).W_E, hf_mamba.backbone.embeddings.weight)
    model.save_pretrained(folder, layout="transformers")
    assert torch.equal(model.W_E, edited)
    assert torch.equal(HookedMamba.from_pretrained(folder).W_E, edited)


def test_tied_bin_checkpoint_loaded_untied_has_two_weights(tmp_path, hf_mamba):
    # mamba_ssm's pytorch_model.bin stores lm_head.weight as the embedding tensor itself; loaded with
    # tie_embeddings=False the two are separate parameters, each with memory of its own
    model = HookedMamba.from_hf(hf_mamba)
    model.save_pretrained(tmp_path, layout="mamba_ssm")
    untied = HookedMamba.from_pretrained(tmp_path, tie_embeddings=False)
    embed, unembed = untied.embed.W_E, untied.unembed.weight
    assert torch.equal(embed, unembed)
    assert embed.untyped_storage().data_ptr() != unembed.untyped_storage().data_ptr()
    with torch.no_grad():
        embed.mul_(2.0)
    assert torch.equal(unembed, hf_mamba.backbone.embeddings.weight)
    untied.save_pretrained(tmp_path / "untied", layout="transformers")  # safetensors refuses shared tensors
    assert_close(our_logits(HookedMamba.from_pretrained(tmp_path / "untied")), our_logits(untied), atol=0)


def _own_bytes(model):
    """Whether every parameter's storage holds exactly that parameter (shares nothing, keeps nothing else alive)."""
    return all(p.untyped_storage().nbytes() == p.numel() * p.element_size() for p in model.parameters())


def test_bin_checkpoints_of_views_load_as_separate_contiguous_weights(tmp_path, hf_mamba):
    # a .bin whose tensors are transposed views, or views into one flat buffer of every weight
    # (torch.nn.utils.vector_to_parameters, flat-buffer trainers), loads into contiguous parameters
    # each with memory of its own; so does one read while torch's global load setting says mmap
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    sd = hf_mamba.state_dict()
    transposed = {k: v.T.contiguous().T if v.dim() == 2 else v for k, v in sd.items()}
    flat = hf_mamba.__class__(hf_mamba.config)
    vector_to_parameters(parameters_to_vector(hf_mamba.parameters()).clone(), flat.parameters())
    expected = our_logits(HookedMamba.from_hf(hf_mamba))
    for name, state in (("transposed", transposed), ("flat", flat.state_dict())):
        folder = tmp_path / name
        hf_mamba.config.save_pretrained(folder)
        torch.save(state, folder / "pytorch_model.bin")
        model = HookedMamba.from_pretrained(folder)
        assert all(p.is_contiguous() for p in model.parameters()), name
        assert _own_bytes(model), name
        assert_close(our_logits(model), expected, atol=0)
    config = torch.utils.serialization.config.load
    mmap = config.mmap
    try:
        config.mmap = True
        model = HookedMamba.from_pretrained(tmp_path / "transposed")
    finally:
        config.mmap = mmap
    before = model.W_E.clone()
    torch.save({k: torch.zeros_like(v) for k, v in sd.items()}, tmp_path / "transposed" / "pytorch_model.bin")
    assert torch.equal(model.W_E, before)


def test_model_name_override(hf_mamba, saved):
    assert tl_mamba.from_pretrained("toy-mamba", model_name="mine").cfg.model_name == "mine"
    assert tl_mamba.from_pretrained("toy-mamba").cfg.model_name == "toy-mamba"
    assert HookedMamba.from_pretrained(saved["mamba"], model_name="mine").cfg.model_name == "mine"
    assert HookedMamba.from_hf(hf_mamba, model_name="mine").cfg.model_name == "mine"
    assert tl_mamba.from_hf(hf_mamba, model_name="mine").cfg.model_name == "mine"


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
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tokenizer.json alone is this layout's normal case: nothing lost
        model = HookedMamba.from_pretrained(tmp_path)
    assert model.tokenizer("dog ran dog")["input_ids"] == [2, 3, 2]
    mine = object()
    assert HookedMamba.from_pretrained(tmp_path, tokenizer=mine).tokenizer is mine
    # a tokenizer.json cut short: the error names it (the tokenizers library's says only "EOF while
    # parsing"), and a tokenizer passed in means the file is never read
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer_file.write_text(tokenizer_file.read_text()[:40])
    with pytest.raises(CheckpointFilesError, match="truncated or corrupt.*tokenizer=") as info:
        HookedMamba.from_pretrained(tmp_path)
    assert str(tokenizer_file) in str(info.value)
    assert HookedMamba.from_pretrained(tmp_path, tokenizer=mine).tokenizer is mine


def test_tokenizer_config_that_autotokenizer_cannot_apply_warns(tmp_path, hf_mamba):
    hf_mamba.save_pretrained(tmp_path)
    write_word_tokenizer(tmp_path, ["cat", "sat"])
    config = tmp_path / "tokenizer_config.json"
    config.write_text(config.read_text()[:30])  # cut short: AutoTokenizer fails, tokenizer.json is fine
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    with pytest.warns(UserWarning, match=r"AutoTokenizer could not load.*read tokenizer.json alone instead, with "
                                         r"the special tokens \(bos_token\).*padding side"):
        model = HookedMamba.from_pretrained(tmp_path)
    assert model.tokenizer("cat sat")["input_ids"] == [2, 3]
    assert model.tokenizer.bos_token == "<|endoftext|>"


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


def test_mamba2_loads_and_matches_hf_logits(saved, hf_mamba2):
    from tl_mamba.models.mamba2 import HookedMamba2

    model = HookedMamba2.from_pretrained(saved["mamba2"])
    assert_close(our_logits(model), hf_logits(hf_mamba2))
    assert_close(our_logits(HookedMamba2.from_hf(hf_mamba2)), hf_logits(hf_mamba2))
    assert isinstance(tl_mamba.from_pretrained(saved["mamba2"]), HookedMamba2)
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


# --------------------------------------------------------------------------- config defaults and required fields


def _dir_with(tmp_path, name, config, state_dict):
    """A checkpoint directory holding exactly this config.json and these weights."""
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_state_dict(state_dict, folder, "safetensors")
    return folder


@pytest.mark.parametrize("config", [
    # Mamba-2: n_groups (8), num_heads (128), chunk_size, time_step_limit, ids (0/2/1), tie (False) ... left out
    {"model_type": "mamba2", "hidden_size": 64, "num_hidden_layers": 2, "vocab_size": 48, "head_dim": 1,
     "state_size": 4},
    # Mamba-1 and Falcon-Mamba: state_size (16), tie (True), time_step_rank, ids, mixer_rms_eps ... left out
    {"model_type": "mamba", "hidden_size": 24, "num_hidden_layers": 2, "vocab_size": 48},
    {"model_type": "falcon_mamba", "hidden_size": 24, "num_hidden_layers": 2, "vocab_size": 48},
    # transformers' Mamba-1 reads intermediate_size when the config has it (not expand * hidden_size)
    {"model_type": "mamba", "hidden_size": 24, "num_hidden_layers": 2, "vocab_size": 48, "intermediate_size": 72},
])
def test_minimal_transformers_config_loads_as_transformers_loads_it(tmp_path, config):
    """Fields a config.json leaves out take transformers' defaults: the reference is transformers'
    own from_pretrained of the same directory (its config and its logits)."""
    import transformers

    kind = config["model_type"]
    config_cls = {"mamba": transformers.MambaConfig, "falcon_mamba": transformers.FalconMambaConfig,
                  "mamba2": transformers.Mamba2Config}[kind]
    source = transformers.AutoModelForCausalLM.from_config(config_cls(**{k: v for k, v in config.items()
                                                                         if k != "model_type"}))
    folder = _dir_with(tmp_path, kind, config, perturb_(source.eval(), seed=9).state_dict())
    ref = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    rc = ref.config
    model = tl_mamba.from_pretrained(folder)
    cfg = model.cfg
    assert (cfg.d_model, cfg.n_layers, cfg.d_vocab, cfg.d_state, cfg.d_conv) == (
        rc.hidden_size, rc.num_hidden_layers, rc.vocab_size, rc.state_size, rc.conv_kernel)
    assert (cfg.eps, cfg.tie_embeddings, cfg.residual_in_fp32) == (
        rc.layer_norm_epsilon, rc.tie_word_embeddings, rc.residual_in_fp32)
    assert (cfg.conv_bias, cfg.proj_bias, cfg.initializer_range) == (rc.use_conv_bias, rc.use_bias,
                                                                     rc.initializer_range)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (rc.bos_token_id, rc.eos_token_id,
                                                                      rc.pad_token_id)
    if kind == "mamba2":
        assert (cfg.n_groups, cfg.n_heads, cfg.d_head) == (rc.n_groups, rc.num_heads, rc.head_dim) == (8, 128, 1)
        assert cfg.checkpoint_chunk_size == rc.chunk_size and cfg.dt_limit == tuple(rc.time_step_limit)
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (0, 2, 1)
    else:
        assert (cfg.d_inner, cfg.dt_rank) == (rc.intermediate_size, rc.time_step_rank)
        assert cfg.bcdt_rms_eps == getattr(rc, "mixer_rms_eps", None)
    assert_close(our_logits(model, TOKENS % 48), hf_logits(ref, TOKENS % 48))


def test_mamba2_config_without_num_heads_is_refused_as_transformers_refuses_it(tmp_path, hf_mamba2):
    import transformers

    raw = {k: v for k, v in hf_mamba2.config.to_dict().items() if k != "num_heads"}  # 128 heads x 8 != 32
    folder = _dir_with(tmp_path, "m2", raw, hf_mamba2.state_dict())
    with pytest.raises(Exception, match="num_heads"):
        transformers.AutoModelForCausalLM.from_pretrained(folder)
    with pytest.raises(UnsupportedArchitectureError, match=r"num_heads \* head_dim = 1024 \(num_heads=128"):
        tl_mamba.from_pretrained(folder)


def test_missing_required_config_field_fails_before_the_weights(tmp_path, hf_mamba, hf_mamba2):
    """A config.json without a size field raises an error naming the file, the field and the layout;
    the config is read in full before the weights (a broken weight file here is never opened)."""
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file: never read")
    full = hf_mamba.config.to_dict()
    for field in ("hidden_size", "num_hidden_layers", "vocab_size"):
        (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in full.items() if k != field}))
        with pytest.raises(CheckpointConfigError,
                           match=rf"config.json lacks the required field '{field}'.*transformers layout"):
            tl_mamba.from_pretrained(tmp_path)
    ssm = mamba_ssm_config(d_model=24, n_layer=2, vocab_size=50)
    for field in ("d_model", "n_layer", "vocab_size"):
        (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in ssm.items() if k != field}))
        with pytest.raises(CheckpointConfigError, match=rf"config.json lacks the required field '{field}'.*mamba_ssm"):
            HookedMamba.from_pretrained(tmp_path)
    # values our config refuses fail before the weights as well
    # (as a CheckpointConfigError naming the file: the checkpoint's value, not the caller's)
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_mamba2.config.to_dict(), n_groups=3)))
    with pytest.raises(CheckpointConfigError, match=r"config.json \(transformers layout, mamba2\) holds a value "
                                                    r"tl_mamba cannot use: n_heads \(4\) must be divisible by n_groups \(3\)"):
        tl_mamba.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(ssm, n_layer="two")))
    with pytest.raises(CheckpointConfigError, match=r"config.json \(mamba_ssm layout, mamba1\) holds a value"):
        tl_mamba.from_pretrained(tmp_path)
    with pytest.raises(CheckpointConfigError, match="'vocab_size'"):
        config_from_checkpoint({k: v for k, v in full.items() if k != "vocab_size"}, "transformers", "mamba1")


# --------------------------------------------------------------------------- save_pretrained: mamba_ssm layout

#: mamba_ssm/models/config_mamba.py: the fields of its MambaConfig dataclass, which
#: MambaLMHeadModel.from_pretrained fills with MambaConfig(**config.json)
MAMBA_SSM_CONFIG_FIELDS = {"d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx",
                           "attn_cfg", "rms_norm", "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple",
                           "tie_embeddings"}
#: the arguments of mamba_ssm's Mamba (modules/mamba_simple.py) and Mamba2 (modules/mamba2.py), which
#: receive ssm_cfg (less its "layer" key, which picks the class)
MAMBA_SSM_MIXER_ARGS = {
    "Mamba1": {"d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor",
               "conv_bias", "bias", "use_fast_path"},
    "Mamba2": {"d_state", "d_conv", "conv_init", "expand", "headdim", "d_ssm", "ngroups", "A_init_range",
               "D_has_hdim", "rmsnorm", "norm_before_gate", "dt_min", "dt_max", "dt_init_floor", "dt_limit", "bias",
               "conv_bias", "chunk_size", "use_mem_eff_path"},
}


def _transformers_from_mamba_ssm_dir(folder):
    """What mamba_ssm's MambaLMHeadModel.from_pretrained builds from a directory, as a transformers
    model: config.json -> MambaConfig / Mamba2Config (vocab padded as mamba_ssm pads it), and
    torch.load("pytorch_model.bin") into a strict load_state_dict (names renamed here)."""
    import transformers

    raw = json.loads((folder / "config.json").read_text())
    assert set(raw) <= MAMBA_SSM_CONFIG_FIELDS, set(raw) - MAMBA_SSM_CONFIG_FIELDS
    ssm = dict(raw["ssm_cfg"])
    layer = ssm.pop("layer", "Mamba1")
    assert set(ssm) <= MAMBA_SSM_MIXER_ARGS[layer], set(ssm) - MAMBA_SSM_MIXER_ARGS[layer]
    multiple = raw.get("pad_vocab_size_multiple", 8)
    vocab = math.ceil(raw["vocab_size"] / multiple) * multiple
    common = dict(hidden_size=raw["d_model"], num_hidden_layers=raw["n_layer"], vocab_size=vocab,
                  state_size=ssm.get("d_state", 16 if layer == "Mamba1" else 128), expand=ssm.get("expand", 2),
                  conv_kernel=ssm.get("d_conv", 4), use_bias=ssm.get("bias", False),
                  use_conv_bias=ssm.get("conv_bias", True), layer_norm_epsilon=1e-5,
                  residual_in_fp32=raw.get("residual_in_fp32", True),
                  tie_word_embeddings=raw.get("tie_embeddings", True))
    if layer == "Mamba1":
        hf = transformers.MambaForCausalLM(transformers.MambaConfig(**common, time_step_rank=ssm.get("dt_rank", "auto")))
    else:
        headdim = ssm.get("headdim", 64)
        limit = tuple(ssm.get("dt_limit", (0.0, float("inf"))))
        hf = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            **common, head_dim=headdim, num_heads=common["expand"] * raw["d_model"] // headdim,
            n_groups=ssm.get("ngroups", 1), chunk_size=ssm.get("chunk_size", 256), time_step_limit=limit))
    weights = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert weights["backbone.embedding.weight"].shape[0] == vocab  # mamba_ssm's padding gives the stored rows
    assert "lm_head.weight" in weights  # mamba_ssm's strict load_state_dict needs it, tied or not
    if raw.get("tie_embeddings", True):
        assert torch.equal(weights["lm_head.weight"], weights["backbone.embedding.weight"])
    renamed = {k.replace("backbone.embedding.", "backbone.embeddings."): v for k, v in weights.items()}
    hf.load_state_dict(renamed, strict=True)
    return hf.eval(), weights


@pytest.mark.parametrize("kind, tie", [("mamba", True), ("mamba", False), ("mamba2", True), ("mamba2", False)])
def test_save_mamba_ssm_layout_is_what_mamba_ssm_loads(tmp_path, kind, tie):
    """config.json holds mamba_ssm's fields only, pytorch_model.bin its names; a vocabulary of 50
    (no multiple of 8) is not re-padded; the edited weights come back from both readers, and
    bit-exactly with the token ids (which mamba_ssm's config cannot hold) from tl_mamba's."""
    extra = {"use_bias": True} if not tie else {}
    if kind == "mamba2":
        extra["time_step_limit"] = (0.01, 0.5)
    hf = tiny_transformers_model(kind, tie=tie, seed=6, vocab_size=50, **extra)
    model = (tl_mamba.HookedMamba2 if kind == "mamba2" else HookedMamba).from_hf(hf)
    with torch.no_grad():
        model.blocks[1].mixer.D.mul_(2.0)
    model.cfg.bos_token_id, model.cfg.eos_token_id, model.cfg.pad_token_id = 1, 2, None
    out = model.save_pretrained(tmp_path / "ssm")
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "pytorch_model.bin", "generation_config.json"} <= written
    assert "model.safetensors" not in written  # the weights once, as mamba_ssm writes them
    reread, weights = _transformers_from_mamba_ssm_dir(out)
    biases = ("in_proj.bias", "out_proj.bias") if not tie else ()
    if kind == "mamba2":
        names = set(mamba2_names(2, "backbone.embedding.weight", untied=True).values())
        names |= {f"backbone.layers.{layer}.mixer.{b}" for layer in range(2) for b in biases}
    else:
        names = set(mamba1_names(2, "backbone.embedding.weight", untied=True, biases=("conv1d.bias",) + biases).values())
    assert set(weights) == names
    tokens = TOKENS % 50
    ours = our_logits(model, tokens)
    torch.testing.assert_close(hf_logits(reread, tokens), ours, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hf_logits(hf, tokens), ours, atol=1e-3)  # the edit was saved
    back = tl_mamba.from_pretrained(out)
    assert torch.equal(our_logits(back, tokens), ours)
    assert (back.cfg.bos_token_id, back.cfg.eos_token_id, back.cfg.pad_token_id) == (1, 2, None)
    assert back.cfg.d_vocab == 50 and back.cfg.dt_limit == model.cfg.dt_limit


@pytest.mark.parametrize("layout", ["mamba_ssm", "transformers"])
def test_save_keeps_token_ids(tmp_path, layout):
    """Codestral's bos/eos/pad 1/2/0 survive a save without a tokenizer (they came back 0/0/0)."""
    cfg = HookedMambaConfig(n_layers=1, d_model=16, d_vocab=32, seed=0, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0)
    HookedMamba(cfg).save_pretrained(tmp_path, layout=layout)
    assert json.loads((tmp_path / "generation_config.json").read_text()) == {
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    back = tl_mamba.from_pretrained(tmp_path).cfg
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, 2, 0)
    if layout == "mamba_ssm":  # the ids' only source there: a broken file warns, the model still loads
        (tmp_path / "generation_config.json").write_text('{"bos_token_id": 1, "eos')
        with pytest.warns(UserWarning, match=r"generation_config.json.*token ids it holds \(bos, eos, pad\) are not read"):
            back = tl_mamba.from_pretrained(tmp_path).cfg
        assert back.eos_token_id != 2


def test_save_mamba_ssm_layout_refuses_an_eps_it_cannot_hold(tmp_path):
    """mamba_ssm always uses eps 1e-5: another eps is refused (the folder untouched), and the
    transformers layout keeps it (transformers reads it back as layer_norm_epsilon)."""
    import transformers

    model = HookedMamba(HookedMambaConfig(n_layers=1, d_model=16, d_vocab=32, eps=1e-3, seed=0)).eval()
    with pytest.raises(ValueError, match=r"eps is 0.001.*layout='transformers'"):
        model.save_pretrained(tmp_path / "ssm")
    assert not (tmp_path / "ssm").exists()
    model.save_pretrained(tmp_path / "hf", layout="transformers")
    assert transformers.AutoConfig.from_pretrained(tmp_path / "hf").layer_norm_epsilon == 1e-3
    back = tl_mamba.from_pretrained(tmp_path / "hf")
    assert back.cfg.eps == 1e-3
    tokens = TOKENS % 32
    assert torch.equal(our_logits(back, tokens), our_logits(model, tokens))


def test_old_tl_mamba_config_with_norm_epsilon_still_loads(tmp_path, hf_mamba):
    """Configs that tl_mamba wrote before held a norm_epsilon field: still read."""
    sd = transformers_to_mamba_ssm_keys(hf_mamba.state_dict(), tie=True)
    raw = mamba_ssm_config(d_model=24, n_layer=2, vocab_size=56, ssm_cfg={"d_state": 8}, norm_epsilon=1e-3)
    write_mamba_ssm_checkpoint(tmp_path, sd, raw)
    assert HookedMamba.from_pretrained(tmp_path).cfg.eps == 1e-3


# --------------------------------------------------------------------------- from_hf arguments, messages


def test_from_hf_takes_device_dtype_and_overrides(hf_mamba, hf_mamba2):
    model = HookedMamba.from_hf(hf_mamba, dtype=torch.float64, device="cpu", default_prepend_bos=False)
    assert model.cfg.dtype == torch.float64 and all(p.dtype == torch.float64 for p in model.parameters())
    assert model.cfg.default_prepend_bos is False and str(model.cfg.device) == "cpu"
    assert_close(our_logits(model), hf_logits(hf_mamba))
    model2 = tl_mamba.HookedMamba2.from_hf(hf_mamba2, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model2.parameters())
    with pytest.raises(TypeError, match="not_a_field"):
        HookedMamba.from_hf(hf_mamba, not_a_field=1)


def test_from_hf_on_either_class_builds_the_family_of_the_model(hf_mamba, hf_mamba2):
    """The contract's ``HookedMamba.from_hf(hf_model)`` takes any in-memory model: a Mamba-2 one gives a
    HookedMamba2 (and the other way round), with the transformers model's logits; the loading
    function itself, given a class, still refuses the wrong family, naming the right one."""
    for cls, hf_model, want in ((HookedMamba, hf_mamba2, tl_mamba.HookedMamba2),
                                (tl_mamba.HookedMamba2, hf_mamba, HookedMamba)):
        model = cls.from_hf(hf_model, dtype=torch.float64)
        assert type(model) is want and model.cfg.dtype == torch.float64
        assert_close(our_logits(model), hf_logits(hf_model))
    with pytest.raises(WrongModelClassError, match=r"use HookedMamba2\.from_hf"):
        from_hf(HookedMamba, hf_mamba2)


def test_tl_mamba_from_hf_picks_the_class(hf_mamba, hf_falcon, hf_mamba2):
    """tl_mamba.from_hf, as tl_mamba.from_pretrained: the class from the model's config, the logits
    of the transformers model; keywords reach the class's from_hf; what is not a Mamba model is refused."""
    for hf_model, cls in ((hf_mamba, HookedMamba), (hf_falcon, HookedMamba), (hf_mamba2, tl_mamba.HookedMamba2)):
        model = tl_mamba.from_hf(hf_model)
        assert type(model) is cls
        assert_close(our_logits(model), hf_logits(hf_model))
    assert tl_mamba.from_hf(hf_mamba2, dtype=torch.float64).cfg.dtype == torch.float64
    with pytest.raises(TypeError, match="MambaForCausalLM"):
        tl_mamba.from_hf(nn.Linear(2, 2))


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_a_config_dict_takes_the_family_of_its_class(family):
    """``HookedMamba2({...})`` builds a Mamba-2 model from the contract's field names with no
    ``family`` key (the class says it); a HookedMambaConfig of the other family is refused, naming
    the family= to give."""
    cls = HookedMamba if family == "mamba1" else tl_mamba.HookedMamba2
    fields = dict(n_layers=2, d_model=32, d_vocab=50, d_state=8)
    if family == "mamba2":
        fields.update(d_head=16, n_groups=2)
    model = cls(fields)
    assert model.cfg.family == family
    if family == "mamba2":
        assert (model.cfg.n_heads, model.cfg.d_head, model.cfg.n_groups) == (4, 16, 2)
    assert model(TOKENS[:, :5] % 50).shape == (2, 5, 50)
    other = "mamba2" if family == "mamba1" else "mamba1"
    cfg = HookedMambaConfig(n_layers=2, d_model=32, d_vocab=50, **({"family": "mamba2"} if other == "mamba2" else {}))
    with pytest.raises(ValueError, match=f"config is for {other}.*family='{family}'"):
        cls(cfg)


@pytest.mark.parametrize("kind", ["mamba", "falcon_mamba", "mamba2"])
def test_a_transformers_config_builds_the_model_it_describes(kind):
    """``HookedMamba(MambaConfig(...))``: a random model of the config's shape; with a transformers
    model's weights copied in, it computes that model's logits (the config was read as transformers
    reads it: eps, Falcon-Mamba's norms, groups, ...)."""
    hf_model = tiny_transformers_model(kind, seed=7)
    cls = tl_mamba.HookedMamba2 if kind == "mamba2" else HookedMamba
    model = cls(hf_model.config)
    weights = cls.from_hf(hf_model).state_dict()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in weights.items()}
    model.load_state_dict(weights)
    assert_close(our_logits(model), hf_logits(hf_model))
    wrong = HookedMamba if kind == "mamba2" else tl_mamba.HookedMamba2
    with pytest.raises(WrongModelClassError, match=rf"use {cls.__name__}\(cfg\)"):
        wrong(hf_model.config)


def test_a_config_of_another_kind_is_refused_naming_what_is_accepted():
    import transformers

    for bad in (42, nn.Linear(2, 2)):
        with pytest.raises(TypeError, match="HookedMambaConfig, a dict of its fields, or a transformers MambaConfig"):
            HookedMamba(bad)
    with pytest.raises(UnsupportedArchitectureError, match="GPT2Config.*unknown model_type 'gpt2'"):
        HookedMamba(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))


@pytest.mark.parametrize("prefix", ["model.", "module.", "_orig_mod.model."])
def test_state_dict_under_a_wrapper_prefix_loads(tmp_path, hf_mamba_untied, prefix):
    hf_mamba_untied.save_pretrained(tmp_path)
    sd = {prefix + k: v for k, v in hf_mamba_untied.state_dict().items()}
    save_state_dict(sd, tmp_path, "safetensors")
    assert_close(our_logits(HookedMamba.from_pretrained(tmp_path)), hf_logits(hf_mamba_untied))


def test_partly_prefixed_state_dict_says_which_prefix(hf_mamba):
    sd = {"model." + k: v for k, v in hf_mamba.state_dict().items() if k != "lm_head.weight"}
    sd["backbone.norm_f.weight"] = sd.pop("model.backbone.norm_f.weight")  # one key without it
    cfg = config_from_checkpoint(hf_mamba.config.to_dict(), "transformers", "mamba1")
    with pytest.raises(CheckpointMismatchError, match=r"prefix 'model\.'.*1 key\(s\) here do not"):
        convert_state_dict(sd, cfg, "transformers", "mamba1")
    # a backbone saved on its own (no "backbone."), wrapped: loads
    bare = {"model." + k[len("backbone."):]: v for k, v in hf_mamba.state_dict().items() if k.startswith("backbone.")}
    ours = convert_state_dict(bare, cfg, "transformers", "mamba1")
    assert torch.equal(ours["blocks.1.mixer.A_log"], hf_mamba.backbone.layers[1].mixer.A_log)


def test_unexpected_keys_listed_alike(hf_mamba):
    """A 1-layer config with 2-layer weights: every layer-1 key is unexpected, all listed the same
    way (checkpoint names only; the norm key used to carry an '(-> blocks.1.ln1.w)' suffix)."""
    raw = dict(hf_mamba.config.to_dict(), num_hidden_layers=1)
    cfg = config_from_checkpoint(raw, "transformers", "mamba1")
    with pytest.raises(CheckpointMismatchError) as info:
        convert_state_dict(hf_mamba.state_dict(), cfg, "transformers", "mamba1")
    layer1 = [k for k in hf_mamba.state_dict() if k.startswith("backbone.layers.1.")]
    assert sorted(info.value.unexpected) == sorted(layer1) and len(layer1) == 10
    assert "(->" not in str(info.value)


def test_offline_uncached_revision_is_named(monkeypatch, tmp_path, saved):
    snapshot = offline_hub_cache(monkeypatch, tmp_path, saved)
    assert resolve_checkpoint("acme/tiny-mamba", revision="main") == snapshot
    with pytest.raises(CheckpointNotFoundError, match=r"revision 'v2' of it is not in the local cache"):
        resolve_checkpoint("acme/tiny-mamba", revision="v2")


def test_unusable_device_fails_before_anything_is_read(saved, hf_mamba):
    bad = f"cuda:{torch.cuda.device_count()}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ValueError, match=rf"device='{bad}' cannot be used"):
        tl_mamba.from_pretrained("/no/such/checkpoint", device=bad)  # not a CheckpointNotFoundError
    with pytest.raises(ValueError, match=rf"device='{bad}' cannot be used"):
        HookedMamba.from_pretrained(saved["mamba"], device=bad)
    with pytest.raises(ValueError, match=rf"device='{bad}' cannot be used"):
        HookedMamba.from_hf(hf_mamba, device=bad)
    with pytest.raises(ValueError, match="'gpu0' is not a torch device"):
        HookedMamba.from_pretrained(saved["mamba"], device="gpu0")


def test_transformers_layout_keeps_a_finite_dt_limit(tmp_path):
    """A Mamba-2 model whose Δ clamp bites (dt_limit = (0.05, 0.2)) saved with
    layout="transformers": transformers' Mamba2ForCausalLM (the reference) reads the folder and
    gives the saved model's logits, and so does tl_mamba.from_pretrained."""
    import transformers

    from tl_mamba import HookedMamba2

    cfg = HookedMambaConfig(family="mamba2", n_layers=2, d_model=16, d_vocab=40, d_state=4, d_conv=4, expand=2,
                            n_heads=4, n_groups=2, chunk_size=4, seed=0, dt_limit=(0.05, 0.2))
    model = HookedMamba2(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:  # Δ = softplus(dt + bias) spread well outside [0.05, 0.2]
            block.mixer.dt_bias.copy_(torch.linspace(-4.0, 1.0, cfg.n_heads))
    tokens = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
    path = model.save_pretrained(tmp_path / "hf", layout="transformers")
    assert tuple(transformers.AutoConfig.from_pretrained(path).time_step_limit) == (0.05, 0.2)
    hf = transformers.Mamba2ForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        theirs = hf(tokens).logits
        back = tl_mamba.from_pretrained(str(path))(tokens)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(back, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", ["torch_dtype", "dtype"])
@pytest.mark.parametrize("name", ["float16", "bfloat16"])
def test_auto_dtype_follows_the_config_as_transformers_does(tmp_path, key, name):
    """from_pretrained(dtype="auto") takes the dtype config.json states (``torch_dtype``, or
    ``dtype`` as transformers 5 writes it) over the weights' own float32, as transformers'
    ``dtype="auto"`` does on the same folder (the reference)."""
    import transformers

    model = HookedMamba(HookedMambaConfig(n_layers=2, d_model=16, d_vocab=40, d_state=4, d_conv=3, seed=0))
    model.save_pretrained(tmp_path, layout="transformers")  # float32 weights
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    config[key] = name
    (tmp_path / "config.json").write_text(json.dumps(config))
    hf = transformers.MambaForCausalLM.from_pretrained(str(tmp_path), dtype="auto")
    assert hf.dtype == getattr(torch, name)
    loaded = tl_mamba.from_pretrained(str(tmp_path), dtype="auto")
    assert loaded.cfg.dtype == hf.dtype and loaded.W_E.dtype == hf.dtype


def _write_sharded(folder, drop=None, extra=None):
    """A transformers-layout checkpoint split by hand (safetensors itself) into two shards plus
    model.safetensors.index.json; ``drop``: a tensor the index lists but no shard holds;
    ``extra``: a tensor name the index lists that never existed. Returns the full state dict."""
    from safetensors.torch import load_file, save_file

    model = HookedMamba(HookedMambaConfig(n_layers=2, d_model=16, d_vocab=40, d_state=4, d_conv=3, seed=0))
    model.save_pretrained(folder, layout="transformers")
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys if k != drop}, str(folder / shard))
        weight_map.update({k: shard for k in keys})
    if extra is not None:
        weight_map[extra] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return state


def test_sharded_index_and_shards_must_agree(tmp_path):
    """An index listing a tensor no shard holds (a replaced shard, a truncated download), or one
    that never existed, is refused by name; a consistent one loads every tensor."""
    state = _write_sharded(tmp_path / "ok")
    loaded = load_state_dict_files(tmp_path / "ok")
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], v) for k, v in state.items())
    _write_sharded(tmp_path / "dropped", drop="backbone.layers.1.mixer.D")
    with pytest.raises(CheckpointFilesError, match=r"backbone\.layers\.1\.mixer\.D"):
        load_state_dict_files(tmp_path / "dropped")
    with pytest.raises(CheckpointFilesError, match="index"):
        tl_mamba.from_pretrained(str(tmp_path / "dropped"))
    _write_sharded(tmp_path / "extra", extra="backbone.layers.0.mixer.extra_probe")
    with pytest.raises(CheckpointFilesError, match="extra_probe"):
        load_state_dict_files(tmp_path / "extra")


@pytest.mark.parametrize("kwargs, says", [
    (dict(fold_ln=True), r"fold_ln: weights load as they are; W_U .* carry the final RMSNorm's weight"),
    (dict(center_unembed=True, torch_dtype=torch.float16), r"center_unembed: W_U is not centred.*torch_dtype: the "
                                                           r"keyword is dtype="),
    (dict(first_n_layers=1), "stop_at_layer="),
])
def test_transformer_lens_loading_options_say_what_holds_instead(kwargs, says):
    """HookedTransformer.from_pretrained's processing options are refused (nothing is processed), by a
    message that says what this loader does instead; other unknown fields are named alone."""
    with pytest.raises(TypeError, match=f"unknown HookedMambaConfig field.*{says}"):
        tl_mamba.from_pretrained("toy-mamba2", **kwargs)
    with pytest.raises(TypeError, match=r"in overrides: nonsense$"):
        tl_mamba.from_pretrained("toy-mamba", nonsense=1)
