"""CPU: an S → T knockout's two routes, edge by edge or one extra scan, by edges per position.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_knockout_routes_cpu.py
    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_knockout_routes_cpu.py --quick   # smoke: toy widths, p = 64

A structured knockout's removed part is either summed over its edges
(``tl_mamba.ops.knockout.pair_terms_bpe`` / ``pair_terms_bphd``) or computed by one
extra scan over first source → last target. This times one scan call through the
dispatcher (``selective_scan`` / ``ssd_scan``, ``"torch"`` backend, batch 1, one thread)
plain, with the knockout forced onto the edge route, and forced onto the scan route,
in interleaved rounds (``_timing.py``), for knockouts of growing density: the sources
are the positions from p/5 on, the targets the last positions, so the scan covers
about 4/5 of the sequence. The extra cost of each route is its median minus the
plain median; where the edge route's extra cost passes the scan's is what
``tl_mamba.ops.knockout.PAIRS_PER_SCANNED_POSITION`` is set from.
Writes ``<out>.json`` / ``<out>.md`` (default ``benchmarks/results/knockout_routes_cpu``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _env import machine_info, package_revision, write_results  # noqa: E402
from _timing import interleaved  # noqa: E402

# (sources, targets) per knockout: 3 → 1 (the usual experiment), then denser
SHAPES = ((3, 1), (32, 4), (64, 4), (64, 8), (128, 8), (128, 16), (128, 32), (256, 32), (256, 64))
TOO_SLOW_EDGES = {"mamba1": 2048, "mamba2": 1 << 30}  # Mamba-1's edge route past this takes seconds


def inputs(family: str, widths: str, p: int):
    gen = torch.Generator().manual_seed(0)
    if family == "mamba1":
        e, n = (192, 8) if widths == "toy" else (1536, 16)
        return (torch.randn(1, p, e, generator=gen), torch.rand(1, p, e, generator=gen) * 0.1,
                -torch.rand(e, n, generator=gen), torch.randn(1, p, n, generator=gen),
                torch.randn(1, p, n, generator=gen), torch.randn(e, generator=gen))
    h, hd, n = (8, 32, 32) if widths == "toy" else (24, 64, 128)
    return (torch.randn(1, p, h, hd, generator=gen), torch.rand(1, p, h, generator=gen) * 0.1,
            -torch.rand(h, generator=gen), torch.randn(1, p, 1, n, generator=gen),
            torch.randn(1, p, 1, n, generator=gen), torch.randn(h, generator=gen))


def main() -> int:
    from tl_mamba.ops import knockout as ops_knockout
    from tl_mamba.ops.knockout import EdgeRemoval
    from tl_mamba.ops.selective_scan import selective_scan
    from tl_mamba.ops.ssd import ssd_scan

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=int, default=512)
    parser.add_argument("--widths", default="130m", choices=("toy", "130m"))
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per row (after one warm-up)")
    parser.add_argument("--quick", action="store_true", help="toy widths, p = 64, 2 rounds (a smoke run)")
    parser.add_argument("--out", default="benchmarks/results/knockout_routes_cpu")
    args = parser.parse_args()
    p, widths, repeats = (64, "toy", 2) if args.quick else (args.p, args.widths, args.repeats)
    torch.set_num_threads(1)
    first_source = p // 5
    rows = []
    default = dict(ops_knockout.PAIRS_PER_SCANNED_POSITION)
    with torch.inference_mode():
        for family, scan in (("mamba1", selective_scan), ("mamba2", ssd_scan)):
            tensors = inputs(family, widths, p)
            room = p - first_source - 1  # short sequences clip the shapes; each clipped shape is timed once
            shapes = dict.fromkeys((min(n_sources, room), min(n_targets, room)) for n_sources, n_targets in SHAPES)
            for n_sources, n_targets in shapes:
                if n_sources * n_targets > TOO_SLOW_EDGES[family]:
                    continue
                sources, targets = torch.zeros(1, p), torch.zeros(1, p)
                sources[0, first_source:first_source + n_sources] = 1
                targets[0, p - n_targets:] = 1
                removal = [EdgeRemoval(sources=sources, targets=targets)]
                edges = int(ops_knockout._edges(targets[0].nonzero()[:, 0], sources[0].nonzero()[:, 0])[0].numel())

                def routed(per_position: float, removal=removal, scan=scan, tensors=tensors):
                    def call():
                        ops_knockout.PAIRS_PER_SCANNED_POSITION = {"bpe": per_position, "bphd": per_position}
                        try:
                            return scan(*tensors, ssm_mask=removal, backend="torch")
                        finally:
                            ops_knockout.PAIRS_PER_SCANNED_POSITION = dict(default)
                    return call

                timings = interleaved({"plain": lambda: scan(*tensors, backend="torch"), "edges": routed(1e12),
                                       "scan": routed(0.0)}, repeats=repeats, warmup=1)
                plain = timings.median("plain")
                row = dict(family=family, widths=widths, p=p, sources=n_sources, targets=n_targets, edges=edges,
                           edges_per_position=edges / (p - first_source), plain_s=plain,
                           extra_edges_s=timings.median("edges") - plain, extra_scan_s=timings.median("scan") - plain)
                rows.append(row)
                print(f"{family} {widths} p={p}: {edges} edges ({row['edges_per_position']:.2f} per position): "
                      f"extra {row['extra_edges_s'] * 1e3:.1f} ms edge by edge, {row['extra_scan_s'] * 1e3:.1f} ms "
                      f"by the scan (plain {plain * 1e3:.1f} ms)", flush=True)
    results = {"date": _dt.date.today().isoformat(), "machine": machine_info(), "revision": package_revision(),
               "default_pairs_per_scanned_position": default, "rows": rows}
    lines = [f"# Knockout routes (CPU, {widths} widths, p = {p}, 1 thread)", "",
             f"{results['date']}, {results['machine'].get('cpu', '?')}, revision {results['revision']}; "
             f"default edges per scanned position: {default}", "",
             "| family | edges | per position | plain scan | extra, edge by edge | extra, one scan |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['edges']} | {r['edges_per_position']:.2f} | {r['plain_s'] * 1e3:.1f} ms | "
              f"{r['extra_edges_s'] * 1e3:.1f} ms | {r['extra_scan_s'] * 1e3:.1f} ms |" for r in rows]
    write_results(args.out, results, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
