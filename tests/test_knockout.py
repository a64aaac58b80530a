"""Knockout and hidden attention against an explicit brute-force computation.

The reference recomputes each knocked-out layer from its hooked inputs with
nothing of tl_mamba's scan code: α[i, j] is built from explicit products of the
per-step decays (no cumulative sums), the mask is applied entry by entry, and the
conv is written out tap by tap. It replaces ``hook_conv`` and ``hook_y`` in an
ordinary forward, so everything downstream is the model's own computation.
"""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import tl_mamba
from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig, Knockout

B, P = 3, 9


def make_model(family: str, seed: int = 0, n_heads: int = 4, n_groups: int = 2):
    if family == "mamba1":
        cfg = HookedMambaConfig(n_layers=2, d_model=16, d_vocab=50, d_state=4, d_conv=4, expand=2, seed=seed)
        model = HookedMamba(cfg)
    else:
        cfg = HookedMambaConfig(family="mamba2", n_layers=2, d_model=16, d_vocab=50, d_state=4, d_conv=4,
                                expand=2, n_heads=n_heads, n_groups=n_groups, chunk_size=4, seed=seed)
        model = HookedMamba2(cfg)
    gen = torch.Generator().manual_seed(1000 + seed)  # the same model whichever tests ran before
    with torch.no_grad():  # move weights off their init so every path carries signal
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype).to(param.device) * 0.2)
    return model.double()


def brute_alpha(family, delta, A, Bm, C, heads_per_group=1):
    """α by explicit products: Mamba-1 ``[b, e, p, p]``, Mamba-2 ``[b, h, p, p]`` (float64)."""
    b, p = delta.shape[:2]
    F = delta.shape[-1]
    alpha = torch.zeros(b, F, p, p, dtype=torch.float64)
    for i in range(p):
        for j in range(i + 1):
            if family == "mamba1":
                prod = torch.ones(b, F, A.shape[-1], dtype=torch.float64)  # [b, e, n]
                for k in range(j + 1, i + 1):
                    prod = prod * torch.exp(delta[:, k, :, None] * A)
                alpha[:, :, i, j] = (prod * Bm[:, j, None, :] * C[:, i, None, :]).sum(-1) * delta[:, j]
            else:
                prod = torch.ones(b, F, dtype=torch.float64)
                for k in range(j + 1, i + 1):
                    prod = prod * torch.exp(delta[:, k] * A)
                Bh = Bm[:, j].repeat_interleave(heads_per_group, dim=1)  # [b, h, n]
                Ch = C[:, i].repeat_interleave(heads_per_group, dim=1)
                alpha[:, :, i, j] = prod * (Bh * Ch).sum(-1) * delta[:, j]
    return alpha


def brute_conv(conv_in, weight, bias, keep):
    """Causal depthwise conv tap by tap; ``keep[b, i, j, c]`` multiplies the tap j → i."""
    b, p, c = conv_in.shape
    k = weight.shape[-1]
    out = torch.zeros_like(conv_in) + (bias if bias is not None else 0)
    for i in range(p):
        for j in range(max(0, i - k + 1), i + 1):
            out[:, i] += weight[:, 0, k - 1 - (i - j)] * conv_in[:, j] * keep[:, i, j]
    return out


def edge_mask(b, p, sources, targets, n_features, features=None):
    """keep[b, F, i, j]: 0 where j is a source, i a target and the feature chosen (j ≤ i)."""
    keep = torch.ones(b, n_features, p, p, dtype=torch.float64)
    for row in range(b):
        for i in targets[row]:
            for j in sources[row]:
                if j <= i:
                    for f in (range(n_features) if features is None else features):
                        keep[row, f, i, j] = 0.0
    return keep


def conv_channels(cfg, features):
    """The conv channels a knockout's heads / channels touch (None: all)."""
    if cfg.family == "mamba1" or features is None:
        return features
    # Mamba-2: the chosen heads' x channels; B/C of groups whose heads are all chosen
    hpg = cfg.n_heads // cfg.n_groups
    chans = [h * cfg.d_head + d for h in features for d in range(cfg.d_head)]
    for g in range(cfg.n_groups):
        if all(h in features for h in range(g * hpg, (g + 1) * hpg)):
            for part in range(2):
                start = cfg.d_inner + part * cfg.n_groups * cfg.d_state + g * cfg.d_state
                chans += list(range(start, start + cfg.d_state))
    return chans


def reference_forward(model, tokens, layers, sources, targets, path, features=None, fwd_hooks=()):
    """Logits with the knockout applied by the brute-force hooks.

    sources / targets: per row, lists of non-negative positions.
    """
    return reference_union(model, tokens, [(layers, sources, targets, path, features)], fwd_hooks)


def reference_union(model, tokens, knockouts, fwd_hooks=(), after=()):
    """Logits with the union of several knockouts ``(layers, sources, targets, path, features)``:
    an edge or tap is kept only if no knockout removes it (the product of their keep masks).
    ``fwd_hooks`` run before the brute-force hooks (e.g. an edit of hook_conv_in), ``after``
    after them (e.g. an edit of the knocked-out hook_conv)."""
    cfg = model.cfg
    b, p = tokens.shape
    seen = {}
    hooks = list(fwd_hooks)

    def grab(name):
        def fn(value, hook):
            seen[name] = value.clone()
        return fn

    for layer in sorted({layer for spec in knockouts for layer in spec[0]}):
        block = model.blocks[layer]
        prefix = f"blocks.{layer}."
        mine = [spec for spec in knockouts if layer in spec[0]]
        for name in ("hook_conv_in", "hook_x", "hook_delta", "hook_B", "hook_C"):
            hooks.append((prefix + name, grab(prefix + name)))
        conv_specs = [spec for spec in mine if spec[3] in ("conv", "both")]
        if conv_specs:
            c = block.mixer.conv1d.weight.shape[0]
            keep = torch.ones(b, c, p, p, dtype=torch.float64)
            for _, sources, targets, _, features in conv_specs:
                keep = keep * edge_mask(b, p, sources, targets, c, conv_channels(cfg, features))
            keep = keep.permute(0, 2, 3, 1)  # [b, i, j, c]

            def conv_hook(value, hook, block=block, prefix=prefix, keep=keep):
                return brute_conv(seen[prefix + "hook_conv_in"], block.mixer.conv1d.weight, block.mixer.conv1d.bias,
                                  keep)
            hooks.append((prefix + "hook_conv", conv_hook))
        ssm_specs = [spec for spec in mine if spec[3] in ("ssm", "both")]
        if ssm_specs:
            F = cfg.d_inner if cfg.family == "mamba1" else cfg.n_heads
            keep = torch.ones(b, F, p, p, dtype=torch.float64)
            for _, sources, targets, _, features in ssm_specs:
                keep = keep * edge_mask(b, p, sources, targets, F, features)

            def y_hook(value, hook, block=block, prefix=prefix, keep=keep):
                A = -torch.exp(block.mixer.A_log)
                x, delta, Bm, C = (seen[prefix + n] for n in ("hook_x", "hook_delta", "hook_B", "hook_C"))
                if cfg.family == "mamba1":
                    alpha = brute_alpha("mamba1", delta, A, Bm, C)
                    return torch.einsum("beij,bje->bie", alpha * keep, x) + block.mixer.D * x
                alpha = brute_alpha("mamba2", delta, A, Bm, C, cfg.n_heads // cfg.n_groups)
                return torch.einsum("bhij,bjhd->bihd", alpha * keep, x) + block.mixer.D[:, None] * x
            hooks.append((prefix + "hook_y", y_hook))
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks + list(after))


