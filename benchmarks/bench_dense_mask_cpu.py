"""CPU: a general knockout mask's two paths, one scan per column pattern or the quadratic form.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_dense_mask_cpu.py

For each family and width, times one scan of the ``"torch"`` backend (what each column
pattern of a dense ``hook_ssm_mask`` costs) against the quadratic hidden-attention form
over a random ``[b, H, p, p]`` mask (Mamba-2: ``dense_removed_terms_bphd``; Mamba-1:
``dense_removed_terms_bpe``, the blocked form with its per-channel, per-state-entry decay). The
ratio ("in scans") is what ``tl_mamba.ops.knockout.dense_mask_after`` and
``dense_mask_after_bpe`` are set from. Batch 1, one thread; medians of interleaved rounds (``_timing.py``), the
ratio paired by round. Writes ``<out>.json`` / ``<out>.md``
(default ``benchmarks/results/dense_mask_cpu``).
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


def measure(family, widths, p, repeats, scan, quadratic) -> dict:
    """One scan against the quadratic form, in interleaved rounds (medians; "in scans" is the paired ratio)."""
    timings = interleaved({"scan": scan, "quadratic": quadratic}, repeats=repeats, warmup=1)
    return dict(family=family, widths=widths, p=p, scan_s=timings.median("scan"),
                quadratic_s=timings.median("quadratic"), in_scans=timings.paired_ratio("quadratic", "scan"))


def main() -> int:
    from tl_mamba.ops.knockout import dense_removed_terms_bpe, dense_removed_terms_bphd
    from tl_mamba.ops.selective_scan import selective_scan
    from tl_mamba.ops.ssd import ssd_scan

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="128,512")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds per row (after one warm-up)")
    parser.add_argument("--out", default="benchmarks/results/dense_mask_cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with torch.no_grad():
        for p in (int(v) for v in args.lengths.split(",")):
            for label, (e, n) in (("toy", (192, 8)), ("130m", (1536, 16))):
                x, delta = torch.randn(1, p, e), torch.rand(1, p, e) * 0.1
                A, B, C = -torch.rand(e, n), torch.randn(1, p, n), torch.randn(1, p, n)
                removed = torch.rand(1, 1, p, p).tril()
                rows.append(measure("mamba1", label, p, args.repeats,
                                    lambda: selective_scan(x, delta, A, B, C, None, backend="torch"),
                                    lambda: dense_removed_terms_bpe(removed, x, delta, A, B, C)))
            for label, (h, hd, n) in (("toy", (8, 32, 32)), ("130m", (24, 64, 128))):
                x, delta = torch.randn(1, p, h, hd), torch.rand(1, p, h) * 0.1
                A, B, C = -torch.rand(h), torch.randn(1, p, 1, n), torch.randn(1, p, 1, n)
                removed = torch.rand(1, h, p, p).tril()
                rows.append(measure("mamba2", label, p, args.repeats,
                                    lambda: ssd_scan(x, delta, A, B, C, None, backend="torch"),
                                    lambda: dense_removed_terms_bphd(removed, x, delta, A, B, C)))
            for row in rows[-4:]:
                print(f"{row['family']} {row['widths']} p={row['p']}: one scan {row['scan_s'] * 1e3:.1f} ms, "
                      f"quadratic {row['quadratic_s'] * 1e3:.1f} ms = {row['in_scans']:.1f} scans")
    results = {"date": _dt.date.today().isoformat(), "machine": machine_info(), "revision": package_revision(),
               "rows": rows}
    lines = ["| family | widths | p | one scan | quadratic form | in scans |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['family']} | {r['widths']} | {r['p']} | {r['scan_s'] * 1e3:.1f} ms | "
              f"{r['quadratic_s'] * 1e3:.1f} ms | {r['in_scans']:.1f} |" for r in rows]
    write_results(args.out, results, "\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
