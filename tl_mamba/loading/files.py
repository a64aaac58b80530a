"""Read what a checkpoint directory holds: config, weight files, tokenizer.

Which files are read (the first present wins; see ``layouts.py`` for the layouts):

* config: ``config.json`` (mamba_ssm or transformers layout), else Mistral's native
  ``params.json``;
* weights: ``model.safetensors.index.json`` (+ shards), ``model.safetensors``,
  ``pytorch_model.bin.index.json`` (+ shards), ``pytorch_model.bin``, else Mistral's
  ``consolidated.safetensors``;
* tokenizer: transformers' tokenizer files, else a Mistral tokenizer file
  (``tekken.json``, ``tokenizer.model.v3`` ...), which needs the mistral_common package.

So a directory holding both the transformers files and Mistral's native ones (the
Codestral hub repo) loads from the transformers files, and one with config.json but only
``consolidated.safetensors`` for weights reads those.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings
from typing import Any, Dict, Optional, Union

import torch

from ..errors import caller_stacklevel
from .errors import CheckpointFilesError
from .errors import _join

PathLike = Union[str, os.PathLike]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Mistral's native layout (mistral_inference)
MISTRAL_PARAMS_FILE = "params.json"
MISTRAL_WEIGHTS_FILE = "consolidated.safetensors"
MISTRAL_TOKENIZER_FILES = ("tekken.json", "tokenizer.model.v3", "tokenizer.model.v2", "tokenizer.model.v1")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _listing(path: pathlib.Path) -> str:
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError:
        return "(directory cannot be listed)"
    return _join(names, limit=30) if names else "(empty directory)"


def _read_json_object(file: pathlib.Path) -> Dict[str, Any]:
    with open(file, encoding="utf-8") as fh:
        try:
            raw = json.load(fh)
        except json.JSONDecodeError as err:
            raise CheckpointFilesError(
                f"{file} is not valid JSON: {err}. The file is probably truncated or corrupt (an interrupted "
                "download or copy: fetch it again), or was edited by hand"
            ) from err
    if not isinstance(raw, dict):
        raise CheckpointFilesError(f"{file} does not hold a JSON object")
    return raw


def checkpoint_config_file(path: PathLike) -> Optional[pathlib.Path]:
    """The config file :func:`read_checkpoint_config` reads in ``path``: ``config.json``,
    else Mistral's ``params.json``; None when there is neither."""
    path = pathlib.Path(path)
    for name in (CONFIG_FILE, MISTRAL_PARAMS_FILE):
        if (path / name).is_file():
            return path / name
    return None


def read_checkpoint_config(path: PathLike) -> Dict[str, Any]:
    """Return the parsed config of the checkpoint directory ``path``.

    ``config.json`` holds it in both the mamba_ssm layout (``d_model``, ``n_layer``,
    ``ssm_cfg``...) and the transformers layout (``model_type``, ``hidden_size``...).
    ``Infinity`` in the JSON (transformers writes ``time_step_limit`` that way) parses
    to ``float("inf")``. mamba_ssm's config has no place for token ids: when a mamba_ssm
    config.json lacks ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``, they are taken
    from ``generation_config.json`` if the directory has one (tl_mamba's ``save_pretrained``
    writes them there).

    Without config.json, Mistral's native ``params.json`` (``mistralai/Mamba-Codestral-7B-v0.1``)
    is read and translated into the mamba_ssm config mistral_inference builds from it
    (:func:`~tl_mamba.loading.layouts.mamba_ssm_config_from_mistral_params`).
    """
    from .layouts import mamba_ssm_config_from_mistral_params

    path = pathlib.Path(path)
    config_file = checkpoint_config_file(path)
    if config_file is None:
        raise CheckpointFilesError(
            f"no config.json in checkpoint directory {path} (nor Mistral's {MISTRAL_PARAMS_FILE}); "
            f"it holds: {_listing(path)}"
        )
    raw = _read_json_object(config_file)
    if config_file.name == MISTRAL_PARAMS_FILE:
        return mamba_ssm_config_from_mistral_params(raw, source=str(config_file))
    generation_file = path / GENERATION_CONFIG_FILE
    if "model_type" not in raw and generation_file.is_file():
        try:
            generation = _read_json_object(generation_file)
        except CheckpointFilesError as err:  # it only supplies token ids: not worth refusing the model
            warnings.warn(f"{err}; the token ids it holds (bos, eos, pad) are not read, the layout's defaults "
                          "stand in", stacklevel=2)
            generation = {}
        for key in TOKEN_ID_KEYS:
            if key not in raw and key in generation:
                raw[key] = generation[key]
    return raw