FAMILIES = ["mamba1", "mamba2"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(params=["scan", "edges"])
def route(request, monkeypatch):
    """Force the S → T knockout's route: one extra scan, or edge by edge (pair_terms)."""
    from tl_mamba.ops import knockout as ops_knockout

    per_position = 0.0 if request.param == "scan" else 1e9
    monkeypatch.setattr(ops_knockout, "PAIRS_PER_SCANNED_POSITION", {"bpe": per_position, "bphd": per_position})
    return request.param


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("path", ["ssm", "conv", "both"])
def test_knockout_matches_brute_force(family, path, backend, route):
    model = make_model(family).set_backend(backend)
    tokens = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(1))
    ko = Knockout(layers=[0, 1], sources=[1, 2, -5], targets=[-1, -3, 4], path=path)
    with torch.no_grad():
        ours = model.run_with_knockout(tokens, ko)
        plain = model(tokens)
    ref = reference_forward(model, tokens, [0, 1], [[1, 2, 4]] * B, [[8, 6, 4]] * B, path)
    assert (ref - plain).abs().max() > 1e-3  # the knockout does something
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path", ["ssm", "conv", "both"])
def test_feature_restricted_knockout(family, path, route):
    model = make_model(family)
    tokens = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(2))
    features = [0, 1] if family == "mamba2" else [0, 3, 5, 17]
    kwargs = {"heads": features} if family == "mamba2" else {"channels": features}
    ko = Knockout(layers=1, sources=[0, 3, 6], targets=[-1, -2], path=path, **kwargs)
    with torch.no_grad():
        ours = model.run_with_knockout(tokens, ko)
        full = model.run_with_knockout(tokens, Knockout(layers=1, sources=[0, 3, 6], targets=[-1, -2], path=path))
    ref = reference_forward(model, tokens, [1], [[0, 3, 6]] * B, [[8, 7]] * B, path, features)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    assert (ours - full).abs().max() > 1e-6  # restricting the features changes the result


@pytest.mark.parametrize("path", ["ssm", "conv", "both"])
def test_per_layer_features(family, path, route):
    """heads= / channels= as ``{layer: features}``: each layer knocks out in its own features (a
    negative key counts from the end), as the brute-force union of one knockout per layer."""
    model = make_model(family)
    tokens = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(12))
    per_layer = {0: [0, 1], -1: [2, 3]} if family == "mamba2" else {0: [0, 3, 5, 17], -1: [1, 2, 30]}
    what = "heads" if family == "mamba2" else "channels"
    ko = Knockout(layers=[0, 1], sources=[4, 6], targets=[-1, 7], path=path, **{what: per_layer})
    with torch.no_grad():
        ours = model.run_with_knockout(tokens, ko)
    sources, targets = [[4, 6]] * B, [[8, 7]] * B
    ref = reference_union(model, tokens, [([0], sources, targets, path, per_layer[0]),
                                          ([1], sources, targets, path, per_layer[-1])])
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    for features in per_layer.values():  # not the same as either list in both layers
        shared = reference_forward(model, tokens, [0, 1], sources, targets, path, features)
        assert (ref - shared).abs().max() > 1e-6


def test_a_mapping_where_a_list_is_read_is_refused():
    """Read as a list, ``{layer: heads}`` gives its keys: heads={1: [0, 1]} would be head 1 in every
    layer. Where one list is read (Knockout's layers and positions, knockout_attribution's and
    patch_heads' heads, hidden_attention's heads), a mapping is refused by name."""
    from tl_mamba.circuits import knockout_attribution, patch_heads

    model = make_model("mamba2")
    tokens = torch.randint(0, 50, (2, P), generator=torch.Generator().manual_seed(13))
    metric = lambda logits: logits[:, -1, 0].sum()
    for call, named in ((lambda: Knockout(layers={0: [1]}, sources=[0]), "Knockout layers"),
                        (lambda: Knockout(layers=0, sources={0: [1]}), "Knockout sources"),
                        (lambda: model.hidden_attention(tokens, 0, heads={0: [1]}), "heads"),
                        (lambda: knockout_attribution(model, tokens, metric, heads={1: [0]}, progress=False),
                         "knockout_attribution heads"),
                        (lambda: patch_heads(model, tokens, tokens.flip(0), metric, heads={1: [0]}, progress=False),
                         "heads")):
        with pytest.raises(tl_mamba.NotAnIndexError, match=f"{named}: got a dict with keys .* read as a list it would"):
            call()


