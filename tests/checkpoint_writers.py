"""Write tiny checkpoints in the exact on-disk layouts tl_mamba reads (test helpers).

The package itself only reads checkpoints; these writers produce the inputs:

* transformers layout: ``save_pretrained`` of a tiny random transformers model.
* mamba_ssm layout (``state-spaces/mamba-130m`` style): ``config.json`` with
  ``d_model, n_layer, vocab_size, ssm_cfg, ...`` and ``pytorch_model.bin`` whose keys
  are ``backbone.embedding.weight`` (singular), ``backbone.layers.{i}...``,
  ``backbone.norm_f.weight``, ``lm_head.weight``. Written by hand here, as mamba_ssm's
  own ``save_pretrained`` does: ``json.dump(config)`` + ``torch.save(state_dict)``.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Dict, Iterable, Mapping, Optional

import torch

# --------------------------------------------------------------------------- models


def perturb_(model: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter so that no two tensors are alike (a swapped or
    misrouted tensor then changes the output). Norm weights stay near 1, A_log near its init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype))
    return model


def tiny_transformers_model(kind: str, *, tie: Optional[bool] = None, seed: int = 0, **overrides):
    """A tiny random ``MambaForCausalLM`` / ``FalconMambaForCausalLM`` / ``Mamba2ForCausalLM``.

    ``kind``: ``"mamba"``, ``"falcon_mamba"`` or ``"mamba2"``. Defaults: vocab 56
    (a multiple of 8), d_model 24 (so dt_rank "auto" = 2), 2 layers, d_state 8.
    Mamba-2: d_model 16, expand 2 -> d_inner 32 = 4 heads x 8, 2 groups, chunk 8.
    """
    import transformers

    torch.manual_seed(seed)
    kw: dict = dict(vocab_size=56, num_hidden_layers=2, state_size=8)
    if kind == "mamba":
        kw.update(hidden_size=24)
        config_cls, model_cls = transformers.MambaConfig, transformers.MambaForCausalLM
    elif kind == "falcon_mamba":
        kw.update(hidden_size=24, mixer_rms_eps=1e-3)
        config_cls, model_cls = transformers.FalconMambaConfig, transformers.FalconMambaForCausalLM
    elif kind == "mamba2":
        kw.update(hidden_size=16, expand=2, num_heads=4, head_dim=8, n_groups=2, chunk_size=8)
        config_cls, model_cls = transformers.Mamba2Config, transformers.Mamba2ForCausalLM
    else:
        raise ValueError(kind)
    if tie is not None:
        kw["tie_word_embeddings"] = tie
    kw.update(overrides)
    model = model_cls(config_cls(**kw)).eval()
    return perturb_(model, seed=seed)


# --------------------------------------------------------------------------- files


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor], directory: pathlib.Path, fmt: str = "bin", n_shards: int = 3
) -> None:
    """Write weights as ``pytorch_model.bin``, ``model.safetensors``, or sharded with an index.

    ``fmt``: ``"bin"``, ``"safetensors"``, ``"sharded_bin"`` or ``"sharded_safetensors"``.
    Sharded files follow the transformers naming (``model-00001-of-00003.safetensors``,
    ``pytorch_model-00001-of-00003.bin``) with ``{"metadata": ..., "weight_map": {key: file}}``.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        torch.save(dict(state_dict), directory / "pytorch_model.bin")
        return
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(_unshared(state_dict), str(directory / "model.safetensors"))
        return
    keys = list(state_dict)
    per_shard = math.ceil(len(keys) / n_shards)
    weight_map: Dict[str, str] = {}
    for i in range(n_shards):
        chunk = {k: state_dict[k] for k in keys[i * per_shard : (i + 1) * per_shard]}
        if fmt == "sharded_bin":
            name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
            torch.save(chunk, directory / name)
            index = "pytorch_model.bin.index.json"
        elif fmt == "sharded_safetensors":
            from safetensors.torch import save_file

            name = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
            save_file(_unshared(chunk), str(directory / name))
            index = "model.safetensors.index.json"
        else:
            raise ValueError(fmt)
        weight_map.update({k: name for k in chunk})
    (directory / index).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _unshared(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    # safetensors refuses tensors that share memory (tied weights)
    return {k: v.detach().clone().contiguous() for k, v in state_dict.items()}


def mamba_ssm_config(
    *,
    d_model: int,
    n_layer: int,
    vocab_size: int,
    ssm_cfg: Optional[dict] = None,
    pad_vocab_size_multiple: int = 8,
    tie_embeddings: Optional[bool] = True,
    **extra,
) -> dict:
    """A config.json dict as mamba_ssm's ``MambaConfig`` dataclass writes it.

    ``tie_embeddings=None`` leaves the key out, like the oldest state-spaces configs.
    """
    cfg = {
        "d_model": d_model,
        "d_intermediate": 0,
        "n_layer": n_layer,
        "vocab_size": vocab_size,
        "ssm_cfg": dict(ssm_cfg or {}),
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": pad_vocab_size_multiple,
    }
    if tie_embeddings is not None:
        cfg["tie_embeddings"] = tie_embeddings
    cfg.update(extra)
    return cfg


def transformers_to_mamba_ssm_keys(state_dict: Mapping[str, torch.Tensor], *, tie: bool) -> Dict[str, torch.Tensor]:
    """Rename a transformers Mamba state dict to mamba_ssm's names.

    Only the embedding differs (``backbone.embeddings`` -> ``backbone.embedding``).
    mamba_ssm's ``torch.save(model.state_dict())`` stores ``lm_head.weight`` even when
    tied (then it is the embedding tensor itself), so it is kept in both cases.
    """
    out: Dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "backbone.embeddings.weight":
            key = "backbone.embedding.weight"
        out[key] = value.detach().clone()
    if tie:
        out["lm_head.weight"] = out["backbone.embedding.weight"]
    return out


def write_mamba_ssm_checkpoint(
    directory: pathlib.Path,
    state_dict: Mapping[str, torch.Tensor],
    config: dict,
    fmt: str = "bin",
) -> pathlib.Path:
    """Write ``config.json`` + weights in the mamba_ssm layout into ``directory``."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_state_dict(state_dict, directory, fmt)
    return directory


def write_word_tokenizer(directory: pathlib.Path, words: Iterable[str], *, with_config: bool = True) -> None:
    """A WordLevel tokenizer built offline with ``tokenizers``: ``tokenizer.json``, plus
    ``tokenizer_config.json`` naming ``PreTrainedTokenizerFast`` when ``with_config``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<unk>": 1}
    for word in words:
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    directory = pathlib.Path(directory)
    tok.save(str(directory / "tokenizer.json"))
    if with_config:
        (directory / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": "<|endoftext|>",
                    "eos_token": "<|endoftext|>",
                    "unk_token": "<unk>",
                }
            )
        )


