"""The state-edit benchmark runs end to end (``--quick``: p 24, one round).

The quick run's timings mean nothing; what is checked is that every contender ran and that
the two routes of an override (segments, one recurrence) gave the same logits.
"""

from __future__ import annotations

from conftest import run_quick_benchmark


def test_state_edits_benchmark_quick_run(tmp_path):
    rows = run_quick_benchmark("bench_state_edits_cpu.py", tmp_path / "state_edits")["rows"]
    assert [(r["model"], r["grad"]) for r in rows] == [("toy-mamba2", False), ("toy-mamba2", True),
                                                        ("toy-mamba", False), ("toy-mamba", True)]
    for row in rows:
        assert all(row[f"{k}_s"] > 0 for k in ("plain", "read", "patch2", "zero_segments", "zero_recurrence",
                                               "scale_segments", "scale_recurrence"))
        assert all(d < 1e-4 for d in row["max_abs_diff"].values()), row["max_abs_diff"]
