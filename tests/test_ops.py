"""Op-level tests: the selective scan, its state override and knockout mask, the causal conv,
and backend selection.

The oracles are written here and differ in construction from ``reference.py``:

- ``closed_form``: the scan unrolled into hidden attention, in float64. With
  S_t = Σ_{k≤t} Δ_k A, the decay from j to i is exp(S_i − S_j); the states are
  h_i = Σ_{j≤i} exp(S_i − S_j) Δ_j x_j B_j + exp(S_i) h_0, and y is read from an
  explicit α[i, j] = Σ_n C_i[n] exp(S_i − S_j)[n] Δ_j B_j[n], not from the states.
- ``scalar_loop``: the recurrence in Python floats, one (b, t, e, n) entry at a time.
"""

from __future__ import annotations

import importlib
import math

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_config
from tl_mamba import BackendUnavailableError, HookedMamba
from tl_mamba.backends import OUT_OF_MEMORY, resolve_backend
from tl_mamba.ops import StateOverride, causal_conv1d, selective_scan
from tl_mamba.ops.conv import IMPLEMENTATIONS as CONV_IMPLEMENTATIONS
from tl_mamba.ops.selective_scan import selective_scan_chunked

BACKENDS = ("reference", "torch")
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- oracles
def closed_form(x, delta, A, B, C, D=None, h0=None, mask=None):
    """Returns ``(y [b,p,e], states [b,p,e,n], alpha [b,e,p,p])`` in float64.

    ``mask [b,1,p,p]`` (1 = kept) multiplies α before the sum; the D skip is never masked.
    """
    x, delta, A, B, C = (t.double() for t in (x, delta, A, B, C))
    b, p, e = x.shape
    S = torch.cumsum(delta[..., None] * A, dim=1)  # [b, p, e, n]
    causal = torch.ones(p, p, dtype=torch.bool).tril()[None, :, :, None, None]  # [1, i, j, 1, 1]
    log_decay = torch.where(causal, S[:, :, None] - S[:, None, :], torch.tensor(-math.inf, dtype=torch.float64))
    L = log_decay.exp()  # [b, i, j, e, n]; zero above the diagonal
    write = (delta * x)[..., None] * B[:, :, None, :]  # [b, j, e, n]
    states = torch.einsum("bijen,bjen->bien", L, write)
    alpha = torch.einsum("bin,bijen,bje,bjn->beij", C, L, delta, B)
    if mask is not None:
        alpha_used = alpha * mask.double()  # [b,1,p,p] broadcasts over e
    else:
        alpha_used = alpha
    y = torch.einsum("beij,bje->bie", alpha_used, x)
    if h0 is not None:
        carried = S.exp() * h0.double()[:, None]  # [b, p, e, n]
        states = states + carried
        y = y + torch.einsum("bpen,bpn->bpe", carried, C)
    if D is not None:
        y = y + D.double() * x
    return y, states, alpha


def scalar_loop(x, delta, A, B, C, D=None, h0=None, override=None):
    """The recurrence entry by entry in Python floats; ``override = (values, mask)`` sets h_t."""
    b, p, e = x.shape
    n = A.shape[1]
    xs, ds, As, Bs, Cs = (t.double().tolist() for t in (x, delta, A, B, C))
    y = torch.zeros(b, p, e, dtype=torch.float64)
    states = torch.zeros(b, p, e, n, dtype=torch.float64)
    final = torch.zeros(b, e, n, dtype=torch.float64)
    for bi in range(b):
        for ei in range(e):
            for ni in range(n):
                h = 0.0 if h0 is None else float(h0[bi, ei, ni])
                for t in range(p):
                    h = math.exp(ds[bi][t][ei] * As[ei][ni]) * h + ds[bi][t][ei] * xs[bi][t][ei] * Bs[bi][t][ni]
                    if override is not None and bool(override[1][bi, t, ei, ni]):
                        h = float(override[0][bi, t, ei, ni])
                    states[bi, t, ei, ni] = h
                    y[bi, t, ei] += h * Cs[bi][t][ni]
                final[bi, ei, ni] = h
    if D is not None:
        y = y + D.double() * x.double()
    return y, states, final


def make_inputs(b, p, e, n, seed=0, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p, e, generator=g)
    delta = F.softplus(torch.randn(b, p, e, generator=g) - 0.5)
    A = -torch.exp(0.5 * torch.randn(e, n, generator=g))
    B = torch.randn(b, p, n, generator=g)
    C = torch.randn(b, p, n, generator=g)
    D = torch.randn(e, generator=g)
    h0 = torch.randn(b, e, n, generator=g)
    out = [t.to(dtype) for t in (x, delta, A, B, C, D, h0)]
    if requires_grad:
        out = [t.requires_grad_() for t in out]
    return out


# ----------------------------------------------------------------------------- selective scan
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "b,p,e,n,use_D,use_h0",
    [
        (2, 13, 6, 4, True, False),
        (2, 13, 6, 4, False, True),
        (3, 1, 5, 3, True, True),  # p = 1
        (2, 130, 4, 3, True, True),  # crosses the torch backend's chunk boundary (64) twice
    ],
)
def test_scan_matches_closed_form(backend, b, p, e, n, use_D, use_h0):
    x, delta, A, B, C, D, h0 = make_inputs(b, p, e, n, seed=p)
    D = D if use_D else None
    h0 = h0 if use_h0 else None
    out = selective_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend=backend)
    y_ref, states_ref, _ = closed_form(x, delta, A, B, C, D, h0)
    assert out.y.shape == (b, p, e) and out.states.shape == (b, p, e, n) and out.final_state.shape == (b, e, n)
    assert out.y.dtype == out.states.dtype == out.final_state.dtype == torch.float32
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    torch.testing.assert_close(out.states.double(), states_ref, **TOL)
    torch.testing.assert_close(out.final_state.double(), states_ref[:, -1], **TOL)
    # without return_states the y and the final state are the same, and no states come back
    lean = selective_scan(x, delta, A, B, C, D, initial_state=h0, backend=backend)
    assert lean.states is None
    torch.testing.assert_close(lean.y.double(), y_ref, **TOL)
    torch.testing.assert_close(lean.final_state.double(), states_ref[:, -1], **TOL)


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunked_any_chunk_size_matches_scalar_loop(chunk_size):
    x, delta, A, B, C, D, h0 = make_inputs(2, 11, 3, 2, seed=3)
    out = selective_scan_chunked(x, delta, A, B, C, D, initial_state=h0, return_states=True, chunk_size=chunk_size)
    y_ref, states_ref, final_ref = scalar_loop(x, delta, A, B, C, D, h0)
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    torch.testing.assert_close(out.states.double(), states_ref, **TOL)
    torch.testing.assert_close(out.final_state.double(), final_ref, **TOL)


@pytest.mark.parametrize("per_position", [1, 4096, 98_304, 196_608, 393_216, 786_432, 1 << 22])
def test_chunk_for_is_the_longest_power_of_two_within_the_budget(per_position):
    """The no-grad chunk rule against its definition, checked by enumeration."""
    from tl_mamba.ops.selective_scan.chunked import CHUNK_BYTES, DEFAULT_CHUNK, chunk_for

    fits = [L for L in (8, 16, 32, 64) if L <= DEFAULT_CHUNK and L * per_position <= CHUNK_BYTES]
    assert chunk_for(1, per_position, 1, 1) == (max(fits) if fits else 8)
    assert chunk_for(1, 1536, 16, 4) == 16 and chunk_for(8, 1536, 16, 4) == 8  # 130m widths, b 1 and b 8


