"""Generate ``docs/hooks.md`` from a live model, so the table cannot drift.

    python -m tl_mamba.hooks_doc > docs/hooks.md

``tests/test_hooks_doc.py`` regenerates it and compares with the committed file.
"""

from __future__ import annotations

import re
import sys
from typing import Dict, List, Tuple

import torch

from tl_mamba.config import HookedMambaConfig
from tl_mamba.models.base import is_heavy_hook

#: What each hook holds, by its name within a block / the model.
DESCRIPTIONS = {
    "hook_embed": "token embedding",
    "hook_resid_pre": "residual stream into the block",
    "hook_mixer_in": "copy of resid_pre that feeds only this block (edge patching)",
    "ln1.hook_scale": "RMSNorm divisor sqrt(mean(x²) + eps)",
    "ln1.hook_normalized": "x / scale, before the norm weight",
    "hook_conv_in": "x branch of in_proj (conv input)",
    "hook_conv": "depthwise causal conv output, before SiLU",
    "hook_x": "SiLU(conv): the SSM input u",
    "hook_z": "gate branch of in_proj, before SiLU",
    "hook_gate": "SiLU(z)",
    "hook_dt_low": "low-rank dt from x_proj (after Falcon-Mamba's norm)",
    "hook_delta_raw": "dt slice of in_proj (no bias)",
    "hook_delta": "Δ = softplus(dt_proj(dt_low) + bias)",
    "hook_B": "input-dependent B (after Falcon-Mamba's norm)",
    "hook_C": "input-dependent C (after Falcon-Mamba's norm)",
    "hook_ssm_mask": "knockout mask, 1 = edge kept (heavy)",
    "hook_h": "state after each step; edits override the state (heavy)",
    "hook_y": "SSM output, including the D·x skip",
    "hook_y_gated": "y ⊙ gate (input to out_proj)",
    "hook_y_normed": "gated RMSNorm output (input to out_proj)",
    "hook_mixer_out": "out_proj output: the block's write to the residual",
    "hook_resid_post": "residual stream after the block",
    "ln_final.hook_scale": "final RMSNorm divisor",
    "ln_final.hook_normalized": "x / scale (the norm weight is folded into W_U)",
}

#: Mamba-2 descriptions where they differ from Mamba-1's.
DESCRIPTIONS_MAMBA2 = {
    "hook_conv_in": "xBC slice of in_proj, before the conv",
    "hook_conv": "xBC after the depthwise causal conv, before SiLU",
    "hook_x": "SSM input per head (SiLU(conv) split)",
    "hook_B": "input-dependent B per group",
    "hook_C": "input-dependent C per group",
    "hook_delta": "Δ = clamp(softplus(dt + dt_bias), dt_limit) per head",
    "hook_ssm_mask": "knockout mask per head, 1 = edge kept (heavy)",
    "hook_y": "SSM output per head, including D·x: the head's output",
    "hook_y_gated": "y ⊙ gate, before the gated RMSNorm",
}


def _symbolic_shape(shape: Tuple[int, ...], sizes: Dict[int, str]) -> str:
    return "[" + ", ".join(sizes.get(s, str(s)) for s in shape) + "]"


def size_symbols(model, batch: int = 3, pos: int = 7) -> List[Tuple[int, str]]:
    """``(size, symbol)`` pairs of a model's dimensions (b, p, d, e, n, ...)."""
    cfg = model.cfg
    pairs = [(batch, "b"), (pos, "p"), (cfg.d_model, "d"), (cfg.d_inner, "e"), (cfg.d_state, "n"), (1, "1")]
    if cfg.family == "mamba1":
        pairs.append((cfg.dt_rank, "r"))
    else:
        pairs += [(cfg.n_heads, "h"), (cfg.d_head, "hd"), (cfg.n_groups, "g"),
                  (cfg.d_inner + 2 * cfg.n_groups * cfg.d_state, "e+2gn")]
    return pairs


def half_precision_dtypes(model) -> Dict[str, str]:
    """``{hook name with blocks.{l}: "bf16" | "fp32"}``: the dtype each hook holds when ``model``'s
    weights are bf16 (measured on a live forward of a bf16 copy)."""
    import copy

    half = copy.deepcopy(model).to(torch.bfloat16)
    found: Dict[str, str] = {}

    def record(tensor, hook):
        found[re.sub(r"^blocks\.\d+\.", "blocks.{l}.", hook.name)] = {
            torch.bfloat16: "bf16", torch.float32: "fp32"}.get(tensor.dtype, str(tensor.dtype))

    with torch.no_grad():
        half.run_with_hooks(torch.zeros(1, 4, dtype=torch.long), fwd_hooks=[(lambda name: True, record)],
                            return_type=None)
    return found


