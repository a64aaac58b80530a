"""``ActivationCache`` for Mamba models.

A subclass of ``transformer_lens.ActivationCache`` so that every TransformerLens
utility accepts it. Two things differ from a transformer:

- shorthand keys: TransformerLens maps ``("z", 3)`` to ``blocks.3.attn.hook_z``;
  Mamba hooks sit directly on the block, so a shorthand that does not exist as
  TransformerLens spells it falls back to ``blocks.{l}.hook_{name}`` (``("z", 3)`` is
  Mamba's gate). A full transformer name (``blocks.3.attn.hook_z``, as TransformerLens's
  patching helpers ask for) is not remapped: its KeyError names the Mamba analogue;
- ``decompose_resid`` has one term per mixer (``{l}_mixer_out``) after the embed,
  because a Mamba block writes to the residual stream once;
- ``stack_head_results`` / ``compute_head_results`` split a Mamba-2 mixer's write
  into its SSM heads through ``out_proj`` (with the gated RMSNorm's scale held
  fixed, as TransformerLens holds a LayerNorm scale fixed). Mamba-1 has no heads;
- ``get_full_resid_decomposition`` gives the embed plus every Mamba-2 head, or
  every Mamba-1 ``d_inner`` channel (the analogue of an MLP neuron), plus the
  ``out_proj`` biases.
"""

from __future__ import annotations

import logging
import math
import re
from typing import List, Optional, Sequence, Tuple, Union

import torch
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice, get_act_name

from tl_mamba.errors import NotAnIndexError, OutOfRangeError
from tl_mamba.ops.buffers import format_bytes

_MIXER_SUBLAYER = re.compile(r"^blocks\.(\d+)\.(?:attn|mlp)\.(hook_\w+)$")

_NO_HEADS = (
    "Mamba-1 has no heads: each of its d_inner channels is its own one-dimensional SSM, and one "
    "out_proj reads them all. For one term per mixer use cache.decompose_resid(); for one term per "
    "channel (the analogue of TransformerLens' neurons) use cache.get_full_resid_decomposition(expand_neurons=True)."
)

_NO_NEURONS = (
    "Mamba blocks have no MLP, so no neurons. The closest analogue is one residual write per d_inner channel "
    "of the mixer: cache.get_full_resid_decomposition(expand_neurons=True) (Mamba-1; Mamba-2 gives one term "
    "per head, as cache.stack_head_results())."
)


def as_slice(pos_slice) -> Slice:
    """``pos_slice`` (an int, a tuple, indices, a ``Slice`` or None) as the ``Slice`` that cuts
    the position axis: an int keeps the axis where the ``Slice`` has ``unwrap`` (transformer-lens
    4.x), as its ``run_with_cache`` does."""
    pos_slice = Slice.unwrap(pos_slice) if hasattr(Slice, "unwrap") else Slice(pos_slice)
    return pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)


