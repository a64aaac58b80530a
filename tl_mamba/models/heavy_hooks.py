"""The two heavy hooks of every block, shared by both families.

- ``hook_ssm_mask`` (``[b, H, p, p]``, 1 = edge kept): materialised only when
  hooked. If a hook zeroes entries, the scan removes those hidden-attention edges.
- ``hook_h`` (the state after every step): materialised only when hooked. If a
  hook edits it, the scan is rerun with the edited entries fixed, so the
  recurrence continues from them and y is read from them.

Both are handled in the scan dispatchers (``tl_mamba.ops``), so every backend
honours them.
"""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor

from tl_mamba.models.base import hook_is_active
from tl_mamba.ops.state_override import StateOverride


def check_heavy_hook_memory(block, hook: str, nbytes: int) -> None:
    """Refuse to materialise a heavy hook over ``model.heavy_hook_memory_limit`` bytes."""
    limit = block.model_ref[0].heavy_hook_memory_limit
    if nbytes > limit:
        raise MemoryError(
            f"blocks.{block.layer}.{hook} would need {nbytes / 2**30:.2f} GiB for this input, over the model's "
            f"limit of {limit / 2**30:.2f} GiB (model.heavy_hook_memory_limit). Use a shorter sequence or a "
            "smaller batch, or raise the limit if you have the memory."
        )


def scan_with_heavy_hooks(
    block,
    scan: Callable[..., object],
    read_out: Callable[[Tensor], Tensor],
    *,
    mask_shape: Tuple[int, int, int, int],
    state_bytes: int,
) -> Tuple[Tensor, Tensor]:
    """Run a block's scan, honouring ``hook_ssm_mask`` and ``hook_h``.

    Args:
        block: the block (has ``hook_ssm_mask``, ``hook_h``, ``layer``, ``model_ref``).
        scan: ``scan(ssm_mask=..., state_override=..., return_states=...)`` → an
            output with ``y``, ``final_state`` and ``states``.
        read_out: ``read_out(states)`` → y computed from every state (incl. D skip).
        mask_shape: ``(b, H, p, p)`` of the mask to materialise.
        state_bytes: size of the materialised states, for the memory guard.

    Returns:
        ``(y, final_state)``.
    """
    ssm_mask = None
    if hook_is_active(block.hook_ssm_mask):
        b, H, p, _ = mask_shape
        check_heavy_hook_memory(block, "hook_ssm_mask", b * H * p * p * 4)
        ssm_mask = block.hook_ssm_mask(torch.ones(mask_shape, device=block.hook_device(), dtype=torch.float32))
        if tuple(ssm_mask.shape) != tuple(mask_shape):
            raise ValueError(
                f"a hook on {block.hook_ssm_mask.name} returned shape {tuple(ssm_mask.shape)}, expected {mask_shape}"
            )
        if bool((ssm_mask != 0).all()):
            ssm_mask = None

    if not hook_is_active(block.hook_h):
        out = scan(ssm_mask=ssm_mask)
        return out.y, out.final_state

    check_heavy_hook_memory(block, "hook_h", state_bytes)
    out = scan(ssm_mask=ssm_mask, return_states=True)
    states = out.states
    version = states._version
    seen = block.hook_h(states)
    if tuple(seen.shape) != tuple(states.shape):
        raise ValueError(f"a hook on {block.hook_h.name} returned shape {tuple(seen.shape)}, expected {tuple(states.shape)}")
    if seen is not states or states._version != version:
        # the hook edited the state: find the edited entries against a fresh scan, then
        # rerun with them fixed so the recurrence continues from the edited values
        original = scan(return_states=True).states
        edited = seen.detach() != original.detach()
        if bool(edited.any()):
            if ssm_mask is not None:
                raise NotImplementedError(
                    f"{block.hook_h.name} was edited while {block.hook_ssm_mask.name} knocks out edges in the same "
                    "layer; a knockout has no single state sequence to edit. Apply one at a time."
                )
            out = scan(state_override=StateOverride(values=seen, mask=edited), return_states=True)
            return out.y, out.final_state
    if ssm_mask is not None:
        return out.y, out.final_state
    # unedited: read y from the hooked states, so gradients reach hook_h (its direct effect on y_t)
    return read_out(seen), out.final_state
