"""hidden_attention / conv_attention in chunks, and their memory guard.

α is compared with explicit products (``brute_alpha`` of tests/test_knockout.py) for both
families, whatever the chunking (``chunk_bytes`` small enough to split the heads / channels into
many, unequal chunks) and with every ``reduce=``; the reductions are taken here from the brute α.
The guard counts the working memory as well as the result: a limit that holds the result but not
one feature's p×p α raises ``MemoryError``.
"""

import pytest
import torch

import tl_mamba

from test_knockout import brute_alpha  # α by explicit decay products (float64)
from test_knockout import make_model as knockout_model

ha = tl_mamba.hidden_attention.__globals__  # the module's namespace (the package re-exports the function)


def make_model(family: str, seed: int = 0):
    """test_knockout's tiny float64 model; Mamba-2 with 8 heads of 4 channels in 4 groups, so chunks
    can split a group and mix groups."""
    return knockout_model(family, seed, n_heads=8, n_groups=4)


def brute_reduce(alpha, reduce):
    """The reductions over the feature axis, element by element: [b, F, p, p] → [b, p, p]."""
    b, F, p, _ = alpha.shape
    out = torch.zeros(b, p, p, dtype=torch.float64)
    for bi in range(b):
        for i in range(p):
            for j in range(p):
                values = [float(alpha[bi, f, i, j]) for f in range(F)]
                if reduce == "norm":
                    out[bi, i, j] = sum(v * v for v in values) ** 0.5
                elif reduce == "sum":
                    out[bi, i, j] = sum(values)
                elif reduce == "mean":
                    out[bi, i, j] = sum(values) / F
                else:
                    out[bi, i, j] = max(abs(v) for v in values)
    return out


