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

from tl_mamba.errors import NotAnIndexError, OutOfRangeError
from tl_mamba.knockout import _index_list
from tl_mamba.ops.buffers import format_bytes

REDUCTIONS = (None, "norm", "sum", "mean", "abs_max")


def _hook_features(cfg, hook: str) -> tuple:
    """The shape after ``[b, p]`` of the block hooks read here, for checking a cache."""
    e, n, g, h = cfg.d_inner, cfg.d_state, cfg.n_groups, cfg.n_heads
    mamba2 = cfg.family == "mamba2"
    return {"hook_delta": (h,) if mamba2 else (e,),
            "hook_B": (g, n) if mamba2 else (n,),
            "hook_C": (g, n) if mamba2 else (n,),
            "hook_conv_in": (e + 2 * g * n,) if mamba2 else (e,)}[hook]


def _layer_hooks(model, input_or_cache, layer: int, hooks: Sequence[str], attention_mask, what: str):
    """The ``blocks.{layer}.hook_*`` activations ``hooks`` (batch axis restored), from a cache
    (a MambaActivationCache or dict) or by running the model up to ``layer``.

    A cache must hold the whole sequence: ``ValueError`` when the activations disagree on
    ``[b, p]``, and when it was made with a ``pos_slice`` other than a prefix
    (:func:`_check_starts_at_zero`).
    """
    names = [f"blocks.{layer}.{hook}" for hook in hooks]
    from_cache = not isinstance(input_or_cache, (str, list, Tensor))
    if from_cache and attention_mask is not None:
        raise ValueError(f"{what}: attention_mask goes with token or text input; a cache's activations already "
                         "carry the padding of the run that made it (pass attention_mask= to that run_with_cache)")
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
        features = _hook_features(model.cfg, hook)
        want = 2 + len(features)
        if unbatched or value.dim() == want - 1:  # a cache without its batch dim
            value = value[None]
        if value.dim() != want or tuple(value.shape[2:]) != features:
            raise ValueError(f"{what}: the cached {name} has shape {tuple(cache[name].shape)}; this "
                             f"{model.cfg.family} model's is [b, p, {', '.join(map(str, features))}] ([p, ...] without "
                             "the batch axis). Is the cache from this model?")
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
    if isinstance(layer, bool) or not hasattr(layer, "__index__"):  # 1.5 or "1": not read as a layer
        raise NotAnIndexError(f"{what}: layer must be an integer, got {layer!r} of type {type(layer).__name__}")
    layer = int(layer)
    if not -n_layers <= layer < n_layers:
        raise OutOfRangeError(f"{what}: layer {layer} out of range for {n_layers} layers")
    if reduce not in REDUCTIONS:
        raise ValueError(f"{what}: reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return layer % n_layers


def _check_memory(model, needed: int, layer: int, what: str, fewer: str) -> None:
    if needed > model.heavy_hook_memory_limit:
        raise MemoryError(f"{what} of layer {layer} would need {format_bytes(needed)} for this input, over "
                          f"model.heavy_hook_memory_limit ({format_bytes(model.heavy_hook_memory_limit)}); choose "
                          f"fewer {fewer}, pass reduce=, or shorten the input")


def _select(index, size: int, what: str, owner: str = "hidden_attention") -> Tensor:
    """``heads`` / ``channels`` (None: all) as a long tensor in ``[0, size)``: integers, or a bool
    tensor ``[size]`` as ``Knockout`` takes (a float such as 1.9 would be truncated to another head,
    a Python bool read as head 0 or 1, so those are refused)."""
    if index is None:
        return torch.arange(size)
    if isinstance(index, Tensor) and index.dtype == torch.bool:
        if tuple(index.shape) != (size,):
            raise ValueError(f"{owner}: a bool mask of {what} must have {size} entries, got shape {tuple(index.shape)}")
        index = index.cpu().nonzero()[:, 0]
        if index.numel() == 0:
            raise ValueError(f"{owner}: the {what} mask chooses none")
        return index
    index = torch.tensor(_index_list(index, what, owner=owner, mask_ok=True), dtype=torch.long)
    if index.numel() == 0:
        raise ValueError(f"{owner}: {what} is empty")
    if bool(((index < -size) | (index >= size)).any()):
        raise OutOfRangeError(f"{owner}: {what} {index.tolist()} out of range for {size}")
    return index % size


def _result_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input is float64 (a float64 model keeps its precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _reduce_into(total: Optional[Tensor], alpha: Tensor, reduce: str) -> Tensor:
    """Accumulate a chunk of features ``alpha [b, c, p, p]`` into a ``[b, p, p]`` reduction.

    ``alpha`` is scratch: ``"norm"`` and ``"abs_max"`` overwrite it in place, so no second
    chunk-sized tensor is made. ``total`` is updated in place (and returned).
    """
    if reduce == "norm":
        part = alpha.pow_(2).sum(1)
    elif reduce in ("sum", "mean"):
        part = alpha.sum(1)
    else:  # abs_max
        part = alpha.abs_().amax(1)
    if total is None:
        return part
    return torch.maximum(total, part, out=total) if reduce == "abs_max" else total.add_(part)


def _chunk_size(model, layer: int, what: str, fewer: str, n_features: int, result_bytes: int, fixed_bytes: int,
                per_feature_bytes: int, chunk_bytes: int) -> int:
    """Features per chunk, and the memory guard.

    Working memory is ``fixed_bytes`` plus ``per_feature_bytes`` per feature of a chunk. A chunk
    holds at most ``chunk_bytes`` of it, fewer features when that is needed to keep the result and
    the working memory together under ``model.heavy_hook_memory_limit``, and at least one feature.
    ``MemoryError`` (:func:`_check_memory`) when even one feature at a time is over the limit.
    """
    room = model.heavy_hook_memory_limit - result_bytes - fixed_bytes
    budget = chunk_bytes if room >= chunk_bytes else room
    chunk = int(max(1, min(n_features, budget // max(1, per_feature_bytes))))
    _check_memory(model, result_bytes + fixed_bytes + chunk * per_feature_bytes, layer, what, fewer)
    return chunk


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
        heads: Mamba-2 heads to return. channels: Mamba-1 channels to return. Integers, or a
            bool mask ``[h]`` / ``[e]`` as ``Knockout`` takes.
        reduce: ``None`` (every feature), or a ``[b, p, p]`` view over the chosen
            features for plotting: ``"norm"`` (L2 norm), ``"sum"``, ``"mean"``,
            ``"abs_max"``. Computed chunk by chunk, so the per-feature tensor is never held.
        attention_mask: ``[b, p]``, 1 = real token, for token or text input with padding (as the
            forward takes it); with a cache, a ``ValueError`` (pass it to the run that made the cache).
        chunk_bytes: the most working memory of one chunk of features (Mamba-1 channels,
            Mamba-2 heads); a chunk holds at least one feature.

    Returns float32 (float64 for a float64 model).

    Memory: the result, ``b·c·p²·4`` bytes (``b·p²·4`` when reduced; twice that in float64), plus
    the working memory of one chunk of features, at most about ``chunk_bytes`` however many
    features are chosen. Per feature of the chunk, for a float32 model: Mamba-1 ``b·p²·20`` bytes
    (the float64 cumulative-Δ differences, their float64 decay and its float32 copy), ``b·p²·24``
    reduced; Mamba-2 ``b·p²·8`` (the float64 decay), ``b·p²·12`` reduced or when ``heads`` are not in
    group order. For a float64 model: Mamba-1 ``b·p²·16`` (``b·p²·24`` reduced); Mamba-2 nothing
    (the decay is formed in the result; ``b·p²·8`` reduced or out of group order). Besides the chunk,
    a few ``[b, p, p]`` tensors (``C·Bᵀ`` of one state entry or one group; the partial reduction)
    and the causal mask. One feature's working memory is the least a call needs. For Mamba-1 the
    ``[b, e, n, p, p]`` tensor of per-state decays is never built: the state axis is summed one
    entry at a time over chunks of channels. At 130m widths (e = 1536) and p = 512 the unreduced
    Mamba-1 result is 1.5 GiB per sequence, so choose channels or a reduction. Chunks shrink to keep
    the result and the working memory together under ``model.heavy_hook_memory_limit``; when even
    one feature at a time is over it, ``MemoryError``.
    """
    cfg = model.cfg
    layer = _check_call(model, layer, reduce, "hidden_attention")
    if cfg.family == "mamba1" and heads is not None:
        raise ValueError("hidden_attention: heads= is for Mamba-2; Mamba-1 has channels=")
    if cfg.family == "mamba2" and channels is not None:
        raise ValueError("hidden_attention: channels= is for Mamba-1; Mamba-2 has heads=")
    delta, B, C = _layer_hooks(model, input_or_cache, layer, ("hook_delta", "hook_B", "hook_C"), attention_mask,
                               "hidden_attention")
    A = -torch.exp(model.blocks[layer].mixer.A_log.detach().double()).to(delta.device)
    b, p = delta.shape[:2]
    features = _select(heads if cfg.family == "mamba2" else channels,
                       cfg.n_heads if cfg.family == "mamba2" else cfg.d_inner,
                       "heads" if heads is not None else "channels").to(delta.device)
    n_features = features.numel()
    dtype = _result_dtype(delta, B, C)
    size = dtype.itemsize
    plane = b * p * p  # elements of one feature's [b, p, p]
    result_bytes = (plane if reduce else n_features * plane) * size
    # [b, p, p] tensors besides the chunk: C·Bᵀ (one state entry / one group), the partial reduction;
    # the p×p causal mask
    fixed = plane * size * (2 if reduce else 1) + p * p
    if cfg.family == "mamba2":
        group_of = features // (cfg.n_heads // cfg.n_groups)
        order = torch.sort(group_of, stable=True).indices  # heads of a group together: one C·Bᵀ at a time
        in_place = reduce is None and bool((order == torch.arange(n_features, device=order.device)).all())
        per_feature = plane * ((0 if in_place and dtype == torch.float64 else 8)
                               + (0 if in_place or dtype == torch.float64 else size))
        fixed += b * n_features * p * (16 + size)  # Δ and L = cumsum(Δ·A) of every chosen head, Δ_j in dtype
    else:
        order = None
        per_feature = (plane * (16 + (size if dtype != torch.float64 else 0) + (size if reduce else 0))
                       + b * p * (16 + 2 * size))  # and the chunk's Δ, L = cumsum(Δ) and Δ_j
    chunk = _chunk_size(model, layer, "hidden_attention", "heads/channels", n_features, result_bytes, fixed,
                        per_feature, chunk_bytes)
    with torch.no_grad():
        if reduce is None:
            result = torch.empty(b, n_features, p, p, dtype=dtype, device=delta.device)
            sink = None
        else:
            result, total = None, [None]

            def sink(alpha: Tensor) -> None:
                total[0] = _reduce_into(total[0], alpha, reduce)
        if cfg.family == "mamba2":
            _mamba2_alpha(delta, A, B, C, features, group_of, order, dtype, chunk, result, sink)
        else:
            _mamba1_alpha(delta, A, B, C, features, dtype, chunk, result, sink)
    if reduce is None:
        return result
    return _finish(total[0], reduce, n_features)


def _finish(total: Tensor, reduce: str, n_features: int) -> Tensor:
    """The ``[b, p, p]`` reduction from what :func:`_reduce_into` accumulated (in place)."""
    if reduce == "norm":
        return total.sqrt_()
    if reduce == "mean":
        return total.div_(n_features)
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
        channels: the ``hook_conv`` channels to return (default all), as in :func:`hidden_attention`.
        reduce: None, or ``"norm"``, ``"sum"``, ``"mean"``, ``"abs_max"`` over the channels.
        attention_mask: as in :func:`hidden_attention` (token or text input only).

    Returns float32 (float64 for a float64 model).

    Memory: the result, ``b·c·p²·4`` bytes (``b·p²·4`` reduced; twice that in float64), plus a
    working memory of a few ``[b, c, p]`` tensors (the reduction is taken diagonal by diagonal,
    so the ``[b, c, p, p]`` terms are never built for it); the two together are checked against
    ``model.heavy_hook_memory_limit`` (``MemoryError``): only ``k`` diagonals are non-zero,
    so choose channels or a reduction for long inputs.
    """
    layer = _check_call(model, layer, reduce, "conv_attention")
    (conv_in,) = _layer_hooks(model, input_or_cache, layer, ("hook_conv_in",), attention_mask, "conv_attention")
    weight = model.blocks[layer].mixer.conv1d.weight.detach()[:, 0]  # [C, k]
    b, p, n_channels = conv_in.shape
    chosen = _select(channels, n_channels, "channels", owner="conv_attention").to(conv_in.device)
    out_features = 1 if reduce else chosen.numel()
    dtype = _result_dtype(conv_in, weight)
    # working memory: conv_in in dtype [b, p, C], the chosen channels [b, c, p], one diagonal's terms
    # and (reduced) their square: [b, c, p] each
    working = b * p * (n_channels + 3 * chosen.numel()) * dtype.itemsize
    _check_memory(model, b * out_features * p * p * dtype.itemsize + working, layer, "conv_attention", "channels")
    k = weight.shape[-1]
    source = conv_in.detach().to(dtype)[..., chosen].permute(0, 2, 1)  # [b, c, p]
    taps = weight[chosen].to(dtype)  # [c, k]
    if reduce is None:
        terms = torch.zeros(b, chosen.numel(), p, p, dtype=dtype, device=conv_in.device)
    else:
        total = torch.zeros(b, p, p, dtype=dtype, device=conv_in.device)
    for lag in range(min(k, p)):  # target i = source j + lag, tap k-1-lag
        targets = torch.arange(lag, p, device=conv_in.device)
        diagonal = taps[:, k - 1 - lag, None] * source[:, :, : p - lag]  # [b, c, p - lag]
        if reduce is None:
            terms[:, :, targets, targets - lag] = diagonal
        else:  # off the k diagonals every channel is 0, and so is each reduction
            total[:, targets, targets - lag] = _reduce_into(None, diagonal, reduce)
    if reduce is None:
        return terms
    return _finish(total, reduce, chosen.numel())


def _mamba1_alpha(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, channels: Tensor, dtype: torch.dtype, chunk: int,
                  result: Optional[Tensor], sink) -> None:
    """α of Mamba-1 ``channels``, ``chunk`` channels at a time: delta ``[b, p, e]``, A ``[e, n]`` (float64),
    B/C ``[b, p, n]``. Each chunk ``[b, c, p, p]`` is written into ``result [b, len(channels), p, p]``
    or, when ``result`` is None, handed to ``sink`` (scratch it may overwrite).

    α[i, j] = Δ_j Σ_s C_i[s] B_j[s] exp(A[s] (L_i - L_j)) with ``L = cumsum(Δ)`` taken in float64,
    so the difference of two long sums keeps its precision. The differences do not depend on the
    state entry: they are formed once per chunk; each state entry then only scales, exponentiates and
    accumulates, in buffers made once per call (the ``[b, c, n, p, p]`` decays are never held).
    """
    b, p, _ = delta.shape
    device = delta.device
    upper = torch.ones(p, p, dtype=torch.bool, device=device).triu_(1)  # j > i
    if bool((A == 0).any()):  # A·(+inf) would be nan above the diagonal; only an A_log below ~-745 gives 0
        A = A.clamp(max=-torch.finfo(torch.float64).tiny)
    Bd, Cd = B.to(dtype), C.to(dtype)
    width = min(chunk, channels.numel())
    diff = torch.empty(b, width, p, p, dtype=torch.float64, device=device)
    decay64 = torch.empty_like(diff)
    decay = decay64 if dtype == torch.float64 else torch.empty(b, width, p, p, dtype=dtype, device=device)
    scratch = None if result is not None else torch.empty(b, width, p, p, dtype=dtype, device=device)
    cb = torch.empty(b, 1, p, p, dtype=dtype, device=device)
    for start in range(0, channels.numel(), chunk):
        idx = channels[start:start + chunk]
        c = idx.numel()
        dt = delta[..., idx]  # [b, p, c]
        L = torch.cumsum(dt.double().permute(0, 2, 1), dim=-1)  # [b, c, p]
        d = torch.sub(L[..., :, None], L[..., None, :], out=diff.narrow(1, 0, c))  # L_i - L_j, [b, c, i, j]
        d.masked_fill_(upper, float("inf"))  # A < 0: exp(A·inf) = 0 above the diagonal
        e64, e = decay64.narrow(1, 0, c), decay.narrow(1, 0, c)
        alpha = result.narrow(1, start, c) if result is not None else scratch.narrow(1, 0, c)
        alpha.zero_()
        for s in range(A.shape[-1]):  # one state entry at a time: never [b, c, n, p, p]
            torch.mul(d, A[idx, s].view(1, c, 1, 1), out=e64).exp_()  # float64 exp
            if e is not e64:
                e.copy_(e64)  # rounded once to dtype (exp(out=) of another dtype would allocate a float64 temporary)
            torch.mul(Cd[:, None, :, s, None], Bd[:, None, None, :, s], out=cb)  # C_i[s] B_j[s]
            alpha.add_(e.mul_(cb))
        alpha.mul_(dt.to(dtype).permute(0, 2, 1)[:, :, None, :])  # Δ_j
        if result is None:
            sink(alpha)


def _mamba2_alpha(delta: Tensor, A: Tensor, B: Tensor, C: Tensor, heads: Tensor, group_of: Tensor, order: Tensor,
                  dtype: torch.dtype, chunk: int, result: Optional[Tensor], sink) -> None:
    """α of Mamba-2 ``heads``, ``chunk`` heads at a time: delta ``[b, p, h]``, A ``[h]`` (float64), B/C
    ``[b, p, g, n]``; ``group_of`` the group of each chosen head, ``order`` the chosen heads sorted by
    group (so ``C·Bᵀ`` of one group is held at a time). Each chunk ``[b, c, p, p]`` is written into
    ``result [b, len(heads), p, p]`` (at the heads' places) or, when ``result`` is None, handed to
    ``sink`` (scratch it may overwrite).

    α[i, j] = exp(L_i - L_j) · C_i·B_j · Δ_j with ``L = cumsum(Δ·A)`` in float64.
    """
    b, p, _ = delta.shape
    device = delta.device
    n = heads.numel()
    upper = torch.ones(p, p, dtype=torch.bool, device=device).triu_(1)  # j > i
    dt = delta.double()[..., heads].permute(0, 2, 1)  # [b, H, p]
    L = torch.cumsum(dt * A[heads, None], dim=-1)  # [b, H, p]
    dt_j = dt.to(dtype)[:, :, None, :]  # Δ_j, [b, H, 1, p]
    in_place = result is not None and bool((order == torch.arange(n, device=device)).all())
    width = min(chunk, n)
    decay64 = None if in_place and dtype == torch.float64 else torch.empty(b, width, p, p, dtype=torch.float64,
                                                                            device=device)
    if in_place:
        scratch = None
    elif dtype == torch.float64:
        scratch = decay64
    else:
        scratch = torch.empty(b, width, p, p, dtype=dtype, device=device)
    cb, cb_group = None, None
    for start in range(0, n, chunk):
        pos = order[start:start + chunk]  # places in the result, of heads in group order
        c = pos.numel()
        alpha = result.narrow(1, start, c) if in_place else scratch.narrow(1, 0, c)
        e64 = alpha if decay64 is None else decay64.narrow(1, 0, c)
        Lc = L[:, pos]
        torch.sub(Lc[..., :, None], Lc[..., None, :], out=e64)  # [b, c, i, j]
        e64.masked_fill_(upper, float("-inf")).exp_()
        if e64 is not alpha:
            alpha.copy_(e64)  # rounded once to dtype
        for k in range(c):
            g = int(group_of[pos[k]])
            if g != cb_group:
                cb = None  # one group's C·Bᵀ at a time
                cb = torch.einsum("bin,bjn->bij", C[:, :, g].to(dtype), B[:, :, g].to(dtype))  # [b, i, j]
                cb_group = g
            alpha[:, k].mul_(cb)
        alpha.mul_(dt_j[:, pos])
        if result is None:
            sink(alpha)
        elif not in_place:
            result.index_copy_(1, pos, alpha)
