"""Read what a checkpoint directory holds: config.json, weight files, tokenizer."""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import Any, Dict, Optional, Union

import torch

from .errors import CheckpointFilesError
from .errors import _join

PathLike = Union[str, os.PathLike]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _listing(path: pathlib.Path) -> str:
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError:
        return "(directory cannot be listed)"
    return _join(names, limit=30) if names else "(empty directory)"


def read_checkpoint_config(path: PathLike) -> Dict[str, Any]:
    """Return the parsed ``config.json`` of the checkpoint directory ``path``.

    Both the mamba_ssm layout (``d_model``, ``n_layer``, ``ssm_cfg``...) and the
    transformers layout (``model_type``, ``hidden_size``...) keep it under that name.
    ``Infinity`` in the JSON (transformers writes ``time_step_limit`` that way) parses
    to ``float("inf")``.
    """
    path = pathlib.Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointFilesError(f"no config.json in checkpoint directory {path}; it holds: {_listing(path)}")
    with open(config_file, encoding="utf-8") as fh:
        try:
            raw = json.load(fh)
        except json.JSONDecodeError as err:
            raise CheckpointFilesError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise CheckpointFilesError(f"{config_file} does not hold a JSON object")
    return raw


def _load_safetensors(file: pathlib.Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(file), device="cpu")


def _load_bin(file: pathlib.Path) -> Dict[str, torch.Tensor]:
    obj = torch.load(str(file), map_location="cpu", weights_only=True)
    # A few trainers wrap the state dict; mamba_ssm and transformers do not.
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and len(obj) <= 3:
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointFilesError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def _load_sharded(path: pathlib.Path, index_name: str, loader) -> Dict[str, torch.Tensor]:
    index_file = path / index_name
    with open(index_file, encoding="utf-8") as fh:
        weight_map = json.load(fh).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointFilesError(f"{index_file} has no 'weight_map'")
    shards = sorted(set(weight_map.values()))
    absent = [s for s in shards if not (path / s).is_file()]
    if absent:
        raise CheckpointFilesError(
            f"{index_file} names shard files that are not in {path}: {_join(absent)}; "
            f"the directory holds: {_listing(path)}"
        )
    state_dict: Dict[str, torch.Tensor] = {}
    for shard in shards:
        for key, tensor in loader(path / shard).items():
            if key in state_dict:
                raise CheckpointFilesError(f"tensor {key!r} appears in more than one shard of {path}")
            state_dict[key] = tensor
    not_found = [k for k in weight_map if k not in state_dict]
    if not_found:
        raise CheckpointFilesError(
            f"{index_file} lists tensors that its shards do not hold: {_join(not_found)}"
        )
    return state_dict


def load_state_dict_files(path: PathLike) -> Dict[str, torch.Tensor]:
    """Load every tensor of the checkpoint directory ``path`` onto the CPU.

    Looked for, in this order (the first one present is used):
    ``model.safetensors.index.json`` (sharded safetensors), ``model.safetensors``,
    ``pytorch_model.bin.index.json`` (sharded ``.bin``), ``pytorch_model.bin``.
    ``.bin`` files are read with ``torch.load(weights_only=True)``, so they cannot run
    code. Keys and dtypes are returned exactly as stored.
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointFilesError(f"checkpoint directory {path} does not exist")
    if (path / SAFETENSORS_INDEX).is_file():
        return _load_sharded(path, SAFETENSORS_INDEX, _load_safetensors)
    if (path / SAFETENSORS_FILE).is_file():
        return _load_safetensors(path / SAFETENSORS_FILE)
    if (path / BIN_INDEX).is_file():
        return _load_sharded(path, BIN_INDEX, _load_bin)
    if (path / BIN_FILE).is_file():
        return _load_bin(path / BIN_FILE)
    raise CheckpointFilesError(
        f"no weight files in checkpoint directory {path}: expected one of {SAFETENSORS_FILE}, "
        f"{SAFETENSORS_INDEX} (+ shards), {BIN_FILE}, {BIN_INDEX} (+ shards); "
        f"the directory holds: {_listing(path)}"
    )


def has_tokenizer_files(path: PathLike) -> bool:
    path = pathlib.Path(path)
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(path: PathLike) -> Optional[Any]:
    """Load the tokenizer saved in the checkpoint directory, or return ``None``.

    Tries ``transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)``
    first. mamba_ssm directories have no ``model_type`` for AutoTokenizer to go on, so
    when that fails and a ``tokenizer.json`` exists, it is wrapped in a
    ``PreTrainedTokenizerFast`` (special tokens from ``tokenizer_config.json`` /
    ``special_tokens_map.json`` when present). With no tokenizer files at all the
    state-spaces checkpoints expect ``EleutherAI/gpt-neox-20b``'s tokenizer: pass it
    as ``tokenizer=``.
    """
    path = pathlib.Path(path)
    if not has_tokenizer_files(path):
        return None
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as auto_err:  # noqa: BLE001 - any failure falls back below
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            warnings.warn(
                f"could not load the tokenizer in {path} ({type(auto_err).__name__}: {auto_err}); "
                f"the model has no tokenizer, pass one with tokenizer=",
                stacklevel=3,
            )
            return None
        special: Dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            file = path / name
            if file.is_file():
                try:
                    data = json.loads(file.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError):
                    continue
                for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
                    value = data.get(key)
                    if isinstance(value, dict):
                        value = value.get("content")
                    if isinstance(value, str) and key not in special:
                        special[key] = value
        return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **special)
