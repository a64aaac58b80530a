"""Clean/corrupted batches of the toy tasks, and the logit-difference metric, for circuit work.

    batches = task_batches(model, "ioi", n=64)          # [(clean, corrupted, labels), ...]
    attribute(model, graph, batches, None, logit_diff, method="EAP-IG")
    needle = task_batches(model, "needle", n=32, length=64)   # key-value retrieval
"""

from __future__ import annotations

from collections import defaultdict
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor

CONTRAST = {"ioi": "S", "facts": None, "needle": None}  # the wrong answer each task's metric compares against


def task_batches(model, task: str = "ioi", n: int = 64, seed: int = 0, split: str = "heldout",
                 batch_size: int = 32, *, length: Optional[Union[int, Tuple[int, int]]] = None,
                 depth: Optional[float] = None, n_pairs: Optional[int] = None,
                 max_pairs: Optional[int] = None, corruption: Optional[str] = None
                 ) -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Clean prompts of a toy task with their corrupted counterparts, grouped by length.

    Returns batches ``(clean [b, p], corrupted [b, p], labels [b, 2])``: ``labels[:, 0]``
    is the right answer and ``labels[:, 1]`` the contrasting one (IOI: the subject S;
    facts: the corrupted entity's attribute; needle: the corrupted prompt's value, which
    is nowhere in the clean prompt). Every corruption keeps the length (IOI's ABC: the
    second subject mention becomes a third name; facts: another entity with as many name
    words; needle: the needle's value replaced), so each pair has one shape; prompts of
    different lengths go to different batches, at most ``batch_size`` prompts each.

    Tasks (:mod:`tl_mamba.toy.tasks`): ``"ioi"``, ``"facts"`` and ``"needle"`` (key-value
    retrieval in a haystack, ``... key zal is 7 . <filler> what is key zal ? it is`` →
    ``7``). The needle's options are :func:`tl_mamba.toy.tasks.make_needle`'s (and
    :func:`tl_mamba.circuits.needle_accuracy`'s), and are refused for the other tasks:

    - ``length``: tokens per prompt, BOS included (default 128), or an inclusive range
      ``(lo, hi)`` drawn per prompt (the batches then hold one length each). Several fixed
      lengths: concatenate the lists of one call per length.
    - ``depth``: where in the haystack the queried pair sits, in [0, 1] (None: random).
    - ``n_pairs``: key-value pairs (the needle and its distractors; default one more per
      24 tokens, up to ``max_pairs``, default 6).

    IOI alone takes ``corruption``: ``"ABC"`` (the default, above) or ``"S2_IO"`` (the second
    subject mention becomes the indirect object, so the corrupted prompt's answer is the
    subject; :func:`tl_mamba.toy.tasks.make_ioi`). ``labels`` stay (IO, S) either way.
    """
    from tl_mamba.toy import make_dataset
    from tl_mamba.toy import vocab as toy_vocab

    if task not in CONTRAST:
        raise ValueError(f"task {task!r} has no clean/corrupted pairs: choose from {sorted(CONTRAST)}")
    if n < 1 or batch_size < 1:
        raise ValueError(f"n and batch_size must be >= 1, got {n} and {batch_size}")
    options = {k: v for k, v in dict(length=length, depth=depth, n_pairs=n_pairs, max_pairs=max_pairs).items()
               if v is not None}
    if task != "needle" and options:
        raise ValueError(f"{sorted(options)} apply to task='needle' only (make_needle's options), not {task!r}")
    if corruption is not None:
        if task != "ioi":
            raise ValueError(f"corruption= applies to task='ioi' only (make_ioi's corruptions), not {task!r}")
        options["corruption"] = corruption
    toy_vocab.check_tokenizer(model.tokenizer, "task_batches")
    by_length = defaultdict(list)  # tokens per prompt -> [(clean [1, p], corrupted [1, p], answer, wrong)]
    for prompt in make_dataset(task, split, n, seed=seed, **options):
        clean, corrupted = model.to_tokens(prompt.text), model.to_tokens(prompt.corrupted)
        if clean.shape != corrupted.shape:
            raise ValueError(f"a {task} prompt and its corruption tokenize to different lengths ({clean.shape[1]} "
                             f"and {corrupted.shape[1]} tokens): {prompt.text!r} / {prompt.corrupted!r}")
        wrong = prompt.meta[CONTRAST[task]] if CONTRAST[task] else prompt.corrupted_answer
        by_length[clean.shape[1]].append((clean, corrupted, prompt.answer, wrong))
    device = model.cfg.device
    batches = []
    for p in sorted(by_length):
        group = by_length[p]
        for start in range(0, len(group), batch_size):
            part = group[start:start + batch_size]
            clean = torch.cat([c for c, _, _, _ in part])
            corrupted = torch.cat([k for _, k, _, _ in part])
            labels = torch.tensor([[model.to_single_token(answer), model.to_single_token(wrong)]
                                   for _, _, answer, wrong in part])
            batches.append((clean.to(device), corrupted.to(device), labels.to(device)))
    return batches


def logit_diff(logits: Tensor, labels: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """``[b]``: logit of ``labels[:, 0]`` minus logit of ``labels[:, 1]`` at the last position.

    ``logits`` ``[b, p, v]``; ``labels`` ``[b, 2]`` token ids (correct, wrong), one row per
    prompt. Anything else raises: labels for fewer prompts would quietly score only those, and
    a metric that takes ``.mean()`` would average the wrong prompts. ``attention_mask`` ``[b, p]``
    (1 at real tokens): read each row's last real token instead, for a right-padded batch (what
    ``model(list_of_strings)`` runs by default); the circuit tools pad on the left and call
    ``logit_diff(logits, labels)``.
    """
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise ValueError(f"logit_diff needs logits [b, p, v], got {_shape_of(logits)}")
    if not isinstance(labels, Tensor) or labels.ndim != 2 or labels.shape[1] != 2:
        raise ValueError(f"logit_diff needs labels [b, 2] (correct id, wrong id per prompt), got {_shape_of(labels)}")
    if labels.shape[0] != logits.shape[0]:
        raise ValueError(f"logit_diff: {labels.shape[0]} label rows for {logits.shape[0]} prompts; give one "
                         "(correct, wrong) pair per prompt")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"logit_diff needs integer token ids as labels, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[-1]):
        raise ValueError(f"logit_diff: label ids must lie in [0, {logits.shape[-1]}) (the logits' vocabulary), "
                         f"got ids from {int(labels.min())} to {int(labels.max())}")
    if attention_mask is None:
        last = logits[:, -1]
    else:
        real = torch.as_tensor(attention_mask, device=logits.device)
        if tuple(real.shape) != tuple(logits.shape[:2]):
            raise ValueError(f"logit_diff: attention_mask must be [b, p] = {list(logits.shape[:2])}, got "
                             f"{_shape_of(real)}")
        if not bool(real.bool().any(1).all()):
            raise ValueError("logit_diff: a row of attention_mask has no real token")
        places = torch.arange(logits.shape[1], device=logits.device)
        end = torch.where(real.bool(), places, -1).max(1).values  # each row's last real token
        last = logits[torch.arange(logits.shape[0], device=logits.device), end]
    return last.gather(1, labels[:, :1])[:, 0] - last.gather(1, labels[:, 1:2])[:, 0]


def _shape_of(value) -> str:
    return f"shape {list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