def hook_table(model, batch: int = 3, pos: int = 7, strict: bool = True) -> List[Tuple[str, str, str]]:
    """Rows ``(hook name with blocks.{l}, symbolic shape, description)`` measured on a live forward.

    A size shared by two dimensions (``d_state == d_head``, say) cannot be mapped back to one
    symbol: ``strict`` raises (the documentation model keeps them distinct), otherwise such
    sizes are printed as numbers.
    """
    cfg = model.cfg
    tokens = torch.zeros(batch, pos, dtype=torch.long, device=model.W_E.device)
    shapes = model.hook_shapes(tokens)
    pairs = size_symbols(model, batch, pos)
    counts: Dict[int, int] = {}
    for size, _ in pairs:
        counts[size] = counts.get(size, 0) + 1
    if strict and max(counts.values()) > 1:
        raise ValueError(f"hook_table needs a model whose sizes are all distinct, got {pairs}")
    sizes = {size: symbol for size, symbol in pairs if counts[size] == 1}
    rows, seen = [], set()
    for name, shape in shapes.items():
        generic = re.sub(r"^blocks\.\d+\.", "blocks.{l}.", name)
        if generic in seen:
            continue
        seen.add(generic)
        short = generic.replace("blocks.{l}.", "")
        what = (DESCRIPTIONS_MAMBA2.get(short) if cfg.family == "mamba2" else None) or DESCRIPTIONS.get(short, "")
        rows.append((generic, _symbolic_shape(shape, sizes), what +
                     (" — cached only when named" if is_heavy_hook(name) else "")))
    return rows


def _table_lines(model) -> List[str]:
    """The markdown table of ``model``'s hooks: name, shape, dtype in a bf16 model, what it holds."""
    dtypes = half_precision_dtypes(model)
    return ["| hook | shape | dtype | what |", "|---|---|---|---|"] + [
        f"| `{name}` | {shape} | {dtypes[name]} | {what} |" for name, shape, what in hook_table(model)]


def render_markdown() -> str:
    """The full ``docs/hooks.md`` text."""
    from tl_mamba.models.mamba import HookedMamba
    from tl_mamba.models.mamba2 import HookedMamba2

    cfg = HookedMambaConfig(n_layers=2, d_model=12, d_vocab=40, d_state=5, d_conv=4, dt_rank=2, expand=3, seed=0)
    cfg2 = HookedMambaConfig(family="mamba2", n_layers=2, d_model=12, d_vocab=40, d_state=5, expand=3,
                             n_heads=4, n_groups=2, seed=0)
    lines = [
        "# Hooks",
        "",
        "Generated from a live model by `python -m tl_mamba.hooks_doc > docs/hooks.md`;",
        "`tests/test_hooks_doc.py` fails if this file drifts from the code.",
        "",
        "Shapes: b batch, p position, d d_model, e d_inner, n d_state, r dt_rank.",
        "Heavy hooks are computed only when a hook is attached or a cache names them;",
        "`run_with_cache()` without `names_filter` leaves them out.",
        "",
        "dtype: what each hook holds in a bf16 (or fp16) model. As mamba_ssm does, the",
        "residual stream, the norms, Δ, the scan's output and its states are kept in fp32;",
        "an fp32 or float64 model holds its own dtype at every hook (`hook_ssm_mask` too).",
        "A hook may return another dtype (a patch from an fp32 run into a bf16 model): it is",
        "read in the dtype of the activation it replaces, as if the hook had cast it.",
        "",
        "## HookedMamba (Mamba-1, Falcon-Mamba)",
        "",
        *_table_lines(HookedMamba(cfg)),
        "",
        "## HookedMamba2 (Mamba-2)",
        "",
        "Shapes: h n_heads, hd d_head, g n_groups. Per-head hooks carry a head axis, so",
        "zeroing `hook_y[:, :, head]` ablates a head.",
        "",
        *_table_lines(HookedMamba2(cfg2)),
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_markdown())
