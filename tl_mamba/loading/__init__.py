"""Checkpoint loading: mamba_ssm, transformers and Mistral-native layouts -> tl_mamba models.

Layouts and which files win when a directory holds several: ``layouts.py``, ``files.py``.

Public API::

    resolve_checkpoint(name_or_path, *, revision=None) -> pathlib.Path
    read_checkpoint_config(path) -> dict            # config.json, or Mistral's params.json translated
    mamba_ssm_config_from_mistral_params(params) -> dict
    detect_layout(raw_config) -> (layout, family)   # ("mamba_ssm"|"transformers",
                                                    #  "mamba1"|"falcon_mamba"|"mamba2")
    config_from_checkpoint(raw, layout, family, *, model_name=..., state_dict=None,
                           device=None, dtype=torch.float32, **overrides) -> HookedMambaConfig
    load_state_dict_files(path) -> dict[str, Tensor]   # ... or Mistral's consolidated.safetensors
    convert_state_dict(sd, cfg, layout, family) -> dict[str, Tensor]
    expected_param_shapes(cfg) -> dict[str, tuple]
    load_pretrained(model_cls, name_or_path, *, device=None, dtype=torch.float32,
                    tokenizer=None, revision=None, **cfg_overrides) -> model
    load_any(name_or_path, **kw) -> HookedMamba | HookedMamba2
    auto_model_class(name_or_path) -> "mamba1" | "mamba2"
    from_hf(model_cls, hf_model, tokenizer=None, *, device=None, dtype=None, **cfg_overrides)
    from_hf_any(hf_model, tokenizer=None, **kw) -> HookedMamba | HookedMamba2
    config_from_transformers(config, model_cls) -> HookedMambaConfig   # MambaConfig, Mamba2Config ...
    load_tokenizer(path) -> tokenizer | None
    check_device(device) -> None                    # ValueError for a device this machine lacks
    save_pretrained(model, path, layout="mamba_ssm"|"transformers")   # in loading.save

Errors: CheckpointNotFoundError, CheckpointFilesError (FileNotFoundError);
CheckpointConfigError, UnsupportedArchitectureError, WrongModelClassError,
CheckpointMismatchError (ValueError).
"""

from .checkpoint import (
    auto_model_class,
    build_model,
    check_device,
    config_from_transformers,
    from_hf,
    from_hf_any,
    load_any,
    load_pretrained,
    model_class_for_family,
)
from .convert import checkpoint_name, convert_state_dict, expected_param_shapes, wrapper_prefix
from .errors import (
    CheckpointConfigError,
    CheckpointFilesError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    UnsupportedArchitectureError,
    WrongModelClassError,
)
from .files import load_state_dict_files, load_tokenizer, read_checkpoint_config
from .hub import resolve_checkpoint
from .layouts import (
    config_from_checkpoint,
    detect_layout,
    family_of_model_class,
    mamba_ssm_config_from_mistral_params,
)

__all__ = [
    "CheckpointConfigError",
    "CheckpointFilesError",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "UnsupportedArchitectureError",
    "WrongModelClassError",
    "auto_model_class",
    "build_model",
    "check_device",
    "checkpoint_name",
    "config_from_checkpoint",
    "config_from_transformers",
    "convert_state_dict",
    "detect_layout",
    "expected_param_shapes",
    "family_of_model_class",
    "from_hf",
    "from_hf_any",
    "load_any",
    "load_pretrained",
    "load_state_dict_files",
    "load_tokenizer",
    "mamba_ssm_config_from_mistral_params",
    "model_class_for_family",
    "read_checkpoint_config",
    "resolve_checkpoint",
    "wrapper_prefix",
]
