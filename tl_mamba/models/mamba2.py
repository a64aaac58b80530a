"""HookedMamba2: Mamba-2 with per-head hooks.

Heads are first-class, as attention heads are in TransformerLens: the SSM input,
output, gate and Δ carry a head axis, so zeroing one head of ``hook_y`` ablates
that head. Shapes: b batch, p position, d d_model, e d_inner = h·hd, h n_heads,
hd d_head, g n_groups, n d_state.

    resid_pre → mixer_in → ln1 → in_proj → z, xBC, dt
    z          [b,p,h,hd]   gate branch;  gate = SiLU(z)  [b,p,h,hd]
    conv_in    [b,p,e+2gn]  xBC before the conv;  conv [b,p,e+2gn] after it (before SiLU)
    x          [b,p,h,hd]   SiLU(conv) split per head;  B, C [b,p,g,n] per group
    delta_raw  [b,p,h]      dt slice of in_proj;  delta [b,p,h] = clamp(softplus(dt + dt_bias))
    h          [b,p,h,hd,n] states (heavy);  ssm_mask [b,h,p,p] (heavy)
    y          [b,p,h,hd]   h·C + D·x: the head's output
    y_gated    [b,p,e]      y ⊙ gate;  y_normed [b,p,e] = grouped RMSNorm(y_gated) · w
    mixer_out  [b,p,d]      out_proj(y_normed);  resid_post = resid_pre + mixer_out
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from tl_mamba.config import HookedMambaConfig
from tl_mamba.models.base import HookedSSM, hook_is_active, mixer_input, run_hook_on_slice
from tl_mamba.models.components import CheckedHookPoint
from tl_mamba.models.block import MixerBlock
from tl_mamba.knockout import run_hook_conv
from tl_mamba.models.heavy_hooks import scan_with_heavy_hooks
from tl_mamba.ops import causal_conv1d
from tl_mamba.ops.precision import upcast
from tl_mamba.ops.ssd import ssd_scan


class GatedNormParams(nn.Module):
    """The gated RMSNorm's weight, named ``mixer.norm.weight`` as in the checkpoints."""

    def __init__(self, e: int, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(e, dtype=dtype))


class Mamba2MixerParams(nn.Module):
    """The mixer's weights under the checkpoint names."""

    def __init__(self, cfg: HookedMambaConfig):
        super().__init__()
        d, e, n, h, g, k = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.n_heads, cfg.n_groups, cfg.d_conv
        conv_dim = e + 2 * g * n
        dtype = cfg.dtype
        self.in_proj = nn.Linear(d, 2 * e + 2 * g * n + h, bias=cfg.proj_bias, dtype=dtype)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, k, groups=conv_dim, bias=cfg.conv_bias, dtype=dtype)
        self.dt_bias = nn.Parameter(torch.empty(h, dtype=dtype))
        self.A_log = nn.Parameter(torch.empty(h, dtype=dtype))
        self.D = nn.Parameter(torch.empty(h, dtype=dtype))
        self.norm = GatedNormParams(e, dtype)
        self.out_proj = nn.Linear(e, d, bias=cfg.proj_bias, dtype=dtype)


