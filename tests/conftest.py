"""Shared fixtures: tiny configs and an offline word-level tokenizer.

Nothing here downloads anything: the tokenizer is built in memory with the
``tokenizers`` library and wrapped in transformers' ``PreTrainedTokenizerFast``.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels run in Triton's CPU interpreter. The switch is read
# when triton.language is first imported (its own @jit functions are built then), and
# torch or transformers may import triton before any test module runs, so it is set
# here, before anything else is imported. Set TRITON_INTERPRET=0 to compile on a GPU.
if "TRITON_INTERPRET" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["TRITON_INTERPRET"] = "1"
# Under pytest-xdist (``-n 2``) each worker gets one thread, its subprocesses too: two
# workers with two OpenMP threads each would oversubscribe a 2-core machine, where spin
# contention makes tiny tensors up to 100x slower (see ``one_thread`` below).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)  # in case something imported torch before OMP_NUM_THREADS was set

from tl_mamba import HookedMamba, HookedMambaConfig

WORDS = (
    "the a cat dog sat on mat and then ran to park when mary john went store gave drink "
    "capital of is paris france key value red blue green one two three four five"
).split()


def make_tokenizer():
    """A word-level tokenizer: ``<bos>`` 0, ``<eos>`` 1, ``<pad>`` 2, ``<unk>`` 3, then WORDS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, "<unk>": 3}
    for word in WORDS:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny tensors: OpenMP spin contention on a busy 2-core
    machine makes them up to 100x slower. A module uses it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def tiny_config(**overrides) -> HookedMambaConfig:
    """A small random Mamba-1 config (odd sizes on purpose)."""
    base = dict(n_layers=2, d_model=24, d_vocab=48, d_state=5, d_conv=3, dt_rank=3, seed=0,
                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    base.update(overrides)
    return HookedMambaConfig(**base)


@pytest.fixture
def tiny_model(tokenizer):
    torch.manual_seed(0)
    model = HookedMamba(tiny_config(), tokenizer=tokenizer)
    model.eval()
    return model


def run_quick_benchmark(script: str, out, timeout: int = 600) -> dict:
    """Run ``benchmarks/<script> --quick --out <out>`` in a subprocess (offline, this checkout on
    the path), assert it exited 0 (showing its stderr's tail otherwise), and return the results
    JSON it wrote to ``<out>.json``."""
    import json
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parent.parent
    out = pathlib.Path(out)
    run = subprocess.run([sys.executable, f"benchmarks/{script}", "--quick", "--out", str(out)], cwd=root,
                         env=dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root)), capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.with_suffix(".json").read_text())


class RowCounter:
    """Rows of every forward, read at the embedding module (every forward of the model runs it,
    also when hook_embed's output is replaced): ``with RowCounter(model) as rows: ...``."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def __enter__(self):
        self.handle = self.model.embed.register_forward_hook(lambda module, inp, out: self.rows.append(out.shape[0]))
        return self.rows

    def __exit__(self, *exc):
        self.handle.remove()
