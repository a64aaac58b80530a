"""HookedMamba: Mamba-1 and Falcon-Mamba with a HookPoint on every intermediate.

The block, with the hook that holds each value (shapes: b batch, p position,
d d_model, e d_inner, n d_state, r dt_rank):

    resid_pre  [b,p,d]  ──────────────────────────────────────────────┐
    mixer_in   [b,p,d]  → ln1 → in_proj → conv_in [b,p,e], z [b,p,e]  │
    conv       [b,p,e]  = causal depthwise conv(conv_in)              │
    x          [b,p,e]  = SiLU(conv)                                  │
    dt_low [b,p,r], B [b,p,n], C [b,p,n] = x_proj(x)  (Falcon: RMS'd) │
    delta      [b,p,e]  = softplus(dt_proj(dt_low))                   │
    h          [b,p,e,n] states of the scan (heavy)                   │
    y          [b,p,e]  = h·C + D⊙x                                   │
    gate       [b,p,e]  = SiLU(z);   y_gated = y ⊙ gate               │
    mixer_out  [b,p,d]  = out_proj(y_gated)                           │
    resid_post [b,p,d]  = resid_pre + mixer_out  ←────────────────────┘

Every value is computed from the hooked value before it, so an edit anywhere
flows downstream. ``hook_h`` overrides the state: the recurrence continues from
edited entries. ``hook_ssm_mask`` ``[b,1,p,p]`` (1 = kept) removes
hidden-attention edges α[i,j]·x_j. Both are computed only when hooked.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tl_mamba.config import HookedMambaConfig
from tl_mamba.models.base import HookedSSM, hook_is_active, mixer_input, run_hook_on_slice
from tl_mamba.models.block import MixerBlock, uniform_
from tl_mamba.knockout import run_hook_conv
from tl_mamba.models.heavy_hooks import scan_with_heavy_hooks
from tl_mamba.models.components import CheckedHookPoint, weightless_rms
from tl_mamba.ops import causal_conv1d, selective_scan
from tl_mamba.ops.precision import upcast


class MambaMixerParams(nn.Module):
    """The mixer's weights, named as in the checkpoints (``mixer.in_proj.weight`` ...)."""

    def __init__(self, cfg: HookedMambaConfig):
        super().__init__()
        d, e, n, r, k = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
        dtype = cfg.dtype
        self.in_proj = nn.Linear(d, 2 * e, bias=cfg.proj_bias, dtype=dtype)
        self.conv1d = nn.Conv1d(e, e, k, groups=e, bias=cfg.conv_bias, dtype=dtype)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False, dtype=dtype)
        self.dt_proj = nn.Linear(r, e, bias=True, dtype=dtype)
        self.A_log = nn.Parameter(torch.empty(e, n, dtype=dtype))
        self.D = nn.Parameter(torch.empty(e, dtype=dtype))
        self.out_proj = nn.Linear(e, d, bias=cfg.proj_bias, dtype=dtype)


