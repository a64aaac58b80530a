"""Build the contenders of the CPU benchmarks, offline, from one random transformers model.

Everything here is in memory or in a temporary directory: no download, no hub
access. The three models hold identical weights:

- ``hf``: a random-init transformers model in eval mode, on its torch path:
  ``MambaForCausalLM`` (``build_hf``; with no ``mamba_ssm`` installed it runs a
  sequential Python loop over positions) or ``Mamba2ForCausalLM``
  (``build_hf_mamba2``; with no ``mamba_ssm`` / ``kernels`` it runs the chunked
  SSD form in plain torch).
- ``ours``: ``HookedMamba.from_hf(hf)`` or ``HookedMamba2.from_hf(hf)``
  (``build_ours`` picks the class from the config's ``model_type``).
- ``bridge``: TransformerLens 4.x ``TransformerBridge.boot_transformers`` around a
  deep copy of ``hf`` (the bridge swaps its own components into the model it
  wraps, so it gets a copy and ``hf`` stays a plain transformers model).
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch


@contextlib.contextmanager
def patched(settings):
    """Inside, each ``(module, name, value)`` of ``settings`` is set (a kernel's tile, precision or
    route switch); the previous values come back on leaving, also after an error."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in settings]
    for module, name, value in settings:
        setattr(module, name, value)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


@contextlib.contextmanager
def override_route(route: str):
    """Inside, ``hook_h`` edits take ``route`` (``"segments"`` or ``"recurrence"``) whatever their
    number (``tl_mamba.ops.state_override.scan_with_override``'s thresholds, set and restored)."""
    import tl_mamba.ops.state_override as so

    if route not in ("segments", "recurrence"):
        raise ValueError(f"route must be 'segments' or 'recurrence', got {route!r}")
    saved = so.RECURRENCE_AFTER_EDITS, so.RECURRENCE_SHARE_NO_GRAD
    so.RECURRENCE_AFTER_EDITS, so.RECURRENCE_SHARE_NO_GRAD = (10**9, 1.0) if route == "segments" else (0, 0.0)
    try:
        yield
    finally:
        so.RECURRENCE_AFTER_EDITS, so.RECURRENCE_SHARE_NO_GRAD = saved


@dataclass
class Shapes:
    """130m widths with fewer layers: d_model 768, d_inner 1536, d_state 16, dt_rank 48, d_conv 4."""

    d_model: int = 768
    d_state: int = 16
    n_layers: int = 4
    expand: int = 2
    d_conv: int = 4
    vocab: int = 8192

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def dt_rank(self) -> int:
        return -(-self.d_model // 16)  # ceil(d_model / 16), as mamba_ssm and transformers


@dataclass
class Mamba2Shapes:
    """Mamba-2 130m widths with fewer layers: d_model 768, 24 heads of 64, d_state 128, 1 group, d_conv 4."""

    d_model: int = 768
    n_heads: int = 24
    d_head: int = 64
    d_state: int = 128
    n_groups: int = 1
    n_layers: int = 4
    expand: int = 2
    d_conv: int = 4
    vocab: int = 8192
    chunk_size: int = 256  # mamba2-130m's; our model reads it from the transformers config

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model


def make_tokenizer(directory: str):
    """A 4-token word-level tokenizer (``<bos> <eos> <pad> <unk>``), built offline in ``directory``.

    The benchmark feeds token tensors, so the vocabulary does not matter; the
    TransformerBridge insists on a tokenizer and, when it has a BOS token, reloads
    it with ``AutoTokenizer.from_pretrained(name_or_path, add_bos_token=True)``.
    Saving it to ``directory`` and loading it back gives it a local
    ``name_or_path`` so that reload works offline (keep the directory until the
    bridge is booted).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.save_pretrained(directory)
    return AutoTokenizer.from_pretrained(directory)


def build_hf(shapes: Shapes, seed: int = 0):
    """A random transformers ``MambaForCausalLM`` in eval mode, float32, on the CPU."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(seed)
    config = MambaConfig(
        hidden_size=shapes.d_model,
        state_size=shapes.d_state,
        num_hidden_layers=shapes.n_layers,
        expand=shapes.expand,
        conv_kernel=shapes.d_conv,
        vocab_size=shapes.vocab,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    hf = MambaForCausalLM(config).eval()
    assert hf.config.intermediate_size == shapes.d_inner and int(hf.config.time_step_rank) == shapes.dt_rank
    return hf


def build_hf_mamba2(shapes: Mamba2Shapes, seed: int = 0):
    """A random transformers ``Mamba2ForCausalLM`` in eval mode, float32, on the CPU."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(seed)
    config = Mamba2Config(
        hidden_size=shapes.d_model,
        num_heads=shapes.n_heads,
        head_dim=shapes.d_head,
        state_size=shapes.d_state,
        n_groups=shapes.n_groups,
        expand=shapes.expand,
        conv_kernel=shapes.d_conv,
        num_hidden_layers=shapes.n_layers,
        vocab_size=shapes.vocab,
        chunk_size=shapes.chunk_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    hf = Mamba2ForCausalLM(config).eval()
    assert shapes.n_heads * shapes.d_head == shapes.d_inner, "n_heads * d_head must equal expand * d_model"
    return hf


def build_ours(hf):
    """``HookedMamba.from_hf(hf)`` (``HookedMamba2`` for a Mamba-2 model), torch backend, eval mode."""
    from tl_mamba import HookedMamba, HookedMamba2

    cls = HookedMamba2 if getattr(hf.config, "model_type", None) == "mamba2" else HookedMamba
    model = cls.from_hf(hf)
    model.eval()
    model.set_backend("torch")
    return model


def build_bridge(hf, name: str = "random-mamba-130m-widths"):
    """A TransformerLens 4.x ``TransformerBridge`` around a deep copy of ``hf`` (``name`` is only a label)."""
    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory(prefix="tl_mamba_bench_tok_") as directory:
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=copy.deepcopy(hf), device="cpu", tokenizer=make_tokenizer(directory)
        )
    bridge.eval()
    return bridge


def bridge_mixers(bridge):
    """The bridge's mixer of every block (``SSMMixerBridge``; ``SSM2MixerBridge`` for Mamba-2)."""
    return [block.mixer for block in bridge.blocks]


def set_eager_scan(bridge, on: bool, layers=None) -> None:
    """Switch the bridge's opt-in eager Python scan (the only path that fires ``hook_ssm_state``).

    ``eager_scan`` is a plain attribute of each mixer (``SSMStateHookMixin``, shared
    by the Mamba-1 and Mamba-2 mixers); it is honoured only for prefill without a
    recurrent cache, so calls that want the state must also pass ``use_cache=False``.
    ``layers`` (block indices) turns it on in those blocks only and off in the
    others; default every block. ``on=False`` turns it off everywhere.
    """
    for index, mixer in enumerate(bridge_mixers(bridge)):
        mixer.eager_scan = bool(on) and (layers is None or index in layers)
