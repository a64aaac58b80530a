"""The one-command GPU benchmark runs end to end (``--smoke``: toy sizes, CPU interpreter).

``benchmarks/bench_triton_gpu.py`` is what a session with a lent GPU runs first; this
makes sure it works before anyone spends device time on it. The numbers of a smoke run
mean nothing; what is checked is that every section ran and that its correctness
section (Triton against a float64 reference) passed.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parent.parent


# A stand-in for mamba_ssm's pure-Triton Mamba-2 scan (same signature and layout), computed by
# the suite's float64 reference: what ``--vendor-path`` puts on the path for the scans.
FAKE_MAMBA_CHUNK_SCAN = """
from tests.test_ssd_ops import brute_force

def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, return_final_states=False):
    y, states, _ = brute_force(x, dt, A, B, C, D)
    y = y.to(x.dtype)
    return (y, states[:, -1].float()) if return_final_states else y
"""


def _fake_vendor_folder(root: pathlib.Path) -> pathlib.Path:
    package = root / "vendor" / "mamba_ssm" / "ops" / "triton"
    package.mkdir(parents=True)
    for folder in (package, package.parent, package.parent.parent):
        (folder / "__init__.py").write_text("")
    (package / "ssd_combined.py").write_text(FAKE_MAMBA_CHUNK_SCAN)
    return root / "vendor"


@pytest.mark.no_tl  # the GPU machine carries transformer-lens 4.x; under 3.9 the bridge is only reported missing
def test_gpu_benchmark_smoke_run(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = tmp_path / "triton_gpu"
    vendor = _fake_vendor_folder(tmp_path)
    run = subprocess.run([sys.executable, "benchmarks/bench_triton_gpu.py", "--smoke", "--out", str(out),
                          "--vendor-path", str(vendor)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["smoke"] is True
    assert not results.get("errors"), results.get("errors")
    assert results["kernel_fallbacks"] == {}  # off CUDA a failing kernel raises instead of falling back
    checks = {(r["family"], r["p"], r["dtype"], r["kernel"]): r for r in results["checks"]}
    assert {key[0] for key in checks} == {"mamba1", "mamba2"}
    assert {key[2] for key in checks} == {"float32", "bfloat16"}
    assert {key[3] for key in checks if key[0] == "mamba1"} == {"chunked", "sequential"}
    for key, row in checks.items():
        for err in ("rel_err_y", "rel_err_final", "rel_err_states", "rel_err_knockout"):
            assert row[err] < 1e-4, (key, err, row)
    for family in ("mamba1", "mamba2"):
        timed = results["speed"][family]["median_s"]
        assert {"triton", "torch", "knockout_triton", "hook_h_cache_triton", "transformers"} <= set(timed), timed
        assert all(seconds > 0 for seconds in timed.values())
        assert "knockout / plain <= 1.3" in results["speed"][family]["targets"]
    for family in ("mamba1", "mamba2"):
        assert {"knockout_triton_same_pass", "knockout_triton_edges",
                "knockout_triton_separate_scan"} <= set(results["speed"][family]["median_s"])
    assert results["copy_bandwidth_GBps"] > 0
    scans = {(r["family"], r["dtype"], r["contender"]): r for r in results["scans"]}
    for family in ("mamba1", "mamba2"):
        for dtype in ("float32", "bfloat16"):
            for contender in ("triton", "torch"):
                row = scans[(family, dtype, contender)]
                assert row["median_s"] > 0 and row["floor_s"] > 0
    for dtype in ("float32", "bfloat16"):
        assert ("mamba1", dtype, "triton_sequential") in scans
        assert ("mamba2", dtype, "dense_mask_masked_tiles_triton") in scans
        # the vendor folder served the Mamba-2 scan, timed beside ours after checking it computes the same y
        vendor_row = scans[("mamba2", dtype, "mamba_ssm")]
        assert vendor_row["median_s"] > 0 and vendor_row["rel_err"] < (1e-5 if dtype == "float32" else 1e-2)
        # the masked tiles checked against the torch quadratic form in float64 at the bench's size
        assert scans[("mamba2", dtype, "dense_mask_masked_tiles_triton")]["rel_err"] < 1e-5
        # and the chunked kernels at each tile size, plain and with the same-pass knockout
        tiled = [row for key, row in scans.items() if key[:2] == ("mamba2", dtype) and "_kernels_" in key[2]]
        assert len(tiled) == 6 and all(row["rel_err"] < 1e-5 for row in tiled), tiled
        assert scans[("mamba2", dtype, "chunked_tf32_dots")]["rel_err"] < 1e-2  # tensor-core dots, timed beside
        # Mamba-1's chunked kernel at each tile size, checked the same way
        tiled = [row for key, row in scans.items() if key[:2] == ("mamba1", dtype) and "chunked_kernel_" in key[2]]
        assert len(tiled) == 5 and all(row["rel_err"] < 1e-5 for row in tiled), tiled
    assert not results["mamba_ssm"]  # transformers' models never saw the vendor folder
    backward = {(r["family"], r["contender"]) for r in results["backward"]}
    assert {("mamba1", "triton"), ("mamba1", "triton_recompute_backward"), ("mamba2", "triton")} <= backward
    table = out.with_suffix(".md").read_text()
    assert "## Correctness" in table and "## The scans alone" in table
    assert "target: triton scan <= 1.5x mamba_ssm's" in table


def test_a_failing_section_is_recorded_and_flushed_and_the_run_goes_on():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_triton_gpu as bench

    results, flushed = {}, []
    with bench.section(results, "broken", lambda: flushed.append("broken")):
        raise RuntimeError("kernel exploded")
    with bench.section(results, "fine", lambda: flushed.append("fine")):
        results["measured"] = 1.0
    assert "RuntimeError: kernel exploded" in results["errors"]["broken"]
    assert "fine" not in results["errors"] and results["measured"] == 1.0
    assert set(results["section_seconds"]) == {"broken", "fine"}  # timed whether or not they failed
    assert flushed == ["broken", "fine"]
