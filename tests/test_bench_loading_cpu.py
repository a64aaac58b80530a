"""The loading benchmark runs end to end (``--quick``: toy widths, one round).

Its timings mean nothing at that size; what is checked is that every contender loaded in its own
process and that our loads of both layouts gave transformers' logits.
"""

from __future__ import annotations

from conftest import run_quick_benchmark


def test_loading_benchmark_quick_run(tmp_path):
    (row,) = run_quick_benchmark("bench_loading_cpu.py", tmp_path / "loading")["rows"]
    assert row["size"] == "toy" and row["params"] > 0
    for contender in ("hf", "ours_transformers", "ours_mamba_ssm", "random_init"):
        assert row[f"{contender}_to_logits_seconds"] >= row[f"{contender}_seconds"] > 0
    assert row["max_rel_diff_logits"] < 1e-5
