"""What a benchmark records about where it ran: the machine, the packages and the checkout."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import subprocess

import torch

HERE = pathlib.Path(__file__).resolve().parent

# environment variables that change the numbers; recorded with the results
ENV_RECORDED = ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TL_MAMBA_BACKEND", "ATEN_CPU_CAPABILITY")


def machine_info() -> dict:
    model_name = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    from importlib.metadata import version as _version

    import transformers

    return {
        "cpu": model_name,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": _version("transformer-lens"),
        "python": platform.python_version(),
        "env": {k: os.environ[k] for k in ENV_RECORDED if k in os.environ},
    }


def triton_toolchain(capability: int) -> dict:
    """Triton's version and that of the ptxas it uses for ``capability`` (e.g. 90): the
    registers a kernel gets, so its speed, change with them (docs/performance.md,
    "Compiled without a GPU"). Empty where triton or its NVIDIA backend is missing."""
    try:
        import re

        import triton
        from triton.backends.nvidia.compiler import get_ptxas_version

        release = re.search(r"release ([\d.]+)", get_ptxas_version(capability))
        return {"triton": triton.__version__, "ptxas": release.group(1) if release else "unknown"}
    except Exception:  # noqa: BLE001 - best effort: a record, never a reason to stop a benchmark
        return {}


def package_revision() -> str:
    """The checkout's commit, with ``+dirty`` when ``tl_mamba/`` has uncommitted changes."""
    root = HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "tl_mamba"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_results(out, results: dict, markdown: str) -> pathlib.Path:
    """Write ``<out>.json`` (the results) and ``<out>.md`` (the table), creating the folder; returns ``out``."""
    out = pathlib.Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown if markdown.endswith("\n") else markdown + "\n")
    return out
