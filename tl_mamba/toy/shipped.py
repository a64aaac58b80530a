"""The toy models shipped inside the package, by name (``tl_mamba.from_pretrained("toy-mamba2")``).

Each lives in ``tl_mamba/toy/models/<name>/`` in the mamba_ssm layout, so the real
loading path serves it, with its ``metrics.json`` (held-out accuracies) and
``train_log.json`` from ``python -m tl_mamba.toy.train``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

MODELS_DIR = Path(__file__).resolve().parent / "models"


def shipped_models() -> Dict[str, Path]:
    """Name → directory of every shipped model."""
    if not MODELS_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(MODELS_DIR.iterdir()) if (p / "config.json").is_file()}


def shipped_model_dir(name: str) -> Optional[Path]:
    """The directory of the shipped model ``name``, or None."""
    return shipped_models().get(name)


def shipped_metrics(name: str) -> dict:
    """The held-out accuracies recorded when ``name`` was trained."""
    path = MODELS_DIR / name / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else {}
