"""CPU: where caching ``hook_h`` spends its time, by how the states buffer is allocated.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_states_buffer_cpu.py                  # both families
    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_states_buffer_cpu.py --pauses 0 3     # both regimes

Caching ``hook_h`` writes a fresh ``[b, p, e, n]`` (Mamba-2: ``[b, p, h, hd, n]``) buffer
per layer: 100 MB (805 MB) at 130m widths and p = 1024. On a CPU its cost is mostly the
kernel mapping fresh memory, and how much that costs depends on the host. This script
times ``model.run_with_cache(tokens, names_filter=<hook_h>)`` with the states buffer
allocated three ways, patched into the scans for the run:

- ``plain``: ``torch.empty``, what ``tl_mamba.ops.buffers.states_buffer`` does;
- ``advised``: the same, then ``madvise(MADV_HUGEPAGE)`` on its whole 2 MB pages (the
  library did this from 2026-12-05 to 12-07);
- ``advised_prefault``: advised, then one write per 4 kB page, so the pages are mapped
  before the scan's loop rather than inside it;

next to the plain forward (``forward``), in a rotating order, each call after ``--pause``
seconds. The pause matters: a VM whose balloon device reports free memory to the host
(``page_reporting_order`` under ``/sys/module/page_reporting``) does so for 2 MB blocks
some seconds after they are freed, and the host then faults them in again when a huge page
is taken from them. Back to back (pause 0) a call reuses the memory the previous one freed.
Reported per regime: median wall time, median kernel (system) CPU time, the paired ratio
to ``plain``, and whether every strategy cached exactly ``plain``'s states. The host's
transparent-huge-page and page-reporting settings are recorded with the results. Writes
``<out>.json`` / ``<out>.md`` (default ``benchmarks/results/states_buffer_cpu``).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import importlib
import mmap
import pathlib
import resource
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _env import machine_info, package_revision, write_results  # noqa: E402

HUGE_PAGE = 2 << 20
SCAN_MODULES = {"mamba1": "tl_mamba.ops.selective_scan.chunked", "mamba2": "tl_mamba.ops.ssd.chunked"}
STRATEGIES = ("plain", "advised", "advised_prefault")


def host_memory_settings() -> dict:
    """The kernel settings the result depends on (None where a file is missing)."""
    files = {
        "thp_enabled": "/sys/kernel/mm/transparent_hugepage/enabled",
        "thp_defrag": "/sys/kernel/mm/transparent_hugepage/defrag",
        "page_reporting_order": "/sys/module/page_reporting/parameters/page_reporting_order",
    }
    out = {}
    for key, path in files.items():
        try:
            out[key] = pathlib.Path(path).read_text().strip()
        except OSError:
            out[key] = None
    return out


def _madvise_huge(buffer: torch.Tensor) -> bool:
    """``madvise(MADV_HUGEPAGE)`` on the whole 2 MB pages inside ``buffer``; False where unavailable."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    address, nbytes = buffer.data_ptr(), buffer.numel() * buffer.element_size()
    start = -(-address // HUGE_PAGE) * HUGE_PAGE
    end = (address + nbytes) // HUGE_PAGE * HUGE_PAGE
    return end > start and libc.madvise(start, end - start, mmap.MADV_HUGEPAGE) == 0


def allocator(strategy: str, library_buffer):
    """A ``states_buffer(shape, like, dtype)`` for ``strategy``, built on the library's."""
    def allocate(shape, like, dtype):
        buffer = library_buffer(shape, like=like, dtype=dtype)
        if strategy == "plain" or not _madvise_huge(buffer) or strategy == "advised":
            return buffer
        flat = buffer.view(-1)  # advised_prefault: one write per 4 kB page maps them all now
        with torch.no_grad():
            flat[:: max(1, mmap.PAGESIZE // buffer.element_size())].zero_()
            flat[-1:].zero_()  # the last page, when the buffer does not start on one
        return buffer
    return allocate


def build_model(family: str, quick: bool):
    """A random model of 130m widths, 4 layers, vocab 8192 (``--quick``: toy widths, 2 layers)."""
    from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig

    widths = dict(n_layers=2, d_model=32, d_vocab=64, d_state=8) if quick else \
        dict(n_layers=4, d_model=768, d_vocab=8192, d_state=16 if family == "mamba1" else 128)
    if family == "mamba2":
        widths["d_head"] = 8 if quick else 64
    cfg = HookedMambaConfig(family=family, seed=0, **widths)
    model = (HookedMamba if family == "mamba1" else HookedMamba2)(cfg)
    model.eval()
    model.set_backend("torch")
    return model


def time_family(family: str, p: int, pause: float, repeats: int, quick: bool, log) -> dict:
    """One regime of one family: every contender ``repeats`` times, rotating, after ``pause`` s each."""
    model = build_model(family, quick)
    scan = importlib.import_module(SCAN_MODULES[family])
    library_buffer = scan.states_buffer
    tokens = torch.randint(0, model.cfg.d_vocab, (1, p), generator=torch.Generator().manual_seed(0))
    is_h = lambda name: name.endswith("hook_h")  # noqa: E731
    names = ["forward", *STRATEGIES]
    wall = {name: [] for name in names}
    system = {name: [] for name in names}
    identical = {}
    try:
        with torch.inference_mode():
            _, reference = model.run_with_cache(tokens, names_filter=is_h)  # warm-up and plain's states
            reference = {k: v.clone() for k, v in reference.items()}
            for r in range(repeats):
                order = names[r % len(names):] + names[: r % len(names)]
                for name in order:
                    time.sleep(pause)
                    scan.states_buffer = library_buffer if name == "forward" else allocator(name, library_buffer)
                    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
                    out = model(tokens) if name == "forward" else model.run_with_cache(tokens, names_filter=is_h)
                    elapsed, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
                    scan.states_buffer = library_buffer
                    if name != "forward":
                        cache = out[1]
                        identical[name] = identical.get(name, True) and all(
                            torch.equal(cache[k], v) for k, v in reference.items())
                    del out
                    wall[name].append(elapsed)
                    system[name].append(after.ru_stime - before.ru_stime)
                log(f"  {family} pause {pause:g} s, round {r + 1}/{repeats}: "
                    + ", ".join(f"{n} {wall[n][-1]:.3f}s" for n in names))
    finally:
        scan.states_buffer = library_buffer
    states_mb = sum(v.numel() * v.element_size() for v in reference.values()) / 2**20
    return {
        "family": family, "p": p, "pause_s": pause, "states_mb": states_mb,
        "median_s": {n: statistics.median(wall[n]) for n in names},
        "median_system_s": {n: statistics.median(system[n]) for n in names},
        "ratio_to_plain": {n: statistics.median(a / b for a, b in zip(wall[n], wall["plain"])) for n in STRATEGIES},
        "same_states_as_plain": identical,
        "samples_s": wall, "system_samples_s": system,
    }


def render(results: dict) -> str:
    host = results["host_memory"]
    lines = [
        f"# `hook_h` cache by states-buffer allocation ({results['date']}, {results['machine']['cpu']}, "
        f"{results['machine']['logical_cpus']} logical CPUs, revision {results['revision']})",
        "",
        f"Transparent huge pages `{host['thp_enabled']}`, defrag `{host['thp_defrag']}`, "
        f"page_reporting_order `{host['page_reporting_order']}`. {results['repeats']} rotating rounds; "
        "median wall ms (median kernel CPU ms); ratio: paired median against `plain`.",
        "",
        "| family | p | pause s | states MB | forward | plain | advised | advised_prefault | advised / plain | "
        "advised_prefault / plain | same states |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in results["rows"]:
        cell = lambda n: f"{row['median_s'][n] * 1e3:,.0f} ({row['median_system_s'][n] * 1e3:,.0f})"  # noqa: E731
        lines.append(
            f"| {row['family']} | {row['p']} | {row['pause_s']:g} | {row['states_mb']:,.0f} | {cell('forward')} | "
            f"{cell('plain')} | {cell('advised')} | {cell('advised_prefault')} | "
            f"{row['ratio_to_plain']['advised']:.2f} | {row['ratio_to_plain']['advised_prefault']:.2f} | "
            f"{'yes' if all(row['same_states_as_plain'].values()) else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="+", default=["mamba1", "mamba2"], choices=sorted(SCAN_MODULES))
    parser.add_argument("--p", type=int, default=1024, help="sequence length (default 1024)")
    parser.add_argument("--pauses", type=float, nargs="+", default=[3.0],
                        help="seconds before each call; one regime per value (default 3; 0 is back to back)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="toy widths, p 24, one round, no pause (checks that it runs)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "states_buffer_cpu")
    args = parser.parse_args(argv)
    if args.quick:
        args.p, args.pauses, args.repeats = 24, [0.0], 1
    if args.p < 1 or args.repeats < 1 or any(pause < 0 for pause in args.pauses):
        parser.error("--p and --repeats must be positive, --pauses not negative")
    torch.set_num_threads(1)
    log = lambda s: print(s, flush=True)  # noqa: E731
    rows = [time_family(family, args.p, pause, args.repeats, args.quick, log)
            for family in args.families for pause in args.pauses]
    results = {"date": _dt.date.today().isoformat(), "revision": package_revision(), "machine": machine_info(),
               "host_memory": host_memory_settings(), "repeats": args.repeats, "command": " ".join(sys.argv),
               "rows": rows}
    markdown = render(results)
    write_results(args.out, results, markdown)
    print(markdown)
    return results


if __name__ == "__main__":
    main()
