"""The toy models' word-level tokenizer, built offline with the ``tokenizers`` library.

One token per word: a ``WordLevel`` model over every word the task generators can
emit (:func:`tl_mamba.toy.vocab.all_words`, sorted so the ids are stable), the
``Whitespace`` pre-tokenizer, and a decoder that joins the words with single
spaces, so ``decode(encode(text)) == text`` for every generated prompt. Special
tokens: ``<bos>`` 0, ``<eos>`` 1, ``<pad>`` 2, ``<unk>`` 3. With special tokens
on (the default of ``Tokenizer.encode`` and of calling a transformers tokenizer) a
``<bos>`` is put in front, so the token positions of a prompt count the BOS as 0,
as the tasks' spans do. ``HookedMamba.to_tokens`` tokenizes without special tokens
and prepends the BOS itself, which gives the same ids.

    tok = build_tokenizer()                  # tokenizers.Tokenizer
    save_tokenizer("some/dir")               # tokenizer.json + tokenizer_config.json + special_tokens_map.json
    hf = load_tokenizer("some/dir")          # transformers.PreTrainedTokenizerFast
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Union

from tl_mamba.toy.vocab import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, vocabulary

PathLike = Union[str, Path]

#: The tokenizer's ``model_max_length``: none, as for Mamba's released tokenizers (transformers'
#: "very large" value). A recurrent model has no position limit, and a smaller value (it was 1024)
#: makes transformers warn of "indexing errors" for the longer needle prompts, which index nothing.
MODEL_MAX_LENGTH = int(1e30)

SPECIAL_TOKENS_MAP = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}


def build_tokenizer():
    """The word-level ``tokenizers.Tokenizer`` of the toy tasks (built in memory, nothing downloaded)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece with a prefix no word has: every token after the first gets one space
    # in front; cleanup=False keeps " ," and " ." as they are (exact round trip).
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def vocab_size() -> int:
    """Number of tokens (specials included)."""
    return len(vocabulary())


def tokenizer_config() -> Dict:
    """``tokenizer_config.json``: written by hand so that older and newer transformers read it alike."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **SPECIAL_TOKENS_MAP,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def save_tokenizer(path_dir: PathLike) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``path_dir``.

    The directory then loads with ``transformers.AutoTokenizer.from_pretrained(dir,
    local_files_only=True)``, ``PreTrainedTokenizerFast(tokenizer_file=dir/"tokenizer.json")``
    or :func:`load_tokenizer`. Returns the directory.
    """
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    (path / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP, indent=2) + "\n", encoding="utf-8")
    return path


def load_tokenizer(path_dir: PathLike):
    """The saved tokenizer as a ``transformers.PreTrainedTokenizerFast`` with bos/eos/pad/unk set.

    ``path_dir`` is a directory written by :func:`save_tokenizer` (or a
    ``tokenizer.json`` file itself).
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path_dir)
    file = path if path.is_file() else path / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    config = tokenizer_config()
    return PreTrainedTokenizerFast(
        tokenizer_file=str(file),
        **SPECIAL_TOKENS_MAP,
        model_max_length=config["model_max_length"],
        padding_side=config["padding_side"],
        clean_up_tokenization_spaces=False,
        model_input_names=config["model_input_names"],
    )


def hf_tokenizer():
    """The toy tokenizer wrapped as a ``transformers.PreTrainedTokenizerFast`` (in memory)."""
    from transformers import PreTrainedTokenizerFast

    config = tokenizer_config()
    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        **SPECIAL_TOKENS_MAP,
        model_max_length=config["model_max_length"],
        padding_side=config["padding_side"],
        clean_up_tokenization_spaces=False,
        model_input_names=config["model_input_names"],
    )
