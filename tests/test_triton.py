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


def test_ssd_recurrent_kernel_reads_each_heads_group():
    """The recurrent kernel (the forward under autograd when the backward chunk is not a
    multiple of the chunked kernels' Q) reads B and C of head i's group, i // (h / g): 4 heads
    in 2 groups, against the sequential reference."""
    from tl_mamba.ops.ssd.triton_kernel import ssd_triton

    x, delta, A, B, C, D, _ = ssd_inputs(b=1, p=70, h=4, hd=3, g=2, n=5)
    ref = ssd_scan(x, delta, A, B, C, D, backend="reference")
    leaves = [t.clone().requires_grad_(True) for t in (x, delta, A, B, C, D)]
    out = ssd_triton(*leaves, backward_chunk=96)  # 96 > 64 and not a multiple of it
    torch.testing.assert_close(out.y.detach(), ref.y, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.final_state.detach(), ref.final_state, rtol=1e-4, atol=1e-4)


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
    gen = torch.Generator().manual_seed(0)  # the same model whichever tests ran before
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype).to(param.device) * 0.1)
    return model


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_model_hooks_knockout_and_state_edits_through_triton(family):
    model = _model(family)
    tokens = torch.randint(0, 30, (2, 6), device=DEVICE)
    longer = torch.randint(0, 30, (2, 12), device=DEVICE)  # an edit of all 12 positions: the override recurrence
    ko = Knockout(layers=[0, 1], sources=[1, 2], targets=[-1], path="both")

    def edit(h, hook):
        h[:, 2] = 0.5
        return h

    results = {}
    for backend in ("reference", "triton"):
        model.set_backend(backend)
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_h"))
            with model.hooks(fwd_hooks=[("blocks.0.hook_h", edit)]):  # a cache after an edit: the rerun's states
                continued = model.run_with_cache(tokens, names_filter="blocks.0.hook_h")[1]["blocks.0.hook_h"]
            results[backend] = (
                logits,
                cache["blocks.1.hook_h"],
                continued,
                model.run_with_knockout(tokens, ko),
                model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_h", edit)]),
                model.run_with_hooks(longer, fwd_hooks=[("blocks.1.hook_h", lambda h, hook: h * 0.5)]),
                model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False),
            )
    for a, b in zip(results["triton"], results["reference"]):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(a, b)


# --- the chunked-recompute backward (memory linear in p) ------------------------------------

def _family_inputs(family, p, dtype=torch.float64, seed=0, b=2):
    if family == "mamba1":
        return inputs(b=b, p=p, e=3, n=2, dtype=dtype, seed=seed)
    return ssd_inputs(b=b, p=p, h=2, hd=2, g=1, n=2, dtype=dtype, seed=seed)


def _scan(family, backend, tensors, return_states=False, with_d=True, with_h0=True, **kwargs):
    x, delta, A, B, C, D, h0 = tensors
    scan = selective_scan if family == "mamba1" else ssd_scan
    return scan(x, delta, A, B, C, D if with_d else None, initial_state=h0 if with_h0 else None,
                return_states=return_states, backend=backend, **kwargs)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("p, every", [(11, 4), (8, 4), (3, 4), (5, 1)])
