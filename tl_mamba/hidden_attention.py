"""Hidden attention: the scan written as an attention matrix.

With Δ, B and C fixed, a selective scan is linear in its input, so

    y_i = Σ_{j ≤ i} α[i, j] · x_j  +  D · x_i,
    α[i, j] = C_i · (Π_{k=j+1..i} exp(Δ_k A)) · Δ_j B_j

(Ali et al., "The Hidden Attention of Mamba Models"). α[i, i] = C_i · Δ_i B_i is
part of α; the D skip is not. Mamba-1 has one α per d_inner channel (A differs
per channel and state entry); Mamba-2 one per head (A is a scalar per head).

These are the edges ``hook_ssm_mask`` and ``Knockout(path="ssm")`` remove.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

REDUCTIONS = (None, "norm", "sum", "mean", "abs_max")


def _hook_ndim(cfg, hook: str) -> int:
    """The number of dims of a block hook with its batch axis (``hook_B`` / ``hook_C`` of Mamba-2:
    ``[b, p, g, n]``; the others used here ``[b, p, ·]``)."""
    return 4 if cfg.family == "mamba2" and hook in ("hook_B", "hook_C") else 3


def _layer_hooks(model, input_or_cache, layer: int, hooks: Sequence[str], attention_mask, what: str):
    """The ``blocks.{layer}.hook_*`` activations ``hooks`` (batch axis restored), from a cache
    (a MambaActivationCache or dict) or by running the model up to ``layer``.

    A cache must hold the whole sequence: ``ValueError`` when the activations disagree on
    ``[b, p]``, and when it was made with a ``pos_slice`` other than a prefix
    (:func:`_check_starts_at_zero`).
    """
    names = [f"blocks.{layer}.{hook}" for hook in hooks]
    from_cache = not isinstance(input_or_cache, (str, list, Tensor))
    if not from_cache:
        with torch.no_grad():
            _, cache = model.run_with_cache(input_or_cache, names_filter=lambda name: name in names,
                                            stop_at_layer=layer + 1, attention_mask=attention_mask)
    else:
        cache = input_or_cache
    try:
        values = [cache[name] for name in names]
    except KeyError as err:
        raise KeyError(f"{what} needs {names} in the cache; run_with_cache without a names_filter "
                       f"(or one that keeps them) provides them") from err
    if not from_cache:
        return values
    unbatched = getattr(cache, "has_batch_dim", True) is False  # run_with_cache(remove_batch_dim=True)
    out = []
    for name, hook, value in zip(names, hooks, values):
        want = _hook_ndim(model.cfg, hook)
        if unbatched or value.dim() == want - 1:  # a cache without its batch dim
            value = value[None]
        if value.dim() != want:
            raise ValueError(f"{what}: the cached {name} has shape {tuple(cache[name].shape)}; expected {want} dims "
                             f"with the batch axis ({want - 1} without it). Is the cache from this model?")
        out.append(value)
    shapes = {name: tuple(value.shape[:2]) for name, value in zip(names, out)}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{what}: the cached activations disagree on [b, p]: {shapes}; they must come from one run")
    _check_starts_at_zero(cache, what)
    return out


def _check_starts_at_zero(cache, what: str) -> None:
    """``ValueError`` when ``cache`` was made with a ``pos_slice`` that drops the first position
    (or any position before its last): α and the conv terms need the sequence from its first
    token, and a cut cache would silently give those of a shorter input. A prefix,
    ``slice(0, k)``, is the input's first ``k`` tokens and is fine. The cache records its
    ``pos_slice`` (:class:`tl_mamba.cache.MambaActivationCache`); a plain dict is taken as whole.
    """
    pos_slice = getattr(cache, "pos_slice", None)
    if pos_slice is None:
        return
    kept = getattr(pos_slice, "slice", pos_slice)  # TransformerLens's Slice wraps a slice, an int or indices
    if isinstance(kept, slice) and kept.start in (None, 0) and kept.step in (None, 1):
        return
    raise ValueError(
        f"{what} needs the whole sequence, from its first token, but this cache was made with "
        f"pos_slice={kept!r}. Pass the tokens, or a cache of the full run (or of a prefix: pos_slice=slice(0, k)).")


def _check_call(model, layer: int, reduce: Optional[str], what: str) -> int:
    """``layer`` in ``[0, n_layers)``; IndexError / ValueError naming ``what`` for a bad layer or reduction."""
    n_layers = model.cfg.n_layers
    if not -n_layers <= layer < n_layers:
        raise IndexError(f"{what}: layer {layer} out of range for {n_layers} layers")
    if reduce not in REDUCTIONS:
        raise ValueError(f"{what}: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return layer % n_layers


def _check_memory(model, needed: int, layer: int, what: str, fewer: str) -> None:
    if needed > model.heavy_hook_memory_limit:
        raise MemoryError(f"{what} of layer {layer} would need {needed / 2**30:.2f} GiB for this input, over "
                          f"model.heavy_hook_memory_limit ({model.heavy_hook_memory_limit / 2**30:.2f} GiB); choose "
                          f"fewer {fewer}, pass reduce=, or shorten the input")


def _select(index, size: int, what: str) -> Tensor:
    if index is None:
        return torch.arange(size)
    if isinstance(index, int):
        index = [index]
    index = torch.as_tensor(list(index.tolist() if isinstance(index, Tensor) else index), dtype=torch.long)
    if index.numel() == 0:
        raise ValueError(f"hidden_attention: {what} is empty")
    if bool(((index < -size) | (index >= size)).any()):
        raise IndexError(f"hidden_attention: {what} {index.tolist()} out of range for {size}")
    return index % size


def _result_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (a float64 model keeps its precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _reduce_into(total: Optional[Tensor], alpha: Tensor, reduce: str) -> Tensor:
    """Accumulate a chunk of features ``alpha [b, c, p, p]`` into a ``[b, p, p]`` reduction."""
    if reduce == "norm":
        part = alpha.pow(2).sum(1)
    elif reduce in ("sum", "mean"):
        part = alpha.sum(1)
    else:  # abs_max
        part = alpha.abs().amax(1)
    if total is None:
        return part
    return torch.maximum(total, part) if reduce == "abs_max" else total + part


def hidden_attention(
    model,
    input_or_cache: Union[str, Sequence[str], Tensor, "object"],
    layer: int,
    heads: Optional[Sequence[int]] = None,
    channels: Optional[Sequence[int]] = None,
    reduce: Optional[str] = None,
    attention_mask: Optional[Tensor] = None,
    chunk_bytes: int = 2**28,
) -> Tensor:
    """α of ``layer``: ``[b, h, p, p]`` (Mamba-2, the chosen heads) or ``[b, c, p, p]``
    (Mamba-1, the chosen channels; all d_inner channels when None). Target i is axis -2,
    source j axis -1; entries above the diagonal are 0.

    Args:
        input_or_cache: tokens ``[b, p]``, text, or a cache holding the layer's
            ``hook_delta``, ``hook_B`` and ``hook_C`` over the whole sequence (with or
            without the batch axis: ``remove_batch_dim=True`` caches work for both
            families). A cache cut by ``pos_slice`` (other than a prefix ``slice(0, k)``)
            raises ``ValueError``.
        heads: Mamba-2 heads to return. channels: Mamba-1 channels to return.
        reduce: ``None`` (every feature), or a ``[b, p, p]`` view over the chosen
            features for plotting: ``"norm"`` (L2 norm), ``"sum"``, ``"mean"``,
            ``"abs_max"``. Computed chunk by chunk, so the per-feature tensor is never held.
        chunk_bytes: working memory per chunk of channels (Mamba-1).

    Returns float32 (float64 for a float64 model).

    Memory: the result, ``b·c·p²·4`` bytes (``b·p²·4`` when reduced; twice that in float64), plus about
    ``chunk_bytes`` of working memory. For Mamba-1 the ``[b, e, n, p, p]`` tensor of
    per-state decays is never built: the state axis is summed one entry at a time over
    chunks of channels. At 130m widths (e = 1536) and p = 512 the unreduced Mamba-1
    result is 1.5 GiB per sequence, so choose channels or a reduction. A result over
    ``model.heavy_hook_memory_limit`` raises ``MemoryError``.
    """
    cfg = model.cfg
    layer = _check_call(model, layer, reduce, "hidden_attention")
    if cfg.family == "mamba1" and heads is not None:
        raise ValueError("hidden_attention: heads= is for Mamba-2; Mamba-1 has channels=")
    if cfg.family == "mamba2" and channels is not None:
        raise ValueError("hidden_attention: channels= is for Mamba-1; Mamba-2 has heads=")
    delta, B, C = _layer_hooks(model, input_or_cache, layer, ("hook_delta", "hook_B", "hook_C"), attention_mask,
                               "hidden_attention")
    A = -torch.exp(model.blocks[layer].mixer.A_log.detach().double())
    b, p = delta.shape[:2]
    features = _select(heads if cfg.family == "mamba2" else channels,
                       cfg.n_heads if cfg.family == "mamba2" else cfg.d_inner, "heads" if heads is not None else "channels")
    out_features = 1 if reduce else features.numel()
    dtype = _result_dtype(delta, B, C)
    _check_memory(model, b * out_features * p * p * dtype.itemsize, layer, "hidden_attention", "heads/channels")
    causal = torch.ones(p, p, dtype=torch.bool, device=delta.device).tril()
    with torch.no_grad():
        if cfg.family == "mamba2":
            alpha = _mamba2_alpha(cfg, delta, A.to(delta.device), B, C, features.to(delta.device), causal, dtype)
            if reduce is None:
                return alpha
            total = _reduce_into(None, alpha, reduce)
        else:
            return_all = reduce is None
            result, total = [], None
            chunk = max(1, chunk_bytes // max(1, b * p * p * 8 * 3))
            for start in range(0, features.numel(), chunk):
                idx = features[start:start + chunk].to(delta.device)
                alpha = _mamba1_alpha(delta[..., idx], A.to(delta.device)[idx], B, C, causal, dtype)
                if return_all:
                    result.append(alpha)
                else:
                    total = _reduce_into(total, alpha, reduce)
            if return_all:
                return torch.cat(result, dim=1)
    return _finish(total, reduce, features.numel())


def _finish(total: Tensor, reduce: str, n_features: int) -> Tensor:
    """The ``[b, p, p]`` reduction from what :func:`_reduce_into` accumulated."""
    if reduce == "norm":
        return total.sqrt()
    if reduce == "mean":
        return total / n_features
    return total


def conv_attention(
    model,
    input_or_cache: Union[str, Sequence[str], Tensor, "object"],
    layer: int,
    channels: Optional[Sequence[int]] = None,
    reduce: Optional[str] = None,
    attention_mask: Optional[Tensor] = None,
) -> Tensor:
    """The depthwise causal conv of ``layer`` written as token → token terms, like α for the scan.

    ``hook_conv[i, c] = bias[c] + Σ_j K_c[i, j]`` with ``K_c[i, j] = w[c, k-1-(i-j)] · conv_in[j, c]``
    for ``0 ≤ i - j < k`` (``k = d_conv``; 0 elsewhere): what source j carries into target i
    through channel c before the SiLU. These are the terms ``Knockout(path="conv")`` removes.
    Returns ``[b, c, p, p]`` over ``channels`` (default all: Mamba-1's ``d_inner``; Mamba-2's
    ``e + 2·g·n`` of ``hook_conv``, x first, then B, then C), target i on axis -2, source j on
    axis -1; or with ``reduce`` (``"norm"``, ``"sum"``, ``"mean"``, ``"abs_max"`` over the
    channels) ``[b, p, p]``, e.g. to see a conv that moves tokens one position forward.

    Args:
        input_or_cache: tokens ``[b, p]``, text, or a cache holding ``blocks.{layer}.hook_conv_in``
            over the whole sequence (checked as in :func:`hidden_attention`).

    Returns float32 (float64 for a float64 model).

    Memory: the result, ``b·c·p²·4`` bytes (``b·p²·4`` reduced; twice that in float64), checked against
    ``model.heavy_hook_memory_limit`` (``MemoryError``): only ``k`` diagonals are non-zero,
    so choose channels or a reduction for long inputs.
    """
    layer = _check_call(model, layer, reduce, "conv_attention")
    (conv_in,) = _layer_hooks(model, input_or_cache, layer, ("hook_conv_in",), attention_mask, "conv_attention")
    weight = model.blocks[layer].mixer.conv1d.weight.detach()[:, 0]  # [C, k]
    b, p, n_channels = conv_in.shape
    chosen = _select(channels, n_channels, "channels").to(conv_in.device)
    out_features = 1 if reduce else chosen.numel()
    dtype = _result_dtype(conv_in, weight)
    _check_memory(model, b * out_features * p * p * dtype.itemsize, layer, "conv_attention", "channels")
    k = weight.shape[-1]
    source = conv_in.detach().to(dtype)[..., chosen].permute(0, 2, 1)  # [b, c, p]
    taps = weight[chosen].to(dtype)  # [c, k]
    terms = torch.zeros(b, chosen.numel(), p, p, dtype=dtype, device=conv_in.device)
    for lag in range(min(k, p)):  # target i = source j + lag, tap k-1-lag
        targets = torch.arange(lag, p, device=conv_in.device)
        terms[:, :, targets, targets - lag] = taps[:, k - 1 - lag, None] * source[:, :, : p - lag]
    if reduce is None:
        return terms
    return _finish(_reduce_into(None, terms, reduce), reduce, chosen.numel())


def _segment_decay(log_decay: Tensor, causal: Tensor, dtype: torch.dtype) -> Tensor:
    """``exp(L_i - L_j)`` for ``L = cumsum(log_decay)`` over the last axis, masked to j ≤ i.

    The cumulative sum is taken in float64, so the difference of two long sums keeps
    its precision; entries above the diagonal are 0. Returned in ``dtype``.
    """
    L = torch.cumsum(log_decay.double(), dim=-1)
    diff = L[..., :, None] - L[..., None, :]  # [..., i, j]
    return torch.exp(diff.masked_fill(~causal, float("-inf"))).to(dtype)


def _mamba1_alpha(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, causal: Tensor, dtype: torch.dtype) -> Tensor:
    """α for a chunk of channels: delta ``[b, p, c]``, A ``[c, n]``, B/C ``[b, p, n]`` → ``[b, c, p, p]``."""
    b, p, c = delta.shape
    dt = delta.double().permute(0, 2, 1)  # [b, c, p]
    alpha = torch.zeros(b, c, p, p, dtype=dtype, device=delta.device)
    for s in range(A.shape[-1]):  # one state entry at a time: never [b, c, n, p, p]
        decay = _segment_decay(dt * A[:, s, None], causal, dtype)  # [b, c, i, j]
        cb = (C[:, :, s, None].to(dtype) * B[:, None, :, s].to(dtype))  # [b, i, j]
        alpha += decay * cb[:, None]
    return alpha * delta.to(dtype).permute(0, 2, 1)[:, :, None, :]  # Δ_j


def _mamba2_alpha(cfg, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, heads: Tensor, causal: Tensor,
                  dtype: torch.dtype) -> Tensor:
    """α for the chosen heads: delta ``[b, p, h]``, A ``[h]``, B/C ``[b, p, g, n]`` → ``[b, len(heads), p, p]``."""
    groups = heads // (cfg.n_heads // cfg.n_groups)
    dt = delta.double()[..., heads].permute(0, 2, 1)  # [b, H, p]
    decay = _segment_decay(dt * A[heads, None], causal, dtype)  # [b, H, i, j]
    cb = torch.einsum("bign,bjgn->bgij", C.to(dtype), B.to(dtype))[:, groups]  # [b, H, i, j]
    return decay * cb * dt.to(dtype)[:, :, None, :]
