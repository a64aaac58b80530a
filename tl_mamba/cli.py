"""The ``tl-mamba`` command.

    tl-mamba demo [--model MODEL] [--out DIR]        the README's main job (IOI patching tour)
    tl-mamba models                                  the shipped toy models and their accuracies
    tl-mamba hooks [MODEL]                           every hook with its shape
    tl-mamba eval MODEL [--n 200]                    accuracy on the toy tasks (facts, IOI, needle by length)
    tl-mamba run MODEL "prompt" [--top 10]           top next tokens and a logit lens
    tl-mamba knockout [MODEL] [--task facts [--sources S,..] [--statistic log_odds] | --prompt "..." [--answer WORD]]
                      [--window W] [--path ssm|conv|both] [--heads I,.. | --channels I,..]
                                                     information flow by knockout: table and plot
    tl-mamba circuit [MODEL] [--task ioi|facts|needle [--length N]] [--level auto|layer|head|component] [--channel-groups G] [--method EAP-IG|EAP|ACDC [--threshold T]]
                                                     edge attribution: top edges, faithfulness, circuit PNG + JSON

Bad arguments (an unknown model, a prompt the tokenizer cannot encode, an
output folder that cannot be written) print a message and exit with code 2.

MODEL is a shipped name (``toy-mamba2``, ``toy-mamba``; see ``tl-mamba models``),
a local checkpoint directory, a hub id (when online), or, for the commands that
need no text (``hooks``), ``random``: a seeded random-init Mamba-1 with no tokenizer.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import torch


DEFAULT_MODEL = "toy-mamba2"
DEFAULT_NEEDLE_LENGTHS = "64,128,256,384,512"  # tl-mamba eval --lengths
DEFAULT_CIRCUIT_TOP = 20  # tl-mamba circuit --top (EAP, EAP-IG)


def _console():
    """A rich console; when the output is not a terminal (a pipe, a log, a test) tables get
    120 columns instead of rich's 80 so they are not squeezed. Markup is off: shapes like
    "[b, p, d]" and tokens like "[" are text, not style tags."""
    from rich.console import Console

    return Console(soft_wrap=True, markup=False, width=None if sys.stdout.isatty() else 120)


def _device(name: str):
    """``--device``: ``"auto"`` is CUDA where torch sees a GPU, else the CPU; any other name goes
    through the loader's own check (:func:`tl_mamba.loading.check_device`), refused by name where
    torch does not know it or this machine lacks it."""
    import torch

    from tl_mamba.loading import check_device

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check_device(name)
    except ValueError as err:
        raise UsageError(f"--device {name!r}: {err}") from None
    return torch.device(name)


def _load(model: str, device: str = "auto"):
    import tl_mamba
    from tl_mamba import HookedMamba, HookedMambaConfig

    device = _device(device)
    if model == "random":
        cfg = HookedMambaConfig(n_layers=4, d_model=64, d_vocab=256, d_state=16, seed=0, model_name="random-mamba")
        return HookedMamba(cfg).to(device).eval()
    try:
        return tl_mamba.from_pretrained(model, device=device).eval()
    except (OSError, ValueError):
        import difflib

        from tl_mamba.toy.shipped import shipped_models

        close = difflib.get_close_matches(model, list(shipped_models()) + ["random"], n=2)
        if close and not Path(model).exists():  # a typo of a shipped name, not a real folder or hub id
            raise UsageError(f"no model {model!r}: did you mean {' or '.join(map(repr, close))}? (`tl-mamba models` "
                             "lists the shipped models)") from None
        raise


def cmd_hooks(args) -> int:
    from rich.table import Table

    from tl_mamba.hooks_doc import hook_table, size_symbols

    model = _load(args.model, args.device)
    table = Table(title=f"hooks of {type(model).__name__} ({model.cfg.model_name})")
    for column in ("hook", "shape", "what"):
        table.add_column(column)
    for row in hook_table(model, strict=False):
        table.add_row(*row)
    console = _console()
    console.print(table)
    legend = ", ".join(f"{symbol} = {size}" for size, symbol in size_symbols(model) if symbol not in ("b", "p", "1"))
    console.print(f"sizes: {legend}; b batch, p position; blocks.{{l}} for l in 0..{model.cfg.n_layers - 1}")
    return 0


def _writable_dir(out: str) -> Path:
    out_dir = Path(out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".tl_mamba_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write plots to {out_dir}: {err.strerror or err}") from None
    return out_dir


def _prompt_tokens(model, prompt: str) -> torch.Tensor:
    """``model.to_tokens(prompt)``, refusing an empty prompt or one with words the tokenizer does not know."""
    if not prompt.strip():
        raise UsageError("the prompt is empty")
    import warnings

    from tl_mamba import UnknownTokenWarning

    with warnings.catch_warnings(record=True) as caught:  # the model's own check, made an error here
        warnings.simplefilter("always", UnknownTokenWarning)
        tokens = model.to_tokens(prompt)
    unknown = [w for w in caught if issubclass(w.category, UnknownTokenWarning)]
    if unknown:
        raise UsageError(f"the prompt has words the tokenizer does not know: {unknown[0].message}; "
                         "use words from the model's vocabulary")
    return tokens


def _check_toy_vocabulary(model, name: str) -> None:
    """The toy tasks are written in the toy vocabulary; other tokenizers would read them as unknowns."""
    from tl_mamba.toy import vocab as toy_vocab

    try:
        toy_vocab.check_tokenizer(model.tokenizer, f"model {name!r}")
    except ValueError as err:
        raise UsageError(str(err)) from None


def cmd_demo(args) -> int:
    """A short tour on a shipped toy model: cache, logit lens, and activation patching of an
    IOI pair over layer × position for ``resid_pre`` and ``hook_h``."""
    from rich.table import Table
    from transformer_lens import patching

    from tl_mamba.circuits import patch_layer_position
    from tl_mamba.plotting import layer_position_heatmap
    from tl_mamba.toy import make_ioi

    console = _console()
    model = _load(args.model, args.device)
    _check_toy_vocabulary(model, args.model)
    out_dir = _writable_dir(args.out)  # once the inputs are known good: a failed run leaves no empty folder
    console.print(f"tl_mamba demo on {model.cfg.model_name}: {type(model).__name__}, "
                  f"{model.cfg.n_layers} layers, d_model {model.cfg.d_model}, backend {model.backend}")

    # An IOI pair from the held-out split (unseen name/template combination) and its ABC
    # corruption: the second mention of the subject replaced by a third name.
    prompt = make_ioi(1, seed=args.seed, split="heldout")[0]
    clean, corrupted = model.to_tokens(prompt.text), model.to_tokens(prompt.corrupted)  # one token per word
    labels = [f"{i}:{t}" for i, t in enumerate(model.to_str_tokens(clean[0]))]
    io_id, s_id = (model.to_single_token(w) for w in (prompt.meta["IO"], prompt.meta["S"]))
    console.print(f"clean:     {prompt.text!r} -> {prompt.answer!r}")
    console.print(f"corrupted: {prompt.corrupted!r}")

    with torch.no_grad():  # hook_h is a heavy hook: cached only when named
        clean_logits, cache = model.run_with_cache(clean, names_filter=lambda n: not n.endswith("hook_ssm_mask"))
        corrupted_logits = model(corrupted)

    def logit_diff(logits):  # IO minus S at the last position
        return logits[0, -1, io_id] - logits[0, -1, s_id]

    clean_diff, corrupted_diff = float(logit_diff(clean_logits)), float(logit_diff(corrupted_logits))
    top = model.to_string([int(clean_logits[0, -1].argmax())])
    console.print(f"cached {len(cache)} activations; top prediction {top!r}; logit diff (IO - S) "
                  f"clean {clean_diff:.2f}, corrupted {corrupted_diff:.2f}")
    if abs(clean_diff - corrupted_diff) < 1.0:  # the patching scores below divide by this gap
        console.print(f"note: this model barely separates the clean prompt from its corruption (logit diff gap "
                      f"{clean_diff - corrupted_diff:.2f}; the shipped models' is ~20), so the fractions restored "
                      "below are ratios of small numbers and say little")

    # logit lens: the answer's probability read off the residual stream before each layer
    resid, stream_labels = cache.accumulated_resid(apply_ln=True, return_labels=True, pos_slice=-1)
    with torch.no_grad():
        lens = (resid[:, 0] @ model.W_U).softmax(-1)
    table = Table(title=f"logit lens at the last position: p({prompt.answer!r}) and the top token")
    for column in ("stream", "p(answer)", "top token"):
        table.add_column(column, justify="right" if column == "p(answer)" else "left")
    for label, row in zip(stream_labels, lens):
        table.add_row(label, f"{float(row[io_id]):.4f}", repr(model.to_string([int(row.argmax())])))
    console.print(table)

    def metric(logits):  # 1 = clean behaviour restored, 0 = corrupted behaviour
        return (logit_diff(logits) - corrupted_diff) / ((clean_diff - corrupted_diff) or 1.0)

    with torch.no_grad():
        resid_patch = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
        state_patch = patch_layer_position(model, clean, corrupted, metric, hook="h", clean_cache=cache)
    layer_position_heatmap(resid_patch, out_dir / "patch_resid_pre.png",
                           "patching resid_pre clean → corrupted (fraction of IO−S logit diff restored)", labels)
    layer_position_heatmap(state_patch, out_dir / "patch_state.png",
                           "patching hook_h clean → corrupted (fraction of IO−S logit diff restored)", labels)

    s2 = prompt.spans["S2"][0]
    table = Table(title="activation patching: where the IOI information lives")
    for column in ("hook", "at S2 (layer 0)", "best cell", "restored"):
        table.add_column(column)
    for name, values in (("resid_pre", resid_patch), ("hook_h", state_patch)):
        layer, pos = divmod(int(values.argmax()), values.shape[1])
        table.add_row(name, f"{float(values[0, s2]):.2f}", f"layer {layer}, {labels[pos]}",
                      f"{float(values.max()):.2f}")
    console.print(table)
    console.print(f"plots written to {out_dir / 'patch_resid_pre.png'} and {out_dir / 'patch_state.png'}")
    return 0


def cmd_models(args) -> int:
    """The shipped toy models, their sizes and their held-out accuracies (from training)."""
    from rich.table import Table

    from tl_mamba.toy.shipped import shipped_metrics, shipped_models

    models = shipped_models()
    if not models:
        raise UsageError("no shipped models found in the installed package")
    table = Table(title="shipped toy models: tl_mamba.from_pretrained(name)")
    for column in ("name", "family", "size", "params", "MB", "facts", "IOI", "needle@256", "needle@512"):
        table.add_column(column, justify="left" if column in ("name", "family", "size") else "right", no_wrap=True)
    notes = []
    for name, path in models.items():
        config = json.loads((path / "config.json").read_text())
        metrics = shipped_metrics(name)
        layer = config.get("ssm_cfg", {}).get("layer", "Mamba1")
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
        by_len = metrics.get("needle_by_length", {})

        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}%"

        table.add_row(name, layer, f"{config.get('n_layer')}x{config.get('d_model')}", f"{metrics.get('params', 0):,}",
                      f"{size:.1f}", pct(metrics.get("facts")), pct(metrics.get("ioi")), pct(by_len.get("256")),
                      pct(by_len.get("512")))
        note = (f"{name}: {metrics.get('steps', '?')} steps, batch {metrics.get('batch_size', '?')}, "
                f"on {metrics.get('device', '?')} in {metrics.get('train_seconds', 0) / 60:.0f} min")
        if metrics.get("init_from"):  # fine-tuned: these are the last stage's numbers, not the whole training
            note += " (its last stage, continued from an earlier one; docs/toy_models.md lists every stage)"
        notes.append(note)
    console = _console()
    console.print(table)
    console.print("held-out accuracy measured at the end of training; tl-mamba eval NAME --seed S --n N re-measures "
                  "it, with the seed and n in the model's metrics.json ('eval')")
    for note in notes:
        console.print(note)
    return 0


def cmd_eval(args) -> int:
    """Held-out accuracy of a model on the toy tasks, measured now."""
    from rich.table import Table

    from tl_mamba.toy import evaluate, make_dataset
    from tl_mamba.toy.tasks import NEEDLE_MAX_LENGTH, NEEDLE_MIN_LENGTH, check_needle_length

    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))  # (each once)
    unknown = [t for t in tasks if t not in ("facts", "ioi", "needle")]
    if unknown or not tasks:
        raise UsageError(f"unknown task(s) {unknown or tasks}: choose from facts, ioi, needle")
    if args.lengths is not None and "needle" not in tasks:
        raise UsageError(f"--lengths sets the needle task's prompt lengths; --tasks {args.tasks} has no needle "
                         "(add needle to --tasks, or drop --lengths)")
    spec = DEFAULT_NEEDLE_LENGTHS if args.lengths is None else args.lengths
    try:
        lengths: List[int] = list(dict.fromkeys(int(x) for x in spec.split(",") if x))  # (each once)
    except ValueError:
        raise UsageError(f"--lengths must be comma-separated integers, got {args.lengths!r}") from None
    if not lengths:
        raise UsageError(f"--lengths gives no length ({args.lengths!r}): give needle lengths such as 64,128")
    for length in lengths:
        try:  # the library's own bounds (make_needle, needle_accuracy, circuit --length)
            check_needle_length(length)
        except ValueError:
            raise UsageError(f"--lengths must be between {NEEDLE_MIN_LENGTH} and {NEEDLE_MAX_LENGTH} tokens, "
                             f"got {lengths}") from None
    model = _load(args.model, args.device)
    _check_toy_vocabulary(model, args.model)
    rows = []
    for task in tasks:
        if task == "needle":
            for length in lengths:
                prompts = make_dataset("needle", "heldout", args.n, seed=args.seed, length=length)
                rows.append((f"needle @ {length} tokens", evaluate(model, prompts, batch_size=32,
                                                                   desc=f"needle {length}")))
        else:
            prompts = make_dataset(task, "heldout", args.n, seed=args.seed)
            rows.append((task, evaluate(model, prompts, desc=task)))
    table = Table(title=f"held-out accuracy of {args.model} (n = {args.n} per row, seed {args.seed})")
    table.add_column("task")
    table.add_column("accuracy", justify="right")
    for task, accuracy in rows:
        table.add_row(task, f"{100 * accuracy:.1f}%")
    _console().print(table)
    return 0


def cmd_knockout(args) -> int:
    """Information flow by knockout: source classes → last on a toy task, or every token → last of a prompt.

    With ``--prompt`` the scored token is ``--answer`` when given (one token the tokenizer
    knows), else the model's top prediction; either way the run prints which token it
    scores and its probability, and ``knockout_tokens.csv`` records it (``answer``, ``p``).
    """
    from rich.table import Table

    from tl_mamba.experiments import (information_flow, information_flow_per_token, plot_information_flow,
                                      plot_per_token_flow, summarize_information_flow)
    from tl_mamba.toy import make_dataset
    from tl_mamba.toy.tasks import Prompt

    model = _load(args.model, args.device)
    if model.tokenizer is None:
        raise UsageError(f"model {args.model!r} has no tokenizer, so it cannot read prompts")
    if not 1 <= args.window <= model.cfg.n_layers:
        raise UsageError(f"--window must be between 1 and {model.cfg.n_layers} (the model's layers), got {args.window}")
    if args.prompt is not None and (args.n is not None or args.seed is not None):
        raise UsageError("--n and --seed choose a toy task's prompts; --prompt gives the one prompt to use")
    if args.answer is not None and args.prompt is None:
        raise UsageError("--answer names the token to score for --prompt; with --task every prompt is scored "
                         "on its own answer")
    if args.prompt is not None and (args.sources is not None or args.statistic != "pooled"):
        raise UsageError("--sources and --statistic summarise a toy task's span classes; --prompt knocks out "
                         "each of its tokens in turn")
    features = _knockout_features(model, args)
    tokens = _prompt_tokens(model, args.prompt) if args.prompt is not None else None
    answer_id = _answer_token(model, args.answer) if args.answer is not None else None
    n = 32 if args.n is None else args.n
    seed = 0 if args.seed is None else args.seed
    if n < 1:
        raise UsageError(f"--n must be at least 1, got {n}")
    out_dir = _writable_dir(args.out)  # once the inputs are known good: a failed run leaves no empty folder
    stem = out_dir / ("knockout_tokens" if args.prompt is not None else f"knockout_{args.task}")
    outputs = [stem.with_suffix(suffix) for suffix in (".png", ".csv", ".json")]
    replaced = [f.name for f in outputs if f.exists()]
    console = _console()
    console.print(f"knockout on {model.cfg.model_name}: window {args.window}, path {args.path}")
    if args.prompt is not None:
        with torch.no_grad():
            probs = model(tokens)[0, -1].float().softmax(-1)
        top = int(probs.argmax())
        if answer_id is None:
            answer_id, which = top, "the model's top prediction; --answer scores another token"
        elif answer_id == top:
            which = "given by --answer, also the model's top prediction"
        else:
            which = (f"given by --answer; the model's top prediction is {model.to_string([top])!r} "
                     f"at p = {_probability(float(probs[top]))}")
        answer = args.answer if args.answer is not None else model.to_string([answer_id])  # shown; answer_id is scored
        p_answer = float(probs[answer_id])
        console.print(f"scoring p({answer!r}) = {_probability(p_answer)} at the last position ({which})")
        labels = model.to_str_tokens(tokens[0])
        # the user's text and the scored token's id as they are: a text rebuilt from the tokens, or an
        # id turned to text and back, is another prompt or token under a byte-level BPE tokenizer
        prompt = Prompt(text=args.prompt, answer=answer_id, task="text", spans={"last": [tokens.shape[1] - 1]})
        values = information_flow_per_token(model, prompt, window=args.window, path=args.path, **features)
        path = plot_per_token_flow(values, [f"{i}:{t}" for i, t in enumerate(labels)], stem.with_suffix(".png"),
                                   title=f"% change in p({answer!r}) when token → last is knocked out")
        whose = "the model's top prediction" if answer_id == top else "given by --answer"
        table = Table(title=f"token → last knockout: % change in p({answer!r}) = {_probability(p_answer)}, {whose}")
        table.add_column("token")
        for layer in range(values.shape[0]):
            table.add_column(f"layer {layer}", justify="right")
        for pos, label in enumerate(labels):
            table.add_row(f"{pos}:{label}", *[f"{100 * float(values[layer, pos]):+.1f}" for layer in range(values.shape[0])])
        _per_token_frame(values, labels, answer, p_answer).to_csv(stem.with_suffix(".csv"), index=False)
    else:
        prompts = make_dataset(args.task, "heldout", n, seed=seed)
        sources = _knockout_sources(args.task, args.sources, prompts[0])
        frame = information_flow(model, prompts, window=args.window, sources=sources, path=args.path, **features)
        path = plot_information_flow(frame, stem.with_suffix(".png"), statistic=args.statistic,
                                     title=f"{args.task}: knockout of source → last ({args.path}, window {args.window})")
        summary = summarize_information_flow(frame, args.statistic)
        what = {"pooled": "% change in mean p(answer)", "mean": "mean % change in p(answer)",
                "median": "median % change in p(answer)",
                "log_odds": "mean change in the answer's log-odds"}[args.statistic]
        table = Table(title=f"{args.task}: {what} when source → last is knocked out (n = {n} held-out prompts)")
        table.add_column("layer (window centre)")
        for source in sources:
            table.add_column(source, justify="right")
        number = "{:+.2f}" if args.statistic == "log_odds" else "{:+.1f}"
        for layer, row in summary.iterrows():
            table.add_row(str(layer), *[number.format(float(row[source])) for source in sources])
        frame.to_csv(stem.with_suffix(".csv"), index=False)
    # how the CSV was made (it holds only the numbers): model, what was knocked out, which prompts
    from tl_mamba import __version__

    record = {"tl_mamba_version": __version__, "model": args.model, "model_name": model.cfg.model_name,
              "path": args.path, "window": args.window, **features}
    if args.prompt is not None:
        record.update(prompt=args.prompt, answer=answer, p_answer=p_answer)
    else:
        record.update(task=args.task, n=n, seed=seed, split="heldout", sources=list(sources),
                      statistic=args.statistic)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    console.print(table)
    console.print(f"wrote {path}, {stem.with_suffix('.csv')} and {stem.with_suffix('.json')} (how it was made)"
                  + (f"; replacing an earlier run's {', '.join(replaced)}: give --out to keep both" if replaced else ""))
    return 0


TASK_SOURCES = {"facts": ("subject", "relation", "first", "last", "context"),
                "ioi": ("IO", "S1", "S2", "first", "last", "context"),
                "needle": ("needle", "query", "distractors", "last", "context")}
"""The span classes ``tl-mamba knockout --task`` knocks out by default."""


def _knockout_sources(task: str, given: Optional[str], example) -> tuple:
    """``--sources`` as span names (default :data:`TASK_SOURCES`), each one the task's prompts have."""
    if given is None:
        return TASK_SOURCES[task]
    names = tuple(dict.fromkeys(name.strip() for name in given.split(",") if name.strip()))
    unknown = [name for name in names if name not in example.spans]
    if not names or unknown:
        raise UsageError(f"--sources {given!r}: {'no span named' if not names else f'unknown span(s) {unknown}'}; "
                         f"the {task} prompts have {', '.join(sorted(example.spans))}")
    return names