def test_chunk_picked_by_batch_size_matches_scalar_loop(monkeypatch):
    """A budget small enough that the rule picks chunks of 8 across 21 positions (3 chunks)."""
    from tl_mamba.ops.selective_scan import chunked

    x, delta, A, B, C, D, h0 = make_inputs(3, 21, 5, 4, seed=8)
    monkeypatch.setattr(chunked, "CHUNK_BYTES", 8 * 3 * 5 * 4 * 4)
    assert chunked.chunk_for(3, 5, 4, 4) == 8
    out = selective_scan_chunked(x, delta, A, B, C, D, initial_state=h0, return_states=True)
    y_ref, states_ref, final_ref = scalar_loop(x, delta, A, B, C, D, h0)
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    torch.testing.assert_close(out.states.double(), states_ref, **TOL)
    torch.testing.assert_close(out.final_state.double(), final_ref, **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_zero_length(backend):
    x, delta, A, B, C, D, h0 = make_inputs(2, 0, 3, 2)
    out = selective_scan(x, delta, A, B, C, D, initial_state=h0, backend=backend)
    assert out.y.shape == (2, 0, 3)
    torch.testing.assert_close(out.final_state, h0)  # nothing happened to the state
    out = selective_scan(x, delta, A, B, C, D, backend=backend)
    assert torch.equal(out.final_state, torch.zeros(2, 3, 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_zero_length_with_states(backend):
    x, delta, A, B, C, D, h0 = make_inputs(2, 0, 3, 2)
    out = selective_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend=backend)
    assert out.states.shape == (2, 0, 3, 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_bf16_inputs_give_fp32_results(backend):
    x, delta, A, B, C, D, h0 = make_inputs(2, 70, 4, 3, seed=5, dtype=torch.bfloat16)
    out = selective_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend=backend)
    assert out.y.dtype == out.final_state.dtype == out.states.dtype == torch.float32
    # the scan itself is fp32: the result equals the fp32 math on the (exactly upcast) bf16 values,
    # not a bf16-rounded result (which would be off by ~1e-2)
    y_ref, states_ref, _ = closed_form(x.float(), delta.float(), A.float(), B.float(), C.float(), D.float(), h0.float())
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    torch.testing.assert_close(out.states.double(), states_ref, **TOL)


# ----------------------------------------------------------------------------- gradients
def _scan_objective(out, weights):
    gy, gh, gs = weights
    return (out.y * gy).sum() + (out.final_state * gh).sum() + (out.states * gs).sum()


def test_torch_backend_gradients_match_reference_backend():
    b, p, e, n = 2, 70, 4, 3  # p crosses a chunk boundary
    inputs = make_inputs(b, p, e, n, seed=11, requires_grad=True)
    g = torch.Generator().manual_seed(12)
    weights = (torch.randn(b, p, e, generator=g), torch.randn(b, e, n, generator=g), torch.randn(b, p, e, n, generator=g))
    grads = {}
    for backend in BACKENDS:
        x, delta, A, B, C, D, h0 = inputs
        out = selective_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend=backend)
        grads[backend] = torch.autograd.grad(_scan_objective(out, weights), inputs)
    names = ("x", "delta", "A", "B", "C", "D", "initial_state")
    for name, g_torch, g_ref in zip(names, grads["torch"], grads["reference"]):
        assert g_torch is not None and g_torch.abs().sum() > 0, name
        torch.testing.assert_close(g_torch, g_ref, atol=1e-5, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_autograd_through_closed_form(backend):
    """Autograd through the float64 closed form is an independent gradient oracle."""
    b, p, e, n = 2, 9, 3, 2
    inputs = make_inputs(b, p, e, n, seed=21, requires_grad=True)
    g = torch.Generator().manual_seed(22)
    gy, gs = torch.randn(b, p, e, generator=g), torch.randn(b, p, e, n, generator=g)
    x, delta, A, B, C, D, h0 = inputs
    out = selective_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend=backend)
    got = torch.autograd.grad((out.y * gy).sum() + (out.states * gs).sum(), inputs)
    y_ref, states_ref, _ = closed_form(x, delta, A, B, C, D, h0)
    want = torch.autograd.grad((y_ref * gy.double()).sum() + (states_ref * gs.double()).sum(), inputs)
    for name, a, w in zip(("x", "delta", "A", "B", "C", "D", "initial_state"), got, want):
        torch.testing.assert_close(a.double(), w.double(), atol=1e-4, rtol=1e-4, msg=lambda m: f"grad of {name}: {m}")


def _gradcheck_inputs(dtype):
    x, delta, A, B, C, D, h0 = make_inputs(1, 5, 2, 2, seed=31, dtype=dtype)
    return tuple(t.detach().clone().requires_grad_() for t in (x, delta, A, B, C, D, h0))


def _scan_fn(x, delta, A, B, C, D, h0):
    out = selective_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="torch")
    return out.y, out.states


@pytest.mark.filterwarnings("ignore:Input #:UserWarning")  # gradcheck's "not double precision" warning
def test_gradcheck_torch_backend_fp32_precision():
    """Finite differences at fp32 precision (eps 1e-3: roundoff ~1e-4, truncation ~1e-6)."""
    assert torch.autograd.gradcheck(_scan_fn, _gradcheck_inputs(torch.float32), eps=1e-3, atol=2e-3, rtol=2e-2)


def test_gradcheck_torch_backend_float64():
    assert torch.autograd.gradcheck(_scan_fn, _gradcheck_inputs(torch.float64))


# The torch backend's gradient is its hand-written chunked backward (chunked._ChunkedScan), not
# autograd through the loop: check it across chunk boundaries, with and without returned states.
@pytest.mark.parametrize("p", [16, 37])
def test_torch_backend_handwritten_backward_with_states_matches_closed_form(p):
    """Gradients through every returned state (what a hook on hook_h sees under autograd), y and
    the final state, across chunk boundaries, against autograd through the float64 closed form."""
    b, e, n = 2, 3, 2
    inputs = make_inputs(b, p, e, n, seed=36, dtype=torch.float64, requires_grad=True)
    g = torch.Generator().manual_seed(37)
    gy, gs = torch.randn(b, p, e, generator=g, dtype=torch.float64), torch.randn(b, p, e, n, generator=g, dtype=torch.float64)
    gh = torch.randn(b, e, n, generator=g, dtype=torch.float64)
    x, delta, A, B, C, D, h0 = inputs
    out = selective_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="torch")
    got = torch.autograd.grad((out.y * gy).sum() + (out.states * gs).sum() + (out.final_state * gh).sum(), inputs)
    y_ref, states_ref, _ = closed_form(x, delta, A, B, C, D, h0)
    want = torch.autograd.grad((y_ref * gy).sum() + (states_ref * gs).sum() + (states_ref[:, -1] * gh).sum(), inputs)
    for name, a, w in zip(("x", "delta", "A", "B", "C", "D", "initial_state"), got, want):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("p", [1, 16, 37])  # one position, exactly one chunk, chunks + a ragged tail
