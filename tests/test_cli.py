"""The `tl-mamba` command: every subcommand runs, every bad argument exits 2 with a message."""


import pytest

from tl_mamba.cli import main
from tl_mamba.toy.shipped import shipped_metrics, shipped_models


def test_demo_writes_plots(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path)]) == 0
    for name in ("patch_resid_pre.png", "patch_state.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    out = capsys.readouterr().out
    assert "logit lens" in out and "activation patching" in out and "corrupted:" in out
    # resid_pre patching at S2 in layer 0 swaps in the whole clean prompt's information
    # (the prompts differ only there), so it restores the clean logit difference exactly
    row = next(line for line in out.splitlines() if line.strip("│ ").startswith("resid_pre"))
    cells = [cell.strip() for cell in row.split("│") if cell.strip()]  # hook, at S2 (layer 0), best, restored
    assert float(cells[1]) == pytest.approx(1.0, abs=5e-3)
    assert "barely separates" not in out


def test_demo_on_a_model_that_cannot_do_ioi_says_so(tmp_path, capsys):
    """A model trained for 3 steps: the clean and corrupted logit differences are close, so every
    fraction restored is a ratio of small numbers; the demo says so instead of printing 'restored 1.00'."""
    from tl_mamba.toy.train import main as train

    argv = ["--arch", "mamba2", "--steps", "3", "--batch-size", "4", "--d-model", "16", "--n-layers", "1",
            "--d-state", "8", "--max-needle-len", "64", "--eval-n", "2", "--device", "cpu"]
    assert train(argv + ["--out", str(tmp_path / "weak")]) == 0
    capsys.readouterr()
    assert main(["demo", "--model", str(tmp_path / "weak"), "--out", str(tmp_path / "demo")]) == 0
    assert "barely separates the clean prompt from its corruption" in capsys.readouterr().out


def test_hooks_lists_contract_hooks(capsys):
    assert main(["hooks"]) == 0
    out = capsys.readouterr().out
    for hook in ("hook_h", "hook_ssm_mask", "hook_delta", "ln_final.hook_scale"):
        assert hook in out
    embed_row = next(line for line in out.splitlines() if "hook_embed" in line)
    assert "[b, p, d]" in embed_row  # shapes are printed as text, not eaten as rich markup


def test_models_lists_shipped_models_with_accuracies(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in shipped_models():
        assert name in out
        ioi = shipped_metrics(name)["ioi"]
        assert f"{100 * ioi:.1f}%" in out
        # a model fine-tuned from an earlier stage says its step count is the last stage's only
        note = next(line for line in out.splitlines() if line.startswith(f"{name}:"))
        assert ("last stage" in note) == bool(shipped_metrics(name).get("init_from"))


def test_knockout_task_and_prompt(tmp_path, capsys):
    assert main(["knockout", "--task", "facts", "--n", "4", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "subject" in out and "relation" in out and "layer" in out
    assert (tmp_path / "knockout_facts.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "knockout_facts.csv").stat().st_size > 100
    assert main(["knockout", "--prompt", "The capital of Kor Mav Vor is", "--window", "2", "--path", "both",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "3:of" in out and "6:Vor" in out
    # without --answer the run says which token it scores: here the fact itself
    assert "scoring p('Brevik') = 0.99" in out and "the model's top prediction" in out
    assert (tmp_path / "knockout_tokens.png").read_bytes()[:4] == b"\x89PNG"
    assert "replacing" not in out and "knockout_tokens.csv" in out  # both files are named
    # a second run into the same folder says what it replaces
    assert main(["knockout", "--task", "facts", "--n", "2", "--out", str(tmp_path)]) == 0
    assert "replacing an earlier run's knockout_facts.png, knockout_facts.csv, knockout_facts.json" in (
        capsys.readouterr().out)
    import json

    record = json.loads((tmp_path / "knockout_facts.json").read_text())
    assert record["task"] == "facts" and record["n"] == 2 and record["seed"] == 0 and record["path"] == "ssm"
    record = json.loads((tmp_path / "knockout_tokens.json").read_text())
    assert record["prompt"] == "The capital of Kor Mav Vor is" and record["answer"] == "Brevik"
    assert record["path"] == "both" and record["window"] == 2


def test_circuit_prints_edges_and_faithfulness_and_writes_png_and_json(tmp_path, capsys):
    import json

    assert main(["circuit", "--n", "12", "--steps", "2", "--top", "10", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "input->m0" in out and "faithfulness" in out
    assert (tmp_path / "circuit.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "circuit.json").read_text())
    assert data["level"] == "head" and sum(e["in_graph"] for e in data["edges"].values()) <= 10
    assert data["metadata"]["ig_steps"] == 2
    # the curve ends at the whole graph, whose faithfulness is 1 by definition; no Python warnings
    last = [line for line in out.splitlines() if line.strip().startswith("│")][-1].split("│")
    assert int(last[1]) == len(data["edges"]) and float(last[3]) == pytest.approx(1.0, abs=1e-3)
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # the pruning warnings stay out of the CLI's output
        warnings.simplefilter("always")
        assert main(["circuit", "--n", "4", "--top", "1", "--out", str(tmp_path)]) == 0  # EAP-IG, default steps
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
    assert json.loads((tmp_path / "circuit.json").read_text())["metadata"]["ig_steps"] == 5


def test_knockout_sources_statistic_and_features(tmp_path, capsys):
    """--sources (e.g. the paper's non-subject class), --statistic log_odds and --heads reach
    information_flow: the CSV equals a Python run with the same arguments, the table its
    log-odds summary, and the JSON records them; bad values exit 2 naming what is wrong."""
    import json

    import pandas as pd

    from tl_mamba.cli import _load
    from tl_mamba.experiments import information_flow, summarize_information_flow
    from tl_mamba.toy import make_dataset

    args = ["knockout", "toy-mamba2", "--task", "facts", "--n", "6", "--sources", "subject,non_subject",
            "--statistic", "log_odds", "--heads", "0,3", "--out", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mean change in the answer's log-odds" in out and "non_subject" in out and "relation" not in out
    frame = pd.read_csv(tmp_path / "knockout_facts.csv")
    model = _load("toy-mamba2")
    want = information_flow(model, make_dataset("facts", "heldout", 6, seed=0), window=1,
                            sources=("subject", "non_subject"), heads=[0, 3], progress=False)
    assert list(frame.source.unique()) == ["subject", "non_subject"]
    for column in ("p", "p_ko", "log_odds", "log_odds_ko"):
        assert frame[column].to_numpy() == pytest.approx(want[column].to_numpy(), rel=1e-5, abs=1e-7)
    summary = summarize_information_flow(want, "log_odds")
    assert f"{float(summary.loc[3, 'subject']):+.2f}" in out
    record = json.loads((tmp_path / "knockout_facts.json").read_text())
    assert record["sources"] == ["subject", "non_subject"] and record["statistic"] == "log_odds"
    assert record["heads"] == [0, 3]
    for bad, message in ((["--sources", "subjct"], "unknown span(s) ['subjct']"),
                         (["--heads", "0,99"], "[99] out of range; the model has 8 heads"),
                         (["--channels", "1"], "--channels is for Mamba-1 models"),
                         (["--heads", "x"], "comma-separated integers"),
                         (["--prompt", "Vel is", "--statistic", "log_odds"], "--sources and --statistic summarise")):
        task = [] if "--prompt" in bad else ["--task", "facts", "--n", "2"]
        assert main(["knockout", "toy-mamba2", *task, *bad, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err


def test_knockout_prompt_csv_matches_a_knockout_by_hand(tmp_path):
    """The per-token CSV holds (p_ko - p) / p of the model's top answer, checked at the largest
    change against the public Knockout API run by hand."""
    import pandas as pd
    import torch

    from tl_mamba import Knockout, toy
    from tl_mamba.cli import _load

    prompt = "The capital of Kor Mav Vor is"
    assert main(["knockout", "--prompt", prompt, "--window", "1", "--out", str(tmp_path)]) == 0
    frame = pd.read_csv(tmp_path / "knockout_tokens.csv")
    model = _load("toy-mamba2")
    tokens = model.to_tokens(prompt)
    assert len(frame) == model.cfg.n_layers * tokens.shape[1]
    row = frame.loc[frame["change"].abs().idxmax()]
    assert abs(row["change"]) > 1e-3  # some token matters somewhere
    with torch.no_grad():
        probs = model(tokens)[0, -1].softmax(-1)
        answer = int(probs.argmax())
        ko = Knockout(layers=[int(row["layer"])], sources=[int(row["position"])], targets=[-1], path="ssm")
        p_ko = model.run_with_knockout(tokens, ko)[0, -1].softmax(-1)[answer]
    assert row["change"] == pytest.approx(float((p_ko - probs[answer]) / probs[answer]), rel=1e-4, abs=1e-6)
    # the top prediction is the entity's real capital, and the CSV names it with its probability
    assert model.to_string([answer]) == toy.fact("Kor Mav Vor", "capital") == "Brevik"
    assert set(frame["answer"]) == {"Brevik"}
    assert frame["p"].iloc[0] == pytest.approx(float(probs[answer]), rel=1e-4)


def test_knockout_prompt_on_a_byte_level_bpe_tokenizer_scores_the_users_tokens(tmp_path, monkeypatch):
    """A GPT-NeoX-style tokenizer (the real checkpoints'): its tokens carry their leading space, so
    the prompt must be knocked out as the user's text, not rebuilt from the tokens. Every CSV row is
    checked against the public Knockout API run by hand on model.to_tokens(prompt)."""
    import pandas as pd
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import tl_mamba.cli as cli
    from tl_mamba import HookedMamba, HookedMambaConfig, Knockout

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["The Eiffel Tower is in the city of Paris"] * 20, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<bos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>")
    model = HookedMamba(HookedMambaConfig(n_layers=2, d_model=32, d_vocab=320, d_state=8, seed=0),
                        tokenizer=tokenizer).eval()
    with torch.no_grad():
        for param in model.parameters():  # off the init, so that knockouts change something
            param.add_(0.3 * torch.randn(param.shape, generator=torch.Generator().manual_seed(1)))
    monkeypatch.setattr(cli, "_load", lambda name, device="auto": model)
    prompt = "The Eiffel Tower is in the city of"
    assert main(["knockout", "bpe-model", "--prompt", prompt, "--window", "1", "--out", str(tmp_path)]) == 0
    frame = pd.read_csv(tmp_path / "knockout_tokens.csv")
    tokens = model.to_tokens(prompt)
    assert tokens.shape[1] == 9 and model.to_str_tokens(tokens[0])[2] == " Eiffel"
    assert len(frame) == model.cfg.n_layers * tokens.shape[1]
    assert list(frame["token"][:9]) == model.to_str_tokens(tokens[0])
    with torch.no_grad():
        probs = model(tokens)[0, -1].softmax(-1)
        answer = int(probs.argmax())
        for row in frame.itertuples():
            ko = Knockout(layers=[row.layer], sources=[row.position], targets=[-1], path="ssm")
            p_ko = model.run_with_knockout(tokens, ko)[0, -1].softmax(-1)[answer]
            # (the CLI runs its knockouts batched: fp32 rounding, 1.1e-5 at most here, 3.6e-7 in float64)
            assert row.change == pytest.approx(float((p_ko - probs[answer]) / probs[answer]), abs=5e-5)
    assert frame["change"].abs().max() > 0.1


@pytest.mark.parametrize("model_name", ["toy-mamba2", "toy-mamba"])
def test_knockout_answer_scores_the_given_token(tmp_path, capsys, model_name):
    """``--answer`` scores that token, not the top prediction: every cell of the CSV is
    (p_ko - p) / p of the given token, checked against the public Knockout API by hand at the
    cells that move it most. The prompt is about an entity that is not in the toy world, so the
    model guesses (toy-mamba2: 'Duvall' at p ~ 0.47) and p('Brevik') is tiny but still scored."""
    import pandas as pd
    import torch

    from tl_mamba import Knockout
    from tl_mamba.cli import _load

    prompt = "The capital of Zor Vel Quen is"
    assert main(["knockout", model_name, "--prompt", prompt, "--answer", "Brevik", "--window", "1",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "scoring p('Brevik')" in out and "given by --answer; the model's top prediction is" in out
    frame = pd.read_csv(tmp_path / "knockout_tokens.csv")
    model = _load(model_name)
    tokens = model.to_tokens(prompt)
    brevik = model.tokenizer.convert_tokens_to_ids("Brevik")
    with torch.no_grad():
        probs = model(tokens)[0, -1].float().softmax(-1)
    assert int(probs.argmax()) != brevik  # the point of --answer: not the top prediction
    assert set(frame["answer"]) == {"Brevik"} and frame["p"].iloc[0] == pytest.approx(float(probs[brevik]), rel=1e-4)
    for _, row in frame.reindex(frame["change"].abs().sort_values(ascending=False).index).head(3).iterrows():
        ko = Knockout(layers=[int(row["layer"])], sources=[int(row["position"])], targets=[-1], path="ssm")
        with torch.no_grad():
            p_ko = model.run_with_knockout(tokens, ko)[0, -1].float().softmax(-1)[brevik]
        expected = float((p_ko - probs[brevik]) / probs[brevik])
        assert row["change"] == pytest.approx(expected, rel=1e-3, abs=1e-5)


def test_circuit_json_records_how_it_was_made(tmp_path):
    import json

    from tl_mamba import __version__
    from tl_mamba.circuits import Graph

    assert main(["circuit", "toy-mamba", "--n", "4", "--method", "eap", "--top", "5", "--seed", "3",
                 "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "circuit.json").read_text())["metadata"]
    assert meta["model"] == "toy-mamba" and meta["task"] == "ioi" and meta["method"] == "EAP"
    assert meta["n"] == 4 and meta["seed"] == 3 and meta["top"] == 5 and meta["tl_mamba_version"] == __version__
    assert meta["ig_steps"] is None  # EAP takes no steps
    assert meta["logit_diff_clean"] > meta["logit_diff_corrupted"]
    assert Graph.from_json(tmp_path / "circuit.json").metadata == meta


def test_circuit_on_the_needle_task(tmp_path, capsys):
    """--task needle --length: the needle pairs of that length, their clean / corrupted logit
    differences as evaluate_baseline gives them by hand, and the length in circuit.json."""
    import json

    from tl_mamba.circuits import evaluate_baseline, logit_diff, task_batches
    from tl_mamba.cli import _load

    assert main(["circuit", "toy-mamba2", "--task", "needle", "--length", "64", "--n", "6", "--method", "EAP",
                 "--top", "5", "--out", str(tmp_path)]) == 0
    meta = json.loads((tmp_path / "circuit.json").read_text())["metadata"]
    assert meta["task"] == "needle" and meta["length"] == 64
    model = _load("toy-mamba2")
    batches = task_batches(model, "needle", n=6, length=64)
    assert all(clean.shape[1] == 64 for clean, _, _ in batches)
    assert meta["logit_diff_clean"] == pytest.approx(float(evaluate_baseline(model, batches, None, logit_diff).mean()))
    assert meta["logit_diff_clean"] > 0 > meta["logit_diff_corrupted"]  # the model retrieves the needle's value
    assert "task needle" in capsys.readouterr().out


def test_circuit_by_acdc(tmp_path, capsys):
    """--method ACDC: the edges kept are those of acdc() on the same pairs, at the given threshold,
    the printed faithfulness is that circuit's, and circuit.json says how it was made."""
    import torch

    from tl_mamba.circuits import Graph, acdc, faithfulness, logit_diff, task_batches
    from tl_mamba.cli import _load

    assert main(["circuit", "toy-mamba", "--method", "acdc", "--threshold", "0.02", "--n", "6",
                 "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    saved = Graph.from_json(tmp_path / "circuit.json")
    meta = saved.metadata
    assert meta["method"] == "ACDC" and meta["threshold"] == 0.02 and meta["objective"] == "kl"
    model = _load("toy-mamba")
    batches = task_batches(model, "ioi", n=6, seed=0, batch_size=32)
    by_hand = acdc(model, Graph.from_model(model, "layer"), batches, threshold=0.02, quiet=True)
    assert torch.equal(saved.in_graph, by_hand.in_graph)
    assert 0 < by_hand.count_included_edges() < len(by_hand.edges)
    value = faithfulness(model, by_hand, batches, None, logit_diff, quiet=True)
    assert meta["faithfulness"] == pytest.approx(value, abs=1e-6)
    assert f"faithfulness of the ACDC circuit: {value:.3f}" in out
    assert f"ACDC kept {by_hand.count_included_edges()} of {len(by_hand.edges)} edges" in out
    for argv, message in ((["--threshold", "0.1"], "--threshold is ACDC's"),
                          (["--method", "acdc", "--steps", "3"], "ACDC takes none"),
                          (["--method", "acdc", "--threshold", "-1"], "--threshold must be >= 0"),
                          (["--method", "acdc", "--top", "5"], "--top is EAP's and EAP-IG's")):  # (was ignored)
        assert main(["circuit", "toy-mamba", "--n", "2", "--out", str(tmp_path), *argv]) == 2
        assert message in capsys.readouterr().err


def test_graph_metadata_must_be_json(tmp_path):
    import torch

    from tl_mamba.circuits import Graph

    graph = Graph(family="mamba2", n_layers=1, n_heads=2, level="layer")
    graph.metadata["mask"] = torch.ones(2)
    with pytest.raises(TypeError, match=r"metadata\['mask'\]"):
        graph.to_json(tmp_path / "g.json")


def test_circuit_on_mamba1_channel_groups(tmp_path, capsys):
    import json

    argv = ["circuit", "toy-mamba", "--level", "head", "--channel-groups", "4", "--n", "8", "--method", "EAP",
            "--top", "6", "--out", str(tmp_path)]
    assert main(argv) == 0
    assert ".c" in capsys.readouterr().out
    data = json.loads((tmp_path / "circuit.json").read_text())
    assert data["level"] == "head" and data["channel_groups"] == 4


def test_eval_reports_accuracy(capsys):
    assert main(["eval", "toy-mamba2", "--n", "16", "--lengths", "64"]) == 0
    out = capsys.readouterr().out
    for task in ("facts", "ioi", "needle @ 64 tokens"):
        assert task in out
    # the shipped model's IOI accuracy is high on any sample; a broken eval would print ~0-50%
    ioi_row = next(line for line in out.splitlines() if "ioi" in line)
    assert float(ioi_row.split()[-2].rstrip("%")) >= 80.0


def test_eval_with_the_recorded_seed_and_n_reproduces_the_shipped_accuracies(capsys):
    """metrics.json's 'eval' names the prompts training measured on (seed + 1, --eval-n): toy-mamba2's
    facts (97.7%, 293 of 300) and IOI come back exactly with them, and differ with seed 0."""
    from tl_mamba.toy.shipped import shipped_metrics

    recorded = shipped_metrics("toy-mamba2")
    seed, n = recorded["eval"]["seed"], recorded["eval"]["n"]

    def measured(seed):
        assert main(["eval", "toy-mamba2", "--n", str(n), "--tasks", "facts,ioi", "--seed", str(seed)]) == 0
        rows = {line.split()[1]: float(line.split()[-2].rstrip("%")) for line in capsys.readouterr().out.splitlines()
                if line.startswith("│")}
        return rows["facts"], rows["ioi"]

    assert measured(seed) == (round(100 * recorded["facts"], 1), round(100 * recorded["ioi"], 1))
    assert measured(0) != measured(seed)


def test_eval_lists_a_task_or_length_named_twice_once(capsys):
    assert main(["eval", "toy-mamba2", "--tasks", "needle,needle", "--n", "2", "--lengths", "64,64"]) == 0
    assert capsys.readouterr().out.count("needle @ 64 tokens") == 1


def test_library_warnings_read_as_messages_on_the_command_line(capsys):
    """A warning the library raises under the CLI prints as its kind and message on a line of its own,
    not with Python's file:line prefix and echoed source line (glued to a progress bar)."""
    import sys
    import warnings

    import tl_mamba.cli as cli

    def warn(args):
        warnings.warn("something to know", UserWarning)
        return 0

    shown = warnings.formatwarning
    original = cli.cmd_models
    try:
        cli.cmd_models = warn
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            # Python's own display (pytest records warnings instead): formatwarning's text to stderr
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: \
                sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
            assert main(["models"]) == 0
    finally:
        cli.cmd_models = original
    err = capsys.readouterr().err
    assert "\nUserWarning: something to know\n" in err and ".py:" not in err
    assert warnings.formatwarning is shown  # put back for the rest of the process


def test_eval_takes_the_library_needle_lengths(capsys):
    """eval accepts the needle lengths make_needle accepts (it refused 13-15), by the same check."""
    from tl_mamba.toy.tasks import NEEDLE_MIN_LENGTH

    assert main(["eval", "toy-mamba2", "--tasks", "needle", "--n", "2", "--lengths", str(NEEDLE_MIN_LENGTH)]) == 0
    assert f"needle @ {NEEDLE_MIN_LENGTH} tokens" in capsys.readouterr().out


# ---------------------------------------------------------------- run, errors, save/load round trip
import subprocess
import sys

import torch

import tl_mamba
from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig


@pytest.fixture
def saved_model(tmp_path, tokenizer):
    model = HookedMamba(HookedMambaConfig(n_layers=2, d_model=16, d_vocab=48, seed=1), tokenizer=tokenizer)
    return model, model.save_pretrained(tmp_path / "ckpt")


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_save_pretrained_round_trip(tmp_path, tokenizer, family):
    extra = dict(n_heads=4, n_groups=2, dt_limit=(0.01, 0.5)) if family == "mamba2" else {}
    cfg = HookedMambaConfig(family=family, n_layers=2, d_model=16, d_vocab=48, seed=2, **extra)
    model = (HookedMamba if family == "mamba1" else HookedMamba2)(cfg, tokenizer=tokenizer)
    gen = torch.Generator().manual_seed(2)  # the same model whichever tests ran before
    with torch.no_grad():  # move every weight off its init so the round trip is checked on real values
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen, dtype=param.dtype).to(param.device) * 0.1)
    path = model.save_pretrained(tmp_path / family)
    loaded = tl_mamba.from_pretrained(str(path))
    assert type(loaded) is type(model) and loaded.tokenizer is not None
    tokens = torch.randint(0, 48, (2, 9))
    torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert loaded.to_tokens("the cat").tolist() == model.to_tokens("the cat").tolist()


def test_run_prints_top_tokens_and_lens(saved_model, capsys):
    model, path = saved_model
    assert main(["run", str(path), "the cat sat", "--top", "3"]) == 0
    out = capsys.readouterr().out
    expected = model.to_string([int(model("the cat sat")[0, -1].argmax())])
    assert repr(expected) in out and "logit lens" in out and "final_post" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "/nonexistent/model-dir", "the cat"], "does not exist"),
        (["run", "random", "the cat"], "no tokenizer"),
        (["demo", "--out", "/proc/no-such-dir/x"], "cannot write"),
        (["demo", "--model", "no-such-model", "--out", "/tmp"], "no-such-model"),
        (["eval", "random"], "no tokenizer"),
        (["eval", "toy-mamba2", "--n", "0"], "--n"),
        (["eval", "toy-mamba2", "--lengths", "64,abc"], "--lengths"),
        (["eval", "toy-mamba2", "--lengths", "8"], "--lengths must be between 13 and 4096"),
        (["eval", "toy-mamba2", "--tasks", "poetry"], "unknown task"),
        (["hooks", "no-such-model"], "no-such-model"),
        (["knockout", "--window", "9", "--out", "/tmp"], "--window"),
        (["knockout", "--prompt", "the zyzzyva is", "--out", "/tmp"], "does not know"),
        (["knockout", "random", "--out", "/tmp"], "no tokenizer"),
        (["circuit", "toy-mamba", "--level", "head", "--out", "/tmp"], "--channel-groups"),
        (["circuit", "toy-mamba", "--level", "head", "--channel-groups", "5", "--out", "/tmp"], "divide d_inner"),
        (["circuit", "toy-mamba2", "--channel-groups", "4", "--out", "/tmp"], "Mamba-1"),
        (["circuit", "--n", "0", "--out", "/tmp"], "--n"),
        (["knockout", "--prompt", "the cat", "--n", "8", "--out", "/tmp"], "--prompt gives the one prompt"),
        (["knockout", "--prompt", "the cat", "--seed", "1", "--out", "/tmp"], "--prompt gives the one prompt"),
        (["circuit", "--batch-size", "0", "--out", "/tmp"], "--batch-size"),
        (["circuit", "--length", "64", "--out", "/tmp"], "--length sets the needle task's prompt length"),
        (["circuit", "--task", "needle", "--length", "8", "--out", "/tmp"], "--length must be between"),
        (["circuit", "--method", "EAP", "--steps", "3", "--out", "/tmp"], "EAP-IG"),
        (["circuit", "--method", "EAP", "--steps", "5", "--out", "/tmp"], "EAP-IG"),  # the default value too
        (["run", "toy-mamba", "the cat", "--top", "0"], "--top"),
        (["knockout", "--prompt", " ", "--out", "/tmp"], "empty"),
        (["knockout", "--answer", "Brevik", "--out", "/tmp"], "--answer names the token to score for --prompt"),
        (["knockout", "--task", "ioi", "--answer", "Mary", "--out", "/tmp"], "--answer names the token"),
        (["knockout", "--prompt", "The capital of Kor Mav Vor is", "--answer", "Brevik Tarsis", "--out", "/tmp"],
         "--answer: 'Brevik Tarsis' is 2 tokens, not one"),
        (["knockout", "--prompt", "The capital of Kor Mav Vor is", "--answer", "Paris", "--out", "/tmp"],
         "--answer: 'Paris' is not in the tokenizer's vocabulary"),
        (["knockout", "--prompt", "The capital of Kor Mav Vor is", "--answer", " ", "--out", "/tmp"],
         "--answer is empty"),
        (["circuit", "--steps", "0", "--out", "/tmp"], "--steps"),
        (["eval", "--tasks", "ioi", "--lengths", "64"], "--lengths sets the needle task's prompt lengths"),
        (["eval", "--tasks", "facts,ioi", "--lengths", "64,128"], "has no needle"),
        (["eval", "--tasks", "needle", "--lengths", "12"], "--lengths must be between 13 and 4096 tokens"),
        (["eval", "--tasks", "needle", "--lengths", ","], "--lengths gives no length"),
        (["circuit", "--out", "/proc/no-such-dir/x"], "cannot write"),
        (["circuit", "random", "--out", "/tmp"], "no tokenizer"),
    ],
)
def test_errors_exit_2_with_a_message(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_unknown_words_exit_2(saved_model, capsys):
    _, path = saved_model
    assert main(["run", str(path), "the zyzzyva sat"]) == 2
    assert "does not know" in capsys.readouterr().err


def test_run_on_shipped_model(capsys):
    assert main(["run", "toy-mamba2", "The capital of Kor Mav Vor is", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "logit lens" in out and "'Brevik'" in out  # the entity's real capital, toy.fact("Kor Mav Vor", "capital")


def test_eval_refuses_a_foreign_vocabulary(saved_model, capsys):
    _, path = saved_model
    assert main(["eval", str(path)]) == 2
    assert "toy vocabulary" in capsys.readouterr().err


def test_cli_entry_point_exits_2_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "tl_mamba.cli", "run", "/nonexistent/model-dir", "x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_a_near_miss_model_name_gets_a_suggestion(capsys):
    assert main(["run", "toy_mamba2", "the cat"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'toy-mamba2'" in err and "tl-mamba models" in err


@pytest.mark.parametrize("argv", [
    ["knockout", "toy-mamba2", "--window", "10"],
    ["knockout", "toy-mamba2", "--prompt", "The capital of Kor Mav Vor is", "--answer", "Paris"],
    ["circuit", "toy-mamba3"],
    ["demo", "--model", "toy-mamba3"],
    ["circuit", "toy-mamba", "--level", "head"],
])
def test_a_failed_run_leaves_no_output_folder(argv, tmp_path, capsys):
    """The inputs are checked before the output folder is made (a failed run left it empty)."""
    out = tmp_path / "out"
    assert main(argv + ["--out", str(out)]) == 2
    assert not out.exists()


def test_an_empty_pruned_circuit_is_said(tmp_path, capsys):
    """When none of the top edges lies on a complete input → logits path, pruning leaves nothing:
    the run says so instead of writing an empty circuit silently."""
    assert main(["circuit", "toy-mamba", "--n", "4", "--level", "component", "--method", "EAP", "--task", "facts",
                 "--top", "3", "--out", str(tmp_path)]) == 0
    from tl_mamba.circuits import Graph

    assert Graph.from_json(tmp_path / "circuit.json").count_included_edges() == 0
    assert "pruning left an empty circuit" in capsys.readouterr().out
