"""Clean/corrupted batches of the toy tasks, and the logit-difference metric, for circuit work.

    batches = task_batches(model, "ioi", n=64)          # [(clean, corrupted, labels), ...]
    attribute(model, graph, batches, None, logit_diff, method="EAP-IG")
"""

from __future__ import annotations

from collections import defaultdict
from typing import List, Tuple

import torch
from torch import Tensor

CONTRAST = {"ioi": "S", "facts": None}  # the wrong answer each task's metric compares against


def task_batches(model, task: str = "ioi", n: int = 64, seed: int = 0, split: str = "heldout",
                 batch_size: int = 32) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Clean prompts of a toy task with their corrupted counterparts, grouped by length.

    Returns batches ``(clean [b, p], corrupted [b, p], labels [b, 2])``: ``labels[:, 0]``
    is the right answer and ``labels[:, 1]`` the contrasting one (IOI: the subject S;
    facts: the corrupted entity's attribute). IOI's ABC corruption and the facts
    corruption keep the length, so each pair has one shape; prompts of different lengths
    go to different batches.
    """
    from tl_mamba.toy import make_dataset

    if task not in CONTRAST:
        raise ValueError(f"task {task!r} has no clean/corrupted pairs: choose from {sorted(CONTRAST)}")
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer: task_batches needs one to encode the prompts")
    by_length = defaultdict(list)
    for prompt in make_dataset(task, split, n, seed=seed):
        by_length[prompt.n_tokens].append(prompt)
    device = model.cfg.device
    batches = []
    for length in sorted(by_length):
        group = by_length[length]
        for start in range(0, len(group), batch_size):
            part = group[start:start + batch_size]
            clean = torch.cat([model.to_tokens(p.text) for p in part])
            corrupted = torch.cat([model.to_tokens(p.corrupted) for p in part])
            wrong = [p.meta[CONTRAST[task]] if CONTRAST[task] else p.corrupted_answer for p in part]
            labels = torch.tensor([[model.to_single_token(p.answer), model.to_single_token(w)]
                                   for p, w in zip(part, wrong)])
            if clean.shape != corrupted.shape:
                raise ValueError(f"a {task} prompt and its corruption tokenize to different lengths")
            batches.append((clean.to(device), corrupted.to(device), labels.to(device)))
    return batches


def logit_diff(logits: Tensor, labels: Tensor) -> Tensor:
    """``[b]``: logit of ``labels[:, 0]`` minus logit of ``labels[:, 1]`` at the last position."""
    last = logits[:, -1]
    return last.gather(1, labels[:, :1])[:, 0] - last.gather(1, labels[:, 1:2])[:, 0]