def test_gradcheck_torch_backend_handwritten_backward_float64(p):
    from tl_mamba.ops.selective_scan.chunked import GRAD_CHUNK

    assert p <= GRAD_CHUNK or p % GRAD_CHUNK  # the ragged case really is ragged
    x, delta, A, B, C, D, h0 = (t.detach().clone().requires_grad_()
                                for t in make_inputs(1, p, 2, 3, seed=33, dtype=torch.float64))

    def scan(x, delta, A, B, C, D, h0):
        out = selective_scan(x, delta, A, B, C, D, initial_state=h0, backend="torch")
        return out.y, out.final_state

    assert torch.autograd.gradcheck(scan, (x, delta, A, B, C, D, h0))


@pytest.mark.parametrize("wanted", [("x",), ("delta", "A"), ("B", "C"), ("initial_state",), "all"])
def test_torch_backend_handwritten_backward_matches_closed_form(wanted):
    """Gradients of y and the final state across chunk boundaries, for any subset of inputs."""
    names = ("x", "delta", "A", "B", "C", "D", "initial_state")
    b, p, e, n = 2, 41, 3, 2
    tensors = make_inputs(b, p, e, n, seed=34, dtype=torch.float64)
    g = torch.Generator().manual_seed(35)
    gy, gh = torch.randn(b, p, e, generator=g, dtype=torch.float64), torch.randn(b, e, n, generator=g, dtype=torch.float64)
    grads = []
    for run in ("scan", "closed_form"):
        leaves = [t.clone().requires_grad_(wanted == "all" or name in wanted) for name, t in zip(names, tensors)]
        x, delta, A, B, C, D, h0 = leaves
        if run == "scan":
            out = selective_scan(x, delta, A, B, C, D, initial_state=h0, backend="torch")
            y, final = out.y, out.final_state
        else:
            y, states, _ = closed_form(x, delta, A, B, C, D, h0)
            final = states[:, -1]
        objective = (y * gy).sum() + (final * gh).sum()
        grads.append(torch.autograd.grad(objective, [t for t in leaves if t.requires_grad]))
    assert len(grads[0]) == (len(names) if wanted == "all" else len(wanted))
    for a, w in zip(*grads):
        assert w.abs().sum() > 0
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- state override
def _override(b, p, e, n, positions, seed):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, p, e, n, dtype=torch.bool)
    for t in positions:
        mask[:, t] = torch.rand(b, e, n, generator=g) < 0.5  # only some (e, n) entries
    mask[0, positions[0]] = True  # and one full state
    values = torch.randn(b, p, e, n, generator=g) * 3
    return values, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("positions", [[0], [4], [2, 3, 8], [10], list(range(11)), [1, 2, 3, 4, 5, 6, 7, 9, 10]])
def test_state_override_matches_scalar_loop(backend, positions):
    """Few edited positions: segments of scans; more than RECURRENCE_AFTER_EDITS (8): one
    masked recurrence over the states. Both against the scalar loop."""
    b, p, e, n = 2, 11, 3, 2
    x, delta, A, B, C, D, h0 = make_inputs(b, p, e, n, seed=41)
    values, mask = _override(b, p, e, n, positions, seed=sum(positions))
    out = selective_scan(
        x, delta, A, B, C, D, initial_state=h0, state_override=StateOverride(values=values, mask=mask),
        return_states=True, backend=backend,
    )
    y_ref, states_ref, final_ref = scalar_loop(x, delta, A, B, C, D, h0, override=(values, mask))
    torch.testing.assert_close(out.states[mask], values[mask])  # the state at t is the value set
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    torch.testing.assert_close(out.states.double(), states_ref, **TOL)
    torch.testing.assert_close(out.final_state.double(), final_ref, **TOL)
    # the override changed what came after it
    plain = selective_scan(x, delta, A, B, C, D, initial_state=h0, backend=backend)
    if positions[0] < p - 1:
        assert (plain.y[:, positions[0] + 1 :] - out.y[:, positions[0] + 1 :]).abs().max() > 1e-3


def test_state_override_across_chunk_boundary_torch():
    b, p, e, n = 1, 130, 2, 2
    x, delta, A, B, C, D, h0 = make_inputs(b, p, e, n, seed=43)
    values, mask = _override(b, p, e, n, [63, 64, 100], seed=44)
    override = StateOverride(values=values, mask=mask)
    out = selective_scan(x, delta, A, B, C, D, initial_state=h0, state_override=override, return_states=True, backend="torch")
    y_ref, states_ref, final_ref = scalar_loop(x, delta, A, B, C, D, h0, override=(values, mask))
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    torch.testing.assert_close(out.states.double(), states_ref, **TOL)
    torch.testing.assert_close(out.final_state.double(), final_ref, **TOL)


# ----------------------------------------------------------------------------- knockout mask
def _random_mask(b, p, seed, density=0.6):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, 1, p, p, generator=g) < density).float()  # entries above the diagonal too


