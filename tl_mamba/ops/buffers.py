"""The buffer that every position's state (``hook_h``) is written into.

The states are the largest tensors a forward makes: ``[b, p, e, n]`` for Mamba-1
(100 MB per layer at 130m widths, p = 1024) and ``[b, p, h, hd, n]`` for Mamba-2
(805 MB per layer). On a CPU such a buffer is fresh memory from the kernel, faulted
in on its first write, and on the 2-core hosts that costs more than the writing.

It is a plain allocation, as every other contender's. From 2026-12-05 to 12-07 it was
advised to use transparent huge pages (``madvise(MADV_HUGEPAGE)``), which halved a
100 MB fill timed back to back on that day's host. On 2026-12-07's 2-vCPU Intel Xeon
VM, whose balloon device reports free 2 MB blocks to the host (``page_reporting_order``
9), the advice tripled the cost instead: a huge page handed out after its block was
reported is faulted in again by the host, and the kernel's time grew from ~0.2 to ~1.1 s
per Mamba-1 ``hook_h`` cache (4 layers, 130m widths, p = 1024; Mamba-2: 3.7 against
8.7 s). Faulting the advised pages in before the scan, rather than inside its loop,
recovered only part of that. Measured in docs/performance.md, "CPU: the states buffer
without huge pages".
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def states_buffer(shape: Sequence[int], like: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised buffer for every position's state, on ``like``'s device.

    It is a normal tensor even under ``torch.inference_mode()``, so that ``hook_h``
    can track in-place edits of it without a copy.
    """
    with torch.inference_mode(False):
        return like.new_empty(tuple(shape), dtype=dtype)


def format_bytes(nbytes: float) -> str:
    """``nbytes`` for a message, in the largest unit that keeps it >= 1 (``"3.20 GiB"``,
    ``"512.00 KiB"``): a memory guard set to a few MiB would otherwise report "0.00 GiB"."""
    if nbytes == float("inf"):
        return "no limit"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} bytes"
