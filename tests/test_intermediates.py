"""Every hook value of HookedMamba (Mamba-1 and Falcon-Mamba) against an independent forward.

``reference_forward`` below is a mamba-minimal style model written from the math
in DESIGN.md: float64, an explicit Python loop over positions for the scan, the
conv as an explicit sum over taps, SiLU / softplus / RMS written out. It reads
the model's weights from ``model.state_dict()`` and uses no tl_mamba function.
It takes the same interventions as the hooks (an edit at any hook, a state
override, a hidden-attention mask), each applied at the same point, so every
intervention is checked against what the math says it should do.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import tiny_config
from tests.hook_h_checks import (check_edit_returned_in_a_narrower_dtype,
                                   check_hooks_after_an_edit_see_the_continued_states,
                                   check_int_or_bool_states_are_read_as_floats,
                                   check_probe_on_the_states_reaches_the_weights,
                                   check_states_returned_rounded_leave_the_gradients)
from tl_mamba import HookedMamba, RecurrentState

BACKENDS = ("reference", "torch")
TOL = dict(atol=1e-5, rtol=1e-5)
B_SIZE, P = 2, 10


# ----------------------------------------------------------------------------- the reference
def reference_forward(
    model: HookedMamba,
    tokens: torch.Tensor,
    edits: Optional[Dict[str, Callable]] = None,
    h_edits: Optional[Dict[int, Callable]] = None,
    masks: Optional[Dict[int, torch.Tensor]] = None,
    weights: Optional[Dict[str, torch.Tensor]] = None,
):
    """Returns ``(logits [b,p,v], acts {hook name: value}, final_states {layer: [b,e,n]})`` in float64.

    edits: hook name -> fn(value) -> new value, applied where that hook sits.
    h_edits: layer -> fn(t, h_t [b,e,n]) -> h_t, applied right after step t of the
        recurrence, which then continues from the returned state.
    masks: layer -> M [b,1,p,p] (1 = kept); y_i = Σ_{j≤i} M[i,j] α[i,j] x_j + D x_i with α
        built explicitly from Δ, A, B, C.
    """
    cfg = model.cfg
    W = weights if weights is not None else {k: v.detach().double() for k, v in model.state_dict().items()}
    edits, h_edits, masks = edits or {}, h_edits or {}, masks or {}
    e, n, r, k = cfg.d_inner, cfg.d_state, cfg.dt_rank, cfg.d_conv
    acts: Dict[str, torch.Tensor] = {}
    finals: Dict[int, torch.Tensor] = {}

    def hook(name, value):
        if name in edits:
            value = edits[name](value)
        acts[name] = value
        return value

    def silu(v):
        return v / (1 + torch.exp(-v))

    def softplus(v):
        return torch.where(v > 30, v, torch.log1p(torch.exp(torch.clamp(v, max=30))))

    def rms(v, eps):
        return torch.sqrt((v * v).mean(-1, keepdim=True) + eps)

    def linear(v, name):
        out = v @ W[name + ".weight"].T
        return out + W[name + ".bias"] if name + ".bias" in W else out

    b, p = tokens.shape
    resid = hook("hook_embed", W["embed.W_E"][tokens])
    for layer in range(cfg.n_layers):
        pre = f"blocks.{layer}."
        mx = pre + "mixer."
        resid_pre = hook(pre + "hook_resid_pre", resid)
        mixer_in = hook(pre + "hook_mixer_in", resid_pre)
        scale = hook(pre + "ln1.hook_scale", rms(mixer_in, cfg.eps))
        normalized = hook(pre + "ln1.hook_normalized", mixer_in / scale)
        xz = linear(normalized * W[pre + "ln1.w"], mx + "in_proj")
        conv_in = hook(pre + "hook_conv_in", xz[..., :e])
        z = hook(pre + "hook_z", xz[..., e:])
        # causal depthwise conv: conv[t] = bias + Σ_i w[:, i] · conv_in[t - (k-1) + i], zeros before 0
        w = W[mx + "conv1d.weight"][:, 0, :]  # [e, k]
        conv = torch.zeros(b, p, e, dtype=torch.float64)
        for t in range(p):
            for i in range(k):
                src = t - (k - 1) + i
                if src >= 0:
                    conv[:, t] += w[:, i] * conv_in[:, src]
        if mx + "conv1d.bias" in W:
            conv = conv + W[mx + "conv1d.bias"]
        conv = hook(pre + "hook_conv", conv)
        x = hook(pre + "hook_x", silu(conv))
        dbc = x @ W[mx + "x_proj.weight"].T
        dt_low, Bm, Cm = dbc[..., :r], dbc[..., r : r + n], dbc[..., r + n :]
        if cfg.bcdt_rms_eps is not None:  # Falcon-Mamba: weightless RMS norm on each
            dt_low, Bm, Cm = (v / rms(v, cfg.bcdt_rms_eps) for v in (dt_low, Bm, Cm))
        dt_low = hook(pre + "hook_dt_low", dt_low)
        Bm = hook(pre + "hook_B", Bm)
        Cm = hook(pre + "hook_C", Cm)
        delta = hook(pre + "hook_delta", softplus(dt_low @ W[mx + "dt_proj.weight"].T + W[mx + "dt_proj.bias"]))
        A = -torch.exp(W[mx + "A_log"])  # [e, n]
        Dv = W[mx + "D"]
        h = torch.zeros(b, e, n, dtype=torch.float64)
        states = []
        for t in range(p):
            h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t] * x[:, t])[:, :, None] * Bm[:, t, None, :]
            if layer in h_edits:
                h = h_edits[layer](t, h)
            states.append(h)
        finals[layer] = h
        acts[pre + "hook_h"] = torch.stack(states, dim=1)
        if layer in masks:
            M = masks[layer]
            y = Dv * x  # the skip is never masked
            for i in range(p):
                for j in range(i + 1):
                    decay = torch.exp(delta[:, j + 1 : i + 1].sum(1)[:, :, None] * A)  # Π_{k=j+1..i} exp(Δ_k A)
                    alpha = (Cm[:, i, None, :] * decay * delta[:, j, :, None] * Bm[:, j, None, :]).sum(-1)  # [b, e]
                    y[:, i] = y[:, i] + M[:, 0, i, j, None].double() * alpha * x[:, j]
        else:
            y = torch.stack([(s * Cm[:, t, None, :]).sum(-1) for t, s in enumerate(states)], dim=1) + Dv * x
        y = hook(pre + "hook_y", y)
        gate = hook(pre + "hook_gate", silu(z))
        y_gated = hook(pre + "hook_y_gated", y * gate)
        mixer_out = hook(pre + "hook_mixer_out", linear(y_gated, mx + "out_proj"))
        resid = hook(pre + "hook_resid_post", resid_pre + mixer_out)
    scale = hook("ln_final.hook_scale", rms(resid, cfg.eps))
    normalized = hook("ln_final.hook_normalized", resid / scale)
    W_U = W["unembed.weight"] if "unembed.weight" in W else W["embed.W_E"]
    logits = (normalized * W["ln_final.w"]) @ W_U.T
    return logits, acts, finals


# ----------------------------------------------------------------------------- models
def _perturbed(model: HookedMamba, seed: int) -> HookedMamba:
    """Move the weights off their structured init (S4D-real A, D = 1, unit norms, zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in model.blocks:
            m = block.mixer
            m.A_log.add_(0.5 * torch.randn(m.A_log.shape, generator=g))
            m.D.copy_(torch.randn(m.D.shape, generator=g))
            m.dt_proj.bias.copy_(0.7 * torch.randn(m.dt_proj.bias.shape, generator=g) - 1.0)
            m.conv1d.weight.mul_(1 + torch.rand(m.conv1d.weight.shape, generator=g))
            for bias in (m.conv1d.bias, m.in_proj.bias, m.out_proj.bias):
                if bias is not None:
                    bias.copy_(0.2 * torch.randn(bias.shape, generator=g))
            block.ln1.w.copy_(1 + 0.3 * torch.randn(block.ln1.w.shape, generator=g))
        model.ln_final.w.copy_(1 + 0.3 * torch.randn(model.ln_final.w.shape, generator=g))
        model.embed.W_E.mul_(20)  # initializer_range 0.02 is tiny; make the residual O(0.5)
        if not model.cfg.tie_embeddings:
            model.unembed.weight.mul_(20)  # and the logits O(1)
    return model.eval()


VARIANTS = {
    # Mamba-1 with in/out projection biases and an untied lm_head
    "mamba": dict(proj_bias=True, tie_embeddings=False),
    # Falcon-Mamba (weightless RMS on dt_low, B, C), no conv bias, tied
    "falcon": dict(bcdt_rms_eps=1e-6, conv_bias=False),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request):
    return _perturbed(HookedMamba(tiny_config(**VARIANTS[request.param])), seed=7)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 48, (B_SIZE, P), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def plain_ref(model, tokens):
    """The reference forward with no intervention (logits, acts, final states)."""
    return reference_forward(model, tokens)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(model, tokens, backend, hooks=(), state=None):
    """Logits and the full cache (heavy hooks included) with extra hooks attached first."""
    model.set_backend(backend)
    model.reset_hooks()
    for name, fn in hooks:
        model.add_hook(name, fn)
    try:
        logits, cache = model.run_with_cache(tokens, names_filter=lambda name: True, state=state)
    finally:
        model.reset_hooks()
    return logits, cache


def _assert_acts_match(cache, acts, skip=()):
    compared = 0
    for name, expected in acts.items():
        if name in skip:
            continue
        got = cache[name]
        assert got.shape == expected.shape, name
        torch.testing.assert_close(got.double(), expected, **TOL, msg=lambda m: f"{name}: {m}")
        compared += 1
    return compared


# ----------------------------------------------------------------------------- plain forward
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_hook_matches_reference(model, tokens, backend):
    logits, cache = _run(model, tokens, backend)
    ref_logits, acts, _ = reference_forward(model, tokens)  # fresh, not the shared fixture
    hook_names = set(model.hook_dict) - {f"blocks.{l}.hook_ssm_mask" for l in range(model.cfg.n_layers)}
    assert hook_names == set(acts), "the reference covers every hook (hook_ssm_mask checked below)"
    assert _assert_acts_match(cache, acts) == len(hook_names)
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)
    for layer in range(model.cfg.n_layers):
        mask = cache[f"blocks.{layer}.hook_ssm_mask"]
        assert mask.shape == (B_SIZE, 1, P, P) and bool((mask == 1).all())
    # the values are not degenerate
    assert acts["blocks.1.hook_h"].abs().max() > 0.05
    assert acts["blocks.0.hook_delta"].std() > 0.05