def _knockout_features(model, args) -> dict:
    """``--heads`` / ``--channels`` as ``information_flow``'s ``heads=`` / ``channels=`` (checked)."""
    for what, family, size in (("heads", "mamba2", model.cfg.n_heads), ("channels", "mamba1", model.cfg.d_inner)):
        given = getattr(args, what)
        if given is None:
            continue
        if model.cfg.family != family:
            other = "--channels (Mamba-1 d_inner channels)" if what == "heads" else "--heads (Mamba-2 heads)"
            raise UsageError(f"--{what} is for {'Mamba-2' if family == 'mamba2' else 'Mamba-1'} models; "
                             f"{model.cfg.model_name} takes {other}")
        try:
            chosen = [int(v) for v in given.split(",") if v.strip()]
        except ValueError:
            raise UsageError(f"--{what} takes comma-separated integers, got {given!r}") from None
        bad = [v for v in chosen if not -size <= v < size]
        if not chosen or bad:
            raise UsageError(f"--{what} {given!r}: " + (f"{bad} out of range" if bad else "none given")
                             + f"; the model has {size} {what}")
        return {what: chosen}
    return {}


def _per_token_frame(values: torch.Tensor, labels: list, answer: str, p: float):
    """A per-token knockout's ``[layers, p]`` relative changes as a long table: one row per
    (layer, token), ``change`` as in the printed table divided by 100; every row also names the
    scored ``answer`` and its clean probability ``p``."""
    import pandas as pd

    return pd.DataFrame([{"layer": layer, "position": pos, "token": label, "answer": answer, "p": p,
                          "change": float(values[layer, pos])}
                         for layer in range(values.shape[0]) for pos, label in enumerate(labels)])