@pytest.mark.parametrize("route", ["scans", "edges", "quadratic"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_mask_equals_masked_hidden_attention(backend, route, monkeypatch):
    """Whether the removed terms come from one scan per column pattern, edge by edge or in the
    quadratic form (forced with ``PAIRS_PER_SCANNED_POSITION`` and ``DENSE_MASK_AFTER``),
    against the float64 closed form."""
    from tl_mamba.ops import knockout

    per_position = 1e9 if route == "edges" else 0.0
    monkeypatch.setattr(knockout, "PAIRS_PER_SCANNED_POSITION", {"bpe": per_position, "bphd": per_position})
    monkeypatch.setattr(knockout, "DENSE_MASK_AFTER", 0 if route == "quadratic" else 10**9)
    if route == "quadratic":  # it must be the route taken
        calls, scan_module = [], sys.modules["tl_mamba.ops.selective_scan"]
        quadratic = scan_module.dense_removed_terms_bpe
        monkeypatch.setattr(scan_module, "dense_removed_terms_bpe",
                            lambda *args, **kw: calls.append(1) or quadratic(*args, **kw))
    b, p, e, n = 3, 12, 4, 3
    x, delta, A, B, C, D, _ = make_inputs(b, p, e, n, seed=51)
    mask = _random_mask(b, p, seed=52)  # a different random mask per batch row
    out = selective_scan(x, delta, A, B, C, D, ssm_mask=mask, backend=backend)
    causal = torch.ones(p, p).tril()
    y_ref, _, _ = closed_form(x, delta, A, B, C, D, mask=mask * causal)
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)
    plain = selective_scan(x, delta, A, B, C, D, backend=backend)
    assert (plain.y - out.y).abs().max() > 1e-2  # the mask did something
    # entries above the diagonal are ignored
    upper_ones = torch.maximum(mask, 1 - causal)
    again = selective_scan(x, delta, A, B, C, D, ssm_mask=upper_ones, backend=backend)
    torch.testing.assert_close(again.y, out.y, **TOL)
    if route == "quadratic":
        assert calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_mask_with_batch_axis_1_is_shared_by_every_row(backend):
    b, p, e, n = 3, 11, 4, 3
    x, delta, A, B, C, D, _ = make_inputs(b, p, e, n, seed=53)
    shared = _random_mask(1, p, seed=54)
    out = selective_scan(x, delta, A, B, C, D, ssm_mask=shared, backend=backend)
    y_ref, _, _ = closed_form(x, delta, A, B, C, D, mask=shared.expand(b, 1, p, p) * torch.ones(p, p).tril())
    torch.testing.assert_close(out.y.double(), y_ref, **TOL)


@pytest.mark.parametrize("shape", [(2, 1, 11, 11), (3, 4, 11, 11), (3, 1, 11, 10), (3, 11, 11)])
def test_ssm_mask_of_another_shape_is_refused_by_name(shape):
    x, delta, A, B, C, D, _ = make_inputs(3, 11, 4, 3, seed=55)
    with pytest.raises(ValueError, match=r"selective_scan: ssm_mask must be \[b, 1, 11, 11\] with b = 3"):
        selective_scan(x, delta, A, B, C, D, ssm_mask=torch.ones(shape), backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_mask_source_to_target_keeps_D_skip(backend):
    b, p, e, n = 2, 10, 3, 2
    x, delta, A, B, C, D, _ = make_inputs(b, p, e, n, seed=53)
    mask = torch.ones(b, 1, p, p)
    mask[:, 0, p - 1, [1, 2]] = 0
    out = selective_scan(x, delta, A, B, C, D, ssm_mask=mask, backend=backend)
    y_plain, _, alpha = closed_form(x, delta, A, B, C, D)
    expected = y_plain.clone()
    expected[:, p - 1] -= alpha[:, :, p - 1, 1] * x[:, 1].double() + alpha[:, :, p - 1, 2] * x[:, 2].double()
    torch.testing.assert_close(out.y.double(), expected, **TOL)
    # knocking out every edge, the diagonal included, leaves exactly the D skip
    none_kept = selective_scan(x, delta, A, B, C, D, ssm_mask=torch.zeros(b, 1, p, p), backend=backend)
    torch.testing.assert_close(none_kept.y.double(), (D * x).double(), **TOL)


# ----------------------------------------------------------------------------- Mamba-1's gate
def _gated(y, z):
    """y · silu(z), written out (z · σ(z)), in float64."""
    z = z.double()
    return y.double() * z / (1 + torch.exp(-z))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("extra", ["none", "mask", "override"])
def test_scan_gate_z_multiplies_y_by_silu_z(backend, extra):
    """``z=`` gives y · silu(z): with no knockout (where a backend may fuse it), and after
    a knockout's removed terms or a state override (where the dispatcher applies it)."""
    b, p, e, n = 2, 9, 3, 2
    x, delta, A, B, C, D, h0 = make_inputs(b, p, e, n, seed=61)
    z = torch.randn(b, p, e, generator=torch.Generator().manual_seed(62)) * 3
    kwargs = dict(initial_state=h0)
    if extra == "mask":
        kwargs["ssm_mask"] = _random_mask(b, p, seed=63)
        expected = closed_form(x, delta, A, B, C, D, h0=h0, mask=kwargs["ssm_mask"] * torch.ones(p, p).tril())[0]
    elif extra == "override":
        values, edited = _override(b, p, e, n, [3], seed=64)
        kwargs["state_override"] = StateOverride(values=values, mask=edited)
        expected = scalar_loop(x, delta, A, B, C, D, h0=h0, override=(values, edited))[0]
    else:
        expected = closed_form(x, delta, A, B, C, D, h0=h0)[0]
    out = selective_scan(x, delta, A, B, C, D, z=z, backend=backend, **kwargs)
    torch.testing.assert_close(out.y.double(), _gated(expected, z), **TOL)
    assert (expected - _gated(expected, z)).abs().max() > 0.1  # the gate did something


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_gate_gradients_match_autograd_through_closed_form(backend):
    b, p, e, n = 2, 7, 3, 2
    tensors = make_inputs(b, p, e, n, seed=65, dtype=torch.float64)
    z = torch.randn(b, p, e, generator=torch.Generator().manual_seed(66), dtype=torch.float64)
    weight = torch.randn(b, p, e, generator=torch.Generator().manual_seed(67), dtype=torch.float64)
    grads = []
    for run in ("scan", "closed_form"):
        leaves = [t.clone().requires_grad_(True) for t in (*tensors, z)]
        x, delta, A, B, C, D, h0, zz = leaves
        if run == "scan":
            y = selective_scan(x, delta, A, B, C, D, initial_state=h0, z=zz, backend=backend).y
        else:
            y = _gated(closed_form(x, delta, A, B, C, D, h0=h0)[0], zz)
        (y * weight).sum().backward()
        grads.append([t.grad for t in leaves])
    for name, a, b_ in zip("x delta A B C D h0 z".split(), *grads):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-9, msg=name)


def test_scan_gate_shape_error_names_z():
    x, delta, A, B, C, D, _ = make_inputs(2, 5, 3, 2)
    with pytest.raises(ValueError, match=r"\bz\b"):
        selective_scan(x, delta, A, B, C, D, z=torch.zeros(2, 5, 4))


# ----------------------------------------------------------------------------- shape errors
@pytest.mark.parametrize(
    "name,bad",
    [
        ("delta", lambda t: {**t, "delta": t["delta"][:, :-1]}),
        ("A", lambda t: {**t, "A": t["A"][:-1]}),
        ("B", lambda t: {**t, "B": t["B"][..., :-1]}),
        ("C", lambda t: {**t, "C": t["C"][:1]}),
        ("D", lambda t: {**t, "D": t["D"][:-1]}),
        ("initial_state", lambda t: {**t, "initial_state": t["initial_state"][..., :-1]}),
        ("ssm_mask", lambda t: {**t, "ssm_mask": torch.ones(2, 1, 5, 4)}),
    ],
)
def test_scan_shape_errors_name_the_argument(name, bad):
    x, delta, A, B, C, D, h0 = make_inputs(2, 5, 3, 2)
    kwargs = bad(dict(x=x, delta=delta, A=A, B=B, C=C, D=D, initial_state=h0))
    with pytest.raises(ValueError, match=name):
        selective_scan(**kwargs)


def test_scan_shape_error_names_x():
    x, delta, A, B, C, D, _ = make_inputs(2, 5, 3, 2)
    with pytest.raises(ValueError, match=r"\bx\b"):
        selective_scan(x[0], delta, A, B, C, D)


def test_scan_shape_error_names_state_override():
    x, delta, A, B, C, D, _ = make_inputs(2, 5, 3, 2)
    bad = StateOverride(values=torch.zeros(2, 4, 3, 2), mask=torch.ones(2, 4, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="state_override"):
        selective_scan(x, delta, A, B, C, D, state_override=bad, backend="reference")


# ----------------------------------------------------------------------------- causal conv
def conv_taps(x, weight, bias=None, history=None):
    """out[t, c] = bias[c] + Σ_i w[c, i] · x_ext[t + i, c], x_ext = history (k-1 inputs) ++ x."""
    b, p, c = x.shape
    w = weight.reshape(c, -1).double()
    k = w.shape[1]
    hist = torch.zeros(b, k - 1, c, dtype=torch.float64) if history is None else history.double().transpose(1, 2)
    x_ext = torch.cat([hist, x.double()], dim=1)  # [b, k-1+p, c]
    out = torch.zeros(b, p, c, dtype=torch.float64)
    for t in range(p):
        for i in range(k):
            out[:, t] += w[:, i] * x_ext[:, t + i]
    if bias is not None:
        out += bias.double()
    return out


@pytest.mark.parametrize("p", [1, 2, 9])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("weight_2d", [True, False])
@pytest.mark.parametrize("implementation", CONV_IMPLEMENTATIONS)
def test_causal_conv1d_matches_taps(p, with_bias, with_state, weight_2d, implementation):
    b, c, k = 2, 5, 4
    g = torch.Generator().manual_seed(p)
    x = torch.randn(b, p, c, generator=g)
    weight = torch.randn(c, 1, k, generator=g)
    bias = torch.randn(c, generator=g) if with_bias else None
    history = torch.randn(b, c, k - 1, generator=g) if with_state else None
    out, final = causal_conv1d(x, weight[:, 0] if weight_2d else weight, bias, history, implementation=implementation)
    assert out.shape == (b, p, c) and final.shape == (b, c, k - 1)
    torch.testing.assert_close(out.double(), conv_taps(x, weight, bias, history), **TOL)
    # the final state is the last k-1 inputs (reaching into the history when p < k-1)
    hist = torch.zeros(b, c, k - 1) if history is None else history
    expected_final = torch.cat([hist, x.transpose(1, 2)], dim=-1)[..., -(k - 1):]
    assert torch.equal(final, expected_final)


@pytest.mark.parametrize("implementation", ["taps", "conv1d"])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_conv_state_continues_the_convolution(implementation, k):
    """The conv state returned is the last k - 1 inputs (none for k = 1), and a second call from
    it continues the convolution. Reference: :func:`conv_taps`, a float64 loop over the taps."""
    gen = torch.Generator().manual_seed(k)
    b, p, c, split = 2, 9, 5, 4
    x = torch.randn(b, p, c, generator=gen, dtype=torch.float64)
    w = torch.randn(c, 1, k, generator=gen, dtype=torch.float64)
    bias = torch.randn(c, generator=gen, dtype=torch.float64)
    first, state = causal_conv1d(x[:, :split], w, bias, implementation=implementation)
    assert tuple(state.shape) == (b, c, k - 1)
    torch.testing.assert_close(state, x[:, split - (k - 1):split].transpose(1, 2) if k > 1 else x.new_zeros(b, c, 0))
    second, final = causal_conv1d(x[:, split:], w, bias, initial_state=state, implementation=implementation)
    assert tuple(final.shape) == (b, c, k - 1)
    torch.testing.assert_close(torch.cat([first, second], dim=1), conv_taps(x, w, bias))


@pytest.mark.parametrize("implementation", CONV_IMPLEMENTATIONS)
def test_causal_conv1d_is_causal(implementation):
    b, p, c, k = 1, 8, 3, 4
    x = torch.randn(b, p, c)
    weight = torch.randn(c, 1, k)
    out, _ = causal_conv1d(x, weight, implementation=implementation)
    x2 = x.clone()
    x2[:, 5] += 10.0
    out2, _ = causal_conv1d(x2, weight, implementation=implementation)
    assert torch.equal(out[:, :5], out2[:, :5])
    assert (out[:, 5:] - out2[:, 5:]).abs().min() > 0


@pytest.mark.parametrize("split", [1, 2, 5])
@pytest.mark.parametrize("implementation", CONV_IMPLEMENTATIONS)
def test_causal_conv1d_chaining_equals_one_call(split, implementation):
    b, p, c, k = 2, 7, 4, 3
    g = torch.Generator().manual_seed(split)
    x = torch.randn(b, p, c, generator=g)
    weight, bias = torch.randn(c, 1, k, generator=g), torch.randn(c, generator=g)
    whole, whole_final = causal_conv1d(x, weight, bias, implementation=implementation)
    first, state = causal_conv1d(x[:, :split], weight, bias, implementation=implementation)
    second, final = causal_conv1d(x[:, split:], weight, bias, state, implementation=implementation)
    torch.testing.assert_close(torch.cat([first, second], dim=1), whole, atol=1e-6, rtol=0)
    assert torch.equal(final, whole_final)


def test_causal_conv1d_errors():
    x = torch.randn(2, 5, 4)
    with pytest.raises(ValueError, match="channels"):
        causal_conv1d(x, torch.randn(3, 1, 3))
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, torch.randn(4, 1, 3), None, torch.randn(2, 4, 3))
    with pytest.raises(ValueError, match="implementation"):
        causal_conv1d(x, torch.randn(4, 1, 3), implementation="fft")


@pytest.mark.parametrize("implementation", CONV_IMPLEMENTATIONS)
@pytest.mark.parametrize("p", [1, 2, 9])  # shorter than, equal to and longer than the k-1 history
def test_causal_conv1d_gradients_match_taps_reference(implementation, p):
    """Gradients of x, weight, bias and the initial state, against autograd through the
    explicit float64 sum over taps; then a float64 gradcheck of the implementation itself."""
    b, c, k = 2, 5, 4
    g = torch.Generator().manual_seed(40 + p)
    tensors = (torch.randn(b, p, c, generator=g), torch.randn(c, 1, k, generator=g), torch.randn(c, generator=g),
               torch.randn(b, c, k - 1, generator=g))
    grad_out = torch.randn(b, p, c, generator=g, dtype=torch.float64)
    got_inputs = [t.clone().requires_grad_() for t in tensors]
    want_inputs = [t.double().requires_grad_() for t in tensors]
    out, _ = causal_conv1d(*got_inputs, implementation=implementation)
    got = torch.autograd.grad((out.double() * grad_out).sum(), got_inputs)
    want = torch.autograd.grad((conv_taps(*want_inputs) * grad_out).sum(), want_inputs)
    for name, a, w in zip(("x", "weight", "bias", "initial_state"), got, want):
        assert w.abs().sum() > 0
        torch.testing.assert_close(a.double(), w, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad of {name}: {m}")
    double_inputs = tuple(t.double().requires_grad_() for t in tensors)
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d(*a, implementation=implementation)[0], double_inputs)


def test_causal_conv1d_taps_bf16_accumulates_in_fp32():
    """bf16 inputs: the taps are summed in fp32 and the result rounded once."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 33, 6, generator=g).bfloat16()
    weight = torch.randn(6, 1, 4, generator=g).bfloat16()
    out, final = causal_conv1d(x, weight, implementation="taps")
    assert out.dtype == final.dtype == torch.bfloat16
    want = conv_taps(x.double(), weight.double()).to(torch.bfloat16)  # exact sum, rounded once
    torch.testing.assert_close(out, want, atol=0, rtol=0)


# ----------------------------------------------------------------------------- backend selection
@pytest.fixture
def no_env_backend(monkeypatch):
    monkeypatch.delenv("TL_MAMBA_BACKEND", raising=False)


def _model():
    return HookedMamba(tiny_config())


def test_default_backend_is_auto(no_env_backend):
    model = _model()
    assert model.backend == "auto"
    assert resolve_backend("auto", "cpu") == "torch"  # auto runs the torch path off CUDA


def test_set_backend_returns_model_and_sets_name(no_env_backend):
    model = _model()
    assert model.set_backend("reference") is model
    assert model.backend == "reference"
    model.set_backend("torch")
    assert model.backend == "torch"


def test_triton_backend_needs_cuda_or_the_interpreter(no_env_backend, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = _model()
    with pytest.raises(BackendUnavailableError, match="needs CUDA"):
        model.set_backend("triton")
    assert model.backend == "auto"  # unchanged after the failed call
    x, delta, A, B, C, D, _ = make_inputs(1, 3, 2, 2)
    with pytest.raises(BackendUnavailableError, match="needs CUDA"):
        selective_scan(x, delta, A, B, C, D, backend="triton")
    from tl_mamba.backends import resolve_backend

    with pytest.raises(BackendUnavailableError, match="no Triton kernel"):
        resolve_backend("triton", "cpu", available=("reference", "torch"))
    # chosen by the environment variable: the error says so, and how to undo it
    monkeypatch.setenv("TL_MAMBA_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match=r"\(TL_MAMBA_BACKEND is set to triton\).*unset TL_MAMBA_BACKEND"):
        model(torch.zeros(1, 3, dtype=torch.long))


def test_unknown_backend_names_the_choices(no_env_backend):
    model = _model()
    with pytest.raises(ValueError) as info:
        model.set_backend("cuda")
    message = str(info.value)
    assert "cuda" in message
    for choice in ("auto", "torch", "triton", "reference"):
        assert choice in message
    x, delta, A, B, C, D, _ = make_inputs(1, 3, 2, 2)
    with pytest.raises(ValueError, match="reference"):
        selective_scan(x, delta, A, B, C, D, backend="fast")


def test_env_var_sets_default_backend(monkeypatch):
    scan_module = importlib.import_module("tl_mamba.ops.selective_scan")  # the package, not the function

    monkeypatch.setenv("TL_MAMBA_BACKEND", "reference")
    model = _model()
    assert model.backend == "reference"
    # the env var really routes the scans: count calls into each implementation
    calls = {"reference": 0, "torch": 0}
    for name, impl in list(scan_module._IMPLEMENTATIONS.items()):
        def spy(*args, _impl=impl, _name=name, **kwargs):
            calls[_name] += 1
            return _impl(*args, **kwargs)

        monkeypatch.setitem(scan_module._IMPLEMENTATIONS, name, spy)
    model(torch.zeros(1, 4, dtype=torch.long))
    assert calls == {"reference": model.cfg.n_layers, "torch": 0}
    model.set_backend("torch")  # an explicit choice overrides the env var
    model(torch.zeros(1, 4, dtype=torch.long))
    assert calls == {"reference": model.cfg.n_layers, "torch": model.cfg.n_layers}
    monkeypatch.setenv("TL_MAMBA_BACKEND", "Torch")  # case-insensitive
    assert _model().backend == "torch"


def test_env_var_sets_the_mamba2_default_backend(monkeypatch):
    """TL_MAMBA_BACKEND routes HookedMamba2's SSD scans too (counted at the implementations)."""
    from tl_mamba import HookedMamba2

    ssd_module = importlib.import_module("tl_mamba.ops.ssd")
    calls = {"reference": 0, "torch": 0}
    for attr, name in (("ssd_reference", "reference"), ("ssd_chunked", "torch")):
        def spy(*args, _impl=getattr(ssd_module, attr), _name=name, **kwargs):
            calls[_name] += 1
            return _impl(*args, **kwargs)

        monkeypatch.setattr(ssd_module, attr, spy)
    monkeypatch.setenv("TL_MAMBA_BACKEND", "reference")
    model = HookedMamba2(tiny_config(family="mamba2", d_head=8, chunk_size=4))
    assert model.backend == "reference"
    model(torch.zeros(1, 6, dtype=torch.long))
    assert calls == {"reference": model.cfg.n_layers, "torch": 0}
    monkeypatch.setenv("TL_MAMBA_BACKEND", "torch")
    model(torch.zeros(1, 6, dtype=torch.long))  # the env var is read at each forward until set_backend
    assert calls == {"reference": model.cfg.n_layers, "torch": model.cfg.n_layers}


def test_bad_env_var_errors(monkeypatch):
    monkeypatch.setenv("TL_MAMBA_BACKEND", "warp-drive")
    model = _model()
    with pytest.raises(ValueError, match="TL_MAMBA_BACKEND"):
        model.backend
    with pytest.raises(ValueError, match="warp-drive"):
        model(torch.zeros(1, 4, dtype=torch.long))
    model.set_backend("reference")  # an explicit choice does not read the env var
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, model.cfg.d_vocab)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fractional_mask_keeps_that_share_of_the_edge(backend):
    """By linearity, a mask value m keeps m·α[i,j]·x_j: halfway between keeping and removing it."""
    x, delta, A, B, C, D, _ = make_inputs(2, 9, 3, 2, seed=11)
    keep, cut, half = (torch.ones(2, 1, 9, 9) for _ in range(3))
    cut[:, 0, 7, 2] = 0
    half[:, 0, 7, 2] = 0.5
    y_keep, y_cut, y_half = (selective_scan(x, delta, A, B, C, D, ssm_mask=m, backend=backend).y for m in (keep, cut, half))
    assert (y_keep - y_cut).abs().max() > 1e-4  # the edge matters
    torch.testing.assert_close(y_half, (y_keep + y_cut) / 2, atol=1e-6, rtol=1e-5)


