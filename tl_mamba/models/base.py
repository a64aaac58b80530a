"""What every hooked Mamba model shares: tokens in, logits out, caching, generation.

A family (``HookedMamba``, ``HookedMamba2``) supplies its block class; this base
supplies the TransformerLens-facing surface:

- ``forward`` with TransformerLens' arguments (return types, loss, attention
  masks, ``start_at_layer`` / ``stop_at_layer``, strings);
- ``run_with_cache`` returning a ``MambaActivationCache``, with heavy hooks left
  out unless named and ``pos_slice`` cutting the position axis of every hook;
- tokenizer helpers (``to_tokens``, ``to_str_tokens`` ...);
- ``generate``, which is the same forward run one token at a time on a carried
  ``RecurrentState``, so hooks fire at every step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from functools import partial
from typing import Any, Callable, Dict, Iterator, List, Literal, NamedTuple, Optional, Sequence, Union

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

    @classmethod
    def empty(cls, n_layers: int) -> "RecurrentState":
        return cls(layers=[{"conv": None, "ssm": None} for _ in range(n_layers)])


class HookedSSM(HookedRootModule):
    """Base class of the hooked Mamba families. Subclasses set ``family`` and ``block_cls``."""

    family: str = ""
    block_cls: type = nn.Module
    #: scan implementations the family has (``set_backend`` refuses others)
    scan_backends: tuple = ("reference", "torch", "triton")

    def __init__(self, cfg: HookedMambaConfig, tokenizer: Any = None):
        super().__init__()
        if isinstance(cfg, dict):
            cfg = HookedMambaConfig(**cfg)
        if cfg.family != self.family:
            raise ValueError(
                f"{type(self).__name__} builds {self.family} models but the config is for {cfg.family}"
            )
        if cfg.dtype is not None and not (isinstance(cfg.dtype, torch.dtype) and cfg.dtype.is_floating_point):
            raise TypeError(f"cfg.dtype must be a floating-point torch dtype (torch.float32, torch.float16, "
                            f"torch.bfloat16 or torch.float64), got {cfg.dtype!r}")
        # a copy: .to() / .half() keep cfg.device / cfg.dtype in step with this model's weights,
        # which must not rewrite another model built from the same config object
        self.cfg = cfg = copy.deepcopy(cfg)
        self._padding_side_agreed = cfg.default_padding_side
        self.tokenizer = tokenizer  # the property's setter: set_tokenizer's padding-side sync
        self._backend = None  # None: follow TL_MAMBA_BACKEND
        self.heavy_hook_memory_limit = DEFAULT_HEAVY_HOOK_LIMIT
        dtype = cfg.dtype
        self.embed = Embed(cfg.d_vocab, cfg.d_model, dtype)
        self.hook_embed = CheckedHookPoint()  # [b, p, d]
        self.blocks = nn.ModuleList([self.block_cls(cfg, layer) for layer in range(cfg.n_layers)])
        self.ln_final = RMSNorm(cfg.d_model, cfg.eps, dtype, apply_weight=False)
        self.unembed = Unembed(cfg.d_model, cfg.d_vocab_out, dtype, self.embed if cfg.tie_embeddings else None,
                               final_norm=self.ln_final)
        self.reset_parameters()
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
        (the checkpoint's own dtype)."""
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
        """Build from an in-memory transformers model (weights are copied).

        ``device`` and ``dtype`` default to those of ``hf_model``'s parameters (``dtype`` also
        takes names such as ``"float16"``, or ``"auto"``); ``cfg_overrides`` replace any
        :class:`HookedMambaConfig` field. See :func:`tl_mamba.loading.from_hf`."""
        from tl_mamba.loading import from_hf

        return from_hf(cls, hf_model, tokenizer=tokenizer, device=device, dtype=dtype, **cfg_overrides)

    # ------------------------------------------------------------------ tokens
    @property
    def tokenizer(self) -> Any:
        """The tokenizer (None when the model has none). Assigning one is ``set_tokenizer(tok)``."""
        return self.__dict__.get("_tokenizer")

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        self.set_tokenizer(tokenizer)

    def set_tokenizer(self, tokenizer: Any, default_padding_side: Optional[Literal["left", "right"]] = None) -> None:
        """Use ``tokenizer`` (a Hugging Face tokenizer, or None for none), as TransformerLens's
        ``set_tokenizer`` does: its ``padding_side`` is set to ``default_padding_side`` when
        given, else to ``cfg.default_padding_side``, and ``cfg.default_padding_side`` follows.
        (Any object is accepted; one without ``padding_side`` is left as it is.)

        ``model.tokenizer = tok`` does the same. The tokenizer itself is changed (as in
        TransformerLens), so a tokenizer shared by several models pads alike for all of them.

        From then on the padding side is one setting, readable in both places: setting
        ``model.tokenizer.padding_side`` or ``model.cfg.default_padding_side`` changes it,
        and the next ``to_tokens`` / forward / ``generate`` brings the other in line (the
        one changed last wins). It decides how ``to_tokens`` pads a list of strings, and a
        forward on token input without an ``attention_mask`` infers the mask from the pad
        tokens when it is ``"left"`` (as TransformerLens's forward does), so that
        ``transformer_lens.utilities.get_attention_mask(model.tokenizer, tokens, prepend_bos)``
        and ``model.tokenizer.padding_side`` describe the tokens ``to_tokens`` gives.
        """
        if default_padding_side not in ("left", "right", None):
            raise ValueError(f"default_padding_side must be 'left', 'right' or None, got {default_padding_side!r}")
        side = default_padding_side or self.cfg.default_padding_side
        if tokenizer is not None and hasattr(tokenizer, "padding_side"):
            tokenizer.padding_side = side
        self.cfg.default_padding_side = side
        self._padding_side_agreed = side
        self.__dict__["_tokenizer"] = tokenizer

    def _padding_side(self) -> str:
        """The padding side in force: ``tokenizer.padding_side`` and ``cfg.default_padding_side``,
        brought into agreement first (the one changed since they last agreed wins; the
        config when both changed, since a tokenizer may be shared by other models)."""
        cfg_side = self.cfg.default_padding_side
        tok = self.tokenizer
        tok_side = getattr(tok, "padding_side", None) if tok is not None else None
        if tok_side not in ("left", "right") or tok_side == cfg_side:
            if tok_side == cfg_side:
                self._padding_side_agreed = cfg_side
            return cfg_side
        if cfg_side != getattr(self, "_padding_side_agreed", cfg_side):  # the config was changed
            tok.padding_side = cfg_side
            side = cfg_side
        else:  # the tokenizer was changed
            self.cfg.default_padding_side = side = tok_side
        self._padding_side_agreed = side
        return side

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(
                f"{what} needs a tokenizer, and this model has none. Pass token tensors [batch, pos] instead, "
                "or give one: HookedMamba.from_pretrained(path, tokenizer=...) or model.tokenizer = tok."
            )
        return self.tokenizer

    def _bos_id(self) -> int:
        tok = self.tokenizer
        if tok is not None and getattr(tok, "bos_token_id", None) is not None:
            return int(tok.bos_token_id)
        if self.cfg.bos_token_id is None:
            raise ValueError("prepend_bos=True but neither the tokenizer nor the config has a BOS token id")
        return int(self.cfg.bos_token_id)

    def _pad_id(self) -> int:
        """The id ``to_tokens`` pads with: the tokenizer's pad token, else the config's, else the
        EOS (a GPT-NeoX tokenizer has no pad token; TransformerLens pads with its EOS too), else 0."""
        tok = self.tokenizer
        for candidate in (
            getattr(tok, "pad_token_id", None) if tok is not None else None,
            self.cfg.pad_token_id,
            getattr(tok, "eos_token_id", None) if tok is not None else None,
            self.cfg.eos_token_id,
        ):
            if candidate is not None:
                return int(candidate)
        return 0

    def to_tokens(
        self,
        input: Union[str, List[str]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
        move_to_device: bool = True,
        truncate: bool = True,
        return_attention_mask: bool = False,
    ):
        """Tokenize a string or list of strings to ``[b, p]`` (padded to the longest).

        ``prepend_bos`` defaults to ``cfg.default_prepend_bos``; ``padding_side`` to
        ``model.tokenizer.padding_side``, which ``set_tokenizer`` keeps equal to
        ``cfg.default_padding_side`` (``"right"`` unless changed). With
        ``return_attention_mask`` also returns the ``[b, p]`` mask (1 = real token).
        ``truncate`` is accepted as in TransformerLens and does nothing: a recurrent model
        has no context window (``n_ctx``) to cut prompts to.
        """
        tok = self._require_tokenizer("to_tokens")
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        padding_side = padding_side or self._padding_side()
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        strings = [input] if isinstance(input, str) else list(input)
        if not strings or not all(isinstance(s, str) for s in strings):
            raise ValueError("to_tokens takes a string or a non-empty list of strings")
        ids = [list(tok(s, add_special_tokens=False)["input_ids"]) for s in strings]
        self._warn_unknown_tokens(strings, ids)
        if prepend_bos:
            bos = self._bos_id()
            ids = [[bos] + seq for seq in ids]
        length = max(len(seq) for seq in ids)
        if length == 0:
            raise ValueError("to_tokens: every input tokenized to nothing (empty strings without BOS)")
        pad = self._pad_id()
        tokens = torch.full((len(ids), length), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, seq in enumerate(ids):
            if padding_side == "right":
                tokens[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                mask[row, : len(seq)] = 1
            else:
                tokens[row, length - len(seq) :] = torch.tensor(seq, dtype=torch.long)
                mask[row, length - len(seq) :] = 1
        if move_to_device:
            tokens, mask = tokens.to(self.W_E.device), mask.to(self.W_E.device)
        return (tokens, mask) if return_attention_mask else tokens

    def _unknown_token_id(self) -> Optional[int]:
        """The tokenizer's unknown-token id, where it means "not in the vocabulary": None when it
        has none, or shares its id with BOS / EOS / pad (GPT-NeoX's ``<|endoftext|>``), whose
        text a prompt may hold on purpose."""
        unk = getattr(self.tokenizer, "unk_token_id", None)
        shared = {getattr(self.tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad")}
        return None if unk is None or unk in shared else int(unk)

    def _warn_unknown_tokens(self, strings: List[str], ids: List[List[int]]) -> None:
        """Warn when a word the vocabulary lacks became the unknown token (a word-level
        tokenizer, such as the toy models', has no pieces to spell it with)."""
        unk = self._unknown_token_id()
        if unk is None:
            return
        unk_text = self.tokenizer.unk_token
        rows = [row for row, (text, seq) in enumerate(zip(strings, ids))
                if seq.count(unk) > text.count(unk_text)]  # an unknown token the text did not spell out
        if rows:
            import warnings

            warnings.warn(f"to_tokens: {len(rows)} of {len(strings)} inputs hold words the tokenizer does not know, "
                          f"read as {unk_text!r} (id {unk}), e.g. {strings[rows[0]][:80]!r} -> "
                          f"{self.tokenizer.convert_ids_to_tokens(ids[rows[0]])[:16]}", UnknownTokenWarning,
                          stacklevel=3)

    def to_string(self, tokens: Union[Tensor, List[int], int]) -> Union[str, List[str]]:
        """Decode ``[p]`` to a string, or ``[b, p]`` to a list of strings."""
        tok = self._require_tokenizer("to_string")
        if isinstance(tokens, int):
            tokens = [tokens]
        tokens = self._ids_to_read(tokens, "to_string")
        if tokens.dim() == 2:
            return [tok.decode(row.tolist()) for row in tokens]
        return tok.decode(tokens.tolist())

    def to_str_tokens(
        self,
        input: Union[str, Tensor, List[int]],
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
    ) -> Union[List[str], List[List[str]]]:
        """One string per token: of a string (tokenized first) or of token ids.

        Token ids may be an int, a 0-d tensor (``logits.argmax(-1)[0, -1]``: a one-element
        list, as in TransformerLens), ``[p]``, ``[1, p]`` (a list of strings) or ``[b, p]``
        (a list of lists); a list of strings gives a list of lists.
        """
        tok = self._require_tokenizer("to_str_tokens")
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)[0]
        elif isinstance(input, list) and input and isinstance(input[0], str):
            return [self.to_str_tokens(s, prepend_bos=prepend_bos) for s in input]
        else:
            tokens = self._ids_to_read(input, "to_str_tokens")
            if tokens.dim() == 0:
                tokens = tokens[None]
            if tokens.dim() == 2:
                if tokens.shape[0] != 1:
                    return [[tok.decode([t]) for t in row.tolist()] for row in tokens]
                tokens = tokens[0]
        return [tok.decode([t]) for t in tokens.tolist()]

    def _ids_to_read(self, tokens, what: str, max_dims: Optional[int] = 2) -> Tensor:
        """``tokens`` as an integer tensor of ids in ``[0, d_vocab)`` with at most ``max_dims``
        axes, for the methods that decode or look up ids (a tokenizer decodes an id past its
        vocabulary as nothing, so a wrong id would silently vanish from the text)."""
        tokens = torch.as_tensor(tokens)
        if not tokens.numel():  # torch.as_tensor([]) is float
            tokens = tokens.long()
        _check_token_dtype(tokens, f"{what}: the tokens")
        if max_dims is not None and tokens.dim() > max_dims:
            raise ValueError(f"{what} takes token ids [p] or [b, p], got shape {tuple(tokens.shape)}")
        self._check_token_ids(tokens, what=f"{what}: token ids")
        return tokens

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS); error otherwise, and for a
        word the vocabulary lacks (read as the unknown token)."""
        import warnings

        if not isinstance(string, str):
            raise TypeError(f"to_single_token takes a string, got {type(string).__name__} (the string of a token id "
                            "is to_single_str_token(id))")

        with warnings.catch_warnings():  # an unknown word is an error here, not a warning
            warnings.simplefilter("ignore", UnknownTokenWarning)
            tokens = self.to_tokens(string, prepend_bos=False)[0]
        if tokens.numel() != 1:
            raise ValueError(f"{string!r} is {tokens.numel()} tokens, not one: {self.to_str_tokens(tokens)}")
        token = int(tokens.item())
        if token == self._unknown_token_id() and string.strip() != self.tokenizer.unk_token:
            raise ValueError(f"{string!r} is not in the tokenizer's vocabulary: it reads as the unknown token "
                             f"{self.tokenizer.unk_token!r} (id {token})")
        return token

    def to_single_str_token(self, int_token: int) -> str:
        """The string of the single token ``int_token`` (TransformerLens's ``to_single_str_token``)."""
        if isinstance(int_token, Tensor) and int_token.numel() == 1 and not int_token.dtype.is_floating_point:
            int_token = int(int_token.item())
        if isinstance(int_token, bool) or not isinstance(int_token, int):
            raise TypeError(f"to_single_str_token takes one token id (an int), got {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(
        self,
        single_token: Union[str, int, Tensor],
        input: Union[str, Tensor],
        mode: Literal["first", "last"] = "first",
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[Literal["left", "right"]] = None,
    ) -> int:
        """The position of ``single_token`` in ``input`` (TransformerLens's ``get_token_position``).

        Args:
            single_token: the token to find: an id, or a string that is exactly one token.
            input: a string (tokenized with ``prepend_bos``, default ``cfg.default_prepend_bos``:
                the BOS counts as position 0) or tokens ``[p]`` / ``[1, p]``.
            mode: ``"first"`` or ``"last"`` occurrence.
            prepend_bos / padding_side: how a string ``input`` is tokenized.

        Raises a ``ValueError`` if the token does not occur.
        """
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = torch.as_tensor(input)
        if tokens.dim() == 2 and tokens.shape[0] == 1:
            tokens = tokens[0]
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be [p] or [1, p], got shape {tuple(tokens.shape)}")
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, Tensor):
            single_token = int(single_token.item())
        positions = (tokens == single_token).nonzero()[:, 0]
        if not positions.numel():
            raise ValueError(f"token {single_token} does not occur in the input")
        return int(positions[0 if mode == "first" else -1])

    # ------------------------------------------------------------------ forward
    def _prepare_input(self, input, attention_mask, prepend_bos, padding_side, continuing: bool = False):
        """Returns ``(tokens [b, p] long, attention_mask [b, p] or None)``.

        ``continuing``: the tokens continue a sequence (a forward from a non-empty
        ``RecurrentState``), so their first column is not where padding would be."""
        if isinstance(input, str) or (isinstance(input, (list, tuple)) and input and isinstance(input[0], str)):
            tokens, mask = self.to_tokens(
                input, prepend_bos=prepend_bos, padding_side=padding_side, return_attention_mask=True
            )
            self._check_token_ids(tokens, from_tokenizer=True)
            if attention_mask is None and not bool(mask.all()):
                attention_mask = mask
            elif attention_mask is not None:
                attention_mask = self._check_mask(attention_mask, tokens.shape)
            return tokens, attention_mask
        if isinstance(input, (list, tuple)) and not input:
            raise ValueError("input is an empty list: give a string, a list of strings or a token tensor [batch, pos]")
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a token tensor [batch, pos], a string or a list of strings, got {type(input).__name__}")
        tokens = input
        if tokens.dim() == 1:
            tokens = tokens[None]
        if tokens.dim() != 2:
            raise ValueError(f"token input must be [batch, pos], got shape {tuple(input.shape)}")
        _check_token_dtype(tokens, "token input")
        if tokens.dtype not in (torch.int32, torch.int64):  # int8, int16, uint16 ...: torch indexes only with these
            tokens = tokens.long()
        if tokens.shape[1] == 0:
            raise ValueError("token input has no positions")
        self._check_token_ids(tokens)
        tokens = tokens.to(self.W_E.device)
        if attention_mask is None and not continuing:
            attention_mask = self._padding_from_tokens(tokens, prepend_bos, padding_side)
        if attention_mask is not None:
            attention_mask = self._check_mask(attention_mask, tokens.shape)
        return tokens, attention_mask

    def _check_token_ids(self, tokens: Tensor, from_tokenizer: bool = False, what: str = "token ids") -> None:
        """Every id must index a row of ``W_E``: ``0 <= id < d_vocab``."""
        _check_not_meta(tokens, what)
        if not tokens.numel():
            return
        low, high = int(tokens.min()), int(tokens.max())
        if low >= 0 and high < self.cfg.d_vocab:
            return
        if from_tokenizer:
            raise ValueError(
                f"the tokenizer gave token ids up to {high}, but the model has d_vocab={self.cfg.d_vocab} "
                f"(token ids must lie in [0, {self.cfg.d_vocab})): the tokenizer ({type(self.tokenizer).__name__}, "
                f"{_tokenizer_size(self.tokenizer)} tokens) does not belong to this model. Set model.tokenizer to "
                "the model's own tokenizer."
            )
        raise ValueError(f"{what} must lie in [0, {self.cfg.d_vocab}), got min {low} max {high}")

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

    def _padding_from_tokens(self, tokens: Tensor, prepend_bos: Optional[bool] = None,
                             padding_side: Optional[str] = None) -> Optional[Tensor]:
        """The attention mask of token input given without one, from the pad id ``to_tokens`` pads
        with (:meth:`_pad_id`: the tokenizer's pad token, else the config's, else the EOS).

        As TransformerLens does, a call with ``padding_side="left"``, or a model that pads on the
        left (``model.tokenizer.padding_side == "left"``, which ``set_tokenizer`` keeps equal to
        ``cfg.default_padding_side``: set either), infers it: each row's leading run of pad
        tokens is padding, less its last token when the pad token is also the BOS that
        ``prepend_bos`` (default ``cfg.default_prepend_bos``) puts there; this is the mask
        ``transformer_lens.utilities.get_attention_mask(model.tokenizer, tokens, prepend_bos)``
        gives. Otherwise nothing is inferred, but rows that begin with runs of pad tokens of
        different lengths are almost surely a left-padded batch, whose pads would run
        through the recurrence and change every later position: that warns.
        """
        import warnings

        tok = self.tokenizer
        infer = (padding_side or self._padding_side()) == "left"
        if tok is None or (tokens.shape[0] == 1 and not infer):
            return None
        pad = self._pad_id()  # what to_tokens pads with
        leading = (tokens == pad).long().cumprod(dim=1)  # [b, p]: 1 on each row's leading pad run
        bos = getattr(tok, "bos_token_id", None)
        bos = self.cfg.bos_token_id if bos is None else bos
        pad_is_bos = pad == bos
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        runs = leading.sum(1)
        if infer:
            mask = 1 - leading
            if pad_is_bos and prepend_bos:  # the run's last token is the BOS
                rows = (runs > 0).nonzero()[:, 0]
                mask[rows, runs[rows] - 1] = 1
            mask[runs == tokens.shape[1]] = 1  # a row of nothing but pads is not padding (zeros fed in, say)
            return mask
        # left padding, not a pad id met by chance in random token ids: a run of 2 or more pads, or
        # (pad != BOS) a run followed by the BOS
        looks_padded = runs.numel() > 0 and int(runs.max()) >= 2
        if not looks_padded and not pad_is_bos and bos is not None:
            after = tokens.gather(1, runs.clamp(max=tokens.shape[1] - 1)[:, None])[:, 0]
            looks_padded = bool(((runs > 0) & (runs < tokens.shape[1]) & (after == bos)).any())
        if looks_padded and bool((runs != runs[0]).any()):
            warnings.warn(
                f"The token rows begin with different numbers of pad tokens (id {pad}): this looks like a "
                "left-padded batch given without an attention_mask. The pads then run through the recurrence "
                "and change every later position. Pass attention_mask (to_tokens(..., return_attention_mask=True) "
                "gives it), or pass padding_side='left' (or set model.tokenizer.padding_side = 'left') to have it "
                "inferred from the pad tokens, as TransformerLens does.", UserWarning, stacklevel=_caller_stacklevel())
        return None

    def _check_mask(self, attention_mask: Tensor, shape) -> Optional[Tensor]:
        if isinstance(attention_mask, Tensor):
            _check_not_meta(attention_mask, "attention_mask")
        attention_mask = torch.as_tensor(attention_mask, device=self.W_E.device)
        given = tuple(attention_mask.shape)
        if attention_mask.dim() == 1:  # one prompt's mask: a batch of one
            attention_mask = attention_mask[None]
        if tuple(attention_mask.shape) != tuple(shape):
            one_row = " (a 1-D mask is one prompt's)" if len(given) == 1 else ""
            raise ValueError(f"attention_mask must have shape {tuple(shape)} (batch, positions), got {given}{one_row}")
        if attention_mask.is_complex():
            raise TypeError(f"attention_mask must be a bool, integer or float tensor of 0s and 1s, "
                            f"got {attention_mask.dtype}")
        if attention_mask.dtype != torch.bool:
            bad = attention_mask[(attention_mask != 0) & (attention_mask != 1)]  # NaN included
            if bad.numel():
                values = bad.unique().tolist()
                shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
                raise ValueError(
                    f"attention_mask must hold only 0 (padding) and 1 (real token), got {shown}. "
                    "It marks padding; it does not weight positions."
                )
        if bool(attention_mask.all()):
            return None
        _check_contiguous_padding(attention_mask)
        return attention_mask

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
        if start_at_layer is None:
            tokens, attention_mask = self._prepare_input(input, attention_mask, prepend_bos, padding_side,
                                                         continuing=state is not None and state.seqlen_offset > 0)
            resid = self.hook_embed(self.embed(tokens))
        else:
            resid = input
            if not isinstance(resid, Tensor) or resid.dim() != 3 or resid.shape[-1] != self.cfg.d_model:
                raise ValueError(f"with start_at_layer, input must be the residual stream [b, p, {self.cfg.d_model}]")
            if attention_mask is not None:
                attention_mask = self._check_mask(attention_mask, resid.shape[:2])
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

    # ------------------------------------------------------------------ hook names
    def check_hook_name(self, name: str) -> None:
        """Raise a ``ValueError`` naming ``name`` (and close matches) if it is not a hook of this model."""
        if name in self.hook_dict:
            return
        import difflib

        analogue = transformer_hook_analogue(name, self.family)
        if analogue is not None:  # a transformer hook name (TransformerLens' patching uses them): say what Mamba has
            hint = f" {analogue}"
        else:
            close = difflib.get_close_matches(name, list(self.hook_dict), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"{name!r} is not a hook of {type(self).__name__}.{hint} "
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
        names_filter = _names_filter(names_filter, set(self.hook_dict))
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

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input: Union[str, List[str], Tensor] = "",
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: Optional[Union[int, Sequence[int]]] = None,
        do_sample: bool = True,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        temperature: float = 1.0,
        freq_penalty: float = 0.0,
        use_past_kv_cache: bool = True,
        prepend_bos: Optional[bool] = None,
        padding_side: Optional[str] = None,
        return_type: Optional[str] = "input",
        verbose: bool = True,
        attention_mask: Optional[Tensor] = None,
        seed: Optional[int] = None,
    ):
        """Decode recurrently: one prefill forward, then one forward per new token.

        The conv and SSM states are carried in a ``RecurrentState``, so each new
        token costs the same whatever the prefix length, and hooks fire at every
        step (on ``p = 1`` tensors after the prefill). Keyword names follow
        TransformerLens' ``generate``. ``return_type="input"`` returns strings for
        string input and tokens otherwise; ``"str"`` / ``"tokens"`` force one (None
        gives tokens, as in TransformerLens). A string is the row's prompt and new tokens
        decoded with ``skip_special_tokens=True``, as TransformerLens (3.x and 4.x) decodes
        them: no BOS, no EOS, so ``generate(prompt)`` starts with ``prompt``. Unlike
        TransformerLens, a batch's padding (on the left, or the fill after a row's EOS) is
        left out even where the pad token is not a special token, so that each prompt of a
        batch gets the text it gets alone. For the BOS and EOS, ask for
        ``return_type="tokens"`` and use ``to_string``. ``top_k`` must be a positive int or
        None, and ``eos_token_id`` an id or a non-empty list of ids. A row that has ended is
        filled with the (first) EOS id, as in TransformerLens (transformers fills with the pad id).

        ``use_past_kv_cache=False`` re-runs the whole sequence at every step instead
        (hooks then see the whole sequence each time; cost grows with its length).
        So does every step while a ``Knockout`` is active: its positions (``sources=[0]``,
        ``targets=[-1]``) index the whole sequence, which a one-token step cannot see.
        Each new token is then predicted with the knockout applied to the sequence so
        far, its ``-1`` being the newest token. (A hand-written hook on ``hook_ssm_mask``
        sees each step's ``[b, H, 1, 1]`` mask, as any hook sees one-token tensors.)
        """
        from tqdm.auto import tqdm

        from tl_mamba.knockout import active_knockouts

        if isinstance(max_new_tokens, bool) or not hasattr(max_new_tokens, "__index__"):
            raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        if max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        if freq_penalty < 0:  # as TransformerLens: a negative penalty would reward repetition
            raise ValueError(f"freq_penalty must be >= 0, got {freq_penalty}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
            raise ValueError(f"top_k must be a positive int (or None for no top-k filtering), got {top_k!r}")
        if return_type not in ("input", "str", "tokens", None):
            raise ValueError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
        if isinstance(eos_token_id, Tensor):
            eos_token_id = eos_token_id.tolist()
        if eos_token_id is not None and not isinstance(eos_token_id, int):
            eos_token_id = list(eos_token_id)
            if not eos_token_id and stop_at_eos:
                raise ValueError(
                    "eos_token_id is empty: give a token id or a non-empty list of them, "
                    "or stop_at_eos=False to never stop early"
                )
        string_input = isinstance(input, str) or (isinstance(input, list) and input and isinstance(input[0], str))
        if string_input and padding_side is None:
            padding_side = "left"  # new tokens are appended on the right, so prompts must end together
        tokens, attention_mask = self._prepare_input(input, attention_mask, prepend_bos, padding_side)
        if attention_mask is not None and not bool(attention_mask[:, -1].all()):
            raise ValueError(
                "generate needs every prompt to end at the last column: use left padding "
                "(padding_side='left', or a left-padded attention_mask)"
            )
        if eos_token_id is None and stop_at_eos:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
            if eos_token_id is None:
                eos_token_id = self.cfg.eos_token_id
        eos_ids = (
            torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=tokens.device)
            if (stop_at_eos and eos_token_id is not None)
            else None
        )
        if eos_ids is not None:  # an id the model cannot produce would never stop generation
            _check_token_dtype(eos_ids, "eos_token_id")
            self._check_token_ids(eos_ids, what="eos_token_id")
        gen = torch.Generator(device=tokens.device).manual_seed(seed) if seed is not None else None
        knockouts = active_knockouts(self)
        for ko in knockouts:
            if any(isinstance(getattr(ko, what), Tensor) and getattr(ko, what).dtype == torch.bool
                   for what in ("sources", "targets")):
                raise ValueError(
                    f"generate under {ko!r}: its bool-mask positions name the positions of one sequence length, "
                    "but generate lengthens the sequence at every step. Give sources and targets as ints "
                    "(negative ones count from the end: targets=[-1] is the newest token at each step).")
        if attention_mask is None:  # no padding, read with this call's prepend_bos and padding_side: the
            # forwards below must not infer padding again with the model's defaults (a BOS asked for here
            # would be taken for a pad where the pad token is the BOS and the model pads on the left)
            attention_mask = torch.ones_like(tokens)
        recurrent = use_past_kv_cache and not knockouts
        state = RecurrentState.empty(self.cfg.n_layers) if recurrent else None
        logits = self(tokens, attention_mask=attention_mask, state=state)
        finished = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        out_tokens = [tokens]
        # which tokens are each row's own (for strings): not its padding, nor the fill after its EOS
        own = [attention_mask.bool()]
        pad = self._pad_id() if eos_ids is None else int(eos_ids[0])
        for step in tqdm(range(max_new_tokens), disable=not verbose, desc="generate"):
            # the penalty counts each row's own tokens: a pad id in a shorter prompt's padding is not
            # a token of that prompt (TransformerLens counts it, so a row depended on the others' lengths)
            next_tokens = sample_next_token(
                logits[:, -1], do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature,
                freq_penalty=freq_penalty, history=torch.cat(out_tokens, dim=1) if freq_penalty else None,
                history_mask=torch.cat(own, dim=1) if freq_penalty else None, generator=gen,
            )
            next_tokens = torch.where(finished, torch.full_like(next_tokens, pad), next_tokens)
            out_tokens.append(next_tokens[:, None])
            own.append(~finished[:, None])
            if eos_ids is not None:
                finished |= torch.isin(next_tokens, eos_ids)
                if bool(finished.all()):
                    break
            if step + 1 == max_new_tokens:  # no forward for a token nobody will read
                break
            if recurrent:
                logits = self(next_tokens[:, None], state=state)
            else:
                sequence = torch.cat(out_tokens, dim=1)
                # left padding only (checked above): new tokens are real
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(sequence), 1)], dim=1)
                logits = self(sequence, attention_mask=attention_mask)
        result = torch.cat(out_tokens, dim=1)
        if return_type == "str" or (return_type == "input" and string_input):
            # each row's own tokens only: a padded batch gives every prompt the text it gets alone
            own = torch.cat(own, dim=1)
            tok = self._require_tokenizer("generate with string output")
            strings = [tok.decode(row[keep].tolist(), skip_special_tokens=True) for row, keep in zip(result, own)]
            return strings[0] if isinstance(input, str) else strings
        return result


