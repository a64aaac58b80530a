"""Circuits of SAE features: ``evaluate_features``, ``feature_faithfulness`` and the search of
``smallest_feature_circuit``.

References: the model run on its own (clean and corrupted runs), the residual stream built by
hand from the SAE's features and fed to the later layers with ``start_at_layer``, and a linear
scan over every top-k.
"""

from __future__ import annotations

import pytest
import torch

from tl_mamba.circuits import (evaluate_features, feature_attribution, feature_faithfulness,
                               smallest_feature_circuit)

from test_feature_attribution import B, TinySAE, metric, pair, tiny

SITE = "blocks.1.hook_resid_pre"  # a cut: everything the logits see passes through it


def mean_metric(logits):
    return float(metric(logits).mean())


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_everything_kept_is_clean_and_nothing_kept_is_corrupted(family):
    model = tiny(family)
    clean, corrupted = pair()
    sae = TinySAE(16, 12)
    with torch.no_grad():
        clean_value, corrupted_value = mean_metric(model(clean)), mean_metric(model(corrupted))
    assert abs(clean_value - corrupted_value) > 1e-3
    every = {SITE: range(12)}
    kept_all = evaluate_features(model, {SITE: sae}, every, clean, corrupted, metric, keep_error=True, quiet=True)
    assert kept_all.shape == (B,)
    assert float(kept_all.mean()) == pytest.approx(clean_value, abs=1e-10)
    none = evaluate_features(model, {SITE: sae}, {}, clean, corrupted, metric, quiet=True)
    assert float(none.mean()) == pytest.approx(corrupted_value, abs=1e-10)
    assert feature_faithfulness(model, {SITE: sae}, every, clean, corrupted, metric, keep_error=True,
                                quiet=True) == pytest.approx(1.0, abs=1e-9)
    assert feature_faithfulness(model, {SITE: sae}, {}, clean, corrupted, metric, quiet=True) == pytest.approx(
        0.0, abs=1e-9)


def test_a_kept_set_is_the_residual_built_from_its_features():
    """At a cut, the circuit's residual is decode(clean features where kept, corrupted elsewhere) +
    the corrupted error; the later layers run on it (start_at_layer) give the same metric."""
    model = tiny("mamba2")
    clean, corrupted = pair()
    sae = TinySAE(16, 12)
    kept = [0, 3, 4, 9]
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean, names_filter=[SITE])
        _, corrupted_cache = model.run_with_cache(corrupted, names_filter=[SITE])
        f_clean, f_corr = sae.encode(clean_cache[SITE]), sae.encode(corrupted_cache[SITE])
        error = corrupted_cache[SITE] - sae.decode(f_corr)
        chosen = torch.zeros(12, dtype=torch.bool)
        chosen[kept] = True
        resid = sae.decode(torch.where(chosen, f_clean, f_corr)) + error
        expected = metric(model(resid, start_at_layer=1))
        assert not torch.allclose(expected, metric(model(clean))) and not torch.allclose(expected, metric(model(corrupted)))
    got = evaluate_features(model, {SITE: sae}, {SITE: kept}, clean, corrupted, metric, quiet=True, batch_size=2)
    torch.testing.assert_close(got, expected.double(), rtol=1e-9, atol=1e-12)
    # the same set as a bool mask [d_sae] (scores.frequency > x gives one), or with negative indices
    for same in (chosen, [0, 3, -8, -3]):
        torch.testing.assert_close(evaluate_features(model, {SITE: sae}, {SITE: same}, clean, corrupted, metric,
                                                     quiet=True), got)