def _probability(p: float) -> str:
    """``p`` to four decimals, with more digits near 0 and 1: a near-certain or a negligible
    answer should not print as 1.0000 or 0.0000."""
    if p < 1e-3:
        return f"{p:.2e}"
    return f"{p:.6f}" if p > 0.999 else f"{p:.4f}"


def _answer_token(model, answer: str) -> int:
    """The id of ``--answer``: ``model.to_single_token``, which refuses more than one token and
    a word the tokenizer does not know (a word-level tokenizer reads it as its unknown token)."""
    if not answer.strip():
        raise UsageError("--answer is empty; give the one token to score")
    try:
        return model.to_single_token(answer)
    except ValueError as err:
        raise UsageError(f"--answer: {err}. Knockout scores one token the tokenizer knows (give the first "
                         "token's text, with its leading space if the tokenizer has one)") from None


def cmd_run(args) -> int:
    """Top next tokens for a prompt, and the logit lens of the top token across layers."""
    from rich.table import Table

    console = _console()
    model = _load(args.model, args.device)
    if model.tokenizer is None:
        raise UsageError(f"model {args.model!r} has no tokenizer, so it cannot read a text prompt")
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    tokens = _prompt_tokens(model, args.prompt)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_resid_pre")
                                             or n.endswith("hook_resid_post") or n.startswith("ln_final"))
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(min(args.top, probs.numel()))
    table = Table(title=f"next token after {args.prompt!r}")
    for column in ("rank", "token", "id", "prob"):
        table.add_column(column, justify="right" if column != "token" else "left")
    for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), start=1):
        table.add_row(str(rank), repr(model.to_string([i])), str(i), f"{p:.4f}")
    console.print(table)
    best = int(top.indices[0])
    with torch.no_grad():
        resid, labels = cache.accumulated_resid(apply_ln=True, pos_slice=-1, return_labels=True)
        lens = (resid[:, 0] @ model.W_U).float().softmax(-1)
    table = Table(title=f"logit lens: p({model.to_string([best])!r}) in the residual stream at the last position")
    table.add_column("stream")
    table.add_column("p", justify="right")
    table.add_column("top token")
    for label, row in zip(labels, lens):
        table.add_row(label, f"{float(row[best]):.4f}", repr(model.to_string([int(row.argmax())])))
    console.print(table)
    return 0