def test_reference_forward_agrees_with_plain_model_logits(model, tokens, plain_ref):
    """The same weights through the model with no hooks at all (the fast path)."""
    ref_logits, _, _ = plain_ref
    for backend in BACKENDS:
        model.set_backend(backend)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).double(), ref_logits, **TOL)


def test_heavy_hooks_only_on_request(model, tokens, plain_ref):
    model.set_backend("torch")
    _, cache = model.run_with_cache(tokens)
    keys = list(cache.keys())
    assert not [k for k in keys if k.endswith("hook_h") or k.endswith("hook_ssm_mask")]
    assert "blocks.0.hook_y" in keys and "blocks.1.hook_x" in keys
    _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_h", "blocks.0.hook_ssm_mask"])
    assert set(cache.keys()) == {"blocks.1.hook_h", "blocks.0.hook_ssm_mask"}
    e, n = model.cfg.d_inner, model.cfg.d_state
    assert cache["blocks.1.hook_h"].shape == (B_SIZE, P, e, n)
    assert cache["blocks.0.hook_ssm_mask"].shape == (B_SIZE, 1, P, P)
    _, acts, _ = plain_ref
    torch.testing.assert_close(cache["blocks.1.hook_h"].double(), acts["blocks.1.hook_h"], **TOL)


