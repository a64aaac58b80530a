"""CPU: loading a checkpoint, ours against transformers', time and peak memory.

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_loading_cpu.py                # 130m, 370m widths
    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_loading_cpu.py --sizes 1.4b    # 5.5 GB in fp32

For each size a random transformers model of the real checkpoint's widths (Mamba-1:
mamba-130m, -370m, -1.4b; Mamba-2: mamba2-130m) is saved twice into a temporary folder:
in the transformers layout (``model.safetensors``) and, through our ``save_pretrained``, in
the mamba_ssm layout (``pytorch_model.bin``, what the ``state-spaces`` checkpoints hold).
Every load then runs in a fresh Python process, so each starts with nothing allocated and
its peak resident memory is its own (the kernel's high-water mark, reset before the load,
less the resident memory before it); the files are in the page cache after the first round, for every contender
alike. Contenders, in a rotating order each round:

- ``hf``: ``MambaForCausalLM.from_pretrained(transformers folder)`` (``Mamba2ForCausalLM``);
- ``ours_transformers``: ``tl_mamba.from_pretrained(transformers folder)``;
- ``ours_mamba_ssm``: ``tl_mamba.from_pretrained(mamba_ssm folder)``;
- ``random_init``: ``HookedMamba(cfg)``, a model of the same widths with random weights:
  what a loader that builds the model first and copies the weights in would spend before
  reading anything.

The loaded models' logits are checked against transformers' on a few tokens first (the
largest difference relative to the largest logit is reported).
Each process times the load, then the first forward on 8 tokens: transformers' safetensors
stay mapped from the file and are read only then, so the time to the first logits is what
compares loaders. That forward reads every weight but the embedding rows its tokens do not
use, which an untied model (``Mamba2Config``'s default) then never reads. Reported: the medians over the rounds of both
times and of the peak memory over both, and the paired ratio of each of ours to ``hf`` in
time to the first logits. Writes ``<out>.json`` / ``<out>.md`` (default
``benchmarks/results/loading_cpu``).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _env import machine_info, package_revision, write_results  # noqa: E402
from _setup import Mamba2Shapes, Shapes, build_hf, build_hf_mamba2  # noqa: E402

#: the checkpoints' widths (vocabularies padded as the checkpoints' are)
SIZES = {
    "130m": Shapes(d_model=768, n_layers=24, vocab=50280),
    "370m": Shapes(d_model=1024, n_layers=48, vocab=50280),
    "1.4b": Shapes(d_model=2048, n_layers=48, vocab=50280),
    "mamba2-130m": Mamba2Shapes(d_model=768, n_layers=24, vocab=50288),
    "toy": Shapes(d_model=64, n_layers=2, vocab=512),  # --quick
}
CONTENDERS = ("hf", "ours_transformers", "ours_mamba_ssm", "random_init")


def is_mamba2(size: str) -> bool:
    return isinstance(SIZES[size], Mamba2Shapes)


def hf_model(size: str):
    """A random transformers model of ``size``'s widths (float32, eval)."""
    return build_hf_mamba2(SIZES[size]) if is_mamba2(size) else build_hf(SIZES[size])


def worker(contender: str, folder: str, size: str) -> dict:
    """One load in this (fresh) process: seconds and peak resident bytes above the start."""
    import time

    from _timing import timed_call

    torch.set_num_threads(1)
    import transformers

    import tl_mamba

    if contender == "hf":
        cls = transformers.Mamba2ForCausalLM if is_mamba2(size) else transformers.MambaForCausalLM
        load = lambda: cls.from_pretrained(folder)  # noqa: E731
    elif contender == "random_init":
        cfg = tl_mamba.from_pretrained(folder).cfg  # read first (and freed): only the build is measured
        load = lambda: (tl_mamba.HookedMamba2 if is_mamba2(size) else tl_mamba.HookedMamba)(cfg)  # noqa: E731
    else:
        load = lambda: tl_mamba.from_pretrained(folder)  # noqa: E731
    tokens = torch.randint(0, SIZES[size].vocab, (1, 8), generator=torch.Generator().manual_seed(0))

    def load_and_run():
        start = time.perf_counter()
        model = load()
        loaded = time.perf_counter()
        with torch.no_grad():  # the first forward reads every weight (a mapped file's pages too)
            model(tokens)
        return model, loaded - start

    (model, seconds), to_logits, _, _, peak = timed_call(load_and_run)
    assert sum(p.numel() for p in model.parameters()) > 0
    return {"seconds": seconds, "to_logits_seconds": to_logits, "peak_bytes": peak}


