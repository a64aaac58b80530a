"""The knockout-routes benchmark runs (``--quick``: toy widths, p = 64) and records both routes."""

from __future__ import annotations

from conftest import run_quick_benchmark


def test_knockout_routes_benchmark_smoke_run(tmp_path):
    from tl_mamba.ops.knockout import PAIRS_PER_SCANNED_POSITION

    out = tmp_path / "routes"
    results = run_quick_benchmark("bench_knockout_routes_cpu.py", out, timeout=300)
    assert results["default_pairs_per_scanned_position"] == PAIRS_PER_SCANNED_POSITION
    rows = results["rows"]
    assert {r["family"] for r in rows} == {"mamba1", "mamba2"}
    assert len({(r["family"], r["edges"]) for r in rows}) == len(rows)  # each shape timed once
    assert all(r["plain_s"] > 0 and r["edges"] >= 1 for r in rows)
    assert "| mamba2 |" in out.with_suffix(".md").read_text()
