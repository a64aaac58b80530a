"""Train the shipped toy models on the three synthetic tasks.

    python -m tl_mamba.toy.train --arch mamba2 --out toy-mamba2
    python -m tl_mamba.toy.train --arch mamba  --out toy-mamba

Seeded and reproducible (on one device type); logs the loss with a progress bar;
uses a GPU when one is available (``--device``). Options left unset take the
architecture's recipe (:data:`RECIPES`). Each batch holds one task, chosen so that each task gets its share of the
tokens (``--balance tokens``) or of the steps (``--balance steps``), and
needle batches draw their length from a curriculum up to ``--max-needle-len``.
The loss is the cross entropy of the answer token at the last prompt position.
At the end it evaluates held-out accuracy (facts with unseen paraphrases, IOI
with unseen name/template combinations, needle accuracy against length) and
writes the model in the mamba_ssm layout (``config.json``, ``pytorch_model.bin``,
``tokenizer.json``) plus ``metrics.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

#: Architectures of the shipped models (small enough for 2 CPU cores, ≤ 10 MB together).
ARCHS = {
    "mamba": dict(family="mamba1", n_layers=4, d_model=96, d_state=8, d_conv=4, expand=2),
    # chunk_size only sets the torch backend's chunk length (results do not depend on it): with
    # 32, a needle forward and backward (2 threads, 129-244 tokens) took 13-20% less time than
    # with 64, timed alternately in one process (less L x L work, less padding); whole runs did
    # not show it beside the host's drift (docs/toy_models.md)
    "mamba2": dict(family="mamba2", n_layers=4, d_model=128, d_state=32, d_conv=4, expand=2, d_head=32,
                   n_groups=1, chunk_size=32),
}
TASKS = ("facts", "ioi", "needle")

#: Default training options per architecture for a fresh run; every command-line option
#: overrides its entry, and ``--init-from`` ignores ``init`` and ``tie_embeddings`` (it keeps
#: the saved model's, a partial tie included: its metrics.json names it). Measured on 2 vCPUs (docs/toy_models.md, "Training time on 2 CPU
#: cores", with the seeds measured). The mamba2 recipe takes about 19 minutes alone with two
#: threads (24 on a slower 2-core host since the CPU conv of 3cf31ad, 33 before); without
#: context noise, two held-out IOI frames broke in seed 1 (as for mamba), and with it, 6000 steps left a late needle escape unfinished, hence 12000. The mamba one takes
#: about 19 minutes alone with two threads (21 on that slower host, 39 before). It ties every
#: unembedding row to the embedding but the needle values' (tied, the digit embeddings
#: collapse and the needle stays at chance; fully untied, IOI memorises); trains on needles
#: up to 160 tokens (more of them per token; they generalise to 512); replaces context words
#: by random frame words (``context_noise``: otherwise eight words of the held-out IOI frames
#: are never trained, and one of them broke IOI in that frame); gives the SSM parameters a
#: larger learning rate than the rest (``ssm_lr`` 5e-3: the needle left its plateau early in
#: every seed tried, where at 3e-3 some seeds stayed on it; ``lr`` 3e-3: at 5e-3 everywhere
#: the facts loss fell late in some seeds); and runs 14000 steps (facts is learned last).
RECIPES = {
    "mamba2": dict(steps=12000, batch_size=32, lr=3e-3, max_needle_len=256, task_weights="0.2,0.1,0.7",
                   balance="tokens", init="mimetic", weight_decay=0.01, tie_embeddings="yes", context_noise=0.1),
    "mamba": dict(steps=14000, batch_size=32, lr=3e-3, ssm_lr=5e-3, max_needle_len=160,
                  task_weights="0.2,0.1,0.7",
                  balance="tokens", init="mimetic", weight_decay=0.01, tie_embeddings="except-values",
                  context_noise=0.1),
}


def valid_task_weights(weights: Sequence[float]) -> bool:
    """Three shares (facts, ioi, needle), none negative, not all zero."""
    return len(weights) == 3 and min(weights) >= 0 and sum(weights) > 0


class TrainingOptionError(ValueError):
    """Options that do not go together (or do not fit a ``--init-from`` model): the command
    line reports it as a usage error (exit 2), without a traceback."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def answer_loss(model, batch) -> torch.Tensor:
    logits = model(batch["tokens"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(logits[:, -1].float(), batch["answers"])


def next_task(balance: str, task_weights: Sequence[float], spent: dict, rng: random.Random) -> str:
    """The task of the next batch.

    ``balance="steps"`` draws it at random with probabilities ``task_weights`` (shares of
    steps). ``balance="tokens"`` makes ``task_weights`` shares of *tokens* instead: it
    picks the task whose tokens processed so far (``spent``), divided by its weight, are
    fewest. A step costs about its tokens, and a needle batch holds ~10x the tokens of a
    facts or IOI batch, so under ``"steps"`` the needle task takes most of the compute;
    ``"tokens"`` gives each task its share of the compute. Deterministic either way.
    """
    if balance == "steps":
        return rng.choices(TASKS, weights=tuple(task_weights))[0]
    if balance == "tokens":
        live = [t for t, w in zip(TASKS, task_weights) if w > 0]
        weight = dict(zip(TASKS, task_weights))
        return min(live, key=lambda t: spent[t] / weight[t])  # ties go to the first task in TASKS
    raise ValueError(f"balance must be 'steps' or 'tokens', got {balance!r}")


def needle_top(step: int, steps: int, max_len: int) -> int:
    """Curriculum: the longest needle grows from 64 to ``max_len`` over the first half of training."""
    return int(64 + (max(max_len, 64) - 64) * min(1.0, 2 * step / max(steps, 1)))


@torch.no_grad()
def mimetic_init_(model, a_max: float = 0.05, generator: Optional[torch.Generator] = None) -> None:
    """Initialise every SSM to mimic causal linear attention (Trockman et al. 2024, "Mimetic
    initialization helps state space models learn to recall").

    Two changes to the default initialisation, both aimed at recall (needle, IOI):
    C's projection starts equal to B's, so ``C_t · B_s`` starts as a similarity of
    the two tokens (like ``q · k`` with tied queries and keys); and ``A`` starts near
    zero (``-A`` uniform in ``[a_max / 100, a_max]``), so a state barely decays over a
    few hundred tokens and nothing written early is lost before the query.
    """
    cfg = model.cfg
    n, g = cfg.d_state, cfg.n_groups
    lo, hi = math.log(a_max / 100), math.log(a_max)
    for block in model.blocks:
        m = block.mixer
        if cfg.family == "mamba1":
            r = cfg.dt_rank  # x_proj rows: [Δ (dt_rank) | B (d_state) | C (d_state)]
            m.x_proj.weight[r + n:r + 2 * n] = m.x_proj.weight[r:r + n]
        else:
            e = cfg.d_inner  # in_proj rows: [z (e) | x (e) | B (g n) | C (g n) | Δ (heads)]; conv: [x | B | C]
            m.in_proj.weight[2 * e + g * n:2 * e + 2 * g * n] = m.in_proj.weight[2 * e:2 * e + g * n]
            m.conv1d.weight[e + g * n:e + 2 * g * n] = m.conv1d.weight[e:e + g * n]
            if m.conv1d.bias is not None:
                m.conv1d.bias[e + g * n:e + 2 * g * n] = m.conv1d.bias[e:e + g * n]
        m.A_log.copy_(lo + torch.rand(m.A_log.shape, generator=generator) * (hi - lo))


class TiedExceptRows(torch.nn.Module):
    """A parametrization of an untied ``unembed.weight``: the embedding's rows, tied (their
    gradients reach ``W_E``), except ``free_rows``, which are the parameter's own.

    ``--tie-embeddings except-values`` unties only the needle's value tokens (tied, their
    embeddings collapse and the needle stays at chance; fully untied, IOI memorises the
    training names: docs/toy_models.md); ``--tie-embeddings names`` ties only the IOI
    names (:data:`PARTIAL_TIES`). Remove it before saving
    (``torch.nn.utils.parametrize.remove_parametrizations(..., leave_parametrized=True)``):
    the saved model is a plain untied one.
    """

    def __init__(self, embed, free_rows: Sequence[int], d_vocab: int):
        super().__init__()
        self._embed = [embed]  # a reference, not a submodule (it is registered in the model already)
        free = torch.zeros(d_vocab, 1, dtype=torch.bool)
        free[list(free_rows)] = True
        self.register_buffer("free", free)

    def forward(self, own: torch.Tensor) -> torch.Tensor:
        return torch.where(self.free, own, self._embed[0].W_E)


def _value_rows(tokenizer, d_vocab: int) -> List[int]:
    from tl_mamba.toy.vocab import VALUES

    return tokenizer.convert_tokens_to_ids(list(VALUES))


def _facts_attributes() -> List[str]:
    """Every facts answer word (each relation's attributes, in RELATIONS order)."""
    from tl_mamba.toy.vocab import RELATIONS

    return [attribute for _noun, attributes in RELATIONS.values() for attribute in attributes]


def _value_and_attribute_rows(tokenizer, d_vocab: int) -> List[int]:
    return _value_rows(tokenizer, d_vocab) + tokenizer.convert_tokens_to_ids(_facts_attributes())


def _all_rows_but_names(tokenizer, d_vocab: int) -> List[int]:
    from tl_mamba.toy.vocab import NAMES

    names = set(tokenizer.convert_tokens_to_ids(list(NAMES)))
    return [row for row in range(d_vocab) if row not in names]


def _saved_partial_tie(folder: Path) -> Optional[str]:
    """The ``--tie-embeddings`` partial tie a saved toy model was trained with (its
    ``metrics.json``), or None: the saved matrix itself is a plain untied one."""
    try:
        return json.loads((folder / "metrics.json").read_text()).get("partial_tie")
    except (OSError, ValueError):
        return None


#: ``--tie-embeddings`` choices that tie part of the unembedding: name → the free rows
#: (the unembedding's own), given the tokenizer and d_vocab.
PARTIAL_TIES = {"except-values": _value_rows, "except-answers": _value_and_attribute_rows,
                "names": _all_rows_but_names}

#: Tasks whose prompts ``--context-noise`` edits: their ``context`` span carries no part of
#: the answer. (A needle haystack is left alone: a stray "key" or "is" would fake a pair.)
NOISY_TASKS = ("facts", "ioi")


def context_noise_pool(tokenizer) -> List[int]:
    """Token ids ``--context-noise`` draws from: every word of the vocabulary except the
    special tokens and the words that play a part in some task: the IOI names (a fourth
    name would change the IOI answer), the needle's keys and values, and the facts'
    subject syllables, relation words and attributes (a syllable next to a subject can
    spell another entity, whose attribute differs; another relation's word or an
    attribute in the context is a second cue or a second candidate answer). What is left
    are the frame words, the ones a held-out frame may bring untrained."""
    from tl_mamba.toy.vocab import KEYS, NAMES, RELATIONS, SPECIFIC_TEMPLATES, SYLLABLES, VALUES

    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    relation_cues = {w[1:] for templates in SPECIFIC_TEMPLATES.values() for t in templates
                     for w in t.split(" ") if w.startswith("^")}  # "^speak": a relation's own verb or noun
    facts_words = set(SYLLABLES) | relation_cues | {noun for noun, _ in RELATIONS.values()} | set(_facts_attributes())
    excluded = set(NAMES) | set(KEYS) | set(VALUES) | facts_words
    return sorted(i for w, i in vocab.items() if i not in special and w not in excluded)


def substitute_context_words(tokens: torch.Tensor, attention_mask: torch.Tensor, prompts, pool: Sequence[int],
                             rate: float, rng: random.Random) -> int:
    """Replace, in place, each ``context`` position of the facts and IOI rows of a left-padded
    batch by a random word of ``pool`` with probability ``rate``; returns how many were replaced.

    ``tokens`` and ``attention_mask`` are ``[batch, pos]``; ``prompts`` are the batch's
    :class:`~tl_mamba.toy.tasks.Prompt` objects, whose spans count from the BOS at 0.
    Why: a word that no training prompt contains keeps its random initial embedding, and
    one such word in a held-out IOI frame ("lent") was enough to break IOI there in some
    seeds. Random words in the context train every embedding at least as a distractor and
    teach the circuits to read past an unfamiliar word; the answers are unchanged.
    """
    replaced = 0
    width = tokens.shape[1]
    lengths = attention_mask.sum(dim=1).tolist()
    for row, (prompt, length) in enumerate(zip(prompts, lengths)):
        if prompt.task not in NOISY_TASKS:
            continue
        offset = width - int(length)  # left padding: the prompt's BOS sits at column ``offset``
        for position in prompt.spans.get("context", ()):
            if rng.random() < rate:
                tokens[row, offset + position] = rng.choice(pool)
                replaced += 1
    return replaced


#: Projections of a mixer that are not its SSM's own parameters: :func:`parameter_groups`
#: gives every other mixer parameter (conv, Δ/B/C projections, Δ bias, A_log, D, gated norm)
#: the SSM learning rate.
NOT_SSM = ("in_proj", "out_proj")


def parameter_groups(model, lr: float, ssm_lr: Optional[float]) -> List[dict]:
    """AdamW parameter groups: ``[{"params": the rest, "lr": lr}, {"params": ssm, "lr": ssm_lr}]``.

    ``ssm`` holds each mixer's parameters but its in/out projections (for Mamba-1: conv1d,
    x_proj, dt_proj, A_log, D; for Mamba-2: conv1d, dt_bias, A_log, D, norm); the rest are
    the embedding, unembedding, in/out projections and the block norms. With ``ssm_lr``
    None there is one group at ``lr``.
    """
    if ssm_lr is None:
        return [{"params": list(model.parameters()), "lr": lr}]
    ssm, rest = [], []
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        in_mixer = "mixer" in parts and not any(p in NOT_SSM for p in parts)
        (ssm if in_mixer else rest).append(parameter)
    return [{"params": rest, "lr": lr}, {"params": ssm, "lr": ssm_lr}]


def train(arch: str, out: Path, steps: int, batch_size: int, lr: float, seed: int, device: str,
          max_needle_len: int, eval_n: int, log_every: int = 100, time_limit: Optional[float] = None,
          sizes: Optional[dict] = None, task_weights: Sequence[float] = (0.4, 0.3, 0.3),
          init_from: Optional[Path] = None, init: str = "default", balance: str = "steps",
          weight_decay: float = 0.01, unembed_from_embed: bool = False, partial_tie: Optional[str] = None,
          first_phase: Optional[Tuple[Sequence[float], int]] = None, context_noise: float = 0.0,
          ssm_lr: Optional[float] = None) -> dict:
    """Train one toy model and save it to ``out``; returns the held-out metrics.

    Every setting is what is passed here: the recipes that trained the shipped models
    (:data:`RECIPES`: mimetic init, tied embeddings, task weights, context noise...) are the
    command line's defaults (``python -m tl_mamba.toy.train --arch ...``), not this function's.

    ``sizes`` overrides entries of :data:`ARCHS` (``d_model``, ``d_state``, ``n_layers``, ...);
    ``task_weights`` are the shares of (facts, ioi, needle) in steps or tokens, as
    ``balance`` says (see :func:`next_task`).
    ``init_from`` continues from a saved toy model (same architecture; its embedding tying
    unless ``sizes`` sets ``tie_embeddings``) instead of a fresh init.
    ``unembed_from_embed`` (fresh, untied models only) starts the unembedding as a copy of
    the embedding: the tied model's copy prior at step 0, without tying them afterwards.
    ``partial_tie`` (fresh, untied models only; a key of :data:`PARTIAL_TIES`) ties some
    unembedding rows to the embedding, the others start as copies (:class:`TiedExceptRows`).
    ``first_phase = (weights, n)`` uses ``weights`` instead of ``task_weights`` for the first
    ``n`` steps (e.g. needle-heavy, so the needle leaves its loss plateau early); each phase
    balances its own tokens (or steps), so the second does not start by paying back the first.
    ``context_noise`` is the probability that a context word of a facts or IOI training
    prompt is replaced by a random word (:func:`substitute_context_words`); it draws from
    its own random stream, so the batches are otherwise those of a run without it.
    ``ssm_lr`` (default ``lr``) is the peak learning rate of the mixers' own SSM parameters
    (:func:`parameter_groups`); the warm-up and cosine apply to both rates alike.
    """
    from tqdm.auto import tqdm

    from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig
    from tl_mamba.toy import tasks as toy_tasks
    from tl_mamba.toy.tokenizer import build_tokenizer, load_tokenizer, save_tokenizer

    if balance not in ("steps", "tokens"):
        raise TrainingOptionError(f"balance must be 'steps' or 'tokens', got {balance!r}")
    for flag, value in (("--lr", lr), ("--weight-decay", weight_decay)):
        if not value >= 0:  # 0 is allowed: --lr 0 evaluates and saves without training
            raise TrainingOptionError(f"{flag} must be non-negative, got {value!r}")
    if time_limit is not None and not time_limit > 0:
        raise TrainingOptionError(f"--time-limit is a number of seconds above 0, got {time_limit!r}")
    if max_needle_len < 64:
        raise TrainingOptionError(f"--max-needle-len must be at least 64 (the needle curriculum starts at 64), "
                                  f"got {max_needle_len}")
    if out.exists() and not out.is_dir():
        raise TrainingOptionError(f"--out {out} is a file, not a directory")
    if init_from is not None and init != "default":
        raise TrainingOptionError(f"--init {init} starts fresh weights; it cannot be combined with "
                                  f"--init-from {init_from}")
    if first_phase is not None:
        phase_weights, phase_steps = first_phase
        if not valid_task_weights(phase_weights) or phase_steps < 0:
            raise TrainingOptionError("--first-phase needs three non-negative task weights, not all zero, and a "
                                      f"non-negative step count; got {first_phase!r}")
    if ssm_lr is not None and not ssm_lr >= 0:  # 0 freezes the SSM parameters, as --lr 0 freezes all
        raise TrainingOptionError(f"--ssm-lr must be non-negative, got {ssm_lr!r}")
    if not 0.0 <= context_noise < 1.0:
        raise TrainingOptionError(f"--context-noise is a probability in [0, 1), got {context_noise!r}")
    if partial_tie is not None and partial_tie not in PARTIAL_TIES:
        raise TrainingOptionError(f"partial_tie must be one of {sorted(PARTIAL_TIES)}, got {partial_tie!r}")
    if init_from is not None and unembed_from_embed:
        raise TrainingOptionError("the unembedding can start as a copy of the embedding only in a fresh untied "
                                  f"model, not with --init-from {init_from}")
    if init_from is not None and not Path(init_from).is_dir():
        raise TrainingOptionError(f"--init-from {init_from}: no such directory (a folder written by this trainer)")
    torch.manual_seed(seed)
    rng = random.Random(seed)
    try:
        dev = pick_device(device)
    except RuntimeError as err:  # torch's message lists every device type it knows
        raise TrainingOptionError(f"--device {device}: not a torch device (auto, cpu, cuda, cuda:1, mps, ...)") \
            from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingOptionError(f"--device {device}: CUDA is not available here (use auto or cpu)")
    out.mkdir(parents=True, exist_ok=True)
    save_tokenizer(out)
    tokenizer = load_tokenizer(out)
    vocab = len(build_tokenizer().get_vocab())
    d_vocab = int(math.ceil(vocab / 8) * 8)
    previous = None
    if init_from is not None:
        import tl_mamba

        previous = tl_mamba.from_pretrained(str(init_from))
        # a continued run keeps the saved model's tying unless ``sizes`` overrides it; a partial
        # tie is saved baked into a plain untied matrix, so it is read back from the run's metrics
        if partial_tie is None and "tie_embeddings" not in (sizes or {}):
            partial_tie = _saved_partial_tie(Path(init_from))
        sizes = dict({"tie_embeddings": previous.cfg.tie_embeddings}, **(sizes or {}))
    spec = dict(ARCHS[arch], **(sizes or {}))
    family = spec.pop("family")
    try:
        cfg = HookedMambaConfig(family=family, d_vocab=d_vocab, seed=seed, model_name=f"toy-{arch}",
                                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.pad_token_id, default_prepend_bos=True, **spec)
    except ValueError as err:  # e.g. a d_model whose inner width is no multiple of the head size
        sized = ", ".join(f"{k}={v}" for k, v in spec.items())
        raise TrainingOptionError(f"--arch {arch} with {sized} is not a valid model: {err}") from err
    if (unembed_from_embed or partial_tie) and cfg.tie_embeddings:
        raise TrainingOptionError("the unembedding can start as a copy of the embedding (or tie part of it) only "
                                  "in an untied model")
    model = (HookedMamba if family == "mamba1" else HookedMamba2)(cfg, tokenizer=tokenizer)
    if previous is not None:
        fields = ("family", "d_model", "n_layers", "d_state", "tie_embeddings")
        differ = {f: (getattr(previous.cfg, f), getattr(cfg, f)) for f in fields
                  if getattr(previous.cfg, f) != getattr(cfg, f)}
        if differ:
            mismatch = ", ".join(f"{f}: saved {a}, asked {b}" for f, (a, b) in differ.items())
            raise TrainingOptionError(f"--init-from {init_from}: its architecture differs from --arch {arch} "
                                      f"with these sizes ({mismatch})")
        model.load_state_dict(previous.state_dict())
    else:
        if init == "mimetic":
            mimetic_init_(model)
        if unembed_from_embed or partial_tie:
            with torch.no_grad():
                model.unembed.weight.copy_(model.embed.W_E)
    if partial_tie:
        free_rows = PARTIAL_TIES[partial_tie](tokenizer, cfg.d_vocab)
        tie = TiedExceptRows(model.embed, free_rows, cfg.d_vocab)
        if previous is not None:  # tying rows that differ would change the saved model's outputs
            with torch.no_grad():
                moved = (tie(model.unembed.weight) != model.unembed.weight).any(dim=1).sum().item()
            if moved:
                raise TrainingOptionError(f"--init-from {init_from}: {moved} unembedding rows that "
                                          f"--tie-embeddings {partial_tie} ties differ from the embedding's; "
                                          "tying them would change the saved model")
        parametrize.register_parametrization(model.unembed, "weight", tie)
    model = model.to(dev)
    model.set_backend("torch")
    model.train()

    optimizer = torch.optim.AdamW(parameter_groups(model, lr, ssm_lr), lr=lr, weight_decay=weight_decay,
                                  betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    history: List[dict] = []
    running = {t: None for t in TASKS}
    tokens_spent = {t: 0 for t in TASKS}
    phase_spent = {t: 0 for t in TASKS}  # what the current phase's balance counts
    noise_pool = context_noise_pool(tokenizer)
    noise_rng = random.Random(f"context-noise/{seed}")
    words_replaced = 0
    start_time = time.time()
    bar = tqdm(range(steps), desc=f"train {arch}", dynamic_ncols=True)
    for step in bar:
        weights = task_weights
        if first_phase is not None:
            if step < first_phase[1]:
                weights = first_phase[0]
            elif step == first_phase[1]:  # the second phase balances from zero
                phase_spent = {t: 0 for t in TASKS}
        task = next_task(balance, weights, phase_spent, rng)
        top = needle_top(step, steps, max_needle_len)
        batch = toy_tasks.training_batch(tokenizer, batch_size, rng, task=task, needle_max_len=top, mode="answer",
                                         return_prompts=True)
        if context_noise > 0:
            words_replaced += substitute_context_words(batch["tokens"], batch["attention_mask"], batch["prompts"],
                                                       noise_pool, context_noise, noise_rng)
        batch = {k: batch[k].to(dev) for k in ("tokens", "attention_mask", "answers")}
        tokens_spent[task] += batch["tokens"].numel()
        phase_spent[task] += batch["tokens"].numel()
        loss = answer_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        value = loss.item()
        running[task] = value if running[task] is None else 0.95 * running[task] + 0.05 * value
        out_of_time = time_limit is not None and time.time() - start_time > time_limit
        if step % log_every == 0 or step == steps - 1 or out_of_time:
            history.append({"step": step, "task": task, "loss": value, "seconds": time.time() - start_time,
                            "running": dict(running), "tokens": dict(tokens_spent)})
            bar.set_postfix({t: f"{v:.3f}" for t, v in running.items() if v is not None})
        if out_of_time:  # stop early but still evaluate and save what was learned
            steps_done = step + 1
            break
    else:
        steps_done = steps

    if partial_tie:  # bake the tied rows in: what is saved is a plain untied model
        parametrize.remove_parametrizations(model.unembed, "weight", leave_parametrized=True)
    metrics = evaluate_model(model, tokenizer, seed=seed + 1, n=eval_n, max_len=512)
    # how to re-measure these numbers: tl-mamba eval OUT --seed {seed + 1} --n {eval_n}
    metrics.update(eval=dict(seed=seed + 1, n=eval_n), arch=arch, sizes=spec, init=init if init_from is None else None,
                   init_from=None if init_from is None else str(init_from), task_weights=list(task_weights),
                   balance=balance, tokens=tokens_spent, steps=steps_done, steps_planned=steps,
                   batch_size=batch_size, lr=lr, ssm_lr=ssm_lr, weight_decay=weight_decay,
                   unembed_from_embed=unembed_from_embed,
                   partial_tie=partial_tie, context_noise=context_noise, context_words_replaced=words_replaced,
                   first_phase=None if first_phase is None else dict(task_weights=list(first_phase[0]),
                                                                      steps=first_phase[1]),
                   seed=seed, device=str(dev),
                   train_seconds=time.time() - start_time, params=sum(p.numel() for p in model.parameters()))
    model.cpu().save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "train_log.json").write_text(json.dumps(history))
    return metrics


def evaluate_model(model, tokenizer, seed: int, n: int, max_len: int = 512) -> dict:
    """Held-out accuracies: facts (unseen paraphrases), IOI (unseen combinations), needle by length.

    ``ioi_by_heldout`` splits IOI by what is unseen: ``"template"`` (one of the held-out
    sentence frames; the name pair may be unseen too) or ``"pair"`` (a held-out name pair
    in a trained frame), since the two fail differently; ``ioi_by_heldout_template`` gives
    each held-out frame's accuracy (keyed by its index in ``IOI_TEMPLATES``), since one
    frame can fail alone.
    """
    from tl_mamba.toy import tasks as toy_tasks

    def acc(prompts, batch_size=64):
        return toy_tasks.evaluate(model, prompts, batch_size=batch_size, tokenizer=tokenizer, progress=False)

    ioi_prompts = toy_tasks.make_dataset("ioi", "heldout", n, seed=seed)
    ioi = toy_tasks.evaluate(model, ioi_prompts, tokenizer=tokenizer, progress=False, return_details=True)
    by_heldout: dict = {}
    by_template: dict = {}
    for prompt, correct in zip(ioi_prompts, ioi["correct"]):
        by_heldout.setdefault("template" if prompt.meta["heldout_template"] else "pair", []).append(correct)
        if prompt.meta["heldout_template"]:
            by_template.setdefault(prompt.meta["template_index"], []).append(correct)
    result = {
        "facts": acc(toy_tasks.make_dataset("facts", "heldout", n, seed=seed)),
        "ioi": ioi["accuracy"],
        "ioi_by_heldout": {k: sum(v) / len(v) for k, v in sorted(by_heldout.items())},
        "ioi_by_heldout_template": {str(k): sum(v) / len(v) for k, v in sorted(by_template.items())},
        "needle_by_length": {},
    }
    for length in (64, 128, 256, 384, 512):
        if length > max_len:
            break
        prompts = toy_tasks.make_dataset("needle", "heldout", n, seed=seed, length=length)
        result["needle_by_length"][str(length)] = acc(prompts, batch_size=32)
    result["needle_256"] = result["needle_by_length"].get("256")
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tl_mamba.toy.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), required=True)
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    parser.add_argument("--batch-size", type=int, default=None, help="prompts per batch (default: the recipe's)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's)")
    parser.add_argument("--ssm-lr", type=float, default=None,
                        help="peak learning rate of the mixers' SSM parameters (conv, Δ/B/C projections, A_log, "
                             "D; not the in/out projections) (default: --lr if it is given, else the recipe's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--max-needle-len", type=int, default=None,
                        help="longest training needle (default: the recipe's)")
    parser.add_argument("--eval-n", type=int, default=400, help="held-out prompts per task (and per needle length)")
    parser.add_argument("--time-limit", type=float, default=None, help="stop training after this many seconds")
    parser.add_argument("--d-model", type=int, default=None, help="override the architecture's width")
    parser.add_argument("--d-state", type=int, default=None, help="override the state size")
    parser.add_argument("--n-layers", type=int, default=None, help="override the depth")
    parser.add_argument("--tie-embeddings", choices=("yes", "no", "copy", *PARTIAL_TIES), default=None,
                        help="override whether the unembedding is the embedding's transpose (yes), a separate "
                             "matrix (no), a separate matrix that starts as a copy of the embedding (copy), or "
                             "partly tied: all rows but the needle's values (except-values), all but the needle's "
                             "values and the facts' attributes (except-answers), or the IOI names' rows only "
                             "(names), the free rows starting as copies; saved untied")
    parser.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default: the recipe's)")
    parser.add_argument("--task-weights", default=None,
                        help="shares of facts,ioi,needle in steps or tokens, see --balance (default: the recipe's)")
    parser.add_argument("--first-phase", default=None, metavar="WEIGHTS@STEPS",
                        help="task weights for the first STEPS steps, e.g. 0.05,0.05,0.9@1500 (needle-heavy "
                             "start); --task-weights after that; each phase balances its own tokens")
    parser.add_argument("--balance", choices=("steps", "tokens"), default=None,
                        help="what --task-weights share out: steps (random draws) or tokens, i.e. compute "
                             "(deterministic; a needle batch costs ~10x a facts batch)")
    parser.add_argument("--context-noise", type=float, default=None, metavar="RATE",
                        help="probability that each context word of a facts or IOI training prompt is replaced "
                             "by a random frame word (no word with a part in some task's answer), so every word "
                             "embedding is trained (default: the recipe's)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--init-from", type=Path, default=None, help="continue training a saved toy model")
    parser.add_argument("--init", choices=("default", "mimetic"), default=None,
                        help="fresh initialisation: mamba_ssm's (default) or mimetic (recall-friendly; "
                             "see mimetic_init_); the recipe's unless --init-from is given")
    args = parser.parse_args(argv)
    # numbers given that the trainer would divide by, loop over or size with: a usage line
    # (checked before the recipe fills in what was not given)
    for flag, value, least in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                               ("--eval-n", args.eval_n, 1), ("--d-model", args.d_model, 1),
                               ("--d-state", args.d_state, 1), ("--n-layers", args.n_layers, 1),
                               ("--threads", args.threads, 1)):
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    recipe = dict(RECIPES[args.arch])
    if args.init_from is not None:  # continuing: fresh-start choices belong to the saved model
        recipe["init"] = "default"
        del recipe["tie_embeddings"]
    if args.lr is not None and args.ssm_lr is None:  # a rate asked for is every parameter's rate
        recipe.pop("ssm_lr", None)
    for name, value in recipe.items():  # every option left unset takes the recipe's value
        if getattr(args, name) is None:
            setattr(args, name, value)
    try:
        weights = [float(w) for w in args.task_weights.split(",")]
    except ValueError:
        weights = []
    if not valid_task_weights(weights):
        parser.error(f"--task-weights needs three non-negative numbers, got {args.task_weights!r}")
    first_phase = None
    if args.first_phase is not None:
        head, _, tail = args.first_phase.partition("@")
        try:
            first_phase = ([float(w) for w in head.split(",")], int(tail))
        except ValueError:  # the values themselves are checked by train()
            parser.error(f"--first-phase takes WEIGHTS@STEPS (e.g. 0.05,0.05,0.9@1500), got {args.first_phase!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = {k: v for k, v in (("d_model", args.d_model), ("d_state", args.d_state), ("n_layers", args.n_layers))
             if v is not None}
    if args.tie_embeddings is not None:
        sizes["tie_embeddings"] = args.tie_embeddings == "yes"
    try:
        metrics = train(args.arch, args.out, args.steps, args.batch_size, args.lr, args.seed, args.device,
                        args.max_needle_len, args.eval_n, time_limit=args.time_limit, sizes=sizes,
                        task_weights=weights, init_from=args.init_from, init=args.init, balance=args.balance,
                        weight_decay=args.weight_decay, unembed_from_embed=args.tie_embeddings == "copy",
                        partial_tie=args.tie_embeddings if args.tie_embeddings in PARTIAL_TIES else None,
                        first_phase=first_phase, context_noise=args.context_noise, ssm_lr=args.ssm_lr)
    except TrainingOptionError as err:
        parser.error(str(err))
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