@pytest.mark.parametrize("path", ["ssm", "conv"])
def test_per_row_masks(family, path, route):
    """[b, p] bool sources/targets: one different knockout per batch row in one forward."""
    model = make_model(family)
    tokens = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(3))
    src_rows, tgt_rows = [[1], [0, 4], [2, 3, 5]], [[8], [5, 8], [6]]
    sources = torch.zeros(B, P, dtype=torch.bool)
    targets = torch.zeros(B, P, dtype=torch.bool)
    for row in range(B):
        sources[row, src_rows[row]] = True
        targets[row, tgt_rows[row]] = True
    with torch.no_grad():
        ours = model.run_with_knockout(tokens, Knockout(layers=range(2), sources=sources, targets=targets, path=path))
    ref = reference_forward(model, tokens, [0, 1], src_rows, tgt_rows, path)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_plain_mask_hook_matches_brute_force(family, route):
    """hook_ssm_mask is an ordinary hook: zeroing entries by hand is the knockout."""
    model = make_model(family)
    tokens = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(4))

    def zero_edges(mask, hook):
        mask[:, :, 7, 2] = 0.0
        mask[:, :, 8, [0, 5]] = 0.0
        return mask

    with torch.no_grad():
        ours = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_ssm_mask", zero_edges)])
    # the hand mask is not S→T (2→7, 0→8, 5→8), so build the reference mask directly
    cfg = model.cfg
    seen = {}

    def grab(value, hook):
        seen[hook.name] = value.clone()

    def y_hook(value, hook):
        block = model.blocks[0]
        A = -torch.exp(block.mixer.A_log)
        x, delta, Bm, C = (seen[f"blocks.0.hook_{n}"] for n in ("x", "delta", "B", "C"))
        F = cfg.d_inner if cfg.family == "mamba1" else cfg.n_heads
        keep = torch.ones(B, F, P, P, dtype=torch.float64)
        keep[:, :, 7, 2] = 0
        keep[:, :, 8, 0] = 0
        keep[:, :, 8, 5] = 0
        if cfg.family == "mamba1":
            alpha = brute_alpha("mamba1", delta, A, Bm, C)
            return torch.einsum("beij,bje->bie", alpha * keep, x) + block.mixer.D * x
        alpha = brute_alpha("mamba2", delta, A, Bm, C, cfg.n_heads // cfg.n_groups)
        return torch.einsum("bhij,bjhd->bihd", alpha * keep, x) + block.mixer.D[:, None] * x

    hooks = [(f"blocks.0.hook_{n}", grab) for n in ("x", "delta", "B", "C")] + [("blocks.0.hook_y", y_hook)]
    with torch.no_grad():
        ref = model.run_with_hooks(tokens, fwd_hooks=hooks)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_all_ones_mask_changes_nothing(family):
    model = make_model(family)
    tokens = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model(tokens)
        hooked = model.run_with_hooks(tokens, fwd_hooks=[
            (lambda name: name.endswith("hook_ssm_mask"), lambda mask, hook: torch.ones_like(mask))])
        with pytest.warns(UserWarning, match="removes no edges"):
            empty = model.run_with_knockout(tokens, Knockout(layers=[0, 1], sources=[], targets=[-1]))
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)
    torch.testing.assert_close(empty, plain, rtol=0, atol=0)


def test_union_of_overlapping_knockouts(family, route):
    """Two knockouts sharing edges remove their union (each edge once), like one mask."""
    model = make_model(family)
    tokens = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(6))
    kos = [Knockout(layers=0, sources=[1, 2], targets=[-1]), Knockout(layers=0, sources=[2, 3], targets=[-1, -2])]
    with torch.no_grad():
        ours = model.run_with_knockout(tokens, kos)
        with model.knockouts(kos):
            in_context = model(tokens)
        with model.knockouts(*kos):  # several as arguments: the same union
            as_arguments = model(tokens)
        after = model(tokens)
    torch.testing.assert_close(as_arguments, in_context, rtol=0, atol=0)
    keep_sources = [[1, 2, 3]] * B  # edges: {1,2,3}→8 and {2,3}→7
    ref_first = reference_forward(model, tokens, [0], keep_sources, [[8]] * B, "ssm")
    assert (ref_first - ours).abs().max() > 1e-6  # 2,3 → 7 is also removed
    cfg = model.cfg
    F = cfg.d_inner if cfg.family == "mamba1" else cfg.n_heads
    keep = edge_mask(B, P, [[1, 2, 3]] * B, [[8]] * B, F) * edge_mask(B, P, [[2, 3]] * B, [[7]] * B, F)

    def dense(mask, hook):
        return mask * keep[:, :mask.shape[1]].to(mask.dtype)

    with torch.no_grad():
        dense_out = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_ssm_mask", dense)])
    torch.testing.assert_close(ours, in_context, rtol=0, atol=0)
    torch.testing.assert_close(ours, dense_out, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(after, model(tokens).detach(), rtol=0, atol=0)  # context removed its hooks
    assert not any(model.blocks[0].hook_ssm_mask.fwd_hooks)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_union_of_overlapping_knockouts_on_every_path(family, route, backend):
    """Knockouts sharing conv taps and SSM edges, with and without features, remove their union:
    each tap and edge once (a conv tap shared by two knockouts used to be subtracted twice, and a
    channels= knockout overlapping another was refused)."""
    model = make_model(family).set_backend(backend)
    tokens = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(16))
    features = [1, 2] if family == "mamba2" else [0, 3, 5]
    kwarg = "heads" if family == "mamba2" else "channels"
    specs = [([0, 1], [[5, 6]] * B, [[8]] * B, "conv", None),
             ([1], [[6]] * B, [[8, 7]] * B, "both", None),
             ([1], [[2, 6]] * B, [[8]] * B, "ssm", features),
             ([1], [[6, 7]] * B, [[7, 8]] * B, "both", features)]
    kos = [Knockout(layers=layers, sources=src[0], targets=[t - P for t in tgt[0]], path=path,
                    **({kwarg: feats} if feats is not None else {}))
           for layers, src, tgt, path, feats in specs]
    with torch.no_grad():
        ours = model.run_with_knockout(tokens, kos)
        plain = model(tokens)
    ref = reference_union(model, tokens, specs)
    assert (ref - plain).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("order", ["edit first", "knockout first"])