class MambaActivationCache(ActivationCache):
    """Activation cache of a ``HookedMamba`` / ``HookedMamba2`` run.

    Attributes (beyond ``ActivationCache``'s):
        pos_slice: the ``pos_slice`` that ``run_with_cache`` cut every hook's position
            axis with (as a TransformerLens ``Slice``), or None when every position is
            cached. Code that needs whole sequences (the hidden attention, which
            recomputes the scan from the cached activations) can refuse a cut cache:
            ``if cache.pos_slice is not None: raise ...``. ``apply_slice_to_batch_dim``
            keeps it.
    """

    #: None: every position cached (also for caches built directly from a dict)
    pos_slice = None

    def __init__(self, cache_dict, model, has_batch_dim: bool = True, pos_slice=None):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        if pos_slice is not None:
            pos_slice = as_slice(pos_slice)  # as run_with_cache applied it: (0, 5) is 0:5
        if isinstance(pos_slice, Slice) and pos_slice.mode == "identity":
            pos_slice = None  # Slice(None) cuts nothing
        self.pos_slice = pos_slice

    def apply_slice_to_batch_dim(self, batch_slice) -> "MambaActivationCache":
        """As ``ActivationCache.apply_slice_to_batch_dim``, returning a ``MambaActivationCache``
        (Mamba shorthand keys and methods, and ``pos_slice``, kept)."""
        sliced = super().apply_slice_to_batch_dim(batch_slice)
        return type(self)(sliced.cache_dict, self.model, has_batch_dim=sliced.has_batch_dim,
                          pos_slice=self.pos_slice)

    def _resolve(self, key) -> str:
        if isinstance(key, str):
            if key in self.cache_dict:
                return key
            name = get_act_name(key)
            if name == key and _MIXER_SUBLAYER.match(name):
                # a transformer's full hook name, typed or made by TransformerLens's patching
                # helpers: ``attn.hook_z`` is a head output there, while Mamba's hook_z is
                # the gate, so it is refused (__getitem__ names the analogue), not remapped
                return name
        else:
            key = tuple(key)
            if len(key) > 1 and key[1] is not None and key[1] < 0:
                key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
            name = get_act_name(*key)
        if name not in self.cache_dict:
            match = _MIXER_SUBLAYER.match(name)
            if match is not None:
                # shorthand TransformerLens spells as attention's (``cache["z", 3]``): the mixer's hook of
                # that name where Mamba has one; else TransformerLens' name is kept, so that the error
                # names the analogue (``cache["pattern", 3]``: the hidden attention)
                mixer = f"blocks.{match.group(1)}.{match.group(2)}"
                if mixer in self.cache_dict or mixer in getattr(self.model, "hook_dict", {}):
                    name = mixer
        return name

    def __getitem__(self, key) -> torch.Tensor:
        """Look up a hook by full name or TransformerLens shorthand (``cache["conv", 3]``)."""
        name = self._resolve(key)
        if name not in self.cache_dict:
            from tl_mamba.models.base import transformer_hook_analogue

            analogue = transformer_hook_analogue(name, self._family())
            if analogue is not None:  # a transformer's hook (TransformerLens' patching helpers ask for them)
                raise KeyError(f"{key!r} (resolved to {name!r}) is a transformer hook. {analogue}")
            raise KeyError(
                f"{key!r} (resolved to {name!r}) is not in this cache. Cached hooks include: "
                f"{', '.join(list(self.cache_dict)[:8])}{' ...' if len(self.cache_dict) > 8 else ''}. "
                "Heavy hooks (hook_h, hook_ssm_mask) are cached only when names_filter names them."
            )
        return self.cache_dict[name]

    def __contains__(self, key) -> bool:
        try:
            return self._resolve(key) in self.cache_dict
        except (TypeError, ValueError, KeyError, IndexError):  # a key no hook name can be made of
            return False

    def accumulated_resid(self, layer: Optional[int] = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: Union[Slice, None] = None, mlp_input: bool = False,
                          return_labels: bool = False):
        """The residual stream before each layer (and the final stream): ``[layers, b, p, d]``.

        As TransformerLens's, except that a Mamba block has one sublayer, so its stream has no
        ``resid_mid``: every point between sublayers is some layer's ``resid_pre``.
        ``incl_mid`` and ``mlp_input`` therefore add nothing (the trajectory is already
        complete); they are accepted so that TransformerLens tools that pass them (its direct
        logit attribution by ``unit="layer"``) run unchanged.
        """
        layer = self._layer_arg(layer, "accumulated_resid")
        return super().accumulated_resid(layer=layer, incl_mid=False, apply_ln=apply_ln, pos_slice=pos_slice,
                                         mlp_input=False, return_labels=return_labels)

    def decompose_resid(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        mode: str = "all",
        apply_ln: bool = False,
        pos_slice: Union[Slice, None] = None,
        incl_embeds: bool = True,
        return_labels: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[str]]]:
        """Decompose the residual stream into the embedding plus one term per mixer.

        Args:
            layer: decompose the input to this layer (``n_layers`` or None: the
                stream before the final norm).
            mlp_input: unsupported (Mamba blocks have no MLP); must be False.
            mode: ``"all"`` or ``"attn"`` (both give the mixers, the only
                token-mixing sublayer); ``"mlp"`` gives no block terms.
            apply_ln: divide by the cached RMSNorm scale of ``layer``.
            pos_slice: slice of the position axis.
            incl_embeds: include ``hook_embed``.
            return_labels: also return labels (``"embed"``, ``"{l}_mixer_out"``).

        Returns:
            ``[components, b, p, d]`` (and the labels). The components sum to
            ``resid_pre`` of ``layer`` (``resid_post`` of the last block for ``n_layers``).
        """
        if mlp_input:
            raise ValueError("Mamba blocks have no MLP, so mlp_input=True has no meaning here")
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode must be 'all', 'attn' or 'mlp', got {mode!r}")
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        layer = self._layer_arg(layer, "decompose_resid")
        components, labels = [], []
        if incl_embeds:
            components.append(self["hook_embed"])
            labels.append("embed")
        if mode != "mlp":
            for l in range(layer):
                components.append(self[f"blocks.{l}.hook_mixer_out"])
                labels.append(f"{l}_mixer_out")
        if not components:
            raise ValueError("decompose_resid has no components to return (incl_embeds=False and mode='mlp')")
        pos_dim = -2
        # in the residual stream's dtype: bf16 writes summed in bf16 drift from a residual kept in fp32
        resid_name = self._resid_name(layer)
        dtype = components[0].dtype
        for c in components[1:] + ([self.cache_dict[resid_name]] if resid_name in self.cache_dict else []):
            dtype = torch.promote_types(dtype, c.dtype)
        stack = torch.stack([pos_slice.apply(c, dim=pos_dim).to(dtype) for c in components], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------ per-head / per-channel writes
    def _family(self) -> str:
        return getattr(self.model.cfg, "family", "mamba1")

    def _layer_arg(self, layer: Optional[int], method: str) -> int:
        """``None`` and ``-1`` mean ``n_layers``; anything else must lie in ``[0, n_layers]``."""
        n_layers = self.model.cfg.n_layers
        if layer is None or layer == -1:
            return n_layers
        if isinstance(layer, bool) or not hasattr(layer, "__index__"):
            raise NotAnIndexError(f"{method}: layer must be an int in [0, {n_layers}], -1 or None, got {layer!r}")
        if not 0 <= int(layer) <= n_layers:
            raise OutOfRangeError(f"{method}: layer must be in [0, {n_layers}], -1 or None, got {layer!r}")
        return int(layer)

    def _resid_name(self, layer: int) -> str:
        """The hook holding the residual stream that is input to ``layer`` (the final stream for n_layers)."""
        n_layers = self.model.cfg.n_layers
        return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"

    def _require(self, names: Sequence[str], method: str) -> None:
        """KeyError naming every hook of ``names`` that this cache lacks."""
        missing = [name for name in names if name not in self.cache_dict]
        if missing:
            raise KeyError(
                f"{method} needs the cached hooks {', '.join(missing)}, which this cache lacks (did a "
                "names_filter leave them out?). Re-run run_with_cache with a names_filter that includes them."
            )

    def _check_stack_size(self, shape: Sequence[int], dtype: torch.dtype, method: str, hint: str) -> None:
        """MemoryError when a ``shape`` stack of ``dtype`` is over ``model.heavy_hook_memory_limit``."""
        limit = getattr(self.model, "heavy_hook_memory_limit", None)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if limit is not None and nbytes > limit:
            raise MemoryError(
                f"{method} would build a {tuple(shape)} {dtype} stack of {format_bytes(nbytes)}, over "
                f"model.heavy_hook_memory_limit ({format_bytes(limit)}). {hint}, or raise "
                "model.heavy_hook_memory_limit if you have the memory."
            )

    def _out_proj_weight(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        """``out_proj.weight [d, e]`` of ``layer`` in ``like``'s dtype and device (detached unless
        ``like`` carries a gradient)."""
        weight = self.model.blocks[layer].mixer.out_proj.weight
        if not like.requires_grad:
            weight = weight.detach()
        return weight.to(device=like.device, dtype=torch.promote_types(like.dtype, weight.dtype))

    def _valid_head_result(self, layer: int) -> bool:
        result = self.cache_dict.get(f"blocks.{layer}.hook_result")
        return (
            isinstance(result, torch.Tensor)
            and result.ndim == (4 if self.has_batch_dim else 3)
            and result.shape[-2] == self.model.cfg.n_heads
        )

    def _ensure_head_results(self, layers: Sequence[int], method: str) -> bool:
        """Store ``blocks.{l}.hook_result`` for ``layers`` where missing; True if all were cached."""
        if self._family() != "mamba2":
            raise ValueError(f"{method}: {_NO_HEADS}")
        todo = [l for l in layers if not self._valid_head_result(l)]
        self._require([f"blocks.{l}.hook_y_normed" for l in todo], method)
        cfg = self.model.cfg
        if todo:
            y_normed = self.cache_dict[f"blocks.{todo[0]}.hook_y_normed"]
            dtype = torch.promote_types(y_normed.dtype, self.model.blocks[todo[0]].mixer.out_proj.weight.dtype)
            self._check_stack_size((len(todo), *y_normed.shape[:-1], cfg.n_heads, cfg.d_model), dtype, method,
                                   "Use a smaller batch or fewer positions (run_with_cache(pos_slice=...))")
        for l in todo:
            y_normed = self.cache_dict[f"blocks.{l}.hook_y_normed"]  # [b, p, e]
            weight = self._out_proj_weight(l, y_normed)  # [d, e]
            y_heads = y_normed.to(weight.dtype).unflatten(-1, (cfg.n_heads, cfg.d_head))  # [b, p, h, hd]
            w_heads = weight.unflatten(1, (cfg.n_heads, cfg.d_head))  # [d, h, hd]
            self.cache_dict[f"blocks.{l}.hook_result"] = torch.einsum("...hk,dhk->...hd", y_heads, w_heads)
        return not todo

    def compute_head_results(self) -> None:
        """Compute and cache every Mamba-2 head's write to the residual stream.

        Stores ``blocks.{l}.hook_result`` (``[b, p, h, d]``, ``[p, h, d]`` for a
        ``remove_batch_dim`` cache) for every layer, so ``cache["result", l]``
        works. Head ``i`` writes ``out_proj.weight[:, i*hd:(i+1)*hd] @
        hook_y_normed[..., i*hd:(i+1)*hd]``. The heads of a layer sum to
        ``hook_mixer_out`` minus the ``out_proj`` bias (if any): the gated
        RMSNorm's scale is held at its cached value, as TransformerLens holds a
        LayerNorm's scale fixed. Results already cached are kept.

        Raises:
            ValueError: on a Mamba-1 cache (no heads).
            KeyError: when ``blocks.{l}.hook_y_normed`` is not cached.
        """
        if self._ensure_head_results(range(self.model.cfg.n_layers), "compute_head_results"):
            logging.warning("Tried to compute head results when they were already cached")

    def stack_neuron_results(self, layer: int, *args, **kwargs):
        """Refused: a Mamba block has no MLP neurons (the message names the per-channel analogue)."""
        raise ValueError(f"stack_neuron_results: {_NO_NEURONS}")

    def get_neuron_results(self, layer: int, *args, **kwargs):
        """Refused: a Mamba block has no MLP neurons (the message names the per-channel analogue)."""
        raise ValueError(f"get_neuron_results: {_NO_NEURONS}")

    def stack_head_results(
        self,
        layer: Optional[int] = None,
        return_labels: bool = False,
        incl_remainder: bool = False,
        pos_slice: Union[Slice, None] = None,
        apply_ln: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[str]]]:
        """Stack the writes of every Mamba-2 head of the layers before ``layer``.

        Args:
            layer: heads of layers ``< layer``; ``None``, ``-1`` or ``n_layers``: every layer.
            return_labels: also return the labels ``"L{l}H{h}"`` (and ``"remainder"``).
            incl_remainder: append one more term, the residual stream at ``layer``
                (``resid_pre`` of ``layer``, the final stream for ``n_layers``) minus
                the heads: the embed plus any ``out_proj`` biases.
            pos_slice: slice of the position axis.
            apply_ln: divide by the cached RMSNorm scale of ``layer`` (``ln_final``
                for ``n_layers``), via ``apply_ln_to_stack``.

        Returns:
            ``[layer * n_heads (+1), b, p, d]`` (``[.., p, d]`` without a batch
            dimension; the position axis goes with an int ``pos_slice``), ordered
            layer by layer, head by head; and the labels. See
            ``compute_head_results`` for what a head's write is; the results are
            stored in the cache as ``blocks.{l}.hook_result``.

        Raises:
            ValueError: on a Mamba-1 cache (no heads).
            KeyError: when the hooks it needs are not cached.
            MemoryError: when the stack is over ``model.heavy_hook_memory_limit``.
        """
        method = "stack_head_results"
        if self._family() != "mamba2":
            raise ValueError(f"{method}: {_NO_HEADS}")
        layer = self._layer_arg(layer, method)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        n_heads = self.model.cfg.n_heads
        needed = [self._resid_name(layer)] if incl_remainder else []
        if layer == 0 and not incl_remainder and "hook_embed" not in self.cache_dict:
            needed.append(self._resid_name(0))  # only for the shape of the empty stack
        needed += [f"blocks.{l}.hook_y_normed" for l in range(layer) if not self._valid_head_result(l)]
        self._require(needed, method)

        if layer > 0:  # [b, p', e] or [b, p', h, d] → the [b, p'] of the stack
            if self._valid_head_result(0):
                src = pos_slice.apply(self.cache_dict["blocks.0.hook_result"], dim=-3)[..., 0, :]
            else:
                src = pos_slice.apply(self.cache_dict["blocks.0.hook_y_normed"], dim=-2)
            dtype = torch.promote_types(src.dtype, self.model.blocks[0].mixer.out_proj.weight.dtype)
            self._check_stack_size((layer * n_heads, *src.shape[:-1], self.model.cfg.d_model), dtype, method,
                                   "Use a pos_slice or a smaller layer")
        self._ensure_head_results(range(layer), method)
        labels = [f"L{l}H{h}" for l in range(layer) for h in range(n_heads)]
        if layer > 0:
            per_layer = [pos_slice.apply(self.cache_dict[f"blocks.{l}.hook_result"], dim=-3) for l in range(layer)]
            stack = torch.cat(per_layer, dim=-2).movedim(-2, 0)  # [layer*h, b, p, d]
        else:
            src = self.cache_dict.get("hook_embed", self.cache_dict.get(self._resid_name(0)))
            src = pos_slice.apply(src, dim=-2)
            stack = src.new_zeros((0, *src.shape))
        if incl_remainder:
            resid = pos_slice.apply(self.cache_dict[self._resid_name(layer)], dim=-2)
            dtype = torch.promote_types(stack.dtype, resid.dtype)
            stack = stack.to(dtype)
            stack = torch.cat([stack, (resid.to(dtype) - stack.sum(0))[None]], dim=0)
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _stack_channel_results(
        self, layer: int, pos_slice: Slice, projection: Optional[torch.Tensor], method: str
    ) -> Tuple[torch.Tensor, List[str]]:
        """Mamba-1, ``layer >= 1``: ``[layer * d_inner, b, p, d or k]``, channel ``c`` of layer ``l`` writing
        ``out_proj.weight[:, c] * hook_y_gated[..., c]`` (projected when ``projection [d, k]`` is given)."""
        e = self.model.cfg.d_inner
        first = pos_slice.apply(self.cache_dict["blocks.0.hook_y_gated"], dim=-2)  # [b, p', e]
        weight0 = self.model.blocks[0].mixer.out_proj.weight
        dtype = torch.promote_types(first.dtype, weight0.dtype)
        if projection is not None:
            dtype = torch.promote_types(dtype, projection.dtype)
        width = self.model.cfg.d_model if projection is None else projection.shape[-1]
        shape = (layer * e, *first.shape[:-1], width)
        self._check_stack_size(shape, dtype, method, "Use expand_neurons=False (one term per mixer), a pos_slice, "
                               "a smaller layer, or project_output_onto")
        with_grad = torch.is_grad_enabled() and (
            any(self.cache_dict[f"blocks.{l}.hook_y_gated"].requires_grad for l in range(layer))
            or (projection is not None and projection.requires_grad)
        )
        stack = None if with_grad else torch.empty(shape, dtype=dtype, device=first.device)
        pieces = []
        for l in range(layer):
            y = pos_slice.apply(self.cache_dict[f"blocks.{l}.hook_y_gated"], dim=-2)  # [b, p', e]
            w_t = self._out_proj_weight(l, y).to(dtype).T  # [e, d]
            if projection is not None:
                w_t = w_t @ projection.to(device=w_t.device, dtype=dtype)  # [e, k]
            y_first = y.to(dtype).movedim(-1, 0)[..., None]  # [e, b, p', 1]
            w_b = w_t.reshape(e, *([1] * (y.dim() - 1)), width)  # [e, 1, 1, k]
            if stack is None:  # keep the autograd graph
                pieces.append(y_first * w_b)
            else:  # written in place: no second copy of the stack
                torch.mul(y_first, w_b, out=stack[l * e:(l + 1) * e])
        if stack is None:
            stack = torch.cat(pieces, dim=0)
        labels = [f"L{l}C{c}" for l in range(layer) for c in range(e)]
        return stack, labels

    def get_full_resid_decomposition(
        self,
        layer: Optional[int] = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: Union[Slice, None] = None,
        return_labels: bool = False,
        project_output_onto: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, List[str]]]:
        """Split the residual stream input to ``layer`` into every component that wrote it.

        In order (labels in brackets):

        - Mamba-2: every head of the layers ``< layer`` (``"L{l}H{h}"``, as
          ``stack_head_results``); Mamba-1 with ``expand_neurons=True``: every
          ``d_inner`` channel, ``out_proj.weight[:, c] * hook_y_gated[..., c]``
          (``"L{l}C{c}"``, the analogue of TransformerLens' neurons); Mamba-1 with
          ``expand_neurons=False``: one term per mixer (``"{l}_mixer_out"``);
        - the embedding (``"embed"``);
        - the sum of the ``out_proj`` biases of those layers (``"bias"``; zeros when
          ``out_proj`` has none, or when the mixer terms already hold them).

        The components sum to the residual stream at ``layer``: ``resid_pre`` of
        ``layer``, or the final stream (``resid_post`` of the last block) for
        ``None`` / ``-1`` / ``n_layers``.

        Args:
            layer: the layer whose input is decomposed, in ``[0, n_layers]``.
            mlp_input: unsupported (Mamba blocks have no MLP); must be False.
            expand_neurons: Mamba-1: one term per channel (True) or per mixer
                (False). Mamba-2 ignores it (its heads are always expanded).
            apply_ln: divide by the cached RMSNorm scale of ``layer``.
            pos_slice: slice of the position axis.
            return_labels: also return the labels.
            project_output_onto: optional ``[d]`` or ``[d, k]``: project each
                component onto it (the last axis becomes ``k``, or goes for ``[d]``).
                Folded into ``out_proj`` for the Mamba-1 channels, so the
                ``[.., d]`` per-channel stack is never built.

        Returns:
            ``[components, b, p, d]`` (``[.., p, d]`` without a batch dimension;
            the position axis goes with an int ``pos_slice``), and the labels.

        Raises:
            ValueError: for ``mlp_input=True``.
            KeyError: when the hooks it needs are not cached.
            MemoryError: when the stack is over ``model.heavy_hook_memory_limit``
                (Mamba-1 channels: ``layer * d_inner * b * p * d`` elements).
        """
        method = "get_full_resid_decomposition"
        if mlp_input:
            raise ValueError("Mamba blocks have no MLP, so mlp_input=True has no meaning here")
        layer = self._layer_arg(layer, method)
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        family = self._family()
        projection, squeeze = None, False
        if project_output_onto is not None:
            projection = project_output_onto
            if projection.dim() == 1:
                projection, squeeze = projection[:, None], True
            if projection.dim() != 2 or projection.shape[0] != self.model.cfg.d_model:
                raise ValueError(
                    f"project_output_onto must be [d_model] or [d_model, k], got {tuple(project_output_onto.shape)}"
                )

        if family == "mamba2":
            per_layer = [] if all(self._valid_head_result(l) for l in range(layer)) else ["hook_y_normed"]
        else:
            per_layer = ["hook_y_gated"] if expand_neurons else ["hook_mixer_out"]
        self._require(["hook_embed"] + [f"blocks.{l}.{h}" for l in range(layer) for h in per_layer], method)

        def project(t: torch.Tensor) -> torch.Tensor:
            return t if projection is None else t @ projection.to(device=t.device, dtype=t.dtype)

        if family == "mamba2":
            mixers, labels = self.stack_head_results(layer, return_labels=True, pos_slice=pos_slice)
            mixers = project(mixers)
        elif expand_neurons and layer > 0:
            mixers, labels = self._stack_channel_results(layer, pos_slice, projection, method)
        elif layer > 0:
            mixers, labels = self.decompose_resid(layer, pos_slice=pos_slice, incl_embeds=False, return_labels=True)
            mixers = project(mixers)
        else:
            mixers, labels = None, []

        embed = pos_slice.apply(self.cache_dict["hook_embed"], dim=-2)[None]  # [1, b, p', d]
        bias = torch.zeros(self.model.cfg.d_model, dtype=embed.dtype, device=embed.device)
        if family == "mamba2" or expand_neurons:
            for l in range(layer):
                layer_bias = self.model.blocks[l].mixer.out_proj.bias
                if layer_bias is not None:
                    bias = bias.to(torch.promote_types(bias.dtype, layer_bias.dtype))
                    bias = bias + layer_bias.detach().to(device=bias.device, dtype=bias.dtype)
        bias = project(bias.expand(embed.shape))
        embed = project(embed)
        parts = ([mixers] if mixers is not None else []) + [embed, bias]
        dtype = parts[0].dtype
        for part in parts[1:]:
            dtype = torch.promote_types(dtype, part.dtype)
        stack = torch.cat([part.to(dtype) for part in parts], dim=0)
        labels = labels + ["embed", "bias"]
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack
