"""Information-flow experiments with knockouts (the Mamba Knockout paper, exact and batched).

    from tl_mamba.experiments import information_flow, plot_information_flow, prompt_from_text
    prompts = tl_mamba.toy.make_dataset("facts", "heldout", 64)          # toy model and tokenizer
    prompts = [prompt_from_text(model, "The Eiffel Tower is in the city of", " Paris",
                                subject="The Eiffel Tower")]              # any other tokenizer
    df = information_flow(model, prompts, window=3)
    plot_information_flow(df, "flow.png")

For every window of layers and every source class (subject, relation, first,
last, context), the edges source → target are knocked out in that window and
the change in the correct answer's probability, ``(p_ko − p) / p``, recorded.
Every (window, class, prompt) combination is one batch row: a row carries its
own ``[b, p]`` source and target masks, so one forward runs many knockouts.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch

from tl_mamba.errors import OutOfRangeError, check_index, reusable
from tl_mamba.knockout import Knockout
from tl_mamba.ops.precision import compute_dtype

DEFAULT_SOURCES = ("subject", "relation", "first", "last", "context")


def layer_windows(n_layers: int, window: int) -> List[Tuple[int, List[int]]]:
    """``(centre layer, layers)`` for a window of ``window`` layers around each layer, clipped at the ends.

    Layer ℓ's window is ``[ℓ - window // 2, ℓ - window // 2 + window)`` cut to the model's layers,
    the convention of Geva et al.'s attention knockout that the Mamba Knockout paper follows: the
    windows near the first and last layers are shorter, so every centre gets its own window (a
    window shifted to full length would repeat its neighbour's). An even window has one more
    layer before the centre than after it.
    """
    if isinstance(window, bool) or not isinstance(window, numbers.Integral):
        raise TypeError(f"window must be a whole number of layers, got {window!r}")
    if not 1 <= window <= n_layers:
        raise ValueError(f"window must be between 1 and the number of layers ({n_layers}), got {window}")
    before = window // 2
    return [(centre, list(range(max(0, centre - before), min(n_layers, centre - before + window))))
            for centre in range(n_layers)]


def _answer_id(model, answer: Union[str, int], row: int) -> int:
    """The token id of a prompt's answer: its text (one token), or the id itself."""
    if not isinstance(answer, (str, bool)) and hasattr(answer, "__index__"):  # an int, numpy's too
        if not 0 <= int(answer) < model.cfg.d_vocab:
            raise OutOfRangeError(f"prompt {row}: the answer token id {int(answer)} is outside the vocabulary "
                                  f"[0, {model.cfg.d_vocab})")
        return int(answer)
    ids = model.tokenizer(answer, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"prompt {row}: the answer {answer!r} is {len(ids)} tokens {ids}; information_flow scores "
                         "one token (give the first token's text, with its leading space if it has one)")
    unknown = model._unknown_token_id()
    if ids[0] == unknown and answer.strip() != model.tokenizer.unk_token:  # a word-level vocabulary lacks it
        raise ValueError(f"prompt {row}: the answer {answer!r} is not in the tokenizer's vocabulary: it reads as "
                         f"the unknown token {model.tokenizer.unk_token!r} (id {unknown}), whose probability "
                         "would be scored instead")
    return int(ids[0])


def _encode(model, prompts):
    """``(batch, offsets)``: ``batch`` holds left-padded ``tokens``, ``attention_mask`` and ``answers``;
    ``offsets[r]`` is row r's left padding, which shifts its spans. Spans index
    ``model.to_tokens(prompt.text)`` (for the toy tasks with the toy tokenizer, that is the
    toy encoding: BOS, then one token per word)."""
    if model.tokenizer is None:  # the toy vocabulary, as encode_prompts defaults to
        from tl_mamba.toy import encode_prompts

        batch = encode_prompts(prompts, None, padding_side="left")
        return batch, (batch["tokens"].shape[1] - batch["lengths"]).tolist()
    tokens, mask = model.to_tokens([prompt.text for prompt in prompts], padding_side="left",
                                   return_attention_mask=True, move_to_device=False)
    lengths = mask.sum(1)
    for row, (prompt, length) in enumerate(zip(prompts, lengths.tolist())):
        if prompt.task != "text" and length != prompt.n_tokens:
            raise ValueError(f"prompt {row} is a toy-task prompt, whose spans are word positions ({prompt.n_tokens} "
                             f"tokens with the BOS), but this model's tokenizer makes {length} tokens of it. Use the "
                             "toy tokenizer, or build prompts with tl_mamba.experiments.prompt_from_text")
        beyond = [pos for span in prompt.spans.values() for pos in span if not 0 <= pos < length]
        if beyond:
            raise OutOfRangeError(f"prompt {row} has span positions {beyond} outside its {length} tokens; spans "
                                  "index model.to_tokens(prompt.text) (tl_mamba.experiments.prompt_from_text "
                                  "builds them)")
    answers = torch.tensor([_answer_id(model, prompt.answer, row) for row, prompt in enumerate(prompts)])
    batch = {"tokens": tokens, "attention_mask": mask, "answers": answers}
    return batch, (tokens.shape[1] - lengths).tolist()


def _check_prompts(prompts, owner: str) -> None:
    """``TypeError`` unless every prompt is a ``Prompt`` (or has its text, answer and spans): a plain
    string has no spans to knock out and no answer to score."""
    bad = [(row, prompt) for row, prompt in enumerate(prompts)
           if not all(hasattr(prompt, name) for name in ("text", "answer", "spans"))]
    if bad:
        row, prompt = bad[0]
        raise TypeError(f"{owner} takes Prompt objects (text, answer and the spans to knock out), got "
                        f"{type(prompt).__name__} {prompt!r:.60} at prompt {row}: build one from text with "
                        "tl_mamba.experiments.prompt_from_text(model, text, answer, subject), or take the toy "
                        "tasks' from tl_mamba.toy.make_dataset")


def prompt_from_text(model, text: str, answer: str, subject: str):
    """A factual-recall prompt for :func:`information_flow` on any tokenizer, its spans found by characters.

    ``subject`` is a substring of ``text`` (its first occurrence is used). The spans are
    positions in ``model.to_tokens(text)`` (BOS at 0 when ``default_prepend_bos``), as the
    toy prompts' are: ``subject`` (every token overlapping the subject's characters),
    ``subject_first``, ``subject_last``, ``last`` (the token that predicts the answer),
    ``relation`` (the tokens after the subject, before the last), ``first`` (the first
    token of the text), ``bos``, ``context`` (the tokens of the text outside the
    subject, the relation and the last) and ``non_subject``. ``answer`` is the text of
    the one token to predict, with its leading space if the tokenizer has one (``" Paris"``).

    Needs a fast (Rust) tokenizer, for its character offsets.
    """
    from tl_mamba.toy.tasks import Prompt

    tok = model._require_tokenizer("prompt_from_text")
    start = text.find(subject) if subject else -1
    if start < 0:
        raise ValueError(f"prompt_from_text: the subject {subject!r} is not in the text {text!r}")
    end = start + len(subject)
    try:
        encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError) as err:
        raise TypeError("prompt_from_text needs a fast tokenizer (character offsets); "
                        f"{type(tok).__name__} gave: {err}") from None
    shift = 1 if model.cfg.default_prepend_bos else 0
    n = len(encoded["input_ids"]) + shift
    subject_span = [i + shift for i, (a, b) in enumerate(encoded["offset_mapping"]) if a < end and b > start]
    if not subject_span:
        raise ValueError(f"prompt_from_text: no token of {text!r} covers the subject {subject!r}")
    last = n - 1
    if subject_span[-1] >= last:
        raise ValueError(f"prompt_from_text: the subject {subject!r} reaches the last token; the last token "
                         "predicts the answer and must come after the subject")
    relation = list(range(subject_span[-1] + 1, last))
    text_positions = range(shift, n)
    taken = set(subject_span) | set(relation) | {last}
    spans = {
        "bos": [0] if shift else [],
        "first": [shift],
        "subject": subject_span,
        "subject_first": [subject_span[0]],
        "subject_last": [subject_span[-1]],
        "relation": relation,
        "last": [last],
        "non_subject": [pos for pos in text_positions if pos not in subject_span and pos != last],
        "context": [pos for pos in text_positions if pos not in taken],
    }
    return Prompt(text=text, answer=answer, task="text", spans=spans)


def _span_mask(prompts, offsets, width: int, name: str) -> torch.Tensor:
    """``[n, width]`` bool: the positions of span ``name`` in each (left-padded) prompt."""
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, (prompt, offset) in enumerate(zip(prompts, offsets)):
        if name not in prompt.spans:
            raise KeyError(f"prompt {row} has no span {name!r}; its spans are {sorted(prompt.spans)}")
        positions = [offset + pos for pos in prompt.spans[name]]
        if positions:
            mask[row, positions] = True
    return mask


def _window_knockouts(n_layers: int, windows, row_windows: Sequence[int], row_sources: torch.Tensor,
                      targets: torch.Tensor, path: str, device, features: Optional[dict] = None) -> List[Knockout]:
    """One Knockout per layer whose rows knock out their own sources in their own window.

    Row r removes ``row_sources[r]`` → ``targets[r]`` in the layers of ``windows[row_windows[r]]``;
    layers no row's window covers get no knockout. ``features``: ``heads=`` / ``channels=`` of each.
    """
    knockouts = []
    for layer in range(n_layers):
        in_window = torch.tensor([layer in windows[w][1] for w in row_windows])
        sources = row_sources & in_window[:, None]
        if bool(sources.any()):
            mine = {what: {layer: chosen[layer]} if isinstance(chosen, Mapping) else chosen  # (per layer)
                    for what, chosen in (features or {}).items()}
            knockout = Knockout(layers=layer, sources=sources.to(device), targets=targets.to(device), path=path,
                                **mine)
            knockout._warned_partial_groups = True  # (_features warned once for the whole run)
            knockouts.append(knockout)
    return knockouts


def _features(model, heads, channels, path: str) -> dict:
    """``heads`` / ``channels`` for a run's knockouts, checked against the model now (a mistake
    would otherwise surface at the first batch's forward, after the clean one), with the warning
    about a part of a Mamba-2 group on the conv path given once, not by each of the run's knockouts."""
    # (a generator read once here, as a list: every knockout of the run reads it again)
    features = {k: reusable(v) for k, v in (("heads", heads), ("channels", channels)) if v is not None}
    if features:
        cfg = model.cfg
        # a per-layer mapping needs an entry for every layer: the windows cover them all
        per_layer = any(isinstance(chosen, Mapping) for chosen in features.values())
        probe = Knockout(layers=list(range(cfg.n_layers)) if per_layer else 0, sources=[0], targets=[0], path=path,
                         **features)
        probe._check_family(cfg)
        (what, chosen), = features.items()
        for layer in probe.resolved_layers(cfg.n_layers):
            if not bool(probe.features(cfg, layer).any()):
                where = f" in layer {layer}" if per_layer else ""
                raise ValueError(f"{what}={chosen!r} chooses no {what[:-1]}{where}: nothing would be knocked out")
        probe.warn_if_partial_groups(cfg, subject=f"the knockouts (path={path!r}, {features})")
        if per_layer:
            features = {what: probe._per_layer_features(cfg)}  # (keys resolved: negative ones counted from the end)
    return features


def _answer_scores(model, tokens, attention_mask, answers, knockouts: Optional[List[Knockout]]):
    """``(p, log_odds)`` of each row's answer at the last position, ``[b]`` each.

    ``log_odds = log p − log(1 − p)``, from the logits (the answer's logit less the logsumexp of
    the others), so that it keeps resolving where p is within float precision of 1."""
    with torch.no_grad():
        if knockouts:
            logits = model.run_with_knockout(tokens, knockouts=knockouts, attention_mask=attention_mask)
        else:
            logits = model(tokens, attention_mask=attention_mask)
    last = logits[:, -1].double()
    answer_logit = last.gather(1, answers[:, None])[:, 0]
    others = last.scatter(1, answers[:, None], float("-inf")).logsumexp(-1)
    out = compute_dtype(logits)  # a float64 model's small effects kept
    return last.softmax(-1).gather(1, answers[:, None])[:, 0].to(out), (answer_logit - others).to(out)


def information_flow(
    model,
    prompts: Sequence,
    window: int = 3,
    sources: Sequence[str] = DEFAULT_SOURCES,
    target: str = "last",
    path: str = "ssm",
    batch_size: int = 64,
    progress: bool = True,
    heads=None,
    channels=None,
):
    """Knock out source → target in every layer window, for every source class.

    Args:
        model: a ``HookedMamba`` / ``HookedMamba2`` with a tokenizer.
        prompts: ``Prompt`` objects carrying ``spans``: the toy tasks'
            (``tl_mamba.toy.make_dataset``, with the toy tokenizer), or, for any other
            tokenizer, :func:`prompt_from_text`'s (spans index ``model.to_tokens(text)``).
            A class missing from a prompt's spans raises.
        window: layers per window (centred on each layer, clipped at the ends).
        sources: span names to knock out as sources (one name: that class alone).
        target: span name of the targets (``"last"``: the position predicting the answer).
        path: ``"ssm"``, ``"conv"`` or ``"both"`` (see ``Knockout``).
        batch_size: rows per forward; a row is one (prompt, window, class).
        heads, channels: knock out only in these Mamba-2 heads / Mamba-1 channels (as
            ``Knockout``'s: ints or a bool mask, or a mapping ``{layer: heads}`` with an entry
            for every layer), e.g. the fast- or slow-decay features of
            :func:`features_by_decay`, one layer's or each layer's own. None: all.

    Returns:
        A pandas DataFrame, one row per (prompt, layer, source): ``prompt``, ``layer``
        (the window's centre), ``layers`` (the window), ``source``, ``n_sources``,
        ``p`` (clean answer probability), ``p_ko`` and ``change = (p_ko − p) / p``, and the
        answer's log-odds ``log_odds`` / ``log_odds_ko`` (``log p − log(1 − p)``, from the logits;
        where a model is sure, p sits at 1 and its change reads 0, while the log-odds still
        show what a knockout moved). Classes with no tokens in a prompt (an empty span) give
        ``change = 0``.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from tl_mamba.circuits.ablation import check_batch_size

    prompts = list(prompts)
    if not prompts:
        raise ValueError("information_flow needs at least one prompt")
    _check_prompts(prompts, "information_flow")
    batch_size = check_batch_size(batch_size)
    sources = (sources,) if isinstance(sources, str) else tuple(sources)  # "subject" is one class, not 7 letters
    features = _features(model, heads, channels, path)
    batch, offsets = _encode(model, prompts)
    tokens, attention, answers = batch["tokens"], batch["attention_mask"], batch["answers"]
    width = tokens.shape[1]
    device = model.W_E.device
    clean, clean_odds = (torch.cat(parts).cpu() for parts in zip(*[
        _answer_scores(model, tokens[i:i + batch_size].to(device), attention[i:i + batch_size].to(device),
                       answers[i:i + batch_size].to(device), None)
        for i in range(0, len(prompts), batch_size)]))
    targets = _span_mask(prompts, offsets, width, target)
    source_masks = {name: _span_mask(prompts, offsets, width, name) for name in sources}
    windows = layer_windows(model.cfg.n_layers, window)
    # one row per (window, class, prompt)
    jobs = [(w, name, i) for w in range(len(windows)) for name in sources for i in range(len(prompts))]
    records = []
    bar = tqdm(range(0, len(jobs), batch_size), desc="information flow", disable=not progress, leave=False)
    for start in bar:
        chunk = jobs[start:start + batch_size]
        rows = torch.tensor([i for _, _, i in chunk])
        row_sources = torch.stack([source_masks[name][i] for _, name, i in chunk])
        knockouts = _window_knockouts(model.cfg.n_layers, windows, [w for w, _, _ in chunk], row_sources,
                                      targets[rows], path, device, features)
        p_ko, odds_ko = (v.cpu() for v in _answer_scores(model, tokens[rows].to(device), attention[rows].to(device),
                                                        answers[rows].to(device), knockouts))
        for r, (w, name, i) in enumerate(chunk):
            p = float(clean[i])
            records.append(dict(prompt=i, layer=windows[w][0], layers=tuple(windows[w][1]), source=name,
                                n_sources=int(source_masks[name][i].sum()), p=p, p_ko=float(p_ko[r]),
                                change=(float(p_ko[r]) - p) / p if p > 0 else float("nan"),
                                log_odds=float(clean_odds[i]), log_odds_ko=float(odds_ko[r])))
    return pd.DataFrame.from_records(records)


def information_flow_per_token(model, prompt, window: int = 3, target: str = "last", path: str = "ssm",
                               batch_size: int = 64, progress: bool = True, heads=None,
                               channels=None) -> torch.Tensor:
    """Each token → target knocked out in each layer window: ``[n_layers, p]`` relative change
    ``(p_ko − p) / p`` of the answer probability (row = window centre, column = source token).
    ``heads`` / ``channels``: as :func:`information_flow`'s."""
    from tl_mamba.circuits.ablation import check_batch_size

    _check_prompts([prompt], "information_flow_per_token")
    batch_size = check_batch_size(batch_size)
    features = _features(model, heads, channels, path)
    batch, offsets = _encode(model, [prompt])
    tokens, answers = batch["tokens"], batch["answers"]
    p = tokens.shape[1]
    device = model.W_E.device
    clean = float(_answer_scores(model, tokens.to(device), None, answers.to(device), None)[0][0])
    targets = _span_mask([prompt], offsets, p, target)[0]
    windows = layer_windows(model.cfg.n_layers, window)
    jobs = [(w, pos) for w in range(len(windows)) for pos in range(p)]
    result = torch.zeros(len(windows), p, dtype=compute_dtype(model.W_E))
    from tqdm.auto import tqdm

    for start in tqdm(range(0, len(jobs), batch_size), desc="per-token flow", disable=not progress, leave=False):
        chunk = jobs[start:start + batch_size]
        row_sources = torch.zeros(len(chunk), p, dtype=torch.bool)
        row_sources[torch.arange(len(chunk)), torch.tensor([pos for _, pos in chunk])] = True
        knockouts = _window_knockouts(model.cfg.n_layers, windows, [w for w, _ in chunk], row_sources,
                                      targets.expand(len(chunk), p), path, device, features)
        rows = tokens.expand(len(chunk), p).to(device)
        p_ko = _answer_scores(model, rows, None, answers.expand(len(chunk)).to(device), knockouts)[0].cpu()
        for r, (w, pos) in enumerate(chunk):
            result[w, pos] = (float(p_ko[r]) - clean) / clean if clean > 0 else float("nan")
    return result


STATISTICS = ("pooled", "mean", "median", "log_odds")


def summarize_information_flow(df, statistic: str = "pooled"):
    """Layer × source table of the % change in p(answer), or of the change in its log-odds.

    ``"pooled"`` (default): ``(mean p_ko − mean p) / mean p``, the change of the mean
    probability, which a few prompts with a tiny clean p cannot dominate. ``"mean"``:
    the mean of the per-prompt relative changes (unbounded above: one prompt going
    from p = 0.001 to 0.5 adds +50000%); ``"median"``: their median. ``"log_odds"``: the
    mean of ``log_odds_ko − log_odds`` (in nats, not %): where the model is sure, p sits
    within float precision of 1 and every change above reads about 0, while the log-odds
    still show what each knockout moved.
    """
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    needed = ("layer", "source", "p", "p_ko", "change")
    needed += ("log_odds", "log_odds_ko") if statistic == "log_odds" else ()
    missing = [c for c in needed if c not in getattr(df, "columns", ())]
    if missing:  # a summary table given back (it has a column per source), say: a bare KeyError named neither
        raise ValueError(f"expected information_flow's DataFrame (one row per prompt, layer and source), which "
                         f"has the columns {', '.join(needed)}; this one lacks {missing}. "
                         "plot_information_flow and summarize_information_flow both take that DataFrame, "
                         "not the summary table")
    grouped = df.groupby(["layer", "source"], sort=False)
    if statistic == "pooled":
        sums = grouped[["p", "p_ko"]].sum()
        table = (sums["p_ko"] / sums["p"] - 1).unstack(1)
    elif statistic == "mean":
        table = grouped["change"].mean().unstack(1)
    elif statistic == "median":
        table = grouped["change"].median().unstack(1)
    else:
        return (df.log_odds_ko - df.log_odds).groupby([df.layer, df.source], sort=False).mean().unstack(1).sort_index()
    return 100 * table.sort_index()


def plot_information_flow(df, path, title: Optional[str] = None, statistic: str = "pooled") -> Path:
    """Paper-style curves: % change of p(answer) (or of its log-odds) per source class against layer (PNG).

    ``df``: :func:`information_flow`'s DataFrame (it is summarised here, as
    :func:`summarize_information_flow` does). ``statistic``: see that function.
    """
    from tl_mamba.plotting import new_figure

    summary = summarize_information_flow(df, statistic)
    fig, ax = new_figure((6, 4))
    for source in summary.columns:
        ax.plot(summary.index, summary[source], marker="o", label=source)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xticks(list(summary.index))  # layers are integers: no ticks at 0.5, 1.5
    ax.set_xlabel("layer (window centre)")
    ax.set_ylabel("mean change in log-odds of the answer" if statistic == "log_odds" else
                  "% change in p(answer)" + (" (pooled)" if statistic == "pooled" else f" ({statistic})"))
    ax.set_title(title or "knockout of source → last")
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def plot_per_token_flow(values: torch.Tensor, labels: Sequence[str], path, title: Optional[str] = None) -> Path:
    """Heatmap of :func:`information_flow_per_token` (layer × source token, in %)."""
    from tl_mamba.plotting import layer_position_heatmap

    return layer_position_heatmap(100 * values, path, title or "% change in p(answer) when token → last is knocked out",
                                  xlabels=labels, xlabel="source token", ylabel="layer (window centre)")


def features_by_decay(model, layer: int, tokens=None, attention_mask=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank a layer's features (Mamba-1 channels, Mamba-2 heads) from fastest to slowest decay.

    The decay rate of a feature is ``Δ·|A|``: how much of the state one step forgets
    (``exp(−Δ|A|)`` is kept). Δ is the mean over the real tokens of ``tokens`` when given
    (a token tensor ``[b, p]``, a string or a list of strings, run through the model), else
    the Δ of a zero input (softplus of the bias). Padding is left out: ``attention_mask``
    ``[b, p]`` (1 = real token), or, when None, the padding the forward infers and each row's
    trailing run of pad tokens (``to_tokens``' right padding; strings are padded by the
    tokenizer). For Mamba-1, |A| is averaged over the state entries of the channel.

    Returns ``(order, rates)``: feature indices sorted by decreasing rate, and the
    rate of every feature. ``order[:k]`` are the fast-decay (short memory) features
    to pass as ``channels=`` / ``heads=``; ``order[-k:]`` the slow-decay ones.
    """
    cfg = model.cfg
    layer = check_index(layer, cfg.n_layers, "layer")
    mixer = model.blocks[layer].mixer
    if tokens is None and attention_mask is not None:
        raise ValueError("features_by_decay: attention_mask marks the padding of tokens, and no tokens were given")
    dtype = compute_dtype(mixer.A_log)
    with torch.no_grad():
        A = torch.exp(mixer.A_log.to(dtype))  # |A|
        A = A.mean(-1) if cfg.family == "mamba1" else A
        if tokens is not None:
            name = f"blocks.{layer % cfg.n_layers}.hook_delta"
            from tl_mamba.models.tokens import trailing_padding

            tokens, real = model._prepare_input(tokens, attention_mask, None, None)  # (checked as the forward's)
            if real is None and attention_mask is None and model.tokenizer is not None:
                real = trailing_padding(tokens, model._pad_id())  # to_tokens' right padding too
            _, cache = model.run_with_cache(tokens, attention_mask=real, names_filter=name,
                                            stop_at_layer=layer % cfg.n_layers + 1)
            delta = cache[name].to(dtype)  # [b, p, features]
            delta = delta.flatten(0, 1).mean(0) if real is None else delta[real.to(delta.device).bool()].mean(0)
        elif cfg.family == "mamba1":
            delta = torch.nn.functional.softplus(mixer.dt_proj.bias.to(dtype))
        else:
            delta = torch.nn.functional.softplus(mixer.dt_bias.to(dtype))
        rates = delta * A
    return torch.argsort(rates, descending=True), rates