@pytest.mark.parametrize("hook", ["hook_conv_in", "hook_conv"])
def test_conv_knockout_and_edits_of_the_conv_compose_in_any_order(family, hook, order):
    """A conv knockout removes the taps of what the conv read (hook_conv_in after every hook on it)
    and acts before every other hook on hook_conv (as hooks on hook_y see the knocked-out y),
    whichever was added first. Before, an edit of hook_conv_in added after the knockout was
    missed, and an edit of hook_conv added before it was knocked out afterwards (edit(conv) - taps)."""
    model = make_model(family)
    tokens = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(17))

    def edit(act, hook):
        act = act.clone()
        act[:, 5:9] *= 1.7
        return act

    edits = [(f"blocks.1.{hook}", edit)]
    ko = Knockout(layers=[1], sources=[5, 6], targets=[7, 8], path="conv")
    with torch.no_grad():
        if order == "edit first":
            with model.hooks(fwd_hooks=edits):
                ours = model.run_with_knockout(tokens, ko)
        else:
            ours = model.run_with_knockout(tokens, ko, fwd_hooks=edits)
        edited = model.run_with_hooks(tokens, fwd_hooks=edits)
    # the brute-force conv reads hook_conv_in's edit (before it) and is what hook_conv's edit gets (after it)
    where = {"fwd_hooks": edits} if hook == "hook_conv_in" else {"after": edits}
    ref = reference_union(model, tokens, [([1], [[5, 6]] * B, [[7, 8]] * B, "conv", None)], **where)
    assert (ref - edited).abs().max() > 1e-3
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_disjoint_removals_remove_each_edge_once():
    """disjoint_removals: pieces whose edges, summed, equal the union of the removals' edges
    (counted entry by entry), with per-row sources / targets and feature subsets."""
    from tl_mamba.ops.knockout import EdgeRemoval, any_overlap, disjoint_removals

    gen = torch.Generator().manual_seed(18)
    b, p, F = 3, 7, 4
    for _ in range(20):
        removals = []
        for _ in range(3):
            features = None if torch.rand(1, generator=gen) < 0.3 else (torch.rand(F, generator=gen) < 0.6).float()
            removals.append(EdgeRemoval(sources=(torch.rand(b, p, generator=gen) < 0.4).float(),
                                        targets=(torch.rand(b, p, generator=gen) < 0.4).float(), features=features))
        union = torch.zeros(b, F, p, p)
        for r in removals:
            for row in range(b):
                for f in range(F):
                    if r.features is not None and r.features[f] == 0:
                        continue
                    for i in range(p):
                        for j in range(i + 1):
                            if r.sources[row, j] and r.targets[row, i]:
                                union[row, f, i, j] = 1
        pieces = disjoint_removals(removals)
        assert not any_overlap(pieces)
        total = sum((piece.dense(F) for piece in pieces), torch.zeros(b, F, p, p))
        torch.testing.assert_close(total, union, rtol=0, atol=0)


def test_structured_knockout_builds_no_mask(family):
    """Knockouts alone never materialise the p×p mask: a 1-byte limit does not stop them."""
    model = make_model(family)
    tokens = torch.randint(0, 50, (B, P))
    model.heavy_hook_memory_limit = 1
    with torch.no_grad():
        model.run_with_knockout(tokens, Knockout(layers=[0, 1], sources=[0], targets=[-1]))
        with pytest.raises(MemoryError, match="hook_ssm_mask"):
            model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_ssm_mask", lambda m, hook: m)])


def test_knockout_hooks_compose_with_cache(family):
    """Caching the mask next to a knockout shows the knocked-out entries, and the output is the same."""
    model = make_model(family)
    tokens = torch.randint(0, 50, (B, P))
    ko = Knockout(layers=1, sources=[2], targets=[-1], path="ssm")
    with torch.no_grad():
        expected = model.run_with_knockout(tokens, ko)
        with model.knockouts(ko):
            logits, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_ssm_mask")
    mask = cache["blocks.1.hook_ssm_mask"]
    assert float(mask[:, :, -1, 2].max()) == 0.0 and float(mask.sum()) == mask.numel() - mask.shape[0] * mask.shape[1]
    torch.testing.assert_close(logits, expected, rtol=1e-9, atol=1e-9)


def test_default_route_by_edges_per_position(family, monkeypatch):
    """The default route (``PAIRS_PER_SCANNED_POSITION``: Mamba-1 0.5, Mamba-2 8 edges per
    scanned position): 2 sources → last (2 edges over 8 positions) goes edge by edge in both
    families; 4 → 4 (16 edges over 8) scans for Mamba-1 and goes edge by edge for Mamba-2;
    20 → 20 over 40 positions (10 per position) scans for Mamba-2. All equal the brute force."""
    from tl_mamba.ops import knockout as ops_knockout

    model = make_model(family)
    used = {"edges": 0}
    real = ops_knockout.removed_terms

    def spy(contribution_by_row, removals, layout, shape, pairs=None):  # counts calls of the edge route
        def counted(*args):
            used["edges"] += 1
            return pairs(*args)
        return real(contribution_by_row, removals, layout, shape, None if pairs is None else counted)

    monkeypatch.setattr(sys.modules["tl_mamba.ops.scan_edits"], "removed_terms", spy)  # both families' edits
    cases = [(P, [1, 2], [8], 1), (P, [1, 2, 3, 4], [5, 6, 7, 8], 0 if family == "mamba1" else 1)]
    if family == "mamba2":
        cases.append((40, list(range(20)), list(range(20, 40)), 0))
    for length, sources, targets, edge_calls in cases:
        tokens = torch.randint(0, 50, (B, length), generator=torch.Generator().manual_seed(7))
        used["edges"] = 0
        with torch.no_grad():
            ours = model.run_with_knockout(tokens, Knockout(layers=[1], sources=sources, targets=targets))
        assert used["edges"] == edge_calls, (sources, targets)
        ref = reference_forward(model, tokens, [1], [sources] * B, [targets] * B, "ssm")
        assert (ref - model(tokens).detach()).abs().max() > 1e-4  # the knockout does something
        torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_pair_terms_gradcheck(family):
    """The edge-by-edge terms are differentiable in x, Δ, A, B and C (float64 gradcheck)."""
    from tl_mamba.ops.knockout import pair_terms_bpe, pair_terms_bphd

    gen = torch.Generator().manual_seed(8)

    def rand(*shape, positive=False):
        t = torch.rand(shape, generator=gen, dtype=torch.float64)
        return (t * 0.5 + 0.05 if positive else t - 0.5).requires_grad_()

    targets, sources = torch.tensor([4, 4, 6]), torch.tensor([1, 4, 2])
    if family == "mamba1":
        inputs = (rand(2, 7, 3), rand(2, 7, 3, positive=True), -rand(3, 2, positive=True), rand(2, 7, 2),
                  rand(2, 7, 2))
        fn = pair_terms_bpe
    else:
        inputs = (rand(2, 7, 4, 2), rand(2, 7, 4, positive=True), -rand(4, positive=True), rand(2, 7, 2, 3),
                  rand(2, 7, 2, 3))
        fn = pair_terms_bphd
    assert torch.autograd.gradcheck(lambda *t: fn(*t, targets, sources), inputs)