def run_worker(contender: str, folder: pathlib.Path, size: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, __file__, "--worker", contender, str(folder), size], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{contender} on {folder} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_logits(size: str, hf, folders: dict) -> float:
    """Largest |Δ logits| of our two loads against transformers' model, on 8 tokens, relative to
    the largest |logit| (random weights at 48 layers give logits in the hundreds)."""
    import tl_mamba

    tokens = torch.randint(0, SIZES[size].vocab, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
        worst = 0.0
        for folder in folders.values():
            ours = tl_mamba.from_pretrained(folder)
            worst = max(worst, float((ours(tokens) - expected).abs().max()))
    return worst / float(expected.abs().max())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="130m,370m,mamba2-130m", help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="toy widths, one round (checks that it runs)")
    parser.add_argument("--out", type=pathlib.Path, default=HERE / "results" / "loading_cpu")
    parser.add_argument("--worker", nargs=3, metavar=("CONTENDER", "FOLDER", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return 0
    sizes = ["toy"] if args.quick else args.sizes.split(",")
    repeats = 1 if args.quick else args.repeats
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; known: {', '.join(SIZES)}")
    torch.set_num_threads(1)
    import tl_mamba

    rows, lines = [], []
    for size in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folders = {"transformers": pathlib.Path(tmp) / "transformers", "mamba_ssm": pathlib.Path(tmp) / "mamba_ssm"}
            hf = hf_model(size)
            hf.save_pretrained(folders["transformers"])
            tl_mamba.from_hf(hf).save_pretrained(folders["mamba_ssm"])
            worst = check_logits(size, hf, folders)
            n_params = sum(p.numel() for p in hf.parameters())
            del hf
            where = {"hf": folders["transformers"], "ours_transformers": folders["transformers"],
                     "ours_mamba_ssm": folders["mamba_ssm"], "random_init": folders["mamba_ssm"]}
            samples = {c: [] for c in CONTENDERS}
            for round_ in range(repeats):
                order = CONTENDERS[round_ % len(CONTENDERS):] + CONTENDERS[:round_ % len(CONTENDERS)]
                for contender in order:
                    samples[contender].append(run_worker(contender, where[contender], size))
                    print(f"{size} round {round_}: {contender} {samples[contender][-1]['seconds']:.2f} s", flush=True)
        row = {"size": size, "params": n_params, "max_rel_diff_logits": worst}
        for c in CONTENDERS:
            for key in ("seconds", "to_logits_seconds", "peak_bytes"):
                row[f"{c}_{key}"] = statistics.median(s[key] for s in samples[c])
        for c in CONTENDERS[1:]:
            row[f"{c}_over_hf"] = statistics.median(
                a["to_logits_seconds"] / b["to_logits_seconds"] for a, b in zip(samples[c], samples["hf"]))
        rows.append(row)
        lines.append(f"| {size} ({n_params / 1e6:.0f}M) | " + " | ".join(
            f"{row[f'{c}_seconds']:.2f} / {row[f'{c}_to_logits_seconds']:.2f}"
            + (f" ({row[f'{c}_over_hf']:.2f}×)" if c != "hf" else "")
            + f", {row[f'{c}_peak_bytes'] / 2**30:.2f} GiB" for c in CONTENDERS) + f" | {worst:.1e} |")
    header = ("| widths | transformers `from_pretrained` | ours, transformers layout | ours, mamba_ssm layout "
              "| random init alone (`HookedMamba(cfg)`) | max \\|Δ logits\\| / max \\|logit\\| |\n|---|---|---|---|---|---|\n")
    markdown = ("load s / load + first forward (8 tokens) s (the latter × transformers', paired), peak resident "
                f"memory above the process's start over both; median of {repeats} fresh processes each\n\n"
                + header + "\n".join(lines) + "\n")
    results = {"date": _dt.date.today().isoformat(), "revision": package_revision(), "machine": machine_info(),
               "rows": rows}
    write_results(args.out, results, markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
