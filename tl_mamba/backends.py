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
    try:
        import triton  # noqa: F401  (is it installed?)
    except ImportError:
        return False
    if torch.device(device if device is not None else "cpu").type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(name: Optional[str], device: torch.device | str | None = None,
                    available: Sequence[str] = ("reference", "torch")) -> str:
    """Map a user-facing backend name to the implementation that will run.

    ``available``: the implementations the op has. ``"auto"`` is the torch path
    everywhere for now; it becomes Triton on CUDA tensors once the kernels are
    validated on a GPU (issue "Triton scan kernels").
    """
    name = validate_backend(name or default_backend())
    if name == "auto":
        return "torch"
    if name == "triton":
        if "triton" not in available:
            raise BackendUnavailableError(
                "There is no Triton kernel for this scan. Use set_backend('torch') (fast, differentiable) "
                "or set_backend('reference')."
            )
        if not triton_usable(device):
            raise BackendUnavailableError(
                "The 'triton' backend needs CUDA tensors (or TRITON_INTERPRET=1, which runs the kernels in "
                "Triton's CPU interpreter, slowly). On CPU use set_backend('torch')."
            )
    return name
