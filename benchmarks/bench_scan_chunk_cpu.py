"""CPU: the torch scans' chunk length, each length against the one the library picks.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_scan_chunk_cpu.py                    # both families
    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_scan_chunk_cpu.py --families mamba1

The ``"torch"`` backends scan in chunks of positions. Mamba-1's chunk is the longest power
of two up to 64 whose ``[b, L, e, n]`` tensors fit ``chunked.CHUNK_BYTES``
(``tl_mamba.ops.selective_scan.chunked.chunk_for``); Mamba-2's is ``ssd.chunked.DEFAULT_CHUNK``.
Both were tuned on one host, and the best length follows the core's cache, so this script
lets the choice be re-checked on another machine: it times the scan alone (no model) at
real widths, every chunk length in one process, in a rotating order
(``_timing.interleaved``), and reports each length's median time as a paired ratio to the
length the library picks (below 1: that length is faster here). The machine's cache sizes
are recorded with the results.

Every length's output is first checked against the sequential reference scan
(``*.reference``, one position at a time) in float64: ``max_rel_err`` is the largest
``|y - y_ref| / max|y_ref|`` over the lengths. Writes ``<out>.json`` / ``<out>.md``
(default ``benchmarks/results/scan_chunk_cpu``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import pathlib
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _env import machine_info, package_revision, write_results  # noqa: E402
from _timing import interleaved  # noqa: E402

from tl_mamba.ops.selective_scan import chunked as m1_chunked  # noqa: E402
from tl_mamba.ops.selective_scan.reference import selective_scan_reference  # noqa: E402
from tl_mamba.ops.ssd import chunked as m2_chunked  # noqa: E402
from tl_mamba.ops.ssd.reference import ssd_reference  # noqa: E402

LENGTHS = {"mamba1": (8, 16, 32, 64), "mamba2": (16, 32, 64)}


@dataclass(frozen=True)
class Shape:
    """One scan to time: Mamba-1 ``[b, p, e]`` with ``n`` states a channel, or Mamba-2 ``[b, p, h, hd]``
    (``e = h·hd``) with ``g`` groups of ``n``; ``states``: also return every position's state (``hook_h``)."""

    family: str
    label: str
    b: int
    p: int
    n: int
    e: int = 0
    h: int = 0
    hd: int = 0
    g: int = 1
    states: bool = False


SHAPES = [
    Shape("mamba1", "130m widths", 1, 1024, 16, e=1536),
    Shape("mamba1", "130m widths, states", 1, 1024, 16, e=1536, states=True),
    Shape("mamba1", "370m widths", 1, 1024, 16, e=2048),
    Shape("mamba1", "130m widths", 4, 512, 16, e=1536),
    Shape("mamba1", "toy widths", 32, 156, 8, e=192),
    Shape("mamba2", "130m widths", 1, 1024, 128, h=24, hd=64),
    Shape("mamba2", "130m widths", 4, 512, 128, h=24, hd=64),
    Shape("mamba2", "toy widths", 32, 256, 32, h=8, hd=32),
]
QUICK_SHAPES = [
    Shape("mamba1", "tiny", 2, 40, 4, e=16),
    Shape("mamba1", "tiny, states", 2, 40, 4, e=16, states=True),
    Shape("mamba2", "tiny", 2, 40, 8, h=2, hd=8),
]


def _inputs(shape: Shape, dtype: torch.dtype, seed: int = 0):
    """Random scan inputs (Δ small and positive, A negative), as a model's would be."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *size: torch.randn(*size, generator=gen, dtype=dtype)  # noqa: E731
    b, p = shape.b, shape.p
    if shape.family == "mamba1":
        x = rand(b, p, shape.e)
        delta = torch.rand(b, p, shape.e, generator=gen, dtype=dtype) * 0.1
        A = -torch.rand(shape.e, shape.n, generator=gen, dtype=dtype) - 0.1
        return x, delta, A, rand(b, p, shape.n), rand(b, p, shape.n)
    x = rand(b, p, shape.h, shape.hd)
    delta = torch.rand(b, p, shape.h, generator=gen, dtype=dtype) * 0.1
    A = -torch.rand(shape.h, generator=gen, dtype=dtype) - 0.1
    return x, delta, A, rand(b, p, shape.g, shape.n), rand(b, p, shape.g, shape.n)


def picked_length(shape: Shape) -> int:
    """The chunk length the library uses for this shape when none is given (float32)."""
    if shape.family == "mamba1":
        return m1_chunked.chunk_for(shape.b, shape.e, shape.n, 4)
    return m2_chunked.DEFAULT_CHUNK


def scan_with(shape: Shape, length: int) -> Callable[..., object]:
    """``inputs -> output`` of the family's torch scan at ``length`` positions per chunk."""
    if shape.family == "mamba1":
        return lambda *inputs: m1_chunked.selective_scan_chunked(*inputs, chunk_size=length,
                                                                 return_states=shape.states)
    return lambda *inputs: m2_chunked.ssd_chunked(*inputs, chunk_size=length, return_states=shape.states)


def max_rel_err(shape: Shape) -> float:
    """Largest error of any length's y against the sequential reference, all in float64."""
    inputs = _inputs(shape, torch.float64)
    reference = (selective_scan_reference if shape.family == "mamba1" else ssd_reference)(*inputs).y
    scale = float(reference.abs().max())
    return max(float((scan_with(shape, length)(*inputs).y - reference).abs().max()) / scale
               for length in LENGTHS[shape.family])


def time_shape(shape: Shape, repeats: int, log: Callable[[str], None]) -> dict:
    lengths = LENGTHS[shape.family]
    picked = picked_length(shape)
    log(f"{shape.family} {shape.label} b {shape.b} p {shape.p}: lengths {lengths}, the library picks {picked}")
    error = max_rel_err(shape)
    inputs = _inputs(shape, torch.float32)
    contenders = {str(length): (lambda run=scan_with(shape, length): run(*inputs)) for length in lengths}
    timings = interleaved(contenders, repeats, warmup=1, log=log)
    return {
        "family": shape.family, "label": shape.label, "b": shape.b, "p": shape.p, "e": shape.e or shape.h * shape.hd,
        "n": shape.n, "states": shape.states, "picked": picked, "max_rel_err": error,
        "median_s": {length: timings.median(length) for length in contenders},
        "ratio_to_picked": {length: timings.paired_ratio(length, str(picked)) for length in contenders},
        "samples_s": timings.samples,
    }


def cache_sizes() -> Dict[str, str]:
    """``lscpu``'s cache lines (L1d, L2, L3: size and instances); empty where lscpu is missing."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in text.splitlines() if ":" in line)
            if key.strip() in ("L1d cache", "L2 cache", "L3 cache")}


def render(results: dict) -> str:
    caches = ", ".join(f"{k} {v}" for k, v in results["caches"].items()) or "cache sizes unknown"
    lines = [
        f"# Torch scans by chunk length ({results['date']}, {results['machine']['cpu']}, revision "
        f"{results['revision']})",
        "",
        f"{caches}. 1 thread, float32, {results['repeats']} rotating round{'s' if results['repeats'] != 1 else ''} "
        "after a warm-up. Median ms per "
        "length; the ratio is the paired median against the length the library picks (**bold**; below 1: faster "
        "than the pick). Error: the largest of any length against the sequential reference, float64.",
        "",
        "| family | shape | b | p | e | n | states | length: median ms (ratio to the pick) | error |",
        "|---|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for row in results["rows"]:
        cells = []
        for length, seconds in row["median_s"].items():
            text = f"{length}: {seconds * 1e3:,.1f} ({row['ratio_to_picked'][length]:.2f})"
            cells.append(f"**{text}**" if int(length) == row["picked"] else text)
        lines.append(f"| {row['family']} | {row['label']} | {row['b']} | {row['p']} | {row['e']} | {row['n']} | "
                     f"{'yes' if row['states'] else 'no'} | {'; '.join(cells)} | {row['max_rel_err']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=sorted(LENGTHS), choices=sorted(LENGTHS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one round (checks that it runs)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "scan_chunk_cpu")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    repeats = 1 if args.quick else args.repeats
    torch.set_num_threads(1)
    log = lambda s: print(s, flush=True)  # noqa: E731
    shapes: List[Shape] = [s for s in (QUICK_SHAPES if args.quick else SHAPES) if s.family in args.families]
    rows = [time_shape(shape, repeats, log) for shape in shapes]
    results = {"date": _dt.date.today().isoformat(), "revision": package_revision(), "machine": machine_info(),
               "caches": cache_sizes(), "repeats": repeats, "command": " ".join(sys.argv), "rows": rows}
    markdown = render(results)
    write_results(args.out, results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