# ------------------------------------------------------------------ hidden attention
def test_hidden_attention_matches_brute_force_and_reconstructs_y(family):
    model = make_model(family)
    tokens = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    cfg, block = model.cfg, model.blocks[1]
    delta, Bm, C, x, y = (cache[f"blocks.1.hook_{n}"] for n in ("delta", "B", "C", "x", "y"))
    A = -torch.exp(block.mixer.A_log)
    alpha = model.hidden_attention(cache, 1)
    assert alpha.dtype == torch.float64  # a float64 model keeps its precision
    ref = brute_alpha(family, delta, A, Bm, C, cfg.n_heads // cfg.n_groups if family == "mamba2" else 1)
    torch.testing.assert_close(alpha, ref, rtol=1e-10, atol=1e-12)
    if family == "mamba1":
        rebuilt = torch.einsum("beij,bje->bie", alpha, x) + block.mixer.D * x
    else:
        rebuilt = torch.einsum("bhij,bjhd->bihd", alpha, x) + block.mixer.D[:, None] * x
    torch.testing.assert_close(rebuilt, y, rtol=1e-10, atol=1e-12)
    # a float32 model gets float32
    alpha32 = model.float().hidden_attention(tokens, 1)
    model.double()
    assert alpha32.dtype == torch.float32
    torch.testing.assert_close(alpha32.double(), ref, rtol=1e-4, atol=1e-5)
    # from tokens, with a selection, and reduced
    pick = {"heads": [2, 0]} if family == "mamba2" else {"channels": [5, 1]}
    chosen = model.hidden_attention(tokens, 1, **pick)
    torch.testing.assert_close(chosen, alpha[:, [2, 0] if family == "mamba2" else [5, 1]])
    # a bool mask, as Knockout takes (it was refused as not an index), chooses its True features in order
    what, size = ("heads", cfg.n_heads) if family == "mamba2" else ("channels", cfg.d_inner)
    mask = torch.zeros(size, dtype=torch.bool)
    mask[[0, 2]] = True
    torch.testing.assert_close(model.hidden_attention(cache, 1, **{what: mask}), ref[:, [0, 2]], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match=rf"a bool mask of {what} must have {size} entries, got shape \(3,\)"):
        model.hidden_attention(cache, 1, **{what: mask[:3]})
    with pytest.raises(ValueError, match=f"the {what} mask chooses none"):
        model.hidden_attention(cache, 1, **{what: torch.zeros(size, dtype=torch.bool)})
    norm = tl_mamba.hidden_attention(model, cache, 1, reduce="norm", chunk_bytes=1)
    torch.testing.assert_close(norm, alpha.pow(2).sum(1).sqrt(), rtol=1e-5, atol=1e-6)


def test_hidden_attention_memory_guard():
    model = make_model("mamba1")
    model.heavy_hook_memory_limit = 8000  # p = 8 reduced fits (result + one channel's float64 α), p = 40 not
    with pytest.raises(MemoryError, match="reduce="):
        model.hidden_attention(torch.zeros(1, 40, dtype=torch.long), 0)
    assert model.hidden_attention(torch.zeros(1, 8, dtype=torch.long), 0, reduce="norm").shape == (1, 8, 8)
    # the contract: the method's own docstring (what help(model.hidden_attention) shows) states the memory
    for cls in (HookedMamba, HookedMamba2):
        assert "Memory:" in cls.hidden_attention.__doc__ and "b·c·p²·4" in cls.hidden_attention.__doc__


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "family, kwargs, error, message",
    [
        ("mamba1", dict(layers=0, sources=[0], heads=[0]), ValueError, "channels="),
        ("mamba2", dict(layers=0, sources=[0], channels=[0]), ValueError, "heads="),
        ("mamba1", dict(layers=5, sources=[0]), IndexError, "layers"),
        ("mamba1", dict(layers=0, sources=[20]), IndexError, "out of range"),
        ("mamba2", dict(layers=0, sources=[0], heads=[9]), IndexError, "heads"),
        ("mamba1", dict(layers=0, sources=torch.ones(5, dtype=torch.bool)), ValueError, "p = 9"),
        # per-layer heads= / channels=: exactly the knockout's layers, each entry in range
        ("mamba2", dict(layers=[0, 1], sources=[0], heads={0: [0]}), ValueError, r"layers \[1\] have none"),
        ("mamba2", dict(layers=0, sources=[0], heads={0: [0], 1: [1]}), ValueError, r"keys \[1\] are not among"),
        ("mamba2", dict(layers=0, sources=[0], heads={0: [0], -2: [1]}), ValueError, "layer 0 has two entries"),
        ("mamba1", dict(layers=0, sources=[0], channels={2: [0]}), IndexError, r"layer keys \[2\] out of range"),
        ("mamba2", dict(layers=[0, 1], sources=[0], heads={0: [0], 1: [9]}), IndexError, r"heads\[1\]"),
    ],
)
def test_bad_knockouts_raise_clearly(family, kwargs, error, message):
    model = make_model(family)
    tokens = torch.zeros(B, P, dtype=torch.long)
    with torch.no_grad():
        clean = model(tokens)
    with pytest.raises(error, match=message):
        with torch.no_grad():
            model.run_with_knockout(tokens, Knockout(**kwargs))
    # behind a valid Knockout in a list, through either entry point: the valid one must not stay
    # attached (it once did when the bad one failed its check, knocking out every later forward)
    good = Knockout(layers=range(model.cfg.n_layers), sources=[0, 1], targets=[-1], path="both")
    def in_context(kos):
        with model.knockouts(kos):
            model(tokens)

    for run in (lambda kos: model.run_with_knockout(tokens, kos), in_context):
        with pytest.raises(error, match=message):
            with torch.no_grad():
                run([good, Knockout(**kwargs)])
        assert not [name for name, hp in model.hook_dict.items() if hp.fwd_hooks]
        with torch.no_grad():
            assert torch.equal(model(tokens), clean)


def test_hidden_attention_of_another_models_cache_is_named():
    """A cache of the other family (or other widths) is refused by its shape, in both directions:
    a Mamba-1 cache given to Mamba-2 used to pass the dimension check and fail as "the cached
    activations disagree on [b, p]"."""
    tokens = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(3))
    models = {family: make_model(family) for family in FAMILIES}
    for family, model in models.items():
        other = models["mamba2" if family == "mamba1" else "mamba1"]
        _, cache = other.run_with_cache(tokens)
        for call in (model.hidden_attention, model.conv_attention):
            with pytest.raises(ValueError, match=rf"this {family} model's is \[b, p, .*Is the cache from this model"):
                call(cache, 1)
    wider = make_model("mamba2", n_heads=2, n_groups=1)
    _, cache = models["mamba2"].run_with_cache(tokens)
    with pytest.raises(ValueError, match=r"hook_delta has shape \(3, 9, 4\); this mamba2 model's is \[b, p, 2\]"):
        wider.hidden_attention(cache, 0)


