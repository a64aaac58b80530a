"""Recognise a checkpoint's layout and family from its config.json, and build our config.

Two layouts exist (see docs/DESIGN "Checkpoint layouts"):

* ``"mamba_ssm"``: the ``state-spaces/mamba*`` repos written by the mamba_ssm
  package: ``d_model, n_layer, vocab_size, ssm_cfg{...}, rms_norm,
  residual_in_fp32, pad_vocab_size_multiple, tie_embeddings, attn_layer_idx,
  d_intermediate``; no ``model_type``.
* ``"transformers"``: ``*-hf`` repos and anything saved by ``save_pretrained``:
  ``model_type`` in ``{"mamba", "falcon_mamba", "mamba2"}``.

Families: ``"mamba1"``, ``"falcon_mamba"`` (Mamba-1 with weightless RMS norms on
dt_low, B and C) and ``"mamba2"``. Our model classes know two families: Falcon-Mamba is
built by the Mamba-1 class (``HookedMambaConfig.family == "mamba1"`` with
``bcdt_rms_eps`` set).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..config import HookedMambaConfig
from .errors import UnsupportedArchitectureError

LAYOUTS = ("mamba_ssm", "transformers")
FAMILIES = ("mamba1", "falcon_mamba", "mamba2")

#: transformers ``model_type`` -> our checkpoint family
TRANSFORMERS_MODEL_TYPES = {"mamba": "mamba1", "falcon_mamba": "falcon_mamba", "mamba2": "mamba2"}

#: hybrid architectures that mix Mamba layers with attention and/or MLPs
HYBRID_MODEL_TYPES = {
    "jamba": "Jamba (Mamba-1 layers interleaved with attention and MoE MLPs)",
    "zamba": "Zamba (Mamba layers with shared attention blocks)",
    "zamba2": "Zamba2 (Mamba-2 layers with shared attention blocks)",
    "bamba": "Bamba (Mamba-2 layers interleaved with attention)",
    "nemotron_h": "Nemotron-H (Mamba-2 layers interleaved with attention and MLPs)",
    "falcon_h1": "Falcon-H1 (parallel Mamba-2 and attention in each layer)",
    "granitemoehybrid": "Granite-4.0 hybrid (Mamba-2 layers with attention and MoE)",
    "plamo2": "PLaMo-2 (Mamba layers interleaved with attention)",
    "hymba": "Hymba (parallel Mamba and attention heads)",
    "lfm2": "LFM2 (short convolutions with attention)",
    "qwen3_next": "Qwen3-Next (gated DeltaNet with attention)",
}

#: default architectures recorded in ``cfg.original_architecture``
DEFAULT_ARCHITECTURES = {
    ("transformers", "mamba1"): "MambaForCausalLM",
    ("transformers", "falcon_mamba"): "FalconMambaForCausalLM",
    ("transformers", "mamba2"): "Mamba2ForCausalLM",
    ("mamba_ssm", "mamba1"): "MambaLMHeadModel",
    ("mamba_ssm", "mamba2"): "MambaLMHeadModel",
}

# mamba_ssm defaults (mamba_ssm.models.config_mamba.MambaConfig and the mixer modules)
_SSM_LM_DEFAULTS = dict(
    d_intermediate=0,
    rms_norm=True,
    residual_in_fp32=True,
    pad_vocab_size_multiple=8,
    tie_embeddings=True,
)
_SSM_MAMBA1_DEFAULTS = dict(
    d_state=16, d_conv=4, expand=2, dt_rank="auto", conv_bias=True, bias=False,
    dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
)
_SSM_MAMBA2_DEFAULTS = dict(
    d_state=128, d_conv=4, expand=2, headdim=64, ngroups=1, chunk_size=256,
    conv_bias=True, bias=False, dt_limit=(0.0, float("inf")),
    dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4,
    d_ssm=None, D_has_hdim=False, rmsnorm=True, norm_before_gate=False,
    activation="swish", learnable_init_states=False,
)
_SSM_NORM_EPS = 1e-5  # mamba_ssm's MixerModel norm_epsilon and Mamba2's gated-norm eps


def family_of_model_class(family: str) -> str:
    """Map a checkpoint family to the model-class family: falcon_mamba -> mamba1."""
    return "mamba1" if family in ("mamba1", "falcon_mamba") else family


# --------------------------------------------------------------------------- detection


def detect_layout(raw_config: Mapping[str, Any]) -> Tuple[str, str]:
    """Return ``(layout, family)`` for the parsed config.json ``raw_config``.

    ``layout`` is ``"mamba_ssm"`` or ``"transformers"``; ``family`` is ``"mamba1"``,
    ``"falcon_mamba"`` or ``"mamba2"``. Raises :class:`UnsupportedArchitectureError`
    (a ``ValueError``) for hybrids (mamba_ssm ``attn_layer_idx``, or model types such
    as jamba / zamba / bamba / nemotron_h / falcon_h1), unknown model types, and
    options our models cannot represent (mamba_ssm ``d_intermediate > 0``,
    ``rms_norm=False``; for Mamba-2 ``d_ssm < d_inner``, ``D_has_hdim=True``,
    ``rmsnorm=False``, ``norm_before_gate=True``...). The message names the option.
    """
    if not isinstance(raw_config, Mapping):
        raise TypeError(f"raw_config must be a mapping (a parsed config.json), got {type(raw_config).__name__}")
    if "model_type" in raw_config:
        layout = "transformers"
        family = _detect_transformers(raw_config)
    elif "d_model" in raw_config and "n_layer" in raw_config:
        layout = "mamba_ssm"
        family = _detect_mamba_ssm(raw_config)
    else:
        keys = ", ".join(sorted(raw_config)[:20])
        raise UnsupportedArchitectureError(
            "unrecognised config.json: it has neither 'model_type' (transformers layout) nor "
            f"'d_model' and 'n_layer' (mamba_ssm layout); its keys are: {keys}"
        )
    return layout, family


def _detect_transformers(raw: Mapping[str, Any]) -> str:
    model_type = raw["model_type"]
    if model_type in HYBRID_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is a hybrid architecture: {HYBRID_MODEL_TYPES[model_type]}. "
            "tl_mamba supports pure Mamba-1, Falcon-Mamba and Mamba-2 language models only "
            "(model_type 'mamba', 'falcon_mamba', 'mamba2')."
        )
    if model_type not in TRANSFORMERS_MODEL_TYPES:
        raise UnsupportedArchitectureError(
            f"unknown model_type {model_type!r}: tl_mamba loads transformers checkpoints with "
            "model_type 'mamba', 'falcon_mamba' or 'mamba2' only."
        )
    family = TRANSFORMERS_MODEL_TYPES[model_type]
    act = raw.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise UnsupportedArchitectureError(
            f"hidden_act={act!r} is not supported: tl_mamba's mixers use SiLU"
        )
    if family == "mamba2":
        hidden, expand = raw.get("hidden_size"), raw.get("expand", 2)
        heads, head_dim = raw.get("num_heads"), raw.get("head_dim")
        if None not in (hidden, heads, head_dim) and int(expand * hidden) != heads * head_dim:
            raise UnsupportedArchitectureError(
                f"inconsistent Mamba-2 config: expand * hidden_size = {int(expand * hidden)} but "
                f"num_heads * head_dim = {heads * head_dim}"
            )
    return family


def _detect_mamba_ssm(raw: Mapping[str, Any]) -> str:
    attn_layers = raw.get("attn_layer_idx") or []
    if attn_layers:
        raise UnsupportedArchitectureError(
            f"this mamba_ssm checkpoint is a hybrid: attention layers at attn_layer_idx={list(attn_layers)}. "
            "tl_mamba supports pure Mamba-1 / Mamba-2 stacks only."
        )
    d_intermediate = raw.get("d_intermediate", 0) or 0
    if d_intermediate > 0:
        raise UnsupportedArchitectureError(
            f"d_intermediate={d_intermediate} (a gated MLP after every mixer) is not supported: "
            "tl_mamba models have one mixer per block and no MLP."
        )
    if not raw.get("rms_norm", True):
        raise UnsupportedArchitectureError(
            "rms_norm=False (LayerNorm with bias in every block) is not supported: tl_mamba models use RMSNorm."
        )
    ssm_cfg = raw.get("ssm_cfg") or {}
    layer = ssm_cfg.get("layer", "Mamba1")
    if layer == "Mamba1":
        return "mamba1"
    if layer != "Mamba2":
        raise UnsupportedArchitectureError(
            f"ssm_cfg.layer={layer!r} is not supported: tl_mamba knows 'Mamba1' and 'Mamba2'."
        )
    opts = {**_SSM_MAMBA2_DEFAULTS, **ssm_cfg}
    d_inner = int(opts["expand"] * raw["d_model"])
    if opts["d_ssm"] is not None and opts["d_ssm"] != d_inner:
        raise UnsupportedArchitectureError(
            f"ssm_cfg.d_ssm={opts['d_ssm']} differs from d_inner={d_inner} (part of the mixer is a "
            "gated MLP): HookedMamba2 cannot represent it."
        )
    if opts["D_has_hdim"]:
        raise UnsupportedArchitectureError(
            "ssm_cfg.D_has_hdim=True (a D skip per channel instead of per head) is not supported by HookedMamba2."
        )
    if not opts["rmsnorm"]:
        raise UnsupportedArchitectureError(
            "ssm_cfg.rmsnorm=False (no gated RMSNorm before out_proj) is not supported by HookedMamba2."
        )
    if opts["norm_before_gate"]:
        raise UnsupportedArchitectureError(
            "ssm_cfg.norm_before_gate=True is not supported: HookedMamba2 gates before the RMSNorm "
            "(norm_before_gate=False, as in every released Mamba-2 checkpoint)."
        )
    if opts["learnable_init_states"]:
        raise UnsupportedArchitectureError(
            "ssm_cfg.learnable_init_states=True (a learned initial state) is not supported by HookedMamba2."
        )
    if opts["activation"] not in ("silu", "swish"):
        raise UnsupportedArchitectureError(
            f"ssm_cfg.activation={opts['activation']!r} is not supported: HookedMamba2 uses SiLU."
        )
    if d_inner % opts["headdim"] != 0:
        raise UnsupportedArchitectureError(
            f"d_inner={d_inner} is not a multiple of ssm_cfg.headdim={opts['headdim']}"
        )
    return "mamba2"


# --------------------------------------------------------------------------- config


def _as_float(value: Any) -> float:
    """A float from config.json: transformers 5 writes infinity as ``{"__float__": "Infinity"}``,
    older versions as the bare JSON token ``Infinity`` (parsed by ``json`` already)."""
    if isinstance(value, Mapping) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _pad_vocab(vocab_size: int, multiple: Optional[int]) -> int:
    if not multiple or multiple <= 1:
        return vocab_size
    return int(math.ceil(vocab_size / multiple) * multiple)


def _dt_rank(value: Any, d_model: int) -> int:
    return math.ceil(d_model / 16) if value in (None, "auto") else int(value)


def _int_or_first(value: Any) -> Optional[int]:
    """Token ids may be stored as lists (several eos ids); keep the first."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _expand_field(expand: Any) -> int:
    return int(expand) if float(expand).is_integer() else expand


