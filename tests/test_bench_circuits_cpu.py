"""The circuit-discovery benchmark runs end to end (``--quick``: 8 prompts, one round, layer graphs).

The quick run's timings mean nothing; what is checked is that every method ran on both toy
models and that each circuit's faithfulness was measured at ACDC's size.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_circuits_benchmark_quick_run(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "circuits"
    run = subprocess.run([sys.executable, "benchmarks/bench_circuits_cpu.py", "--quick", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["model"], r["method"]) for r in rows] == [
        (model, method) for model in ("toy-mamba2", "toy-mamba") for method in ("EAP", "EAP-IG", "exact", "ACDC")]
    for row in rows:
        assert row["seconds"] > 0 and 0 < row["k"] <= row["edges"] and math.isfinite(row["faithfulness"])
    assert out.with_suffix(".md").read_text().count("| toy-mamba") == 8