def reference(model, cache, layer, family):
    cfg = model.cfg
    delta, Bm, C = (cache[f"blocks.{layer}.hook_{n}"].double() for n in ("delta", "B", "C"))
    A = -torch.exp(model.blocks[layer].mixer.A_log.detach().double())
    return brute_alpha(family, delta, A, Bm, C, cfg.n_heads // cfg.n_groups if family == "mamba2" else 1)


@pytest.fixture
def chunk_spy(monkeypatch):
    """Records (features, features per chunk) of every call, and the chunks handed to a reduction."""
    seen = {"plans": [], "reduced": []}
    plan, reduce_into = ha["_chunk_size"], ha["_reduce_into"]

    def spy_plan(*args, **kwargs):
        chunk = plan(*args, **kwargs)
        seen["plans"].append((args[4], chunk))  # n_features
        return chunk

    def spy_reduce(total, alpha, reduce):
        seen["reduced"].append(alpha.shape[1])
        return reduce_into(total, alpha, reduce)

    monkeypatch.setitem(ha, "_chunk_size", spy_plan)
    monkeypatch.setitem(ha, "_reduce_into", spy_reduce)
    return seen


SELECTIONS = {"mamba1": [None, [5, 1, 30, 2, 17, 9, 0]],  # 32 channels; 7 out of order
              "mamba2": [None, [6, 1, 3, 0, 7]]}  # 8 heads; 5 out of group order, groups interleaved
CHUNK_BYTES = [1, 2_500, 6_000, 13_000, 2**28]  # one feature per chunk ... all at once (p = 7, b = 2)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_chunked_alpha_and_reductions_match_brute_force(family, chunk_spy):
    torch.manual_seed(0)
    model = make_model(family)
    tokens = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    full = reference(model, cache, 1, family)
    assert float(full.abs().max()) > 1e-3  # the comparison is not between zeros
    key = "heads" if family == "mamba2" else "channels"
    splits = set()
    for chosen in SELECTIONS[family]:
        ref = full if chosen is None else full[:, chosen]
        n = ref.shape[1]
        for chunk_bytes in CHUNK_BYTES:
            chunk_spy["plans"].clear()
            chunk_spy["reduced"].clear()
            alpha = tl_mamba.hidden_attention(model, cache, 1, chunk_bytes=chunk_bytes, **{key: chosen})
            assert alpha.dtype == torch.float64 and alpha.shape == ref.shape
            torch.testing.assert_close(alpha, ref, rtol=1e-10, atol=1e-12)
            ((n_seen, chunk),) = chunk_spy["plans"]
            assert n_seen == n
            splits.add((n, chunk))
            for reduce in ("norm", "sum", "mean", "abs_max"):
                chunk_spy["reduced"].clear()
                got = tl_mamba.hidden_attention(model, cache, 1, reduce=reduce, chunk_bytes=chunk_bytes,
                                                **{key: chosen})
                assert got.shape == (2, 7, 7) and got.dtype == torch.float64
                torch.testing.assert_close(got, brute_reduce(ref, reduce), rtol=1e-10, atol=1e-12)
                sizes = chunk_spy["reduced"]  # the chunks the reduction went through
                assert sum(sizes) == n and len(sizes) == -(-n // max(sizes))
    # the chunkings above include one feature at a time, all at once, and chunks that split unevenly
    assert any(chunk == 1 for _, chunk in splits) and any(chunk == n for n, chunk in splits)
    assert any(1 < chunk < n and n % chunk for n, chunk in splits), splits


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_float32_model_chunked_is_float32_and_matches_brute_force(family):
    torch.manual_seed(1)
    model = make_model(family)
    tokens = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        _, cache64 = model.run_with_cache(tokens)
    ref = reference(model, cache64, 0, family)
    model.float()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    for chunk_bytes in (1, 3_000, 2**28):
        alpha = tl_mamba.hidden_attention(model, cache, 0, chunk_bytes=chunk_bytes)
        assert alpha.dtype == torch.float32
        torch.testing.assert_close(alpha.double(), ref, rtol=1e-4, atol=1e-5)
        norm = tl_mamba.hidden_attention(model, cache, 0, reduce="norm", chunk_bytes=chunk_bytes)
        assert norm.dtype == torch.float32
        torch.testing.assert_close(norm.double(), brute_reduce(ref, "norm"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_guard_counts_working_memory_not_only_the_result(family):
    torch.manual_seed(2)
    model = make_model(family)
    b, long_p, short_p = 1, 16, 4
    # reduce="norm" holds a [b, p, p] float64 result, and to make it at least one feature's float64
    # [b, p, p] α (and the float64 decays under it): a limit of 1.5 results holds the result, not that
    model.heavy_hook_memory_limit = int(1.5 * b * long_p**2 * 8)
    for reduce in ("norm", "abs_max"):
        with pytest.raises(MemoryError) as err:
            model.hidden_attention(torch.randint(0, 50, (b, long_p)), 1, reduce=reduce)
        message = str(err.value)
        for part in ("hidden_attention of layer 1", f"({model.heavy_hook_memory_limit / 2**10:.2f} KiB)",
                     "heavy_hook_memory_limit", "heads/channels",
                     "reduce=", "shorten the input"):
            assert part in message, message
    # without reduce: a limit just over the result raises too
    n_features = model.cfg.n_heads if family == "mamba2" else model.cfg.d_inner
    model.heavy_hook_memory_limit = b * n_features * long_p**2 * 8 + 64
    with pytest.raises(MemoryError, match="hidden_attention of layer 0"):
        model.hidden_attention(torch.randint(0, 50, (b, long_p)), 0)
    # the same limits at a shorter input pass, and give α
    model.heavy_hook_memory_limit = int(1.5 * b * long_p**2 * 8)
    tokens = torch.randint(0, 50, (b, short_p))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    ref = reference(model, cache, 1, family)
    torch.testing.assert_close(model.hidden_attention(tokens, 1, reduce="norm"), brute_reduce(ref, "norm"),
                               rtol=1e-10, atol=1e-12)
    model.heavy_hook_memory_limit = 4 * b * n_features * short_p**2 * 8  # four unreduced results
    torch.testing.assert_close(model.hidden_attention(tokens, 1), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_chunks_shrink_to_fit_the_limit(family, chunk_spy):
    """A limit that holds the result and a few features' working memory, but not every feature's at
    once: the call runs in smaller chunks (whatever chunk_bytes) and α is right."""
    torch.manual_seed(3)
    model = make_model(family)
    b, p = 2, 16
    n_features = model.cfg.n_heads if family == "mamba2" else model.cfg.d_inner
    plane = b * p * p * 8  # one float64 [b, p, p]
    # the float64 α of every feature at once is n planes besides the [b, p, p] result: over this limit
    model.heavy_hook_memory_limit = plane * (4 + n_features // 2)
    assert model.heavy_hook_memory_limit < plane * (1 + n_features)
    tokens = torch.randint(0, 50, (b, p))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    ref = reference(model, cache, 1, family)
    got = tl_mamba.hidden_attention(model, cache, 1, reduce="sum", chunk_bytes=2**40)
    torch.testing.assert_close(got, brute_reduce(ref, "sum"), rtol=1e-10, atol=1e-12)
    ((n, chunk),) = chunk_spy["plans"]
    assert n == n_features and 1 <= chunk < n_features
    assert len(chunk_spy["reduced"]) > 1


def brute_conv_terms(conv_in, weight):
    """K[b, c, i, j] = w[c, k-1-(i-j)] · conv_in[b, j, c] for 0 ≤ i - j < k, by loops."""
    b, p, n = conv_in.shape
    k = weight.shape[-1]
    terms = torch.zeros(b, n, p, p, dtype=torch.float64)
    for i in range(p):
        for j in range(max(0, i - k + 1), i + 1):
            terms[:, :, i, j] = weight[:, k - 1 - (i - j)] * conv_in[:, j, :]
    return terms


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_conv_attention_reductions_and_guard(family):
    torch.manual_seed(4)
    model = make_model(family)
    b, p = 2, 16
    tokens = torch.randint(0, 50, (b, p))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    conv_in = cache["blocks.1.hook_conv_in"]
    n_channels = conv_in.shape[-1]
    terms = brute_conv_terms(conv_in, model.blocks[1].mixer.conv1d.weight.detach()[:, 0])
    torch.testing.assert_close(model.conv_attention(cache, 1), terms, rtol=1e-12, atol=1e-14)
    result = b * p * p * 8
    # reduced, the [b, c, p, p] terms are not needed: a limit under them (but with room for a few
    # [b, c, p] tensors) still gives every reduction
    model.heavy_hook_memory_limit = result + 10 * b * p * n_channels * 8
    assert model.heavy_hook_memory_limit < b * n_channels * p * p * 8
    for reduce in ("norm", "sum", "mean", "abs_max"):
        torch.testing.assert_close(model.conv_attention(cache, 1, reduce=reduce), brute_reduce(terms, reduce),
                                   rtol=1e-12, atol=1e-14)
    # a limit that holds the reduced result but not the conv input it is made from
    model.heavy_hook_memory_limit = result + 8
    with pytest.raises(MemoryError, match="conv_attention of layer 1.*fewer channels"):
        model.conv_attention(cache, 1, reduce="norm")