def test_bad_path_and_missing_knockout():
    with pytest.raises(ValueError, match="path"):
        Knockout(layers=0, sources=[0], path="attn")
    with pytest.raises(TypeError, match="needs knockouts"):
        make_model("mamba1").run_with_knockout(torch.zeros(1, 3, dtype=torch.long))


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("form", ["dense", "removal"])
def test_a_mask_on_another_device_than_the_scan_is_named(family, form):
    """A knockout mask on another device than the scan inputs (a CPU mask for a CUDA model,
    here a "meta" one for CPU inputs) raises a ValueError naming both devices, whichever
    backend, instead of failing inside a kernel or autograd."""
    from tl_mamba.ops.knockout import EdgeRemoval
    from tl_mamba.ops.selective_scan import selective_scan
    from tl_mamba.ops.ssd import ssd_scan

    b, p = 1, 5
    if family == "mamba1":
        e, n = 3, 2
        args = (torch.randn(b, p, e), torch.rand(b, p, e), -torch.rand(e, n), torch.randn(b, p, n),
                torch.randn(b, p, n))
        scan, heads = selective_scan, 1
    else:
        h, hd, n = 2, 2, 2
        args = (torch.randn(b, p, h, hd), torch.rand(b, p, h), -torch.rand(h), torch.randn(b, p, 1, n),
                torch.randn(b, p, 1, n))
        scan, heads = ssd_scan, h
    if form == "dense":
        mask = torch.ones(b, heads, p, p, device="meta")
        what = "ssm_mask"
    else:
        mask = [EdgeRemoval(sources=torch.ones(b, p), targets=torch.ones(b, p, device="meta"))]
        what = "targets"
    for backend in ("reference", "torch"):
        with pytest.raises(ValueError, match=rf"{what} is on meta but the scan inputs are on cpu"):
            scan(*args, ssm_mask=mask, backend=backend)


@pytest.mark.parametrize("kwargs, warns", [
    (dict(sources=[-1], targets=[2]), True),  # swapped: the source comes after the target
    (dict(sources=[], targets=[-1]), True),
    (dict(sources=torch.zeros(9, dtype=torch.bool), targets=[-1], path="conv"), True),
    (dict(sources=[0], targets=[-1], path="conv"), True),  # outside the conv window
    (dict(sources=[0], targets=[-1], path="both"), False),  # the SSM path has the edge
    (dict(sources=[-3], targets=[-1], path="conv"), False),
    (dict(sources=[2], targets=[2]), False),  # the diagonal is an edge
])
def test_knockout_that_removes_nothing_warns_once(kwargs, warns):
    import warnings

    model = make_model("mamba1")
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9), generator=torch.Generator().manual_seed(0))
    ko = Knockout(layers=[1], **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        knocked = model.run_with_knockout(tokens, ko)
        model.run_with_knockout(tokens, ko)
    ours = [w for w in caught if "removes no edges" in str(w.message)]
    assert len(ours) == (1 if warns else 0)
    if warns:  # the hint fits the cause: no sources, a conv window too short, or no source before a target
        sources = kwargs["sources"]
        none = not bool(sources.any()) if isinstance(sources, torch.Tensor) else not sources
        too_far = kwargs.get("path") == "conv" and not none
        assert ("it has no sources" in str(ours[0].message)) == none
        assert ("more than 3 positions before every target" in str(ours[0].message)) == too_far
        assert ("swapped" in str(ours[0].message)) == (not too_far and not none)
    # the warning is about something real: the logits moved exactly when it stays silent
    assert torch.equal(knocked, model(tokens)) == warns


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_conv_attention_sums_to_hook_conv_and_is_what_conv_knockout_removes(family):
    model = make_model(family)
    tokens = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(3))
    _, cache = model.run_with_cache(tokens)
    layer = 1
    terms = model.conv_attention(cache, layer)  # [b, C, i, j]
    conv = cache[f"blocks.{layer}.hook_conv"]  # [b, p, C]
    mixer = model.blocks[layer].mixer
    bias = mixer.conv1d.bias if mixer.conv1d.bias is not None else torch.zeros(conv.shape[-1], dtype=conv.dtype)
    assert terms.shape == (2, conv.shape[-1], 9, 9)
    assert terms.dtype == torch.float64
    torch.testing.assert_close(terms.sum(-1).permute(0, 2, 1) + bias, conv, rtol=1e-10, atol=1e-12)
    # only the k = d_conv diagonals at or below the main one carry terms
    i, j = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    assert terms[..., (i - j < 0) | (i - j >= model.cfg.d_conv)].abs().max() == 0
    # knocking out sources S -> target 8 on the conv path removes exactly those terms from hook_conv
    ko = Knockout(layers=[layer], sources=[6, 7], targets=[8], path="conv")
    with model.knockouts(ko):
        _, knocked = model.run_with_cache(tokens, names_filter=f"blocks.{layer}.hook_conv")
    removed = (conv - knocked[f"blocks.{layer}.hook_conv"])[:, 8]  # [b, C]
    torch.testing.assert_close(removed, terms[:, :, 8, 6:8].sum(-1), rtol=1e-10, atol=1e-12)
    # channels and reductions, from tokens
    some = model.conv_attention(tokens, layer, channels=[0, 3])
    torch.testing.assert_close(some, terms[:, [0, 3]])
    torch.testing.assert_close(model.conv_attention(tokens, layer, reduce="norm"), terms.pow(2).sum(1).sqrt())
    model.heavy_hook_memory_limit = 100
    with pytest.raises(MemoryError, match="conv_attention"):
        model.conv_attention(tokens, layer)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_conv_terms_and_conv_knockout_see_no_padding(family):
    """Padded positions feed zeros into the conv: hook_conv_in holds them, so conv_attention sums to
    hook_conv at every position, and a conv knockout from a pad position removes nothing."""
    model = make_model(family)
    tokens = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0  # row 1 is left-padded by 3
    _, cache = model.run_with_cache(tokens, attention_mask=mask)
    terms = model.conv_attention(cache, 0)
    bias = model.blocks[0].mixer.conv1d.bias
    bias = torch.zeros(terms.shape[1], dtype=torch.float64) if bias is None else bias
    conv = cache["blocks.0.hook_conv"]
    torch.testing.assert_close(terms.double().sum(-1).permute(0, 2, 1)[1, 3:] + bias, conv[1, 3:],
                               rtol=1e-5, atol=1e-5)
    assert terms[1, :, :, :3].abs().max() == 0
    sources = torch.zeros(2, 8, dtype=torch.bool)
    sources[1, 2] = True  # a pad position, within the conv window of the first real tokens
    with torch.no_grad(), pytest.warns(UserWarning, match=r"sources \[2\] in row 1 .*fall on padding"):
        plain = model(tokens, attention_mask=mask)
        knocked = model.run_with_knockout(tokens, Knockout(layers=[0, 1], sources=sources, targets=sources.logical_not(),
                                                           path="conv"), attention_mask=mask)
    torch.testing.assert_close(knocked[1, 3:], plain[1, 3:], rtol=0, atol=1e-12)


