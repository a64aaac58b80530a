"""The ``tl-mamba`` command.

    tl-mamba demo [--model PATH_OR_ID] [--out DIR]   the README's main job
    tl-mamba hooks [MODEL]                            every hook with its shape
    tl-mamba run MODEL "prompt" [--top 10]            top next tokens and a logit lens

Bad arguments (an unknown model, a prompt the tokenizer cannot encode, an
output folder that cannot be written) print a message and exit with code 2.

MODEL is a local checkpoint directory, a hub id (when online), or ``random``:
a seeded random-init Mamba-1 (the default until the shipped toy models land).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch


def _load(model: str):
    import tl_mamba
    from tl_mamba import HookedMamba, HookedMambaConfig

    if model == "random":
        cfg = HookedMambaConfig(n_layers=4, d_model=64, d_vocab=256, d_state=16, seed=0, model_name="random-mamba")
        return HookedMamba(cfg).eval()
    return tl_mamba.from_pretrained(model).eval()


def cmd_hooks(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tl_mamba.hooks_doc import hook_table

    model = _load(args.model)
    table = Table(title=f"hooks of {type(model).__name__} ({model.cfg.model_name})")
    for column in ("hook", "shape", "what"):
        table.add_column(column)
    for row in hook_table(model):
        table.add_row(*row)
    Console().print(table)
    return 0


def _state_patching(model, clean, corrupted, clean_cache, metric):
    """Patch the clean SSM state ``hook_h`` into the corrupted run, per layer × position."""
    from tqdm.auto import tqdm

    n_layers, p = model.cfg.n_layers, clean.shape[1]
    result = torch.zeros(n_layers, p)
    for layer in tqdm(range(n_layers), desc="hook_h patching"):
        name = f"blocks.{layer}.hook_h"
        for pos in range(p):

            def patch(h, hook, pos=pos):
                h = h.clone()
                h[:, pos] = clean_cache[hook.name][:, pos]
                return h

            result[layer, pos] = metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, patch)]))
    return result


def _heatmap(values: torch.Tensor, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1 + 0.45 * values.shape[1], 1 + 0.45 * values.shape[0]))
    bound = float(values.abs().max()) or 1.0
    image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xlabel("position")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_demo(args) -> int:
    """A short tour: cache, logit lens, activation patching of resid_pre and hook_h, generation."""
    from rich.console import Console
    from rich.table import Table
    from transformer_lens import patching

    console = Console(soft_wrap=True)
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".tl_mamba_write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write plots to {out_dir}: {err.strerror or err}") from None
    model = _load(args.model)
    console.print(f"[bold]tl_mamba demo[/bold] on {model.cfg.model_name}: {type(model).__name__}, "
                  f"{model.cfg.n_layers} layers, d_model {model.cfg.d_model}, backend {model.backend}")

    gen = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (1, 10), generator=gen)
    corrupted = clean.clone()
    corrupted[0, 3] = (clean[0, 3] + 1) % model.cfg.d_vocab  # one token differs
    if model.tokenizer is not None:
        console.print(f"clean prompt: {model.to_string(clean[0])!r}")

    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(clean)
        corrupted_logits = model(corrupted)
    answer = int(clean_logits[0, -1].argmax())
    rival = int(corrupted_logits[0, -1].argmax())
    if rival == answer:
        rival = int(clean_logits[0, -1].topk(2).indices[1])

    def logit_diff(logits):
        return logits[0, -1, answer] - logits[0, -1, rival]

    clean_diff, corrupted_diff = float(logit_diff(clean_logits)), float(logit_diff(corrupted_logits))
    console.print(f"cached {len(cache)} activations; logit diff clean {clean_diff:.3f}, corrupted {corrupted_diff:.3f}")

    # logit lens: the answer's probability read off the residual stream before each layer
    resid, labels = cache.accumulated_resid(apply_ln=True, return_labels=True, pos_slice=-1)
    lens_probs = (resid @ model.W_U).softmax(-1)[:, 0, answer]
    table = Table(title="logit lens: p(answer) at the last position")
    table.add_column("stream")
    table.add_column("p(answer)", justify="right")
    for label, prob in zip(labels, lens_probs.tolist()):
        table.add_row(label, f"{prob:.4f}")
    console.print(table)

    def metric(logits):
        return (logit_diff(logits) - corrupted_diff) / ((clean_diff - corrupted_diff) or 1.0)

    with torch.no_grad():
        resid_patch = patching.get_act_patch_resid_pre(model, corrupted, cache, metric)
        _, state_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_h"))
        state_patch = _state_patching(model, clean, corrupted, state_cache, metric)
    _heatmap(resid_patch.detach(), "patching resid_pre (fraction of logit diff restored)", out_dir / "patch_resid_pre.png")
    _heatmap(state_patch.detach(), "patching hook_h (fraction of logit diff restored)", out_dir / "patch_state.png")
    console.print(f"resid_pre patching: restored {float(resid_patch[0, 3]):.3f} at layer 0, position 3 "
                  f"(the changed token); hook_h patching max {float(state_patch.max()):.3f}")

    with torch.no_grad():
        generated = model.generate(clean, max_new_tokens=8, do_sample=False, verbose=False)
        prefix_logits = model(generated[:, :-1])[0, -1]
    console.print(f"greedy continuation: {generated[0, clean.shape[1]:].tolist()} "
                  f"(last step agrees with a full forward: {int(prefix_logits.argmax()) == int(generated[0, -1])})")
    console.print(f"plots written to {out_dir}/patch_resid_pre.png and {out_dir}/patch_state.png")
    return 0


def cmd_run(args) -> int:
    """Top next tokens for a prompt, and the logit lens of the top token across layers."""
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    model = _load(args.model)
    if model.tokenizer is None:
        raise UsageError(f"model {args.model!r} has no tokenizer, so it cannot read a text prompt")
    tokens = model.to_tokens(args.prompt)
    unk = getattr(model.tokenizer, "unk_token_id", None)
    if unk is not None and bool((tokens == unk).any()):
        words = [s for s, t in zip(model.to_str_tokens(tokens[0]), tokens[0].tolist()) if t == unk]
        raise UsageError(f"the prompt has words the tokenizer does not know ({len(words)} unknown token(s)); "
                         "use words from the model's vocabulary")
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


class UsageError(Exception):
    """A bad argument: reported as a message with exit code 2, never a traceback."""


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="tl-mamba", description="Mamba models in TransformerLens")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the README's main job: a short tour on a model")
    demo.add_argument("--model", default="random", help="checkpoint dir, hub id, or 'random' (default)")
    demo.add_argument("--out", default="tl_mamba_demo", help="folder for the plots")
    demo.set_defaults(func=cmd_demo)
    hooks = sub.add_parser("hooks", help="every hook with its shape")
    hooks.add_argument("model", nargs="?", default="random")
    hooks.set_defaults(func=cmd_hooks)
    run = sub.add_parser("run", help="top next tokens and a logit lens for a prompt")
    run.add_argument("model", help="checkpoint dir, hub id, or 'random'")
    run.add_argument("prompt")
    run.add_argument("--top", type=int, default=10)
    run.set_defaults(func=cmd_run)
    args = parser.parse_args(argv)  # argparse itself exits 2 on bad syntax
    try:
        return args.func(args)
    except (UsageError, ValueError, FileNotFoundError, PermissionError, NotImplementedError, OSError) as err:
        print(f"tl-mamba {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
