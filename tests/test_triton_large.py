"""The Triton kernels on tensors of more than 2^31 entries: their offsets must not wrap.

Triton's program ids and integer arguments are int32, and an offset into a tensor
computed from them in int32 wraps past 2^31 entries: the kernel then reads and writes
outside its tensors (tl_mamba.ops.triton_scan, "Offsets"). Such tensors come at
ordinary sizes: ``hook_h`` of Mamba-2 130m at 3 × 4096 tokens, of Mamba-1 130m at
22 × 4096, a Mamba-2 ``[b, h, p, p]`` knockout mask at 6 × 24 heads × 4096².

Each test writes one such tensor and checks the entries past 2^31 (the last
sequence's) against an independent reference on that sequence alone: the sequential
scan, or the explicit hidden-attention matrix. They need 10-20 GB and, in Triton's
CPU interpreter, would interpret a million tile steps each, so they run on a GPU only
(``benchmarks/run_gpu_session.sh`` runs this file).
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("2^31-entry tensors: GPU only", allow_module_level=True)

from tl_mamba.ops.selective_scan import selective_scan  # noqa: E402
from tl_mamba.ops.ssd import ssd_scan  # noqa: E402

DEVICE = "cuda"
LIMIT = 2**31


def _prefix_states(scan, at, *inputs):
    """The reference's state after each position in ``at``: its final state over that prefix of the
    last sequence (the sequential scan, without keeping every state of a long sequence)."""
    x, delta, A, B, C, D = inputs
    return [scan(x[-1:, : t + 1], delta[-1:, : t + 1], A, B[-1:, : t + 1], C[-1:, : t + 1], D,
                 backend="reference").final_state[0] for t in at]


def _need_gib(gib: float) -> None:
    # skip, naming the shortfall, where the GPU cannot hold the test's tensors
    free = torch.cuda.mem_get_info()[0] / 2**30
    if free < gib:
        pytest.skip(f"needs ~{gib:.0f} GiB of GPU memory, {free:.0f} GiB free")


def _random(*shape, scale=1.0, low=0.0, seed=0):
    # made on the GPU: the host never holds the large tensors
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.rand(*shape, generator=g, device=DEVICE) * scale + low


def test_mamba1_states_past_2_31_entries():
    """hook_h of Mamba-1 at 130m widths (e·n = 24,576 entries a position), b·p past 87,381."""
    b, p, e, n = 22, 4096, 1536, 16
    assert b * p * e * n > LIMIT
    _need_gib(b * p * e * n * 4 / 2**30 + b * p * e * 4 * 4 / 2**30 + 2)
    x = _random(b, p, e, scale=2.0, low=-1.0, seed=1)
    delta = _random(b, p, e, scale=0.1, low=0.01, seed=2)
    A = -_random(e, n, scale=1.0, low=0.1, seed=3)
    B = _random(b, p, n, scale=2.0, low=-1.0, seed=4)
    C = _random(b, p, n, scale=2.0, low=-1.0, seed=5)
    out = selective_scan(x, delta, A, B, C, backend="triton", return_states=True)
    at = (0, p // 2, p - 1)  # the last sequence's states: offsets from (b-1)·p·e·n up, past 2^31 at the end
    for t, want in zip(at, _prefix_states(selective_scan, at, x, delta, A, B, C, None)):
        torch.testing.assert_close(out.states[-1, t], want, rtol=1e-4, atol=1e-4)
    ref = selective_scan(x[-1:], delta[-1:], A, B[-1:], C[-1:], backend="reference")
    torch.testing.assert_close(out.y[-1], ref.y[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.final_state[-1], ref.final_state[0], rtol=1e-4, atol=1e-4)


def test_mamba2_states_past_2_31_entries():
    """hook_h of Mamba-2 at 130m widths (h·hd·n = 196,608 entries a position), b·p past 10,922:
    the chunked kernels' per-chunk walk writes every state."""
    b, p, h, hd, g, n = 3, 4096, 24, 64, 1, 128
    assert b * p * h * hd * n > LIMIT
    _need_gib(b * p * h * hd * n * 4 / 2**30 + 4)
    x = _random(b, p, h, hd, scale=2.0, low=-1.0, seed=1)
    delta = _random(b, p, h, scale=0.1, low=0.01, seed=2)
    A = -_random(h, scale=1.0, low=0.1, seed=3)
    B = _random(b, p, g, n, scale=2.0, low=-1.0, seed=4)
    C = _random(b, p, g, n, scale=2.0, low=-1.0, seed=5)
    D = _random(h, seed=6)
    out = ssd_scan(x, delta, A, B, C, D, backend="triton", return_states=True)
    at = (0, p // 2, p - 1)
    for t, want in zip(at, _prefix_states(ssd_scan, at, x, delta, A, B, C, D)):
        torch.testing.assert_close(out.states[-1, t], want, rtol=1e-4, atol=1e-4)
    ref = ssd_scan(x[-1:], delta[-1:], A, B[-1:], C[-1:], D, backend="reference")
    torch.testing.assert_close(out.y[-1], ref.y[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.final_state[-1], ref.final_state[0], rtol=1e-4, atol=1e-4)


def test_mamba2_mask_past_2_31_entries():
    """A general [b, h, p, p] mask through the masked tiles (6 × 24 heads × 4096², 130m widths),
    against the explicit hidden-attention matrix of the last sequence's last targets."""
    from tl_mamba.ops.ssd.triton_masked import masked_removed_terms_triton

    b, p, h, hd, g, n = 6, 4096, 24, 64, 1, 128
    assert b * h * p * p > LIMIT
    _need_gib(b * h * p * p * 4 / 2**30 + 4)
    x = _random(b, p, h, hd, scale=2.0, low=-1.0, seed=1)
    delta = _random(b, p, h, scale=0.1, low=0.01, seed=2)
    A = -_random(h, scale=1.0, low=0.1, seed=3)
    B = _random(b, p, g, n, scale=0.2, low=-0.1, seed=4)
    C = _random(b, p, g, n, scale=0.2, low=-0.1, seed=5)
    removed = torch.empty(b, h, p, p, device=DEVICE)
    for row in range(b):  # a different random mask per sequence, lower-triangular (edges j ≤ i)
        removed[row] = (_random(h, p, p, seed=10 + row) < 0.5).float().tril_()
    out = masked_removed_terms_triton(removed, x, delta, A, B, C)  # [b, p, h, hd]

    targets = torch.arange(p - 64, p, device=DEVICE)  # the last sequence's last 64 targets
    cs = torch.cumsum(delta[-1].double(), dim=0)  # [p, h]
    span = cs[targets][:, None, :] - cs[None, :, :]  # [I, p, h]: Σ_{k=j+1..i} Δ_k
    causal = (torch.arange(p, device=DEVICE)[None, :] <= targets[:, None])[..., None]
    decay = torch.exp(torch.where(causal, span * A.double(), float("-inf")))
    cb = (C[-1, targets, 0].double() @ B[-1, :, 0].double().T)[..., None]  # [I, p, 1]
    alpha = cb * decay * delta[-1].double()[None]  # α[i, j, h]
    weight = alpha * removed[-1, :, targets].permute(1, 2, 0).double()  # [I, p, h]
    want = torch.einsum("ijh,jhd->ihd", weight, x[-1].double())
    torch.testing.assert_close(out[-1, targets].double(), want, rtol=1e-4, atol=1e-4)
