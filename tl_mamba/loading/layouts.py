"""Recognise a checkpoint's layout and family from its config, and build our config.

Checkpoint directories come in three layouts:

* ``"mamba_ssm"``: the ``state-spaces/mamba*`` repos written by the mamba_ssm
  package: config.json with ``d_model, n_layer, vocab_size, ssm_cfg{...}, rms_norm,
  residual_in_fp32, pad_vocab_size_multiple, tie_embeddings, attn_layer_idx,
  d_intermediate``; no ``model_type``. Weights in ``pytorch_model.bin`` (names
  ``backbone.embedding.weight``, ``backbone.layers.{i}...``, ``lm_head.weight``).
* ``"transformers"``: ``*-hf`` repos and anything saved by transformers'
  ``save_pretrained``: config.json with ``model_type`` in ``{"mamba", "falcon_mamba",
  "mamba2"}``; weights in ``model.safetensors`` (or shards, or ``pytorch_model.bin``).
  Fields the config leaves out take the defaults of transformers' ``MambaConfig`` /
  ``FalconMambaConfig`` / ``Mamba2Config`` (``_TRANSFORMERS_DEFAULTS`` below), so a
  config loads as transformers loads it.
* Mistral's native layout (``mistralai/Mamba-Codestral-7B-v0.1``: the files its model
  card downloads, ``params.json``, ``consolidated.safetensors``, ``tokenizer.model.v3``).
  ``params.json`` holds mistral_inference's ``MambaArgs``: ``dim, n_layers, vocab_size,
  n_groups, rms_norm, residual_in_fp32, fused_add_norm, pad_vocab_size_multiple,
  tie_embeddings, model_type="mamba"``. mistral_inference builds a mamba_ssm Mamba-2
  ``MambaLMHeadModel`` from it (``ssm_cfg={"layer": "Mamba2", "ngroups": n_groups}``,
  every other option at mamba_ssm's default) and keeps it as ``self.model``, so the
  weights carry mamba_ssm's names under the prefix ``model.``.
  :func:`mamba_ssm_config_from_mistral_params` makes the same translation, so such a
  directory loads as the ``"mamba_ssm"`` layout. Which files are read when a directory
  holds several layouts: config.json before params.json, and the transformers / mamba_ssm
  weight files before ``consolidated.safetensors`` (see ``files.py``); the hub repo of
  Codestral holds both, and loads from its transformers files.

Required config fields (tl_mamba never guesses a model's size): ``hidden_size``,
``num_hidden_layers``, ``vocab_size`` (transformers); ``d_model``, ``n_layer``,
``vocab_size`` (mamba_ssm); ``dim``, ``n_layers``, ``vocab_size`` (params.json). A config
without one raises :class:`CheckpointConfigError` naming the file, the field and the
layout, before any weight is read.

Families: ``"mamba1"``, ``"falcon_mamba"`` (Mamba-1 with weightless RMS norms on
dt_low, B and C) and ``"mamba2"``. Our model classes know two families: Falcon-Mamba is
built by the Mamba-1 class (``HookedMambaConfig.family == "mamba1"`` with
``bcdt_rms_eps`` set).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..config import HookedMambaConfig
from ..errors import caller_stacklevel
from .errors import CheckpointConfigError, UnsupportedArchitectureError

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
#: the RMSNorm epsilon mamba_ssm uses everywhere (MixerModel's norm_epsilon, Mamba2's gated norm)
MAMBA_SSM_NORM_EPS = 1e-5

# transformers' config defaults (MambaConfig, FalconMambaConfig, Mamba2Config, as in
# transformers 5.x and the 4.x releases since Mamba-2 was added) for every field tl_mamba reads: a config.json that leaves a field
# out loads as transformers loads it. (hidden_size, num_hidden_layers and vocab_size have
# defaults there too, a 768- or 4096-wide model, but a checkpoint without them is broken: they
# are required here.)
_TF_MAMBA1_DEFAULTS = dict(
    state_size=16, expand=2, conv_kernel=4, use_bias=False, use_conv_bias=True, hidden_act="silu",
    layer_norm_epsilon=1e-5, residual_in_fp32=True, time_step_rank="auto", time_step_min=0.001,
    time_step_max=0.1, time_step_floor=1e-4, initializer_range=0.1, tie_word_embeddings=True,
    bos_token_id=0, eos_token_id=0, pad_token_id=0,
)
_TRANSFORMERS_DEFAULTS = {
    "mamba1": _TF_MAMBA1_DEFAULTS,
    "falcon_mamba": dict(_TF_MAMBA1_DEFAULTS, mixer_rms_eps=1e-6),
    "mamba2": dict(
        _TF_MAMBA1_DEFAULTS, state_size=128, num_heads=128, head_dim=64, n_groups=8, chunk_size=256,
        time_step_limit=(0.0, float("inf")), tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    ),
}

#: fields a config must have, per layout, with what they are (for the error message)
REQUIRED_FIELDS = {
    "transformers": {"hidden_size": "the model width", "num_hidden_layers": "the number of layers",
                     "vocab_size": "the number of embedding rows"},
    "mamba_ssm": {"d_model": "the model width", "n_layer": "the number of layers",
                  "vocab_size": "the vocabulary size"},
}
_LAYOUT_WORDS = {
    "transformers": "transformers layout (model_type {model_type!r})",
    "mamba_ssm": "mamba_ssm layout (d_model, n_layer, ssm_cfg ...)",
}


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
    elif any(key in raw_config for key in ("d_model", "n_layer", "ssm_cfg")):
        layout = "mamba_ssm"
        check_required_fields(raw_config, layout)
        family = _detect_mamba_ssm(raw_config)
    else:
        keys = ", ".join(sorted(raw_config)[:20])
        raise UnsupportedArchitectureError(
            "unrecognised config.json: it has neither 'model_type' (transformers layout) nor "
            f"'d_model' and 'n_layer' (mamba_ssm layout); its keys are: {keys}"
        )
    return layout, family


def check_required_fields(raw: Mapping[str, Any], layout: str, source: str = "config.json") -> None:
    """Raise :class:`CheckpointConfigError` naming ``source``, the layout and every field of
    :data:`REQUIRED_FIELDS` that ``raw`` lacks (or holds as null)."""
    missing = [name for name in REQUIRED_FIELDS[layout] if raw.get(name) is None]
    if missing:
        fields = ", ".join(f"{name!r} ({REQUIRED_FIELDS[layout][name]})" for name in missing)
        layout_words = _LAYOUT_WORDS[layout].format(model_type=raw.get("model_type"))
        raise CheckpointConfigError(
            f"{source} lacks the required field{'s' if len(missing) > 1 else ''} {fields}: a {layout_words} "
            f"config must give {', '.join(REQUIRED_FIELDS[layout])}; tl_mamba does not guess a model's size"
        )


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
    check_required_fields(raw, "transformers")
    defaults = _TRANSFORMERS_DEFAULTS[family]
    act = raw.get("hidden_act", defaults["hidden_act"])
    if act not in ("silu", "swish"):
        raise UnsupportedArchitectureError(
            f"hidden_act={act!r} is not supported: tl_mamba's mixers use SiLU"
        )
    if family == "mamba2":
        # transformers' Mamba2Config refuses the same configs (num_heads defaults to 128)
        opts = {**defaults, **raw}
        hidden, expand, heads, head_dim = opts["hidden_size"], opts["expand"], opts["num_heads"], opts["head_dim"]
        if int(expand * hidden) != heads * head_dim:
            defaulted = [f"{k}={defaults[k]}" for k in ("num_heads", "head_dim") if k not in raw]
            note = f" ({', '.join(defaulted)}: transformers' default, config.json does not say)" if defaulted else ""
            raise UnsupportedArchitectureError(
                f"inconsistent Mamba-2 config: expand * hidden_size = {int(expand * hidden)} but "
                f"num_heads * head_dim = {heads * head_dim}{note}"
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
    defaulted = ", ".join(f"{k}={_SSM_MAMBA2_DEFAULTS[k]}" for k in ("expand", "headdim") if k not in ssm_cfg)
    note = f" ({defaulted}: mamba_ssm's defaults, the config does not say)" if defaulted else ""
    if d_inner % opts["headdim"] != 0:
        raise UnsupportedArchitectureError(
            f"d_inner={d_inner} is not a multiple of ssm_cfg.headdim={opts['headdim']}{note}"
        )
    heads = d_inner // opts["headdim"]
    if heads % opts["ngroups"] != 0:
        raise UnsupportedArchitectureError(
            f"ssm_cfg.ngroups={opts['ngroups']} does not divide the {heads} heads (d_inner={d_inner} / "
            f"headdim={opts['headdim']}){note}"
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
      weight wins, with a warning: ``d_vocab`` is set to the row count.
    * ``dt_rank="auto"`` is ``ceil(d_model / 16)``.
    * ``eps``: mamba_ssm uses 1e-5 for every RMSNorm; transformers uses
      ``layer_norm_epsilon``. Falcon-Mamba sets ``bcdt_rms_eps = mixer_rms_eps``.
    * ``tie_embeddings``: mamba_ssm ``tie_embeddings`` (default True); transformers
      ``tie_word_embeddings`` (default True for Mamba / Falcon-Mamba, False for Mamba-2,
      as in transformers).
    * transformers fields the config leaves out take transformers' defaults (Mamba-2:
      ``n_groups=8``, ``num_heads=128``, ``head_dim=64``, bos/eos/pad 0/2/1; Mamba-1 and
      Falcon-Mamba: bos/eos/pad 0/0/0 ...); the sizes (:data:`REQUIRED_FIELDS`) are
      required: :class:`CheckpointConfigError` names the missing one.
    * token ids of the mamba_ssm layout (which has no field for them) are read when ``raw``
      holds them (see :func:`read_checkpoint_config`); else HookedMambaConfig's 0.
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
    check_required_fields(raw, layout)
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
            # Not an error (transformers would refuse): the rows are what runs. But say so,
            # since a config that disagrees with its weights may belong to another model.
            padded = (f" (vocab_size {raw.get('vocab_size')} padded to a multiple of "
                      f"{raw.get('pad_vocab_size_multiple', 8)})" if layout == "mamba_ssm" else "")
            warnings.warn(
                f"the checkpoint's config gives an embedding of {fields['d_vocab']} rows{padded} but its weights have "
                f"{rows}: d_vocab is {rows}, from the weights (cfg.extra['config_d_vocab'] keeps the config's value)",
                UserWarning,
                stacklevel=caller_stacklevel(),
            )
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
        hints = [f"{name}: {TRANSFORMER_LENS_OPTIONS[name]}" for name in unknown if name in TRANSFORMER_LENS_OPTIONS]
        raise TypeError(f"unknown HookedMambaConfig field(s) in overrides: {', '.join(unknown)}"
                        + (". TransformerLens' HookedTransformer.from_pretrained options: " + "; ".join(hints)
                           if hints else ""))
    fields.update(overrides)
    return HookedMambaConfig(**fields)


#: ``HookedTransformer.from_pretrained`` keywords a TransformerLens user passes by habit, and what
#: holds here instead: the weights load as they are (no processing), apart from ``W_U``.
TRANSFORMER_LENS_OPTIONS = {
    "fold_ln": "weights load as they are; W_U (and tokens_to_residual_directions) already carry the final "
               "RMSNorm's weight, as fold_ln gives, and the blocks apply their norm weights themselves "
               "(ln1.hook_normalized is x / scale, before the weight)",
    "center_writing_weights": "RMSNorm subtracts no mean, so writing weights are not centred (TransformerLens skips "
                              "it for RMSNorm models too)",
    "center_unembed": "W_U is not centred: the logits (and logit-lens values) keep their mean over the vocabulary; "
                      "subtract logits.mean(-1, keepdim=True) where you need centred ones",
    "fold_value_biases": "Mamba has no attention values",
    "refactor_factored_attn_matrices": "Mamba has no attention matrices",
    "torch_dtype": "the keyword is dtype= (a torch dtype, a name such as 'bfloat16', or 'auto')",
    "first_n_layers": "all layers are loaded; stop the forward early with stop_at_layer=",
    "n_devices": "a model sits on one device (device=)",
    "move_to_device": "the model loads onto device= directly",
    "default_padding_side": "set model.tokenizer.padding_side, or pass padding_side= to the forward or to_tokens",
    "padding_side": "set model.tokenizer.padding_side, or pass padding_side= to the forward or to_tokens",
    "hf_model": "for an in-memory transformers model use HookedMamba.from_hf(hf_model) (or tl_mamba.from_hf)",
}


def _embedding_rows(state_dict: Mapping[str, torch.Tensor]) -> Optional[int]:
    """Rows of the checkpoint's embedding, under any wrapper prefix (``module.``, ``model.``) the
    conversion strips: :func:`tl_mamba.loading.convert.wrapper_prefix`."""
    from tl_mamba.loading.convert import _EMBED_NAMES, wrapper_prefix

    prefix = wrapper_prefix(list(state_dict))
    for name in _EMBED_NAMES:
        tensor = state_dict.get(prefix + name)
        if tensor is not None and tensor.ndim == 2:
            return int(tensor.shape[0])
    return None


def _fields_from_mamba_ssm(raw: Mapping[str, Any], family: str) -> Dict[str, Any]:
    lm = {**_SSM_LM_DEFAULTS, **raw}
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    d_model = int(raw["d_model"])
    # norm_epsilon is no mamba_ssm config field (mamba_ssm always uses 1e-5); configs written by
    # tl_mamba before it kept mamba_ssm's fields only may hold it, so it is still read
    eps = float(raw.get("norm_epsilon", MAMBA_SSM_NORM_EPS))
    common = dict(
        n_layers=int(raw["n_layer"]),
        d_model=d_model,
        d_vocab=_pad_vocab(int(raw["vocab_size"]), lm["pad_vocab_size_multiple"]),
        eps=eps,
        residual_in_fp32=bool(lm["residual_in_fp32"]),
        tie_embeddings=bool(lm["tie_embeddings"]),
    )
    # mamba_ssm's config has no token ids; read_checkpoint_config adds them from
    # generation_config.json (and the Mistral translation from the Mistral tokenizers)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key in raw:
            common[key] = _int_or_first(raw[key])
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
    o = {**_TRANSFORMERS_DEFAULTS[family], **raw}
    d_model = int(raw["hidden_size"])
    expand = o["expand"]
    # Mamba-1 / Falcon-Mamba read config.intermediate_size, which the config's own value
    # overrides (expand * hidden_size otherwise); Mamba-2 always uses expand * hidden_size.
    d_inner = int(expand * d_model)
    if family != "mamba2" and raw.get("intermediate_size") is not None:
        d_inner = int(raw["intermediate_size"])
    common = dict(
        n_layers=int(raw["num_hidden_layers"]),
        d_model=d_model,
        d_vocab=int(raw["vocab_size"]),
        d_inner=d_inner,
        expand=_expand_field(expand),
        d_state=int(o["state_size"]),
        d_conv=int(o["conv_kernel"]),
        conv_bias=bool(o["use_conv_bias"]),
        proj_bias=bool(o["use_bias"]),
        eps=float(o["layer_norm_epsilon"]),
        residual_in_fp32=bool(o["residual_in_fp32"]),
        tie_embeddings=bool(o["tie_word_embeddings"]),
        dt_min=float(o["time_step_min"]),
        dt_max=float(o["time_step_max"]),
        dt_init_floor=float(o["time_step_floor"]),
        initializer_range=float(o["initializer_range"]),
        bos_token_id=_int_or_first(o["bos_token_id"]),
        eos_token_id=_int_or_first(o["eos_token_id"]),
        pad_token_id=_int_or_first(o["pad_token_id"]),
    )
    if family == "mamba2":
        return dict(
            common,
            family="mamba2",
            d_head=int(o["head_dim"]),
            n_heads=int(o["num_heads"]),
            n_groups=int(o["n_groups"]),
            checkpoint_chunk_size=int(o["chunk_size"]),
            dt_limit=tuple(_as_float(v) for v in o["time_step_limit"]),
            norm_before_gate=False,  # transformers' Mamba2 always gates before the norm
        )
    fields = dict(common, family="mamba1", dt_rank=_dt_rank(o["time_step_rank"], d_model))
    if family == "falcon_mamba":
        fields["bcdt_rms_eps"] = float(o["mixer_rms_eps"])
    return fields


# --------------------------------------------------------------------------- Mistral native


#: mistral_inference's ``MambaArgs`` fields besides the required ones, with the defaults used
#: when params.json leaves one out: mamba_ssm's (``MambaConfig`` and ``Mamba2``'s ngroups=1),
#: which is what the same missing value means to mamba_ssm and transformers' converter.
MISTRAL_MAMBA_DEFAULTS = dict(
    n_groups=1, rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
    tie_embeddings=True, model_type="mamba",
)
#: the params.json fields tl_mamba requires (they become d_model, n_layer, vocab_size)
_MISTRAL_REQUIRED = ("dim", "n_layers", "vocab_size")
#: token ids of every Mistral tokenizer (sentencepiece v1-v3 and tekken): <unk>=0, <s>=1, </s>=2;
#: Codestral's own config.json says bos 1, eos 2, pad 0
MISTRAL_TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def mamba_ssm_config_from_mistral_params(params: Mapping[str, Any], source: str = "params.json") -> Dict[str, Any]:
    """Translate Mistral's native ``params.json`` (mistral_inference ``MambaArgs``) into the
    mamba_ssm config.json that mistral_inference builds from it.

    ``dim`` / ``n_layers`` / ``vocab_size`` are required (:class:`CheckpointConfigError`
    otherwise); the other ``MambaArgs`` fields default as in :data:`MISTRAL_MAMBA_DEFAULTS`.
    ``ssm_cfg`` is ``{"layer": "Mamba2", "ngroups": n_groups}``: everything else (d_state 128,
    headdim 64, expand 2, d_conv 4, chunk 256) is mamba_ssm's default, as in mistral_inference.
    Token ids are those of the Mistral tokenizers (:data:`MISTRAL_TOKEN_IDS`). A params.json of
    a Mistral transformer (``model_type`` absent or not ``"mamba"``) raises
    :class:`UnsupportedArchitectureError`; fields mistral_inference does not know are ignored
    with a warning.
    """
    if not isinstance(params, Mapping):
        raise CheckpointConfigError(f"{source} does not hold a JSON object")
    model_type = params.get("model_type", "transformer")
    if model_type != "mamba":
        raise UnsupportedArchitectureError(
            f"{source} describes a Mistral model_type={model_type!r} model (mistral_inference's default is "
            "'transformer'): tl_mamba reads Mistral's native layout for Mamba models only (model_type 'mamba', "
            "e.g. Mamba-Codestral)"
        )
    missing = [name for name in _MISTRAL_REQUIRED if params.get(name) is None]
    if missing:
        raise CheckpointConfigError(
            f"{source} lacks the required field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}: "
            "a Mistral native (mistral_inference MambaArgs) config must give dim, n_layers and vocab_size"
        )
    unknown = sorted(set(params) - set(_MISTRAL_REQUIRED) - set(MISTRAL_MAMBA_DEFAULTS))
    if unknown:
        warnings.warn(
            f"{source}: ignoring field(s) {', '.join(unknown)}, which mistral_inference's Mamba does not read "
            "either (it builds the model from dim, n_layers, vocab_size, n_groups and the norm / vocabulary options)",
            UserWarning,
            stacklevel=caller_stacklevel(),
        )
    args = {**MISTRAL_MAMBA_DEFAULTS, **params}
    return {
        "d_model": args["dim"],
        "d_intermediate": 0,
        "n_layer": args["n_layers"],
        "vocab_size": args["vocab_size"],
        "ssm_cfg": {"layer": "Mamba2", "ngroups": args["n_groups"]},
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": args["rms_norm"],
        "residual_in_fp32": args["residual_in_fp32"],
        "fused_add_norm": args["fused_add_norm"],
        "pad_vocab_size_multiple": args["pad_vocab_size_multiple"],
        "tie_embeddings": args["tie_embeddings"],
        **MISTRAL_TOKEN_IDS,
    }