def test_conv_knockout_of_part_of_a_group_warns():
    """On Mamba-2's conv path B and C are shared by a group's heads, so heads= choosing part of a
    group leaves the B / C taps: the sources still reach the chosen heads. That is said, once."""
    import warnings

    model = make_model("mamba2", n_heads=4, n_groups=2)  # heads 0-1 form group 0, heads 2-3 group 1
    tokens = torch.randint(0, 50, (1, 8), generator=torch.Generator().manual_seed(0))

    def caught(**kwargs):
        with warnings.catch_warnings(record=True) as found:
            warnings.simplefilter("always")
            model.run_with_knockout(tokens, Knockout(layers=[0], sources=[2], targets=[-1], **kwargs))
        return [str(w.message) for w in found if "shared by its" in str(w.message)]

    (message,) = caught(path="conv", heads=[0])
    assert "group(s) [0]" in message and "heads 0..1" in message
    assert len(caught(path="both", heads=[1, 2])) == 1
    assert caught(path="conv", heads=[0, 1]) == []  # a whole group: B and C lose their taps too
    assert caught(path="ssm", heads=[0]) == []
    assert caught(path="conv") == []
    ko = Knockout(layers=[0], sources=[2], targets=[-1], path="conv", heads=[3])
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        model.run_with_knockout(tokens, ko)
        model.run_with_knockout(tokens, ko)
    assert sum("shared by its" in str(w.message) for w in found) == 1  # once per Knockout


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize("layers, absolute", [(-1, [1]), ([-2], [0]), (range(-2, 0), [0, 1])])
def test_negative_layers_count_from_the_end(family, layers, absolute):
    """Knockout(layers=...) with negative indices counts from the end. Reference: a plain hook on
    each ``blocks.{l}.hook_ssm_mask`` zeroing the [target, source] entries (API.md: the same mechanism)."""
    model = make_model(family)
    tokens = torch.randint(4, 50, (2, P), generator=torch.Generator().manual_seed(7))
    sources, targets = [1, 3], [5, 6]

    def zero_edges(mask, hook):
        mask = mask.clone()
        for t in targets:
            mask[:, :, t, sources] = 0.0
        return mask

    with torch.no_grad():
        clean = model(tokens)
        expected = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{l}.hook_ssm_mask", zero_edges) for l in absolute])
        got = model.run_with_knockout(tokens, Knockout(layers=layers, sources=sources, targets=targets))
    assert not torch.allclose(expected, clean)  # the knockout changes something
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_knockout_repr_summarises_masks():
    """Warnings name the knockout by its repr: a [b, p] mask shows as its shape and count, not in full."""
    sources = torch.zeros(29, 15, dtype=torch.bool)
    sources[:, 1] = True
    ko = Knockout(layers=range(2, 4), sources=sources, targets=torch.tensor([3, 14]), path="conv", heads=[0, 2])
    assert repr(ko) == ("Knockout(layers=range(2, 4), sources=<bool mask [29, 15], 29 set>, targets=[3, 14], "
                        "path='conv', heads=[0, 2], channels=None)")
    assert repr(Knockout(layers=0, sources=torch.arange(20))) == (
        "Knockout(layers=0, sources=<torch.int64 tensor [20]>, targets=-1, path='ssm', heads=None, channels=None)")


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_hook_h_gradient_under_a_knockout_in_its_layer_warns(family):
    """The states hook_h shows are not on the loss path of a layer whose y the knockout changed:
    a backward hook there is never called, and says so; another layer's states keep theirs."""
    model = make_model(family)
    tokens = torch.randint(0, 50, (2, P), generator=torch.Generator().manual_seed(3))
    ko = Knockout(layers=[0], sources=[1, 2], targets=[-1])
    with model.knockouts(ko):
        with pytest.warns(UserWarning, match=r"backward hook on blocks\.0\.hook_h is never called while "
                                             r"blocks\.0\.hook_ssm_mask knocks out"):
            _, cache = model.run_with_cache(tokens, names_filter="blocks.0.hook_h", incl_bwd=True,
                                            return_type="loss")
        assert "blocks.0.hook_h_grad" not in cache
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, cache = model.run_with_cache(tokens, names_filter="blocks.1.hook_h", incl_bwd=True,
                                            return_type="loss")
        assert cache["blocks.1.hook_h_grad"].abs().sum() > 0


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_hook_shapes_sets_the_models_hooks_aside_and_puts_them_back(family):
    """A knockout of position 7 cannot run on hook_shapes' default [1, 4] tokens: the model's
    hooks (knockouts on both paths, a user hook, a torch hook) are set aside, then act again."""
    model = make_model(family)
    tokens = torch.randint(0, 50, (2, P), generator=torch.Generator().manual_seed(4))
    ko = Knockout(layers=[0, 1], sources=[1], targets=[7], path="both")
    calls = []
    model.add_hook("blocks.1.hook_y", lambda y, hook: calls.append(hook.name))
    handle = model.blocks[0].hook_x.register_forward_hook(lambda module, inputs, output: calls.append("torch"))
    try:
        with model.knockouts(ko):
            expected = model.run_with_knockout(tokens, knockouts=[ko])  # the same knockout, attached for one call
            calls.clear()
            shapes = model.hook_shapes()
            assert calls == []
            assert shapes["blocks.0.hook_x"][:2] == (1, 4) and shapes["blocks.0.hook_ssm_mask"][-2:] == (4, 4)
            assert set(shapes) == set(model.hook_dict)
            torch.testing.assert_close(model(tokens), expected, atol=0, rtol=0)  # the knockout acts again
            assert calls == ["torch", "blocks.1.hook_y"]
        plain = model(tokens)
        assert not torch.allclose(plain, expected)
    finally:
        handle.remove()
        model.reset_hooks()