# ----------------------------------------------------------------------------- hook edits
def _noise(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _additive(scale):
    def make(shape, seed):
        noise = _noise(shape, seed) * scale
        return lambda v: v + noise.to(v.dtype)

    return make


def _multiplicative(shape, seed):  # keeps Δ and the RMS scale positive
    factor = 1 + 0.5 * torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lambda v: v * factor.to(v.dtype)


EDITS = {
    "hook_embed": _additive(0.3),
    "blocks.0.hook_resid_pre": _additive(0.3),
    "blocks.0.hook_mixer_in": _additive(0.3),
    "blocks.0.ln1.hook_scale": _multiplicative,
    "blocks.0.ln1.hook_normalized": _additive(0.5),
    "blocks.0.hook_conv_in": _additive(0.5),
    "blocks.0.hook_conv": _additive(0.5),
    "blocks.0.hook_x": _additive(0.5),
    "blocks.0.hook_z": _additive(0.5),
    "blocks.0.hook_gate": _additive(0.5),
    "blocks.0.hook_dt_low": _additive(0.5),
    "blocks.0.hook_delta": _multiplicative,
    "blocks.0.hook_B": _additive(0.5),
    "blocks.0.hook_C": _additive(0.5),
    "blocks.0.hook_y": _additive(0.5),
    "blocks.0.hook_y_gated": _additive(0.5),
    "blocks.0.hook_mixer_out": _additive(0.3),
    "blocks.1.hook_delta": _multiplicative,
    "ln_final.hook_normalized": _additive(0.3),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(EDITS))
def test_hook_edit_propagates_like_reference(model, tokens, plain_ref, backend, name):
    _, plain_acts, _ = plain_ref
    edit = EDITS[name](plain_acts[name].shape, seed=list(EDITS).index(name))
    logits, cache = _run(model, tokens, backend, hooks=[(name, lambda v, hook: edit(v))])
    ref_logits, acts, _ = reference_forward(model, tokens, edits={name: edit})
    _assert_acts_match(cache, acts)
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)
    # the edit changed the output (so the comparison above is not vacuous)
    with torch.no_grad():
        plain = model(tokens)
    assert (logits - plain).abs().max() > 1e-3, "the edit should change the logits well beyond the tolerance"