def cmd_circuit(args) -> int:
    """EAP / EAP-IG (or ACDC) on a toy task's clean/corrupted pairs: top edges, faithfulness, circuit PNG and JSON."""
    from rich.table import Table

    from tl_mamba.circuits import Graph, attribute, evaluate_baseline, faithfulness, logit_diff, task_batches
    from tl_mamba.circuits.eap import method_steps
    from tl_mamba.circuits.graph import check_channel_group_count
    from tl_mamba.models.mamba2 import HookedMamba2

    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}")
    if args.method != "EAP-IG" and args.steps is not None:
        raise UsageError(f"--steps sets EAP-IG's interpolation steps; {args.method} takes none")
    if args.threshold is not None and args.method != "ACDC":
        raise UsageError("--threshold is ACDC's; EAP and EAP-IG keep the --top edges")
    if args.top is not None and args.method == "ACDC":
        raise UsageError("--top is EAP's and EAP-IG's; ACDC keeps the edges whose removal changes the KL by "
                         "at least --threshold")
    if args.top is None:
        args.top = DEFAULT_CIRCUIT_TOP
    if args.threshold is not None and not args.threshold >= 0:
        raise UsageError(f"--threshold must be >= 0, got {args.threshold}")
    if args.steps is not None and args.steps < 1:  # None: attribute's own default
        raise UsageError(f"--steps must be at least 1, got {args.steps}")
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    task_options = {}
    if args.length is not None:
        from tl_mamba.toy.tasks import NEEDLE_MAX_LENGTH, NEEDLE_MIN_LENGTH, check_needle_length

        if args.task != "needle":
            raise UsageError(f"--length sets the needle task's prompt length; --task {args.task} has its own prompts")
        try:  # before the model loads
            check_needle_length(args.length)
        except ValueError:
            raise UsageError(f"--length must be between {NEEDLE_MIN_LENGTH} and {NEEDLE_MAX_LENGTH}, "
                             f"got {args.length}") from None
        task_options["length"] = args.length
    model = _load(args.model, args.device)
    _check_toy_vocabulary(model, args.model)
    level = args.level
    if level == "auto":
        level = "head" if isinstance(model, HookedMamba2) else "layer"
    channel_groups = None
    if args.channel_groups is not None and (level != "head" or isinstance(model, HookedMamba2)):
        raise UsageError("--channel-groups splits a Mamba-1 model's d_inner channels at --level head")
    if level == "head" and not isinstance(model, HookedMamba2):
        if args.channel_groups is None:
            raise UsageError("--level head on Mamba-1 needs --channel-groups G (Mamba-1 has no heads: G groups "
                             "of its d_inner channels stand in for them); or use layer or component")
        channel_groups = args.channel_groups
        try:  # the graph's own rule (tl_mamba.circuits.graph), as patching applies it too
            check_channel_group_count(channel_groups, model.cfg.d_inner)
        except ValueError:
            raise UsageError(
                f"--channel-groups must divide d_inner = {model.cfg.d_inner}, got {channel_groups}") from None
    out_dir = _writable_dir(args.out)  # once the inputs are known good: a failed run leaves no empty folder
    console = _console()
    batches = task_batches(model, args.task, n=args.n, seed=args.seed, batch_size=args.batch_size, **task_options)
    clean_value = float(evaluate_baseline(model, batches, None, logit_diff).mean())
    corrupted_value = float(evaluate_baseline(model, batches, None, logit_diff, run_corrupted=True).mean())
    console.print(f"{args.method} on {model.cfg.model_name}, task {args.task} ({args.n} held-out pairs), "
                  f"{level}-level graph; logit diff clean {clean_value:.2f}, corrupted {corrupted_value:.2f}")
    graph = Graph.from_model(model, level=level, channel_groups=channel_groups)
    if args.method == "ACDC":
        return _circuit_by_acdc(args, model, graph, batches, (clean_value, corrupted_value), task_options,
                                out_dir, console)
    attribute(model, graph, batches, None, logit_diff, method=args.method,
              ig_steps=args.steps if args.method == "EAP-IG" else None)

    table = Table(title=f"top {min(args.top, len(graph.edges))} of {len(graph.edges)} edges (score ≈ change of the logit diff "
                        "when the edge carries its corrupted value)")
    for column in ("rank", "edge", "score"):
        table.add_column(column, justify="left" if column == "edge" else "right")
    for rank, (name, score) in enumerate(graph.top_edges(args.top), 1):
        table.add_row(str(rank), name, f"{score:+.3f}")
    console.print(table)

    curve = Table(title="faithfulness of the top-n circuit: (circuit - corrupted) / (clean - corrupted)")
    curve.add_column("top n", justify="right")
    curve.add_column("edges kept", justify="right")  # after pruning edges off every input → logits path
    curve.add_column("faithfulness", justify="right")
    # up to every edge: the full graph's row reads 1.000 (a check of the baselines)
    sizes = sorted({k for k in (1, 2, 5, 10, 20, 50, args.top) if k <= len(graph.edges)} | {len(graph.edges)})
    scores = graph.scores.clone()
    with warnings.catch_warnings():  # a top-n pruned to nothing shows as 0 edges kept; the note below says it
        warnings.filterwarnings("ignore", message="pruning removed all")
        for k in sizes:
            graph.scores = scores
            graph.apply_topn(k)
            value = faithfulness(model, graph, batches, None, logit_diff, quiet=True,
                                 baselines=(clean_value, corrupted_value))
            curve.add_row(str(k), str(graph.count_included_edges()), f"{value:.3f}")
        console.print(curve)
        graph.scores = scores
        graph.apply_topn(args.top)
    graph.metadata = _circuit_metadata(
        args, model, task_options, (clean_value, corrupted_value),
        ig_steps=method_steps(args.method, args.steps) if args.method == "EAP-IG" else None, top=args.top)
    json_path = graph.to_json(out_dir / "circuit.json")
    png_path = graph.to_image(out_dir / "circuit.png", title=f"{model.cfg.model_name} {args.task}: top {args.top} "
                              f"edges by {args.method} ({graph.count_included_edges()} after pruning)")
    if graph.count_included_edges() == 0:
        console.print(f"note: none of the top {args.top} edges lies on a complete input → logits path, so pruning "
                      "left an empty circuit; raise --top (the faithfulness table shows where edges start to stay)")
    console.print(f"wrote {png_path} and {json_path}")
    return 0


