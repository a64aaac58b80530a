"""Every hook of HookedMamba2 against an independent sequential reference.

``reference_forward`` below is Mamba-2 written out from the math in DESIGN.md
("Mamba-2 block"), in float64, with no tl_mamba function: the in_proj split
[z (e), xBC (e+2gn), dt (h)], the causal depthwise conv as an explicit sum over
taps, SiLU, the x/B/C split, Δ = clamp(softplus(dt + dt_bias), dt_limit), a
Python loop over positions for the recurrence (head i reads the B and C of group
i // (h/g)), y = h·C + D x, the gate, the grouped RMSNorm over e/g channels and
out_proj. It reads the weights from ``model.state_dict()``.

It takes the same interventions as the hooks, each applied where that hook sits:
an edit of any hook value, an override of the state after step t (the recurrence
continues from it) and a per-head hidden-attention mask, for which y is computed
from an explicit α[i, j] = (C_i·B_j)·exp(Σ_{k=j+1..i} Δ_k A)·Δ_j instead of the
recurrence. Every check runs on the "reference" and "torch" scan backends.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F

from tests.hook_h_checks import (check_edit_returned_in_a_narrower_dtype,
                                   check_hooks_after_an_edit_see_the_continued_states,
                                   check_int_or_bool_states_are_read_as_floats,
                                   check_probe_on_the_states_reaches_the_weights,
                                   check_states_returned_rounded_leave_the_gradients)
from tl_mamba import HookedMamba2, HookedMambaConfig, RecurrentState

BACKENDS = ("reference", "torch")
TOL = dict(atol=1e-5, rtol=1e-5)
B_SIZE, P = 2, 10
VOCAB = 40


# ----------------------------------------------------------------------------- the reference
def _silu(v):
    return v / (1 + torch.exp(-v))


def _softplus(v):
    return torch.where(v > 30, v, torch.log1p(torch.exp(torch.clamp(v, max=30))))


def _rms(v, eps):
    return torch.sqrt((v * v).mean(-1, keepdim=True) + eps)


def reference_forward(
    model: HookedMamba2,
    tokens: torch.Tensor,
    edits: Optional[Dict[str, Callable]] = None,
    h_edits: Optional[Dict[int, Callable]] = None,
    masks: Optional[Dict[int, torch.Tensor]] = None,
    weights: Optional[Dict[str, torch.Tensor]] = None,
):
    """Returns ``(logits [b,p,v], acts {hook name: value}, final states {layer: [b,h,hd,n]})`` in float64.

    edits: hook name -> fn(value) -> new value, applied where that hook sits.
    h_edits: layer -> fn(t, h_t [b,h,hd,n]) -> h_t, applied right after step t; the
        recurrence continues from the returned state.
    masks: layer -> M [b,h,p,p] (1 = kept): y_i = D x_i + Σ_{j≤i} M[i,j] α[i,j] x_j per head,
        with α built explicitly.
    """
    cfg = model.cfg
    W = weights if weights is not None else {k: v.detach().double() for k, v in model.state_dict().items()}
    edits, h_edits, masks = edits or {}, h_edits or {}, masks or {}
    e, n, k = cfg.d_inner, cfg.d_state, cfg.d_conv
    h, hd, g = cfg.n_heads, cfg.d_head, cfg.n_groups
    lo, hi = cfg.dt_limit
    group_of_head = torch.tensor([i // (h // g) for i in range(h)])
    acts: Dict[str, torch.Tensor] = {}
    finals: Dict[int, torch.Tensor] = {}

    def hook(name, value):
        if name in edits:
            value = edits[name](value)
        acts[name] = value
        return value

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
        scale = hook(pre + "ln1.hook_scale", _rms(mixer_in, cfg.eps))
        normalized = hook(pre + "ln1.hook_normalized", mixer_in / scale)
        proj = linear(normalized * W[pre + "ln1.w"], mx + "in_proj")  # [b, p, 2e + 2gn + h]
        assert proj.shape[-1] == 2 * e + 2 * g * n + h
        z = hook(pre + "hook_z", proj[..., :e].reshape(b, p, h, hd))
        conv_in = hook(pre + "hook_conv_in", proj[..., e : 2 * e + 2 * g * n])
        dt_raw = hook(pre + "hook_delta_raw", proj[..., 2 * e + 2 * g * n :])
        # causal depthwise conv over xBC: conv[t] = bias + Σ_i w[:, i] · conv_in[t - (k-1) + i]
        w = W[mx + "conv1d.weight"][:, 0, :]  # [e+2gn, k]
        conv = torch.zeros(b, p, e + 2 * g * n, dtype=torch.float64)
        for t in range(p):
            for i in range(k):
                src = t - (k - 1) + i
                if src >= 0:
                    conv[:, t] += w[:, i] * conv_in[:, src]
        if mx + "conv1d.bias" in W:
            conv = conv + W[mx + "conv1d.bias"]
        conv = hook(pre + "hook_conv", conv)
        xBC = _silu(conv)
        x = hook(pre + "hook_x", xBC[..., :e].reshape(b, p, h, hd))
        Bm = hook(pre + "hook_B", xBC[..., e : e + g * n].reshape(b, p, g, n))
        Cm = hook(pre + "hook_C", xBC[..., e + g * n :].reshape(b, p, g, n))
        delta = hook(pre + "hook_delta", torch.clamp(_softplus(dt_raw + W[mx + "dt_bias"]), min=lo, max=hi))
        A = -torch.exp(W[mx + "A_log"])  # [h]
        Dv = W[mx + "D"]  # [h]
        Bh, Ch = Bm[:, :, group_of_head], Cm[:, :, group_of_head]  # [b, p, h, n]: each head's group
        state = torch.zeros(b, h, hd, n, dtype=torch.float64)
        states = []
        for t in range(p):
            decay = torch.exp(delta[:, t] * A)  # [b, h]
            write = (delta[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]  # [b, h, hd, n]
            state = decay[:, :, None, None] * state + write
            if layer in h_edits:
                state = h_edits[layer](t, state)
            states.append(state)
        finals[layer] = state
        acts[pre + "hook_h"] = torch.stack(states, dim=1)
        skip = Dv[:, None] * x  # [b, p, h, hd]; never masked
        if layer in masks:
            M = masks[layer].double()
            y = skip.clone()
            for i in range(p):
                for j in range(i + 1):
                    decay = torch.exp(delta[:, j + 1 : i + 1].sum(1) * A)  # [b, h]: Π_{k=j+1..i} exp(Δ_k A)
                    alpha = (Ch[:, i] * Bh[:, j]).sum(-1) * decay * delta[:, j]  # [b, h]
                    y[:, i] = y[:, i] + (M[:, :, i, j] * alpha)[..., None] * x[:, j]
        else:
            y = torch.stack([(s * Ch[:, t, :, None, :]).sum(-1) for t, s in enumerate(states)], dim=1) + skip
        y = hook(pre + "hook_y", y)
        gate = hook(pre + "hook_gate", _silu(z))
        y_gated = hook(pre + "hook_y_gated", (y * gate).reshape(b, p, e))
        grouped = y_gated.reshape(b, p, g, e // g)
        y_normed = hook(pre + "hook_y_normed", (grouped / _rms(grouped, cfg.eps)).reshape(b, p, e) * W[mx + "norm.weight"])
        mixer_out = hook(pre + "hook_mixer_out", linear(y_normed, mx + "out_proj"))
        resid = hook(pre + "hook_resid_post", resid_pre + mixer_out)
    scale = hook("ln_final.hook_scale", _rms(resid, cfg.eps))
    normalized = hook("ln_final.hook_normalized", resid / scale)
    W_U = W["unembed.weight"] if "unembed.weight" in W else W["embed.W_E"]
    logits = (normalized * W["ln_final.w"]) @ W_U.T
    return logits, acts, finals


# ----------------------------------------------------------------------------- models
VARIANTS = {
    # 6 heads of 4 in 2 groups (3 heads per group), projection biases, untied, finite dt_limit,
    # a chunk (4) that does not divide P
    "g2": dict(d_model=12, d_head=4, n_groups=2, d_state=5, d_conv=4, chunk_size=4, dt_limit=(0.15, 0.8),
               proj_bias=True, tie_embeddings=False),
    # 5 heads (odd) in one group, no conv bias, tied, chunk 3
    "g1": dict(d_model=10, d_head=4, n_groups=1, d_state=4, d_conv=3, chunk_size=3, conv_bias=False,
               tie_embeddings=True),
}


def make_model(variant: str, seed: int = 7) -> HookedMamba2:
    cfg = HookedMambaConfig(family="mamba2", n_layers=2, d_vocab=VOCAB, expand=2, seed=0, **VARIANTS[variant])
    model = HookedMamba2(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # off the structured init: A ∈ U[-16,-1], D = 1, unit norms, zero biases
        for block in model.blocks:
            m = block.mixer
            m.A_log.copy_(0.7 * torch.randn(m.A_log.shape, generator=g))
            m.D.copy_(torch.randn(m.D.shape, generator=g))
            m.dt_bias.copy_(torch.randn(m.dt_bias.shape, generator=g) - 1.0)
            m.conv1d.weight.mul_(1 + torch.rand(m.conv1d.weight.shape, generator=g))
            for bias in (m.conv1d.bias, m.in_proj.bias, m.out_proj.bias):
                if bias is not None:
                    bias.copy_(0.2 * torch.randn(bias.shape, generator=g))
            m.norm.weight.copy_(1 + 0.3 * torch.randn(m.norm.weight.shape, generator=g))
            block.ln1.w.copy_(1 + 0.3 * torch.randn(block.ln1.w.shape, generator=g))
        model.ln_final.w.copy_(1 + 0.3 * torch.randn(model.ln_final.w.shape, generator=g))
        model.embed.W_E.mul_(20)  # initializer_range 0.02 is tiny: make the residual O(0.5)
        if not model.cfg.tie_embeddings:
            model.unembed.weight.mul_(20)
    return model.eval()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def model(request):
    return make_model(request.param)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, VOCAB, (B_SIZE, P), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def plain_ref(model, tokens):
    return reference_forward(model, tokens)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(model, tokens, backend, hooks=(), state=None):
    """Logits and the full cache (heavy hooks included), with extra hooks attached first."""
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
        assert got.shape == expected.shape, (name, got.shape, expected.shape)
        torch.testing.assert_close(got.double(), expected, **TOL, msg=lambda m: f"{name}: {m}")
        compared += 1
    return compared


def _contract_shapes(cfg, b, p):
    """The Mamba-2 hook table of the contract (API.md), written out."""
    d, e, n, h, hd, g = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.n_heads, cfg.d_head, cfg.n_groups
    block = {
        "hook_resid_pre": (b, p, d), "hook_mixer_in": (b, p, d),
        "ln1.hook_scale": (b, p, 1), "ln1.hook_normalized": (b, p, d),
        "hook_z": (b, p, h, hd), "hook_gate": (b, p, h, hd),
        "hook_conv_in": (b, p, e + 2 * g * n), "hook_conv": (b, p, e + 2 * g * n),
        "hook_x": (b, p, h, hd), "hook_B": (b, p, g, n), "hook_C": (b, p, g, n),
        "hook_delta_raw": (b, p, h), "hook_delta": (b, p, h),
        "hook_ssm_mask": (b, h, p, p), "hook_h": (b, p, h, hd, n),
        "hook_y": (b, p, h, hd), "hook_y_gated": (b, p, e), "hook_y_normed": (b, p, e),
        "hook_mixer_out": (b, p, d), "hook_resid_post": (b, p, d),
    }
    shapes = {"hook_embed": (b, p, d), "ln_final.hook_scale": (b, p, 1), "ln_final.hook_normalized": (b, p, d)}
    for layer in range(cfg.n_layers):
        shapes.update({f"blocks.{layer}.{name}": shape for name, shape in block.items()})
    return shapes


# ----------------------------------------------------------------------------- plain forward
def test_hook_shapes_match_the_contract_table(model, tokens):
    shapes = _contract_shapes(model.cfg, B_SIZE, P)
    _, cache = _run(model, tokens, "torch")
    for name, shape in shapes.items():
        assert name in cache, name
        assert tuple(cache[name].shape) == shape, (name, tuple(cache[name].shape), shape)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_hook_matches_reference(model, tokens, backend):
    logits, cache = _run(model, tokens, backend)
    ref_logits, acts, _ = reference_forward(model, tokens)  # fresh, not the shared fixture
    mask_names = {f"blocks.{l}.hook_ssm_mask" for l in range(model.cfg.n_layers)}
    assert set(model.hook_dict) - mask_names == set(acts), "the reference covers every hook but the mask"
    assert _assert_acts_match(cache, acts) == len(acts)
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)
    cfg = model.cfg
    for layer in range(cfg.n_layers):
        mask = cache[f"blocks.{layer}.hook_ssm_mask"]
        assert mask.shape == (B_SIZE, cfg.n_heads, P, P) and bool((mask == 1).all())
    # the values are not degenerate: states carry something, Δ varies, heads differ
    assert acts["blocks.1.hook_h"].abs().max() > 0.05
    assert acts["blocks.0.hook_delta"].std() > 0.05
    y = acts["blocks.0.hook_y"]
    assert (y[:, :, 0] - y[:, :, 1]).abs().max() > 1e-2


def test_perturbation_is_not_trivial(model, plain_ref):
    """The weights are off their init and the dt clamp of the g2 variant is active on both sides."""
    m = model.blocks[0].mixer
    assert not torch.allclose(m.D, torch.ones_like(m.D))
    assert not torch.allclose(m.norm.weight, torch.ones_like(m.norm.weight))
    assert m.A_log.std() > 0.1
    lo, hi = model.cfg.dt_limit
    if hi < float("inf"):
        _, acts, _ = plain_ref
        raw = acts["blocks.0.hook_delta_raw"] + m.dt_bias.double()
        unclamped = F.softplus(raw)
        assert bool((unclamped < lo).any()) and bool((unclamped > hi).any())
        delta = acts["blocks.0.hook_delta"]
        assert float(delta.min()) == pytest.approx(lo) and float(delta.max()) == pytest.approx(hi)


def test_plain_forward_without_hooks_matches_reference(model, tokens, plain_ref):
    ref_logits, _, _ = plain_ref
    for backend in BACKENDS:
        model.set_backend(backend)
        with torch.no_grad():
            torch.testing.assert_close(model(tokens).double(), ref_logits, **TOL)


def test_hook_h_readout_and_final_state(model, tokens, plain_ref):
    """y = h·C (of the head's group) + D x from the cache; the final state equals hook_h[:, -1]."""
    _, acts, finals = plain_ref
    cfg = model.cfg
    state = RecurrentState.empty(cfg.n_layers)
    _, cache = _run(model, tokens, "torch", state=state)
    for layer in range(cfg.n_layers):
        torch.testing.assert_close(state.layers[layer]["ssm"].double(), finals[layer], **TOL)
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_h"][:, -1], state.layers[layer]["ssm"], **TOL)
    hs, C, x, y = (cache[f"blocks.1.hook_{n}"] for n in ("h", "C", "x", "y"))
    heads_per_group = cfg.n_heads // cfg.n_groups
    manual = torch.stack(
        [torch.einsum("bpdn,bpn->bpd", hs[:, :, i], C[:, :, i // heads_per_group]) for i in range(cfg.n_heads)], dim=2
    ) + model.blocks[1].mixer.D[:, None] * x
    torch.testing.assert_close(manual, y, **TOL)


def test_pos_slice_cuts_target_axis_of_the_mask(model, tokens):
    names = ["blocks.0.hook_ssm_mask", "blocks.0.hook_h", "blocks.0.hook_y", "blocks.1.hook_B"]
    _, full = model.run_with_cache(tokens, names_filter=names)
    _, sliced = model.run_with_cache(tokens, names_filter=names, pos_slice=slice(2, 6))
    assert sliced["blocks.0.hook_ssm_mask"].shape == (B_SIZE, model.cfg.n_heads, 4, P)
    for name in names:
        expected = full[name][:, :, 2:6] if name.endswith("hook_ssm_mask") else full[name][:, 2:6]
        torch.testing.assert_close(sliced[name], expected)


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
    "blocks.0.hook_mixer_in": _additive(0.3),
    "blocks.0.ln1.hook_scale": _multiplicative,
    "blocks.0.hook_conv_in": _additive(0.5),
    "blocks.0.hook_conv": _additive(0.5),
    "blocks.0.hook_x": _additive(0.5),
    "blocks.0.hook_B": _additive(0.5),
    "blocks.0.hook_C": _additive(0.5),
    "blocks.0.hook_delta_raw": _additive(0.7),
    "blocks.0.hook_delta": _multiplicative,
    "blocks.0.hook_z": _additive(0.5),
    "blocks.0.hook_gate": _additive(0.5),
    "blocks.0.hook_y": _additive(0.5),
    "blocks.0.hook_y_gated": _additive(0.5),
    "blocks.0.hook_y_normed": _additive(0.5),
    "blocks.0.hook_mixer_out": _additive(0.3),
    "blocks.1.hook_B": _additive(0.5),
    "blocks.1.hook_delta": _multiplicative,
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
    with torch.no_grad():
        plain = model(tokens)
    assert (logits - plain).abs().max() > 1e-3, "the edit should change the logits well beyond the tolerance"


# ----------------------------------------------------------------------------- per-head ablation
@pytest.mark.parametrize("backend", BACKENDS)
def test_zeroing_one_head_of_hook_y(model, tokens, plain_ref, backend):
    """``y[:, :, head] = 0`` (in place, as TransformerLens users write it) ablates exactly that head."""
    cfg = model.cfg
    head = cfg.n_heads - 2
    heads_per_group = cfg.n_heads // cfg.n_groups
    hd, e_g = cfg.d_head, cfg.d_inner // cfg.n_groups

    def ablate(y, hook):
        y[:, :, head] = 0.0
        return y

    model.set_backend(backend)
    with torch.no_grad():
        logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_y", ablate)])

    def zero_head(v):
        v = v.clone()
        v[:, :, head] = 0.0
        return v

    ref_logits, acts, _ = reference_forward(model, tokens, edits={"blocks.0.hook_y": zero_head})
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)
    assert (ref_logits - plain_ref[0]).abs().max() > 1e-3
    # y_gated changes only in the head's own channels ...
    # (locality: the ablated run against the plain run of the same model, both fp32, so exact)
    _, cache_a = _run(model, tokens, backend, hooks=[("blocks.0.hook_y", ablate)])
    _, cache_p = _run(model, tokens, backend)
    gated_delta = (cache_a["blocks.0.hook_y_gated"] - cache_p["blocks.0.hook_y_gated"]).abs().amax((0, 1))
    own = torch.zeros(cfg.d_inner, dtype=torch.bool)
    own[head * hd : (head + 1) * hd] = True
    assert bool((gated_delta[~own] == 0).all())
    assert bool((gated_delta[own] > 1e-4).all())
    # ... and the grouped RMSNorm spreads it over the channels of that head's group only
    normed_delta = (cache_a["blocks.0.hook_y_normed"] - cache_p["blocks.0.hook_y_normed"]).abs().amax((0, 1))
    group = head // heads_per_group
    in_group = torch.zeros(cfg.d_inner, dtype=torch.bool)
    in_group[group * e_g : (group + 1) * e_g] = True
    assert bool((normed_delta[~in_group] == 0).all())
    assert bool((normed_delta[in_group] > 1e-6).all())


# ----------------------------------------------------------------------------- hook_h overrides
def _zero_at(t):
    def out_of_place(hs, hook):
        hs = hs.clone()
        hs[:, t] = 0
        return hs

    def in_place(hs, hook):
        hs[:, t] = 0

    def ref(tt, s):
        return torch.zeros_like(s) if tt == t else s

    return out_of_place, in_place, ref


def _some_entries_at(t, cfg, value=2.5):
    sel = torch.zeros(cfg.n_heads, cfg.d_head, cfg.d_state, dtype=torch.bool)
    sel[1::2, ::2, 1::2] = True  # some heads, some head channels, some state dims

    def out_of_place(hs, hook):
        hs = hs.clone()
        hs[:, t][:, sel] = value
        return hs

    def in_place(hs, hook):
        hs[:, t, sel] = value

    def ref(tt, s):
        return torch.where(sel, torch.full_like(s, value), s) if tt == t else s

    return out_of_place, in_place, ref


def _several_positions(cfg):
    h, hd, n = cfg.n_heads, cfg.d_head, cfg.d_state

    def edit(hs):  # zero everything at 2, one head set to 3.0 at 5, one entry set to -4.0 at 8
        hs[:, 2] = 0
        hs[:, 5, 1] = 3.0
        hs[:, 8, h - 1, hd - 1, n - 1] = -4.0

    def out_of_place(hs, hook):
        hs = hs.clone()
        edit(hs)
        return hs

    def in_place(hs, hook):
        edit(hs)

    def ref(tt, s):
        s = s.clone()
        if tt == 2:
            s[:] = 0
        elif tt == 5:
            s[:, 1] = 3.0
        elif tt == 8:
            s[:, h - 1, hd - 1, n - 1] = -4.0
        return s

    return out_of_place, in_place, ref


H_EDITS = {
    "zero-t3": lambda cfg: _zero_at(3),
    "zero-t0": lambda cfg: _zero_at(0),
    "zero-last": lambda cfg: _zero_at(P - 1),
    "some-entries-t4": lambda cfg: _some_entries_at(4, cfg),
    "several-positions": _several_positions,
}

H_CASES = [  # (case, style, layer)
    ("zero-t3", "out_of_place", 0), ("zero-t3", "in_place", 1),
    ("zero-t0", "out_of_place", 1), ("zero-last", "in_place", 0),
    ("some-entries-t4", "out_of_place", 0), ("some-entries-t4", "in_place", 1),
    ("several-positions", "out_of_place", 1), ("several-positions", "in_place", 0),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,style,layer", H_CASES)
def test_hook_h_override_continues_recurrence(model, tokens, plain_ref, backend, case, style, layer):
    out_of_place, in_place, ref_edit = H_EDITS[case](model.cfg)
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
        torch.testing.assert_close(cache[y][:, :3].double(), plain_acts[y][:, :3], **TOL)  # before t: unchanged
        D = model.blocks[layer].mixer.D.double()
        torch.testing.assert_close(cache[y][:, 3].double(), D[:, None] * acts[f"blocks.{layer}.hook_x"][:, 3], **TOL)
        assert (cache[y][:, 4:] - plain_acts[y][:, 4:]).abs().max() > 1e-3  # after t: continued from zero


@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_h_edit_of_one_head_leaves_other_heads(model, tokens, plain_ref, backend):
    """Heads are independent recurrences: overriding one head's state changes only that head's y."""
    head = 1

    def fn(hs, hook):
        hs = hs.clone()
        hs[:, 4, head] *= -2.0
        return hs

    _, cache = _run(model, tokens, backend, hooks=[("blocks.0.hook_h", fn)])
    _, cache_plain = _run(model, tokens, backend)
    _, plain_acts, _ = plain_ref
    written = plain_acts["blocks.0.hook_h"][:, 4, head] * -2.0

    def ref(t, s):
        if t == 4:
            s = s.clone()
            s[:, head] = written
        return s

    _, acts, _ = reference_forward(model, tokens, h_edits={0: ref})
    torch.testing.assert_close(cache["blocks.0.hook_y"].double(), acts["blocks.0.hook_y"], **TOL)
    # locality: against the plain run of the same model (the override rescans in segments, so other
    # heads may differ by fp32 roundoff, far below the change of the edited head)
    changed = (cache["blocks.0.hook_y"] - cache_plain["blocks.0.hook_y"]).abs().amax((0, 1, 3))  # [h]
    assert float(changed[head]) > 1e-3
    others = [i for i in range(model.cfg.n_heads) if i != head]
    assert bool((changed[others] < 1e-6).all())


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("style", ["out_of_place", "in_place"])
def test_hook_h_edit_without_autograd(model, tokens, mode, style):
    """Edits are honoured in the usual inference settings too, in place or not."""
    model.set_backend("torch")
    out_of_place, in_place, ref_edit = _zero_at(3)
    fn = out_of_place if style == "out_of_place" else in_place
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_h", fn)])
    ref_logits, _, _ = reference_forward(model, tokens, h_edits={1: ref_edit})
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_ssm_mask_without_autograd(model, tokens, mode):
    M = _mask_one_head(B_SIZE, model.cfg.n_heads, P)
    model.set_backend("torch")
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with context:
        logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_ssm_mask", lambda m, hook: m * M)])
    ref_logits, _, _ = reference_forward(model, tokens, masks={0: _tril(M)})
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)


# ----------------------------------------------------------------------------- gradients
GRAD_HOOKS = ["blocks.0.hook_x", "blocks.0.hook_delta_raw", "blocks.0.hook_B", "blocks.0.hook_C",
              "blocks.1.hook_z", "blocks.1.hook_y", "blocks.0.hook_y_gated"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_cache_matches_reference_autograd(model, tokens, backend):
    model.set_backend(backend)
    loss, cache = model.run_with_cache(tokens, incl_bwd=True, return_type="loss",
                                       names_filter=GRAD_HOOKS + ["blocks.1.hook_h"])
    model.zero_grad(set_to_none=True)
    leaves = {}

    def make_leaf(name):
        def edit(v):
            leaves[name] = v.detach().requires_grad_()
            return leaves[name]

        return edit

    def reference_loss(**kwargs):
        logits, _, _ = reference_forward(model, tokens, **kwargs)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))

    for name in GRAD_HOOKS:  # one hook at a time: each is the total derivative w.r.t. that value
        ref_loss = reference_loss(edits={name: make_leaf(name)})
        torch.testing.assert_close(loss.double(), ref_loss.detach(), **TOL)
        (want,) = torch.autograd.grad(ref_loss, [leaves[name]])
        got = cache[name + "_grad"]
        assert got.abs().max() > 0, name
        # fp32 roundoff scales with the largest gradient (the grouped RMSNorm amplifies by 1/rms)
        atol = 1e-6 * max(1.0, float(want.abs().max()))
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    # d loss / d h_t of layer 1: the total derivative, through y_t and through every later state
    states = []

    def keep(t, s):
        states.append(s)
        return s

    ref_loss = reference_loss(h_edits={1: keep}, edits={"hook_embed": make_leaf("hook_embed")})
    want = torch.stack(torch.autograd.grad(ref_loss, states), dim=1)
    torch.testing.assert_close(cache["blocks.1.hook_h_grad"].double(), want, atol=1e-7, rtol=1e-4)


# ----------------------------------------------------------------------------- hook_ssm_mask
def _mask_general(b, h, p):
    g = torch.Generator().manual_seed(5)
    return (torch.rand(b, h, p, p, generator=g) < 0.6).float()  # per batch row and head; above-diagonal ignored


def _mask_sources_to_last(b, h, p):
    M = torch.ones(b, h, p, p)
    M[:, :, p - 1, [1, 2]] = 0
    return M


def _mask_per_row(b, h, p):
    M = torch.ones(b, h, p, p)
    M[0, :, 6:, :3] = 0  # row 0: early sources cut from late targets in every head
    M[1, :, :, 4] = 0  # row 1: source 4 cut from everything, its own diagonal included
    M[1, :, 7, 7] = 0
    return M


def _mask_one_head(b, h, p):
    M = torch.ones(b, h, p, p)
    M[:, 2, 5:, :5] = 0  # head 2 only
    M[1, 0, 9, 9] = 0  # and one diagonal entry of head 0 in row 1
    return M


MASKS = {"general": _mask_general, "sources-to-last": _mask_sources_to_last, "per-row": _mask_per_row,
         "one-head": _mask_one_head}
MASK_CASES = [("general", 0), ("general", 1), ("sources-to-last", 1), ("per-row", 0), ("one-head", 0),
              ("one-head", 1)]


def _tril(M):
    return M * torch.ones(M.shape[-1], M.shape[-1]).tril()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,layer", MASK_CASES)
def test_ssm_mask_equals_masked_hidden_attention(model, tokens, plain_ref, backend, kind, layer):
    M = MASKS[kind](B_SIZE, model.cfg.n_heads, P)

    def zero_entries(mask, hook):
        return mask * M

    logits, cache = _run(model, tokens, backend, hooks=[(f"blocks.{layer}.hook_ssm_mask", zero_entries)])
    ref_logits, acts, _ = reference_forward(model, tokens, masks={layer: _tril(M)})
    _assert_acts_match(cache, acts, skip={f"blocks.{layer}.hook_h"})  # hook_h: the unmasked states
    torch.testing.assert_close(logits.double(), ref_logits, **TOL)
    torch.testing.assert_close(cache[f"blocks.{layer}.hook_ssm_mask"], M)
    # exactly the (row, target, head) triples with a knocked-out edge j ≤ i changed
    _, plain_acts, _ = plain_ref
    y = f"blocks.{layer}.hook_y"
    changed = (acts[y] - plain_acts[y]).abs().amax(-1)  # [b, p, h]
    lower = torch.ones(P, P, dtype=torch.bool).tril()
    targets = ((M == 0) & lower).any(-1).permute(0, 2, 1)  # [b, i, h]
    assert bool((changed[~targets] < 1e-9).all())  # untouched heads / targets: exactly as before
    assert float(changed[targets].max()) > 1e-3
    torch.testing.assert_close(cache[y].double(), acts[y], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_mask_removes_alpha_times_x_for_one_head(model, tokens, plain_ref, backend):
    """Zeroing mask[b, head, i, j] subtracts α[i, j]·x_j from y_i of that head, with α built by hand."""
    cfg = model.cfg
    layer, head, i, j = 1, cfg.n_heads - 1, 8, 5

    def zero_one(mask, hook):
        mask = mask.clone()
        mask[:, head, i, j] = 0
        return mask

    _, cache = _run(model, tokens, backend, hooks=[(f"blocks.{layer}.hook_ssm_mask", zero_one)])
    _, acts, _ = plain_ref
    pre = f"blocks.{layer}."
    delta, x = acts[pre + "hook_delta"], acts[pre + "hook_x"]
    grp = head // (cfg.n_heads // cfg.n_groups)
    B, C = acts[pre + "hook_B"][:, :, grp], acts[pre + "hook_C"][:, :, grp]
    A = -torch.exp(model.blocks[layer].mixer.A_log.detach().double()[head])
    alpha = (C[:, i] * B[:, j]).sum(-1) * torch.exp(A * delta[:, j + 1 : i + 1, head].sum(1)) * delta[:, j, head]  # [b]
    expected = acts[pre + "hook_y"].clone()
    expected[:, i, head] -= alpha[:, None] * x[:, j, head]
    torch.testing.assert_close(cache[pre + "hook_y"].double(), expected, **TOL)
    assert float((alpha[:, None] * x[:, j, head]).abs().max()) > 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_ssm_mask_all_zero_leaves_only_D_skip(model, tokens, backend):
    _, cache = _run(model, tokens, backend, hooks=[("blocks.1.hook_ssm_mask", lambda m, hook: torch.zeros_like(m))])
    D = model.blocks[1].mixer.D.double()
    torch.testing.assert_close(cache["blocks.1.hook_y"].double(), D[:, None] * cache["blocks.1.hook_x"].double(), **TOL)


def test_per_head_activations_are_handed_over_contiguous(model, tokens):
    """Hooked and cached 4-d activations can be flattened with .view (sae-lens does so); an
    in-place edit by a hook still reaches the forward."""
    names = [f"blocks.0.{hook}" for hook in ("hook_x", "hook_y", "hook_z", "hook_gate", "hook_B", "hook_C")]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    for name in names:
        assert cache[name].is_contiguous(), name
        assert cache[name].view(-1, cache[name].shape[-2] * cache[name].shape[-1]).shape[0] == tokens.numel()

    def zero_in_place(x, hook):
        x[..., 0, :] = 0.0  # the first head
        return None

    seen = {}
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_x", zero_in_place),
                                            ("blocks.0.hook_y", lambda y, hook: seen.setdefault("y", y.clone()))])
    _, clean = model.run_with_cache(tokens, names_filter=["blocks.0.hook_y"])
    assert not torch.allclose(seen["y"][..., 0, :], clean["blocks.0.hook_y"][..., 0, :])
    torch.testing.assert_close(seen["y"][..., 1:, :], clean["blocks.0.hook_y"][..., 1:, :])


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hook_h_edit_returned_in_a_narrower_dtype_continues_the_recurrence(model, tokens, backend, narrow):
    check_edit_returned_in_a_narrower_dtype(model, tokens, backend, narrow, _run, reference_forward)


@pytest.mark.parametrize("name", ["hook_conv_in", "hook_conv", "hook_x", "hook_B", "hook_delta_raw", "hook_z",
                                  "hook_mixer_out"])
def test_fp32_patch_into_a_bf16_model_is_read_as_bf16(name):
    """Patching a bf16 Mamba-2 from an fp32 run: the patch is read in the dtype of the activation it
    replaces, as if cast first (it was carried in fp32 for a while, 2e-3 to 4e-3 off in the logits)."""
    fp32 = make_model("g2")
    bf16 = make_model("g2").to(torch.bfloat16)
    tokens = torch.randint(0, fp32.cfg.d_vocab, (2, 6), generator=torch.Generator().manual_seed(0))
    _, cache = fp32.run_with_cache(tokens)
    hook = f"blocks.1.{name}"
    with torch.no_grad():
        given = bf16.run_with_cache(tokens, names_filter=hook)[1][hook].dtype
        patched = bf16.run_with_hooks(tokens, fwd_hooks=[(hook, lambda act, hook: cache[hook.name])])
        cast = bf16.run_with_hooks(tokens, fwd_hooks=[(hook, lambda act, hook: cache[hook.name].to(given))])
    torch.testing.assert_close(patched, cast, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_loss_term_read_from_hook_h_reaches_the_weights(model, tokens, backend):
    probe = torch.randn(model.cfg.n_heads, model.cfg.d_head, model.cfg.d_state,
                        generator=torch.Generator().manual_seed(11))
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
    probe = torch.randn(model.cfg.n_heads, model.cfg.d_head, model.cfg.d_state,
                        generator=torch.Generator().manual_seed(12))
    check_hooks_after_an_edit_see_the_continued_states(model, tokens, backend, probe, reference_forward)
