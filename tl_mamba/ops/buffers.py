"""The buffer that every position's state (``hook_h``) is written into.

The states are the largest tensors a forward makes: ``[b, p, e, n]`` for Mamba-1
(100 MB per layer at 130m widths, p = 1024) and ``[b, p, h, hd, n]`` for Mamba-2
(805 MB per layer). On a CPU, a freshly allocated buffer that large is new memory
from the kernel, which faults in 4 kB page by page on its first write, and on the
2-core hosts that costs more than the writing itself: filling 100 MB took 29.6 ms
in a fresh buffer, 12.5 ms in one advised to use transparent huge pages, and 8.3
ms in one already touched (2026-12-05, Intel Xeon, 1 thread). So on Linux the
buffer is advised (``madvise(MADV_HUGEPAGE)``) before the scan writes it. PyTorch
does the same for every allocation of 2 MB or more when ``THP_MEM_ALLOC_ENABLE=1``
is set before it starts; this asks for it only where it pays.

The advice is a hint: where the kernel has transparent huge pages off, or the call
is unavailable, the buffer is an ordinary ``torch.empty`` and nothing else changes.
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

HUGE_PAGE_BYTES = 2 << 20
# Below this a buffer gains too little from huge pages to be worth the call.
ADVISE_MIN_BYTES = 4 * HUGE_PAGE_BYTES

_madvise = None  # the libc function, once looked up; False when unavailable


def _libc_madvise():
    global _madvise
    if _madvise is None:
        _madvise = False
        if sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                fn = ctypes.CDLL(None, use_errno=True).madvise
                fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                fn.restype = ctypes.c_int
                _madvise = fn
            except (OSError, AttributeError):
                pass
    return _madvise


def huge_page_span(address: int, nbytes: int) -> Optional[Tuple[int, int]]:
    """The whole huge pages inside ``[address, address + nbytes)``: ``(start, length)``, or None.

    madvise needs a page-aligned start; advising only whole 2 MB pages inside the
    buffer never touches memory the buffer does not own.
    """
    start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (address + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return (start, end - start) if end > start else None


def advise_huge_pages(buffer: Tensor) -> bool:
    """Ask the kernel to back a large CPU tensor with huge pages. True if advised."""
    nbytes = buffer.numel() * buffer.element_size()
    if buffer.device.type != "cpu" or nbytes < ADVISE_MIN_BYTES:
        return False
    madvise = _libc_madvise()
    span = huge_page_span(buffer.data_ptr(), nbytes)
    if not madvise or span is None:
        return False
    return madvise(span[0], span[1], mmap.MADV_HUGEPAGE) == 0


def states_buffer(shape: Sequence[int], like: Tensor, dtype: torch.dtype) -> Tensor:
    """An uninitialised buffer for every position's state, on ``like``'s device.

    It is a normal tensor even under ``torch.inference_mode()``, so that ``hook_h``
    can track in-place edits of it without a copy; on a CPU it is advised to use
    huge pages (module docstring).
    """
    with torch.inference_mode(False):
        buffer = like.new_empty(tuple(shape), dtype=dtype)
    advise_huge_pages(buffer)
    return buffer


def format_bytes(nbytes: float) -> str:
    """``nbytes`` for a message, in the largest unit that keeps it >= 1 (``"3.20 GiB"``,
    ``"512.00 KiB"``): a memory guard set to a few MiB would otherwise report "0.00 GiB"."""
    if nbytes == float("inf"):
        return "no limit"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{int(nbytes)} bytes"
