"""HookedMamba2 against transformers' ``Mamba2ForCausalLM``, and its TransformerLens surface.

transformers' pure-PyTorch Mamba-2 path (what runs on CPU) is the independent
reference for the logits. Every transformers model here is randomly initialised
and then perturbed (A_log, D, dt_bias, the conv weights and biases, the
projection biases, the block, gated and final norm weights), so parity does not
lean on the regular init. Configs cover 1, 2 and 3 groups, odd head counts,
head_dim 4 and 8, d_state 4 to 16, chunk sizes that do not divide the sequence,
tied and untied embeddings and a finite ``time_step_limit``.

Also here: chunk-size invariance, padding, generation (against transformers'
full forwards), per-head activation patching with ``transformer_lens.patching``,
the mamba_ssm Mamba-2 checkpoint layout, and bf16.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformer_lens.patching as tl_patching
from transformers import Mamba2Config, Mamba2ForCausalLM

import tl_mamba
from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig, RecurrentState
from tl_mamba.loading import UnsupportedArchitectureError, WrongModelClassError
from tl_mamba.ops.ssd.chunked import DEFAULT_CHUNK

from checkpoint_writers import (
    mamba_ssm_config,
    tiny_transformers_model,
    transformers_to_mamba_ssm_keys,
    write_mamba_ssm_checkpoint,
)

VOCAB = 50
BACKENDS = ("reference", "torch")

# name -> (Mamba2Config kwargs, sequence length for the parity test)
CONFIGS = {
    # 5 heads (odd) x 4, one group, chunk 7 does not divide 30, tied, the dt clamp bites on both sides
    "h5-g1": (dict(hidden_size=10, num_heads=5, head_dim=4, n_groups=1, state_size=6, conv_kernel=4, chunk_size=7,
                   time_step_limit=(0.02, 0.5), tie_word_embeddings=True), 30),
    # 4 heads x 8 in 2 groups, d_state 16, chunk 16 vs p = 37, in/out projection biases, no conv bias, untied
    "h4-g2": (dict(hidden_size=16, num_heads=4, head_dim=8, n_groups=2, state_size=16, conv_kernel=4, chunk_size=16,
                   use_bias=True, use_conv_bias=False, tie_word_embeddings=False), 37),
    # 3 heads in 3 groups, d_state 4, kernel 3, chunk 5 vs p = 23, finite limit, untied, larger norm eps
    "h3-g3": (dict(hidden_size=6, num_heads=3, head_dim=4, n_groups=3, state_size=4, conv_kernel=3, chunk_size=5,
                   time_step_limit=(0.05, 2.0), tie_word_embeddings=False, layer_norm_epsilon=1e-3), 23),
    # 6 heads x 8 in 2 groups (3 per group), chunk 16 vs p = 37, tied, finite limit
    "h6-g2": (dict(hidden_size=24, num_heads=6, head_dim=8, n_groups=2, state_size=8, conv_kernel=4, chunk_size=16,
                   time_step_limit=(0.01, 0.5), tie_word_embeddings=True), 37),
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is faster, and far faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _perturb(hf: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Move every parameter off its structured init so parity is not trivially met."""
    g = torch.Generator().manual_seed(seed)

    def rand(t, scale, shift=0.0):
        return torch.randn(t.shape, generator=g) * scale + shift

    with torch.no_grad():
        for layer in hf.backbone.layers:
            m = layer.mixer
            m.A_log.copy_(rand(m.A_log, 0.8, 0.3))
            m.D.copy_(rand(m.D, 1.0))
            m.dt_bias.copy_(rand(m.dt_bias, 1.5, -2.0))
            m.conv1d.weight.copy_(rand(m.conv1d.weight, 0.5))
            if m.conv1d.bias is not None:
                m.conv1d.bias.copy_(rand(m.conv1d.bias, 0.3))
            for lin in (m.in_proj, m.out_proj):
                if lin.bias is not None:
                    lin.bias.copy_(rand(lin.bias, 0.1))
            m.norm.weight.copy_(rand(m.norm.weight, 0.3, 1.0))
            layer.norm.weight.copy_(rand(layer.norm.weight, 0.3, 1.0))
        hf.backbone.norm_f.weight.copy_(rand(hf.backbone.norm_f.weight, 0.3, 1.0))
    return hf