def test_forward_writes_chunk_boundary_states(family, p, every):
    if family == "mamba1":
        from tl_mamba.ops.selective_scan.triton_kernel import _forward
    else:
        from tl_mamba.ops.ssd.triton_kernel import _forward
    tensors = _family_inputs(family, p, dtype=torch.float32)
    y, final, states, bounds = _forward(*tensors, False, boundary_every=every)
    ref = _scan(family, "reference", tensors, return_states=True)
    assert states is None
    assert bounds.shape[1] == -(-p // every) - 1
    torch.testing.assert_close(bounds, ref.states[:, every - 1:p - 1:every], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ref.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, ref.final_state, rtol=1e-5, atol=1e-5)


def _weights_like(o, seed: int):
    """Fixed random loss weights shaped like ``o``, on its device (drawn on the CPU: the same
    weights on every device)."""
    return torch.randn(o.shape, generator=torch.Generator().manual_seed(seed), dtype=o.dtype).to(o.device)


def _set_backward_chunk(monkeypatch, T: int) -> None:
    """Both families' default backward chunk (Mamba-1's is shared, Mamba-2's its own) set to T."""
    import tl_mamba.ops.triton_scan as triton_scan
    from tl_mamba.ops.ssd import triton_kernel as ssd_triton_kernel

    monkeypatch.setattr(triton_scan, "BACKWARD_CHUNK", T)
    monkeypatch.setattr(ssd_triton_kernel, "BACKWARD_CHUNK", T)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_chunked_backward_gradcheck_float64(family, monkeypatch):
    """A float64 gradcheck (Triton's interpreter runs the kernel in float64 for float64
    inputs): 6 positions in chunks of 4, so one full chunk and one partial chunk."""
    _set_backward_chunk(monkeypatch, 4)
    tensors = [t.requires_grad_(True) for t in _family_inputs(family, p=6, b=1)]

    def f(*leaves):
        out = _scan(family, "triton", leaves)
        return out.y, out.final_state

    assert f(*tensors)[0].dtype == torch.float64
    assert torch.autograd.gradcheck(f, tensors, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("p, with_d, with_h0, states", [(11, True, True, True), (11, False, False, False),
                                                        (9, True, False, False), (4, True, True, True)])
def test_chunked_backward_matches_reference_autograd(family, p, with_d, with_h0, states):
    """Gradients of x, Δ, A, B, C, D and the initial state, from y, the final state and
    (when returned) the states, against autograd through the reference scan, in float64:
    p spans several chunks of T = 4 and is not a multiple of T (except p = T)."""
    from tl_mamba.ops.selective_scan.triton_kernel import selective_scan_triton
    from tl_mamba.ops.ssd.triton_kernel import ssd_triton

    tensors = _family_inputs(family, p, seed=p)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        if backend == "triton":  # backward_chunk is the backend's keyword, not the dispatcher's
            x, delta, A, B, C, D, h0 = leaves
            out = (selective_scan_triton if family == "mamba1" else ssd_triton)(
                x, delta, A, B, C, D if with_d else None, initial_state=h0 if with_h0 else None,
                return_states=states, backward_chunk=4)
        else:
            out = _scan(family, backend, leaves, return_states=states, with_d=with_d, with_h0=with_h0)
        outputs = (out.y, out.final_state) + ((out.states,) if states else ())
        loss = sum((o * _weights_like(o, seed=i)).sum() for i, o in enumerate(outputs))
        loss.backward()
        grads[backend] = [t.grad for t in leaves]
    for name, used, a, b in zip("x delta A B C D h0".split(), [1, 1, 1, 1, 1, with_d, with_h0],
                                grads["triton"], grads["reference"]):
        if not used:
            assert a is None and b is None, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("wanted", [("C",), ("h0",), ("D", "B"), ("final_only_h0",)])
def test_chunked_backward_with_some_inputs_requiring_grad(family, wanted, monkeypatch):
    """Only some inputs require grad (the gradient of a chunk's start is then skipped when
    nothing before it needs it); the final state alone as the loss."""
    _set_backward_chunk(monkeypatch, 3)
    names = "x delta A B C D h0".split()
    final_only = wanted == ("final_only_h0",)
    wanted = ("h0",) if final_only else wanted
    tensors = _family_inputs(family, p=10, seed=3)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(name in wanted) for name, t in zip(names, tensors)]
        out = _scan(family, backend, leaves)
        loss = out.final_state.square().sum()
        if not final_only:
            loss = loss + out.y.sin().sum()
        loss.backward()
        grads[backend] = {name: t.grad for name, t in zip(names, leaves) if name in wanted}
    for name in wanted:
        torch.testing.assert_close(grads["triton"][name], grads["reference"][name], rtol=1e-10, atol=1e-10,
                                   msg=name)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("loss_on", ["y", "states", "final"])
def test_backward_gets_no_gradient_for_an_output_the_loss_does_not_read(family, loss_on, monkeypatch):
    """With every state returned (``hook_h`` hooked or cached) and a loss on one output, the
    backward is handed None, not zeros, for the other two: the states' zeros would be
    b·p·S values, read by Mamba-1's backward kernel and, for Mamba-2, recomputed by the
    chunked recompute. Gradients match autograd through the reference either way."""
    from tl_mamba.ops.selective_scan import triton_backward
    from tl_mamba.ops.ssd import chunked

    _set_backward_chunk(monkeypatch, 4)
    handed = []  # Mamba-1: which of (y, final, states) had a gradient; Mamba-2: the recompute's return_states
    kernel_backward, recompute = triton_backward.selective_scan_backward, chunked.ssd_chunked

    def spy_backward(*args):
        handed.append(tuple(g is not None for g in args[10:13]))
        return kernel_backward(*args)

    def spy_recompute(*args, **kwargs):
        handed.append(kwargs.get("return_states"))
        return recompute(*args, **kwargs)

    monkeypatch.setattr(triton_backward, "selective_scan_backward", spy_backward)
    monkeypatch.setattr(chunked, "ssd_chunked", spy_recompute)
    tensors = _family_inputs(family, p=10, seed=4)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out = _scan(family, backend, leaves, return_states=True)
        {"y": out.y, "states": out.states, "final": out.final_state}[loss_on].sin().sum().backward()
        grads[backend] = [t.grad for t in leaves]
    if family == "mamba1":
        assert handed == [(loss_on == "y", loss_on == "final", loss_on == "states")]
    else:  # one recompute per chunk of 4 (3 chunks), rebuilding the states only when they have a gradient
        assert handed == [loss_on == "states"] * 3
    for name, a, b in zip("x delta A B C D h0".split(), grads["triton"], grads["reference"]):
        if b is None:  # the reference never used the input (C and D when the loss reads no y)
            b = torch.zeros_like(a)
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_chunked_backward_fp32_and_bf16_inputs(monkeypatch):
    """fp32 / bf16 inputs: the kernel and the recompute run in fp32; gradients keep the inputs' dtypes."""
    _set_backward_chunk(monkeypatch, 4)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        tensors = _family_inputs("mamba1", p=9, dtype=dtype, seed=5)
        grads = {}
        for backend in ("triton", "reference"):
            leaves = [t.clone().requires_grad_(True) for t in tensors]
            out = _scan("mamba1", backend, leaves)
            (out.y.sum() + out.final_state.sum()).backward()
            grads[backend] = [t.grad for t in leaves]
        for name, a, b in zip("x delta A B C D h0".split(), grads["triton"], grads["reference"]):
            assert a.dtype == dtype, name
            torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol, msg=name)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_mask_gradient_through_chunked_backward(family, monkeypatch):
    """Knockout attribution (a dense hook_ssm_mask that requires grad) with the Triton backend in
    chunks of 3: gradients of the mask and of the scan inputs match the reference backend's."""
    _set_backward_chunk(monkeypatch, 3)
    p = 7
    tensors = _family_inputs(family, p, seed=2)
    heads = 1 if family == "mamba1" else tensors[0].shape[2]
    mask = (torch.rand(2, heads, p, p, generator=torch.Generator().manual_seed(0)) > 0.4).double().tril().to(DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in tensors] + [mask.clone().requires_grad_(True)]
        out = _scan(family, backend, leaves[:7], ssm_mask=leaves[7])
        (out.y.tanh().sum() + out.final_state.sum()).backward()
        grads[backend] = [t.grad for t in leaves]
    for name, a, b in zip("x delta A B C D h0 mask".split(), grads["triton"], grads["reference"]):
        assert a is not None and b is not None, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


