"""The CPU gradient benchmark runs end to end (``--quick``: toy shapes, one round).

The numbers of a quick run mean nothing; what is checked is that both settings ran
and that its own parity check (our logits against transformers') passed.
"""

from __future__ import annotations

from conftest import run_quick_benchmark


def test_grad_benchmark_quick_run(tmp_path):
    out = tmp_path / "grad_cpu"
    rows = run_quick_benchmark("bench_grad_cpu.py", out)["rows"]
    assert [r["setting"] for r in rows] == ["scan", "model", "model"]
    assert [r["shape"].split()[0] for r in rows[1:]] == ["Mamba-1", "Mamba-2"]
    assert rows[0]["torch_s"] > 0 and rows[0]["states_s"] > 0
    assert rows[1]["ours_s"] > 0 and rows[1]["transformers_s"] > 0
    assert rows[1]["ours_saved_mb"] > 0 and rows[1]["transformers_saved_mb"] > 0
    assert "| model: ours vs transformers |" in out.with_suffix(".md").read_text()
