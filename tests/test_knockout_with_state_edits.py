"""A knockout and an edit of the state in the same layer compose (``tl_mamba.ops.scan_edits``).

With Δ, B, C and the edited values fixed, the edited scan's y is affine in x; the knockout
removes x_j's part of y_i for the chosen edges. That part travels through the states, except
through an entry edited in between, which holds the edit's value instead. The reference here
is a brute-force sequential loop in float64 that carries, beside the edited state, one state per
source position (x_j's part of it), and zeroes those at the edited entries: it knows nothing of
the linearity the library uses (extra scans with the edited entries erased).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig, Knockout
from tl_mamba.ops.knockout import EdgeRemoval
from tl_mamba.ops.selective_scan import selective_scan
from tl_mamba.ops.ssd import ssd_scan
from tl_mamba.ops.state_override import StateOverride

FAMILIES = ("mamba1", "mamba2")
BACKENDS = ("reference", "torch") + (("triton",) if importlib.util.find_spec("triton") else ())


def scan_inputs(family, b=2, p=9, seed=0):
    """float64 inputs of one scan: Mamba-1 e = 3, n = 2; Mamba-2 h = 4, hd = 2, g = 2, n = 3."""
    gen = torch.Generator().manual_seed(seed)
    if family == "mamba1":
        e, n = 3, 2
        x, delta = torch.randn(b, p, e, generator=gen), F.softplus(torch.randn(b, p, e, generator=gen))
        A = -torch.exp(0.5 * torch.randn(e, n, generator=gen))
        B, C = torch.randn(b, p, n, generator=gen), torch.randn(b, p, n, generator=gen)
        D, h0 = torch.randn(e, generator=gen), torch.randn(b, e, n, generator=gen)
    else:
        h, hd, g, n = 4, 2, 2, 3
        x, delta = torch.randn(b, p, h, hd, generator=gen), F.softplus(torch.randn(b, p, h, generator=gen))
        A = -torch.exp(0.5 * torch.randn(h, generator=gen))
        B, C = torch.randn(b, p, g, n, generator=gen), torch.randn(b, p, g, n, generator=gen)
        D, h0 = torch.randn(h, generator=gen), torch.randn(b, h, hd, n, generator=gen)
    return [t.double() for t in (x, delta, A, B, C, D, h0)]


def brute_force(family, x, delta, A, B, C, D, h0, keep, edit_values, edit_mask):
    """y of the edited scan, less ``Σ_j (1 - keep[i, j]) · (x_j's part of y_i)``, position by position.

    keep: ``[b, H, p, p]`` (H = 1, or Mamba-2's heads), 1 = edge kept. edit_values / edit_mask:
    ``[b, p, *state]``: where the mask is True the state after step t is the value.
    """
    b, p = x.shape[:2]
    if family == "mamba1":
        def step(t):  # (decay, write) of step t, [b, e, n]
            return torch.exp(delta[:, t, :, None] * A), (delta[:, t] * x[:, t])[..., None] * B[:, t, None, :]

        def read(state, t):  # [b, e]
            return (state * C[:, t, None, :]).sum(-1)

        def share(weight):  # [b, H] -> broadcast to [b, e]
            return weight[:, :1]
    else:
        per_group = x.shape[2] // B.shape[2]
        Bh, Ch = B.repeat_interleave(per_group, dim=2), C.repeat_interleave(per_group, dim=2)

        def step(t):  # [b, h, hd, n]
            decay = torch.exp(delta[:, t] * A)[..., None, None]
            return decay, (delta[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]

        def read(state, t):  # [b, h, hd]
            return (state * Ch[:, t, :, None, :]).sum(-1)

        def share(weight):  # [b, H] -> [b, h or 1, 1]
            return weight[..., None]

    state = h0.clone()
    parts = [torch.zeros_like(h0) for _ in range(p)]  # x_j's part of the state, per source j
    ys = []
    for t in range(p):
        decay, write = step(t)
        state = decay * state + write
        for j in range(t):
            parts[j] = decay * parts[j]
        parts[t] = write.clone()
        state = torch.where(edit_mask[:, t], edit_values[:, t], state)
        for j in range(t + 1):
            parts[j] = torch.where(edit_mask[:, t], torch.zeros_like(parts[j]), parts[j])
        y = read(state, t) + (D[:, None] * x[:, t] if family == "mamba2" else D * x[:, t])
        for j in range(t + 1):
            y = y - share(1 - keep[:, :, t, j]) * read(parts[j], t)
        ys.append(y)
    return torch.stack(ys, dim=1)


def edits(x, h0, positions, seed=1, share=0.5):
    """An override of about ``share`` of the entries at ``positions`` (the other rows' too)."""
    gen = torch.Generator().manual_seed(seed)
    shape = (x.shape[0], x.shape[1], *h0.shape[1:])
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, positions] = torch.rand(shape, generator=gen)[:, positions] < share
    return torch.randn(shape, generator=gen, dtype=torch.float64), mask


def scan(family, *args, **kwargs):
    return (selective_scan if family == "mamba1" else ssd_scan)(*args, **kwargs)


def _cases():
    """(family, backend, form, edited positions): few positions (segments) and every one (the masked
    recurrence, past 8); Mamba-1's mask has no per-head form; under Triton's interpreter (slow)
    one edit pattern per family and form."""
    for family in FAMILIES:
        for form in ("removal", "dense") + (("dense_per_head",) if family == "mamba2" else ()):
            for backend in BACKENDS:
                for positions in ([4], [2, 3, 6], list(range(9))):
                    if backend != "triton" or positions == [2, 3, 6]:
                        yield family, backend, form, positions


@pytest.mark.parametrize("family, backend, form, positions", list(_cases()))
def test_a_knockout_and_a_state_edit_compose_as_the_brute_force(family, backend, form, positions):
    x, delta, A, B, C, D, h0 = scan_inputs(family)
    b, p = x.shape[:2]
    values, mask = edits(x, h0, positions)
    override = StateOverride(values=values, mask=mask)
    heads = x.shape[2] if form == "dense_per_head" else 1
    if form == "removal":  # each row its own sources → targets
        sources, targets = torch.zeros(b, p), torch.zeros(b, p)
        sources[0, [1, 2]], targets[0, [5, 8]] = 1, 1
        sources[1, [0, 3, 4]], targets[1, [4, 7]] = 1, 1
        ssm_mask = [EdgeRemoval(sources=sources, targets=targets)]
        keep = (1 - targets[:, :, None] * sources[:, None, :])[:, None].double()  # [b, 1, i, j]
    else:  # a random mask with shares between 0 and 1: many column patterns
        keep = torch.rand(b, heads, p, p, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        keep = torch.where(keep > 0.5, torch.ones_like(keep), keep).tril()
        ssm_mask = keep
    kw = dict(initial_state=h0, backend=backend)
    if backend == "triton":  # the interpreter: float32
        x, delta, A, B, C, D, h0, values = (t.float() for t in (x, delta, A, B, C, D, h0, values))
        override = StateOverride(values=values, mask=mask)
        kw["initial_state"] = h0
        ssm_mask = ssm_mask if form == "removal" else keep.float()
    both = scan(family, x, delta, A, B, C, D, state_override=override, ssm_mask=ssm_mask, **kw).y
    want = brute_force(family, *(t.double() for t in (x, delta, A, B, C, D, h0)), keep, values.double(), mask)
    tol = dict(rtol=1e-4, atol=1e-4) if backend == "triton" else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(both.double(), want, **tol)
    # both did something: neither the edit alone nor the knockout alone gives it
    edit_only = scan(family, x, delta, A, B, C, D, state_override=override, **kw).y
    knockout_only = scan(family, x, delta, A, B, C, D, ssm_mask=ssm_mask, **kw).y
    assert (both - edit_only).abs().max() > 1e-3 and (both - knockout_only).abs().max() > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_a_mask_gradient_with_a_state_edit_is_refused(family):
    """∂L/∂mask scores the edges of the unedited scan: with an edit in the same scan it is refused,
    at the op and in the model, naming both."""
    x, delta, A, B, C, D, h0 = scan_inputs(family, p=5)
    values, mask = edits(x, h0, [2])
    heads = x.shape[2] if family == "mamba2" else 1
    leaf = torch.ones(x.shape[0], heads, 5, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="requires grad"):
        scan(family, x, delta, A, B, C, D, state_override=StateOverride(values=values, mask=mask), ssm_mask=leaf)
    with torch.no_grad():  # no gradient taken: the same call runs
        scan(family, x, delta, A, B, C, D, state_override=StateOverride(values=values, mask=mask), ssm_mask=leaf)

    model = make_model(family)
    tokens = torch.randint(0, 40, (2, 7), generator=torch.Generator().manual_seed(0))
    model.add_hook("blocks.1.hook_ssm_mask", lambda grad, hook: None, dir="bwd")
    with pytest.raises(NotImplementedError, match=r"blocks\.1\.hook_h was edited while blocks\.1\.hook_ssm_mask"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_h", zero_position(3))])
    model.reset_hooks()


def make_model(family):
    cfg = HookedMambaConfig(n_layers=2, d_model=16, d_vocab=40, d_state=4, seed=0, family=family,
                            **({"d_head": 8, "n_groups": 2} if family == "mamba2" else {}))
    model = (HookedMamba if family == "mamba1" else HookedMamba2)(cfg)
    with torch.no_grad():  # away from the random init's small values, so that every term counts
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())))
    return model.double()


def zero_position(t, share=0.5):
    def hook(h, hook):
        h = h.clone()
        gen = torch.Generator().manual_seed(t)
        mask = torch.rand(h[:, t].shape, generator=gen) < share
        h[:, t] = torch.where(mask, torch.zeros_like(h[:, t]), h[:, t])
        return h
    return hook


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_knockout_and_a_hook_h_edit_in_one_layer_of_a_model(family, backend):
    """In a model: Knockout(sources → targets) and a hook_h edit on the same layer give the logits of
    a run whose hook_y there is replaced by the brute force's y (computed from that layer's own
    hook_x, hook_delta, hook_B, hook_C, which neither changes), and each alone gives others."""
    model = make_model(family)
    model.set_backend(backend)
    tokens = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(1))
    layer, t_edit = 1, 4
    ko = Knockout(layers=[layer], sources=[1, 2], targets=[-1, 6], path="ssm")
    edit = (f"blocks.{layer}.hook_h", zero_position(t_edit))
    with model.knockouts(ko):
        both = model.run_with_hooks(tokens, fwd_hooks=[edit])

    names = [f"blocks.{layer}.hook_{k}" for k in ("x", "delta", "B", "C", "h")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    x, delta, B, C, states = (cache[name] for name in names)
    mixer = model.blocks[layer].mixer
    A, D = -torch.exp(mixer.A_log), mixer.D
    edited_states = zero_position(t_edit)(states, None)
    edit_mask = edited_states != states
    p = tokens.shape[1]
    keep = torch.ones(2, 1, p, p, dtype=torch.float64)
    for i in (p - 1, 6):
        keep[:, :, i, [1, 2]] = 0
    h0 = torch.zeros_like(states[:, 0])
    y = brute_force(family, x, delta, A, B, C, D, h0, keep, edited_states, edit_mask)
    replaced = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{layer}.hook_y", lambda _, hook: y)])
    torch.testing.assert_close(both, replaced, rtol=1e-9, atol=1e-9)
    with model.knockouts(ko):
        knockout_only = model(tokens)
    edit_only = model.run_with_hooks(tokens, fwd_hooks=[edit])
    assert (both - knockout_only).abs().max() > 1e-4 and (both - edit_only).abs().max() > 1e-4