class Mamba2Block(MixerBlock):
    """One residual block of Mamba-2 with every hook of the contract."""

    def __init__(self, cfg: HookedMambaConfig, layer: int):
        super().__init__(cfg, layer)
        self.mixer = Mamba2MixerParams(cfg)
        self.hook_z = CheckedHookPoint()  # [b, p, h, hd]
        self.hook_gate = CheckedHookPoint()  # [b, p, h, hd]
        self.hook_conv_in = CheckedHookPoint()  # [b, p, e+2gn]
        self.hook_conv = CheckedHookPoint()  # [b, p, e+2gn]
        self.hook_x = CheckedHookPoint()  # [b, p, h, hd]
        self.hook_B = CheckedHookPoint()  # [b, p, g, n]
        self.hook_C = CheckedHookPoint()  # [b, p, g, n]
        self.hook_delta_raw = CheckedHookPoint()  # [b, p, h]
        self.hook_delta = CheckedHookPoint()  # [b, p, h]
        self.hook_ssm_mask = CheckedHookPoint()  # [b, h, p, p] heavy
        self.hook_h = CheckedHookPoint(cast_to_given_dtype=False)  # [b, p, h, hd, n] heavy (heavy_hooks casts)
        self.hook_y = CheckedHookPoint()  # [b, p, h, hd]
        self.hook_y_gated = CheckedHookPoint()  # [b, p, e]
        self.hook_y_normed = CheckedHookPoint()  # [b, p, e]
        self.hook_mixer_out = CheckedHookPoint()  # [b, p, d]
        self.hook_resid_post = CheckedHookPoint()  # [b, p, d]

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """mamba_ssm's Mamba-2 initialisation: A ~ U[1, 16], D = 1, Δ bias from log-uniform [dt_min, dt_max]."""
        cfg, m = self.cfg, self.mixer
        m.dt_bias.copy_(self.init_common(generator, (m.in_proj, m.out_proj), cfg.n_heads))
        m.A_log.copy_(torch.log(torch.rand(cfg.n_heads, generator=generator) * 15 + 1))
        m.norm.weight.fill_(1.0)

    def forward(
        self,
        resid: Tensor,
        attention_mask: Optional[Tensor] = None,
        layer_state: Optional[Dict[str, Optional[Tensor]]] = None,
    ) -> Tensor:
        """``resid [b, p, d]`` → ``resid_post [b, p, d]`` (see the module docstring for the hooks)."""
        cfg, m = self.cfg, self.mixer
        e, n, h, hd, g = cfg.d_inner, cfg.d_state, cfg.n_heads, cfg.d_head, cfg.n_groups
        b, p, _ = resid.shape
        dtype = m.in_proj.weight.dtype
        keep = None if attention_mask is None else attention_mask[..., None].to(dtype)

        resid_pre = self.hook_resid_pre(resid)
        normed = self.ln1(self.hook_mixer_in(mixer_input(self.hook_mixer_in, resid_pre)).to(dtype))
        z, conv_in, dt = m.in_proj(normed).split([e, e + 2 * g * n, h], dim=-1)
        z = run_hook_on_slice(self.hook_z, z.reshape(b, p, h, hd))
        if keep is not None:  # before the hook: it holds what the conv reads (conv_attention, conv knockouts)
            conv_in = conv_in * keep
        conv_in = run_hook_on_slice(self.hook_conv_in, conv_in)
        if keep is not None and hook_is_active(self.hook_conv_in):  # what a hook writes at pads stays there
            conv_in = conv_in * keep
        dt = run_hook_on_slice(self.hook_delta_raw, dt)
        conv, conv_state = causal_conv1d(
            conv_in, m.conv1d.weight, m.conv1d.bias, None if layer_state is None else layer_state["conv"]
        )
        conv = run_hook_conv(self.hook_conv, conv, conv_in)  # conv knockouts read conv_in
        xBC = F.silu(conv)
        if keep is not None:
            xBC = xBC * keep
        x, B, C = xBC.split([e, g * n, g * n], dim=-1)
        x = run_hook_on_slice(self.hook_x, x.reshape(b, p, h, hd))
        if keep is not None and hook_is_active(self.hook_x):  # no state write from a pad (as Mamba-1)
            x = x * keep[..., None]
        B = run_hook_on_slice(self.hook_B, B.reshape(b, p, g, n))
        C = run_hook_on_slice(self.hook_C, C.reshape(b, p, g, n))
        lo, hi = cfg.dt_limit
        delta = self.hook_delta(torch.clamp(F.softplus(upcast(dt) + upcast(m.dt_bias)), min=lo, max=hi))
        A = -torch.exp(upcast(m.A_log))

        y, ssm_state = self._scan(x, delta, A, B, C, None if layer_state is None else layer_state["ssm"],
                                  attention_mask=attention_mask)
        y = run_hook_on_slice(self.hook_y, y)  # [b, p, h, hd]
        gate = run_hook_on_slice(self.hook_gate, F.silu(upcast(z)))
        y_gated = self.hook_y_gated((y * gate).reshape(b, p, e))
        y_normed = self.hook_y_normed(self._gated_norm(y_gated))
        mixer_out = self.hook_mixer_out(m.out_proj(y_normed.to(dtype)))
        if layer_state is not None:
            layer_state["conv"], layer_state["ssm"] = conv_state, ssm_state
        return self.hook_resid_post(resid_pre + mixer_out)

    def _gated_norm(self, y_gated: Tensor) -> Tensor:
        """RMSNorm over groups of ``e / n_groups`` channels, then the weight (norm_before_gate=False)."""
        cfg = self.cfg
        grouped = upcast(y_gated).unflatten(-1, (cfg.n_groups, cfg.d_inner // cfg.n_groups))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + cfg.eps)
        return self.mixer.norm.weight * grouped.flatten(-2).to(self.mixer.norm.weight.dtype)

    def _scan(self, x, delta, A, B, C, initial_state, attention_mask=None):
        """The SSM with its heavy hooks. Returns ``(y [b,p,h,hd], final state [b,h,hd,n])``."""
        D = self.mixer.D
        cfg = self.cfg
        heads_per_group = cfg.n_heads // cfg.n_groups

        def scan(**kwargs):
            return ssd_scan(x, delta, A, B, C, D, initial_state=initial_state, backend=self.backend,
                            chunk_size=cfg.chunk_size, **kwargs)

        def read_out_grad(grad_y):  # y_t = h_t · C_t: ∂L/∂h_t through y_t = ∂L/∂y_t ⊗ C_t, [b, p, h, hd, n]
            Ch = C.to(grad_y.dtype).repeat_interleave(heads_per_group, dim=2)  # [b, p, h, n]
            # contiguous factors, so the product is contiguous too (the adjoint then runs in it)
            return grad_y.contiguous()[..., None] * Ch.contiguous()[:, :, :, None, :]

        def decay():  # exp(Δ_t A_h): [b, p, h, 1, 1]
            return torch.exp(upcast(delta) * A)[..., None, None]

        b, p = x.shape[:2]
        return scan_with_heavy_hooks(self, scan, read_out_grad, decay, mask_shape=(b, cfg.n_heads, p, p),
                                     state_bytes=b * p * cfg.d_inner * cfg.d_state * upcast(delta).element_size(),
                                     attention_mask=attention_mask)


class HookedMamba2(HookedSSM):
    """Mamba-2 language model with per-head TransformerLens hooks.

    Covers Codestral-style configs with ``n_groups > 1``. ``cfg.n_heads`` and
    ``cfg.d_head`` are the SSM heads, so TransformerLens utilities that iterate
    over heads (``transformer_lens.patching`` by head) work on ``hook_y``.
    """

    family = "mamba2"
    block_cls = Mamba2Block
