"""The knockout-routes benchmark runs (``--quick``: toy widths, p = 64) and records both routes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_knockout_routes_benchmark_smoke_run(tmp_path):
    from tl_mamba.ops.knockout import PAIRS_PER_SCANNED_POSITION

    out = tmp_path / "routes"
    run = subprocess.run([sys.executable, "benchmarks/bench_knockout_routes_cpu.py", "--quick", "--out", str(out)],
                         cwd=ROOT, env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["default_pairs_per_scanned_position"] == PAIRS_PER_SCANNED_POSITION
    rows = results["rows"]
    assert {r["family"] for r in rows} == {"mamba1", "mamba2"}
    assert len({(r["family"], r["edges"]) for r in rows}) == len(rows)  # each shape timed once
    assert all(r["plain_s"] > 0 and r["edges"] >= 1 for r in rows)
    assert "| mamba2 |" in out.with_suffix(".md").read_text()
