"""The Mamba-2 scan op, ``tl_mamba.ops.ssd.ssd_scan``, on its "reference" and "torch" backends.

The oracles are written here and built differently from both backends:

- ``brute_force``: the scan unrolled into hidden attention, in float64. The log
  decay from source j to target i is summed term by term with an explicit
  indicator tensor, seg[i, j] = Σ_k [j < k ≤ i] Δ_k A (no cumulative sums), then
  α[i, j] = (C_i·B_j)·exp(seg[i, j])·Δ_j per head, with head i reading the B and C
  of group i // (h/g). y = α x + D x (+ the decayed initial state read out by C),
  and the states h_i = Σ_j exp(seg[i, j]) Δ_j x_j ⊗ B_j (+ exp(Σ_{k≤i} Δ_k A) h_0).
- ``scalar_loop``: the recurrence in Python floats, one (b, head, d, n) entry at a
  time, with optional state overrides.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tl_mamba.ops.ssd import StateOverride, ssd_scan

BACKENDS = ("reference", "torch")
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- oracles
def _heads_to_groups(h, g):
    return torch.tensor([i // (h // g) for i in range(h)])


def brute_force(x, delta, A, B, C, D=None, h0=None, mask=None):
    """Returns ``(y [b,p,h,hd], states [b,p,h,hd,n], alpha [b,h,p,p])`` in float64.

    ``mask [b,h,p,p]`` or ``[b,1,p,p]`` (1 = kept) multiplies α; the D skip is never masked.
    """
    x, delta, A, B, C = (t.double() for t in (x, delta, A, B, C))
    b, p, h, hd = x.shape
    g = B.shape[2]
    grp = _heads_to_groups(h, g)
    Bh, Ch = B[:, :, grp], C[:, :, grp]  # [b, p, h, n]
    idx = torch.arange(p)
    between = (idx[None, None, :] > idx[None, :, None]) & (idx[None, None, :] <= idx[:, None, None])  # [i, j, k]
    seg = torch.einsum("ijk,bkh->bhij", between.double(), delta * A)  # Σ_{k=j+1..i} Δ_k A
    causal = (idx[None, :] <= idx[:, None])  # [i, j]
    L = torch.where(causal, seg.exp(), torch.zeros((), dtype=torch.float64))  # [b, h, i, j]
    alpha = torch.einsum("bihn,bjhn->bhij", Ch, Bh) * L * delta.permute(0, 2, 1)[:, :, None, :]
    used = alpha if mask is None else alpha * mask.double()
    y = torch.einsum("bhij,bjhd->bihd", used, x)
    states = torch.einsum("bhij,bjh,bjhd,bjhn->bihdn", L, delta, x, Bh)
    if h0 is not None:
        upto = torch.einsum("ik,bkh->bih", causal.double(), delta * A)  # Σ_{k≤i} Δ_k A
        carried = upto.exp()[..., None, None] * h0.double()[:, None]  # [b, p, h, hd, n]
        states = states + carried
        y = y + torch.einsum("bihdn,bihn->bihd", carried, Ch)
    if D is not None:
        y = y + D.double()[:, None] * x
    return y, states, alpha


def scalar_loop(x, delta, A, B, C, D=None, h0=None, override=None):
    """Entry by entry in Python floats; ``override = (values, mask)`` sets h_t after step t."""
    b, p, h, hd = x.shape
    g, n = B.shape[2], B.shape[3]
    xs, ds, As, Bs, Cs = (t.double().tolist() for t in (x, delta, A, B, C))
    y = torch.zeros(b, p, h, hd, dtype=torch.float64)
    states = torch.zeros(b, p, h, hd, n, dtype=torch.float64)
    final = torch.zeros(b, h, hd, n, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            for di in range(hd):
                for ni in range(n):
                    s = 0.0 if h0 is None else float(h0[bi, hi, di, ni])
                    for t in range(p):
                        s = math.exp(ds[bi][t][hi] * As[hi]) * s + ds[bi][t][hi] * xs[bi][t][hi][di] * Bs[bi][t][gi][ni]
                        if override is not None and bool(override[1][bi, t, hi, di, ni]):
                            s = float(override[0][bi, t, hi, di, ni])
                        states[bi, t, hi, di, ni] = s
                        y[bi, t, hi, di] += s * Cs[bi][t][gi][ni]
                    final[bi, hi, di, ni] = s
    if D is not None:
        y = y + D.double()[:, None] * x.double()
    return y, states, final


def make_inputs(b, p, h, hd, g, n, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p, h, hd, generator=gen)
    delta = F.softplus(torch.randn(b, p, h, generator=gen) - 0.5)
    A = -torch.exp(0.5 * torch.randn(h, generator=gen))
    B = torch.randn(b, p, g, n, generator=gen)
    C = torch.randn(b, p, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    h0 = torch.randn(b, h, hd, n, generator=gen)
    return [t.to(dtype) for t in (x, delta, A, B, C, D, h0)]


NAMES = ("x", "delta", "A", "B", "C", "D", "initial_state")


# ----------------------------------------------------------------------------- values
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "b,p,h,hd,g,n,use_D,use_h0",
    [
        (2, 13, 4, 3, 2, 5, True, True),  # 2 heads per group
        (1, 37, 3, 2, 3, 4, False, False),  # one head per group
        (2, 1, 5, 2, 1, 3, True, True),  # p = 1, odd head count
        (1, 130, 2, 2, 1, 3, True, True),  # crosses the default chunk (64) twice
    ],
)
def test_scan_matches_brute_force(backend, b, p, h, hd, g, n, use_D, use_h0):
    x, delta, A, B, C, D, h0 = make_inputs(b, p, h, hd, g, n, seed=p + h)
    D, h0 = (D if use_D else None), (h0 if use_h0 else None)
    out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend=backend)
    y_ref, states_ref, _ = brute_force(x, delta, A, B, C, D, h0)
    assert out.y.shape == (b, p, h, hd) and out.states.shape == (b, p, h, hd, n)
    assert out.final_state.shape == (b, h, hd, n)
    assert out.y.dtype == torch.float32
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    torch.testing.assert_close(out.states.double(), states_ref, **TOL)
    torch.testing.assert_close(out.final_state.double(), states_ref[:, -1], **TOL)
    assert y_ref.abs().max() > 0.1
    # without return_states: the same y and final state, no states
    plain = ssd_scan(x, delta, A, B, C, D, initial_state=h0, backend=backend)
    assert plain.states is None
    torch.testing.assert_close(plain.y, out.y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(plain.final_state, out.final_state, atol=1e-6, rtol=1e-6)


def test_brute_force_agrees_with_scalar_loop():
    """The two oracles, built differently, agree (so neither carries a shared mistake)."""
    x, delta, A, B, C, D, h0 = make_inputs(2, 7, 4, 2, 2, 3, seed=1)
    y1, s1, _ = brute_force(x, delta, A, B, C, D, h0)
    y2, s2, f2 = scalar_loop(x, delta, A, B, C, D, h0)
    torch.testing.assert_close(y1, y2, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s1, s2, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(s1[:, -1], f2, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("p", [37, 130])
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_torch_backend_any_chunk_size(p, chunk_size):
    x, delta, A, B, C, D, h0 = make_inputs(2, p, 4, 2, 2, 3, seed=chunk_size)
    out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="torch", chunk_size=chunk_size)
    y_ref, states_ref, _ = brute_force(x, delta, A, B, C, D, h0)
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    torch.testing.assert_close(out.states.double(), states_ref, **TOL)
    torch.testing.assert_close(out.final_state.double(), states_ref[:, -1], **TOL)


def test_torch_backend_long_decay_is_stable():
    """Strong decay over a long chunk (Σ Δ A ≈ -500): exponents never overflow, nothing is NaN."""
    x, delta, A, B, C, D, h0 = make_inputs(1, 130, 2, 2, 1, 2, seed=3)
    A = A * 0 - 4.0
    out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="torch", chunk_size=128)
    assert bool(torch.isfinite(out.y).all()) and bool(torch.isfinite(out.states).all())
    y_ref, states_ref, _ = brute_force(x, delta, A, B, C, D, h0)
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_split_scan_with_initial_state_equals_one_pass(backend):
    x, delta, A, B, C, D, h0 = make_inputs(2, 37, 3, 2, 1, 4, seed=5)
    whole = ssd_scan(x, delta, A, B, C, D, initial_state=h0, backend=backend, chunk_size=16)
    s = 17
    first = ssd_scan(x[:, :s], delta[:, :s], A, B[:, :s], C[:, :s], D, initial_state=h0, backend=backend, chunk_size=16)
    second = ssd_scan(x[:, s:], delta[:, s:], A, B[:, s:], C[:, s:], D, initial_state=first.final_state,
                      backend=backend, chunk_size=16)
    torch.testing.assert_close(torch.cat([first.y, second.y], dim=1), whole.y, **TOL)
    torch.testing.assert_close(second.final_state, whole.final_state, **TOL)
    # and the initial state matters
    no_h0 = ssd_scan(x, delta, A, B, C, D, backend=backend)
    assert (no_h0.y - whole.y).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_length(backend):
    x, delta, A, B, C, D, h0 = make_inputs(2, 0, 3, 2, 1, 4)
    out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend=backend)
    assert out.y.shape == (2, 0, 3, 2) and out.states.shape == (2, 0, 3, 2, 4)
    torch.testing.assert_close(out.final_state, h0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_accumulate_in_fp32(backend):
    inputs = make_inputs(2, 20, 4, 2, 2, 3, seed=9, dtype=torch.bfloat16)
    x, delta, A, B, C, D, h0 = inputs
    out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, backend=backend, chunk_size=8)
    assert out.y.dtype == torch.float32 and out.final_state.dtype == torch.float32
    y_ref, _, _ = brute_force(x, delta, A, B, C, D, h0)  # the same bf16 values, in float64
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)


# ----------------------------------------------------------------------------- gradients
def _objective(out, weights):
    gy, gf, gs = weights
    return (out.y * gy).sum() + (out.final_state * gf).sum() + (out.states * gs).sum()


def test_gradients_match_between_backends():
    b, p, h, hd, g, n = 2, 37, 4, 2, 2, 3  # p crosses two chunk boundaries (chunk 16) with a remainder
    base = make_inputs(b, p, h, hd, g, n, seed=11)
    gen = torch.Generator().manual_seed(12)
    weights = (torch.randn(b, p, h, hd, generator=gen), torch.randn(b, h, hd, n, generator=gen),
               torch.randn(b, p, h, hd, n, generator=gen))
    grads = {}
    for backend in BACKENDS:
        inputs = [t.clone().requires_grad_() for t in base]
        x, delta, A, B, C, D, h0 = inputs
        out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend=backend, chunk_size=16)
        grads[backend] = torch.autograd.grad(_objective(out, weights), inputs)
    for name, g_torch, g_ref in zip(NAMES, grads["torch"], grads["reference"]):
        assert g_torch.abs().sum() > 0, name
        torch.testing.assert_close(g_torch, g_ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_autograd_through_brute_force(backend):
    b, p, h, hd, g, n = 2, 9, 4, 2, 2, 3
    inputs = [t.requires_grad_() for t in make_inputs(b, p, h, hd, g, n, seed=21)]
    gen = torch.Generator().manual_seed(22)
    gy, gs = torch.randn(b, p, h, hd, generator=gen), torch.randn(b, p, h, hd, n, generator=gen)
    x, delta, A, B, C, D, h0 = inputs
    out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend=backend, chunk_size=4)
    got = torch.autograd.grad((out.y * gy).sum() + (out.states * gs).sum(), inputs)
    y_ref, states_ref, _ = brute_force(x, delta, A, B, C, D, h0)
    want = torch.autograd.grad((y_ref * gy.double()).sum() + (states_ref * gs.double()).sum(), inputs)
    for name, a, w in zip(NAMES, got, want):
        torch.testing.assert_close(a.double(), w.double(), atol=1e-4, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


def test_gradcheck_torch_backend_float64():
    inputs = tuple(t.double().requires_grad_() for t in make_inputs(1, 5, 4, 2, 2, 2, seed=31))

    def fn(x, delta, A, B, C, D, h0):
        out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="torch", chunk_size=2)
        return out.y, out.states, out.final_state

    assert fn(*inputs)[0].dtype == torch.float64  # float64 in, float64 math (gradcheck is meaningful)
    assert torch.autograd.gradcheck(fn, inputs)


# ----------------------------------------------------------------------------- state override
def _override(b, p, h, hd, n, positions, seed):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, p, h, hd, n, dtype=torch.bool)
    for t in positions:
        mask[:, t] = torch.rand(b, h, hd, n, generator=gen) < 0.5  # only some entries
    mask[0, positions[0]] = True  # and one full state
    values = torch.randn(b, p, h, hd, n, generator=gen) * 3
    return values, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions", [[0], [4], [2, 3, 8], [10], list(range(11)), [1, 2, 3, 4, 5, 6, 7, 9, 10]])
def test_state_override_matches_scalar_loop(backend, positions):
    """Few edited positions: segments of scans; more than RECURRENCE_AFTER_EDITS (8): one
    masked recurrence over the states. Both against the scalar loop."""
    b, p, h, hd, g, n = 2, 11, 4, 2, 2, 2
    x, delta, A, B, C, D, h0 = make_inputs(b, p, h, hd, g, n, seed=41)
    values, mask = _override(b, p, h, hd, n, positions, seed=sum(positions))
    out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, state_override=StateOverride(values=values, mask=mask),
                   return_states=True, backend=backend, chunk_size=4)
    y_ref, states_ref, final_ref = scalar_loop(x, delta, A, B, C, D, h0, override=(values, mask))
    torch.testing.assert_close(out.states[mask], values[mask])
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    torch.testing.assert_close(out.states.double(), states_ref, **TOL)
    torch.testing.assert_close(out.final_state.double(), final_ref, **TOL)
    plain = ssd_scan(x, delta, A, B, C, D, initial_state=h0, backend=backend)
    assert (plain.y[:, positions[0]:] - out.y[:, positions[0]:]).abs().max() > 1e-3


def test_state_override_across_chunk_boundaries_torch():
    b, p, h, hd, g, n = 1, 40, 2, 2, 1, 2
    x, delta, A, B, C, D, h0 = make_inputs(b, p, h, hd, g, n, seed=43)
    values, mask = _override(b, p, h, hd, n, [15, 16, 33], seed=44)
    out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, state_override=StateOverride(values=values, mask=mask),
                   return_states=True, backend="torch", chunk_size=16)
    y_ref, states_ref, final_ref = scalar_loop(x, delta, A, B, C, D, h0, override=(values, mask))
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    torch.testing.assert_close(out.states.double(), states_ref, **TOL)
    torch.testing.assert_close(out.final_state.double(), final_ref, **TOL)


# ----------------------------------------------------------------------------- knockout mask
@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_mask_per_head_equals_masked_hidden_attention(backend):
    b, p, h, hd, g, n = 2, 12, 4, 2, 2, 3
    x, delta, A, B, C, D, _ = make_inputs(b, p, h, hd, g, n, seed=51)
    mask = (torch.rand(b, h, p, p, generator=torch.Generator().manual_seed(52)) < 0.6).float()  # per row and head
    out = ssd_scan(x, delta, A, B, C, D, ssm_mask=mask, backend=backend, chunk_size=5)
    causal = torch.ones(p, p).tril()
    y_ref, _, _ = brute_force(x, delta, A, B, C, D, mask=mask * causal)
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    plain = ssd_scan(x, delta, A, B, C, D, backend=backend)
    assert (plain.y - out.y).abs().max() > 1e-2
    # entries above the diagonal are ignored
    again = ssd_scan(x, delta, A, B, C, D, ssm_mask=torch.maximum(mask, 1 - causal), backend=backend, chunk_size=5)
    torch.testing.assert_close(again.y, out.y, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_mask_one_head_source_to_target(backend):
    """Zeroing mask[:, head, i, j] subtracts exactly α[i, j]·x_j from that head at i; other heads keep theirs."""
    b, p, h, hd, g, n = 2, 10, 3, 2, 1, 3
    x, delta, A, B, C, D, h0 = make_inputs(b, p, h, hd, g, n, seed=53)
    head = 1
    mask = torch.ones(b, h, p, p)
    mask[:, head, p - 1, [1, 2]] = 0
    out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, ssm_mask=mask, backend=backend)
    y_plain, _, alpha = brute_force(x, delta, A, B, C, D, h0)
    expected = y_plain.clone()
    for j in (1, 2):
        expected[:, p - 1, head] -= alpha[:, head, p - 1, j, None] * x[:, j, head].double()
    torch.testing.assert_close(out.y.double(), expected, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_mask_broadcast_over_heads_and_all_zero(backend):
    b, p, h, hd, g, n = 2, 9, 4, 2, 2, 2
    x, delta, A, B, C, D, _ = make_inputs(b, p, h, hd, g, n, seed=55)
    mask1 = (torch.rand(b, 1, p, p, generator=torch.Generator().manual_seed(56)) < 0.5).float()
    out = ssd_scan(x, delta, A, B, C, D, ssm_mask=mask1, backend=backend)
    y_ref, _, _ = brute_force(x, delta, A, B, C, D, mask=mask1.expand(b, h, p, p) * torch.ones(p, p).tril())
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    # every edge knocked out, the diagonal included: only the D skip is left
    none_kept = ssd_scan(x, delta, A, B, C, D, ssm_mask=torch.zeros(b, h, p, p), backend=backend)
    torch.testing.assert_close(none_kept.y.double(), (D[:, None] * x).double(), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_heads", [1, 4])
def test_ssm_mask_with_batch_axis_1_is_shared_by_every_row(backend, mask_heads):
    b, p, h, hd, g, n = 3, 9, 4, 2, 2, 2
    x, delta, A, B, C, D, _ = make_inputs(b, p, h, hd, g, n, seed=57)
    shared = (torch.rand(1, mask_heads, p, p, generator=torch.Generator().manual_seed(58)) < 0.5).float()
    out = ssd_scan(x, delta, A, B, C, D, ssm_mask=shared, backend=backend)
    y_ref, _, _ = brute_force(x, delta, A, B, C, D, mask=shared.expand(b, h, p, p) * torch.ones(p, p).tril())
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)


@pytest.mark.parametrize("shape", [(2, 4, 9, 9), (3, 2, 9, 9), (3, 1, 9, 8), (3, 9, 9)])
def test_ssm_mask_of_another_shape_is_refused_by_name(shape):
    x, delta, A, B, C, D, _ = make_inputs(3, 9, 4, 2, 2, 2, seed=59)
    with pytest.raises(ValueError, match=r"ssd_scan: ssm_mask must be \[b, 1, 9, 9\] or \[b, 4, 9, 9\] with b = 3"):
        ssd_scan(x, delta, A, B, C, D, ssm_mask=torch.ones(shape), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["scans", "quadratic", "edges"])
@pytest.mark.parametrize("mask_heads", [1, 4])
def test_dense_mask_every_path_matches_masked_hidden_attention(backend, path, mask_heads, monkeypatch):
    """A general mask (random, fractional, per head or shared) removes the same terms whether
    it costs one scan per column pattern, goes through the quadratic form, or is summed edge
    by edge (each forced here with ``DENSE_MASK_AFTER`` and ``PAIRS_PER_SCANNED_POSITION``),
    against the brute-force hidden-attention matrix, values and gradients."""
    from tl_mamba.ops import knockout, ssd

    monkeypatch.setattr(knockout, "DENSE_MASK_AFTER", 0 if path == "quadratic" else 10**9)
    per_position = 1e9 if path == "edges" else 0.0
    monkeypatch.setattr(knockout, "PAIRS_PER_SCANNED_POSITION", {"bpe": per_position, "bphd": per_position})
    calls = []
    quadratic = ssd.dense_removed_terms_bphd
    monkeypatch.setattr(ssd, "dense_removed_terms_bphd", lambda *a, **k: calls.append(1) or quadratic(*a, **k))
    b, p, h, hd, g, n = 2, 11, 4, 3, 2, 3
    tensors = make_inputs(b, p, h, hd, g, n, seed=57, dtype=torch.float64)
    gen = torch.Generator().manual_seed(58)
    mask = torch.rand(b, mask_heads, p, p, generator=gen, dtype=torch.float64)
    mask = torch.where(mask < 0.4, torch.zeros_like(mask), torch.where(mask < 0.5, 0.5 * torch.ones_like(mask), 1.0))
    causal = torch.ones(p, p, dtype=torch.float64).tril()
    weight = torch.randn(b, p, h, hd, generator=gen, dtype=torch.float64)
    grads = {}
    for run in ("ours", "brute_force"):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        x, delta, A, B, C, D, h0 = leaves
        if run == "ours":
            y = ssd_scan(x, delta, A, B, C, D, initial_state=h0, ssm_mask=mask, backend=backend, chunk_size=4).y
        else:
            y = brute_force(x, delta, A, B, C, D, h0, mask=mask.expand(b, h, p, p) * causal)[0]
        (y * weight).sum().backward()
        grads[run] = (y.detach(), [t.grad for t in leaves])
    assert len(calls) == (1 if path == "quadratic" else 0)
    torch.testing.assert_close(grads["ours"][0], grads["brute_force"][0], rtol=1e-9, atol=1e-9)
    for name, a, b_ in zip(NAMES, grads["ours"][1], grads["brute_force"][1]):
        torch.testing.assert_close(a, b_, rtol=1e-8, atol=1e-8, msg=name)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "name,bad",
    [
        ("delta", lambda t: {**t, "delta": t["delta"][:, :-1]}),
        ("A", lambda t: {**t, "A": t["A"][:-1]}),
        ("B", lambda t: {**t, "B": t["B"][:, :-1]}),
        ("C", lambda t: {**t, "C": t["C"][..., :-1]}),
        ("D", lambda t: {**t, "D": t["D"][:-1]}),
        ("initial_state", lambda t: {**t, "initial_state": t["initial_state"][..., :-1]}),
        ("ssm_mask", lambda t: {**t, "ssm_mask": torch.ones(2, 4, 5, 4)}),
        ("state_override", lambda t: {**t, "state_override": StateOverride(
            values=torch.zeros(2, 4, 4, 2, 3), mask=torch.ones(2, 4, 4, 2, 3, dtype=torch.bool))}),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_errors_name_the_argument(backend, name, bad):
    x, delta, A, B, C, D, h0 = make_inputs(2, 5, 4, 2, 2, 3)
    kwargs = bad(dict(x=x, delta=delta, A=A, B=B, C=C, D=D, initial_state=h0))
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        ssd_scan(**kwargs, backend=backend)


def test_shape_error_names_x():
    x, delta, A, B, C, D, _ = make_inputs(2, 5, 4, 2, 2, 3)
    with pytest.raises(ValueError, match=r"\bx\b"):
        ssd_scan(x[0], delta, A, B, C, D)


def test_heads_not_divisible_by_groups():
    x, delta, A, B, C, D, _ = make_inputs(2, 5, 5, 2, 2, 3)  # 5 heads, 2 groups
    with pytest.raises(ValueError, match="5 heads.*2 groups|divisible"):
        ssd_scan(x, delta, A, B, C, D)


def test_bad_chunk_size():
    x, delta, A, B, C, D, _ = make_inputs(1, 5, 2, 2, 1, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd_scan(x, delta, A, B, C, D, backend="torch", chunk_size=0)


def test_dense_mask_switch_point_per_device_and_dtype(monkeypatch):
    """The number of extra scans a dense mask may cost before the quadratic form serves it:
    grows with p on CPU; on CUDA it is the measured per-dtype constant; an override wins."""
    from tl_mamba.ops import knockout

    assert knockout.dense_mask_after(128) == 4 and knockout.dense_mask_after(2048) == 32
    for dtype, after in knockout.DENSE_MASK_AFTER_CUDA.items():
        assert knockout.dense_mask_after(2048, "cuda", dtype) == after
    assert knockout.dense_mask_after(2048, "cuda", torch.float64) == 32  # float64: the CPU rule
    assert knockout.dense_mask_after(2048, "cpu", torch.bfloat16) == 32
    monkeypatch.setattr(knockout, "DENSE_MASK_AFTER", 7)
    assert knockout.dense_mask_after(2048, "cuda", torch.float32) == 7


def test_knockout_positions_are_resolved_on_the_host():
    """A Knockout's removal carries the positions that are a source / a target in some row,
    as CPU indices equal to its masks' (so a GPU knockout picks its route without a sync);
    a removal built without them reads the same positions from its masks."""
    from types import SimpleNamespace

    from tl_mamba import Knockout
    from tl_mamba.ops.knockout import EdgeRemoval

    cfg = SimpleNamespace(family="mamba2", n_heads=4, d_inner=8)
    rows = torch.zeros(2, 10, dtype=torch.bool)
    rows[0, 2], rows[1, 5] = True, True
    for sources, expected in (([3, -2], [3, 8]), (rows, [2, 5])):
        removal = Knockout(layers=0, sources=sources, targets=[-1, 6]).removal(cfg, 2, 10)
        src, tgt = removal.positions()
        assert src.device.type == "cpu" and src.tolist() == expected and tgt.tolist() == [6, 9]
        bare = EdgeRemoval(removal.sources, removal.targets)
        assert [t.tolist() for t in bare.positions()] == [expected, [6, 9]]


@pytest.mark.parametrize("positions", [[2, 5], list(range(1, 11))])
def test_state_override_gradients_match_autograd_through_the_scalar_loop(positions):
    """As for Mamba-1: segments (2 edited positions) and the masked recurrence (10)."""
    b, p, h, hd, g, n = 2, 11, 4, 2, 2, 2
    tensors = make_inputs(b, p, h, hd, g, n, seed=71, dtype=torch.float64)
    values, mask = _override(b, p, h, hd, n, positions, seed=72)
    gen = torch.Generator().manual_seed(73)
    gy = torch.randn(b, p, h, hd, generator=gen, dtype=torch.float64)
    gh = torch.randn(b, h, hd, n, generator=gen, dtype=torch.float64)
    grads = []
    for run in ("scan", "loop"):
        leaves = [t.clone().requires_grad_(True) for t in (*tensors, values.double())]
        x, delta, A, B, C, D, h0, v = leaves
        if run == "scan":
            out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, backend="torch", chunk_size=4,
                           state_override=StateOverride(values=v, mask=mask))
            y, final = out.y, out.final_state
        else:
            Bh, Ch = B.repeat_interleave(h // g, dim=2), C.repeat_interleave(h // g, dim=2)
            state, ys = h0, []  # the recurrence as a loop of tensor ops, differentiable by autograd
            for t in range(p):
                write = (delta[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
                state = torch.exp(delta[:, t] * A)[..., None, None] * state + write
                state = torch.where(mask[:, t], v[:, t], state)
                ys.append(torch.einsum("bhdn,bhn->bhd", state, Ch[:, t]) + D[:, None] * x[:, t])
            y, final = torch.stack(ys, 1), state
        grads.append(torch.autograd.grad((y * gy).sum() + (final * gh).sum(), leaves))
    for name, a, w in zip("x delta A B C D h0 values".split(), *grads):
        assert w.abs().sum() > 0, name
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9, msg=name)
