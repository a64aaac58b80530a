"""Build the contenders of the CPU benchmark, offline, from one random transformers model.

Everything here is in memory or in a temporary directory: no download, no hub
access. The three models hold identical weights:

- ``hf``: a random-init ``transformers.MambaForCausalLM`` in eval mode (its torch
  path; with no ``mamba_ssm`` installed it runs a sequential Python loop over
  positions).
- ``ours``: ``HookedMamba.from_hf(hf)``.
- ``bridge``: TransformerLens 4.x ``TransformerBridge.boot_transformers`` around a
  deep copy of ``hf`` (the bridge swaps its own components into the model it
  wraps, so it gets a copy and ``hf`` stays a plain transformers model).
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch


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


def build_ours(hf):
    """``HookedMamba.from_hf(hf)``, torch backend, eval mode."""
    from tl_mamba import HookedMamba

    model = HookedMamba.from_hf(hf)
    model.eval()
    model.set_backend("torch")
    return model


def build_bridge(hf):
    """A TransformerLens 4.x ``TransformerBridge`` around a deep copy of ``hf``."""
    from transformer_lens.model_bridge import TransformerBridge

    with tempfile.TemporaryDirectory(prefix="tl_mamba_bench_tok_") as directory:
        bridge = TransformerBridge.boot_transformers(
            "random-mamba-130m-widths", hf_model=copy.deepcopy(hf), device="cpu", tokenizer=make_tokenizer(directory)
        )
    bridge.eval()
    return bridge


def bridge_mixers(bridge):
    """The bridge's ``SSMMixerBridge`` of every block."""
    return [block.mixer for block in bridge.blocks]


def set_eager_scan(bridge, on: bool) -> None:
    """Switch the bridge's opt-in eager Python scan (the only path that fires ``hook_ssm_state``).

    ``eager_scan`` is a plain attribute of each mixer (``SSMStateHookMixin``); it is
    honoured only for prefill without a recurrent cache, so calls that want the
    state must also pass ``use_cache=False``.
    """
    for mixer in bridge_mixers(bridge):
        mixer.eager_scan = on