def _unreadable(file: pathlib.Path, err: Exception, what: str) -> CheckpointFilesError:
    """The error for a weight or tokenizer file that exists but cannot be parsed: the
    library's own message rarely names the file (``OSError: [Errno 22]`` for a cut-off
    ``.bin``), so this one does, and says the usual cause."""
    return CheckpointFilesError(
        f"could not read {file} as {what} ({type(err).__name__}: {err}); the file is probably truncated or "
        "corrupt (an interrupted download or copy): fetch it again"
    )


def _load_safetensors(file: pathlib.Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors raises its own SafetensorError, OSError, ...
        raise _unreadable(file, err, "a safetensors file") from err


def _load_bin(file: pathlib.Path) -> Dict[str, torch.Tensor]:
    try:
        # mmap=False whatever torch.utils.serialization.config says: the tensors are read into memory of
        # their own, which the model may then keep (weights_are_mapped)
        obj = torch.load(str(file), map_location="cpu", weights_only=True, mmap=False)
    except Exception as err:  # noqa: BLE001 - torch.load raises OSError, RuntimeError, UnpicklingError ...
        raise _unreadable(file, err, "a PyTorch checkpoint (torch.load with weights_only=True)") from err
    # A few trainers wrap the state dict; mamba_ssm and transformers do not.
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict) and len(obj) <= 3:
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointFilesError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    return dict(obj)


def _load_sharded(path: pathlib.Path, index_name: str, loader) -> Dict[str, torch.Tensor]:
    index_file = path / index_name
    weight_map = _read_json_object(index_file).get("weight_map")
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


def _weights_source(path: pathlib.Path):
    """``(file name, reader)`` of the weights :func:`load_state_dict_files` reads in ``path``:
    the first present of sharded safetensors, ``model.safetensors``, sharded ``.bin``,
    ``pytorch_model.bin``, Mistral's ``consolidated.safetensors``; None when there is none."""
    for name, read in (
        (SAFETENSORS_INDEX, lambda: _load_sharded(path, SAFETENSORS_INDEX, _load_safetensors)),
        (SAFETENSORS_FILE, lambda: _load_safetensors(path / SAFETENSORS_FILE)),
        (BIN_INDEX, lambda: _load_sharded(path, BIN_INDEX, _load_bin)),
        (BIN_FILE, lambda: _load_bin(path / BIN_FILE)),
        (MISTRAL_WEIGHTS_FILE, lambda: _load_safetensors(path / MISTRAL_WEIGHTS_FILE)),
    ):
        if (path / name).is_file():
            return name, read
    return None


def weights_are_mapped(path: PathLike) -> bool:
    """Whether :func:`load_state_dict_files` gives ``path``'s tensors mapped from their files
    (safetensors: the file's pages, copy-on-write, so a later write into the file in place would
    show in them) rather than read into memory of their own (``torch.load`` of ``.bin`` files)."""
    source = _weights_source(pathlib.Path(path))
    return source is not None and source[0].endswith((".safetensors", ".safetensors.index.json"))


def load_state_dict_files(path: PathLike) -> Dict[str, torch.Tensor]:
    """Load every tensor of the checkpoint directory ``path`` onto the CPU.

    Looked for, in this order (the first one present is used):
    ``model.safetensors.index.json`` (sharded safetensors), ``model.safetensors``,
    ``pytorch_model.bin.index.json`` (sharded ``.bin``), ``pytorch_model.bin``, and
    Mistral's native ``consolidated.safetensors`` (its keys carry the prefix ``model.``,
    which :func:`~tl_mamba.loading.convert.convert_state_dict` removes).
    ``.bin`` files are read with ``torch.load(weights_only=True)``, so they cannot run
    code. Keys and dtypes are returned exactly as stored. safetensors' tensors are mapped
    from the file (:func:`weights_are_mapped`); a ``.bin``'s are read into memory, and keep
    any storage its keys share (mamba_ssm's tied ``lm_head.weight`` is the embedding).
    """
    path = pathlib.Path(path)
    if not path.is_dir():
        raise CheckpointFilesError(f"checkpoint directory {path} does not exist")
    source = _weights_source(path)
    if source is not None:
        return source[1]()
    # a hub cache's snapshot folder (models--{org}--{name}/snapshots/{revision}): only some files were fetched
    cached = path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--")
    raise CheckpointFilesError(
        f"no weight files in checkpoint directory {path}: expected one of {SAFETENSORS_FILE}, "
        f"{SAFETENSORS_INDEX} (+ shards), {BIN_FILE}, {BIN_INDEX} (+ shards), or Mistral's "
        f"{MISTRAL_WEIGHTS_FILE}; the directory holds: {_listing(path)}"
        + (". It is a Hugging Face cache snapshot: the weights were never downloaded into it (with "
           "HF_HUB_OFFLINE=1 or no network nothing is fetched); download them where the hub is reachable, "
           "or pass a local directory that has them" if cached else "")
    )