def _build_hf(name: str) -> Mamba2ForCausalLM:
    kwargs, _ = CONFIGS[name]
    index = sorted(CONFIGS).index(name)
    torch.manual_seed(index)
    hf = Mamba2ForCausalLM(Mamba2Config(vocab_size=VOCAB, num_hidden_layers=2, expand=2, **kwargs)).eval()
    return _perturb(hf, seed=100 + index)


@pytest.fixture(scope="module")
def hf_models():
    return {name: _build_hf(name) for name in CONFIGS}


_HF_MEMO: dict = {}


def _hf_logits(hf, tokens):
    """transformers' logits, memoised by model identity: only for the module-scoped fixture models."""
    key = (id(hf), tokens.numpy().tobytes(), tuple(tokens.shape))
    if key not in _HF_MEMO:
        with torch.no_grad():
            _HF_MEMO[key] = hf(tokens, use_cache=False).logits
    return _HF_MEMO[key]


def _ours(hf, backend="torch") -> HookedMamba2:
    model = HookedMamba2.from_hf(hf)
    model.eval()
    return model.set_backend(backend)


def _tokens(b: int, p: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, p), generator=torch.Generator().manual_seed(seed))


def _max_err(a, b):
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------- conversion and cfg
def test_conversion_picks_up_config(hf_models):
    for name, hf in hf_models.items():
        model = HookedMamba2.from_hf(hf)
        cfg, hc = model.cfg, hf.config
        assert isinstance(model, HookedMamba2)
        assert (cfg.n_layers, cfg.d_model, cfg.d_state, cfg.d_conv) == (
            hc.num_hidden_layers, hc.hidden_size, hc.state_size, hc.conv_kernel), name
        assert (cfg.n_heads, cfg.d_head, cfg.n_groups) == (hc.num_heads, hc.head_dim, hc.n_groups), name
        assert cfg.d_inner == hc.num_heads * hc.head_dim == hc.expand * hc.hidden_size
        assert cfg.checkpoint_chunk_size == hc.chunk_size
        assert tuple(cfg.dt_limit) == tuple(float(v) for v in hc.time_step_limit)
        assert cfg.tie_embeddings == hc.tie_word_embeddings
        assert cfg.conv_bias == hc.use_conv_bias and cfg.proj_bias == hc.use_bias
        assert cfg.eps == hc.layer_norm_epsilon
        assert cfg.d_vocab == VOCAB
        assert cfg.normalization_type == "RMS" and cfg.final_rms is True
        assert isinstance(cfg.default_prepend_bos, bool)
        assert cfg.dtype == torch.float32 and hasattr(cfg, "device")


def test_perturbation_is_not_trivial(hf_models):
    """Parity below is meaningful: heads differ, D and the norms are off 1, and the dt clamp bites."""
    for name, hf in hf_models.items():
        m = hf.backbone.layers[0].mixer
        assert not torch.allclose(m.D, torch.ones_like(m.D))
        assert m.A_log.std() > 0.1
        assert not torch.allclose(m.norm.weight, torch.ones_like(m.norm.weight))
    model = _ours(hf_models["h5-g1"])
    lo, hi = model.cfg.dt_limit
    _, cache = model.run_with_cache(_tokens(2, 30, seed=30), names_filter=lambda n: "delta" in n)
    for layer in range(2):
        unclamped = F.softplus(cache[f"blocks.{layer}.hook_delta_raw"] + model.blocks[layer].mixer.dt_bias.detach())
        assert bool((unclamped < lo).any()) and bool((unclamped > hi).any())


# --------------------------------------------------------------------------- fp32 parity
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers_fp32(hf_models, name, backend):
    hf = hf_models[name]
    p = CONFIGS[name][1]
    tokens = _tokens(2, p, seed=p)
    expected = _hf_logits(hf, tokens)
    with torch.no_grad():
        logits = _ours(hf, backend)(tokens)
    assert logits.dtype == torch.float32
    assert expected.abs().max() > 0.5  # the logits are not all ~0
    assert _max_err(logits, expected) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_attached_do_not_change_logits(hf_models, backend):
    """With every hook attached (heavy ones included) the logits still match transformers."""
    hf = hf_models["h6-g2"]
    tokens = _tokens(2, 37, seed=37)
    logits, cache = _ours(hf, backend).run_with_cache(tokens, names_filter=lambda n: True)
    assert "blocks.1.hook_h" in cache and "blocks.1.hook_ssm_mask" in cache
    assert _max_err(logits, _hf_logits(hf, tokens)) <= 1e-5