def _triton_errors():
    # what a kernel raises where it fails on a GPU: a RuntimeError, or Triton's own errors, which
    # derive from Exception only (a launch past the shared memory, ptxas refusing the PTX)
    pytest.importorskip("triton")
    from triton.runtime import errors

    ptxas = getattr(errors, "PTXASError", RuntimeError)  # (older Tritons have no PTXASError)
    return [RuntimeError("PTX compilation failed"), errors.OutOfResources(163840, 101376, "shared memory"),
            ptxas("ptxas fatal: Unsupported .version 9.0")]


@pytest.mark.parametrize("error", range(3))
def test_auto_picks_triton_on_cuda_and_falls_back_with_a_warning(no_env_backend, monkeypatch, error):
    """The contract: "auto" is Triton on CUDA. A kernel that fails there (never compiled on
    that GPU, say) warns once and the torch path takes over; "triton" named explicitly raises."""
    from tl_mamba import backends

    monkeypatch.setattr(backends, "_TRITON_FAILED", None)
    failure = _triton_errors()[error]
    assert resolve_backend("auto", "cuda", available=("reference", "torch", "triton")) == "triton"
    assert resolve_backend("auto", "cuda", available=("reference", "torch")) == "torch"

    def broken(*args, **kwargs):
        raise failure

    impls = {"reference": lambda: "reference", "torch": lambda: "torch", "triton": broken}
    with pytest.warns(RuntimeWarning, match=type(failure).__name__):
        assert backends.pick_implementation("auto", "cuda", impls)() == "torch"
    assert resolve_backend("auto", "cuda", available=tuple(impls)) == "torch"  # remembered
    with pytest.raises(type(failure)):
        backends.pick_implementation("triton", "cuda", impls)()


