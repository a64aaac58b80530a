"""What every hooked Mamba model shares: tokens in, logits out, caching, generation.

A family (``HookedMamba``, ``HookedMamba2``) supplies its block class; this base
supplies the TransformerLens-facing surface:

- ``forward`` with TransformerLens' arguments (return types, loss, attention
  masks, ``start_at_layer`` / ``stop_at_layer``, strings);
- ``run_with_cache`` returning a ``MambaActivationCache``, with heavy hooks left
  out unless named and ``pos_slice`` cutting the position axis of every hook;
- the ``RecurrentState`` a forward can start from and return (generation, state patching);
- from its two other bases: the tokenizer helpers and the checks on token input
  (``to_tokens``, ``to_str_tokens`` ..., padding; ``tokens.TokensMixin``), and
  ``generate``, which is the same forward run one token at a time on a carried
  ``RecurrentState``, so hooks fire at every step (``generation.GenerationMixin``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from transformer_lens.hook_points import HookPoint

try:  # transformer-lens 4.x
    from transformer_lens.HookedRootModule import HookedRootModule
except ImportError:  # transformer-lens 3.x
    from transformer_lens.hook_points import HookedRootModule  # type: ignore

from tl_mamba.backends import resolve_backend, validate_backend
from tl_mamba.cache import MambaActivationCache, as_slice
from tl_mamba.config import HookedMambaConfig
from tl_mamba.errors import NotAnIndexError, OutOfRangeError
from tl_mamba.hidden_attention import conv_attention as _conv_attention
from tl_mamba.hidden_attention import hidden_attention as _hidden_attention
from tl_mamba.knockout import warn_knockouts_on_padding
from tl_mamba.models.components import CheckedHookPoint, Embed, RMSNorm, Unembed
from tl_mamba.models.generation import GenerationMixin
from tl_mamba.models.tokens import TokensMixin, _check_token_dtype, leading_padding, trailing_padding
from tl_mamba.ops.precision import upcast

#: Hooks whose tensors are O(p·e·n) or O(p²): computed only when hooked or named in a cache.
HEAVY_HOOKS = ("hook_h", "hook_ssm_mask")

#: Refuse to materialise a heavy hook larger than this (bytes); see ``heavy_hook_memory_limit``.
DEFAULT_HEAVY_HOOK_LIMIT = 8 * 2**30


def is_heavy_hook(name: str) -> bool:
    """True for hooks that are computed only on demand (``hook_h``, ``hook_ssm_mask``)."""
    return name.rsplit(".", 1)[-1] in HEAVY_HOOKS


def hook_is_active(hook_point: HookPoint) -> bool:
    """Whether a forward or backward hook is attached: TransformerLens' (``add_hook``, any
    transformer-lens version) or torch's own (``hook_point.register_forward_hook``), which
    TransformerLens' hooks are built on. Work done only for a hook (the heavy hooks, an unfused
    gate) is skipped when this is False, so a hook it missed would never be called. (Forward
    pre-hooks and torch's global module hooks are not looked at: a hook point's input is its
    output.)"""
    return bool(hook_point._forward_hooks) or bool(hook_point._backward_hooks)


@contextlib.contextmanager
def _hooks_set_aside(model) -> Iterator[None]:
    """Detach every hook of ``model``'s hook points for the block, then put them back as they
    were: torch's hook dicts (emptied and refilled in place, since the handles that remove a
    hook refer to them), TransformerLens' handle lists (which it replaces when it removes a
    hook) and the Knockout registry."""
    held = []
    for point in model.hook_dict.values():
        dicts = [(hooks, dict(hooks)) for hooks in (point._forward_hooks, point._backward_hooks)]
        attributes = {name: getattr(point, name) for name in ("fwd_hooks", "bwd_hooks", "_tl_mamba_knockouts")
                      if getattr(point, name, None) is not None}
        held.append((point, dicts, attributes))
        for hooks, _ in dicts:
            hooks.clear()
        for name, value in attributes.items():
            setattr(point, name, type(value)())
    try:
        yield
    finally:
        for point, dicts, attributes in held:
            for hooks, contents in dicts:
                hooks.clear()
                hooks.update(contents)
            for name, value in attributes.items():
                setattr(point, name, value)


def mixer_input(hook_point: HookPoint, resid_pre: Tensor) -> Tensor:
    """What ``hook_mixer_in`` is given: a copy of ``resid_pre`` while a hook is attached, so that
    an in-place edit there reaches only this block's mixer (as TransformerLens copies the
    residual stream into ``hook_attn_in`` / ``hook_mlp_in``), else ``resid_pre`` itself."""
    return resid_pre.clone() if hook_is_active(hook_point) else resid_pre


def run_hook_on_slice(hook_point: HookPoint, tensor: Tensor) -> Tensor:
    """``hook_point(tensor)`` for a tensor that is a slice of a larger one (a part of a split
    projection), handed to a hook as a tensor of its own:

    - contiguous: hooks and cache users (sae-lens, ``cache[name].view(-1, d)``) flatten
      activations with ``.view``, which a strided slice refuses;
    - under autograd, not a view: autograd refuses an in-place edit (``act[:, 4] += 0.5``, the
      usual TransformerLens edit) of one of several views a split returned.

    Unhooked, nothing is copied.
    """
    if hook_is_active(hook_point) and (not tensor.is_contiguous()
                                       or (tensor._base is not None and tensor.requires_grad
                                           and torch.is_grad_enabled())):
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return hook_point(tensor)


class Output(NamedTuple):
    """``forward(..., return_type="both")``: a ``(logits, loss)`` tuple whose fields also have names,
    as HookedTransformer's ``Output``."""

    logits: Tensor
    loss: Tensor


@dataclass
class RecurrentState:
    """Per-layer recurrent state carried across forward calls (generation).

    ``layers[l]`` holds ``"conv"`` (the last k-1 conv inputs, ``[b, c, k-1]``) and
    ``"ssm"`` (the SSM state: ``[b, e, n]`` for Mamba-1, ``[b, h, hd, n]`` for
    Mamba-2). A forward given a state continues from it and writes the new one back.
    """

    layers: List[Dict[str, Optional[Tensor]]] = field(default_factory=list)
    seqlen_offset: int = 0
    #: ``[b]``: each row's left padding in the call that started the state (None: none), so that
    #: hooks of later calls still know where each prompt's tokens begin (``HookedSSM.leading_pads``)
    leading_pads: Optional[Tensor] = None

    @classmethod
    def empty(cls, n_layers: int) -> "RecurrentState":
        return cls(layers=[{"conv": None, "ssm": None} for _ in range(n_layers)])


class HookedSSM(TokensMixin, GenerationMixin, HookedRootModule):
    """Base class of the hooked Mamba families. Subclasses set ``family`` and ``block_cls``."""

    family: str = ""
    block_cls: type = nn.Module
    #: scan implementations the family has (``set_backend`` refuses others)
    scan_backends: tuple = ("reference", "torch", "triton")

    def __init__(self, cfg: Union[HookedMambaConfig, dict, Any], tokenizer: Any = None):
        """A model with random weights (``cfg.seed`` seeds them) from ``cfg``: a
        :class:`HookedMambaConfig`, a dict of its fields (``family`` defaults to this class's), or a
        transformers ``MambaConfig`` / ``FalconMambaConfig`` / ``Mamba2Config``."""
        super().__init__()
        if isinstance(cfg, dict):
            cfg = HookedMambaConfig(**{"family": self.family, **cfg})
        elif not isinstance(cfg, HookedMambaConfig):
            from tl_mamba.loading import config_from_transformers

            cfg = config_from_transformers(cfg, type(self))
        if cfg.family != self.family:
            default = " (HookedMambaConfig's default family)" if cfg.family == "mamba1" else ""
            other = "HookedMamba" if self.family == "mamba2" else "HookedMamba2"
            raise ValueError(f"{type(self).__name__} builds {self.family} models but the config is for "
                             f"{cfg.family}{default}: build it with family={self.family!r}, or use {other}")
        if cfg.dtype is not None and not (isinstance(cfg.dtype, torch.dtype) and cfg.dtype.is_floating_point):
            raise TypeError(f"cfg.dtype must be a floating-point torch dtype (torch.float32, torch.float16, "
                            f"torch.bfloat16 or torch.float64), got {cfg.dtype!r}")
        # a copy: .to() / .half() keep cfg.device / cfg.dtype in step with this model's weights,
        # which must not rewrite another model built from the same config object
        self.cfg = cfg = copy.deepcopy(cfg)
        self._padding_side_agreed = cfg.default_padding_side
        self.tokenizer = tokenizer  # the property's setter: set_tokenizer's padding-side sync
        self._backend = None  # None: follow TL_MAMBA_BACKEND
        self._position_offset: Optional[int] = None  # see position_offset
        self._padding_mask: Optional[Tensor] = None  # see padding_mask
        self._leading_pads: Optional[Tensor] = None  # see leading_pads
        self._sequence_grows = False  # True inside generate
        self.heavy_hook_memory_limit = DEFAULT_HEAVY_HOOK_LIMIT
        dtype = cfg.dtype
        self.embed = Embed(cfg.d_vocab, cfg.d_model, dtype)
        self.hook_embed = CheckedHookPoint()  # [b, p, d]
        self.blocks = nn.ModuleList([self.block_cls(cfg, layer) for layer in range(cfg.n_layers)])
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps, dtype, apply_weight=False)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab_out, dtype, self.embed if cfg.tie_embeddings else None,
                               final_norm=self.ln_final)
        if torch.device(cfg.device if cfg.device is not None else "cpu").type != "meta":
            self.reset_parameters()  # on the meta device there are no values to initialise (loading builds there)
        self.setup()
        for block in self.blocks:
            block.model_ref = [self]  # list: keep the root out of the block's module tree
        self.to(cfg.device if cfg.device is not None else "cpu")
        self.eval()  # no dropout anywhere; TransformerLens' patching refuses models in training mode

    def _apply(self, fn, *args, **kwargs):
        # keep cfg.device / cfg.dtype in step with the weights after .to(), .cuda(), .half() ...
        # (TransformerLens utilities such as transformer_lens.patching read cfg.device)
        result = super()._apply(fn, *args, **kwargs)
        if hasattr(self, "embed"):
            self.cfg.device = str(self.embed.W_E.device)
            self.cfg.dtype = self.embed.W_E.dtype
        return result

    # ------------------------------------------------------------------ weights
    def reset_parameters(self) -> None:
        """Random initialisation in the style of mamba_ssm (seeded by ``cfg.seed`` when set)."""
        gen = torch.Generator().manual_seed(self.cfg.seed) if self.cfg.seed is not None else None
        with torch.no_grad():
            self.embed.W_E.copy_(torch.randn(self.embed.W_E.shape, generator=gen) * self.cfg.initializer_range)
            if not self.cfg.tie_embeddings:
                self.unembed.weight.copy_(
                    torch.randn(self.unembed.weight.shape, generator=gen) * self.cfg.initializer_range
                )
            for block in self.blocks:
                block.reset_parameters(gen)

    @property
    def W_E(self) -> Tensor:
        """``[d_vocab, d_model]`` embedding."""
        return self.embed.W_E

    @property
    def W_U(self) -> Tensor:
        """``[d_model, d_vocab]`` unembedding with the final RMSNorm weight folded in.

        ``cache.apply_ln_to_stack(resid) @ W_U`` gives the logits.
        """
        return self.unembed.W_U

    @property
    def b_U(self) -> Tensor:
        return torch.zeros(self.cfg.d_vocab_out, dtype=self.cfg.dtype, device=self.W_E.device)

    def __getattr__(self, name: str):
        """``nn.Module``'s lookup (parameters, buffers, submodules); for a transformer's attribute
        that a TransformerLens user reaches for (``W_Q``, ``W_in``, ``OV``, ``set_use_attn_result``),
        an ``AttributeError`` that says what a Mamba model has instead."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            analogue = transformer_attribute_analogue(name)
            if analogue is None:
                raise
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}: {analogue}") from None

    def tokens_to_residual_directions(self, tokens: Union[str, int, Tensor]) -> Tensor:
        """Residual directions ``W_U[:, token]`` (``[d]`` for one token, ``[..., d]`` for a tensor)."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        # an int is a 0-d tensor here: W_U[:, t] is then [d], as for the int itself
        tokens = self._ids_to_read(tokens, "tokens_to_residual_directions", max_dims=None).to(self.W_E.device)
        return self.W_U[:, tokens].movedim(0, -1)

    # ------------------------------------------------------------------ memory guard
    @property
    def heavy_hook_memory_limit(self) -> float:
        """Bytes a heavy hook (``hook_h``, ``hook_ssm_mask``), a ``hidden_attention`` result or a
        cache stack may take before a ``MemoryError`` refuses it: 8 GiB by default, per hook.
        Set a number of bytes, or ``None`` (read back as ``math.inf``) for no limit."""
        return self._heavy_hook_memory_limit

    @heavy_hook_memory_limit.setter
    def heavy_hook_memory_limit(self, limit: Optional[float]) -> None:
        if limit is None:
            limit = math.inf
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise TypeError(f"heavy_hook_memory_limit is a number of bytes (or None for no limit), got "
                            f"{type(limit).__name__}")
        if not limit > 0:  # NaN too
            raise ValueError(f"heavy_hook_memory_limit must be a positive number of bytes, got {limit}")
        self._heavy_hook_memory_limit = limit

    # ------------------------------------------------------------------ backend
    @property
    def backend(self) -> str:
        """The scan backend name set (``"auto"`` unless changed or ``TL_MAMBA_BACKEND`` says otherwise)."""
        from tl_mamba.backends import default_backend

        return self._backend if self._backend is not None else default_backend()

    def set_backend(self, name: Optional[str]) -> "HookedSSM":
        """Choose the scan implementation: ``"auto" | "torch" | "triton" | "reference"``.

        Only speed changes with the backend, never results. ``None`` goes back to
        following ``TL_MAMBA_BACKEND``.
        """
        if name is None:
            self._backend = None
            return self
        name = validate_backend(name)
        resolve_backend(name, self.W_E.device, available=self.scan_backends)  # raise now if it cannot run here
        self._backend = name
        return self

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, device=None, dtype=torch.float32, *, tokenizer=None, **kwargs):
        """Load a hub id or local directory (mamba_ssm, transformers or Mistral-native layout).

        ``dtype``: a floating-point torch dtype, a name (``"float16"`` ...) or ``"auto"``
        (the checkpoint's own dtype).

        The weights go straight into the model: no random initialisation runs first. The
        model's memory is its own: nothing written into the checkpoint's files later reaches it."""
        from tl_mamba.loading import load_pretrained

        return load_pretrained(cls, name_or_path, device=device, dtype=dtype, tokenizer=tokenizer, **kwargs)

    def save_pretrained(self, path, layout: str = "mamba_ssm") -> "Path":
        """Write a checkpoint (``config.json``, the weights, ``generation_config.json``, the
        tokenizer) to ``path``.

        ``layout``: ``"mamba_ssm"`` (default: ``pytorch_model.bin``, which mamba_ssm's
        ``from_pretrained`` loads; not for Falcon-Mamba, nor for an RMSNorm eps other than
        1e-5) or ``"transformers"`` (``model.safetensors``, which transformers'
        ``from_pretrained`` also loads). Both load back with ``tl_mamba.from_pretrained``.
        See :func:`tl_mamba.loading.save.save_pretrained`."""
        from tl_mamba.loading.save import save_pretrained

        return save_pretrained(self, path, layout=layout)

    @classmethod
    def from_hf(cls, hf_model, tokenizer=None, *, device=None, dtype=None, **cfg_overrides):
        """Build from an in-memory transformers model (weights are copied): ``MambaForCausalLM`` and
        ``FalconMambaForCausalLM`` give a ``HookedMamba``, ``Mamba2ForCausalLM`` a ``HookedMamba2``,
        whichever class this is called on (as ``tl_mamba.from_hf``).

        ``device`` and ``dtype`` default to those of ``hf_model``'s parameters (``dtype`` also
        takes names such as ``"float16"``, or ``"auto"``); ``cfg_overrides`` replace any
        :class:`HookedMambaConfig` field. See :func:`tl_mamba.loading.from_hf`."""
        from tl_mamba.loading import from_hf_any

        return from_hf_any(hf_model, tokenizer, model_cls=cls, device=device, dtype=dtype, **cfg_overrides)

    # ------------------------------------------------------------------ forward
    def _loss_tokens(self, tokens, shape) -> Tensor:
        """The ``tokens=`` of a loss with ``start_at_layer``: ids of the residual stream's ``[b, p]`` positions."""
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a token tensor [batch, pos], got {type(tokens).__name__}")
        if tokens.dim() == 1:
            tokens = tokens[None]
        _check_token_dtype(tokens, "tokens")
        if tuple(tokens.shape) != tuple(shape):
            raise ValueError(
                f"tokens has shape {tuple(tokens.shape)}, but the residual stream given with start_at_layer is "
                f"[b, p] = {tuple(shape)}: the loss needs the tokens of those positions"
            )
        self._check_token_ids(tokens, what="tokens")
        return tokens.long()

    def forward(
        self,
        input,
        return_type: Optional[str] = "logits",
        loss_per_token: bool = False,
        attention_mask: Optional[Tensor] = None,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        start_at_layer: Optional[int] = None,
        stop_at_layer: Optional[int] = None,
        tokens: Optional[Tensor] = None,
        state: Optional[RecurrentState] = None,
    ):
        """Run the model.

        Args:
            input: token tensor ``[b, p]``, a string or a list of strings; with
                ``start_at_layer`` the residual stream ``[b, p, d]`` into that layer.
            return_type: ``"logits"`` ``[b, p, v]``, ``"loss"``, ``"both"`` (an ``Output``
                tuple ``(logits, loss)``, fields ``.logits`` / ``.loss``) or None.
            loss_per_token: return the loss per position ``[b, p-1]`` instead of the mean.
            attention_mask: ``[b, p]``, 1 at real tokens. Left or right padding; each
                prompt's real tokens get the logits of that prompt run alone.
            prepend_bos / padding_side: how strings are tokenized.
            start_at_layer / stop_at_layer: run blocks ``[start, stop)``. With
                ``stop_at_layer`` the residual stream ``[b, p, d]`` is returned. ``start``
                after ``stop`` is a ``ValueError``; equal runs no block.
            tokens: the tokens, for the loss when ``start_at_layer`` is used: ``[b, p]``,
                the positions of the residual stream given as input.
            state: a ``RecurrentState`` to continue from; it is updated in place.

        The loss needs at least 2 positions (it predicts each token from those before
        it), and its mean at least one sequence: anything less is a ``ValueError``.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        n_layers = self.cfg.n_layers
        start = 0 if start_at_layer is None else _layer_index(start_at_layer, n_layers, "start_at_layer")
        stop = n_layers if stop_at_layer is None else _layer_index(stop_at_layer, n_layers, "stop_at_layer")
        if start > stop:
            raise ValueError(
                f"start_at_layer={start_at_layer} is after stop_at_layer={stop_at_layer} (blocks [{start}, {stop}) "
                "would run none): start_at_layer must be <= stop_at_layer"
            )
        wants_loss = return_type in ("loss", "both") and stop_at_layer is None
        if state is not None and not isinstance(state, RecurrentState):
            raise TypeError(f"state must be a tl_mamba RecurrentState (RecurrentState.empty(model.cfg.n_layers) to "
                            f"start one), got {type(state).__name__}")
        with self._positions_of(state):  # hooks read model.position_offset
            if start_at_layer is None:
                tokens, attention_mask = self._prepare_input(input, attention_mask, prepend_bos, padding_side,
                                                             continuing=state is not None and state.seqlen_offset > 0)
                self._note_padding(attention_mask, state, tokens)  # for hooks: padding_mask, leading_pads
                resid = self.hook_embed(self.embed(tokens))
            else:
                resid = input
                if not isinstance(resid, Tensor) or resid.dim() != 3 or resid.shape[-1] != self.cfg.d_model:
                    raise ValueError(
                        f"with start_at_layer, input must be the residual stream [b, p, {self.cfg.d_model}]")
                if attention_mask is not None:
                    attention_mask = self._check_mask(attention_mask, resid.shape[:2])
                self._note_padding(attention_mask, state)
                if wants_loss:
                    if tokens is None:
                        raise ValueError("the loss needs tokens: pass tokens=... when using start_at_layer")
                    tokens = self._loss_tokens(tokens, resid.shape[:2])
            if wants_loss:
                _check_loss_shape(tokens.shape, loss_per_token)
            if self.cfg.residual_in_fp32:
                resid = upcast(resid)
            if state is not None:
                self._check_state(state, resid.shape[0])
                self._check_state_call(state, attention_mask, start, stop)
                if state.seqlen_offset == 0:  # where each row's tokens begin, for the calls that continue it
                    state.leading_pads = self._leading_pads
            if attention_mask is not None and state is None:  # positions index this whole sequence
                warn_knockouts_on_padding(self, attention_mask)
            for layer in range(start, stop):
                resid = self.blocks[layer](
                    resid, attention_mask=attention_mask, layer_state=state.layers[layer] if state is not None else None
                )
            if state is not None:
                state.seqlen_offset += resid.shape[1]
            if stop_at_layer is not None:
                return resid
            logits = self.unembed(self.ln_final(resid), self.ln_final.w)
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        loss = self.loss_fn(logits, tokens, attention_mask, per_token=loss_per_token)
        return loss if return_type == "loss" else Output(logits, loss)

    def loss_fn(
        self,
        logits: Tensor,
        tokens: Tensor,
        attention_mask: Optional[Tensor] = None,
        per_token: bool = False,
    ) -> Tensor:
        """Next-token cross entropy of ``logits [b, p, v]`` on ``tokens [b, p]``, as
        TransformerLens's ``loss_fn`` (``transformer_lens.utilities.lm_cross_entropy_loss``); the forward's loss.

        Args:
            logits: ``[b, p, v]`` (the last position predicts nothing and is unused).
            tokens: ``[b, p]`` token ids.
            attention_mask: ``[b, p]``, 1 at real tokens: a prediction counts only where it
                and its target are real tokens.
            per_token: return ``[b, p-1]`` (0 where masked) instead of the mean over the
                counted predictions.

        Computed in float32 at least. Needs ``p >= 2`` (and ``b >= 1`` for the mean).
        """
        if tokens.dim() == 1:
            tokens = tokens[None]
        if logits.dim() != 3 or tuple(tokens.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"loss_fn needs logits [b, p, v] and tokens [b, p] of the same b, p, got "
                             f"{tuple(logits.shape)} and {tuple(tokens.shape)}")
        _check_token_dtype(tokens, "tokens")
        _check_loss_shape(tokens.shape, per_token)
        if attention_mask is not None:
            attention_mask = attention_mask.to(logits.device)
            if tuple(attention_mask.shape) != tuple(tokens.shape):
                raise ValueError(f"attention_mask must have shape {tuple(tokens.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
        return _lm_loss(logits, tokens.long(), attention_mask, per_token=per_token)

    @property
    def position_offset(self) -> Optional[int]:
        """Where the running forward's first position lies in its sequence, for hooks: the
        tokens a ``RecurrentState`` has already consumed (generate's prefill 0, each later
        one-token step the length so far), or None in a forward without a state (the run is
        the whole sequence) and outside a forward. ``generate(use_past_kv_cache=False)``'s
        re-runs of the sequence so far have 0: a sequence that grows. The ablation hooks of
        ``tl_mamba.circuits.ablation`` read it, so their positions name places of the whole
        sequence under ``generate`` too (a place not yet generated is not an error)."""
        return self._position_offset

    @property
    def padding_mask(self) -> Optional[Tensor]:
        """The running forward's padding, for hooks: its ``attention_mask`` ``[b, p]`` as the forward
        reads it (given, or inferred from leading pad tokens; with neither, each row's trailing run of
        pad tokens, ``to_tokens``' right padding, which the forward itself needs no mask for), None
        where it has no padding and outside a forward. Positions of a padded batch are its columns;
        ``leading_pads`` says where each row's tokens begin."""
        if callable(self._padding_mask):  # the trailing pad runs, found when a hook first asks
            self._padding_mask = self._padding_mask()
        return self._padding_mask

    @property
    def leading_pads(self) -> Optional[Tensor]:
        """Each row's left padding ``[b]`` in the sequence the running forward belongs to, for hooks:
        the running forward's, or, in a call that continues a ``RecurrentState`` (generate's steps),
        that of the call that started it. Column c of row r holds the prompt's token
        ``position_offset + c - leading_pads[r]``. None where no row is left-padded, and outside a
        forward. The place-based ablations of ``tl_mamba.circuits.ablation`` (per-position means,
        resampling) read it, so each prompt's token t takes the value of place t."""
        return self._leading_pads

    def _note_padding(self, attention_mask: Optional[Tensor], state: Optional["RecurrentState"],
                      tokens: Optional[Tensor] = None) -> None:
        # what padding_mask / leading_pads report during this forward (see them); a call that
        # continues a state has no padding of its own, and the left padding of the call that began it
        self._padding_mask = attention_mask
        if state is not None and state.seqlen_offset > 0:
            self._leading_pads = state.leading_pads
            return
        if attention_mask is None and tokens is not None and self.tokenizer is not None:
            # to_tokens' right padding, which the forward needs no mask for: for the hooks only, and
            # found only if one asks (finding it waits for the device)
            self._padding_mask = functools.partial(trailing_padding, tokens, self._pad_id())
        lead = None if attention_mask is None else leading_padding(attention_mask)
        self._leading_pads = lead if lead is not None and bool(lead.any()) else None

    @contextlib.contextmanager
    def _positions_of(self, state: Optional["RecurrentState"]):
        # (a forward inside a hook sees its own offset and padding, and restores the outer one's after)
        previous = self._position_offset, self._sequence_grows, self._padding_mask, self._leading_pads
        grows = self._sequence_grows
        # generate's re-runs (no state) start at place 0 of a sequence that grows: 0, not None.
        # The flag is generate's own forward's: a forward that a hook starts is a sequence of its own
        self._position_offset = int(state.seqlen_offset) if state is not None else 0 if grows else None
        self._sequence_grows = False
        self._padding_mask = self._leading_pads = None
        try:
            yield
        finally:
            self._position_offset, self._sequence_grows, self._padding_mask, self._leading_pads = previous

    # ------------------------------------------------------------------ hook names
    def check_hook_name(self, name: str) -> None:
        """Raise a ``ValueError`` naming ``name`` (and close matches) if it is not a hook of this model."""
        if name in self.hook_dict:
            return
        raise ValueError(
            f"{name!r} is not a hook of {type(self).__name__}.{hook_name_hint(name, self.hook_dict, self.family)} "
            "model.hook_dict lists them all (docs/hooks.md has their shapes)."
        )

    def add_hook(self, name, hook, *args, **kwargs):
        if isinstance(name, str):
            self.check_hook_name(name)
        return super().add_hook(name, hook, *args, **kwargs)

    def _enable_hook_with_name(self, name, hook, dir):
        self.check_hook_name(name)
        return super()._enable_hook_with_name(name, hook, dir)

    # ------------------------------------------------------------------ caching
    def get_caching_hooks(
        self,
        names_filter=None,
        incl_bwd: bool = False,
        device=None,
        remove_batch_dim: bool = False,
        cache: Optional[dict] = None,
        pos_slice=None,
    ):
        """Hooks that store activations. ``names_filter=None`` takes every hook but the heavy ones.

        ``pos_slice`` cuts the position axis of every hook (axis 1; the target axis
        2 of ``hook_ssm_mask``).
        """
        cache = {} if cache is None else cache
        given_pos_slice, pos_slice = pos_slice, as_slice(pos_slice)
        names_filter = _names_filter(names_filter, set(self.hook_dict), self.family)
        self.is_caching = True

        def save_hook(tensor: Tensor, hook: HookPoint, is_backward: bool = False):
            name = hook.name + ("_grad" if is_backward else "")
            value = tensor.detach()
            if device is not None:
                value = value.to(device)
            if value.dim() >= 2:
                dim = 2 if hook.name.endswith("hook_ssm_mask") else 1
                try:
                    value = pos_slice.apply(value, dim=dim)
                except IndexError as err:  # TransformerLens's message names neither the argument nor the hook
                    raise OutOfRangeError(f"pos_slice={given_pos_slice!r} is out of range for "
                                          f"{hook.name}, which has {value.shape[dim]} positions") from err
            if remove_batch_dim and value.shape[0] == 1:
                value = value[0]
            cache[name] = value

        fwd, bwd = [], []
        for name in self.hook_dict:
            if names_filter(name):
                fwd.append((name, partial(save_hook, is_backward=False)))
                if incl_bwd:
                    bwd.append((name, partial(save_hook, is_backward=True)))
        return cache, fwd, bwd

    def run_with_cache(
        self,
        *model_args,
        names_filter=None,
        device=None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice=None,
        return_cache_object: bool = True,
        **model_kwargs,
    ):
        """Run and cache activations; returns ``(output, MambaActivationCache)``.

        Heavy hooks (``hook_h``, ``hook_ssm_mask``) are cached only when
        ``names_filter`` names them. ``pos_slice`` cuts the position axis of every
        hook; the cache records it as ``cache.pos_slice`` (None when every position is
        cached). ``remove_batch_dim=True`` needs a batch of one, whatever the input's
        form (tokens, a string, a list of strings, positional or ``input=``): a larger
        batch is a ``ValueError``.
        """
        if remove_batch_dim:
            batch = _input_batch_size(model_args[0] if model_args else model_kwargs.get("input"))
            if batch is not None and batch != 1:
                raise ValueError(f"remove_batch_dim=True needs batch size 1, got {batch}")
        cache_dict, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim, pos_slice=pos_slice
        )
        with self.hooks(fwd_hooks=fwd, bwd_hooks=bwd, reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                if not isinstance(out, Tensor) or out.numel() != 1:
                    raise ValueError("incl_bwd=True needs a scalar output: use return_type='loss'")
                out.backward()
        if not return_cache_object:
            return out, cache_dict
        return out, MambaActivationCache(cache_dict, self, has_batch_dim=not remove_batch_dim, pos_slice=pos_slice)

    def add_caching_hooks(
        self,
        names_filter=None,
        incl_bwd: bool = False,
        device=None,
        remove_batch_dim: bool = False,
        cache: Optional[dict] = None,
    ) -> dict:
        """Attach hooks that store activations in ``cache`` (returned; a new dict by default).

        TransformerLens's ``add_caching_hooks``, with ``run_with_cache``'s hooks: the default
        ``names_filter=None`` takes every hook but the heavy ones (``hook_h``,
        ``hook_ssm_mask``), which are cached only when named. Run the model to fill the
        cache, and ``reset_hooks()`` to remove the hooks. With ``remove_batch_dim`` a
        leading batch axis of size 1 is dropped (a larger one is kept, as in TransformerLens).
        """
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim=remove_batch_dim,
                                                 cache=cache)
        for name, hook in fwd:
            self.hook_dict[name].add_hook(hook, dir="fwd")
        for name, hook in bwd:
            self.hook_dict[name].add_hook(hook, dir="bwd")
        return cache

    # ------------------------------------------------------------------- knockout
    def knockouts(self, *knockouts):
        """Context manager: ``with model.knockouts(ko):`` runs every forward with the knockouts.

        ``knockouts`` is a ``Knockout``, a list of them, or several as arguments
        (``model.knockouts(ko1, ko2)``); their union is removed.
        They are ordinary hooks (``hook_ssm_mask`` for the SSM path, ``hook_conv`` for the
        conv path, which removes the taps of what the conv read: ``hook_conv_in`` after every
        hook on it) and compose with any other hooks.
        """
        from tl_mamba.knockout import knockouts_context

        if not knockouts:
            raise TypeError("knockouts() needs a Knockout: with model.knockouts(Knockout(...)):")
        return knockouts_context(self, knockouts[0] if len(knockouts) == 1 else list(knockouts))

    def run_with_knockout(self, *model_args, knockouts=None, fwd_hooks=(), **model_kwargs):
        """``model(*model_args)`` with ``knockouts`` (a ``Knockout`` or a list) applied.

        ``run_with_knockout(tokens, ko)`` or ``run_with_knockout(tokens, knockouts=[ko1, ko2])``;
        extra ``fwd_hooks`` run alongside. Keyword arguments go to ``forward``.
        """
        from tl_mamba.knockout import Knockout

        args = list(model_args)
        if knockouts is None and len(args) >= 2 and (isinstance(args[1], Knockout) or (
                isinstance(args[1], (list, tuple)) and args[1] and all(isinstance(k, Knockout) for k in args[1]))):
            knockouts = args.pop(1)
        if knockouts is None:
            raise TypeError("run_with_knockout needs knockouts: run_with_knockout(tokens, Knockout(...))")
        with self.knockouts(knockouts):
            if fwd_hooks:
                return self.run_with_hooks(*args, fwd_hooks=list(fwd_hooks), **model_kwargs)
            return self(*args, **model_kwargs)

    def _check_state_call(self, state: RecurrentState, attention_mask: Optional[Tensor], start: int,
                          stop: int) -> None:
        """Raise for a stateful forward whose new state would be wrong without an error later.

        - Some layers skipped (``start_at_layer`` / ``stop_at_layer``): their state would stay
          behind while ``seqlen_offset`` advances, and the next call would continue them from it.
        - Padding after a row's real tokens: the pads would fill the conv window and the SSM
          state would decay through them, so the next call would not continue the prompt.
        - Padding in a call that continues a state: the pads would stand in the conv window
          between the previous call's tokens and this call's.
        Left padding in the call that starts a state is fine (padding never reaches it).
        """
        if (start, stop) != (0, self.cfg.n_layers):
            raise ValueError(
                f"state= runs every layer: with start_at_layer / stop_at_layer only blocks [{start}, {stop}) "
                f"would advance their state, and the state of the other layers would fall behind the "
                f"{state.seqlen_offset}-token offset. Run all layers with a state, or a partial run without one.")
        if attention_mask is None:
            return
        real = attention_mask.bool()
        if state.seqlen_offset > 0 and not bool(real.all()):
            raise ValueError(
                f"this call continues a state {state.seqlen_offset} tokens in, and its attention_mask has padding: "
                "the padded positions would stand in the conv window between the previous tokens and these. "
                "Only the call that starts a state may be padded (on the left).")
        # the mask is a contiguous prefix or suffix of padding per row (_check_mask), so a row ends
        # in padding exactly when it is right-padded (generate's test too)
        if not bool(real[:, -1].all()):
            rows = torch.nonzero(~real[:, -1]).flatten().tolist()
            raise ValueError(
                f"with state=, rows {rows} have padding after real tokens (right padding): the state would carry "
                "the padding (in the conv window, and the SSM state decays through it), so the next call would "
                "not continue those prompts. Pad on the left.")

    def _check_state(self, state: RecurrentState, batch: int) -> None:
        """Raise unless ``state`` fits this model and a batch of ``batch`` rows: a state carries
        one batch of one model (reusing it for another failed deep inside the conv)."""
        cfg = self.cfg
        if len(state.layers) != cfg.n_layers:
            raise ValueError(f"state has {len(state.layers)} layers, the model {cfg.n_layers}: a RecurrentState "
                             "belongs to the model that filled it")
        ssm_shape = ((batch, cfg.d_inner, cfg.d_state) if self.family == "mamba1"
                     else (batch, cfg.n_heads, cfg.d_head, cfg.d_state))
        for layer, layer_state in enumerate(state.layers):
            conv_shape = (batch, self.blocks[layer].mixer.conv1d.weight.shape[0], cfg.d_conv - 1)
            for key, expected in (("conv", conv_shape), ("ssm", ssm_shape)):
                held = layer_state.get(key)
                if held is not None and tuple(held.shape) != expected:
                    raise ValueError(
                        f"state.layers[{layer}][{key!r}] has shape {tuple(held.shape)}, but this {self.family} model "
                        f"on a batch of {batch} needs {expected}: a RecurrentState carries one batch of one model; "
                        f"start a new one (RecurrentState.empty({cfg.n_layers})) for another batch or model"
                    )

    def hidden_attention(self, input_or_cache, layer: int, heads=None, channels=None, reduce: Optional[str] = None,
                         **kwargs):
        return _hidden_attention(self, input_or_cache, layer, heads=heads, channels=channels, reduce=reduce, **kwargs)

    # help(model.hidden_attention) shows the whole docstring: shapes, and the memory the result needs
    hidden_attention.__doc__ = _hidden_attention.__doc__

    def conv_attention(self, input_or_cache, layer: int, channels=None, reduce: Optional[str] = None, **kwargs):
        return _conv_attention(self, input_or_cache, layer, channels=channels, reduce=reduce, **kwargs)

    conv_attention.__doc__ = _conv_attention.__doc__

    def hook_shapes(self, tokens: Optional[Tensor] = None) -> Dict[str, tuple]:
        """Every hook name with the shape it holds on ``tokens`` (default ``[1, 4]``), heavy hooks included.

        The hooks attached to the model's hook points (knockouts, edits, caches) are set aside
        for this forward: they cannot change a shape (a hook returning another shape is refused), but
        one written for longer prompts (a knockout of position 9) would fail on these tokens.
        """
        if tokens is None:
            tokens = torch.zeros(1, 4, dtype=torch.long, device=self.W_E.device)
        shapes: Dict[str, tuple] = {}

        def record(tensor, hook):
            shapes[hook.name] = tuple(tensor.shape)

        with _hooks_set_aside(self), torch.no_grad():
            self.run_with_hooks(tokens, fwd_hooks=[(lambda name: True, record)], return_type=None)
        return shapes