@pytest.mark.parametrize("name", ["h5-g1", "h4-g2"])
def test_results_do_not_depend_on_chunk_size(hf_models, name):
    hf = hf_models[name]
    tokens = _tokens(2, 30, seed=31)
    expected = _hf_logits(hf, tokens)
    model = _ours(hf, "torch")
    outs = {}
    for chunk in (1, 5, 64):
        model.cfg.chunk_size = chunk
        with torch.no_grad():
            outs[chunk] = model(tokens)
        assert _max_err(outs[chunk], expected) <= 1e-5, chunk
    assert _max_err(outs[1], outs[64]) <= 1e-5 and _max_err(outs[5], outs[64]) <= 1e-5


# --------------------------------------------------------------------------- bf16
# bf16 keeps an 8-bit mantissa (relative step 2^-8 ≈ 0.4%). The weights, every projection, the conv
# and the gated norm's output run in bf16 (the scan and the residual stay in fp32); the grouped RMSNorm
# divides by the RMS of small groups, which amplifies the rounding of tiny models like these. Measured
# max abs error / max |logit| against fp32 transformers (batch 2, the config's p), both backends
# alike: h3-g3 0.036, h4-g2 0.024, h5-g1 0.027, h6-g2 0.018. transformers' own model cast to bf16
# measures 0.036, 0.017, 0.017, 0.016 on the same inputs, so the error is bf16's, not ours: we bound
# it at 8% of the logit scale (2.2x margin over the worst) and at 2x transformers' own bf16 error
# (measured ratio at most 1.41). Measured top-1 agreement ≥ 0.957; the flips are near-ties.
BF16_REL_ATOL = 0.08
BF16_VS_TRANSFORMERS_BF16 = 2.0
BF16_MIN_TOP1_AGREEMENT = 0.9


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bf16_logits_close_to_fp32_transformers(hf_models, name):
    hf = hf_models[name]
    tokens = _tokens(2, CONFIGS[name][1], seed=7)
    expected = _hf_logits(hf, tokens)
    with torch.no_grad():
        hf_bf16_err = _max_err(copy.deepcopy(hf).to(torch.bfloat16)(tokens, use_cache=False).logits, expected)
    model = HookedMamba2.from_hf(hf).to(torch.bfloat16).eval()
    assert model.cfg.dtype == torch.bfloat16
    assert model.blocks[0].mixer.in_proj.weight.dtype == torch.bfloat16
    for backend in BACKENDS:
        model.set_backend(backend)
        with torch.no_grad():
            logits = model(tokens)
        assert logits.dtype == torch.bfloat16
        err = _max_err(logits, expected)
        bound = BF16_REL_ATOL * expected.abs().max().item()
        assert 0 < err < bound, f"{name}/{backend}: max abs bf16 error {err}, bound {bound}"
        assert err <= BF16_VS_TRANSFORMERS_BF16 * hf_bf16_err, f"{name}/{backend}: {err} vs transformers' {hf_bf16_err}"
        agreement = (logits.float().argmax(-1) == expected.argmax(-1)).float().mean().item()
        assert agreement >= BF16_MIN_TOP1_AGREEMENT, f"{name}/{backend}: top-1 agreement {agreement}"


# --------------------------------------------------------------------------- padding
def _pad_batch(prompts, side: str, pad: int = 2):
    length = max(len(t) for t in prompts)
    tokens = torch.full((len(prompts), length), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, t in enumerate(prompts):
        sl = slice(0, len(t)) if side == "right" else slice(length - len(t), length)
        tokens[row, sl] = t
        mask[row, sl] = 1
    return tokens, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["h5-g1", "h4-g2"])
