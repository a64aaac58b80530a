"""The states-buffer benchmark runs end to end (``--quick``: toy widths, one round, no pause).

Its timings mean nothing at that size; what is checked is that every allocation strategy ran for
both families and cached exactly the states of the library's own buffer (the strategies change
where the memory comes from, never what is written into it).
"""

from __future__ import annotations

from conftest import run_quick_benchmark


def test_states_buffer_benchmark_quick_run(tmp_path):
    results = run_quick_benchmark("bench_states_buffer_cpu.py", tmp_path / "states_buffer")
    assert sorted(row["family"] for row in results["rows"]) == ["mamba1", "mamba2"]
    for row in results["rows"]:
        assert row["same_states_as_plain"] == {"plain": True, "advised": True, "advised_prefault": True}
        assert set(row["median_s"]) == {"forward", "plain", "advised", "advised_prefault"}
        assert all(t > 0 for t in row["median_s"].values()) and row["states_mb"] > 0
    assert "page_reporting_order" in results["host_memory"]
