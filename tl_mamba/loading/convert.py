"""Map checkpoint tensor names to tl_mamba parameter names, with strict checking.

Checkpoint names (both layouts; transformers says ``embeddings``, mamba_ssm ``embedding``)::

    backbone.embedding(s).weight          -> embed.W_E                 [v, d]
    backbone.layers.{l}.norm.weight       -> blocks.{l}.ln1.w          [d]
    backbone.layers.{l}.mixer.<name>      -> blocks.{l}.mixer.<name>
    backbone.norm_f.weight                -> ln_final.w                [d]
    lm_head.weight                        -> unembed.weight            [v, d]  (untied only)

A backbone saved on its own (transformers ``MambaModel``: no ``backbone.`` prefix, no
lm_head) is accepted too when the embeddings are tied. So are these names under one
prefix shared by every key (a wrapper module: Mistral's native ``consolidated.safetensors``
stores ``model.backbone...``, ``model.lm_head.weight``; ``torch.compile`` adds
``_orig_mod.``, DDP ``module.``): see :func:`wrapper_prefix`.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Tuple

import torch

from ..config import HookedMambaConfig
from .errors import CheckpointMismatchError

# Non-persistent buffers of transformers' Falcon-Mamba mixer (weightless RMS norms on
# dt_low, B and C). They are not saved by save_pretrained, but older exports may hold
# them; they carry no information when they are all ones.
_IGNORABLE_ONES = ("dt_layernorm.weight", "b_layernorm.weight", "c_layernorm.weight")

_LAYER_RE = re.compile(r"^layers\.(\d+)\.(.+)$")

# the embedding's names, with the backbone prefix first (see wrapper_prefix)
_EMBED_NAMES = ("backbone.embedding.weight", "backbone.embeddings.weight", "embedding.weight", "embeddings.weight")


def _embedding_prefix(keys: List[str]) -> str:
    """The text in front of the first key that ends in an embedding name; '' if none does, or
    if a key is an embedding name as it is."""
    if any(key in _EMBED_NAMES for key in keys):
        return ""
    for name in _EMBED_NAMES:
        for key in keys:
            if key.endswith("." + name):
                return key[: -len(name)]
    return ""


def wrapper_prefix(keys) -> str:
    """The prefix (``"model."``, ``"module."``...) that every checkpoint key carries in front
    of the Mamba names, or ``""``.

    It is the text before the embedding's name (``backbone.embedding(s).weight``, or
    ``embedding(s).weight`` for a bare backbone), and only counts when every key starts with
    it and no key is an embedding name as it is. Removing it is then safe: all the names
    are checked strictly afterwards.
    """
    keys = list(keys)
    prefix = _embedding_prefix(keys)
    return prefix if prefix and all(key.startswith(prefix) for key in keys) else ""


def expected_param_shapes(cfg: HookedMambaConfig) -> Dict[str, Tuple[int, ...]]:
    """Every tensor a model built from ``cfg`` loads, with its shape.

    Mamba-1 (and Falcon-Mamba) mixer: ``in_proj.weight [2e, d]``, ``conv1d.weight
    [e, 1, k]``, ``x_proj.weight [r+2n, e]``, ``dt_proj.weight [e, r]``,
    ``dt_proj.bias [e]``, ``A_log [e, n]``, ``D [e]``, ``out_proj.weight [d, e]``.
    Mamba-2 mixer: ``in_proj.weight [2e+2gn+h, d]``, ``conv1d.weight [e+2gn, 1, k]``,
    ``dt_bias [h]``, ``A_log [h]``, ``D [h]``, ``norm.weight [e]``,
    ``out_proj.weight [d, e]``. Biases: ``conv1d.bias`` when ``cfg.conv_bias``,
    ``in_proj.bias`` / ``out_proj.bias`` when ``cfg.proj_bias``.
    """
    d, e, n, k, v = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.d_conv, cfg.d_vocab
    shapes: Dict[str, Tuple[int, ...]] = {"embed.W_E": (v, d)}
    if cfg.family == "mamba1":
        r = cfg.dt_rank
        in_dim, conv_dim = 2 * e, e
        mixer = {
            "x_proj.weight": (r + 2 * n, e),
            "dt_proj.weight": (e, r),
            "dt_proj.bias": (e,),
            "A_log": (e, n),
            "D": (e,),
        }
    else:
        h, g = cfg.n_heads, cfg.n_groups
        conv_dim = e + 2 * g * n
        in_dim = e + conv_dim + h
        mixer = {"dt_bias": (h,), "A_log": (h,), "D": (h,), "norm.weight": (e,)}
    mixer["in_proj.weight"] = (in_dim, d)
    mixer["conv1d.weight"] = (conv_dim, 1, k)
    mixer["out_proj.weight"] = (d, e)
    if cfg.conv_bias:
        mixer["conv1d.bias"] = (conv_dim,)
    if cfg.proj_bias:
        mixer["in_proj.bias"] = (in_dim,)
        mixer["out_proj.bias"] = (d,)
    for layer in range(cfg.n_layers):
        shapes[f"blocks.{layer}.ln1.w"] = (d,)
        for name, shape in mixer.items():
            shapes[f"blocks.{layer}.mixer.{name}"] = shape
    shapes["ln_final.w"] = (d,)
    if not cfg.tie_embeddings:
        shapes["unembed.weight"] = (v, d)
    return shapes


def checkpoint_name(ours: str, layout: str, *, backbone_prefix: bool = True) -> str:
    """The checkpoint name that maps to our parameter ``ours`` (inverse of the table above)."""
    prefix = "backbone." if backbone_prefix else ""
    if ours == "embed.W_E":
        return prefix + ("embedding.weight" if layout == "mamba_ssm" else "embeddings.weight")
    if ours == "ln_final.w":
        return prefix + "norm_f.weight"
    if ours == "unembed.weight":
        return "lm_head.weight"
    m = re.match(r"^blocks\.(\d+)\.(ln1\.w|mixer\..+)$", ours)
    if m is None:
        raise KeyError(ours)
    rest = "norm.weight" if m.group(2) == "ln1.w" else m.group(2)
    return f"{prefix}layers.{m.group(1)}.{rest}"


def _split_backbone(
    sd: Mapping[str, torch.Tensor], wrapper: str = ""
) -> Tuple[Dict[str, str], List[Tuple[str, str]], bool]:
    """Return ``({backbone-relative name: checkpoint name}, [(name, checkpoint name)] of the
    others, has_prefix)``; names are the checkpoint names without the ``wrapper`` prefix."""
    names = {key[len(wrapper):]: key for key in sd}
    has_prefix = any(name.startswith("backbone.") for name in names)
    inner: Dict[str, str] = {}
    other: List[Tuple[str, str]] = []
    for name, key in names.items():
        if has_prefix and name.startswith("backbone."):
            inner[name[len("backbone."):]] = key
        elif not has_prefix and name != "lm_head.weight":
            inner[name] = key
        else:
            other.append((name, key))
    return inner, other, has_prefix


def convert_state_dict(
    sd: Mapping[str, torch.Tensor],
    cfg: HookedMambaConfig,
    layout: str,
    family: str,
) -> Dict[str, torch.Tensor]:
    """Rename a checkpoint's tensors to tl_mamba's parameter names.

    ``sd`` is the checkpoint as stored (see the module docstring for the names; a
    :func:`wrapper_prefix` shared by every key is ignored), ``cfg`` the config built by
    :func:`config_from_checkpoint`. Tensors are returned unchanged (same objects, same
    dtype). With tied embeddings a stored ``lm_head.weight`` must equal the embedding and
    is dropped.

    Everything is checked before anything is returned: all missing keys, unexpected
    keys and shape mismatches are collected into one :class:`CheckpointMismatchError`,
    which names the keys as stored. When the names look wrapped in a prefix that not every
    key carries, the error says so.
    """
    expected = expected_param_shapes(cfg)
    wrapper = wrapper_prefix(sd)
    inner, others, has_prefix = _split_backbone(sd, wrapper)
    out: Dict[str, torch.Tensor] = {}
    source: Dict[str, str] = {}  # our name -> checkpoint name, for messages
    unexpected: List[str] = []
    problems: List[str] = []

    def put(ours: str, ckpt: str) -> None:
        if ours in out:
            unexpected.append(f"{ckpt} (duplicate of {source[ours]})")
            return
        out[ours] = sd[ckpt]
        source[ours] = ckpt

    for rel, ckpt in inner.items():
        if rel in ("embedding.weight", "embeddings.weight"):
            put("embed.W_E", ckpt)
        elif rel == "norm_f.weight":
            put("ln_final.w", ckpt)
        elif (m := _LAYER_RE.match(rel)) is not None:
            layer, rest = m.group(1), m.group(2)
            if rest == "norm.weight":
                put(f"blocks.{layer}.ln1.w", ckpt)
            elif rest.startswith("mixer."):
                name = rest[len("mixer."):]
                if family == "falcon_mamba" and name in _IGNORABLE_ONES:
                    if not bool(torch.all(sd[ckpt] == 1)):
                        problems.append(
                            f"{ckpt} is not all ones: Falcon-Mamba's dt/B/C norms are weightless in "
                            "tl_mamba, so a trained weight there cannot be represented"
                        )
                    continue
                ours = f"blocks.{layer}.mixer.{name}"
                if ours in expected:
                    put(ours, ckpt)
                else:
                    unexpected.append(ckpt)
            else:
                unexpected.append(ckpt)
        else:
            unexpected.append(ckpt)

    for name, ckpt in others:
        if name != "lm_head.weight":
            unexpected.append(ckpt)
        elif not cfg.tie_embeddings:
            put("unembed.weight", ckpt)
        else:
            embed = out.get("embed.W_E")
            head = sd[ckpt]
            if embed is not None and (head.shape != embed.shape or not torch.equal(head, embed.to(head.dtype))):
                problems.append(
                    "lm_head.weight differs from the embedding, but the config says the embeddings are "
                    "tied; if the checkpoint really has a separate unembedding, load it with "
                    "tie_embeddings=False"
                )

    missing = [
        f"{wrapper}{checkpoint_name(key, layout, backbone_prefix=has_prefix or not sd)} (-> {key})"
        for key in expected
        if key not in out
    ]
    unexpected += [source[key] for key in out if key not in expected]  # checkpoint names only, as above
    if missing and unexpected and not wrapper:
        prefix = _embedding_prefix(list(sd))
        if prefix:
            others_count = sum(not key.startswith(prefix) for key in sd)
            problems.append(
                f"the checkpoint's names seem to carry the prefix {prefix!r} (a wrapper module): tl_mamba removes "
                f"such a prefix only when every key has it, and {others_count} key(s) here do not; remove it "
                f"yourself, e.g. {{k.removeprefix({prefix!r}): v for k, v in state_dict.items()}}"
            )
    misshapen = [
        (source[key], key, expected[key], tuple(t.shape))
        for key, t in out.items()
        if key in expected and tuple(t.shape) != expected[key]
    ]
    if missing or unexpected or misshapen or problems:
        context = f"{family}, {cfg.n_layers} layers, d_model={cfg.d_model}, d_vocab={cfg.d_vocab}"
        raise CheckpointMismatchError(missing, unexpected, misshapen, problems, context=context)
    return out