def test_padded_batch_matches_each_prompt_alone(hf_models, name, side, backend):
    hf = hf_models[name]
    model = _ours(hf, backend)
    prompts = [_tokens(1, n, seed=10 + n)[0] for n in (9, 20, 4)]
    tokens, mask = _pad_batch(prompts, side)
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask)
        for row, prompt in enumerate(prompts):
            real = mask[row].bool()
            assert _max_err(batched[row, real], _hf_logits(hf, prompt[None])[0]) <= 1e-5
            assert _max_err(batched[row, real], model(prompt[None])[0]) <= 1e-5
        if side == "left":  # without the mask the pads leak (so the check is not vacuous)
            unmasked = model(tokens)
            assert _max_err(unmasked[2, mask[2].bool()], batched[2, mask[2].bool()]) > 1e-4


# --------------------------------------------------------------------------- generation
@pytest.fixture(scope="module")
def gen_setup(hf_models):
    hf = hf_models["h5-g1"]  # chunk 7: the 9-token prefill crosses a chunk boundary
    return hf, _ours(hf, "torch"), _tokens(2, 9, seed=90)


def _hf_greedy(hf, tokens, n_new):
    """Independent reference: transformers' full forward over the whole prefix at every step."""
    for _ in range(n_new):
        tokens = torch.cat([tokens, _hf_logits(hf, tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@torch.no_grad()
def _greedy_by_full_forwards(model, tokens, n_new, fwd_hooks=()):
    for _ in range(n_new):
        logits = model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks))
        tokens = torch.cat([tokens, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_generate_equals_transformers_full_forwards(gen_setup, backend):
    hf, model, prompt = gen_setup
    model.set_backend(backend)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    assert out.shape == (2, 17)
    assert torch.equal(out[:, :9], prompt)
    assert torch.equal(out, _hf_greedy(hf, prompt, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_logits_equal_full_forward_via_recurrent_state(gen_setup, backend):
    hf, model, prompt = gen_setup
    model.set_backend(backend)
    tokens = torch.cat([prompt, _tokens(2, 8, seed=91)], dim=1)
    P = prompt.shape[1]
    state = RecurrentState.empty(model.cfg.n_layers)
    with torch.no_grad():
        logits = model(tokens[:, :P], state=state)
        assert _max_err(logits, _hf_logits(hf, tokens[:, :P])) <= 1e-5
        for t in range(P, tokens.shape[1]):
            step = model(tokens[:, t : t + 1], state=state)
            assert step.shape == (2, 1, VOCAB)
            assert _max_err(step[:, -1], _hf_logits(hf, tokens[:, : t + 1])[:, -1]) <= 1e-5, t
        assert state.layers[0]["ssm"].shape == (2, model.cfg.n_heads, model.cfg.d_head, model.cfg.d_state)


def test_multi_token_continuation_from_state(gen_setup):
    """A state carries over several-token forwards too: 9 + 11 + 10 tokens equal one 30-token forward."""
    hf, model, _ = gen_setup
    tokens = _tokens(2, 30, seed=92)
    state = RecurrentState.empty(model.cfg.n_layers)
    with torch.no_grad():
        parts = [model(tokens[:, a:b], state=state) for a, b in ((0, 9), (9, 20), (20, 30))]
    assert _max_err(torch.cat(parts, dim=1), _hf_logits(hf, tokens)) <= 1e-5


def test_hooks_fire_during_decoding(gen_setup):
    hf, model, prompt = gen_setup
    cfg = model.cfg
    shapes = {"blocks.0.hook_y": [], "blocks.1.hook_h": [], "blocks.0.hook_ssm_mask": []}

    def record(act, hook):
        shapes[hook.name].append(tuple(act.shape))

    n_new, P = 6, prompt.shape[1]
    with model.hooks(fwd_hooks=[(name, record) for name in shapes]):
        model.generate(prompt, max_new_tokens=n_new, do_sample=False, stop_at_eos=False, verbose=False)
    h, hd, n = cfg.n_heads, cfg.d_head, cfg.d_state
    assert shapes["blocks.0.hook_y"][0] == (2, P, h, hd)  # the prefill
    assert len(shapes["blocks.0.hook_y"]) - 1 in (n_new - 1, n_new)  # then one call per fed token
    assert all(s == (2, 1, h, hd) for s in shapes["blocks.0.hook_y"][1:])
    assert all(s == (2, 1, h, hd, n) for s in shapes["blocks.1.hook_h"][1:])
    assert all(s == (2, h, 1, 1) for s in shapes["blocks.0.hook_ssm_mask"][1:])
    assert len(shapes["blocks.1.hook_h"]) == len(shapes["blocks.0.hook_y"])


def test_head_ablation_during_decoding_equals_full_forwards(gen_setup):
    hf, model, prompt = gen_setup

    def ablate(y, hook):
        y[:, :, 1] = 0.0
        return y

    hooks = [("blocks.0.hook_y", ablate), ("blocks.1.hook_y", ablate)]
    with model.hooks(fwd_hooks=hooks):
        edited = model.generate(prompt, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    plain = model.generate(prompt, max_new_tokens=8, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(edited, _greedy_by_full_forwards(model, prompt, 8, fwd_hooks=hooks))
    assert not torch.equal(edited, plain)


def test_conv_and_delta_edits_during_decoding_equal_full_forwards(gen_setup):
    """Edits on the conv path flow into the carried conv state; Δ edits into the carried SSM state."""
    hf, model, prompt = gen_setup
    hooks = [("blocks.0.hook_conv_in", lambda a, hook: a * 1.7), ("blocks.1.hook_delta", lambda a, hook: a * 3.0)]
    with model.hooks(fwd_hooks=hooks):
        edited = model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(edited, _greedy_by_full_forwards(model, prompt, 6, fwd_hooks=hooks))
    assert not torch.equal(edited, _hf_greedy(hf, prompt, 6))


def test_state_edit_during_decoding_equals_full_forwards(gen_setup):
    """hook_h edits during decoding act on the carried state: setting entries of the state to fixed
    values at every step (prefill and p = 1 steps alike) is the same intervention as in a full forward.

    (A value-independent edit on purpose: a full forward calls the hook once with the states of the
    unedited scan, so a relative edit such as ``h * 0.5`` at every position does not compound the way
    it does step by step; see the report on hook_h semantics.)"""
    hf, model, prompt = gen_setup

    def clamp_entries(hs, hook):
        hs = hs.clone()
        hs[:, :, 1] = 0.0  # head 1 forgets everything
        hs[:, :, 3, :, 0] = 0.7  # one state dim of head 3 is pinned
        return hs

    hooks = [("blocks.0.hook_h", clamp_entries), ("blocks.1.hook_h", clamp_entries)]
    with model.hooks(fwd_hooks=hooks):
        edited = model.generate(prompt, max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(edited, _greedy_by_full_forwards(model, prompt, 6, fwd_hooks=hooks))
    assert not torch.equal(edited, _hf_greedy(hf, prompt, 6))


@pytest.mark.parametrize("backend", BACKENDS)
def test_left_padded_generation_equals_each_prompt_alone(gen_setup, backend):
    hf, model, _ = gen_setup
    model.set_backend(backend)
    prompts = [_tokens(1, n, seed=40 + n)[0] for n in (9, 2, 5)]
    tokens, mask = _pad_batch(prompts, "left")
    out = model.generate(tokens, attention_mask=mask, max_new_tokens=6, do_sample=False, stop_at_eos=False,
                         verbose=False)
    for row, prompt in enumerate(prompts):
        assert torch.equal(out[row, tokens.shape[1]:], _hf_greedy(hf, prompt[None], 6)[0, len(prompt):]), row


# --------------------------------------------------------------------------- transformer_lens.patching by head
@pytest.fixture(scope="module")
def patch_setup(hf_models):
    model = _ours(hf_models["h4-g2"], "torch")  # 4 heads in 2 groups
    clean = _tokens(1, 8, seed=80)
    corrupted = clean.clone()
    diff_pos = 3
    corrupted[0, diff_pos] = (clean[0, diff_pos] + 7) % VOCAB
    answer = int(clean[0, -1])

    def metric(logits):
        return logits[:, -1, answer].mean()

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
    return model, clean, corrupted, diff_pos, metric, float(metric(clean_logits)), float(metric(corrupted_logits)), clean_cache


def _manual_head_patch(model, corrupted, clean_cache, layer, pos, head, metric):
    name = f"blocks.{layer}.hook_y"

    def patch(y, hook):
        y = y.clone()
        y[:, pos, head] = clean_cache[name][:, pos, head]
        return y

    with torch.no_grad():
        return float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])))


def test_generic_activation_patch_by_layer_pos_head(patch_setup):
    model, clean, corrupted, diff_pos, metric, clean_m, corrupted_m, clean_cache = patch_setup
    assert model.cfg.n_heads == 4 and model.cfg.d_head == 8 and model.cfg.n_groups == 2
    assert abs(clean_m - corrupted_m) > 1e-4
    result = tl_patching.generic_activation_patch(
        model, corrupted, clean_cache, metric, patch_setter=tl_patching.layer_pos_head_vector_patch_setter,
        activation_name="y", index_axis_names=("layer", "pos", "head_index"),
    )
    n, p, h = model.cfg.n_layers, clean.shape[1], model.cfg.n_heads
    assert result.shape == (n, p, h)
    for l in range(n):  # positions before the corruption: identical runs, patching is a no-op
        for pos in range(diff_pos):
            for head in range(h):
                assert math.isclose(float(result[l, pos, head]), corrupted_m, rel_tol=1e-4, abs_tol=1e-5)
    for l, pos, head in [(0, diff_pos, 1), (1, p - 1, 2), (1, diff_pos + 2, 3)]:
        manual = _manual_head_patch(model, corrupted, clean_cache, l, pos, head, metric)
        assert math.isclose(float(result[l, pos, head]), manual, rel_tol=1e-4, abs_tol=1e-5), (l, pos, head)
    assert (result[0, diff_pos] - corrupted_m).abs().max() > 1e-5  # patching the corrupted position matters


def test_generic_activation_patch_by_layer_head(patch_setup):
    model, clean, corrupted, diff_pos, metric, clean_m, corrupted_m, clean_cache = patch_setup
    result = tl_patching.generic_activation_patch(
        model, corrupted, clean_cache, metric, patch_setter=tl_patching.layer_head_vector_patch_setter,
        activation_name="y", index_axis_names=("layer", "head_index"),
    )
    assert result.shape == (model.cfg.n_layers, model.cfg.n_heads)
    name = "blocks.1.hook_y"

    def patch(y, hook):
        y = y.clone()
        y[:, :, 3] = clean_cache[name][:, :, 3]
        return y

    with torch.no_grad():
        manual = float(metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)])))
    assert math.isclose(float(result[1, 3]), manual, rel_tol=1e-4, abs_tol=1e-5)