def test_the_search_finds_the_boundary_of_a_linear_scan():
    """Every top-k measured by the search is the faithfulness of that top-k; the k returned reaches
    the target and k - 1 does not (the binary search's guarantee), checked against a scan of every k."""
    model = tiny("mamba1")
    clean, corrupted = pair()
    saes = {"blocks.1.hook_resid_pre": TinySAE(16, 6), "blocks.0.hook_y": TinySAE(32, 6, seed=1)}
    scores = feature_attribution(model, saes, clean, corrupted, metric, quiet=True)
    ranked = sorted(((name, f, float(s.scores[f])) for name, s in scores.items() for f in range(6)),
                    key=lambda item: -abs(item[2]))

    def top(k):
        kept = {name: [] for name in saes}
        for name, feature, _ in ranked[:k]:
            kept[name].append(feature)
        return kept

    scan = [feature_faithfulness(model, saes, top(k), clean, corrupted, metric, quiet=True) for k in range(13)]
    target = (scan[0] + scan[12]) / 2
    found = smallest_feature_circuit(model, saes, scores, clean, corrupted, metric, target=target, progress=False)
    assert [(name, f) for name, f, _ in found.ranked] == [(name, f) for name, f, _ in ranked]
    for k, value in found.curve:
        assert value == pytest.approx(scan[k], abs=1e-9)
    assert found.k is not None and scan[found.k] >= target and (found.k == 0 or scan[found.k - 1] < target)
    assert found.kept == top(found.k) and found.faithfulness == pytest.approx(scan[found.k], abs=1e-9)
    assert len(found.curve) <= 6  # log2(13) + the whole set, not a scan
    with pytest.warns(UserWarning, match="under the target.*keep_error=True keeps it live"):
        unreachable = smallest_feature_circuit(model, saes, scores, clean, corrupted, metric, target=scan[12] + 1,
                                               progress=False)
    with pytest.warns(UserWarning, match="every feature kept is the clean run, faithfulness 1"):
        smallest_feature_circuit(model, saes, scores, clean, corrupted, metric, target=1.5, keep_error=True,
                                 progress=False)
    assert unreachable.k is None and unreachable.curve == [(12, pytest.approx(scan[12], abs=1e-9))]
    rare = smallest_feature_circuit(model, saes, scores, clean, corrupted, metric, target=target,
                                    min_frequency=0.5, progress=False)
    assert all(float(scores[name].frequency[f]) >= 0.5 for name, f, _ in rare.ranked)
    assert len(rare.ranked) < 12
    cut = 0.75  # the share of prompts instead (the Mamba IOI report's filter)
    by_prompts = smallest_feature_circuit(model, saes, scores, clean, corrupted, metric, target=target,
                                          min_frequency=cut, frequency_of="prompts", progress=False)
    assert [(name, f) for name, f, _ in by_prompts.ranked] == [
        (name, f) for name, f, _ in ranked if float(scores[name].prompt_frequency[f]) >= cut]
    assert [(n, f) for n, f, _ in by_prompts.ranked] != [(n, f) for n, f, _ in rare.ranked]
    # attribution x frequency (the Mamba IOI report's "score times count"): ranked by hand
    by_count = sorted(((name, f, float(s.scores[f])) for name, s in scores.items() for f in range(6)),
                      key=lambda item: -abs(item[2]) * float(scores[item[0]].frequency[item[1]]))
    assert [item[:2] for item in by_count] != [item[:2] for item in ranked]  # the weighting reorders here
    weighted = smallest_feature_circuit(model, saes, scores, clean, corrupted, metric, target=target,
                                        weight_by_frequency=True, progress=False)
    assert [(name, f) for name, f, _ in weighted.ranked] == [(name, f) for name, f, _ in by_count]
    quiet = smallest_feature_circuit(model, saes, scores, clean, corrupted, metric, target=target, quiet=True)
    assert quiet.k == found.k and quiet.curve == found.curve  # the other tools' spelling of progress=False
    site_scores = scores["blocks.0.hook_y"]
    with pytest.raises(TypeError, match=r"got one FeatureScores: pass the whole dict"):
        smallest_feature_circuit(model, saes, site_scores, clean, corrupted, metric, progress=False)
    site = "blocks.0.hook_y"
    assert [f for f, _, _ in scores[site].top(6, weight_by_frequency=True)] == \
        [f for name, f, _ in by_count if name == site]