class _SavedTensorMeter:
    """Bytes of the tensors autograd keeps for backward (its saved-tensor hooks), live and peak.

    Every tensor an op saves (the recompute's intermediates included: the hooks apply to
    graphs built inside a custom backward too) is counted from when it is packed until
    autograd lets it go. Views are counted at their own size."""

    class _Box:
        def __init__(self, tensor):
            self.tensor = tensor

    def __init__(self):
        import weakref

        self._finalize = weakref.finalize
        self.live = self.peak = 0
        self.shapes = []

    def _free(self, nbytes):
        self.live -= nbytes

    def pack(self, tensor):
        nbytes = tensor.numel() * tensor.element_size()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.shapes.append(tuple(tensor.shape))
        box = self._Box(tensor)
        self._finalize(box, self._free, nbytes)
        return box

    def unpack(self, box):
        return box.tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def _backward_memory(family, p, chunk):
    """(bytes saved by the forward, extra peak of saved bytes during the backward, state bytes per position)."""
    import gc

    if family == "mamba1":
        tensors = inputs(b=1, p=p, e=8, n=16, seed=1)
    else:
        tensors = ssd_inputs(b=1, p=p, h=2, hd=4, g=1, n=16, seed=1)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    meter = _SavedTensorMeter()
    with meter.hooks():
        from tl_mamba.ops.selective_scan.triton_kernel import selective_scan_triton
        from tl_mamba.ops.ssd.triton_kernel import ssd_triton

        x, delta, A, B, C, D, h0 = leaves
        out = (selective_scan_triton if family == "mamba1" else ssd_triton)(
            x, delta, A, B, C, D, initial_state=h0, backward_chunk=chunk)
        loss = out.y.sum() + out.final_state.sum()
        saved_by_forward = meter.live
        forward_shapes = list(meter.shapes)
        meter.peak = meter.live
        loss.backward()
    gc.collect()
    assert all(t.grad is not None for t in leaves)
    state_bytes = out.final_state[0].numel() * 4  # one sequence's state, fp32
    return saved_by_forward, meter.peak - saved_by_forward, state_bytes, forward_shapes, leaves


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_chunked_backward_memory_is_linear_in_p(family, monkeypatch):
    """The forward saves the inputs and ⌈p/T⌉ - 1 boundary states, never the [b, p, state]
    tensor; the backward's extra memory is one chunk's recompute, the same for p = 64 as for
    p = 16 at T = 4, and far below recomputing the whole sequence at once (T = p). (Mamba-1's
    backward kernel holds one chunk of states per program in its scratch buffer and no
    autograd graph; the recompute path is measured here.)"""
    from tl_mamba.ops.selective_scan import triton_kernel

    monkeypatch.setattr(triton_kernel, "BACKWARD", "recompute")
    p, T = 64, 4
    saved, extra, state_bytes, shapes, leaves = _backward_memory(family, p, T)
    input_bytes = sum(t.numel() * t.element_size() for t in leaves)
    assert saved <= input_bytes + (p // T - 1) * state_bytes  # inputs (referenced) + boundaries
    state = tuple(leaves[-1].shape[1:])  # (e, n) or (h, hd, n)
    per_position_states = [s for s in shapes if len(s) == len(state) + 2 and s[2:] == state]
    assert per_position_states == [(1, p // T - 1) + state], per_position_states  # the boundaries only

    _, extra_short, _, _, _ = _backward_memory(family, 16, T)
    _, extra_whole, _, _, _ = _backward_memory(family, p, p)  # one chunk: the whole sequence
    assert extra <= 1.25 * extra_short, (extra, extra_short)  # independent of p
    assert extra * 6 < extra_whole, (extra, extra_whole)  # O(T·state), not O(p·state)
    assert extra < 8 * T * state_bytes, (extra, T * state_bytes)  # a few [b, T, state] arrays


# --- the chunked SSD forward (Mamba-2: triton_chunked.py) -----------------------------------

def _ssd_spies(monkeypatch):
    """Count the calls of the chunked and the recurrent SSD forward and of the per-chunk
    state walk (and still run them)."""
    from tl_mamba.ops.ssd import triton_chunked, triton_kernel

    calls = {"chunked": 0, "recurrent": 0, "states": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(triton_chunked, "ssd_chunked_triton", spy("chunked", triton_chunked.ssd_chunked_triton))
    monkeypatch.setattr(triton_kernel, "_recurrent_forward", spy("recurrent", triton_kernel._recurrent_forward))
    monkeypatch.setattr(triton_chunked, "chunk_states_triton", spy("states", triton_chunked.chunk_states_triton))
    return calls


@pytest.mark.parametrize("p, Q, g, with_d, with_h0, dtype", [
    (7, 4, 2, True, True, torch.float32),     # 2 chunks, the last one of 3 positions
    (3, 8, 1, False, True, torch.float32),    # p < Q: one partial chunk
    (13, 4, 1, True, False, torch.float32),   # 4 chunks, the last one of 1 position
    (12, 4, 2, False, False, torch.bfloat16),  # p a multiple of Q
    (9, 4, 2, True, True, torch.bfloat16),
])
def test_ssd_chunked_kernel_matches_reference(p, Q, g, with_d, with_h0, dtype, monkeypatch):
    """y and the final state of the chunked kernels against the sequential reference; the
    chunked path is the one that runs. bf16 inputs: both backends upcast the same bf16 values
    to fp32 exactly and accumulate in fp32, so they differ only by the order of fp32 sums
    (~1e-6 here), and the fp32 tolerance applies."""
    from tl_mamba.ops.ssd.triton_kernel import ssd_triton

    calls = _ssd_spies(monkeypatch)
    x, delta, A, B, C, D, h0 = ssd_inputs(b=2, p=p, h=4, hd=3, g=g, n=5, dtype=dtype, seed=p)
    kw = dict(initial_state=h0 if with_h0 else None)
    ours = ssd_triton(x, delta, A, B, C, D if with_d else None, chunk_size=Q, **kw)
    ref = ssd_scan(x, delta, A, B, C, D if with_d else None, backend="reference", **kw)
    assert calls == {"chunked": 1, "recurrent": 0, "states": 0}
    assert ours.y.dtype == ours.final_state.dtype == torch.float32 and ours.states is None
    torch.testing.assert_close(ours.y, ref.y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.final_state, ref.final_state, rtol=1e-5, atol=1e-5)


def test_ssd_chunked_kernel_tiles_and_chunk_starts():
    """hd and n larger than one tile (hd = 17 in blocks of 16, n = 20 in blocks of 16: the
    n loop of the output kernel and the n split of the state kernel), float64 (run in float64),
    and the chunk-starting states it returns against the reference's states."""
    from tl_mamba.ops.ssd.triton_chunked import ssd_chunked_triton

    p, Q = 10, 4
    x, delta, A, B, C, D, h0 = ssd_inputs(b=1, p=p, h=2, hd=17, g=1, n=20, dtype=torch.float64, seed=4)
    y, final, starts = ssd_chunked_triton(x, delta, A, B, C, D, h0, chunk_size=Q, block_hd=16, block_n=16)
    ref = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="reference")
    assert y.dtype == torch.float64 and starts.shape == (1, 3, 2, 17, 20)
    torch.testing.assert_close(y, ref.y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(final, ref.final_state, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(starts, torch.cat([h0[:, None], ref.states[:, Q - 1:p - 1:Q]], dim=1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_ssd_chunk_states_walk_tiles_and_a_short_last_chunk(dtype):
    """The per-chunk state walk (hook_h's states) against the reference's states at every
    position: hd = 40 and n = 70 over several tiles (32 and 64), 2 groups, p = 11 in chunks
    of 4 (a short last chunk), an initial state; float64 runs in float64, bf16 in fp32."""
    from tl_mamba.ops.ssd.triton_chunked import chunk_states_triton, ssd_chunked_triton

    p, Q = 11, 4
    x, delta, A, B, C, D, h0 = ssd_inputs(b=2, p=p, h=4, hd=40, g=2, n=70, dtype=dtype, seed=6)
    _, _, starts = ssd_chunked_triton(x, delta, A, B, C, D, h0, chunk_size=Q)
    states = chunk_states_triton(x, delta, A, B, starts, Q)
    ref = ssd_scan(*(t.double() for t in (x, delta, A, B, C, D)), initial_state=h0.double(), return_states=True,
                   backend="reference")
    assert states.shape == (2, p, 4, 40, 70) and states.dtype == (torch.float64 if dtype == torch.float64
                                                                 else torch.float32)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(states.double(), ref.states, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="starts must be"):
        chunk_states_triton(x, delta, A, B, starts[:, :2], Q)


def test_ssd_triton_picks_chunked_or_recurrent_kernel(monkeypatch):
    """Through the dispatcher: the plain forward and a knockout's extra scan run the
    chunked kernels, return_states (hook_h) those plus the per-chunk state walk, whose states equal
    the reference's at every position; with autograd the backward's boundary
    states come from the chunked kernels when T ≤ Q or Q divides T (T = 8, Q = 4: every
    second chunk start), from the recurrent kernel otherwise (T = 6); gradients either way
    match the reference's."""
    from tl_mamba.ops.knockout import EdgeRemoval
    from tl_mamba.ops.ssd import triton_chunked
    from tl_mamba.ops.ssd.triton_kernel import _forward, ssd_triton

    monkeypatch.setattr(triton_chunked, "CHUNK_SIZE", 4)
    calls = _ssd_spies(monkeypatch)
    p = 10
    tensors = ssd_inputs(b=1, p=p, h=2, hd=2, g=1, n=2, dtype=torch.float64, seed=7)
    x, delta, A, B, C, D, h0 = tensors

    def used(**expected):
        assert calls == {"chunked": 0, "recurrent": 0, "states": 0, **expected}, calls
        calls.update(chunked=0, recurrent=0, states=0)

    ssd_scan(x, delta, A, B, C, D, initial_state=h0, backend="triton")
    used(chunked=1)
    with_states = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="triton")
    used(chunked=1, states=1)
    want = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="reference")
    torch.testing.assert_close(with_states.states, want.states, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(with_states.y, want.y, rtol=1e-12, atol=1e-12)
    # the knockout's extra scan (not the edge-by-edge form, which runs no kernel)
    from tl_mamba.ops import knockout as ops_knockout

    from tl_mamba.ops.ssd import triton_kernel as ssd_triton_kernel

    monkeypatch.setattr(ops_knockout, "PAIRS_PER_SCANNED_POSITION", {"bpe": 0.0, "bphd": 0.0})
    removal = EdgeRemoval(sources=torch.zeros(1, p).index_fill_(1, torch.tensor([2]), 1.0).to(DEVICE),
                          targets=torch.zeros(1, p).index_fill_(1, torch.tensor([8]), 1.0).to(DEVICE))
    with monkeypatch.context() as separate:  # not in the same pass (the default): a second scan
        separate.setattr(ssd_triton_kernel, "SAME_PASS", False)
        ko = ssd_scan(x, delta, A, B, C, D, ssm_mask=[removal], backend="triton")
    assert calls["recurrent"] == calls["states"] == 0 and calls["chunked"] >= 2  # the scan, then the knockout's
    calls.update(chunked=0)
    ko_ref = ssd_scan(x, delta, A, B, C, D, ssm_mask=[removal], backend="reference")
    torch.testing.assert_close(ko.y, ko_ref.y, rtol=1e-12, atol=1e-12)

    for T, kernel in ((8, "chunked"), (6, "recurrent")):  # boundaries, then gradients
        y, final, _, bounds = _forward(x, delta, A, B, C, D, h0, False, boundary_every=T)
        ref = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="reference")
        torch.testing.assert_close(bounds, ref.states[:, T - 1:p - 1:T], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y, ref.y, rtol=1e-12, atol=1e-12)
        used(**{kernel: 1})
        grads = {}
        for backend in ("triton", "reference"):
            leaves = [t.clone().requires_grad_(True) for t in tensors]
            if backend == "triton":
                out = ssd_triton(*leaves[:6], initial_state=leaves[6], backward_chunk=T)
            else:
                out = ssd_scan(*leaves[:6], initial_state=leaves[6], backend=backend)
            (out.y.sin().sum() + out.final_state.square().sum()).backward()
            grads[backend] = [t.grad for t in leaves]
        used(**{kernel: 1})
        for name, a, b in zip("x delta A B C D h0".split(), grads["triton"], grads["reference"]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_ssd_backward_recomputes_in_chunks_of_its_own_default(monkeypatch):
    """Mamba-2's Triton backward walks chunks of ``ssd.triton_kernel.BACKWARD_CHUNK`` positions,
    not Mamba-1's default: 11 positions in chunks of 4 are recomputed as 3, 4, 4 (last first),
    and the gradients match autograd through the reference. The shipped default is a multiple
    of the chunked kernels' Q, so those kernels supply the boundary states."""
    import tl_mamba.ops.triton_scan as triton_scan
    from tl_mamba.ops.ssd import chunked, triton_chunked
    from tl_mamba.ops.ssd import triton_kernel as ssd_triton_kernel

    assert ssd_triton_kernel.BACKWARD_CHUNK % triton_chunked.CHUNK_SIZE == 0
    monkeypatch.setattr(triton_scan, "BACKWARD_CHUNK", 1000)  # Mamba-1's: must not be the one used
    monkeypatch.setattr(ssd_triton_kernel, "BACKWARD_CHUNK", 4)
    recomputed = []
    original = chunked.ssd_chunked
    monkeypatch.setattr(chunked, "ssd_chunked", lambda *a, **k: recomputed.append(a[0].shape[1]) or original(*a, **k))
    tensors = _family_inputs("mamba2", p=11, seed=9)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out = _scan("mamba2", backend, leaves)
        (out.y.sin().sum() + out.final_state.square().sum()).backward()
        grads[backend] = [t.grad for t in leaves]
    assert recomputed == [3, 4, 4]
    for name, a, b in zip("x delta A B C D h0".split(), grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_model_triton_forward_uses_chunked_kernel(monkeypatch):
    """A toy HookedMamba2 (2 groups) in chunks of 4 over 7 tokens: the logits of the triton
    backend (chunked kernels only) equal the reference backend's; a hook_h cache runs them
    plus the per-chunk state walk, never the recurrent kernel, and caches the reference's
    states. (Knockouts, hook_h edits and generation through the triton backend:
    test_model_hooks_knockout_and_state_edits_through_triton.)"""
    from tl_mamba.ops.ssd import triton_chunked

    monkeypatch.setattr(triton_chunked, "CHUNK_SIZE", 4)
    calls = _ssd_spies(monkeypatch)
    model = _model("mamba2")
    tokens = torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    logits = {}
    for backend in ("reference", "triton"):
        model.set_backend(backend)
        with torch.no_grad():
            logits[backend] = model(tokens)
    assert calls == {"chunked": model.cfg.n_layers, "recurrent": 0, "states": 0}, calls
    torch.testing.assert_close(logits["triton"], logits["reference"], rtol=1e-5, atol=1e-5)
    caches = {}
    for backend in ("triton", "reference"):
        model.set_backend(backend)
        with torch.no_grad():
            caches[backend] = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_h"))[1]
    assert calls == {"chunked": 2 * model.cfg.n_layers, "recurrent": 0, "states": model.cfg.n_layers}, calls
    for name in caches["reference"]:
        torch.testing.assert_close(caches["triton"][name], caches["reference"][name], rtol=1e-5, atol=1e-5)


# --- Mamba-1's gate, fused into the kernel ------------------------------------------------

def _silu_gated(y, z):
    """y · silu(z), written out as y · z · σ(z) in y's dtype (the reference for the fused gate)."""
    z = z.to(y.dtype)
    return y * z / (1 + torch.exp(-z))


@pytest.mark.parametrize("p, e, n, block_e, with_h0", [(7, 12, 5, None, True), (13, 20, 16, 4, False),
                                                       (1, 3, 1, None, False)])
def test_fused_gate_forward_matches_reference(p, e, n, block_e, with_h0):
    """The kernel's gated y equals the reference scan's y times silu(z); the states are the
    ungated scan's (the gate acts on the read-out only)."""
    from tl_mamba.ops.selective_scan.triton_kernel import _forward

    x, delta, A, B, C, D, h0 = inputs(b=2, p=p, e=e, n=n, seed=p)
    z = torch.randn(2, p, e, generator=torch.Generator().manual_seed(p + 1)).to(DEVICE) * 3
    h0 = h0 if with_h0 else None
    y, final, states = _forward(x, delta, A, B, C, D, h0, True, block_e=block_e, z=z)
    ref = selective_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="reference")
    torch.testing.assert_close(y, _silu_gated(ref.y, z), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, ref.final_state, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states, ref.states, rtol=1e-5, atol=1e-5)
    assert (y - ref.y).abs().max() > 0.1  # the gate did something


def test_fused_gate_bf16_inputs():
    x, delta, A, B, C, D, _ = inputs(dtype=torch.bfloat16)
    z = (torch.randn(2, 7, 12, generator=torch.Generator().manual_seed(3)) * 3).to(DEVICE, torch.bfloat16)
    ours = selective_scan(x, delta, A, B, C, D, z=z, backend="triton")
    ref = selective_scan(x, delta, A, B, C, D, backend="reference")
    assert ours.y.dtype == torch.float32
    torch.testing.assert_close(ours.y, _silu_gated(ref.y, z), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p, states", [(11, False), (8, True)])
def test_fused_gate_backward_matches_reference_autograd(p, states):
    """Gradients of x, Δ, A, B, C, D, h0 and z through the fused gate (chunked recompute,
    T = 4) against autograd through the reference scan and the gate written out, float64."""
    from tl_mamba.ops.selective_scan.triton_kernel import selective_scan_triton

    tensors = _family_inputs("mamba1", p, seed=p)
    z = torch.randn(2, p, 3, generator=torch.Generator().manual_seed(p + 7), dtype=torch.float64).to(DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (*tensors, z)]
        x, delta, A, B, C, D, h0, zz = leaves
        if backend == "triton":
            out = selective_scan_triton(x, delta, A, B, C, D, initial_state=h0, return_states=states, z=zz,
                                        backward_chunk=4)
            y = out.y
        else:
            out = selective_scan(x, delta, A, B, C, D, initial_state=h0, return_states=states, backend="reference")
            y = _silu_gated(out.y, zz)
        outputs = (y, out.final_state) + ((out.states,) if states else ())
        loss = sum((o * _weights_like(o, seed=i)).sum() for i, o in enumerate(outputs))
        loss.backward()
        grads[backend] = [t.grad for t in leaves]
    for name, a, b in zip("x delta A B C D h0 z".split(), grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_model_fuses_the_gate_only_when_nothing_reads_y(monkeypatch):
    """HookedMamba passes z to the kernel when no hook reads y, the gate or hook_h (plain
    forward, training, knockouts), and gates after the scan otherwise (a cache of hook_y);
    logits, cached values and parameter gradients equal the reference backend's."""
    from tl_mamba.ops.selective_scan import triton_kernel

    kernel_forward = triton_kernel._forward
    gated_calls = []

    def spy(*args, **kwargs):
        gated_calls.append(kwargs.get("z") is not None)
        return kernel_forward(*args, **kwargs)

    monkeypatch.setattr(triton_kernel, "_forward", spy)
    model = _model("mamba1")
    tokens = torch.randint(0, 30, (2, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    ko = Knockout(layers=[1], sources=[1, 2], targets=[-1])
    results = {}
    for backend in ("reference", "triton"):
        model.set_backend(backend)
        gated_calls.clear()
        with torch.no_grad():
            plain = model(tokens)
        plain_fused = list(gated_calls)
        gated_calls.clear()
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith(("hook_y", "hook_y_gated")))
        cache_fused = list(gated_calls)
        gated_calls.clear()
        with torch.no_grad():
            knocked = model.run_with_knockout(tokens, ko)
        knockout_fused = list(gated_calls)
        model.zero_grad()
        model(tokens, return_type="loss").backward()
        grads = [param.grad.clone() for param in model.parameters()]
        results[backend] = (plain, cache["blocks.0.hook_y"], cache["blocks.1.hook_y_gated"], knocked, *grads)
        if backend == "triton":
            assert plain_fused == [True] * model.cfg.n_layers, plain_fused
            assert cache_fused == [False] * model.cfg.n_layers, cache_fused
            # the knockout (layer 1) runs in the same pass as the scan, gate included
            assert knockout_fused == [True] * model.cfg.n_layers, knockout_fused
    for a, b in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


# --- Mamba-1's two forward kernels: chunked (parallel prefix scan in tiles) and sequential ---

@pytest.mark.parametrize("kernel", ["chunked", "sequential"])
@pytest.mark.parametrize("p, block_t, block_e, every", [(1, 4, None, 1), (8, 4, 2, 3), (9, 4, 4, 4), (13, 8, None, 5),
                                                        (4, 4, 8, 2), (16, 16, 2, 7)])
def test_mamba1_kernels_match_sequential_loop(kernel, p, block_t, block_e, every):
    """Both kernels against the recurrence written out position by position (float64 here,
    in the test, not a backend): y (D skip and gate fused), every state, the chunk-boundary
    states and the final state; p below, at and across tile boundaries (block_t), channel
    blocks that do not divide e, boundaries that do not align with tiles."""
    from tl_mamba.ops.selective_scan.triton_kernel import _forward

    b, e, n = 2, 6, 3
    x, delta, A, B, C, D, h0 = inputs(b=b, p=p, e=e, n=n, seed=100 + p)
    z = torch.randn(b, p, e, generator=torch.Generator().manual_seed(p)).to(DEVICE)
    y, final, states, bounds = _forward(x, delta, A, B, C, D, h0, True, block_e=block_e, boundary_every=every, z=z,
                                        kernel=kernel, block_t=block_t)
    h = h0.double()
    want_y, want_states = [], []
    for t in range(p):
        h = torch.exp(delta[:, t, :, None].double() * A.double()) * h + \
            (delta[:, t] * x[:, t]).double()[:, :, None] * B[:, t, None, :].double()
        out = (h * C[:, t, None, :].double()).sum(-1) + D.double() * x[:, t].double()
        zt = z[:, t].double()
        want_y.append(out * zt * torch.sigmoid(zt))
        want_states.append(h)
    want_states = torch.stack(want_states, 1)
    torch.testing.assert_close(y.double(), torch.stack(want_y, 1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(states.double(), want_states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bounds.double(), want_states[:, every - 1:p - 1:every], rtol=1e-5, atol=1e-5)
    assert bounds.shape[1] == -(-p // every) - 1
    torch.testing.assert_close(final.double(), h, rtol=1e-5, atol=1e-5)


def test_mamba1_kernel_choice(monkeypatch):
    """``KERNEL`` picks the kernel the backend runs; an unknown name is refused."""
    from tl_mamba.ops.selective_scan import triton_kernel

    x, delta, A, B, C, D, _ = inputs()
    with pytest.raises(ValueError, match="kernel"):
        triton_kernel._forward(x, delta, A, B, C, D, None, False, kernel="parallel")
    outputs = {}
    for kernel in ("chunked", "sequential"):
        monkeypatch.setattr(triton_kernel, "KERNEL", kernel)
        outputs[kernel] = selective_scan(x, delta, A, B, C, D, backend="triton").y
    torch.testing.assert_close(outputs["chunked"], outputs["sequential"], rtol=1e-5, atol=1e-5)


# --- Mamba-2 general masks by masked tiles ---------------------------------------------------

def _hidden_attention_ssd(x, delta, A, B, C):
    """α[b, h, i, j] = (C_i · B_j) · Π_{k=j+1..i} exp(Δ_k A_h) · Δ_j, built position by position (float64)."""
    x, delta, A, B, C = (t.double().cpu() for t in (x, delta, A, B, C))
    b, p, h, _ = x.shape
    group = torch.arange(h) // (h // B.shape[2])
    alpha = torch.zeros(b, h, p, p, dtype=torch.float64)
    for i in range(p):
        decay = torch.ones(b, h, dtype=torch.float64)  # Π_{k=j+1..i}, growing as j goes down
        for j in range(i, -1, -1):
            cb = (C[:, i, group] * B[:, j, group]).sum(-1)  # [b, h]
            alpha[:, :, i, j] = cb * decay * delta[:, j]
            decay = decay * torch.exp(delta[:, j] * A)
    return alpha


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p, mask_heads, block_i", [(37, 4, 16), (9, 1, 32), (16, 4, 16)])
def test_masked_tiles_match_hidden_attention(dtype, p, mask_heads, block_i, monkeypatch):
    """The kernel's Σ_j R[i, j] α[i, j] x_j against α built position by position: several tiles
    (p not a multiple of the tile), a mask per head or shared, 2 groups, fractional R. bf16
    inputs are computed in fp32 (upcast before the launch), so to fp32 precision of their values."""
    from tl_mamba.ops.ssd import triton_masked

    monkeypatch.setattr(triton_masked, "BLOCK_I", block_i)
    x, delta, A, B, C, _, _ = ssd_inputs(b=2, p=p, h=4, hd=5, g=2, n=3, dtype=dtype, seed=p)
    gen = torch.Generator().manual_seed(p)
    removed = (torch.rand(2, mask_heads, p, p, generator=gen, dtype=torch.float64) *
               (torch.rand(2, mask_heads, p, p, generator=gen) < 0.5)).tril().to(DEVICE, dtype)
    out = triton_masked.masked_removed_terms_triton(removed, x, delta, A, B, C)
    alpha = _hidden_attention_ssd(x, delta, A, B, C)
    want = torch.einsum("bhij,bhij,bjhd->bihd", alpha, removed.double().cpu().expand(2, 4, p, p), x.double().cpu())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert out.dtype == (torch.float32 if dtype == torch.bfloat16 else dtype)
    torch.testing.assert_close(out.double().cpu(), want, rtol=tol, atol=tol)


def test_masked_tiles_launch_on_fp32_copies_of_16bit_inputs(monkeypatch):
    """bf16 x, Δ, B and C reach the kernel upcast: on 16-bit tiles it spilled ~5 KB of registers
    per thread (benchmarks/compile_triton.py --sweep) and ran 6.3x slower than on fp32 on an H200."""
    from tl_mamba.ops.ssd import triton_masked

    launched = []
    kernel = triton_masked._masked_removed_terms_kernel

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append([t.dtype for t in args[:5]])
                return kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_masked, "_masked_removed_terms_kernel", Spy())
    x, delta, A, B, C, _, _ = ssd_inputs(b=1, p=9, h=2, hd=5, g=1, n=3, dtype=torch.bfloat16)
    removed = torch.ones(1, 2, 9, 9, device=DEVICE).tril()
    triton_masked.masked_removed_terms_triton(removed, x, delta, A, B, C)
    assert launched == [[torch.float32] * 5]


@pytest.mark.parametrize("block_d", [8, 24, 16.5, True])
def test_masked_tiles_refuse_a_channel_block_the_kernel_cannot_tile(block_d):
    from tl_mamba.ops.ssd import triton_masked

    x, delta, A, B, C, _, _ = ssd_inputs(b=1, p=4, h=2, hd=5, g=1, n=3)
    with pytest.raises(ValueError, match="block_d must be a power of 2, at least 16"):
        triton_masked.masked_removed_terms_triton(torch.ones(1, 2, 4, 4, device=DEVICE).tril(), x, delta, A, B, C,
                                                  block_d=block_d)


@pytest.mark.parametrize("block_d", [None, 16])
def test_masked_tiles_over_several_channel_blocks(block_d):
    """hd = 40 in one block of 64 (the default) or three of 16 (``block_d=16``, the last one
    partly masked): the same removed terms, against α built position by position."""
    from tl_mamba.ops.ssd import triton_masked

    x, delta, A, B, C, _, _ = ssd_inputs(b=1, p=20, h=2, hd=40, g=1, n=3, seed=5)
    gen = torch.Generator().manual_seed(5)
    removed = (torch.rand(1, 2, 20, 20, generator=gen) < 0.5).double().tril().to(DEVICE, torch.float32)
    out = triton_masked.masked_removed_terms_triton(removed, x, delta, A, B, C, block_d=block_d)
    alpha = _hidden_attention_ssd(x, delta, A, B, C)
    want = torch.einsum("bhij,bhij,bjhd->bihd", alpha, removed.double().cpu(), x.double().cpu())
    torch.testing.assert_close(out.double().cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p, Q, with_features, states, hd, n", [(11, 4, True, True, 5, 3), (6, 8, False, False, 5, 3),
                                                                 (9, 2, True, False, 5, 3), (7, 4, True, False, 40, 70)])
def test_ssd_knockout_in_the_same_pass_matches_hidden_attention(p, Q, with_features, states, hd, n, monkeypatch):
    """The chunked kernels' fused knockout against α built position by position: per-row,
    fractional sources and targets, a head restriction, 2 groups, an initial state (not an
    edge: kept), the D skip (kept), several chunks and a short last one, hd and n over
    several of the knockout's 32 × 32 tiles; final state and returned states are the plain scan's."""
    from tl_mamba.ops.knockout import EdgeRemoval
    from tl_mamba.ops.ssd import triton_chunked
    from tl_mamba.ops.ssd.triton_kernel import _forward

    monkeypatch.setattr(triton_chunked, "CHUNK_SIZE", Q)
    b, h = 2, 4
    x, delta, A, B, C, D, h0 = ssd_inputs(b=b, p=p, h=h, hd=hd, g=2, n=n, dtype=torch.float64, seed=50 + p)
    gen = torch.Generator().manual_seed(p)
    sources = (torch.rand(b, p, generator=gen) < 0.5).double() * torch.rand(b, p, generator=gen, dtype=torch.float64)
    targets = (torch.rand(b, p, generator=gen) < 0.6).double()
    features = (torch.arange(h) % 2 == 0).double() if with_features else None
    removal = EdgeRemoval(sources.to(DEVICE), targets.to(DEVICE), None if features is None else features.to(DEVICE))
    y, final, got_states = _forward(x, delta, A, B, C, D, h0, states, removal=removal)
    plain = ssd_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="reference")
    alpha = _hidden_attention_ssd(x, delta, A, B, C)  # [b, h, i, j]
    weight = targets[:, None, :, None] * sources[:, None, None, :] * torch.ones(p, p, dtype=torch.float64).tril()
    if features is not None:
        weight = weight * features[None, :, None, None]
    removed = torch.einsum("bhij,bhij,bjhd->bihd", alpha, weight.expand(b, h, p, p), x.double().cpu())
    assert float(removed.abs().max()) > 1e-2
    torch.testing.assert_close(y.cpu(), plain.y.cpu() - removed, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, plain.final_state, rtol=1e-10, atol=1e-10)
    if states:
        torch.testing.assert_close(got_states, plain.states, rtol=1e-10, atol=1e-10)
    else:
        assert got_states is None


def test_ssd_dispatcher_fuses_one_knockout_without_autograd_only(monkeypatch):
    """With the same-pass knockout on (``SAME_PASS``), ssd_scan with one Knockout-style removal
    on the triton backend runs the chunked kernels once, the knockout in the same pass,
    without autograd; with autograd, or with two removals, it does not; turned off,
    never; every route gives the reference backend's result (values, then gradients)."""
    from tl_mamba.ops.knockout import EdgeRemoval
    from tl_mamba.ops.ssd import triton_chunked
    from tl_mamba.ops.ssd import triton_kernel as ssd_triton_kernel

    monkeypatch.setattr(ssd_triton_kernel, "SAME_PASS", True)  # the default, set here in case it changes
    fused = []
    chunked = triton_chunked.ssd_chunked_triton
    monkeypatch.setattr(triton_chunked, "ssd_chunked_triton",
                        lambda *a, **k: fused.append(k.get("removal") is not None) or chunked(*a, **k))
    tensors = ssd_inputs(b=2, p=9, h=2, hd=3, g=1, n=2, dtype=torch.float64, seed=5)
    sources = torch.zeros(2, 9, device=DEVICE, dtype=torch.float64)
    sources[:, 2:4] = 1
    targets = torch.zeros(2, 9, device=DEVICE, dtype=torch.float64)
    targets[:, -1] = 1
    one = [EdgeRemoval(sources, targets)]
    two = [EdgeRemoval(sources, targets, torch.tensor([1.0, 0.0], device=DEVICE)),
           EdgeRemoval(sources, targets, torch.tensor([0.0, 1.0], device=DEVICE))]
    kw = dict(initial_state=tensors[6], ssm_mask=one)
    want = ssd_scan(*tensors[:6], backend="reference", **kw)
    with torch.no_grad():
        got = ssd_scan(*tensors[:6], backend="triton", **kw)
        assert fused == [True]
        fused.clear()
        split = ssd_scan(*tensors[:6], initial_state=tensors[6], ssm_mask=two, backend="triton")
        assert True not in fused
    torch.testing.assert_close(got.y, want.y, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(split.y, want.y, rtol=1e-10, atol=1e-10)
    fused.clear()
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        out = ssd_scan(*leaves[:6], initial_state=leaves[6], ssm_mask=one, backend=backend)
        out.y.sin().sum().backward()
        grads[backend] = [t.grad for t in leaves]
    assert True not in fused
    for name, a, b in zip("x delta A B C D h0".split(), grads["triton"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    monkeypatch.setattr(ssd_triton_kernel, "SAME_PASS", False)
    with torch.no_grad():
        off = ssd_scan(*tensors[:6], backend="triton", **kw)
    assert True not in fused
    torch.testing.assert_close(off.y, want.y, rtol=1e-10, atol=1e-10)


def test_dense_mask_through_triton_uses_masked_tiles(monkeypatch):
    """ssd_scan with a general mask on the triton backend: the masked-tile kernel runs without
    autograd (y against the brute-force hidden attention); with autograd the torch form
    runs and the gradients are right."""
    from tl_mamba.ops import knockout
    from tl_mamba.ops.ssd import triton_masked

    monkeypatch.setattr(knockout, "DENSE_MASK_AFTER", 2)
    monkeypatch.setattr(knockout, "PAIRS_PER_SCANNED_POSITION", {"bpe": 0.0, "bphd": 0.0})  # not edge by edge
    launches = []
    kernel = triton_masked._masked_removed_terms_kernel
    monkeypatch.setattr(triton_masked, "_masked_removed_terms_kernel",
                        type("Spy", (), {"__getitem__": lambda self, grid: launches.append(grid) or kernel[grid]})())
    b, p, h = 2, 13, 4
    tensors = ssd_inputs(b=b, p=p, h=h, hd=3, g=2, n=3, dtype=torch.float64, seed=3)
    mask = (torch.rand(b, h, p, p, generator=torch.Generator().manual_seed(4)) < 0.6).to(DEVICE, torch.float64)
    x, delta, A, B, C, D, h0 = tensors
    alpha = _hidden_attention_ssd(x, delta, A, B, C).to(DEVICE)
    want = ssd_scan(*tensors[:6], initial_state=h0, backend="reference").y - torch.einsum(
        "bhij,bjhd->bihd", alpha * (1 - mask) * torch.ones(p, p, device=DEVICE).tril(), x)
    with torch.no_grad():
        out = ssd_scan(*tensors[:6], initial_state=h0, ssm_mask=mask, backend="triton")
    assert len(launches) == 1
    torch.testing.assert_close(out.y, want, rtol=1e-9, atol=1e-9)
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    y = ssd_scan(*leaves[:6], initial_state=leaves[6], ssm_mask=mask, backend="triton").y
    assert len(launches) == 1  # autograd on: the torch form, not the kernel
    torch.testing.assert_close(y.detach(), want, rtol=1e-9, atol=1e-9)
    y.square().sum().backward()
    monkeypatch.setattr(knockout, "DENSE_MASK_AFTER", 10**9)  # the reference removes edges by scans
    reference = [t.clone().requires_grad_(True) for t in tensors]
    y_ref = ssd_scan(*reference[:6], initial_state=reference[6], ssm_mask=mask, backend="reference").y
    y_ref.square().sum().backward()
    for name, a, b_ in zip("x delta A B C D h0".split(), leaves, reference):
        torch.testing.assert_close(a.grad, b_.grad, rtol=1e-8, atol=1e-8, msg=name)


# --- Mamba-1's backward kernel (triton_backward.py) and the recompute it replaces -------------

@pytest.mark.parametrize("mode", ["kernel", "recompute"])
@pytest.mark.parametrize("p, chunk, states, gated", [(11, 4, True, True), (9, 3, False, False), (4, 8, True, False)])
def test_mamba1_backward_modes_match_reference_autograd(mode, p, chunk, states, gated, monkeypatch):
    """Both Mamba-1 backwards (the Triton kernel, the default, and the chunked torch recompute)
    against autograd through the reference scan, float64: gradients of all eight inputs from
    y, the final state and the returned states; chunks that do not divide p, and p < chunk."""
    from tl_mamba.ops.selective_scan import triton_backward, triton_kernel

    monkeypatch.setattr(triton_kernel, "BACKWARD", mode)
    launches = []
    kernel = triton_backward._selective_scan_bwd_kernel
    monkeypatch.setattr(triton_backward, "_selective_scan_bwd_kernel",
                        type("Spy", (), {"__getitem__": lambda self, grid: launches.append(grid) or kernel[grid]})())
    tensors = _family_inputs("mamba1", p, seed=p + 20)
    z = torch.randn(2, p, 3, generator=torch.Generator().manual_seed(p), dtype=torch.float64).to(DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (*tensors, z)]
        x, delta, A, B, C, D, h0, zz = leaves
        if backend == "triton":
            out = triton_kernel.selective_scan_triton(x, delta, A, B, C, D, initial_state=h0, return_states=states,
                                                      z=zz if gated else None, backward_chunk=chunk)
            y = out.y
        else:
            out = selective_scan(x, delta, A, B, C, D, initial_state=h0, return_states=states, backend="reference")
            y = _silu_gated(out.y, zz) if gated else out.y
        outputs = (y, out.final_state) + ((out.states,) if states else ())
        loss = sum((o * _weights_like(o, seed=i)).sum() for i, o in enumerate(outputs))
        loss.backward()
        grads[backend] = [t.grad for t in leaves]
    assert len(launches) == (1 if mode == "kernel" else 0)
    for name, a, b in zip("x delta A B C D h0 z".split(), grads["triton"], grads["reference"]):
        if name == "z" and not gated:
            assert a is None and b is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


def test_mamba1_backward_kernel_bf16_inputs():
    """bf16 inputs: gradients come back in bf16, from fp32 arithmetic (checked against the
    reference scan's autograd on the same bf16 inputs, which also computes in fp32)."""
    tensors = inputs(dtype=torch.bfloat16)
    grads = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_(True) for t in tensors]
        x, delta, A, B, C, D, h0 = leaves
        out = selective_scan(x, delta, A, B, C, D, initial_state=h0, backend=backend)
        (out.y.square().sum() + out.final_state.sum()).backward()
        grads[backend] = [t.grad for t in leaves]
    for name, a, b in zip("x delta A B C D h0".split(), grads["triton"], grads["reference"]):
        assert a.dtype == torch.bfloat16, name
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2, msg=name)


# --- Mamba-1: one S → T knockout in the same pass as the scan --------------------------------

def _hidden_attention_mamba1(x, delta, A, B, C):
    """α[b, e, i, j] = Σ_n C_i[n] · Π_{k=j+1..i} exp(Δ_k[e] A[e, n]) · B_j[n] · Δ_j[e], position by position."""
    x, delta, A, B, C = (t.double().cpu() for t in (x, delta, A, B, C))
    b, p, e = x.shape
    alpha = torch.zeros(b, e, p, p, dtype=torch.float64)
    for i in range(p):
        decay = torch.ones(b, e, A.shape[1], dtype=torch.float64)
        for j in range(i, -1, -1):
            alpha[:, :, i, j] = (C[:, i, None, :] * decay * B[:, j, None, :]).sum(-1) * delta[:, j]
            decay = decay * torch.exp(delta[:, j, :, None] * A)
    return alpha


@pytest.mark.parametrize("p, block_t, with_features, states", [(11, 4, True, True), (6, 8, False, False),
                                                                (9, 2, True, False)])
def test_knockout_in_the_same_pass_matches_hidden_attention(p, block_t, with_features, states, monkeypatch):
    """The chunked kernel's fused knockout against α built position by position: per-row,
    fractional sources and targets, a channel restriction, an initial state (not an edge:
    kept), the D skip (kept) and the gate; the returned states are the plain scan's."""
    from tl_mamba.ops.knockout import EdgeRemoval
    from tl_mamba.ops.selective_scan import triton_kernel

    monkeypatch.setattr(triton_kernel, "BLOCK_T", block_t)
    b, e, n = 2, 5, 3
    x, delta, A, B, C, D, h0 = inputs(b=b, p=p, e=e, n=n, seed=40 + p)
    gen = torch.Generator().manual_seed(p)
    z = torch.randn(b, p, e, generator=gen).to(DEVICE)
    sources = (torch.rand(b, p, generator=gen) < 0.5).float() * torch.rand(b, p, generator=gen)
    targets = (torch.rand(b, p, generator=gen) < 0.6).float()
    features = (torch.arange(e) % 2 == 0).float() if with_features else None
    removal = EdgeRemoval(sources.to(DEVICE), targets.to(DEVICE), None if features is None else features.to(DEVICE))
    y, final, got_states = triton_kernel._forward(x, delta, A, B, C, D, h0, states, z=z, removal=removal)
    plain = selective_scan(x, delta, A, B, C, D, initial_state=h0, return_states=True, backend="reference")
    alpha = _hidden_attention_mamba1(x, delta, A, B, C)
    causal = torch.ones(p, p, dtype=torch.float64).tril()
    weight = targets.double()[:, None, :, None] * sources.double()[:, None, None, :] * causal  # [b, 1, i, j]
    if features is not None:
        weight = weight * features.double()[None, :, None, None]
    removed = torch.einsum("beij,beij,bje->bie", alpha, weight.expand(b, e, p, p), x.double().cpu())
    want = _silu_gated(plain.y.double().cpu() - removed, z.double().cpu())
    assert float(removed.abs().max()) > 1e-2
    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, plain.final_state, rtol=1e-5, atol=1e-5)
    if states:
        torch.testing.assert_close(got_states, plain.states, rtol=1e-5, atol=1e-5)


def test_dispatcher_fuses_one_knockout_without_autograd_only(monkeypatch):
    """selective_scan with one Knockout-style removal on the triton backend runs one kernel
    pass (the knockout fused) without autograd, and the separate knockout scan with it;
    both give the reference backend's result (values, then gradients)."""
    from tl_mamba.ops.knockout import EdgeRemoval
    from tl_mamba.ops.selective_scan import triton_kernel

    forward = triton_kernel._forward
    calls = []
    monkeypatch.setattr(triton_kernel, "_forward", lambda *a, **k: calls.append(k.get("removal") is not None)
                        or forward(*a, **k))
    tensors = inputs(b=2, p=9, e=4, n=3, seed=5)
    sources = torch.zeros(2, 9, device=DEVICE)
    sources[:, 2:4] = 1
    targets = torch.zeros(2, 9, device=DEVICE)
    targets[:, -1] = 1
    knockout = [EdgeRemoval(sources, targets)]
    want = selective_scan(*tensors[:6], initial_state=tensors[6], ssm_mask=knockout, backend="reference")
    with torch.no_grad():
        got = selective_scan(*tensors[:6], initial_state=tensors[6], ssm_mask=knockout, backend="triton")
    assert calls == [True]
    torch.testing.assert_close(got.y, want.y, rtol=1e-5, atol=1e-5)
    calls.clear()
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    got = selective_scan(*leaves[:6], initial_state=leaves[6], ssm_mask=knockout, backend="triton")
    assert calls and not any(calls)  # the plain scan, then the separate knockout scan
    torch.testing.assert_close(got.y.detach(), want.y, rtol=1e-5, atol=1e-5)