def has_tokenizer_files(path: PathLike) -> bool:
    path = pathlib.Path(path)
    return any((path / name).is_file() for name in TOKENIZER_FILES)


def mistral_tokenizer_file(path: PathLike) -> Optional[pathlib.Path]:
    """The Mistral tokenizer file in ``path`` (``tekken.json``, ``tokenizer.model.v3`` ...), or None."""
    path = pathlib.Path(path)
    for name in MISTRAL_TOKENIZER_FILES:
        if (path / name).is_file():
            return path / name
    return None


def _load_mistral_tokenizer(path: pathlib.Path, file: pathlib.Path) -> Optional[Any]:
    """A Mistral tokenizer file through transformers' mistral_common wrapper
    (``MistralCommonBackend``), or None with a warning that says how to set one."""
    why = "it needs the mistral_common package (pip install mistral-common), which is not installed"
    try:
        from transformers.utils.import_utils import is_mistral_common_available

        available = is_mistral_common_available()
    except ImportError:
        available = False
    if available:
        try:
            import transformers

            backend = getattr(transformers, "MistralCommonBackend", None) or getattr(
                transformers, "MistralCommonTokenizer"
            )
            return backend.from_pretrained(str(path))
        except Exception as err:  # noqa: BLE001 - any failure: load the model without a tokenizer
            why = f"reading it with mistral_common failed ({type(err).__name__}: {err})"
    warnings.warn(
        f"{path} holds a Mistral tokenizer ({file.name}) and no Hugging Face tokenizer files; {why}, so the "
        "model was loaded without a tokenizer. Set one with model.set_tokenizer(tokenizer), e.g. the model's "
        "Hugging Face tokenizer (for Codestral: transformers.AutoTokenizer.from_pretrained("
        "'mistralai/Mamba-Codestral-7B-v0.1')), or, with mistral_common installed, "
        f"transformers.MistralCommonBackend.from_pretrained({str(path)!r}); or pass tokenizer= to from_pretrained.",
        UserWarning,
        stacklevel=caller_stacklevel(),
    )
    return None


def load_tokenizer(path: PathLike) -> Optional[Any]:
    """Load the tokenizer saved in the checkpoint directory, or return ``None``.

    Tries ``transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)``
    first. mamba_ssm directories have no ``model_type`` for AutoTokenizer to go on, so
    when that fails and a ``tokenizer.json`` exists, it is wrapped in a
    ``PreTrainedTokenizerFast`` (special tokens from ``tokenizer_config.json`` /
    ``special_tokens_map.json`` when present; a ``tokenizer_config.json`` that AutoTokenizer
    could not apply warns, since its other settings are lost). With no tokenizer files at all the
    state-spaces checkpoints expect ``EleutherAI/gpt-neox-20b``'s tokenizer: pass it
    as ``tokenizer=``.

    A directory with only a Mistral tokenizer file (Mistral's native layout:
    ``tokenizer.model.v3``, ``tekken.json``) is read with mistral_common through
    transformers' ``MistralCommonBackend`` when that package is installed; otherwise
    (or if that fails) this returns None and warns, saying how to set a tokenizer
    (``model.set_tokenizer``).
    """
    path = pathlib.Path(path)
    if not has_tokenizer_files(path):
        mistral_file = mistral_tokenizer_file(path)
        return _load_mistral_tokenizer(path, mistral_file) if mistral_file is not None else None
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
        try:
            tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), **special)
        except Exception as err:  # noqa: BLE001 - the tokenizers library raises a bare Exception
            raise CheckpointFilesError(
                f"could not read the tokenizer in {path}: AutoTokenizer failed ({type(auto_err).__name__}: "
                f"{auto_err}) and so did reading {tokenizer_file} alone ({type(err).__name__}: {err}). The file is "
                "probably truncated or corrupt; fetch it again, or pass a tokenizer with tokenizer="
            ) from err
        if (path / "tokenizer_config.json").is_file():  # settings AutoTokenizer would have applied are lost
            warnings.warn(
                f"AutoTokenizer could not load the tokenizer in {path} ({type(auto_err).__name__}: {auto_err}); "
                f"read {tokenizer_file.name} alone instead, with the special tokens "
                f"({', '.join(special) or 'none found'}). The other settings of tokenizer_config.json (its "
                "tokenizer class, padding side, added-token options) are not applied: pass tokenizer= if they "
                "matter.", stacklevel=3)
        return tokenizer
