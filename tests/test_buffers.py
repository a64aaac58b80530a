"""The states buffer (``tl_mamba.ops.buffers``), and the scans' states written into a
large one against independent references."""

import pytest
import torch

from tl_mamba.ops.buffers import states_buffer


def test_states_buffer_is_a_normal_tensor_under_inference_mode():
    like = torch.zeros(2, dtype=torch.bfloat16)
    with torch.inference_mode():
        buf = states_buffer((2, 3, 4, 5), like=like, dtype=torch.float32)
    assert buf.shape == (2, 3, 4, 5) and buf.dtype == torch.float32 and buf.device == like.device
    assert not buf.is_inference()  # so a hook_h edit in place bumps a version counter


def test_ssd_states_in_a_large_buffer_match_the_recurrence():
    """Mamba-2 states of 8 MiB, against ``tests.test_ssd_ops.brute_force``."""
    from tests.test_ssd_ops import brute_force
    from tl_mamba.ops.ssd import ssd_scan

    torch.manual_seed(0)
    b, p, h, hd, n = 1, 64, 4, 32, 256  # 8 MiB of fp32 states
    x = torch.randn(b, p, h, hd)
    delta = torch.rand(b, p, h) * 0.5
    A = -torch.rand(h) - 0.1
    B, C = torch.randn(b, p, 1, n), torch.randn(b, p, 1, n)
    with torch.inference_mode():
        out = ssd_scan(x, delta, A, B, C, None, return_states=True, backend="torch")
    y_ref, states_ref, _ = brute_force(x, delta, A, B, C)
    torch.testing.assert_close(out.states.double(), states_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.y.double(), y_ref, rtol=1e-5, atol=1e-5)
    assert not out.states.is_inference()


def test_selective_scan_states_in_a_large_buffer_match_the_recurrence():
    """Mamba-1 states of 8 MiB, against ``tests.test_ops.closed_form``."""
    from tests.test_ops import closed_form
    from tl_mamba.ops import selective_scan

    torch.manual_seed(1)
    b, p, e, n = 1, 8, 1024, 256  # 8 MiB of fp32 states (p small: the reference holds [p, p, e, n])
    x = torch.randn(b, p, e)
    delta = torch.rand(b, p, e) * 0.5
    A = -torch.rand(e, n) - 0.1
    B, C = torch.randn(b, p, n), torch.randn(b, p, n)
    with torch.inference_mode():
        out = selective_scan(x, delta, A, B, C, None, return_states=True, backend="torch")
    y_ref, states_ref, _ = closed_form(x, delta, A, B, C)
    torch.testing.assert_close(out.states.double(), states_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.y.double(), y_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_observing_hook_h_changes_nothing_bit_for_bit(family, mode):
    """Caching (or hooking) hook_h runs the scan into the states buffer; the logits and every
    other cached value must be exactly those of the plain forward (batch 2, several chunks),
    so that a patching experiment's effect before an edited position is exactly zero."""
    from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig

    extra = dict(d_head=8, chunk_size=4) if family == "mamba2" else {}
    cfg = HookedMambaConfig(family=family, n_layers=2, d_model=16, d_vocab=40, d_state=8, seed=3, **extra)
    model = (HookedMamba if family == "mamba1" else HookedMamba2)(cfg)
    model.set_backend("torch")
    tokens = torch.randint(0, 40, (2, 150), generator=torch.Generator().manual_seed(0))  # > 2 chunks of 64
    context = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    with context:
        logits, plain = model.run_with_cache(tokens)
        observed_logits, observed = model.run_with_cache(
            tokens, names_filter=lambda name: not name.endswith("hook_ssm_mask"))
        noop_logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_h", lambda h, hook: h)])
    assert torch.equal(observed_logits, logits) and torch.equal(noop_logits, logits)
    for name, value in plain.items():
        assert torch.equal(observed[name], value), name
    assert observed["blocks.0.hook_h"].shape[:2] == (2, 150)


def test_the_final_state_is_a_tensor_of_its_own():
    """Without autograd the last state is a slice of a chunk's buffer; the returned final state
    must be a contiguous copy (not pinning the chunk's buffer, nor aliasing the initial state)."""
    from tl_mamba.ops import selective_scan

    torch.manual_seed(2)
    b, p, e, n = 3, 70, 6, 4
    x, delta = torch.randn(b, p, e), torch.rand(b, p, e)
    A, B, C = -torch.rand(e, n), torch.randn(b, p, n), torch.randn(b, p, n)
    h0 = torch.randn(b, e, n)
    with torch.no_grad():
        for states in (False, True):
            out = selective_scan(x, delta, A, B, C, None, initial_state=h0, return_states=states, backend="torch")
            final = out.final_state
            assert final.is_contiguous() and final.untyped_storage().nbytes() == final.numel() * 4
            if states:
                torch.testing.assert_close(final, out.states[:, -1], rtol=0, atol=0)
        empty = selective_scan(x[:, :0], delta[:, :0], A, B[:, :0], C[:, :0], None, initial_state=h0, backend="torch")
        torch.testing.assert_close(empty.final_state, h0, rtol=0, atol=0)
        assert empty.final_state.data_ptr() != h0.data_ptr()


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_autograd_on_or_off_gives_the_same_logits_bit_for_bit(family):
    """A forward that records autograd (attribution patching, EAP) runs the same forward loop as
    one that does not, so its logits are exactly those of the no-grad forward: a gradient-based
    estimate and the activation patching it approximates start from the same clean run."""
    from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig

    # d_state 16: at 8 the read-outs of the two state layouts the scan once had happened to round alike
    extra = dict(d_head=8, chunk_size=4) if family == "mamba2" else {}
    cfg = HookedMambaConfig(family=family, n_layers=2, d_model=16, d_vocab=40, d_state=16, seed=5, **extra)
    model = (HookedMamba if family == "mamba1" else HookedMamba2)(cfg)
    model.set_backend("torch")
    tokens = torch.randint(0, 40, (2, 150), generator=torch.Generator().manual_seed(1))  # several chunks
    with torch.no_grad():
        plain = model(tokens)
    recorded = model(tokens)
    assert recorded.requires_grad
    assert torch.equal(recorded.detach(), plain)