def write_mistral_native_checkpoint(
    directory: pathlib.Path,
    transformers_state_dict: Mapping[str, torch.Tensor],
    params: dict,
    *,
    tokenizer_file: Optional[str] = "tokenizer.model.v3",
) -> pathlib.Path:
    """Mistral's native layout, as ``mistralai/Mamba-Codestral-7B-v0.1``'s model card downloads
    it: ``params.json`` (mistral_inference ``MambaArgs``), ``consolidated.safetensors`` and a
    tokenizer file. mistral_inference's ``Mamba`` keeps mamba_ssm's ``MambaLMHeadModel`` as
    ``self.model``, so the weights are mamba_ssm's names under ``model.``: renamed here from a
    transformers Mamba-2 state dict (``backbone.embeddings`` -> ``backbone.embedding``).
    The tokenizer file is a placeholder (its bytes are not a real Mistral tokenizer)."""
    from safetensors.torch import save_file

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.json").write_text(json.dumps(params, indent=4))
    weights = {}
    for key, value in transformers_state_dict.items():
        if key == "lm_head.weight" and params.get("tie_embeddings", True):
            continue  # tied: one tensor (safetensors stores no shared tensors)
        weights["model." + key.replace("backbone.embeddings.", "backbone.embedding.")] = value
    save_file(_unshared(weights), str(directory / "consolidated.safetensors"))
    if tokenizer_file is not None:
        (directory / tokenizer_file).write_bytes(b"\x00placeholder")
    return directory
