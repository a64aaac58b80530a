"""``ActivationCache`` for Mamba models.

A subclass of ``transformer_lens.ActivationCache`` so that every TransformerLens
utility accepts it. Two things differ from a transformer:

- shorthand keys: TransformerLens maps ``("z", 3)`` to ``blocks.3.attn.hook_z``;
  Mamba hooks sit directly on the block, so a shorthand that does not exist as
  TransformerLens spells it falls back to ``blocks.{l}.hook_{name}``;
- ``decompose_resid`` has one term per mixer (``{l}_mixer_out``) after the embed,
  because a Mamba block writes to the residual stream once.
"""

from __future__ import annotations

import re
from typing import List, Optional, Tuple, Union

import torch
from transformer_lens import ActivationCache
from transformer_lens.utilities import Slice, get_act_name

_MIXER_SUBLAYER = re.compile(r"^blocks\.(\d+)\.(?:attn|mlp)\.(hook_\w+)$")


class MambaActivationCache(ActivationCache):
    """Activation cache of a ``HookedMamba`` / ``HookedMamba2`` run."""

    def _resolve(self, key) -> str:
        if isinstance(key, str):
            if key in self.cache_dict:
                return key
            name = get_act_name(key)
        else:
            key = tuple(key)
            if len(key) > 1 and key[1] is not None and key[1] < 0:
                key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
            name = get_act_name(*key)
        if name not in self.cache_dict:
            match = _MIXER_SUBLAYER.match(name)
            if match is not None:
                name = f"blocks.{match.group(1)}.{match.group(2)}"
        return name

    def __getitem__(self, key) -> torch.Tensor:
        """Look up a hook by full name or TransformerLens shorthand (``cache["conv", 3]``)."""
        name = self._resolve(key)
        if name not in self.cache_dict:
            raise KeyError(
                f"{key!r} (resolved to {name!r}) is not in this cache. Cached hooks include: "
                f"{', '.join(list(self.cache_dict)[:8])}{' ...' if len(self.cache_dict) > 8 else ''}. "
                "Heavy hooks (hook_h, hook_ssm_mask) are cached only when names_filter names them."
            )
        return self.cache_dict[name]

    def __contains__(self, key) -> bool:
        try:
            return self._resolve(key) in self.cache_dict
        except Exception:
            return False

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
        n_layers = self.model.cfg.n_layers
        if layer is None or layer == -1:
            layer = n_layers
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
        stack = torch.stack([pos_slice.apply(c, dim=pos_dim) for c in components], dim=0)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack
