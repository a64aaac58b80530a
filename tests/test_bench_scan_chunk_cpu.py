"""The chunk-length benchmark runs end to end (``--quick``: tiny shapes, one round).

Its timings mean nothing at that size. What is checked: every chunk length of both families
ran and agreed with the sequential reference scan (the benchmark's own float64 check, which
covers chunks shorter than the sequence, a ragged last chunk and a chunk longer than it),
and the length it reports as the library's pick is the one ``chunk_for`` gives.
"""

from __future__ import annotations

from conftest import run_quick_benchmark

from tl_mamba.ops.selective_scan.chunked import chunk_for
from tl_mamba.ops.ssd.chunked import DEFAULT_CHUNK


def test_scan_chunk_benchmark_quick_run(tmp_path):
    results = run_quick_benchmark("bench_scan_chunk_cpu.py", tmp_path / "scan_chunk")
    rows = results["rows"]
    assert {row["family"] for row in rows} == {"mamba1", "mamba2"}
    assert any(row["states"] for row in rows if row["family"] == "mamba1")
    for row in rows:
        lengths = {"mamba1": {"8", "16", "32", "64"}, "mamba2": {"16", "32", "64"}}[row["family"]]
        assert set(row["median_s"]) == lengths and all(t > 0 for t in row["median_s"].values())
        assert row["max_rel_err"] < 1e-10  # float64 against one position at a time
        expected = chunk_for(row["b"], row["e"], row["n"], 4) if row["family"] == "mamba1" else DEFAULT_CHUNK
        assert row["picked"] == expected
        assert abs(row["ratio_to_picked"][str(expected)] - 1) < 1e-12
    assert "L2 cache" in results["caches"] or results["caches"] == {}
