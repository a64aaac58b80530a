"""The CPU gradient benchmark runs end to end (``--quick``: toy shapes, one round).

The numbers of a quick run mean nothing; what is checked is that both settings ran
and that its own parity check (our logits against transformers') passed.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_grad_benchmark_quick_run(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "grad_cpu"
    run = subprocess.run([sys.executable, "benchmarks/bench_grad_cpu.py", "--quick", "--out", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["setting"] for r in rows] == ["scan", "model", "model"]
    assert [r["shape"].split()[0] for r in rows[1:]] == ["Mamba-1", "Mamba-2"]
    assert rows[0]["torch_s"] > 0 and rows[0]["states_s"] > 0
    assert rows[1]["ours_s"] > 0 and rows[1]["transformers_s"] > 0
    assert rows[1]["ours_saved_mb"] > 0 and rows[1]["transformers_saved_mb"] > 0
    assert "| model: ours vs transformers |" in out.with_suffix(".md").read_text()