def test_auto_keeps_triton_after_an_error_that_is_not_the_kernels(no_env_backend, monkeypatch):
    """Out of GPU memory, or an error the torch path raises as well (bad input), is raised under
    "auto" and leaves Triton in use: only a failure of the kernel itself switches to torch."""
    from tl_mamba import backends

    monkeypatch.setattr(backends, "_TRITON_FAILED", None)
    pytest.importorskip("triton")

    def out_of_memory(*args, **kwargs):
        raise OUT_OF_MEMORY("CUDA out of memory. Tried to allocate 8.00 GiB")

    def bad_input(*args, **kwargs):
        raise ValueError("x must be [b, p, e]")

    for triton_error, torch_path, raised in [(out_of_memory, lambda: "torch", OUT_OF_MEMORY),
                                            (bad_input, bad_input, ValueError)]:
        impls = {"reference": lambda: "reference", "torch": torch_path, "triton": triton_error}
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(raised):
                backends.pick_implementation("auto", "cuda", impls)()
        assert backends._TRITON_FAILED is None
        assert resolve_backend("auto", "cuda", available=tuple(impls)) == "triton"


# ----------------------------------------------------------------------------- kernel fallback
def test_a_kernel_failing_on_a_gpu_falls_back_once_with_a_warning(monkeypatch):
    """The faster Triton kernels fall back to their simpler path where they fail on a GPU:
    one RuntimeWarning naming the error, no retry afterwards; off CUDA the error propagates."""
    from tl_mamba.ops import triton_scan

    monkeypatch.setattr(triton_scan, "_FAILED_KERNELS", {})
    calls = []

    def broken():
        calls.append("kernel")
        raise RuntimeError("out of resource: shared memory")

    def fallback():
        calls.append("fallback")
        return 7

    with pytest.warns(RuntimeWarning, match="test kernel failed.*shared memory.*the simple path"):
        assert triton_scan.kernel_or_fallback("test kernel", torch.device("cuda"), broken, fallback,
                                              "the simple path") == 7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert triton_scan.kernel_or_fallback("test kernel", torch.device("cuda"), broken, fallback,
                                              "the simple path") == 7
    assert calls == ["kernel", "fallback", "fallback"]
    with pytest.raises(RuntimeError, match="shared memory"):
        triton_scan.kernel_or_fallback("another kernel", torch.device("cpu"), broken, fallback, "the simple path")

    def out_of_memory():
        raise OUT_OF_MEMORY("CUDA out of memory")

    with pytest.raises(OUT_OF_MEMORY):  # the input's size, not the kernel: not remembered
        triton_scan.kernel_or_fallback("a third kernel", torch.device("cuda"), out_of_memory, fallback, "the simple path")
    assert "a third kernel" not in triton_scan._FAILED_KERNELS


