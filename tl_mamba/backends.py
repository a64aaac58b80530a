"""Scan-backend selection.

Every model routes its scans through one dispatch function per op
(``tl_mamba.ops.selective_scan.selective_scan`` for Mamba-1). The backend only
changes speed, never results: ``"reference"`` is the plain sequential scan that
every other backend is tested against.

The default comes from the environment variable ``TL_MAMBA_BACKEND`` (``"auto"``
when unset). ``model.set_backend(name)`` overrides it per model.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

BACKENDS = ("auto", "torch", "triton", "reference")
ENV_VAR = "TL_MAMBA_BACKEND"


class BackendUnavailableError(RuntimeError):
    """Raised when a backend is named that cannot run here (yet)."""


def validate_backend(name: str) -> str:
    """Return ``name`` lower-cased, or raise ``ValueError`` naming the valid choices."""
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"Unknown backend {name!r}; choose one of {', '.join(repr(b) for b in BACKENDS)}")
    return name.lower()


def default_backend() -> str:
    """The backend named by ``TL_MAMBA_BACKEND``, or ``"auto"``."""
    value = os.environ.get(ENV_VAR)
    if value is None or value == "":
        return "auto"
    try:
        return validate_backend(value)
    except ValueError as err:
        raise ValueError(f"{ENV_VAR}={value!r} is not a backend: {err}") from None


def triton_usable(device) -> bool:
    """Whether Triton kernels can run on tensors of ``device``: CUDA, or CPU under
    ``TRITON_INTERPRET=1`` (Triton's interpreter: exact but slow, for tests)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:  # installed? (without importing it: see the kernels' docs)
        return False
    if torch.device(device if device is not None else "cpu").type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


_TRITON_FAILED: Optional[str] = None  # set when a Triton kernel failed under "auto"

#: CUDA's out-of-memory error: ``torch.OutOfMemoryError`` in recent torch, ``torch.cuda.OutOfMemoryError`` in older
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def resolve_backend(name: Optional[str], device: torch.device | str | None = None,
                    available: Sequence[str] = ("reference", "torch")) -> str:
    """Map a user-facing backend name to the implementation that will run.

    ``available``: the implementations the op has. ``"auto"`` is Triton on CUDA
    tensors (when triton is installed and the op has a kernel) and the torch path
    everywhere else.
    """
    name = validate_backend(name or default_backend())
    if name == "auto":
        on_cuda = torch.device(device if device is not None else "cpu").type == "cuda"
        if on_cuda and "triton" in available and _TRITON_FAILED is None and triton_usable(device):
            return "triton"
        return "torch"
    if name == "triton":
        if "triton" not in available:
            raise BackendUnavailableError(
                "There is no Triton kernel for this scan. Use set_backend('torch') (fast, differentiable) "
                "or set_backend('reference')."
            )
        if not triton_usable(device):
            # a model without set_backend follows the environment: say so, since nothing in the code chose triton
            from_env = os.environ.get(ENV_VAR, "").strip().lower() == "triton"
            chosen = f" ({ENV_VAR} is set to triton)" if from_env else ""
            raise BackendUnavailableError(
                f"The 'triton' backend{chosen} needs CUDA tensors (or TRITON_INTERPRET=1, which runs the kernels in "
                "Triton's CPU interpreter, slowly). On CPU use set_backend('torch')"
                + (f" or unset {ENV_VAR}." if from_env else ".")
            )
    return name


def pick_implementation(requested: Optional[str], device, implementations: dict):
    """The function that runs a scan for backend ``requested`` on ``device``.

    Under ``"auto"`` a Triton kernel that fails (to compile, say, on a GPU it was never
    run on) where the torch path runs the same call is reported once with a warning and
    replaced by the torch path for the rest of the process; a backend named explicitly
    raises instead. An error the torch path raises too (bad input) is raised, and so is
    running out of GPU memory (the torch path needs more): neither is the kernel's failure.
    (Inside the Triton backend, named or not, its faster kernels fall back to its simpler ones,
    same results, where they fail on a GPU: ``tl_mamba.ops.triton_scan.kernel_or_fallback``.)
    """
    name = resolve_backend(requested, device, available=tuple(implementations))
    impl = implementations[name]
    if name != "triton" or validate_backend(requested or default_backend()) != "auto":
        return impl

    def triton_or_torch(*args, **kwargs):
        global _TRITON_FAILED
        try:
            return impl(*args, **kwargs)
        except OUT_OF_MEMORY:
            raise
        except Exception as err:  # Triton's own (OutOfResources, PTXASError, CompilationError) subclass only this
            import warnings

            result = implementations["torch"](*args, **kwargs)  # raises for what is not the kernel's fault
            _TRITON_FAILED = f"{type(err).__name__}: {err}"
            warnings.warn(f"backend 'auto': the Triton kernel failed ({_TRITON_FAILED}); using the torch backend "
                          "from now on. set_backend('triton') raises the error instead.", RuntimeWarning)
            return result

    return triton_or_torch
