"""Synthetic tasks, tokenizer and training of the shipped toy models.

    from tl_mamba.toy import make_dataset, evaluate, build_tokenizer
    prompts = make_dataset("ioi", "heldout", 100, seed=0)
    prompts[0].text, prompts[0].answer, prompts[0].spans["S2"], prompts[0].corrupted

Tasks: ``facts`` (factual recall about invented multi-word entities), ``ioi``
(indirect object identification, with ABC corruptions) and ``needle`` (key-value
recall in filler, up to 512 tokens and beyond). See :mod:`tl_mamba.toy.tasks`.
"""

from tl_mamba.toy.tasks import (
    TASKS,
    Prompt,
    encode_prompts,
    entities,
    evaluate,
    fact,
    make_dataset,
    make_facts,
    make_ioi,
    make_needle,
    mixed_training_stream,
    needle_accuracy_by_length,
    training_batch,
)
from tl_mamba.toy.tokenizer import build_tokenizer, hf_tokenizer, load_tokenizer, save_tokenizer, vocab_size

__all__ = [
    "TASKS",
    "Prompt",
    "build_tokenizer",
    "encode_prompts",
    "entities",
    "evaluate",
    "fact",
    "hf_tokenizer",
    "load_tokenizer",
    "make_dataset",
    "make_facts",
    "make_ioi",
    "make_needle",
    "mixed_training_stream",
    "needle_accuracy_by_length",
    "save_tokenizer",
    "training_batch",
    "vocab_size",
]