# ----------------------------------------------------------------------------- hook_h overrides
def _zero_at(t):
    def out_of_place(h, hook):
        h = h.clone()
        h[:, t] = 0
        return h

    def in_place(h, hook):
        h[:, t] = 0

    def ref(tt, h):
        return torch.zeros_like(h) if tt == t else h

    return out_of_place, in_place, ref


def _some_entries_at(t, e, n, value=2.5):
    sel = torch.zeros(e, n, dtype=torch.bool)
    sel[::3, 1::2] = True  # some channels, some state dims

    def out_of_place(h, hook):
        h = h.clone()
        h[:, t][:, sel] = value
        return h

    def in_place(h, hook):
        h[:, t, sel] = value

    def ref(tt, h):
        return torch.where(sel, torch.full_like(h, value), h) if tt == t else h

    return out_of_place, in_place, ref


def _several_positions(e, n):
    # zero at 2, one channel set to 3.0 at 5, one (e, n) entry set to -4.0 at 8
    def edit(h):
        h[:, 2] = 0
        h[:, 5, 1] = 3.0
        h[:, 8, e - 1, n - 1] = -4.0

    def out_of_place(h, hook):
        h = h.clone()
        edit(h)
        return h

    def in_place(h, hook):
        edit(h)

    def ref(tt, h):
        h = h.clone()
        if tt == 2:
            h[:] = 0
        elif tt == 5:
            h[:, 1] = 3.0
        elif tt == 8:
            h[:, e - 1, n - 1] = -4.0
        return h

    return out_of_place, in_place, ref


H_EDITS = {
    "zero-t3": lambda e, n: _zero_at(3),
    "zero-t0": lambda e, n: _zero_at(0),
    "zero-last": lambda e, n: _zero_at(P - 1),
    "some-entries-t4": lambda e, n: _some_entries_at(4, e, n),
    "several-positions": _several_positions,
}