@pytest.mark.parametrize("decay_shape", ["full", "per_head"])  # Mamba-1's [e, n] decay; Mamba-2's per head
def test_linear_recurrence_gradients_match_autograd_through_the_loop(decay_shape):
    """The gradient-routing recurrence of hook_h (hand-written backward) against autograd through a
    plain float64 loop, for a decay that broadcasts (Mamba-2: one value per head) or not."""
    from tl_mamba.ops.state_override import linear_recurrence

    g = torch.Generator().manual_seed(41)
    b, p, state = 2, 13, (3, 2, 4)
    write = torch.randn(b, p, *state, generator=g, dtype=torch.float64)
    decay = torch.rand((b, p, *state) if decay_shape == "full" else (b, p, 3, 1, 1), generator=g, dtype=torch.float64)
    upstream = torch.randn(b, p, *state, generator=g, dtype=torch.float64)

    def loop(decay, write):
        h, out = torch.zeros_like(write[:, 0]), []
        for t in range(p):
            h = decay[:, t] * h + write[:, t]
            out.append(h)
        return torch.stack(out, dim=1)

    for decay_grad in (True, False):  # the hook_h route passes a decay without grad
        results = []
        for fn in (linear_recurrence, loop):
            leaves = [decay.clone().requires_grad_(decay_grad), write.clone().requires_grad_()]
            out = fn(*leaves)
            results.append((out, *torch.autograd.grad((out * upstream).sum(), [t for t in leaves if t.requires_grad])))
        assert len(results[0]) == (3 if decay_grad else 2)
        for got, want in zip(*results):
            assert got.shape == want.shape and want.abs().sum() > 0
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert linear_recurrence(decay[:, :0], write[:, :0]).shape == (b, 0, *state)


def test_dense_mask_under_autograd_is_served_by_the_scans(monkeypatch):
    """Under autograd Mamba-1's quadratic form would keep a copy of its carried columns per block,
    so with inputs that need gradients a dense mask is still served by the scans (even with the
    switch forced to 0 patterns), and the gradients are those of the closed form."""
    from tl_mamba.ops import knockout

    monkeypatch.setattr(knockout, "DENSE_MASK_AFTER", 0)
    scan_module = sys.modules["tl_mamba.ops.selective_scan"]
    monkeypatch.setattr(scan_module, "dense_removed_terms_bpe", lambda *a, **k: pytest.fail("quadratic form used"))
    b, p, e, n = 2, 11, 3, 2
    inputs = make_inputs(b, p, e, n, seed=55, dtype=torch.float64, requires_grad=True)
    x, delta, A, B, C, D, h0 = inputs
    mask = _random_mask(b, p, seed=56).double() * torch.ones(p, p, dtype=torch.float64).tril()
    upstream = torch.randn(b, p, e, generator=torch.Generator().manual_seed(57), dtype=torch.float64)
    out = selective_scan(x, delta, A, B, C, D, initial_state=h0, ssm_mask=mask, backend="torch")
    got = torch.autograd.grad((out.y * upstream).sum(), inputs)
    y_ref, _, _ = closed_form(x, delta, A, B, C, D, h0, mask=mask)
    want = torch.autograd.grad((y_ref * upstream).sum(), inputs)
    torch.testing.assert_close(out.y, y_ref, rtol=1e-9, atol=1e-9)
    for name, a, w in zip(("x", "delta", "A", "B", "C", "D", "initial_state"), got, want):
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9, msg=lambda m: f"grad of {name}: {m}")


def test_torch_backend_backward_of_an_empty_sequence():
    """p = 0 under autograd: the backward has no chunk to walk, and the initial state's gradient
    is zero (only y, which is empty, enters the loss) or the final state's gradient."""
    x, delta, A, B, C, D, h0 = make_inputs(2, 0, 3, 4, seed=58, dtype=torch.float64, requires_grad=True)
    out = selective_scan(x, delta, A, B, C, D, initial_state=h0, backend="torch")
    assert out.y.shape == (2, 0, 3)
    (grad_h0,) = torch.autograd.grad(out.y.sum(), [h0], allow_unused=True, retain_graph=True)
    assert grad_h0 is None or not grad_h0.any()
    upstream = torch.randn(2, 3, 4, dtype=torch.float64)
    (grad_h0,) = torch.autograd.grad((out.final_state * upstream).sum(), [h0])
    torch.testing.assert_close(grad_h0, upstream)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_ops_refuse_overlapping_removals(family):
    """Called directly, the scans refuse what the models never pass them: two EdgeRemovals
    sharing an edge (each removal's terms are subtracted on their own, so the edge would go
    twice). (A state override with a knockout composes: tests/test_knockout_with_state_edits.py.)"""
    from tl_mamba.ops.knockout import EdgeRemoval
    from tl_mamba.ops.ssd import ssd_scan

    g = torch.Generator().manual_seed(0)
    b, p = 2, 9
    if family == "mamba1":
        e, n = 3, 2
        args = (torch.randn(b, p, e, generator=g), F.softplus(torch.randn(b, p, e, generator=g)),
                -torch.rand(e, n, generator=g), torch.randn(b, p, n, generator=g), torch.randn(b, p, n, generator=g))
        scan = selective_scan
    else:
        h, hd, n = 2, 2, 3
        args = (torch.randn(b, p, h, hd, generator=g), F.softplus(torch.randn(b, p, h, generator=g)),
                -torch.rand(h, generator=g), torch.randn(b, p, 1, n, generator=g), torch.randn(b, p, 1, n, generator=g))
        scan = ssd_scan
    sources = torch.zeros(b, p, dtype=torch.bool)
    sources[:, 2] = True
    targets = torch.zeros(b, p, dtype=torch.bool)
    targets[:, 7] = True
    removal = EdgeRemoval(sources=sources, targets=targets)
    with pytest.raises(ValueError, match="removed twice"):
        scan(*args, ssm_mask=[removal, removal], backend="torch")
    later = torch.zeros(b, p, dtype=torch.bool)
    later[:, 8] = True
    scan(*args, ssm_mask=[removal, EdgeRemoval(sources=sources, targets=later)], backend="torch")  # disjoint: fine


