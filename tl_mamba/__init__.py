"""tl_mamba: Mamba-1 and Mamba-2 as first-class TransformerLens models.

    import tl_mamba
    model = tl_mamba.from_pretrained("path/or/hub-id")      # picks the class
    logits, cache = model.run_with_cache("The capital of France is")
"""

import torch

from tl_mamba.backends import BACKENDS, BackendUnavailableError
from tl_mamba.cache import MambaActivationCache
from tl_mamba.config import HookedMambaConfig
from tl_mamba.errors import NotAnIndexError, OutOfRangeError
from tl_mamba.models.base import RecurrentState
from tl_mamba.models.tokens import UnknownTokenWarning
from tl_mamba.models.mamba import HookedMamba
from tl_mamba.models.mamba2 import HookedMamba2
from tl_mamba.hidden_attention import conv_attention, hidden_attention
from tl_mamba.knockout import Knockout

__version__ = "0.1.0"


def from_pretrained(name_or_path, device=None, dtype=torch.float32, **kwargs):
    """Load a Mamba checkpoint (hub id or local directory) with the class its config calls for.

    mamba_ssm and transformers layouts are both read; Mamba-1 and Falcon-Mamba
    give a ``HookedMamba``, Mamba-2 a ``HookedMamba2``. ``dtype``: a torch dtype, its name
    (``"bfloat16"``), or ``"auto"`` (the checkpoint's own); None means float32.
    """
    from tl_mamba.loading import load_any

    return load_any(name_or_path, device=device, dtype=torch.float32 if dtype is None else dtype, **kwargs)


def from_hf(hf_model, tokenizer=None, **kwargs):
    """Convert an in-memory transformers model with the class its config calls for.

    ``MambaForCausalLM`` and ``FalconMambaForCausalLM`` give a ``HookedMamba``,
    ``Mamba2ForCausalLM`` a ``HookedMamba2``; the weights are copied. Keywords as
    ``HookedMamba.from_hf`` (``device``, ``dtype``, config overrides).
    """
    from tl_mamba.loading import from_hf_any

    return from_hf_any(hf_model, tokenizer, **kwargs)


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "HookedMamba",
    "HookedMamba2",
    "Knockout",
    "HookedMambaConfig",
    "MambaActivationCache",
    "NotAnIndexError",
    "OutOfRangeError",
    "RecurrentState",
    "UnknownTokenWarning",
    "conv_attention",
    "from_hf",
    "from_pretrained",
    "hidden_attention",
]
