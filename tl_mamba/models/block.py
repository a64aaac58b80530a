"""What the blocks of both families share: the residual wiring hooks, the link
to the root model (for the backend and the heavy-hook memory limit), and the
mamba_ssm-style initialisation of the weights every mixer has."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from tl_mamba.config import HookedMambaConfig
from tl_mamba.models.components import CheckedHookPoint, RMSNorm


def uniform_(param: Tensor, bound: float, generator: Optional[torch.Generator]) -> None:
    """Fill ``param`` from U(-bound, bound)."""
    param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)


class MixerBlock(nn.Module):
    """Base of ``MambaBlock`` and ``Mamba2Block``: ``resid + mixer(ln1(resid))``.

    Subclasses create ``self.mixer`` (the weights, under checkpoint names) and the
    family's own hooks, and implement ``forward``.
    """

    #: the block outputs one [b, p, d] residual stream, which the model unembeds after the last block
    #: (TransformerLens 4.x's logit-lens tools check this before reading hook_resid_post)
    hook_out_is_single_residual_stream = True

    def __init__(self, cfg: HookedMambaConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.ln1 = RMSNorm(cfg.d_model, cfg.eps, cfg.dtype)
        self.hook_resid_pre = CheckedHookPoint()  # [b, p, d]
        self.hook_mixer_in = CheckedHookPoint()  # [b, p, d]

    @property
    def backend(self) -> str:
        """The root model's backend name (``"auto"`` for a block on its own)."""
        return self.model_ref[0].backend if hasattr(self, "model_ref") else "auto"

    def hook_device(self) -> torch.device:
        return self.mixer.A_log.device

    @torch.no_grad()
    def init_common(self, generator: Optional[torch.Generator], linears, n_dt: int) -> Tensor:
        """Initialise what every mixer has; returns the Δ bias for ``n_dt`` channels or heads.

        Linear weights ~ U(±1/sqrt(fan_in)) with zero biases, conv ~ U(±1/sqrt(k)), D = 1,
        ln1 = 1; the Δ bias is the inverse softplus of Δ drawn log-uniformly from
        [dt_min, dt_max] (floored at dt_init_floor), as mamba_ssm does.
        """
        cfg, m = self.cfg, self.mixer
        for linear in linears:
            uniform_(linear.weight, 1 / math.sqrt(linear.in_features), generator)
            if linear.bias is not None:
                linear.bias.zero_()
        uniform_(m.conv1d.weight, 1 / math.sqrt(cfg.d_conv), generator)
        if m.conv1d.bias is not None:
            uniform_(m.conv1d.bias, 1 / math.sqrt(cfg.d_conv), generator)
        m.D.fill_(1.0)
        self.ln1.w.fill_(1.0)
        dt = torch.exp(
            torch.rand(n_dt, generator=generator) * (math.log(cfg.dt_max) - math.log(cfg.dt_min))
            + math.log(cfg.dt_min)
        ).clamp(min=cfg.dt_init_floor)
        return dt + torch.log(-torch.expm1(-dt))