def _check_loss_shape(shape, per_token: bool) -> None:
    """A next-token loss needs something to predict (p >= 2) and, for its mean, a sequence (b >= 1)."""
    b, p = shape
    if p < 2:
        raise ValueError(
            f"the loss needs at least 2 positions (it predicts each token from those before it), got p={p}: "
            "there is nothing to predict"
        )
    if b == 0 and not per_token:
        raise ValueError("the loss of an empty batch (b=0) is undefined: it needs at least one sequence")


def _lm_loss(logits: Tensor, tokens: Tensor, attention_mask: Optional[Tensor], per_token: bool) -> Tensor:
    """Next-token cross entropy; padded positions are excluded (and zero per token)."""
    log_probs = F.log_softmax(upcast(logits[:, :-1]), dim=-1)  # fp32 at least; float64 stays (gradchecks)
    loss = -log_probs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]  # [b, p-1]
    if attention_mask is None:
        return loss if per_token else loss.mean()
    valid = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(loss.dtype)
    loss = loss * valid
    return loss if per_token else loss.sum() / valid.sum().clamp(min=1)


_TRANSFORMER_HOOK = re.compile(r"^blocks\.(\d+)\.(?:(attn|mlp|ln2)\.)?(hook_\w+)$")


def transformer_hook_analogue(name: str, family: str) -> Optional[str]:
    """For a transformer hook name, what a Mamba block has in its place (None for other names).

    A close spelling match would mislead here: ``attn.hook_z`` (attention's per-head
    output) is closest to Mamba's ``hook_z``, which is the gate branch.
    """
    if name == "hook_pos_embed":
        return "Mamba has no positional embedding: position is carried by the recurrence."
    match = _TRANSFORMER_HOOK.match(name)
    if match is None:
        return None
    layer, sublayer, hook = match.groups()
    block = f"blocks.{layer}."
    if sublayer in ("mlp", "ln2") or hook in ("hook_mlp_in", "hook_mlp_out", "hook_resid_mid"):
        return (f"Mamba blocks have no MLP: the mixer is the block's one sublayer ({block}hook_mixer_in → "
                f"{block}hook_mixer_out).")
    per_head = "per head, [b, p, h, hd]" if family == "mamba2" else "per d_inner channel, [b, p, e]"
    analogues = {
        ("attn", "hook_z"): f"The mixer's SSM output {per_head}, is {block}hook_y (in Mamba, {block}hook_z "
                            "is the gate branch of in_proj, not a per-head output).",
        ("attn", "hook_result"): f"Per-head writes: cache.stack_head_results() / cache.compute_head_results() "
                                 f"(Mamba-2); the SSM output {per_head} is {block}hook_y.",
        ("attn", "hook_pattern"): f"The mixer's attention-like matrix is the hidden attention: "
                                  f"model.hidden_attention(tokens, {layer}); remove its edges with "
                                  f"{block}hook_ssm_mask or tl_mamba.Knockout.",
        ("attn", "hook_attn_scores"): f"The mixer's attention-like matrix is the hidden attention: "
                                      f"model.hidden_attention(tokens, {layer}).",
        ("attn", "hook_q"): f"The query's role is played by C: {block}hook_C.",
        ("attn", "hook_k"): f"The key's role is played by B: {block}hook_B.",
        ("attn", "hook_v"): f"The value's role is played by the SSM input x: {block}hook_x.",
        (None, "hook_attn_out"): f"The mixer's write to the residual stream is {block}hook_mixer_out.",
        (None, "hook_attn_in"): f"The mixer's own copy of its input is {block}hook_mixer_in.",
        (None, "hook_q_input"): f"The mixer's own copy of its input is {block}hook_mixer_in.",
        (None, "hook_k_input"): f"The mixer's own copy of its input is {block}hook_mixer_in.",
        (None, "hook_v_input"): f"The mixer's own copy of its input is {block}hook_mixer_in.",
    }
    found = analogues.get((sublayer, hook))
    if found is None and sublayer == "attn":
        found = "Mamba blocks have no attention; docs/porting.md maps attention hooks to the mixer's."
    return found


