"""Write a model as a checkpoint directory, which the loader reads back.

    model.save_pretrained("my-model")          # mamba_ssm layout: config.json, pytorch_model.bin,
                                               # generation_config.json, tokenizer
    tl_mamba.from_pretrained("my-model")       # the same model
    model.save_pretrained("my-model-hf", layout="transformers")   # transformers' from_pretrained reads it too

The mamba_ssm layout is what mamba_ssm's ``MambaLMHeadModel.from_pretrained`` loads:
``MambaConfig(**config.json)`` (so config.json holds the fields of that dataclass only:
:data:`MAMBA_SSM_CONFIG_FIELDS`, and ``ssm_cfg`` the arguments of its ``Mamba`` / ``Mamba2``
mixers) and ``torch.load("pytorch_model.bin")`` into a strict ``load_state_dict`` (so it holds
``lm_head.weight`` even when tied, as mamba_ssm's own ``save_pretrained`` writes it). mamba_ssm
pads ``vocab_size`` up to a multiple of ``pad_vocab_size_multiple``: that is 8 when ``d_vocab``
is a multiple of 8, else 1, so mamba_ssm builds exactly ``d_vocab`` rows. The weights are
written once (``pytorch_model.bin`` only, as mamba_ssm writes them: a second copy in
``model.safetensors`` would double a large model's folder); tl_mamba reads the file with
``torch.load(weights_only=True)``.

What mamba_ssm's config cannot hold:

* token ids: written to ``generation_config.json`` (as transformers does; mamba_ssm ignores
  the file), from which the loader reads them back;
* the RMSNorm epsilon: mamba_ssm always uses 1e-5, so a model with another ``eps`` is
  refused (a ``ValueError`` suggesting ``layout="transformers"``, whose
  ``layer_norm_epsilon`` keeps it) rather than saved as a checkpoint mamba_ssm would run
  differently;
* Falcon-Mamba's norms on dt, B and C: refused likewise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from safetensors.torch import save_file

from tl_mamba.loading.convert import checkpoint_name
from tl_mamba.loading.files import (BIN_FILE, BIN_INDEX, GENERATION_CONFIG_FILE, MISTRAL_PARAMS_FILE,
                                     MISTRAL_WEIGHTS_FILE, SAFETENSORS_FILE, SAFETENSORS_INDEX, TOKEN_ID_KEYS)
from tl_mamba.loading.layouts import MAMBA_SSM_NORM_EPS

#: the fields of mamba_ssm's ``MambaConfig`` dataclass (mamba_ssm/models/config_mamba.py), the
#: only keys its ``MambaLMHeadModel.from_pretrained`` accepts in config.json
MAMBA_SSM_CONFIG_FIELDS = (
    "d_model", "d_intermediate", "n_layer", "vocab_size", "ssm_cfg", "attn_layer_idx", "attn_cfg", "rms_norm",
    "residual_in_fp32", "fused_add_norm", "pad_vocab_size_multiple", "tie_embeddings",
)


def mamba_ssm_config(cfg) -> dict:
    """The mamba_ssm ``config.json`` of a ``HookedMambaConfig`` (see the module docstring).

    Raises ``ValueError`` for what mamba_ssm cannot express: Falcon-Mamba, an ``eps`` other
    than 1e-5, a ``d_inner`` that is not a multiple of ``d_model``."""
    ssm_cfg = {"layer": "Mamba1" if cfg.family == "mamba1" else "Mamba2", "d_state": cfg.d_state,
               "d_conv": cfg.d_conv, "expand": cfg.d_inner // cfg.d_model if cfg.d_inner % cfg.d_model == 0 else None,
               "conv_bias": cfg.conv_bias, "bias": cfg.proj_bias,
               "dt_min": cfg.dt_min, "dt_max": cfg.dt_max, "dt_init_floor": cfg.dt_init_floor}
    if ssm_cfg["expand"] is None:
        raise ValueError(f"d_inner {cfg.d_inner} is not a multiple of d_model {cfg.d_model}: mamba_ssm cannot express it")
    if cfg.family == "mamba1":
        if cfg.bcdt_rms_eps is not None:
            raise ValueError("Falcon-Mamba (norms on dt, B, C) has no mamba_ssm layout; "
                             "save it with layout='transformers'")
        ssm_cfg["dt_rank"] = cfg.dt_rank
    else:
        ssm_cfg.update(headdim=cfg.d_head, ngroups=cfg.n_groups, chunk_size=cfg.checkpoint_chunk_size or cfg.chunk_size)
        if tuple(cfg.dt_limit) != (0.0, float("inf")):  # mamba_ssm's default otherwise; json writes inf as Infinity
            ssm_cfg["dt_limit"] = [float(v) for v in cfg.dt_limit]
    if cfg.eps != MAMBA_SSM_NORM_EPS:
        raise ValueError(f"this model's RMSNorm eps is {cfg.eps}, but mamba_ssm always uses {MAMBA_SSM_NORM_EPS} and its "
                         "config has no field for it; save it with layout='transformers' (layer_norm_epsilon), "
                         "which tl_mamba and transformers both read")
    return {"d_model": cfg.d_model, "d_intermediate": 0, "n_layer": cfg.n_layers, "vocab_size": cfg.d_vocab,
            "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
            "residual_in_fp32": cfg.residual_in_fp32, "fused_add_norm": True,
            # mamba_ssm pads vocab_size up to this multiple: keep it at exactly d_vocab rows
            "pad_vocab_size_multiple": 8 if cfg.d_vocab % 8 == 0 else 1,
            "tie_embeddings": cfg.tie_embeddings}


def generation_config(cfg) -> dict:
    """``generation_config.json``: the token ids, ``null`` for an unset one (mamba_ssm's config
    has no place for them; transformers writes this file beside its config.json too)."""
    return {key: getattr(cfg, key, None) for key in TOKEN_ID_KEYS}


def _remove_other_weights(out: Path) -> None:
    """Delete the weight files of an earlier checkpoint in ``out``: its shard indexes, the shards they
    list, ``pytorch_model.bin``, ``model.safetensors`` and Mistral's ``consolidated.safetensors``
    with its ``params.json``. The loader reads an index or ``model.safetensors`` before
    ``pytorch_model.bin``, so a stale one would load the old weights in place of the saved ones
    (transformers cleans up too); a ``params.json`` left beside the new config.json would describe
    the old model to anyone reading the folder."""

    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = out / index_name
        if not index.is_file():
            continue
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (json.JSONDecodeError, AttributeError):
            shards = set()
        for shard in shards:
            shard_path = out / shard
            if shard_path.parent == out and shard_path.is_file():  # only files of this directory
                shard_path.unlink()
        index.unlink()
    for name in (BIN_FILE, SAFETENSORS_FILE, MISTRAL_WEIGHTS_FILE, MISTRAL_PARAMS_FILE):
        if (out / name).is_file():
            (out / name).unlink()


#: files a tokenizer's ``save_pretrained`` writes (transformers' fast and slow tokenizers, and the
#: Mistral tokenizer files the loader reads in Mistral's native layout)
TOKENIZER_FILE_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "chat_template.jinja", "chat_template.json",
    "tekken.json", "tokenizer.model.v3", "tokenizer.model.v2", "tokenizer.model.v1",
)


def _tokenizer_files(out: Path) -> dict:
    """The tokenizer files in ``out``, each with what tells a rewritten file from an old one."""
    found = {}
    for name in TOKENIZER_FILE_NAMES:
        file = out / name
        if file.is_file():
            stat = file.stat()
            found[file] = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
    return found


def _save_tokenizer(tokenizer, out: Path) -> None:
    """Save ``tokenizer`` (if any) in ``out`` and delete the tokenizer files of an earlier checkpoint
    there that it did not write. The loader reads whatever tokenizer files it finds, so a model saved
    without a tokenizer over an old checkpoint would otherwise come back with the old one."""
    before = _tokenizer_files(out)
    written = set()
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        returned = tokenizer.save_pretrained(str(out))
        if isinstance(returned, (list, tuple)):
            written = {Path(f).resolve() for f in returned if isinstance(f, (str, Path))}
    after = _tokenizer_files(out)
    for file, stamp in before.items():
        if file.resolve() not in written and after.get(file) == stamp:  # neither named nor rewritten by this save
            file.unlink()


def transformers_config(cfg) -> dict:
    """The transformers ``config.json`` of a ``HookedMambaConfig``: ``MambaForCausalLM``,
    ``FalconMambaForCausalLM`` (Mamba-1 with norms on dt, B and C) or ``Mamba2ForCausalLM``."""
    if cfg.d_inner % cfg.d_model:
        raise ValueError(f"d_inner {cfg.d_inner} is not a multiple of d_model {cfg.d_model}: transformers derives "
                         "d_inner from expand * hidden_size, so it cannot express it")
    common = {"hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "vocab_size": cfg.d_vocab,
              "state_size": cfg.d_state, "expand": cfg.d_inner // cfg.d_model, "conv_kernel": cfg.d_conv,
              "use_bias": cfg.proj_bias, "use_conv_bias": cfg.conv_bias, "layer_norm_epsilon": cfg.eps,
              "residual_in_fp32": cfg.residual_in_fp32, "tie_word_embeddings": cfg.tie_embeddings,
              "time_step_min": cfg.dt_min, "time_step_max": cfg.dt_max, "time_step_floor": cfg.dt_init_floor,
              "hidden_act": "silu", "torch_dtype": str(cfg.dtype).removeprefix("torch.")}
    for key in TOKEN_ID_KEYS:  # null for an unset id: left out, transformers would read its default
        common[key] = getattr(cfg, key, None)
    if cfg.family == "mamba2":
        lo, hi = cfg.dt_limit
        return dict(common, model_type="mamba2", architectures=["Mamba2ForCausalLM"], num_heads=cfg.n_heads,
                    head_dim=cfg.d_head, n_groups=cfg.n_groups, chunk_size=cfg.checkpoint_chunk_size or cfg.chunk_size,
                    time_step_limit=[lo, hi], rms_norm=True)  # json writes inf as Infinity, which both read
    common.update(intermediate_size=cfg.d_inner, time_step_rank=cfg.dt_rank)
    if cfg.bcdt_rms_eps is not None:
        return dict(common, model_type="falcon_mamba", architectures=["FalconMambaForCausalLM"],
                    mixer_rms_eps=cfg.bcdt_rms_eps)
    return dict(common, model_type="mamba", architectures=["MambaForCausalLM"])


LAYOUT_WRITERS = {
    "mamba_ssm": (mamba_ssm_config, lambda name: checkpoint_name(name, "mamba_ssm")),
    "transformers": (transformers_config, lambda name: checkpoint_name(name, "transformers")),
}


def save_pretrained(model, path: Union[str, Path], layout: str = "mamba_ssm") -> Path:
    """Write ``config.json``, the weights, ``generation_config.json`` (token ids) and the
    tokenizer (if any) to ``path``.

    ``layout``: ``"mamba_ssm"`` (the ``state-spaces`` repos' layout, which mamba_ssm's
    ``MambaLMHeadModel.from_pretrained`` loads: ``pytorch_model.bin``; not for Falcon-Mamba,
    nor for an ``eps`` other than 1e-5: see the
    module docstring) or ``"transformers"`` (``model.safetensors``; loadable by transformers'
    ``from_pretrained`` too: ``Mamba``, ``FalconMamba`` or ``Mamba2ForCausalLM``). Either loads
    back with ``tl_mamba.from_pretrained``, bit-exactly.
    Weight files of an earlier checkpoint in ``path`` (shard indexes and their shards,
    ``pytorch_model.bin``, ``model.safetensors``, Mistral's ``consolidated.safetensors`` and ``params.json``)
    are deleted, so that loading ``path``
    gives the saved weights; so are its tokenizer files that this save does not rewrite (all of
    them when the model has no tokenizer), so that loading ``path`` gives the saved tokenizer or none.
    """
    if layout not in LAYOUT_WRITERS:
        raise ValueError(f"layout must be one of {tuple(LAYOUT_WRITERS)}, got {layout!r}")
    write_config, key = LAYOUT_WRITERS[layout]
    # everything that can fail comes before the folder is touched: the layout may not express
    # the model, or the model may carry parameters no checkpoint name maps (an added probe, say)
    config = write_config(model.cfg)
    state = {key(k): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    _remove_other_weights(out)
    if layout == "mamba_ssm":
        # mamba_ssm loads this file, strictly: its state dict has lm_head.weight even when tied
        # (the embedding tensor itself; torch.save stores it once)
        if model.cfg.tie_embeddings:
            state["lm_head.weight"] = state["backbone.embedding.weight"]
        torch.save(state, out / BIN_FILE)
    else:
        save_file(state, str(out / SAFETENSORS_FILE))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / GENERATION_CONFIG_FILE).write_text(json.dumps(generation_config(model.cfg), indent=2))
    _save_tokenizer(model.tokenizer, out)
    return out
