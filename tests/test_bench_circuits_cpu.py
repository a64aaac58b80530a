"""The circuit-discovery benchmark runs end to end (``--quick``: 8 prompts, one round, layer graphs).

The quick run's timings mean nothing; what is checked is that every method ran on both toy
models and that each circuit's faithfulness was measured at ACDC's size.
"""

from __future__ import annotations

import math

from conftest import run_quick_benchmark


def test_circuits_benchmark_quick_run(tmp_path):
    out = tmp_path / "circuits"
    rows = run_quick_benchmark("bench_circuits_cpu.py", out)["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [
        (model, method) for model in ("toy-mamba2", "toy-mamba") for method in ("EAP", "EAP-IG", "exact", "ACDC")]
    for row in rows:
        assert row["seconds"] > 0 and 0 < row["k"] <= row["edges"] and math.isfinite(row["faithfulness"])
    assert out.with_suffix(".md").read_text().count("| toy-mamba") == 8