_ATTENTION_WEIGHTS = ("Mamba has no attention weights. The mixer's own are in model.blocks[l].mixer (in_proj, "
                      "conv1d, A_log, D, out_proj ...); C plays the query's role, B the key's and x the value's "
                      "(hook_C, hook_B, hook_x), and model.hidden_attention(tokens, l) is the attention-like matrix "
                      "(docs/porting.md).")
_MIXER_INPUT = ("every block already has hook_mixer_in, the mixer's own copy of its input, so edge patching "
                "needs no switch.")
_TRANSFORMER_ATTRIBUTES = {
    **{name: _ATTENTION_WEIGHTS for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "QK", "OV")},
    **{name: "Mamba blocks have no MLP: the mixer is the block's one sublayer, and its multiplicative "
             "nonlinearity is the gate y ⊙ SiLU(z) (hook_gate)." for name in ("W_in", "W_out", "b_in", "b_out", "W_gate")},
    "W_pos": "Mamba has no positional embedding: position is carried by the recurrence and the conv.",
    "set_use_attn_result": "per-head writes are computed from the cache: cache.compute_head_results() / "
                           "cache.stack_head_results() (Mamba-2), cache.get_full_resid_decomposition() (one term "
                           "per Mamba-1 channel).",
    "set_use_split_qkv_input": _MIXER_INPUT,
    "set_use_attn_in": _MIXER_INPUT,
    "set_use_hook_mlp_in": _MIXER_INPUT,
}