H_CASES = [  # (case, style, layer)
    ("zero-t3", "out_of_place", 0), ("zero-t3", "in_place", 0),
    ("zero-t3", "out_of_place", 1), ("zero-t3", "in_place", 1),
    ("zero-t0", "out_of_place", 0), ("zero-last", "in_place", 1),
    ("some-entries-t4", "out_of_place", 0), ("some-entries-t4", "in_place", 0),
    ("several-positions", "out_of_place", 1), ("several-positions", "in_place", 1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,style,layer", H_CASES)
def test_hook_h_override_continues_recurrence(model, tokens, plain_ref, backend, style, layer, case):
    e, n = model.cfg.d_inner, model.cfg.d_state
    out_of_place, in_place, ref_edit = H_EDITS[case](e, n)
    fn = out_of_place if style == "out_of_place" else in_place
    state = RecurrentState.empty(model.cfg.n_layers)  # exposes each layer's final SSM state
    logits, cache = _run(model, tokens, backend, hooks=[(f"blocks.{layer}.hook_h", fn)], state=state)
    ref_logits, acts, finals = reference_forward(model, tokens, h_edits={layer: ref_edit})
    # the cache (its hook follows the edit) holds the states the recurrence continued into, as the
    # reference's (it held the unedited states after t, which y was never read from)
    assert _assert_acts_match(cache, acts) == len(acts)
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)
    for l in range(model.cfg.n_layers):
        torch.testing.assert_close(state.layers[l]["ssm"].double(), finals[l], **TOL)
    _, plain_acts, _ = plain_ref
    y = f"blocks.{layer}.hook_y"
    assert (acts[y] - plain_acts[y]).abs().max() > 1e-3  # the override mattered
    if case == "zero-t3":
        # before t nothing changed; from t on, y is read from the continued recurrence
        torch.testing.assert_close(cache[y][:, :3].double(), plain_acts[y][:, :3], **TOL)
        # y_3 = h_3·C_3 + D x_3 with h_3 = 0: only the skip is left
        D = model.blocks[layer].mixer.D.double()
        torch.testing.assert_close(cache[y][:, 3].double(), D * acts[f"blocks.{layer}.hook_x"][:, 3], **TOL)
        # and y_4 comes from h_4 = B̄_4 x_4 alone (the decayed zero state contributes nothing)
        assert (cache[y][:, 4:] - plain_acts[y][:, 4:]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("style", ["out_of_place", "in_place"])
def test_hook_h_edit_without_autograd(model, tokens, mode, style):
    """Edits are honoured under no_grad and inference_mode too, in place or not (inference
    tensors have no version counter, so the states are computed outside inference mode)."""
    out_of_place, in_place, ref_edit = _zero_at(3)
    fn = out_of_place if style == "out_of_place" else in_place
    model.set_backend("torch")
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_h", fn)])
    ref_logits, _, _ = reference_forward(model, tokens, h_edits={1: ref_edit})
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)
    with torch.inference_mode():  # a cache under inference mode still holds the states
        _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_h")
    _, acts, _ = reference_forward(model, tokens)
    torch.testing.assert_close(cache["blocks.1.hook_h"].double(), acts["blocks.1.hook_h"], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_h_multiplicative_edit_at_several_positions(model, tokens, plain_ref, backend):
    """One hook call sees every state of the unedited scan; the entries it changes are fixed to the
    values it wrote (2 x the unedited state at t = 2 and t = 6), and the recurrence continues from them."""
    layer = 0
    _, plain_acts, _ = plain_ref
    written = 2 * plain_acts[f"blocks.{layer}.hook_h"]

    def fn(h, hook):
        h = h.clone()
        h[:, [2, 6]] *= 2
        return h

    def ref(t, h):
        return written[:, t] if t in (2, 6) else h

    logits, cache = _run(model, tokens, backend, hooks=[(f"blocks.{layer}.hook_h", fn)])
    ref_logits, acts, _ = reference_forward(model, tokens, h_edits={layer: ref})
    assert _assert_acts_match(cache, acts) == len(acts)  # the cached states, continued from the edits, too
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)


def test_hook_h_returning_same_values_changes_nothing(model, tokens):
    """A hook that returns an equal (copied) tensor is not an edit. (Materialising the states is
    another float32 route than the plain scan: the file's tolerance, not a tighter one; on this
    repository's 2026-12-06 machine one logit of 960 differed by 1.2e-6.)"""
    model.set_backend("torch")
    with torch.no_grad():
        plain = model(tokens)
    logits, _ = _run(model, tokens, "torch", hooks=[("blocks.0.hook_h", lambda h, hook: h.clone())])
    torch.testing.assert_close(logits, plain, **TOL)


# ----------------------------------------------------------------------------- gradients
GRAD_HOOKS = ["hook_embed", "blocks.0.hook_x", "blocks.0.hook_delta", "blocks.0.hook_B", "blocks.1.hook_resid_pre",
              "blocks.1.hook_conv", "blocks.1.hook_y", "ln_final.hook_scale"]


def _reference_loss_grads(model, tokens, names):
    """d loss / d (value at each hook), by autograd through the reference forward."""
    leaves = {}

    def make_leaf(name):
        def edit(v):
            leaves[name] = v.detach().requires_grad_()
            return leaves[name]

        return edit

    logits, _, _ = reference_forward(model, tokens, edits={name: make_leaf(name) for name in names})
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, [leaves[name] for name in names])
    return loss, dict(zip(names, grads))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_cache_matches_reference_autograd(model, tokens, backend):
    model.set_backend(backend)
    loss, cache = model.run_with_cache(tokens, incl_bwd=True, return_type="loss")
    # one hook at a time: each gradient is the total derivative of the loss w.r.t. that value
    for name in GRAD_HOOKS:
        ref_loss, grads = _reference_loss_grads(model, tokens, [name])
        torch.testing.assert_close(loss.double(), ref_loss.detach(), **TOL)
        got = cache[name + "_grad"]
        assert got.abs().max() > 0, name
        torch.testing.assert_close(got.double(), grads[name], atol=1e-7, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_h_gradient_is_total_derivative(model, tokens, backend):
    """Perturbing h_t (one position) through hook_h changes h_{t+1}, ... (the override continues
    the recurrence), so d loss / d h_t includes that path: in the reference, autograd w.r.t. the
    intermediate state h_t gives exactly that total derivative."""
    model.set_backend(backend)
    _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_h", incl_bwd=True, return_type="loss")
    model.zero_grad(set_to_none=True)
    states = []

    def keep(t, h):
        states.append(h)
        return h

    weights = {k: v.detach().double() for k, v in model.state_dict().items()}
    logits, _, _ = reference_forward(model, tokens, h_edits={0: keep}, weights=weights,
                                     edits={"hook_embed": lambda v: v.detach().requires_grad_()})
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    grads = torch.autograd.grad(loss, states)
    torch.testing.assert_close(cache["blocks.0.hook_h_grad"].double(), torch.stack(grads, dim=1), atol=1e-7, rtol=1e-4)


# ----------------------------------------------------------------------------- hook_ssm_mask
def _mask_general(b, p):
    g = torch.Generator().manual_seed(5)
    return (torch.rand(b, 1, p, p, generator=g) < 0.6).float()  # per batch row, random (above-diagonal ignored)


def _mask_sources_to_last(b, p):
    M = torch.ones(b, 1, p, p)
    M[:, 0, p - 1, [1, 2]] = 0
    return M


def _mask_per_row(b, p):
    M = torch.ones(b, 1, p, p)
    M[0, 0, 6:, :3] = 0  # row 0: early sources cut from late targets
    M[1, 0, :, 4] = 0  # row 1: source 4 cut from everything, its own diagonal included
    M[1, 0, 7, 7] = 0
    return M


MASKS = {"general": _mask_general, "sources-to-last": _mask_sources_to_last, "per-row": _mask_per_row}


def _tril(M):
    return M * torch.ones(M.shape[-1], M.shape[-1]).tril()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("kind", list(MASKS))
def test_ssm_mask_equals_masked_hidden_attention(model, tokens, plain_ref, backend, layer, kind):
    M = MASKS[kind](B_SIZE, P)

    def zero_entries(mask, hook):
        return mask * M

    logits, cache = _run(model, tokens, backend, hooks=[(f"blocks.{layer}.hook_ssm_mask", zero_entries)])
    ref_logits, acts, _ = reference_forward(model, tokens, masks={layer: _tril(M)})
    # the cached hook_h holds the states of the unmasked scan (a knockout has no single state sequence)
    _assert_acts_match(cache, acts, skip={f"blocks.{layer}.hook_h"})
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)
    torch.testing.assert_close(cache[f"blocks.{layer}.hook_ssm_mask"], M)
    _, plain_acts, _ = plain_ref
    y = f"blocks.{layer}.hook_y"
    changed = (acts[y] - plain_acts[y]).abs().amax(-1)  # [b, p]
    lower = torch.ones(P, P, dtype=torch.bool).tril()
    targets = ((M == 0) & lower).any(-1)[:, 0]  # [b, p]: rows with a knocked-out edge (j ≤ i)
    assert bool((changed[targets] > 1e-4).all())
    assert bool((changed[~targets] < 1e-9).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_mask_all_zero_leaves_only_D_skip(model, tokens, backend):
    _, cache = _run(model, tokens, backend, hooks=[("blocks.1.hook_ssm_mask", lambda m, hook: torch.zeros_like(m))])
    D = model.blocks[1].mixer.D.double()
    torch.testing.assert_close(cache["blocks.1.hook_y"].double(), D * cache["blocks.1.hook_x"].double(), **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_mask_with_h_edit_in_same_layer_composes(model, tokens, backend):
    """Every edge knocked out and every state zeroed in one layer: the states hold nothing, and the
    knockout removes the sources' part of y, which stops at the edited (all) entries, so y = D·x.
    (Had the knockout subtracted the unedited scan's terms, y would be D·x - α·x.)"""
    hooks = [("blocks.0.hook_ssm_mask", lambda m, hook: torch.zeros_like(m)),
             ("blocks.0.hook_h", lambda h, hook: torch.zeros_like(h))]
    _, cache = _run(model, tokens, backend, hooks=hooks)
    D = model.blocks[0].mixer.D.double()
    torch.testing.assert_close(cache["blocks.0.hook_y"].double(), D * cache["blocks.0.hook_x"].double(), **TOL)


STATE_EDITS = {
    "scale": lambda h, hook: h * 0.7,  # every entry edited, as a function of h
    "in place at one position": lambda h, hook: h.__setitem__((slice(None), 3), h[:, 3] * 2.0) or h,
    "add a steering vector": lambda h, hook: h + 0.3,
    "one position from another": lambda h, hook: torch.cat([h[:, :4], h[:, 4:5] + h[:, 2:3], h[:, 5:]], 1),
    "set to a constant": lambda h, hook: h.__setitem__((slice(None), 3), 0.0) or h,
    "observe only": lambda h, hook: h,
}


@pytest.mark.parametrize("p", [7, 12])
@pytest.mark.parametrize("edit", list(STATE_EDITS))
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_gradient_through_a_hook_h_edit_matches_finite_differences(family, backend, edit, p):
    """An edit that is a function of h (h * 0.7, h + v) carries the gradient back through the
    states into the parameters (it was dropped: only the edited values' own gradient remained).
    Reference: central finite differences along random directions, float64. At p = 12 the edits
    of every position pass RECURRENCE_AFTER_EDITS and take the masked recurrence; at p = 7 the
    segments."""
    from test_knockout import make_model  # tiny float64 models

    model = make_model(family)
    model.set_backend(backend)
    tokens = torch.randint(0, 50, (2, p), generator=torch.Generator().manual_seed(1))

    def loss():
        logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_h", STATE_EDITS[edit])])
        return logits[:, -2:, :7].pow(2).sum()

    params = [model.embed.W_E, model.blocks[0].mixer.in_proj.weight, model.blocks[1].mixer.A_log,
              model.blocks[1].mixer.in_proj.weight]
    model.zero_grad()
    loss().backward()
    gen = torch.Generator().manual_seed(3)
    for param in params:
        direction = torch.randn(param.shape, generator=gen, dtype=param.dtype) * 1e-6
        with torch.no_grad():
            param.add_(direction)
            plus = loss().item()
            param.sub_(2 * direction)
            minus = loss().item()
            param.add_(direction)
        assert (param.grad * direction).sum().item() == pytest.approx((plus - minus) / 2, rel=1e-4, abs=1e-13)


def test_gradient_through_a_hook_h_edit_twice_with_retain_graph():
    """backward(retain_graph=True) and a second backward give the same gradient (the edit's
    gradient route keeps what it needs for a second pass)."""
    from test_knockout import make_model

    model = make_model("mamba2")
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_h", STATE_EDITS["scale"])])[:, -1].pow(2).sum()
    first = torch.autograd.grad(loss, model.embed.W_E, retain_graph=True)[0]
    second = torch.autograd.grad(loss, model.embed.W_E)[0]
    assert first.abs().sum() > 0
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["hook_conv_in", "hook_conv", "hook_x", "hook_dt_low"])
def test_bf16_model_takes_fp32_patches(name):
    """Patching a bf16 Mamba-1 from an fp32 run's cache: the hook's fp32 value is read as bf16, as if
    the patch had been cast first (it raised a dtype mismatch in the next matmul)."""
    from test_knockout import make_model

    fp32 = make_model("mamba1").float()
    bf16 = make_model("mamba1").to(torch.bfloat16)
    tokens = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    _, cache = fp32.run_with_cache(tokens)
    hook = f"blocks.1.{name}"
    with torch.no_grad():
        patched = bf16.run_with_hooks(tokens, fwd_hooks=[(hook, lambda act, hook: cache[hook.name])])
        cast = bf16.run_with_hooks(tokens, fwd_hooks=[(hook, lambda act, hook: cache[hook.name].to(torch.bfloat16))])
    assert patched.dtype == torch.bfloat16
    torch.testing.assert_close(patched, cast, rtol=0, atol=0)


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_h_edit_returned_in_a_narrower_dtype_continues_the_recurrence(model, tokens, backend, narrow):
    check_edit_returned_in_a_narrower_dtype(model, tokens, backend, narrow, _run, reference_forward)


@pytest.mark.parametrize("name", ["hook_resid_pre", "hook_z", "hook_gate", "hook_B", "hook_C", "hook_delta",
                                  "hook_y", "hook_mixer_out"])
def test_float64_patch_into_a_float32_model_is_read_as_float32(model, tokens, name):
    """A float64 hook value (a steering vector, a patch from a float64 run) is read in the dtype of
    the activation it replaces: the same logits as the patch cast first, and the rest of the forward
    stays float32 (a float64 residual stream used to spread into every later hook and cache entry)."""
    hook = f"blocks.0.{name}"
    model.set_backend("torch")
    _, cache = model.run_with_cache(tokens, names_filter=hook)
    patch = cache[hook].double() * 1.5 + 0.01

    def run(value):
        return _run(model, tokens, "torch", hooks=[(hook, lambda act, hook: value)])

    (patched, patched_cache), (cast, _) = run(patch), run(patch.to(cache[hook].dtype))
    torch.testing.assert_close(patched, cast, rtol=0, atol=0)
    # (the cache at the patched hook holds what the hook returned: the cast comes after its hooks)
    assert patched_cache["blocks.1.hook_resid_pre"].dtype == torch.float32
    assert patched_cache["blocks.0.hook_resid_post"].dtype == torch.float32


def test_observing_the_gate_leaves_bf16_logits_unchanged():
    """In a bf16 Mamba-1 the scan gates y in fp32 (silu of z upcast); with hook_y or hook_gate hooked the
    block gates instead, and it took silu in bf16: a no-op hook (any run_with_cache) moved the logits
    by ~5e-3 (0.125 on the toy model)."""
    from test_knockout import make_model

    bf16 = make_model("mamba1").to(torch.bfloat16)
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = bf16(tokens)
        for name in ("hook_y", "hook_gate"):
            observed = bf16.run_with_hooks(tokens, fwd_hooks=[(f"blocks.1.{name}", lambda act, hook: None)])
            torch.testing.assert_close(observed, plain, rtol=0, atol=0)
        _, cache = bf16.run_with_cache(tokens)
    assert cache["blocks.1.hook_gate"].dtype == torch.float32  # as Mamba-2's, and the fused gate's precision


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loss_term_read_from_hook_h_reaches_the_weights(model, tokens, backend):
    probe = torch.randn(model.cfg.d_inner, model.cfg.d_state, generator=torch.Generator().manual_seed(11))
    check_probe_on_the_states_reaches_the_weights(model, tokens, backend, probe, reference_forward)


@pytest.mark.parametrize("backend", BACKENDS)
def test_states_returned_rounded_to_bf16_leave_the_gradients(model, tokens, backend):
    check_states_returned_rounded_leave_the_gradients(model, tokens, backend, reference_forward)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_h_int_or_bool_return_is_read_as_floats(model, tokens, backend, dtype):
    check_int_or_bool_states_are_read_as_floats(model, tokens, backend, dtype, _run, reference_forward)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_after_a_hook_h_edit_see_the_continued_states(model, tokens, backend):
    probe = torch.randn(model.cfg.d_inner, model.cfg.d_state, generator=torch.Generator().manual_seed(12))
    check_hooks_after_an_edit_see_the_continued_states(model, tokens, backend, probe, reference_forward)