class MambaBlock(MixerBlock):
    """One residual block: ``resid + mixer(ln1(resid))`` with every hook of the contract."""

    def __init__(self, cfg: HookedMambaConfig, layer: int):
        super().__init__(cfg, layer)
        self.mixer = MambaMixerParams(cfg)
        self.hook_conv_in = CheckedHookPoint()  # [b, p, e]
        self.hook_conv = CheckedHookPoint()  # [b, p, e]
        self.hook_x = CheckedHookPoint()  # [b, p, e]
        self.hook_z = CheckedHookPoint()  # [b, p, e]
        self.hook_gate = CheckedHookPoint()  # [b, p, e]
        self.hook_dt_low = CheckedHookPoint()  # [b, p, r]
        self.hook_delta = CheckedHookPoint()  # [b, p, e]
        self.hook_B = CheckedHookPoint()  # [b, p, n]
        self.hook_C = CheckedHookPoint()  # [b, p, n]
        self.hook_ssm_mask = CheckedHookPoint()  # [b, 1, p, p] heavy
        self.hook_h = CheckedHookPoint(cast_to_given_dtype=False)  # [b, p, e, n] heavy (heavy_hooks casts)
        self.hook_y = CheckedHookPoint()  # [b, p, e]
        self.hook_y_gated = CheckedHookPoint()  # [b, p, e]
        self.hook_mixer_out = CheckedHookPoint()  # [b, p, d]
        self.hook_resid_post = CheckedHookPoint()  # [b, p, d]

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """mamba_ssm's initialisation: S4D-real A, D = 1, Δ bias from a log-uniform [dt_min, dt_max]."""
        cfg, m = self.cfg, self.mixer
        m.dt_proj.bias.copy_(self.init_common(generator, (m.in_proj, m.x_proj, m.out_proj), cfg.d_inner))
        uniform_(m.dt_proj.weight, cfg.dt_rank**-0.5, generator)
        m.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).expand(cfg.d_inner, -1))

    def forward(
        self,
        resid: Tensor,
        attention_mask: Optional[Tensor] = None,
        layer_state: Optional[Dict[str, Optional[Tensor]]] = None,
    ) -> Tensor:
        """``resid [b, p, d]`` → ``resid_post [b, p, d]``.

        ``attention_mask [b, p]`` (1 = real): padded positions feed zeros into the
        conv and the SSM, so they never reach real tokens. ``layer_state`` (a dict
        with ``"conv"`` and ``"ssm"``) is continued from and updated in place.
        """
        cfg, m = self.cfg, self.mixer
        e, n, r = cfg.d_inner, cfg.d_state, cfg.dt_rank
        dtype = m.in_proj.weight.dtype
        keep = None if attention_mask is None else attention_mask[..., None].to(dtype)

        resid_pre = self.hook_resid_pre(resid)
        normed = self.ln1(self.hook_mixer_in(mixer_input(self.hook_mixer_in, resid_pre)).to(dtype))
        conv_in, z = m.in_proj(normed).split([e, e], dim=-1)
        if keep is not None:  # before the hook: it holds what the conv reads (conv_attention, conv knockouts)
            conv_in = conv_in * keep
        conv_in = run_hook_on_slice(self.hook_conv_in, conv_in)
        if keep is not None and hook_is_active(self.hook_conv_in):  # what a hook writes at pads stays there
            conv_in = conv_in * keep
        z = run_hook_on_slice(self.hook_z, z)
        conv, conv_state = causal_conv1d(
            conv_in, m.conv1d.weight, m.conv1d.bias, None if layer_state is None else layer_state["conv"]
        )
        conv = run_hook_conv(self.hook_conv, conv, conv_in)  # conv knockouts read conv_in
        x = self.hook_x(F.silu(conv))
        if keep is not None:
            x = x * keep
        dt_low, B, C = m.x_proj(x).split([r, n, n], dim=-1)
        if cfg.bcdt_rms_eps is not None:
            dt_low, B, C = (weightless_rms(t, cfg.bcdt_rms_eps) for t in (dt_low, B, C))
        dt_low = run_hook_on_slice(self.hook_dt_low, dt_low)
        B = run_hook_on_slice(self.hook_B, B)
        C = run_hook_on_slice(self.hook_C, C)
        delta = self.hook_delta(F.softplus(upcast(F.linear(dt_low, m.dt_proj.weight)) + upcast(m.dt_proj.bias)))
        A = -torch.exp(upcast(m.A_log))

        initial_state = None if layer_state is None else layer_state["ssm"]
        # When nothing reads y, the gate or the states on their own, the scan applies the gate
        # (the Triton kernel fuses it, knockouts included, so the ungated y is never written).
        fuse_gate = not any(hook_is_active(h) for h in (self.hook_y, self.hook_gate, self.hook_h))
        y, ssm_state = self._scan(x, delta, A, B, C, initial_state, z=z if fuse_gate else None,
                                  attention_mask=attention_mask)
        if fuse_gate:
            y_gated = y
        else:
            y = self.hook_y(y)
            gate = self.hook_gate(F.silu(upcast(z)))  # in y's precision, as the fused gate (silu_gate)
            y_gated = y * gate
        y_gated = self.hook_y_gated(y_gated)
        mixer_out = self.hook_mixer_out(m.out_proj(y_gated.to(dtype)))
        if layer_state is not None:
            layer_state["conv"], layer_state["ssm"] = conv_state, ssm_state
        return self.hook_resid_post(resid_pre + mixer_out)

    def _scan(self, x, delta, A, B, C, initial_state, z=None, attention_mask=None):
        """The SSM with its heavy hooks. Returns ``(y [b,p,e], final state [b,e,n])``; y gated
        by ``silu(z)`` when z is given (only when hook_h is not hooked: its gradient path adds
        to the ungated y)."""
        D = self.mixer.D

        def scan(**kwargs):
            return selective_scan(x, delta, A, B, C, D, initial_state=initial_state, z=z, backend=self.backend,
                                  **kwargs)

        def read_out_grad(grad_y):  # y_t = h_t · C_t, so ∂L/∂h_t through y_t = ∂L/∂y_t ⊗ C_t: [b, p, e, n]
            # contiguous factors, so the product is contiguous too (the adjoint then runs in it)
            return grad_y.contiguous()[..., None] * C.to(grad_y.dtype).contiguous()[:, :, None, :]

        def decay():  # exp(Δ_t A): [b, p, e, n]
            return torch.exp(upcast(delta)[..., None] * A)

        b, p, e = x.shape
        return scan_with_heavy_hooks(self, scan, read_out_grad, decay, mask_shape=(b, 1, p, p),
                                     state_bytes=b * p * e * self.cfg.d_state * upcast(delta).element_size(),
                                     attention_mask=attention_mask)


class HookedMamba(HookedSSM):
    """Mamba-1 (and Falcon-Mamba) language model with TransformerLens hooks.

    ``HookedMamba(cfg)`` builds a randomly initialised model; ``from_pretrained``
    loads mamba_ssm or transformers checkpoints; ``from_hf`` converts an in-memory
    transformers model. See ``docs/hooks.md`` for every hook and its shape.
    """

    family = "mamba1"
    block_cls = MambaBlock