def test_bad_input_names_the_problem():
    model = tiny("mamba1")
    clean, corrupted = pair()
    sae = TinySAE(16, 12)
    with pytest.raises(ValueError, match="sites without an SAE"):
        evaluate_features(model, {SITE: sae}, {"blocks.0.hook_resid_pre": [1]}, clean, corrupted, metric)
    with pytest.raises(IndexError, match=r"kept features \[12\]"):
        evaluate_features(model, {SITE: sae}, {SITE: [1, 12]}, clean, corrupted, metric, quiet=True)
    with pytest.raises(TypeError, match=r"integer features needed, got 1.9"):  # not read as feature 1
        evaluate_features(model, {SITE: sae}, {SITE: [1.9]}, clean, corrupted, metric, quiet=True)
    with pytest.raises(ValueError, match="a bool mask must have the SAE's 12 entries"):
        evaluate_features(model, {SITE: sae}, {SITE: torch.ones(5, dtype=torch.bool)}, clean, corrupted, metric,
                          quiet=True)
    int_mask = torch.zeros(12, dtype=torch.long)
    int_mask[[5, 9]] = 1  # (acts > 0).long(): read as indices it would keep features 0 and 1
    with pytest.raises(ValueError, match=r"kept\['blocks.1.hook_resid_pre'\] features: .* looks like a 0/1 mask"):
        evaluate_features(model, {SITE: sae}, {SITE: int_mask}, clean, corrupted, metric, quiet=True)
    with pytest.raises(ValueError, match="not an activation"):
        evaluate_features(model, {"blocks.0.hook_ssm_mask": sae}, {}, clean, corrupted, metric, quiet=True)
    scores = feature_attribution(model, {SITE: sae}, clean, corrupted, metric, quiet=True)
    with pytest.raises(ValueError, match="target must be a finite faithfulness"):
        smallest_feature_circuit(model, {SITE: sae}, scores, clean, corrupted, metric, target=float("nan"))
    with pytest.raises(ValueError, match=r"no SAE for \['blocks.0.hook_y'\]"):
        smallest_feature_circuit(model, {SITE: sae}, {**scores, "blocks.0.hook_y": scores[SITE]}, clean, corrupted,
                                 metric)
    with pytest.raises(TypeError, match="must be the FeatureScores"):
        smallest_feature_circuit(model, {SITE: sae}, {SITE: scores[SITE].scores}, clean, corrupted, metric)
    with pytest.raises(ValueError, match=r"scores\['blocks.1.hook_resid_pre'\] are for 12 features, but the SAE "
                                         r"given for blocks.1.hook_resid_pre has 20"):
        smallest_feature_circuit(model, {SITE: TinySAE(16, 20)}, scores, clean, corrupted, metric)
    scores[SITE].scores[3] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite scores \(features \[3\]\)"):
        smallest_feature_circuit(model, {SITE: sae}, scores, clean, corrupted, metric)
    with pytest.raises(ValueError, match="min_frequency is a share of tokens"):  # 10 meant as a percentage
        smallest_feature_circuit(model, {SITE: sae}, feature_attribution(model, {SITE: sae}, clean, corrupted, metric,
                                                                         quiet=True),
                                 clean, corrupted, metric, min_frequency=10, progress=False)
    with pytest.raises(ValueError, match=r"no scores for \[.blocks.1.hook_resid_pre.\]"):
        smallest_feature_circuit(model, {SITE: sae}, {}, clean, corrupted, metric)
    with pytest.raises(TypeError, match="needs a metric"):
        evaluate_features(model, {SITE: sae}, {}, clean, corrupted)


def test_a_site_that_does_not_cut_the_model_warns_that_the_empty_circuit_is_not_corrupted():
    """One hook_mixer_out SAE: with no feature kept only that site is corrupted, the rest of the
    model clean, so the empty circuit is far from the corrupted run; the search says so. A
    hook_resid_pre site cuts every path: no warning."""
    import warnings

    model = tiny("mamba1")
    clean, corrupted = pair()
    site = "blocks.0.hook_mixer_out"
    saes = {site: TinySAE(16, 6)}
    empty = feature_faithfulness(model, saes, {site: []}, clean, corrupted, metric, quiet=True)
    assert abs(empty) > 0.1, empty  # the test needs a site that leaves much of the run clean
    scores = feature_attribution(model, saes, clean, corrupted, metric, quiet=True)
    with pytest.warns(UserWarning, match=f"with no feature kept the circuit already reaches a faithfulness of "
                                         f"{empty:.3f}"):
        smallest_feature_circuit(model, saes, scores, clean, corrupted, metric, target=empty, progress=False)
    cut = {SITE: TinySAE(16, 6)}
    scores = feature_attribution(model, cut, clean, corrupted, metric, quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smallest_feature_circuit(model, cut, scores, clean, corrupted, metric, target=0.5, progress=False)
