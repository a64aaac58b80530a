"""CPU: circuit discovery side by side: EAP, EAP-IG, exact edge patching and ACDC.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_circuits_cpu.py [--n 32] [--repeats 3]

On the shipped toy models' IOI prompts (held-out, one length per batch, labels IO / S,
metric the logit difference), for the layer and the head graph (Mamba-1: 4 channel groups
per layer), this times every method in one run, interleaved (``_timing.interleaved``):

- ``EAP``: one forward and one backward per batch (``attribute(method="EAP")``);
- ``EAP-IG``: 5 interpolation steps;
- ``exact``: one patched forward per edge and batch (``attribute(method="exact")``);
- ``ACDC``: the KL objective at threshold 0.01, one patched forward per edge and batch.

and reports each method's median time and its ratio to EAP's in the same round. Then the
quality of what each finds at the same size: ACDC keeps k edges; each attribution method's
top-k edges (by |score|) are evaluated with ``faithfulness`` (logit difference), next to
ACDC's circuit. Writes ``<out>.json`` / ``<out>.md`` (default ``benchmarks/results/circuits_cpu``).
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

METHODS = ("EAP", "EAP-IG", "exact", "ACDC")


def ioi_batches(model, n: int):
    from tl_mamba.circuits import task_batches

    return task_batches(model, "ioi", n=n, seed=0)


def graph_of(model, level: str):
    from tl_mamba.circuits import Graph

    groups = 4 if level == "head" and model.cfg.family == "mamba1" else None
    return Graph.from_model(model, level, channel_groups=groups)


def run_method(model, level, batches, method):
    """The graph each method leaves: scored (attribution) or pruned (ACDC)."""
    from tl_mamba.circuits import acdc, attribute, logit_diff

    graph = graph_of(model, level)
    if method == "ACDC":
        return acdc(model, graph, batches, threshold=0.01, quiet=True)
    steps = {"EAP-IG": 5}.get(method)
    return attribute(model, graph, batches, None, logit_diff, method=method, ig_steps=steps, quiet=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32, help="IOI prompts (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="8 prompts, one round, layer graphs (a smoke run)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "results" / "circuits_cpu"))
    args = parser.parse_args(argv)
    levels = ("layer",) if args.quick else ("layer", "head")
    if args.quick:
        args.n, args.repeats = 8, 1
    torch.set_num_threads(args.threads)
    import tl_mamba
    from tl_mamba.circuits import faithfulness, logit_diff

    results = {"date": _dt.date.today().isoformat(), "machine": machine_info(), "revision": package_revision(),
               "n_prompts": args.n, "repeats": args.repeats, "rows": []}
    lines = [f"# Circuit discovery on CPU ({results['date']}, {results['machine']['cpu']}, "
             f"{torch.get_num_threads()} thread(s), {args.n} IOI prompts, median of {args.repeats} rounds)", "",
             "| model | graph | edges | method | time | × EAP | k | faithfulness of k edges |",
             "|---|---|---|---|---|---|---|---|"]
    for name in ("toy-mamba2", "toy-mamba"):
        model = tl_mamba.from_pretrained(name)
        batches = list(ioi_batches(model, args.n))
        for level in levels:
            print(f"{name} {level} graph", flush=True)
            timings = interleaved({m: (lambda m=m: run_method(model, level, batches, m)) for m in METHODS},
                                  repeats=args.repeats, warmup=0, log=print)
            found = {m: run_method(model, level, batches, m) for m in METHODS}
            k = found["ACDC"].count_included_edges()
            for method in METHODS:
                graph = found[method]
                if method != "ACDC":
                    graph.apply_topn(k, prune=False)  # the same size as ACDC's circuit
                value = faithfulness(model, graph, batches, None, logit_diff, quiet=True)
                row = {"model": name, "graph": level, "edges": len(graph.edges), "method": method,
                       "seconds": timings.median(method), "vs_eap": timings.paired_ratio(method, "EAP"),
                       "k": k, "faithfulness": value}
                results["rows"].append(row)
                lines.append(f"| {name} | {level} | {row['edges']} | {method} | {row['seconds']:.2f} s | "
                             f"{row['vs_eap']:.1f} | {k} | {value:.3f} |")
                print(lines[-1], flush=True)
    out = write_results(args.out, results, "\n".join(lines))
    print(f"wrote {out}.json and {out}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