def _circuit_metadata(args, model, task_options, baselines, **method) -> dict:
    """What circuit.json records of how a ``circuit`` run was made: the run's settings and
    baselines, and ``method``'s own (EAP-IG's steps and top n, ACDC's threshold ...)."""
    from tl_mamba import __version__

    return {"tl_mamba_version": __version__, "model": args.model, "model_name": model.cfg.model_name,
            "task": args.task, **task_options, "method": args.method, "n": args.n, "seed": args.seed,
            "batch_size": args.batch_size, "metric": "logit_diff", "logit_diff_clean": baselines[0],
            "logit_diff_corrupted": baselines[1], **method}


def _circuit_by_acdc(args, model, graph, batches, baselines, task_options, out_dir, console) -> int:
    """``circuit --method ACDC``: the edges ACDC keeps (KL objective, ``--threshold``), their
    trial changes, the circuit's faithfulness, and the PNG and JSON."""
    from rich.table import Table

    from tl_mamba.circuits import acdc, faithfulness, logit_diff

    threshold = 0.01 if args.threshold is None else args.threshold
    acdc(model, graph, batches, threshold=threshold)
    info = graph.metadata["acdc"]
    kept = [(name, float(graph.scores[e.index])) for name, e in graph.edges.items() if bool(graph.in_graph[e.index])]
    table = Table(title=f"ACDC kept {len(kept)} of {len(graph.edges)} edges (KL threshold {threshold}; "
                        "score = rise of the KL when the edge was tried)")
    for column in ("edge", "score"):
        table.add_column(column, justify="left" if column == "edge" else "right")
    for name, score in sorted(kept, key=lambda item: -abs(item[1])):
        table.add_row(name, f"{score:+.4f}")
    console.print(table)
    value = faithfulness(model, graph, batches, None, logit_diff, quiet=True, baselines=baselines)
    console.print(f"faithfulness of the ACDC circuit: {value:.3f} (logit diff; (circuit - corrupted) / "
                  f"(clean - corrupted)); final KL {info['objective']:.4f}, {info['forwards']} patched forwards")
    graph.metadata = _circuit_metadata(args, model, task_options, baselines, threshold=threshold, objective="kl",
                                       faithfulness=value, final_kl=info["objective"], forwards=info["forwards"])
    json_path = graph.to_json(out_dir / "circuit.json")
    png_path = graph.to_image(out_dir / "circuit.png", title=f"{model.cfg.model_name} {args.task}: ACDC "
                              f"(threshold {threshold}), {len(kept)} edges")
    console.print(f"wrote {png_path} and {json_path}")
    return 0