@pytest.mark.parametrize("positions", [[2, 5], list(range(1, 11))])
def test_state_override_gradients_match_autograd_through_the_scalar_loop(positions):
    """Gradients of y and the final state through an override, in the inputs and the edited
    values: by segments (2 positions) and by the masked recurrence (10 positions)."""
    b, p, e, n = 2, 11, 3, 2
    tensors = make_inputs(b, p, e, n, seed=71, dtype=torch.float64)
    values, mask = _override(b, p, e, n, positions, seed=72)
    g = torch.Generator().manual_seed(73)
    gy, gh = torch.randn(b, p, e, generator=g, dtype=torch.float64), torch.randn(b, e, n, generator=g, dtype=torch.float64)
    grads = []
    for run in ("scan", "loop"):
        leaves = [t.clone().requires_grad_(True) for t in (*tensors, values.double())]
        x, delta, A, B, C, D, h0, v = leaves
        if run == "scan":
            out = selective_scan(x, delta, A, B, C, D, initial_state=h0, backend="torch",
                                 state_override=StateOverride(values=v, mask=mask))
            y, final = out.y, out.final_state
        else:
            h, ys = h0, []  # the recurrence as a loop of tensor ops, differentiable by autograd
            for t in range(p):
                h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]
                h = torch.where(mask[:, t], v[:, t], h)
                ys.append(torch.einsum("ben,bn->be", h, C[:, t]) + D * x[:, t])
            y, final = torch.stack(ys, 1), h
        grads.append(torch.autograd.grad((y * gy).sum() + (final * gh).sum(), leaves))
    for name, a, w in zip("x delta A B C D h0 values".split(), *grads):
        assert w.abs().sum() > 0, name
        torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9, msg=name)


def test_zero_subnormals_zeroes_only_what_would_go_subnormal():
    """The backward loops zero adjoint entries below finfo.tiny * FLUSH_BELOW (subnormal arithmetic
    is slow on a CPU), and within a batch row never above 2^-48 of its largest entry; everything
    else stays as it was, bit for bit. 16-bit floats are left alone."""
    from tl_mamba.ops.precision import FLUSH_BELOW, zero_subnormals_

    for dtype in (torch.float32, torch.float64):
        bound = torch.finfo(dtype).tiny * FLUSH_BELOW
        row = [1e-40 if dtype == torch.float32 else 1e-310, -bound / 2, bound * 2, -1e-20, 1.0, 0.0]
        t = torch.tensor([row, [v * 1e-20 for v in row]], dtype=dtype)  # row 1: a metric scaled down
        kept = t.clone()
        zero_subnormals_(t)
        assert t[0, :2].eq(0).all() and torch.equal(t[0, 2:], kept[0, 2:])
        # row 1's largest entry is 1e-20: its bound is at most 2^-48 of that
        small = kept[1].abs() < min(bound, 1e-20 * 2.0 ** -48)
        assert torch.equal(t[1][~small], kept[1][~small]) and t[1][small].eq(0).all()
    half = torch.tensor([[1.0, 100.0, 1e-7]], dtype=torch.float16)
    assert torch.equal(zero_subnormals_(half.clone()), half)


@pytest.mark.parametrize("route", ["mamba1 scan", "adjoint recurrence"])
def test_gradients_with_a_last_token_loss_over_a_long_decay(route):
    """A loss on the last position only, with decays that take the adjoint through the subnormal
    range: the backward (which zeroes what would go subnormal) matches float64 autograd through a
    sequential reference, position by position to 1e-3 relative wherever the reference gradient
    is above 1e-25, and it scales with the loss: a loss times 1e-30 gives gradients times 1e-30
    wherever they stay normal float32 numbers (an absolute bound of 2e-31 would zero them all)."""
    from tl_mamba.ops.state_override import linear_recurrence

    g = torch.Generator().manual_seed(0)
    b, p, e, n = 2, 300, 8, 4
    x = torch.randn(b, p, e, generator=g)
    delta = torch.rand(b, p, e, generator=g) * 0.5 + 0.2
    A = -(torch.rand(e, n, generator=g) + 1.0)  # decays exp(ΔA) ≤ e^-0.2: the adjoint falls below 1e-38
    B, C = torch.randn(b, p, n, generator=g), torch.randn(b, p, n, generator=g)
    decay, write = torch.exp(delta[..., None] * A), (delta * x)[..., None] * B[:, :, None]  # [b, p, e, n]

    def gradient(dtype, scale, ours):
        if route == "mamba1 scan":
            inputs = [t.detach().to(dtype).clone().requires_grad_(True) for t in (x, delta, A, B, C)]
            out = selective_scan(*inputs, backend="torch" if ours else "reference").y[:, -1]
        else:
            inputs = [write.detach().to(dtype).clone().requires_grad_(True)]
            d = decay.to(dtype)
            if ours:
                states = linear_recurrence(d, inputs[0])
            else:  # a plain loop, differentiated by autograd
                h, states = torch.zeros_like(inputs[0][:, 0]), []
                for t in range(p):
                    h = d[:, t] * h + inputs[0][:, t]
                    states.append(h)
                states = torch.stack(states, 1)
            out = (states[:, -1] * C.to(dtype)[:, -1, None]).sum(-1)
        (out.sum() * scale).backward()
        return inputs[0].grad  # [b, p, ...]: the gradient of each position's input

    ref = gradient(torch.float64, 1.0, ours=False)
    ours = gradient(torch.float32, 1.0, ours=True).double()
    big = ref.abs() > 1e-25
    assert big[:, :50].sum() == 0 and big[:, -50:].all()  # the early positions' gradients underflow
    torch.testing.assert_close(ours[big], ref[big], rtol=1e-3, atol=0)
    assert ours[~big].abs().max() < 1e-20
    scaled = gradient(torch.float32, 1e-30, ours=True).double() / 1e-30
    normal = ref.abs() > 1e-7  # times 1e-30, still above float32's smallest normal (1.2e-38)
    assert normal.sum() > 100
    torch.testing.assert_close(scaled[normal], ref[normal], rtol=1e-3, atol=0)