def transformer_attribute_analogue(name: str) -> Optional[str]:
    """For a transformer model's attribute (``W_Q``, ``W_in``, ``set_use_attn_result`` ...), what a
    Mamba model has in its place (None for other names)."""
    return _TRANSFORMER_ATTRIBUTES.get(name)


def _input_batch_size(input) -> Optional[int]:
    """The batch size a forward input gives: 1 for a string or 1-d tokens, the length of a
    list of strings, the leading axis of a tensor ``[b, p]`` (or residual ``[b, p, d]``);
    None when it cannot tell (the forward then refuses the input)."""
    if isinstance(input, str):
        return 1
    if isinstance(input, (list, tuple)) and input and all(isinstance(s, str) for s in input):
        return len(input)
    if isinstance(input, Tensor):
        return int(input.shape[0]) if input.dim() > 1 else 1
    return None


def _layer_index(value: int, n_layers: int, name: str) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):  # 1.5 or "1": not read as a layer
        raise NotAnIndexError(f"{name} must be an integer layer index, got {value!r} of type {type(value).__name__}")
    value = int(value)
    index = value + n_layers if value < 0 else value
    if not 0 <= index <= n_layers:
        raise OutOfRangeError(f"{name}={value} is out of range for a model with {n_layers} layers")
    return index


