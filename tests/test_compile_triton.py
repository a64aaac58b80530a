"""benchmarks/compile_triton.py: every Triton kernel compiles for real GPUs, here, without one.

The interpreter tests (tests/test_triton.py) check what the kernels compute; they cannot
see what only the compiler and the GPU's limits refuse. These runs compile the kernels
(TTIR → PTX → cubin with the ptxas Triton ships) for Hopper and Ampere at 130m widths, in a
subprocess (this session's TRITON_INTERPRET=1 makes ``triton.jit`` interpret). The real
widths are benchmarks/results/compile_triton.md, read in docs/performance.md.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compile_triton.py"


def _ptxas_available() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (tools / "ptxas").exists() and (tools / "ptxas-blackwell").exists()  # below sm_90, and sm_90


# no_tl: compiling kernels never touches transformer-lens, so CI's 3.9 leg skips these (~2.5 min)
pytestmark = [pytest.mark.skipif(not _ptxas_available(), reason="triton with its NVIDIA backend (ptxas) is needed"),
              pytest.mark.no_tl]


def _compiling_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    return env


def _kernels_in_source() -> set:
    """The names of every ``@triton.jit`` function named ``*_kernel`` in the package (read from the
    source, not from the script): what a launch must reach."""
    names = set()
    for path in (ROOT / "tl_mamba").rglob("*.py"):
        names |= set(re.findall(r"@triton\.jit\s*\ndef (\w+_kernel)\(", path.read_text()))
    return names


def test_every_kernel_compiles_and_fits_at_real_widths(tmp_path):
    """130m widths (the real tiles: hd × n 32 × 64, n = 128 in one block ...) for sm_86, whose
    99 KB of shared memory per block is the tightest limit, and sm_90."""
    out = tmp_path / "compile.md"
    run = subprocess.run([sys.executable, str(SCRIPT), "--widths", "130m", "--p", "128", "--arch", "86", "90",
                          "--out", str(out)], cwd=ROOT, env=_compiling_env(), capture_output=True, text=True,
                         timeout=1200)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = out.read_text()
    sections = report.split("### ")[1:]
    assert [s.split(" ", 1)[0] for s in sections] == ["sm_86", "sm_90"]
    kernels = _kernels_in_source()
    assert len(kernels) >= 8, kernels  # the search found the kernels (a changed decorator style would hide them)
    for section in sections:
        rows = [line.split("|") for line in section.splitlines() if line.startswith("| `")]
        compiled = {row[1].strip().strip("`") for row in rows}
        assert compiled == kernels, f"launched {sorted(compiled)}, defined {sorted(kernels)}"
        for row in rows:
            registers, shared, blocks = int(row[6]), int(row[9]), int(row[10])
            assert 0 < registers <= 255 and 0 <= shared <= 101376 and blocks >= 1, row
            assert row[12].strip() == "yes", row
        dtypes = {(row[1].strip().strip("`"), row[2].strip()) for row in rows}
        # both dtypes reach the backward kernel; the masked tiles run on upcast (fp32) inputs only
        assert {("_selective_scan_bwd_kernel", "float32"), ("_selective_scan_bwd_kernel", "bfloat16")} <= dtypes
        assert {d for k, d in dtypes if k == "_masked_removed_terms_kernel"} == {"float32"}
        # generate's decode steps (p = 1: its position count specialized to 1) were compiled
        assert any("p=1" in [part.strip() for part in row[4].split(";")[0].split(",")] for row in rows), \
            "no p = 1 launch"


_LIMITS_SCRIPT = """
import sys, torch, triton, triton.language as tl
sys.path.insert(0, {benchmarks!r})
import compile_triton as ct

@triton.jit
def square_kernel(a_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + offs[:, None] * BLOCK + offs[None, :])
    tl.store(a_ptr + offs[:, None] * BLOCK + offs[None, :], tl.dot(a, a))

with ct.Interceptor(90).active() as interceptor:
    for block in (16, 256):
        square_kernel[(1,)](torch.zeros(block * block), BLOCK=block)
for v in interceptor.variants.values():
    print(v.constexprs["BLOCK"], v.shared, v.registers, v.spill_bytes, "|", "; ".join(ct.problems(v, 90)))
    if not ct.problems(v, 90):
        print("blocks", ct.blocks_per_sm(v, 90))
v.registers = None  # a compile whose ptxas report went missing is a problem, not a crash
print("missing", ct.problems(v, 90))
"""


def test_a_tile_past_the_shared_memory_limit_is_reported(tmp_path):
    """A [256, 256] fp32 product needs more shared memory than an H100 block may have: the
    interpreter runs it, a GPU would refuse the launch, and the script says so."""
    script = tmp_path / "limits.py"
    script.write_text(_LIMITS_SCRIPT.format(benchmarks=str(ROOT / "benchmarks")))
    run = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=_compiling_env(), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = dict(line.split(" ", 1) for line in run.stdout.splitlines() if line[:1].isdigit())
    small, large = rows["16"], rows["256"]
    assert small.rstrip().endswith("|"), small  # no problem: it fits
    shared = int(large.split()[0])
    assert shared > 232448 and f"shared memory {shared} B > 232448 B" in large, large
    blocks = [int(line.split()[1]) for line in run.stdout.splitlines() if line.startswith("blocks ")]
    assert len(blocks) == 1 and blocks[0] >= 1, run.stdout  # only the tile that fits has an occupancy
    assert "missing ['ptxas reported no registers']" in run.stdout


def test_the_script_refuses_to_run_under_the_interpreter():
    env = dict(_compiling_env(), TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(SCRIPT), "--widths", "toy"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode != 0 and "unset TRITON_INTERPRET" in run.stderr