def test_get_act_patch_resid_pre(patch_setup):
    model, clean, corrupted, diff_pos, metric, clean_m, corrupted_m, clean_cache = patch_setup
    result = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    n, p = model.cfg.n_layers, clean.shape[1]
    assert result.shape == (n, p)
    for pos in range(p):  # layer 0: resid_pre is the embedding, only diff_pos differs
        want = clean_m if pos == diff_pos else corrupted_m
        assert math.isclose(float(result[0, pos]), want, rel_tol=1e-4, abs_tol=1e-5), pos


# --------------------------------------------------------------------------- loading: mamba_ssm Mamba-2 layout
def _hf_for_mamba_ssm(tie: bool) -> Mamba2ForCausalLM:
    hf = tiny_transformers_model("mamba2", tie=tie, seed=11 if tie else 12, time_step_limit=(0.01, 0.5))
    return _perturb(hf, seed=13 if tie else 14)


@pytest.mark.parametrize("tie", [True, False])
def test_mamba_ssm_mamba2_dir_loads_and_matches_transformers(tmp_path, tie):
    """A mamba_ssm Mamba-2 directory (vocab_size 50 padded to the 56 rows of the weights, 2 groups,
    finite dt_limit) loads through both entry points and gives the logits of the transformers model
    that holds the same weights."""
    hf = _hf_for_mamba_ssm(tie)
    sd = transformers_to_mamba_ssm_keys(hf.state_dict(), tie=tie)
    assert "backbone.embedding.weight" in sd and "backbone.layers.1.mixer.dt_bias" in sd
    raw = mamba_ssm_config(d_model=16, n_layer=2, vocab_size=50, tie_embeddings=tie, ssm_cfg={
        "layer": "Mamba2", "d_state": 8, "d_conv": 4, "expand": 2, "headdim": 8, "ngroups": 2, "chunk_size": 8,
        "dt_limit": [0.01, 0.5]})
    write_mamba_ssm_checkpoint(tmp_path, sd, raw)
    tokens = torch.randint(0, 56, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # not memoised: this model lives for one test only
        expected = hf(tokens, use_cache=False).logits
    for model in (tl_mamba.from_pretrained(tmp_path), HookedMamba2.from_pretrained(tmp_path)):
        assert type(model) is HookedMamba2
        cfg = model.cfg
        assert (cfg.d_vocab, cfg.n_heads, cfg.d_head, cfg.n_groups, cfg.checkpoint_chunk_size) == (56, 4, 8, 2, 8)
        assert cfg.chunk_size == DEFAULT_CHUNK  # our torch backend's chunk length; the checkpoint's 8 is kept for saving
        assert tuple(cfg.dt_limit) == (0.01, 0.5) and cfg.tie_embeddings is tie
        with torch.no_grad():
            assert _max_err(model(tokens), expected) <= 1e-5
    saved = json.loads((model.save_pretrained(tmp_path / "saved") / "config.json").read_text())
    assert saved["ssm_cfg"]["chunk_size"] == 8  # written back as the checkpoint named it


def test_from_hf_float64_follows_the_model(hf_models):
    hf64 = copy.deepcopy(hf_models["h3-g3"]).double()
    model = HookedMamba2.from_hf(hf64)
    assert model.cfg.dtype == torch.float64 and all(p.dtype == torch.float64 for p in model.parameters())
    tokens = _tokens(2, 23, seed=23)
    with torch.no_grad():
        logits = model(tokens)
        expected = hf64(tokens, use_cache=False).logits
    assert logits.dtype == torch.float64
    assert _max_err(logits, expected) <= 1e-5


def test_mamba2_class_refuses_mamba1_checkpoints(tmp_path):
    hf1 = tiny_transformers_model("mamba", tie=True, seed=1)
    hf1.save_pretrained(tmp_path / "hf")
    with pytest.raises(WrongModelClassError, match=r"Mamba-1 checkpoint.*HookedMamba\.from_pretrained"):
        HookedMamba2.from_pretrained(tmp_path / "hf")
    raw = mamba_ssm_config(d_model=24, n_layer=2, vocab_size=50, ssm_cfg={"d_state": 8})
    write_mamba_ssm_checkpoint(tmp_path / "ssm", transformers_to_mamba_ssm_keys(hf1.state_dict(), tie=True), raw)
    with pytest.raises(WrongModelClassError, match=r"Mamba-1 checkpoint \(mamba_ssm layout\).*HookedMamba\b"):
        HookedMamba2.from_pretrained(tmp_path / "ssm")
    assert type(HookedMamba2.from_hf(hf1)) is HookedMamba  # from_hf gives the model's own class
    assert isinstance(tl_mamba.from_pretrained(tmp_path / "ssm"), HookedMamba)  # the picker gets it right


@pytest.mark.parametrize(
    "change,option",
    [
        ({"ssm_cfg": {"layer": "Mamba2", "headdim": 8, "d_ssm": 16}}, "d_ssm=16"),
        ({"ssm_cfg": {"layer": "Mamba2", "headdim": 8, "D_has_hdim": True}}, "D_has_hdim"),
        ({"ssm_cfg": {"layer": "Mamba2", "headdim": 8}, "attn_layer_idx": [1]}, "attn_layer_idx"),
    ],
)
def test_unrepresentable_mamba2_options_name_the_option(tmp_path, change, option):
    raw = mamba_ssm_config(d_model=16, n_layer=2, vocab_size=50)
    raw.update(change)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    for load in (HookedMamba2.from_pretrained, tl_mamba.from_pretrained):
        with pytest.raises(UnsupportedArchitectureError, match=option):
            load(tmp_path)


def test_constructor_checks_family():
    cfg2 = HookedMambaConfig(family="mamba2", n_layers=1, d_model=8, d_vocab=20, d_head=4, n_groups=2, d_state=3)
    model = HookedMamba2(cfg2)
    assert (model.cfg.n_heads, model.cfg.d_head, model.cfg.n_groups) == (4, 4, 2)
    with pytest.raises(ValueError, match="mamba2"):
        HookedMamba2(HookedMambaConfig(n_layers=1, d_model=8, d_vocab=20))
    with pytest.raises(ValueError, match="divisible"):
        HookedMambaConfig(family="mamba2", n_layers=1, d_model=10, d_vocab=20, d_head=4, n_groups=2)  # 5 heads