def _transformers_tie_default(family: str) -> bool:
    # MambaConfig and FalconMambaConfig tie by default, Mamba2Config does not.
    return family != "mamba2"


def config_from_checkpoint(
    raw: Mapping[str, Any],
    layout: str,
    family: str,
    *,
    model_name: str = "custom",
    state_dict: Optional[Mapping[str, torch.Tensor]] = None,
    device: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> HookedMambaConfig:
    """Build a :class:`HookedMambaConfig` from a checkpoint's parsed config.json.

    ``layout`` / ``family`` come from :func:`detect_layout`.

    * ``d_vocab`` is the padded vocabulary: mamba_ssm rounds ``vocab_size`` up to a
      multiple of ``pad_vocab_size_multiple`` (default 8) when it builds the
      embedding; transformers configs store the padded size already. **If**
      ``state_dict`` is given and its embedding has a different number of rows, the
      weight wins: ``d_vocab`` is set to the row count (the config's ``vocab_size``
      is often the tokenizer's, not the embedding's).
    * ``dt_rank="auto"`` is ``ceil(d_model / 16)``.
    * ``eps``: mamba_ssm uses 1e-5 for every RMSNorm; transformers uses
      ``layer_norm_epsilon``. Falcon-Mamba sets ``bcdt_rms_eps = mixer_rms_eps``.
    * ``tie_embeddings``: mamba_ssm ``tie_embeddings`` (default True); transformers
      ``tie_word_embeddings`` (default True for Mamba / Falcon-Mamba, False for Mamba-2,
      as in transformers).
    * ``original_architecture``: ``architectures[0]`` when the config has it, else
      ``MambaForCausalLM`` / ``FalconMambaForCausalLM`` / ``Mamba2ForCausalLM`` /
      ``MambaLMHeadModel`` (mamba_ssm). ``cfg.extra`` keeps ``layout``,
      ``checkpoint_family`` and the config's unpadded ``vocab_size``.
    * ``overrides`` replace any :class:`HookedMambaConfig` field last.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if layout == "mamba_ssm":
        fields = _fields_from_mamba_ssm(raw, family)
    else:
        fields = _fields_from_transformers(raw, family)

    fields["extra"] = {
        "layout": layout,
        "checkpoint_family": family,
        "checkpoint_vocab_size": raw.get("vocab_size"),
    }
    if state_dict is not None:
        rows = _embedding_rows(state_dict)
        if rows is not None and rows != fields["d_vocab"]:
            fields["extra"]["config_d_vocab"] = fields["d_vocab"]
            fields["d_vocab"] = rows
    architectures = raw.get("architectures") or []
    fields["original_architecture"] = architectures[0] if architectures else DEFAULT_ARCHITECTURES[(layout, family)]
    fields["architecture"] = {"mamba1": "Mamba", "falcon_mamba": "FalconMamba", "mamba2": "Mamba2"}[family]
    fields["model_name"] = model_name
    fields["device"] = device
    fields["dtype"] = dtype

    valid = {f.name for f in dataclasses.fields(HookedMambaConfig)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(f"unknown HookedMambaConfig field(s) in overrides: {', '.join(unknown)}")
    fields.update(overrides)
    return HookedMambaConfig(**fields)


def _embedding_rows(state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    for key in ("backbone.embedding.weight", "backbone.embeddings.weight", "embedding.weight", "embeddings.weight"):
        if key in state_dict and state_dict[key].ndim == 2:
            return int(state_dict[key].shape[0])
    return None


def _fields_from_mamba_ssm(raw: Mapping[str, Any], family: str) -> Dict[str, Any]:
    lm = {**_SSM_LM_DEFAULTS, **raw}
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    d_model = int(raw["d_model"])
    eps = float(raw.get("norm_epsilon", _SSM_NORM_EPS))
    common = dict(
        n_layers=int(raw["n_layer"]),
        d_model=d_model,
        d_vocab=_pad_vocab(int(raw["vocab_size"]), lm["pad_vocab_size_multiple"]),
        eps=eps,
        residual_in_fp32=bool(lm["residual_in_fp32"]),
        tie_embeddings=bool(lm["tie_embeddings"]),
    )
    if family == "mamba2":
        o = {**_SSM_MAMBA2_DEFAULTS, **ssm_cfg}
        d_inner = int(o["expand"] * d_model)
        return dict(
            common,
            family="mamba2",
            d_inner=d_inner,
            expand=_expand_field(o["expand"]),
            d_state=int(o["d_state"]),
            d_conv=int(o["d_conv"]),
            d_head=int(o["headdim"]),
            n_heads=d_inner // int(o["headdim"]),
            n_groups=int(o["ngroups"]),
            checkpoint_chunk_size=int(o["chunk_size"]),
            dt_limit=tuple(_as_float(v) for v in o["dt_limit"]),
            conv_bias=bool(o["conv_bias"]),
            proj_bias=bool(o["bias"]),
            norm_before_gate=False,
            dt_min=float(o["dt_min"]),
            dt_max=float(o["dt_max"]),
            dt_init_floor=float(o["dt_init_floor"]),
        )
    o = {**_SSM_MAMBA1_DEFAULTS, **ssm_cfg}
    return dict(
        common,
        family="mamba1",
        d_inner=int(o["expand"] * d_model),
        expand=_expand_field(o["expand"]),
        d_state=int(o["d_state"]),
        d_conv=int(o["d_conv"]),
        dt_rank=_dt_rank(o["dt_rank"], d_model),
        conv_bias=bool(o["conv_bias"]),
        proj_bias=bool(o["bias"]),
        dt_min=float(o["dt_min"]),
        dt_max=float(o["dt_max"]),
        dt_init_floor=float(o["dt_init_floor"]),
    )


def _fields_from_transformers(raw: Mapping[str, Any], family: str) -> Dict[str, Any]:
    d_model = int(raw["hidden_size"])
    expand = raw.get("expand", 2)
    common = dict(
        n_layers=int(raw["num_hidden_layers"]),
        d_model=d_model,
        d_vocab=int(raw["vocab_size"]),
        # transformers derives intermediate_size from expand * hidden_size
        d_inner=int(expand * d_model),
        expand=_expand_field(expand),
        d_state=int(raw.get("state_size", 128 if family == "mamba2" else 16)),
        d_conv=int(raw.get("conv_kernel", 4)),
        conv_bias=bool(raw.get("use_conv_bias", True)),
        proj_bias=bool(raw.get("use_bias", False)),
        eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
        tie_embeddings=bool(raw.get("tie_word_embeddings", _transformers_tie_default(family))),
        dt_min=float(raw.get("time_step_min", 0.001)),
        dt_max=float(raw.get("time_step_max", 0.1)),
        dt_init_floor=float(raw.get("time_step_floor", 1e-4)),
    )
    if "initializer_range" in raw:
        common["initializer_range"] = float(raw["initializer_range"])
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in raw:
            common[key] = _int_or_first(raw[key])
    if family == "mamba2":
        limit = raw.get("time_step_limit", (0.0, float("inf")))
        return dict(
            common,
            family="mamba2",
            d_head=int(raw.get("head_dim", 64)),
            n_heads=int(raw["num_heads"]) if "num_heads" in raw else None,
            n_groups=int(raw.get("n_groups", 1)),
            checkpoint_chunk_size=int(raw.get("chunk_size", 256)),
            dt_limit=tuple(_as_float(v) for v in limit),
            norm_before_gate=False,  # transformers' Mamba2 always gates before the norm
        )
    fields = dict(common, family="mamba1", dt_rank=_dt_rank(raw.get("time_step_rank"), d_model))
    if family == "falcon_mamba":
        fields["bcdt_rms_eps"] = float(raw.get("mixer_rms_eps", 1e-6))
    return fields
