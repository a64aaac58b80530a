"""Small modules shared by every model family: embedding, RMSNorm, unembedding.

HookPoint names and conventions follow TransformerLens: every norm exposes
``hook_scale`` (the RMSNorm divisor sqrt(mean(x²) + eps)) and ``hook_normalized``
(x / scale, before any weight). Every hook point of the models is a
:class:`CheckedHookPoint`, which refuses a hook's return value of another shape.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor
from transformer_lens.hook_points import HookPoint

from tl_mamba.ops.precision import upcast


class CheckedHookPoint(HookPoint):
    """TransformerLens' ``HookPoint`` that checks what its forward hooks return.

    A hook may replace the activation (return a new tensor) or edit it in place. It may
    not change its shape: a wrong shape would otherwise be blamed on another tensor further
    on ("z must have shape ..."), fail in a reshape, or be broadcast silently (a ``[1, ...]``
    tensor or a number). So a return value that is not a tensor raises a ``TypeError``, and
    a tensor of another shape or on another device a ``ValueError``, each naming the hook.

    A tensor of another dtype (a patch from an fp32 cache into a bf16 model, a float64
    steering vector) is read in the dtype of the activation it replaces, as if the hook had
    cast it: so a patch means the same thing at every hook, and a float64 patch does not turn
    the rest of the forward float64. ``cast_to_given_dtype=False`` leaves the cast to the
    caller (``hook_h``: its edits are found by comparing in the hook's own dtype, so that
    rounding the states to bf16 is not an edit of every entry).

    Only ``nn.Module`` semantics are relied on (forward hooks run inside ``__call__`` and may
    replace the output), so this holds on transformer-lens 3.x and 4.x alike. The check costs
    one identity comparison per call, and a shape comparison only when a hook returned
    something other than the activation it was given.
    """

    def __init__(self, *args, cast_to_given_dtype: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.cast_to_given_dtype = cast_to_given_dtype

    def __call__(self, x, *args, **kwargs):
        out = super().__call__(x, *args, **kwargs)
        if out is not x:
            check_hook_output(self, x, out)
            if self.cast_to_given_dtype and isinstance(x, Tensor) and out.dtype != x.dtype:
                out = out.to(x.dtype)
        return out

    def call_each(self, x: Tensor, on_change) -> Tensor:
        """``self(x)``, with ``on_change(returned, more)`` called after each forward hook that
        returned another tensor or edited its input in place: what it returns is what the next hook
        gets (``more``: whether one follows) and, after the last hook, the result.

        ``hook_h`` runs its hooks this way, so that a hook after an edit (a cache, a second edit)
        sees the states the edit leads to. Backward hooks see the result, as with ``self(x)``.
        With one hook (or torch's global hooks, or hooks taking keyword arguments, which
        TransformerLens never adds) the hooks run as ``self(x)`` runs them, ``on_change`` after.
        """
        hooks = list(self._forward_hooks.values())  # (a hook added while they run runs from the next forward)
        if (len(hooks) < 2 or self._forward_pre_hooks or self._forward_hooks_with_kwargs
                or self._forward_hooks_always_called or nn.modules.module._global_forward_hooks):
            version = x._version
            out = self(x)
            return on_change(out, False) if out is not x or x._version != version else out
        for i, hook in enumerate(hooks):
            version = x._version
            out = hook(self, (x,), x)  # as Module.__call__ calls a forward hook
            if out is None:
                out = x
            elif out is not x:
                check_hook_output(self, x, out)
            if out is not x or x._version != version:
                out = on_change(out, i + 1 < len(hooks))
            x = out
        # what sets up the backward hooks on the result, with the forward hooks set aside (they ran)
        saved, self._forward_hooks = self._forward_hooks, type(self._forward_hooks)()
        try:
            return super().__call__(x)
        finally:
            self._forward_hooks = saved


def check_hook_output(hook_point: HookPoint, given, returned) -> None:
    """Raise if ``returned`` (what ``hook_point``'s hooks made of ``given``) is not a tensor of
    ``given``'s shape on ``given``'s device."""
    if not isinstance(given, Tensor):
        return
    expected = tuple(given.shape)
    if not isinstance(returned, Tensor):
        raise TypeError(
            f"a hook on {hook_point.name} returned {type(returned).__name__}, expected a tensor of shape "
            f"{expected} (the activation it was given); return None to keep the activation as it is"
        )
    if tuple(returned.shape) != expected:
        raise ValueError(
            f"a hook on {hook_point.name} returned shape {tuple(returned.shape)}, expected {expected} "
            "(the shape of the activation it was given): hooks may change values and dtype, not the shape"
        )
    if returned.device != given.device:
        # patching from a cache kept on the CPU into a CUDA model, say: torch's own error names no hook
        raise ValueError(
            f"a hook on {hook_point.name} returned a tensor on {returned.device}, but the activation it was given "
            f"is on {given.device}: move it there first (e.g. patch.to(activation.device))"
        )


class Embed(nn.Module):
    """Token embedding. ``W_E``: ``[d_vocab, d_model]``."""

    def __init__(self, d_vocab: int, d_model: int, dtype: torch.dtype):
        super().__init__()
        self.W_E = nn.Parameter(torch.empty(d_vocab, d_model, dtype=dtype))

    def forward(self, tokens: Tensor) -> Tensor:
        """``tokens [b, p]`` → ``[b, p, d]``."""
        return self.W_E[tokens]


class RMSNorm(nn.Module):
    """RMSNorm with TransformerLens hooks.

    ``apply_weight=False`` makes it a pre-norm whose weight ``w`` is folded into the
    next linear map (the final norm: its weight lives in ``W_U``, as with
    TransformerLens' ``fold_ln``), so that ``cache.apply_ln_to_stack`` followed by
    ``W_U`` reproduces the logits exactly. The weight is still stored here, under
    the checkpoint's name.
    """

    def __init__(self, d: int, eps: float, dtype: torch.dtype, apply_weight: bool = True):
        super().__init__()
        self.eps = eps
        self.apply_weight = apply_weight
        self.w = nn.Parameter(torch.ones(d, dtype=dtype))
        self.hook_scale = CheckedHookPoint()  # [b, p, 1]
        self.hook_normalized = CheckedHookPoint()  # [b, p, d]

    def forward(self, x: Tensor) -> Tensor:
        """``[b, p, d]`` → ``[b, p, d]`` in the weight's dtype (the norm itself runs in fp32)."""
        xf = upcast(x)
        scale = self.hook_scale((xf.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normalized = self.hook_normalized(xf / scale).to(self.w.dtype)
        return normalized * self.w if self.apply_weight else normalized


def weightless_rms(x: Tensor, eps: float) -> Tensor:
    """Falcon-Mamba's weightless RMS norm on dt_low, B and C (computed in fp32)."""
    xf = upcast(x)
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Unembed(nn.Module):
    """Unembedding. Owns ``weight [d_vocab, d_model]`` unless tied to ``Embed.W_E``."""

    def __init__(self, d_model: int, d_vocab: int, dtype: torch.dtype, tied_to: Embed | None,
                 final_norm: "RMSNorm | None" = None):
        super().__init__()
        # plain attributes would register these modules twice; keep them out of the module tree
        self._tied = [tied_to] if tied_to is not None else None
        self._final_norm = [final_norm] if final_norm is not None else None
        if tied_to is None:
            self.weight = nn.Parameter(torch.empty(d_vocab, d_model, dtype=dtype))

    @property
    def matrix(self) -> Tensor:
        """``[d_vocab, d_model]``: lm_head weight (the embedding when tied)."""
        return self._tied[0].W_E if self._tied is not None else self.weight

    @property
    def W_U(self) -> Tensor:
        """``[d_model, d_vocab]`` with the final norm's weight folded in (the model's ``W_U``), so that
        ``model.ln_final(x) @ model.unembed.W_U`` is the logits, as in TransformerLens."""
        w = self.matrix
        if self._final_norm is None:
            return w.T
        return (upcast(self._final_norm[0].w)[:, None] * upcast(w.T)).to(w.dtype)

    def forward(self, normalized: Tensor, final_norm_weight: Tensor | None = None) -> Tensor:
        """``normalized [b, p, d]`` (final RMSNorm output before its weight) → logits ``[b, p, v]``.

        ``final_norm_weight`` defaults to the final norm's weight, so ``model.unembed(model.ln_final(x))``
        gives the logits as in TransformerLens."""
        if final_norm_weight is None and self._final_norm is not None:
            final_norm_weight = self._final_norm[0].w
        w = self.matrix
        if final_norm_weight is not None:
            normalized = normalized * final_norm_weight
        return torch.nn.functional.linear(normalized.to(w.dtype), w)
