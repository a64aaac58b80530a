"""The Triton selective-scan kernel against the sequential reference.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set in ``conftest.py`` before anything imports triton), so shapes stay small. Hooks,
knockouts and state overrides are applied by the dispatcher with nothing but the
kernel's initial/final state, and are checked end to end through a model.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)

from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig, Knockout  # noqa: E402
from tl_mamba.ops.selective_scan import selective_scan  # noqa: E402
from tl_mamba.ops.ssd import ssd_scan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(b=2, p=7, e=12, n=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p, e, generator=g)
    delta = torch.rand(b, p, e, generator=g) * 0.5 + 0.05
    A = -torch.rand(e, n, generator=g) * 2 - 0.1
    B = torch.randn(b, p, n, generator=g)
    C = torch.randn(b, p, n, generator=g)
    D = torch.randn(e, generator=g)
    h0 = torch.randn(b, e, n, generator=g)
    return [t.to(DEVICE, dtype) for t in (x, delta, A, B, C, D, h0)]


@pytest.mark.parametrize("with_d, with_h0, states", [(True, True, True), (False, False, False), (True, False, True)])
def test_forward_matches_reference(with_d, with_h0, states):
    x, delta, A, B, C, D, h0 = inputs()
    kw = dict(initial_state=h0 if with_h0 else None, return_states=states)
    ours = selective_scan(x, delta, A, B, C, D if with_d else None, backend="triton", **kw)
    ref = selective_scan(x, delta, A, B, C, D if with_d else None, backend="reference", **kw)
    torch.testing.assert_close(ours.y, ref.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.final_state, ref.final_state, rtol=1e-5, atol=1e-5)
    if states:
        torch.testing.assert_close(ours.states, ref.states, rtol=1e-5, atol=1e-5)
    else:
        assert ours.states is None


@pytest.mark.parametrize("p, e, n, block_e", [(1, 3, 1, None), (13, 20, 16, 4), (5, 7, 3, 2)])
def test_odd_shapes_and_channel_blocks(p, e, n, block_e):
    from tl_mamba.ops.selective_scan.triton_kernel import _forward

    x, delta, A, B, C, D, h0 = inputs(b=1, p=p, e=e, n=n, seed=p)
    y, final, states = _forward(x, delta, A, B, C, D, h0, True, block_e=block_e)
    ref = selective_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="reference")
    torch.testing.assert_close(y, ref.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, ref.final_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states, ref.states, rtol=1e-5, atol=1e-5)


def test_bf16_inputs_accumulate_in_fp32():
    x, delta, A, B, C, D, _ = inputs(dtype=torch.bfloat16)
    ours = selective_scan(x, delta, A, B, C, D, backend="triton")
    ref = selective_scan(x, delta, A, B, C, D, backend="reference")  # upcasts to fp32 too
    assert ours.y.dtype == torch.float32
    torch.testing.assert_close(ours.y, ref.y, rtol=1e-5, atol=1e-5)


def test_gradients_match_reference_autograd():
    tensors = inputs()
    leaves_t = [t.clone().requires_grad_(True) for t in tensors]
    leaves_r = [t.clone().requires_grad_(True) for t in tensors]
    weight = torch.randn(2, 7, 12, device=DEVICE)
    final_weight = torch.randn(2, 12, 5, device=DEVICE)
    for leaves, backend in ((leaves_t, "triton"), (leaves_r, "reference")):
        x, delta, A, B, C, D, h0 = leaves
        out = selective_scan(x, delta, A, B, C, D, initial_state=h0, backend=backend)
        ((out.y * weight).sum() + (out.final_state * final_weight).sum()).backward()
    for name, a, b in zip("x delta A B C D h0".split(), leaves_t, leaves_r):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)


def ssd_inputs(b=2, p=7, h=4, hd=6, g=2, n=5, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, p, h, hd, generator=gen)
    delta = torch.rand(b, p, h, generator=gen) * 0.5 + 0.05
    A = -torch.rand(h, generator=gen) * 2 - 0.1
    B = torch.randn(b, p, g, n, generator=gen)
    C = torch.randn(b, p, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    h0 = torch.randn(b, h, hd, n, generator=gen)
    return [t.to(DEVICE, dtype) for t in (x, delta, A, B, C, D, h0)]


@pytest.mark.parametrize("with_d, with_h0, states", [(True, True, True), (False, False, False)])
def test_ssd_forward_matches_reference(with_d, with_h0, states):
    x, delta, A, B, C, D, h0 = ssd_inputs()
    kw = dict(initial_state=h0 if with_h0 else None, return_states=states)
    ours = ssd_scan(x, delta, A, B, C, D if with_d else None, backend="triton", **kw)
    ref = ssd_scan(x, delta, A, B, C, D if with_d else None, backend="reference", **kw)
    torch.testing.assert_close(ours.y, ref.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.final_state, ref.final_state, rtol=1e-5, atol=1e-5)
    if states:
        torch.testing.assert_close(ours.states, ref.states, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p, h, hd, g, n, block_hd", [(1, 1, 3, 1, 1, None), (9, 4, 10, 1, 16, 4), (5, 6, 3, 3, 7, 2)])
def test_ssd_odd_shapes_and_blocks(p, h, hd, g, n, block_hd):
    from tl_mamba.ops.ssd.triton_kernel import _forward

    x, delta, A, B, C, D, h0 = ssd_inputs(b=1, p=p, h=h, hd=hd, g=g, n=n, seed=p)
    y, final, states = _forward(x, delta, A, B, C, D, h0, True, block_hd=block_hd)
    ref = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="reference")
    torch.testing.assert_close(y, ref.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, ref.final_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states, ref.states, rtol=1e-5, atol=1e-5)


def test_ssd_bf16_and_gradients():
    x, delta, A, B, C, D, _ = ssd_inputs(dtype=torch.bfloat16)
    torch.testing.assert_close(ssd_scan(x, delta, A, B, C, D, backend="triton").y,
                               ssd_scan(x, delta, A, B, C, D, backend="reference").y, rtol=1e-5, atol=1e-5)
    tensors = ssd_inputs()
    leaves = {name: [t.clone().requires_grad_(True) for t in tensors] for name in ("triton", "reference")}
    weight = torch.randn(2, 7, 4, 6, device=DEVICE)
    for backend, (x, delta, A, B, C, D, h0) in leaves.items():
        out = ssd_scan(x, delta, A, B, C, D, initial_state=h0, backend=backend)
        ((out.y * weight).sum() + out.final_state.pow(2).sum()).backward()
    for name, a, b in zip("x delta A B C D h0".split(), leaves["triton"], leaves["reference"]):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=name)


def _model(family="mamba1"):
    if family == "mamba1":
        cfg = HookedMambaConfig(n_layers=2, d_model=8, d_vocab=30, d_state=4, expand=2, seed=0)
        model = HookedMamba(cfg).to(DEVICE)
    else:
        cfg = HookedMambaConfig(family="mamba2", n_layers=2, d_model=8, d_vocab=30, d_state=4, expand=2,
                                n_heads=4, n_groups=2, seed=0)
        model = HookedMamba2(cfg).to(DEVICE)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_model_hooks_knockout_and_state_edits_through_triton(family):
    model = _model(family)
    tokens = torch.randint(0, 30, (2, 6), device=DEVICE)
    ko = Knockout(layers=[0, 1], sources=[1, 2], targets=[-1], path="both")

    def edit(h, hook):
        h[:, 2] = 0.5
        return h

    results = {}
    for backend in ("reference", "triton"):
        model.set_backend(backend)
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_h"))
            results[backend] = (
                logits,
                cache["blocks.1.hook_h"],
                model.run_with_knockout(tokens, ko),
                model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_h", edit)]),
                model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False),
            )
    for a, b in zip(results["triton"], results["reference"]):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(a, b)