class UnknownTokenWarning(UserWarning):
    """``to_tokens`` read a word its tokenizer's vocabulary lacks as the unknown token."""


def sample_next_token(
    logits: Tensor,
    *,
    do_sample: bool,
    top_k: Optional[int],
    top_p: Optional[float],
    temperature: float,
    freq_penalty: float = 0.0,
    history: Optional[Tensor] = None,
    history_mask: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Pick the next token from ``logits [b, v]``: greedy, or sampled with temperature / top-k / top-p.

    ``freq_penalty`` subtracts ``freq_penalty ×`` each token's count in ``history [b, t]``, counting
    only where ``history_mask [b, t]`` is true (a row's own tokens, not the batch's padding)."""
    logits = logits.float()
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if freq_penalty and history is not None:
        weights = (torch.ones_like(history, dtype=logits.dtype) if history_mask is None
                   else history_mask.to(logits.dtype))
        counts = torch.zeros_like(logits).scatter_add_(1, history, weights)
        logits = logits - freq_penalty * counts
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


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


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of a warning raised here that points at the first frame outside
    tl_mamba, torch and transformer_lens: the user's call, however deep the forward was entered."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.split(".")[0] in ("tl_mamba", "torch", "transformer_lens"):
            return level
        frame, level = frame.f_back, level + 1
    return level


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


def _check_not_meta(tensor: Tensor, what: str) -> None:
    """A tensor on the meta device has a shape but no values: no id or mask can be read from it."""
    if tensor.is_meta:
        raise ValueError(f"{what}: the tensor is on the meta device, which holds shapes but no values; "
                         "pass real values (on the CPU or the model's device)")


def _check_token_dtype(tokens: Tensor, what: str) -> None:
    """Token ids must be an integer tensor, and not uint8 or bool: torch indexes with those as masks."""
    if tokens.dtype == torch.uint8:
        raise TypeError(
            f"{what} must be an integer tensor of token ids (torch.long), got torch.uint8, which torch treats "
            "as a mask when indexing; convert with tokens.long()"
        )
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(
            f"{what} must be an integer tensor of token ids, got {tokens.dtype}; to feed residual activations "
            "use start_at_layer"
        )


def _tokenizer_size(tokenizer) -> Optional[int]:
    """The number of tokens a tokenizer can produce (added tokens included), or None if it cannot say."""
    try:
        return len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
        return size if isinstance(size, int) else None


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


def _check_contiguous_padding(mask: Tensor) -> None:
    """Padding must be a prefix (left) or a suffix (right) of each row."""
    m = mask.long()
    for row in range(m.shape[0]):
        values = m[row]
        changes = int((values[1:] != values[:-1]).sum())
        if changes > 1 or (changes == 1 and not (values[0] == 0 or values[-1] == 0)):
            raise ValueError(
                f"attention_mask row {row} is not left- or right-padded ({values.tolist()}); "
                "padding must be a contiguous prefix or suffix"
            )
        if int(values.sum()) == 0:
            raise ValueError(f"attention_mask row {row} has no real tokens")


def _names_filter(names_filter, all_names: set) -> Callable[[str], bool]:
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
        import difflib

        close = {n: difflib.get_close_matches(n, list(all_names), n=2) for n in unknown}
        hints = "; ".join(f"{n!r} (did you mean {', '.join(map(repr, c))}?)" if c else repr(n) for n, c in close.items())
        raise ValueError(f"unknown hook name(s) in names_filter: {hints}. model.hook_dict lists the hooks")
    wanted = set(names)
    return lambda name: name in wanted