class UsageError(Exception):
    """A bad argument: reported as a message with exit code 2, never a traceback."""


MODEL_HELP = f"shipped name or checkpoint dir (default {DEFAULT_MODEL})"


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="tl-mamba", description="Mamba models in TransformerLens")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the README's main job: an IOI patching tour on a shipped toy model")
    demo.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    demo.add_argument("--out", default="tl_mamba_demo", help="folder for the plots (default tl_mamba_demo)")
    demo.add_argument("--seed", type=int, default=0, help="which held-out IOI prompt to use (default 0)")
    demo.set_defaults(func=cmd_demo)
    models = sub.add_parser("models", help="the shipped toy models and their accuracies")
    models.set_defaults(func=cmd_models)
    hooks = sub.add_parser("hooks", help="every hook with its shape")
    hooks.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    hooks.set_defaults(func=cmd_hooks)
    evaluate = sub.add_parser("eval", help="accuracy on the toy tasks (held-out prompts)")
    evaluate.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    evaluate.add_argument("--n", type=int, default=200, help="prompts per task and per needle length (default 200)")
    evaluate.add_argument("--tasks", default="facts,ioi,needle", help="comma-separated (default facts,ioi,needle)")
    evaluate.add_argument("--lengths", default=None,
                          help=f"with needle in --tasks: needle lengths in tokens (default {DEFAULT_NEEDLE_LENGTHS})")
    evaluate.add_argument("--seed", type=int, default=0,
                          help="which held-out prompts (default 0; a shipped model's metrics.json names the seed "
                               "and n of its recorded accuracies, under 'eval')")
    evaluate.set_defaults(func=cmd_eval)
    knockout = sub.add_parser("knockout", help="information flow by knockout (source → last, per layer window)")
    knockout.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    source = knockout.add_mutually_exclusive_group()
    source.add_argument("--task", choices=("facts", "ioi", "needle"), default="facts",
                        help="a toy task: knock out each span class → last (default facts)")
    source.add_argument("--prompt", default=None, help="a prompt: knock out each token → last")
    knockout.add_argument("--answer", default=None, metavar="WORD",
                          help="with --prompt: the one token whose probability is scored (default: the model's "
                               "top prediction)")
    knockout.add_argument("--window", type=int, default=1, help="layers per knockout window, around each layer and clipped at the first and last (default 1)")
    knockout.add_argument("--path", choices=("ssm", "conv", "both"), default="ssm",
                          help="which token → token terms to remove (default ssm)")
    knockout.add_argument("--sources", default=None, metavar="SPAN[,SPAN...]",
                          help="with --task: the span classes to knock out (default: facts subject,relation,first,"
                               "last,context; ioi IO,S1,S2,first,last,context; needle needle,query,distractors,last,"
                               "context). Also non_subject (facts), S1_plus_1, names, needle_key, query_key, ...")
    knockout.add_argument("--statistic", choices=("pooled", "mean", "median", "log_odds"), default="pooled",
                          help="with --task: how the table and plot summarise the prompts (default pooled: %% change "
                               "of the mean p; log_odds: mean change of the answer's log-odds, which still moves "
                               "where p is near 1)")
    features = knockout.add_mutually_exclusive_group()
    features.add_argument("--heads", default=None, metavar="I[,I...]",
                          help="Mamba-2: knock out in these heads only (default all)")
    features.add_argument("--channels", default=None, metavar="I[,I...]",
                          help="Mamba-1: knock out in these d_inner channels only (default all)")
    knockout.add_argument("--n", type=int, default=None, help="prompts (with --task; default 32)")
    knockout.add_argument("--seed", type=int, default=None, help="which held-out prompts (with --task; default 0)")
    knockout.add_argument("--out", default="tl_mamba_knockout",
                          help="folder for the plot, the CSV and a JSON of the run's settings (default tl_mamba_knockout; "
                               "the CSV's change is a fraction, -1.0 = -100%%)")
    knockout.set_defaults(func=cmd_knockout)
    circuit = sub.add_parser("circuit", help="EAP / EAP-IG / ACDC circuit discovery on a toy task (IOI by default)")
    circuit.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=MODEL_HELP)
    circuit.add_argument("--task", choices=("ioi", "facts", "needle"), default="ioi", help="(default ioi)")
    circuit.add_argument("--length", type=int, default=None,
                         help="with --task needle: tokens per prompt, BOS included (default 128)")
    circuit.add_argument("--level", choices=("auto", "layer", "head", "component"), default="auto",
                         help="graph level (auto: head for Mamba-2, layer for Mamba-1)")
    circuit.add_argument("--channel-groups", type=int, default=None,
                         help="Mamba-1 at --level head: senders are this many groups of the d_inner channels")
    circuit.add_argument("--method", choices=("EAP", "EAP-IG", "ACDC"), default="EAP-IG", type=str.upper,
                         help="attribution method, or ACDC's exact pruning (case does not matter; default EAP-IG)")
    circuit.add_argument("--threshold", type=float, default=None,
                         help="ACDC: how much the KL may rise when an edge is removed (default 0.01)")
    circuit.add_argument("--steps", type=int, default=None,
                         help="EAP-IG interpolation steps (default: attribute's, 5)")
    circuit.add_argument("--n", type=int, default=64, help="held-out clean/corrupted pairs (default 64)")
    circuit.add_argument("--batch-size", type=int, default=32, help="pairs per forward (default 32)")
    circuit.add_argument("--top", type=int, default=None,
                         help=f"EAP / EAP-IG: edges to keep in the circuit (default {DEFAULT_CIRCUIT_TOP}; "
                              "ACDC chooses its own)")
    circuit.add_argument("--seed", type=int, default=0, help="which held-out pairs (default 0)")
    circuit.add_argument("--out", default="tl_mamba_circuit",
                         help="folder for circuit.png and circuit.json (default tl_mamba_circuit)")
    circuit.set_defaults(func=cmd_circuit)
    run = sub.add_parser("run", help="top next tokens and a logit lens for a prompt")
    run.add_argument("model", help="shipped name, checkpoint dir or hub id (one with a tokenizer: the prompt is text)")
    run.add_argument("prompt")
    run.add_argument("--top", type=int, default=10, help="next tokens to list (default 10)")
    run.set_defaults(func=cmd_run)
    for command in (demo, hooks, evaluate, knockout, circuit, run):
        command.add_argument("--device", default="auto",
                             help="where the model runs: auto (CUDA where torch sees a GPU, else cpu), cpu, cuda, "
                                  "cuda:1 ... (default auto)")
    args = parser.parse_args(argv)  # argparse itself exits 2 on bad syntax
    shown, warnings.formatwarning = warnings.formatwarning, _format_warning
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, PermissionError, NotImplementedError, OSError) as err:
        print(f"tl-mamba {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """A library warning as a command-line user reads it: its kind and message on lines of their own
    (not the file, line number and echoed source line Python shows programmers; the leading newline
    keeps it off a progress bar's line)."""
    return f"\n{category.__name__}: {message}\n"


if __name__ == "__main__":
    sys.exit(main())