def test_knockouts_with_tensor_positions_compare_and_hash_by_identity():
    ko = Knockout(layers=[0], sources=torch.tensor([1, 2]), targets=torch.tensor([[5], [6]]))
    twin = Knockout(layers=[0], sources=torch.tensor([1, 2]), targets=torch.tensor([[5], [6]]))
    assert ko == ko and ko != twin and len({ko, twin}) == 2
    assert [ko, twin].index(twin) == 1


def test_channel_knockouts_given_to_run_with_hooks_remove_their_union():
    """Two Mamba-1 channels= knockouts on one layer, attached as plain hooks: where TransformerLens
    keeps the hook object (LensHandle.user_hook, 4.x) they are found and applied as by a list;
    where it does not (3.x) the refusal says how to attach them."""
    from transformer_lens.hook_points import LensHandle

    model = make_model("mamba1")
    tokens = torch.randint(0, 50, (2, P), generator=torch.Generator().manual_seed(5))
    k1 = Knockout(layers=[0], sources=[3], targets=[-1], channels=[0, 1])
    k2 = Knockout(layers=[0], sources=[5], targets=[-1], channels=[7])
    with torch.no_grad():
        expected = model.run_with_knockout(tokens, knockouts=[k1, k2])
        assert not torch.allclose(expected, model(tokens))
        hooks = list(k1.hooks(model)) + list(k2.hooks(model))
        if "user_hook" in getattr(LensHandle, "__dataclass_fields__", {}):
            torch.testing.assert_close(model.run_with_hooks(tokens, fwd_hooks=hooks), expected, atol=0, rtol=0)
        else:
            with pytest.raises(ValueError, match="model.knockouts or run_with_knockout"):
                model.run_with_hooks(tokens, fwd_hooks=hooks)


def test_mamba1_channel_knockout_beside_a_cached_or_read_mask():
    """Mamba-1's [b, 1, p, p] mask has no channel axis, so a channels= knockout is applied beside it:
    caching every hook (the heavy ones named) or reading the mask in a hook gives the brute-force
    knockout, and the mask seen holds the unrestricted knockout's edges only (with a warning, once);
    a hook that edits the mask, or a backward hook on it, is refused by name."""
    model = make_model("mamba1")
    tokens = torch.randint(0, 50, (B, P), generator=torch.Generator().manual_seed(6))
    some = Knockout(layers=[0, 1], sources=[1, 2], targets=[-1], channels=[0, 3, 5])
    every = Knockout(layers=[1], sources=[4], targets=[-2])
    seen = []
    with torch.no_grad():
        ref = reference_union(model, tokens, [([0, 1], [[1, 2]] * B, [[8]] * B, "ssm", [0, 3, 5]),
                                              ([1], [[4]] * B, [[7]] * B, "ssm", None)])
        assert (ref - model(tokens)).abs().max() > 1e-4
        with pytest.warns(UserWarning, match="cannot show") as caught:
            with model.knockouts([some, every]):
                logits, cache = model.run_with_cache(tokens, names_filter=lambda name: True)
                read = model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_ssm_mask",
                                                                lambda mask, hook: seen.append(mask.clone()))])
    assert sum("cannot show" in str(w.message) for w in caught) == 1  # once for the Knockout
    torch.testing.assert_close(logits, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(read, ref, rtol=1e-9, atol=1e-9)
    want = torch.ones(B, 1, P, P, dtype=cache["blocks.1.hook_ssm_mask"].dtype)
    want[:, :, 7, 4] = 0  # only the unrestricted knockout's edge is in the mask
    assert torch.equal(cache["blocks.1.hook_ssm_mask"], want) and torch.equal(seen[0], want)
    assert bool((cache["blocks.0.hook_ssm_mask"] == 1).all())

    def edit(mask, hook):
        mask = mask.clone()
        mask[:, :, -1, 6] = 0
        return mask

    with model.knockouts(some), torch.no_grad(), pytest.raises(ValueError, match="hook other than the Knockouts"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_ssm_mask", edit)])
    with model.knockouts(some), pytest.raises(ValueError, match="needs its gradient"):
        model.run_with_hooks(tokens, bwd_hooks=[("blocks.0.hook_ssm_mask", lambda grad, hook: None)])


@pytest.mark.parametrize("collide", [False, True])
def test_column_groups_are_the_exact_groups_of_equal_columns(collide, monkeypatch):
    """The sources grouped by their mask columns (what a general mask costs: one scan per group),
    from weighted sums read a chunk at a time, against torch.unique over the columns; with weights
    that make different columns collide (all ones: [1, 0] and [0, 1] sum alike), the exact check
    catches it and the groups are still exact."""
    from tl_mamba.ops import knockout as ops_knockout

    monkeypatch.setattr(ops_knockout, "GROUP_CHUNK_ENTRIES", 37)  # several chunks, a ragged last one
    if collide:
        monkeypatch.setattr(ops_knockout, "_column_weights", lambda n: torch.ones(n, dtype=torch.float64))
    gen = torch.Generator().manual_seed(7)
    b, H, p = 2, 3, 12
    patterns = (torch.rand(4, b, H, p, generator=gen) < 0.5).float() * torch.tensor([1.0, 0.5, 1.0, 0.0])[:, None, None, None]
    patterns[2] = patterns[0].roll(1, dims=-1)  # the same entries in other places: equal plain sums
    which = torch.randint(0, 4, (p,), generator=gen)
    removed = patterns[which].permute(1, 2, 3, 0).contiguous()  # [b, H, i, j]: column j is pattern which[j]
    group, first, removes = ops_knockout.column_groups(removed)
    _, want = torch.unique(removed.reshape(-1, p).T, dim=0, return_inverse=True)
    # the same partition of the sources (group ids may differ)
    assert torch.equal(group[:, None] == group[None, :], want[:, None] == want[None, :])
    assert first.tolist() == [int((group == g).nonzero()[0]) for g in range(len(first))]
    assert removes.tolist() == [bool(removed[..., j].ne(0).any()) for j in first.tolist()]
    if collide:  # the unweighted sums do confuse two different columns here: only the check separates them
        sums = removed.reshape(-1, p).sum(0)
        assert any(bool(sums[i] == sums[j]) and int(want[i]) != int(want[j]) for i in range(p) for j in range(p))