def hook_name_hint(name: str, all_names, family: str) -> str:
    """What ``name``, not a hook of the model, was probably meant to be: a sentence starting with
    a space, or "". In order: a layer the model lacks; a transformer hook's Mamba analogue; a
    per-block hook given without its layer (``"h"``, ``"hook_h"``: name the layers, or pass a
    function) or without ``hook_`` (``"blocks.0.h"``); else the closest spellings."""
    import difflib

    all_names = set(all_names)
    layer = _BLOCK_PREFIX.match(name)
    rest = name[layer.end():] if layer else name
    layers = {int(m.group(1)) for m in map(_BLOCK_PREFIX.match, all_names) if m}
    if layer and layers and int(layer.group(1)) not in layers:
        return f" The model has no layer {layer.group(1)}: its blocks are 0..{max(layers)}."
    analogue = transformer_hook_analogue(name, family)
    if analogue is not None:  # close spellings would mislead here (attn.hook_z is not hook_z)
        return f" {analogue}"
    for block_name in (rest, "hook_" + rest, ".hook_".join(rest.rsplit(".", 1))):
        if layer and f"blocks.{layer.group(1)}.{block_name}" in all_names:
            return f" Did you mean 'blocks.{layer.group(1)}.{block_name}'?"
        if not layer and block_name != name and block_name in all_names:
            return f" Did you mean {block_name!r}?"
        # the block-relative names it ends (``"hook_scale"`` -> ``"ln1.hook_scale"``)
        relative = sorted({n.split(".", 2)[2] for n in all_names
                           if n.startswith("blocks.") and n.endswith("." + block_name)})
        if not layer and len(relative) == 1:
            return (f" It is a per-block hook: name a layer ('blocks.0.{relative[0]}'), or select every "
                    f"layer's with a function (lambda name: name.endswith('.{relative[0]}')).")
        if not layer and relative:
            return f" Per-block hooks of that name: {', '.join(repr('blocks.0.' + r) for r in relative)}."
    close = difflib.get_close_matches(name, sorted(all_names), n=3)
    return f" Did you mean {', '.join(map(repr, close))}?" if close else ""


_BLOCK_PREFIX = re.compile(r"blocks\.(\d+)\.")


def _names_filter(names_filter, all_names: set, family: str) -> Callable[[str], bool]:
    """TransformerLens' names_filter forms, with heavy hooks excluded from the default."""
    if names_filter is None:
        return lambda name: not is_heavy_hook(name)
    if isinstance(names_filter, str):
        names = [names_filter]
    elif isinstance(names_filter, (list, tuple, set)):
        names = list(names_filter)
    elif callable(names_filter):
        return names_filter
    else:
        raise ValueError("names_filter must be a string, a list of strings, or a function")
    unknown = [n for n in names if n not in all_names]
    if unknown:
        hints = "; ".join(f"{n!r}:{hook_name_hint(n, all_names, family) or ' not a hook.'}" for n in unknown)
        raise ValueError(f"unknown hook name(s) in names_filter: {hints} model.hook_dict lists the hooks "
                         "(docs/hooks.md has their shapes).")
    wanted = set(names)
    return lambda name: name in wanted
