"""Load pretrained checkpoints into tl_mamba models.

The model classes' ``from_pretrained`` / ``from_hf`` classmethods delegate here::

    HookedMamba.from_pretrained(name_or_path)  ->  load_pretrained(HookedMamba, name_or_path)
    HookedMamba.from_hf(hf_model)              ->  from_hf_any(hf_model, model_cls=HookedMamba)
    tl_mamba.from_pretrained(name_or_path)     ->  load_any(name_or_path)
    tl_mamba.from_hf(hf_model)                 ->  from_hf_any(hf_model)
    HookedMamba(transformers_config)           ->  config_from_transformers(config, HookedMamba)

Pipeline: :func:`check_device` -> :func:`resolve_checkpoint` (local dir or hub id) ->
:func:`read_checkpoint_config` -> :func:`detect_layout` -> :func:`config_from_checkpoint`
(so that a bad config fails before gigabytes of weights are read) ->
:func:`load_state_dict_files` -> :func:`config_from_checkpoint` again with the weights (their
embedding rows win over the config's vocab size, with a warning; ``dtype="auto"``) ->
:func:`convert_state_dict` -> :func:`build_model`: ``model_cls(cfg, tokenizer=...)`` built on the
meta device (no random init) -> ``model.load_state_dict(strict=True, assign=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import warnings
from typing import Any, Mapping, Optional, Union

import torch

from ..config import DTYPE_NAMES, HookedMambaConfig, resolve_dtype
from ..errors import caller_stacklevel
from .convert import convert_state_dict
from .errors import CheckpointConfigError, UnsupportedArchitectureError, WrongModelClassError
from .files import (checkpoint_config_file, load_state_dict_files, load_tokenizer, read_checkpoint_config,
                    weights_are_mapped)
from .hub import resolve_checkpoint
from .layouts import config_from_checkpoint, detect_layout, family_of_model_class

_FAMILY_WORDS = {"mamba1": "Mamba-1", "falcon_mamba": "Falcon-Mamba", "mamba2": "Mamba-2"}
_CLASS_FOR_FAMILY = {"mamba1": "HookedMamba", "mamba2": "HookedMamba2"}


def model_class_for_family(family: str) -> type:
    """Import and return the model class for a (checkpoint or model) family.

    ``"mamba1"`` and ``"falcon_mamba"`` -> ``HookedMamba``; ``"mamba2"`` -> ``HookedMamba2``.
    Imports are lazy so that loading code never imports a model it does not need.
    """
    family = family_of_model_class(family)
    if family == "mamba1":
        from ..models.mamba import HookedMamba

        return HookedMamba
    if family == "mamba2":
        from ..models.mamba2 import HookedMamba2

        return HookedMamba2
    raise ValueError(f"unknown family {family!r}")


def is_auto_dtype(dtype: Any) -> bool:
    return isinstance(dtype, str) and dtype.strip().lower() == "auto"


def checkpoint_dtype(raw: Mapping[str, Any], state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> Optional[torch.dtype]:
    """The dtype a checkpoint says it is in, as transformers' ``torch_dtype="auto"`` reads it:
    config.json's ``torch_dtype`` (or ``dtype``), else the dtype of its first floating-point
    tensor; None if neither says."""
    for key in ("torch_dtype", "dtype"):
        value = raw.get(key)
        if isinstance(value, str):
            found = DTYPE_NAMES.get(value.lower().removeprefix("torch."))
            if found is not None:
                return found
    for tensor in (state_dict or {}).values():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
            return tensor.dtype if tensor.dtype in DTYPE_NAMES.values() else None
    return None


def warn_if_tokenizer_too_large(tokenizer: Any, cfg: HookedMambaConfig) -> None:
    """Warn when ``tokenizer`` can produce ids the model has no embedding row for.

    A tokenizer smaller than ``d_vocab`` is normal (checkpoints pad the embedding up to a
    multiple of 8 or more); a larger one most likely belongs to another model."""
    if tokenizer is None:
        return
    try:
        size = len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
    if isinstance(size, int) and size > cfg.d_vocab:
        warnings.warn(
            f"the tokenizer has {size} tokens but the model's embedding only {cfg.d_vocab} rows (d_vocab): "
            f"ids >= {cfg.d_vocab} cannot be run, so this tokenizer probably belongs to another model. Pass the "
            "model's own tokenizer with tokenizer=.",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )


def check_device(device: Any) -> None:
    """Raise a ``ValueError`` now, before any file is read, when ``device`` cannot be used
    on this machine: not a torch device, CUDA asked of a torch without CUDA or with no GPU
    visible, a CUDA index past the GPUs there are, or MPS where it is not available.
    ``None`` (keep the default) and other device types pass unchecked."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device={device!r} is not a torch device ({err})") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (
                "this torch build has no CUDA support (a CPU-only install)"
                if torch.version.cuda is None
                else "torch sees no CUDA GPU (torch.cuda.is_available() is False)"
            )
            raise ValueError(f"device={device!r} cannot be used: {why}. Load on device='cpu' or leave device out.")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={device!r} cannot be used: torch sees {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={device!r} cannot be used: MPS is not available on this machine")


def _check_family(model_cls: type, layout: str, family: str, what: str, entry: str = "from_pretrained") -> None:
    """Raise :class:`WrongModelClassError` when ``model_cls`` cannot hold ``family``; the
    message names the right class's ``entry`` method (``from_pretrained`` or ``from_hf``)."""
    wanted = getattr(model_cls, "family", None)
    if wanted is None:
        raise TypeError(f"{getattr(model_cls, '__name__', model_cls)!r} has no 'family' class attribute")
    if family_of_model_class(family) != wanted:
        right = _CLASS_FOR_FAMILY[family_of_model_class(family)]
        if entry == "from_hf":
            advice = (f"use {right}.from_hf, or tl_mamba.from_hf which picks the class (for a checkpoint "
                      f"directory or hub id: {right}.from_pretrained, or tl_mamba.from_pretrained).")
        elif entry == "cfg":
            advice = f"use {right}(cfg)."
        else:
            advice = f"use {right}.from_pretrained, or tl_mamba.from_pretrained which picks the class."
        raise WrongModelClassError(
            f"{what} is a {_FAMILY_WORDS[family]} checkpoint ({layout} layout), but "
            f"{model_cls.__name__} loads {'Mamba-1 / Falcon-Mamba' if wanted == 'mamba1' else 'Mamba-2'} "
            f"checkpoints; {advice}"
        )


def build_model(
    model_cls: type,
    cfg: HookedMambaConfig,
    state_dict: Mapping[str, torch.Tensor],
    tokenizer: Any = None,
    device: Optional[Union[str, torch.device]] = None,
    *,
    copy: bool = True,
) -> torch.nn.Module:
    """Construct ``model_cls(cfg, tokenizer=tokenizer)`` holding ``state_dict`` (keys checked
    strictly), on ``device`` (default ``cfg.device``, else the CPU), in eval mode. Each tensor
    is cast to its parameter's dtype. Warns when the tokenizer has more tokens than the
    model's ``d_vocab``.

    The model is built on the meta device and the tensors are put in place of its
    parameters, so no random initialisation runs and no randomly initialised copy of the
    weights is held beside them (a random init of mamba-1.4b's widths takes 30-37 s on one CPU
    thread; a 7B model's, minutes). ``copy=True`` (the default) gives the model memory of its
    own for every tensor, even where ``state_dict``'s already have the right dtype and device.
    ``copy=False`` lets it take tensors as they are: only for a state dict whose memory nothing
    else holds or maps (one ``torch.load`` just read). Even then a tensor is copied when its
    storage holds more than it: another key's too (a ``.bin``'s tied ``lm_head.weight`` is the
    embedding; loaded untied, the two must not move together) or a flat buffer of all the
    weights. Every parameter is contiguous.
    """
    warn_if_tokenizer_too_large(tokenizer, cfg)
    target = torch.device(device if device is not None else (cfg.device if cfg.device is not None else "cpu"))
    with torch.device("meta"):
        model = model_cls(dataclasses.replace(cfg, device="meta"), tokenizer=tokenizer)
    shapes = model.state_dict()  # meta tensors: each parameter's dtype
    placed, storages = {}, set()
    for name, tensor in state_dict.items():
        if name in shapes:
            storage = tensor.untyped_storage()
            # a storage that holds more than this tensor: another key's too (a tied lm_head), or a flat
            # buffer of all the weights (which this parameter would keep alive whole)
            borrowed = storage.data_ptr() in storages or storage.nbytes() > tensor.numel() * tensor.element_size()
            storages.add(storage.data_ptr())
            tensor = tensor.to(device=target, dtype=shapes[name].dtype, copy=copy or borrowed)
            placed[name] = tensor.contiguous()
        else:
            placed[name] = tensor  # (refused by load_state_dict's strict check)
    model.load_state_dict(placed, strict=True, assign=True)
    model.to(target)  # nothing moves; keeps cfg.device / cfg.dtype in step with the weights
    return model.eval()


def _load_from_dir(
    model_cls: Optional[type],
    path: pathlib.Path,
    *,
    model_name: str,
    device,
    dtype: Union[torch.dtype, str, None],
    tokenizer: Any,
    cfg_overrides: Mapping[str, Any],
) -> torch.nn.Module:
    raw = read_checkpoint_config(path)
    layout, family = detect_layout(raw)
    if model_cls is None:
        model_cls = model_class_for_family(family)
    _check_family(model_cls, layout, family, what=repr(model_name))
    auto = is_auto_dtype(dtype)
    if not auto:
        dtype = resolve_dtype(dtype)  # an invalid dtype fails before the weights are read
    # the whole config is interpreted (and validated) before the weights are read
    _checked_config(path, raw, layout, family, cfg_overrides, model_name=model_name, device=device,
                    dtype=torch.float32 if auto else dtype)
    sd = load_state_dict_files(path)
    if auto:
        dtype = resolve_dtype(dtype, auto=checkpoint_dtype(raw, sd))
    cfg = config_from_checkpoint(
        raw, layout, family, model_name=model_name, state_dict=sd, device=device, dtype=dtype, **cfg_overrides
    )
    ours = convert_state_dict(sd, cfg, layout, family)
    del sd
    if tokenizer is None:
        tokenizer = load_tokenizer(path)
    # the model owns its memory: safetensors' tensors are mapped from the file, and a later write into
    # it in place (cp over it) would change the model's weights, or crash it if the file shrank
    return build_model(model_cls, cfg, ours, tokenizer=tokenizer, device=device, copy=weights_are_mapped(path))


def _checked_config(path, raw, layout: str, family: str, overrides: Mapping[str, Any], **settings) -> HookedMambaConfig:
    """:func:`config_from_checkpoint`, with a value of the checkpoint's config that the model
    refuses (``d_model=-5``, ``n_layer="two"``) reported as a ``CheckpointConfigError`` naming the
    file (and the caller's ``overrides``, which may be the cause instead)."""
    try:
        return config_from_checkpoint(raw, layout, family, **settings, **overrides)
    except (CheckpointConfigError, UnsupportedArchitectureError):
        raise
    except ValueError as err:
        config_file = checkpoint_config_file(path)
        given = f" with the overrides {sorted(overrides)}" if overrides else ""
        raise CheckpointConfigError(f"{config_file or path} ({layout} layout, {family}){given} holds a value "
                                    f"tl_mamba cannot use: {err}") from err


def load_pretrained(
    model_cls: type,
    name_or_path: Union[str, os.PathLike],
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Union[torch.dtype, str, None] = torch.float32,
    tokenizer: Any = None,
    revision: Optional[str] = None,
    **cfg_overrides: Any,
) -> torch.nn.Module:
    """Load a pretrained checkpoint into ``model_cls`` (HookedMamba or HookedMamba2).

    Args:
        model_cls: the model class; its ``family`` class attribute must match the
            checkpoint (Falcon-Mamba counts as ``"mamba1"``), else
            :class:`WrongModelClassError` says which class to use.
        name_or_path: a local checkpoint directory (mamba_ssm or transformers layout)
            or a hub id such as ``"state-spaces/mamba-130m-hf"``.
        device, dtype: stored in the config; the model is built with them. ``dtype`` is a
            floating-point ``torch.dtype``, a name (``"float32"``, ``"float16"``,
            ``"bfloat16"``, ``"float64"``) or ``"auto"`` (the checkpoint's own dtype, as
            transformers reads it; float32 when the checkpoint does not say): see
            :func:`tl_mamba.config.resolve_dtype`.
        tokenizer: used as given; otherwise the checkpoint's own tokenizer files are
            loaded when present (see :func:`load_tokenizer`), else the model has none.
        revision: hub revision (branch, tag or commit) for hub ids.
        **cfg_overrides: any :class:`HookedMambaConfig` field, applied last.

    Raises ``CheckpointNotFoundError``, ``CheckpointFilesError``, ``CheckpointConfigError``,
    ``UnsupportedArchitectureError``, ``WrongModelClassError`` or
    ``CheckpointMismatchError`` (which lists every missing / unexpected / misshapen key);
    a ``ValueError`` for a ``device`` this machine does not have (:func:`check_device`).
    The device, the dtype and the config (``CheckpointConfigError``, ``UnsupportedArchitectureError``,
    ``WrongModelClassError``) are checked before the weights are read; an unreadable weight file
    and ``CheckpointMismatchError`` (the weights against the config) come after.
    """
    check_device(device)
    path = resolve_checkpoint(name_or_path, revision=revision)
    return _load_from_dir(
        model_cls,
        path,
        model_name=cfg_overrides.pop("model_name", None) or os.fspath(name_or_path),
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        cfg_overrides=cfg_overrides,
    )


def load_any(
    name_or_path: Union[str, os.PathLike],
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Union[torch.dtype, str, None] = torch.float32,
    tokenizer: Any = None,
    revision: Optional[str] = None,
    **cfg_overrides: Any,
) -> torch.nn.Module:
    """Like :func:`load_pretrained`, but pick the model class from the checkpoint:
    Mamba-1 and Falcon-Mamba -> ``HookedMamba``, Mamba-2 -> ``HookedMamba2``."""
    check_device(device)
    path = resolve_checkpoint(name_or_path, revision=revision)
    return _load_from_dir(
        None,
        path,
        model_name=cfg_overrides.pop("model_name", None) or os.fspath(name_or_path),
        device=device,
        dtype=dtype,
        tokenizer=tokenizer,
        cfg_overrides=cfg_overrides,
    )


def auto_model_class(name_or_path: Union[str, os.PathLike], *, revision: Optional[str] = None) -> str:
    """The model-class family of a checkpoint: ``"mamba1"`` (Mamba-1 and Falcon-Mamba,
    built by ``HookedMamba``) or ``"mamba2"`` (``HookedMamba2``). It equals the right
    class's ``family`` attribute. Reads only config.json (after resolving the checkpoint)."""
    path = resolve_checkpoint(name_or_path, revision=revision)
    _, family = detect_layout(read_checkpoint_config(path))
    return family_of_model_class(family)


def config_from_transformers(config: Any, model_cls: type) -> HookedMambaConfig:
    """The :class:`HookedMambaConfig` of a transformers ``MambaConfig``, ``FalconMambaConfig`` or
    ``Mamba2Config`` (what ``HookedMamba(config)`` builds a random model from), read as a
    checkpoint's config.json is. Anything else is a ``TypeError`` naming what is accepted; a config
    of the other family, a :class:`WrongModelClassError` naming the right class."""
    accepted = ("a HookedMambaConfig, a dict of its fields, or a transformers MambaConfig, FalconMambaConfig "
                "or Mamba2Config")
    if not hasattr(config, "to_dict") or not hasattr(config, "model_type"):
        raise TypeError(f"{model_cls.__name__}(cfg) takes {accepted}; got {type(config).__name__}")
    raw = config.to_dict()
    try:
        layout, family = detect_layout(raw)
    except UnsupportedArchitectureError as err:
        raise UnsupportedArchitectureError(f"{model_cls.__name__}(cfg) cannot use a {type(config).__name__}: {err}. "
                                           f"It takes {accepted}.") from err
    _check_family(model_cls, layout, family, what=f"the {type(config).__name__}", entry="cfg")
    return config_from_checkpoint(raw, layout, family, model_name=getattr(config, "_name_or_path", "") or "custom",
                                  original_architecture=(getattr(config, "architectures", None) or [None])[0])


def from_hf_any(hf_model: torch.nn.Module, tokenizer: Any = None, *, model_cls: Optional[type] = None,
                **kwargs: Any) -> torch.nn.Module:
    """:func:`from_hf` with the class the model's config calls for: ``HookedMamba`` for Mamba-1
    and Falcon-Mamba, ``HookedMamba2`` for Mamba-2 (``tl_mamba.from_hf``, and the classes' own
    ``from_hf``: the contract's ``HookedMamba.from_hf(hf_model)`` takes any in-memory model).
    ``model_cls``: the class to build when it is of that family (a subclass, say)."""
    family = "mamba1"  # what cannot be read is refused by from_hf, naming the model
    config = getattr(hf_model, "config", None)
    if hasattr(config, "to_dict"):
        with contextlib.suppress(UnsupportedArchitectureError):
            family = family_of_model_class(detect_layout(config.to_dict())[1])
    if model_cls is None or getattr(model_cls, "family", None) != family:
        model_cls = model_class_for_family(family)
    return from_hf(model_cls, hf_model, tokenizer, **kwargs)


def from_hf(
    model_cls: type,
    hf_model: torch.nn.Module,
    tokenizer: Any = None,
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: Union[torch.dtype, str, None] = None,
    **cfg_overrides: Any,
) -> torch.nn.Module:
    """Convert an in-memory transformers Mamba model into ``model_cls``.

    ``hf_model`` is a ``MambaForCausalLM`` / ``FalconMambaForCausalLM`` /
    ``Mamba2ForCausalLM`` (a bare ``MambaModel`` backbone works too when tied). Its
    config and state dict go through the same conversion as a checkpoint on disk; the
    weights are copied. ``dtype`` and ``device`` default to those of the model's
    parameters (so does ``dtype="auto"``; names such as ``"float16"`` work too).
    ``tokenizer`` defaults to the tokenizer saved beside the model when
    ``hf_model.name_or_path`` is a local directory that has one.
    """
    config = getattr(hf_model, "config", None)
    if not isinstance(hf_model, torch.nn.Module) or not hasattr(config, "to_dict"):
        raise TypeError(
            "from_hf expects a transformers MambaForCausalLM, FalconMambaForCausalLM or "
            f"Mamba2ForCausalLM instance, got {type(hf_model).__name__}"
        )
    raw = config.to_dict()
    try:
        layout, family = detect_layout(raw)
    except UnsupportedArchitectureError as err:
        raise UnsupportedArchitectureError(
            f"from_hf cannot convert a {type(hf_model).__name__}: {err}"
        ) from err
    if layout != "transformers":  # pragma: no cover - a transformers config always has model_type
        raise UnsupportedArchitectureError(f"from_hf needs a transformers model, got {type(hf_model).__name__}")
    _check_family(model_cls, layout, family, what=f"the {type(hf_model).__name__}", entry="from_hf")
    check_device(device)

    params = [p for p in hf_model.parameters() if p.is_floating_point()]
    if dtype is None or is_auto_dtype(dtype):
        dtype = resolve_dtype("auto", auto=params[0].dtype if params else None)
    else:
        dtype = resolve_dtype(dtype)
    if device is None and params:
        device = params[0].device
    if isinstance(device, torch.device):
        device = str(device)
    sd = hf_model.state_dict()
    cfg_overrides.setdefault("original_architecture", type(hf_model).__name__)
    name = getattr(hf_model, "name_or_path", "") or getattr(config, "_name_or_path", "") or type(hf_model).__name__
    cfg = config_from_checkpoint(
        raw, layout, family, model_name=cfg_overrides.pop("model_name", None) or str(name), state_dict=sd,
        device=device, dtype=dtype, **cfg_overrides
    )
    ours = convert_state_dict(sd, cfg, layout, family)
    if tokenizer is None and name and pathlib.Path(str(name)).is_dir():
        tokenizer = load_tokenizer(pathlib.Path(str(name)))
    return build_model(model_cls, cfg, ours, tokenizer=tokenizer, device=device)
