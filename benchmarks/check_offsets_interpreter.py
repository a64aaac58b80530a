"""Mamba-1's sequential kernel writing more than 2^31 state entries, in Triton's CPU interpreter.

    TRITON_INTERPRET=1 PYTHONPATH=. python benchmarks/check_offsets_interpreter.py   # ~2 min, ~11 GB

The interpreter computes int32 offsets as the GPU does, wrapping past 2^31, so this shows
on a CPU what ``tests/test_triton_large.py`` checks on a GPU (tl_mamba/ops/triton_scan.py,
"Offsets"): ``states [2, 1025, 65536, 16]`` (2.15e9 entries), one channel block as wide as
e so the interpreter takes 2,050 steps. The last sequence's states, whose offsets reach
2.149e9, are compared with the torch backend run on that sequence alone. With int32
offsets (before 2026-12-07) the process died in the kernel with a segmentation fault.
"""

import os
import time

if os.environ.get("TRITON_INTERPRET") != "1":
    raise SystemExit("run with TRITON_INTERPRET=1 (this checks the kernel in Triton's CPU interpreter)")

import torch  # noqa: E402

from tl_mamba.ops.selective_scan.chunked import selective_scan_chunked  # noqa: E402
from tl_mamba.ops.selective_scan.triton_kernel import _forward  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    b, e, n = 2, 2**16, 16
    p = 2**31 // (b * e * n) + 1  # b·p·e·n just past 2^31
    print(f"states [{b}, {p}, {e}, {n}]: {b * p * e * n:,} entries (2^31 = {2**31:,})", flush=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, p, e, generator=g) * 0.5
    delta = torch.rand(b, p, e, generator=g) * 0.1
    A = -torch.rand(e, n, generator=g)
    B, C = torch.randn(b, p, n, generator=g), torch.randn(b, p, n, generator=g)
    start = time.time()
    _, _, states = _forward(x, delta, A, B, C, None, None, True, block_e=e, kernel="sequential")
    print(f"kernel: {time.time() - start:.0f} s", flush=True)
    worst = 0.0
    for t in (0, p // 2, p - 1):
        want = selective_scan_chunked(x[-1:, : t + 1], delta[-1:, : t + 1], A, B[-1:, : t + 1],
                                      C[-1:, : t + 1]).final_state[0]
        err = (states[-1, t] - want).abs().max().item()
        worst = max(worst, err)
        print(f"sequence {b - 1}, position {t}: offset {((b - 1) * p + t) * e * n:,}, max |error| {err:.2e}")
    if worst > 1e-4:
        raise SystemExit(f"FAILED: max |error| {worst:.2e}")
    print("ok")


if __name__ == "__main__":
    main()
