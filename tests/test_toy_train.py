"""The toy training script: seeded, reproducible, and its output loads through the public API."""

import json

import pytest
import torch

import tl_mamba
import random

from tl_mamba.toy.train import RECIPES, TASKS, main, needle_top, next_task


def exits_2_saying(capsys, pattern, argv):
    """``main(argv)`` is refused as a usage error: exit code 2, ``pattern`` in the message, no traceback."""
    import re

    with pytest.raises(SystemExit) as err:
        main(argv)
    message = capsys.readouterr().err
    assert err.value.code == 2 and re.search(pattern, message), message
    assert "Traceback" not in message


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_training_is_reproducible_and_loads(tmp_path, arch):
    argv = ["--arch", arch, "--steps", "3", "--batch-size", "4", "--d-model", "16", "--n-layers", "1",
            "--d-state", "8", "--max-needle-len", "64", "--eval-n", "2", "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    first, second = (tl_mamba.from_pretrained(str(tmp_path / d)) for d in ("a", "b"))
    for (name, p1), (_, p2) in zip(first.state_dict().items(), second.state_dict().items()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=0, msg=name)
    fresh = tl_mamba.from_pretrained(str(tmp_path / "a"))
    assert fresh.cfg.d_model == 16 and fresh.cfg.n_layers == 1 and fresh.tokenizer is not None
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and set(metrics["needle_by_length"]) == {"64", "128", "256", "384", "512"}
    assert metrics["eval"] == {"seed": metrics["seed"] + 1, "n": 2}  # what tl-mamba eval needs to re-measure
    assert len(json.loads((tmp_path / "a" / "train_log.json").read_text())) >= 1
    # continuing from a checkpoint starts from its weights
    assert main(argv + ["--out", str(tmp_path / "c"), "--init-from", str(tmp_path / "a"), "--lr", "0"]) == 0
    cont = tl_mamba.from_pretrained(str(tmp_path / "c"))
    for (name, p1), (_, p2) in zip(first.state_dict().items(), cont.state_dict().items()):
        torch.testing.assert_close(p1, p2, msg=name)


@pytest.mark.parametrize("weights", ["1,2", "a,b,c", "1,-1,1"])
def test_bad_arguments_exit_2(tmp_path, capsys, weights):
    exits_2_saying(capsys, "task-weights", ["--arch", "mamba", "--out", str(tmp_path), "--task-weights", weights])


def test_first_phase_runs_its_own_task_weights_then_the_main_ones(tmp_path):
    """--first-phase 0,0,1@3: the first three steps are needle steps only (phase-1 weights),
    then the main weights (1,1,0: no needle) take over; the log records each step's task."""
    argv = ["--arch", "mamba", "--steps", "6", "--batch-size", "2", "--d-model", "16", "--n-layers", "1",
            "--d-state", "8", "--max-needle-len", "64", "--eval-n", "1", "--device", "cpu", "--balance", "tokens",
            "--task-weights", "1,1,0", "--first-phase", "0,0,1@3", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["first_phase"] == {"task_weights": [0.0, 0.0, 1.0], "steps": 3}
    # log_every=100 logs only step 0 and the last: the token counts tell the phases apart
    tokens = metrics["tokens"]
    assert tokens["needle"] > 0 and tokens["facts"] > 0 and tokens["ioi"] > 0
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert log[0]["task"] == "needle" and log[-1]["task"] in ("facts", "ioi")


@pytest.mark.parametrize("phase", ["0,0,1", "0,0,1@x", "0,1@5", "0,0,-1@5"])
def test_bad_first_phase_exits_2(tmp_path, capsys, phase):
    exits_2_saying(capsys, "first-phase", ["--arch", "mamba", "--out", str(tmp_path), "--first-phase", phase])


@pytest.mark.parametrize("arch", ["mamba", "mamba2"])
def test_unset_options_take_the_architecture_recipe(tmp_path, arch):
    """Options not given on the command line come from RECIPES[arch]; given ones win."""
    argv = ["--arch", arch, "--steps", "2", "--d-model", "16", "--n-layers", "1", "--d-state", "8",
            "--eval-n", "1", "--device", "cpu", "--out", str(tmp_path / "a")]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    recipe = RECIPES[arch]
    assert metrics["balance"] == recipe["balance"] and metrics["init"] == recipe["init"]
    assert metrics["batch_size"] == recipe["batch_size"] and metrics["lr"] == recipe["lr"]
    assert metrics["ssm_lr"] == recipe.get("ssm_lr")  # None: one learning rate for every parameter
    assert metrics["task_weights"] == [float(w) for w in recipe["task_weights"].split(",")]
    assert metrics["steps"] == 2 and metrics["context_noise"] == recipe["context_noise"]
    assert metrics["sizes"]["tie_embeddings"] == (recipe["tie_embeddings"] == "yes")
    # continuing keeps the saved model's tying, even where the recipe says otherwise
    other = "no" if recipe["tie_embeddings"] == "yes" else "yes"
    assert main(argv[:-1] + [str(tmp_path / "c"), "--tie-embeddings", other]) == 0
    assert main(argv[:-1] + [str(tmp_path / "d"), "--init-from", str(tmp_path / "c")]) == 0
    metrics = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert metrics["sizes"]["tie_embeddings"] == (other == "yes") and metrics["init"] is None
    assert main(argv[:-1] + [str(tmp_path / "b"), "--balance", "steps", "--init", "default", "--lr", "1e-3"]) == 0
    metrics = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (metrics["balance"], metrics["init"], metrics["lr"]) == ("steps", "default", 1e-3)
    assert metrics["ssm_lr"] is None  # --lr alone sets every parameter's rate, the SSM's included


def test_continuing_keeps_the_saved_embedding_tying(tmp_path, capsys):
    """--init-from an untied model trains it untied (its lm_head is kept); asking for the
    other tying names the mismatch instead of failing inside load_state_dict."""
    argv = ["--arch", "mamba", "--steps", "1", "--batch-size", "2", "--d-model", "16", "--n-layers", "1",
            "--d-state", "8", "--eval-n", "1", "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--tie-embeddings", "no"]) == 0
    saved = tl_mamba.from_pretrained(str(tmp_path / "a"))
    assert saved.cfg.tie_embeddings is False
    assert main(argv + ["--out", str(tmp_path / "b"), "--init-from", str(tmp_path / "a"), "--lr", "0"]) == 0
    cont = tl_mamba.from_pretrained(str(tmp_path / "b"))
    assert cont.cfg.tie_embeddings is False
    for (name, p1), (_, p2) in zip(saved.state_dict().items(), cont.state_dict().items()):
        torch.testing.assert_close(p1, p2, msg=name)
    exits_2_saying(capsys, "tie_embeddings: saved False, asked True",
                   argv + ["--out", str(tmp_path / "c"), "--init-from", str(tmp_path / "a"), "--tie-embeddings", "yes"])


def test_untied_unembedding_can_start_as_a_copy_of_the_embedding(tmp_path, capsys):
    """--tie-embeddings copy: two matrices (the model saves lm_head), equal at step 0;
    it needs fresh weights, so with --init-from it is refused."""
    argv = ["--arch", "mamba", "--steps", "1", "--batch-size", "2", "--d-model", "16", "--n-layers", "1",
            "--d-state", "8", "--eval-n", "1", "--device", "cpu", "--lr", "0", "--weight-decay", "0.1"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--tie-embeddings", "copy"]) == 0
    model = tl_mamba.from_pretrained(str(tmp_path / "a"))
    assert model.cfg.tie_embeddings is False
    torch.testing.assert_close(model.unembed.weight, model.embed.W_E, rtol=0, atol=0)
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["unembed_from_embed"] is True and metrics["weight_decay"] == 0.1
    assert main(argv + ["--out", str(tmp_path / "b"), "--tie-embeddings", "no"]) == 0
    untied = tl_mamba.from_pretrained(str(tmp_path / "b"))
    assert not torch.allclose(untied.unembed.weight, untied.embed.W_E)  # the plain untied start differs
    exits_2_saying(capsys, "copy of the embedding only in a fresh untied model",
                   argv + ["--out", str(tmp_path / "c"), "--tie-embeddings", "copy",
                           "--init-from", str(tmp_path / "a")])


def test_tying_all_but_the_value_rows(tmp_path, capsys):
    """--tie-embeddings except-values: after training, the saved (untied) unembedding equals the
    embedding on every row but the needle's value tokens', which moved on their own; --init-from
    keeps that tie. --tie-embeddings names: equal on the IOI names' rows only;
    except-answers: equal on every row but the values' and the facts attributes'."""
    from tl_mamba.toy.tokenizer import load_tokenizer
    from tl_mamba.toy.vocab import NAMES, VALUES

    argv = ["--arch", "mamba", "--steps", "3", "--batch-size", "4", "--d-model", "16", "--n-layers", "1",
            "--d-state", "8", "--eval-n", "1", "--device", "cpu", "--lr", "1e-2", "--task-weights", "0,0,1"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--tie-embeddings", "except-values", "--seed", "3"]) == 0
    model = tl_mamba.from_pretrained(str(tmp_path / "a"))
    assert model.cfg.tie_embeddings is False
    values = load_tokenizer(tmp_path / "a").convert_tokens_to_ids(list(VALUES))
    free = torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
    free[values] = True
    torch.testing.assert_close(model.unembed.weight[~free], model.embed.W_E[~free], rtol=0, atol=0)
    assert (model.unembed.weight[free] - model.embed.W_E[free]).abs().max() > 1e-4
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["partial_tie"] == "except-values"
    assert main(argv + ["--out", str(tmp_path / "b"), "--tie-embeddings", "copy", "--seed", "3"]) == 0
    copied = tl_mamba.from_pretrained(str(tmp_path / "b"))  # same start, every row its own
    assert (copied.unembed.weight[~free] - copied.embed.W_E[~free]).abs().max() > 1e-4
    # continuing keeps the partial tie (read from metrics.json): the tied rows still equal the
    # embedding after more training, and the value rows go on moving on their own
    assert main(argv + ["--out", str(tmp_path / "c"), "--init-from", str(tmp_path / "a"), "--seed", "4"]) == 0
    cont = tl_mamba.from_pretrained(str(tmp_path / "c"))
    assert (cont.embed.W_E - model.embed.W_E).abs().max() > 1e-4  # it trained
    torch.testing.assert_close(cont.unembed.weight[~free], cont.embed.W_E[~free], rtol=0, atol=0)
    assert (cont.unembed.weight[free] - model.unembed.weight[free]).abs().max() > 1e-4
    assert json.loads((tmp_path / "c" / "metrics.json").read_text())["partial_tie"] == "except-values"
    # tying rows of a plainly untied model would change it: refused, naming the rows
    exits_2_saying(capsys, "rows .* differ from the embedding", argv + ["--out", str(tmp_path / "f"),
                   "--tie-embeddings", "except-values", "--init-from", str(tmp_path / "b")])
    # names: only the IOI names' rows tied (IOI batches here, so that names get gradients)
    ioi = [a if a != "0,0,1" else "0,1,0" for a in argv]
    assert main(ioi + ["--out", str(tmp_path / "d"), "--tie-embeddings", "names", "--seed", "3"]) == 0
    named = tl_mamba.from_pretrained(str(tmp_path / "d"))
    names = torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
    names[load_tokenizer(tmp_path / "d").convert_tokens_to_ids(list(NAMES))] = True
    torch.testing.assert_close(named.unembed.weight[names], named.embed.W_E[names], rtol=0, atol=0)
    assert (named.unembed.weight[~names] - named.embed.W_E[~names]).abs().max() > 1e-4
    # except-answers: the values' and every facts answer's rows free (facts batches, so that
    # the attribute rows get gradients); the answers are read off the prompts, not the vocabulary
    from tl_mamba.toy import tasks as toy_tasks

    facts = [a if a != "0,0,1" else "1,0,0" for a in argv]
    assert main(facts + ["--out", str(tmp_path / "e"), "--tie-embeddings", "except-answers", "--seed", "3"]) == 0
    answers = load_tokenizer(tmp_path / "e").convert_tokens_to_ids(
        sorted({p.answer for p in toy_tasks.make_dataset("facts", "train", 3000, seed=0)}) + list(VALUES))
    free = torch.zeros(model.cfg.d_vocab, dtype=torch.bool)
    free[answers] = True
    untied_answers = tl_mamba.from_pretrained(str(tmp_path / "e"))
    torch.testing.assert_close(untied_answers.unembed.weight[~free], untied_answers.embed.W_E[~free], rtol=0, atol=0)
    assert (untied_answers.unembed.weight[free] - untied_answers.embed.W_E[free]).abs().max() > 1e-4


def test_mimetic_init_is_not_silently_dropped_when_continuing(tmp_path, capsys):
    exits_2_saying(capsys, "--init mimetic .* --init-from",
                   ["--arch", "mamba", "--out", str(tmp_path / "b"), "--init", "mimetic",
                    "--init-from", str(tmp_path / "a")])


def test_token_balance_gives_each_task_its_share_of_tokens():
    """--balance tokens: over a run, each task's share of the tokens processed is its weight,
    however unequal the batch sizes in tokens; a zero weight never runs."""
    cost = {"facts": 14, "ioi": 20, "needle": 150}  # tokens per batch, needle ~10x the others
    weights = (0.2, 0.1, 0.7)
    spent = {t: 0 for t in TASKS}
    steps = {t: 0 for t in TASKS}
    rng = random.Random(0)
    for _ in range(3000):
        task = next_task("tokens", weights, spent, rng)
        spent[task] += cost[task]
        steps[task] += 1
    total = sum(spent.values())
    for task, weight in zip(TASKS, weights):
        assert abs(spent[task] / total - weight) < 0.01, (task, spent)
    assert steps["facts"] > 2 * steps["needle"]  # the cheap task gets many more steps
    spent = {t: 0 for t in TASKS}
    for _ in range(50):
        task = next_task("tokens", (1, 0, 1), spent, rng)
        assert task != "ioi"
        spent[task] += cost[task]
    # --balance steps: random draws in proportion to the weights, whatever they cost
    draws = [next_task("steps", weights, spent, rng) for _ in range(4000)]
    assert abs(draws.count("needle") / 4000 - 0.7) < 0.03
    with pytest.raises(ValueError, match="balance"):
        next_task("time", weights, spent, rng)


def test_needle_curriculum():
    assert needle_top(0, 100, 512) == 64
    assert needle_top(50, 100, 512) == 512 and needle_top(99, 100, 512) == 512


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_mimetic_init_ties_B_to_C_and_slows_decay(family):
    """Mimetic init: C_t·B_s starts as a token similarity (B = C at every position, read
    through the public hooks) and the state barely decays (exp(Δ·A) near 1)."""
    from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig
    from tl_mamba.toy.train import mimetic_init_

    extra = dict(d_head=8, n_groups=1, chunk_size=16) if family == "mamba2" else {}
    cfg = HookedMambaConfig(family=family, n_layers=2, d_model=16, d_vocab=32, d_state=4, seed=0, **extra)
    model = (HookedMamba if family == "mamba1" else HookedMamba2)(cfg)
    tokens = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(0))
    _, before = model.run_with_cache(tokens)
    assert not torch.allclose(before["B", 0], before["C", 0])
    mimetic_init_(model, a_max=0.05)
    _, cache = model.run_with_cache(tokens)
    for layer in range(cfg.n_layers):
        torch.testing.assert_close(cache["B", layer], cache["C", layer])
        A = -torch.exp(model.blocks[layer].mixer.A_log.detach())
        assert A.min() >= -0.05 - 1e-6 and A.max() <= -0.05 / 100 + 1e-6
        delta = cache["delta", layer]  # [b, p, e] or [b, p, h]
        decay = torch.exp(delta[..., None] * A) if family == "mamba1" else torch.exp(delta * A)
        assert decay.min() > 0.99  # Δ ≤ dt_max = 0.1 at init, |A| ≤ 0.05
    # the default init decays some channels fast: the S4D-real A reaches -d_state (Mamba-1), -16 (Mamba-2)
    default = (HookedMamba if family == "mamba1" else HookedMamba2)(cfg)
    assert (-torch.exp(default.blocks[0].mixer.A_log)).min() < -1


def test_ioi_accuracy_is_split_by_what_is_held_out():
    """metrics.json's ioi_by_heldout: held-out-template prompts vs held-out pairs in trained
    templates, checked against a prompt-by-prompt argmax of the shipped model."""
    from tl_mamba.toy import tasks as toy_tasks
    from tl_mamba.toy.train import evaluate_model

    model = tl_mamba.from_pretrained("toy-mamba")
    n = 40
    result = evaluate_model(model, model.tokenizer, seed=5, n=n, max_len=64)
    hits = {"template": [], "pair": []}
    by_template = {}
    vocab = model.tokenizer.get_vocab()
    for prompt in toy_tasks.make_dataset("ioi", "heldout", n, seed=5):
        tokens = model.to_tokens(prompt.text)
        with torch.no_grad():
            top = model(tokens)[0, -1].argmax().item()
        kind = "template" if toy_tasks.ioi_template_is_heldout(prompt.meta["template_index"]) else "pair"
        assert kind == "template" or toy_tasks.ioi_pair_is_heldout(prompt.meta["IO"], prompt.meta["S"])
        hit = top == vocab[prompt.answer]
        hits[kind].append(hit)
        if kind == "template":
            by_template.setdefault(prompt.meta["template_index"], []).append(hit)
    assert set(result["ioi_by_heldout"]) == {k for k, v in hits.items() if v} == {"template", "pair"}
    for kind, correct in hits.items():
        assert result["ioi_by_heldout"][kind] == pytest.approx(sum(correct) / len(correct))
    for index, correct in by_template.items():
        assert result["ioi_by_heldout_template"][str(index)] == pytest.approx(sum(correct) / len(correct))
    assert set(result["ioi_by_heldout_template"]) == {str(i) for i in by_template}
    assert result["ioi"] == pytest.approx(sum(map(sum, hits.values())) / n)


def test_context_noise_replaces_only_context_words_of_facts_and_ioi():
    """Against the prompts' own spans: only ``context`` positions of facts and IOI rows
    change, to words that are not names, keys, values or special tokens; needle rows,
    names, subjects, relations and the last position are untouched; rate 0 changes nothing."""
    from tl_mamba.toy import tasks as toy_tasks
    from tl_mamba.toy.tokenizer import hf_tokenizer
    from tl_mamba.toy.train import context_noise_pool, substitute_context_words
    from tl_mamba.toy.vocab import KEYS, NAMES, VALUES

    tokenizer = hf_tokenizer()
    words = {i: w for w, i in tokenizer.get_vocab().items()}
    pool = context_noise_pool(tokenizer)
    assert not {words[i] for i in pool} & (set(NAMES) | set(KEYS) | set(VALUES))
    assert not set(pool) & set(tokenizer.all_special_ids)
    batch = toy_tasks.training_batch(tokenizer, 48, random.Random(3), weights={"facts": 1, "ioi": 1, "needle": 1},
                                     needle_max_len=64, return_prompts=True)
    assert {p.task for p in batch["prompts"]} == set(TASKS)
    untouched = batch["tokens"].clone()
    assert substitute_context_words(batch["tokens"], batch["attention_mask"], batch["prompts"], pool, 0.0,
                                    random.Random(0)) == 0
    assert torch.equal(batch["tokens"], untouched)
    replaced = substitute_context_words(batch["tokens"], batch["attention_mask"], batch["prompts"], pool, 0.5,
                                        random.Random(0))
    changed = 0
    width = untouched.shape[1]
    for row, prompt in enumerate(batch["prompts"]):
        start = width - prompt.n_tokens
        assert untouched[row, start].item() == tokenizer.bos_token_id  # the spans' origin, independently
        diff = {start + j for j in range(prompt.n_tokens)
                if batch["tokens"][row, start + j] != untouched[row, start + j]}
        assert torch.equal(batch["tokens"][row, :start], untouched[row, :start])  # padding
        allowed = {start + j for j in prompt.spans.get("context", [])} if prompt.task != "needle" else set()
        assert diff <= allowed, (prompt.task, prompt.text)
        assert all(batch["tokens"][row, col].item() in pool for col in diff)
        changed += len(diff)
    assert 0 < changed <= replaced  # a draw can repeat the word it replaces


def test_every_word_is_in_some_training_prompt_or_the_noise_pool():
    """Why the noise exists: some words occur only in held-out IOI frames, so no training
    prompt ever trains their embeddings. Each of them must be one the noise can insert."""
    from tl_mamba.toy import tasks as toy_tasks
    from tl_mamba.toy.tokenizer import hf_tokenizer
    from tl_mamba.toy.train import context_noise_pool

    tokenizer = hf_tokenizer()
    vocab = tokenizer.get_vocab()
    seen = set()
    for task, n in (("facts", 4000), ("ioi", 4000), ("needle", 100)):
        for prompt in toy_tasks.make_dataset(task, "train", n, seed=0):
            seen.update(prompt.words)
            seen.add(prompt.answer)
    never_trained = {i for w, i in vocab.items() if w not in seen} - set(tokenizer.all_special_ids)
    held_out_frame_words = {w for t in toy_tasks.V.IOI_HELDOUT_TEMPLATES
                            for w in toy_tasks.V.IOI_TEMPLATES[t].split(" ") if not w.startswith("{")}
    assert never_trained and {w for w, i in vocab.items() if i in never_trained} <= held_out_frame_words
    assert never_trained <= set(context_noise_pool(tokenizer))


def test_noise_pool_holds_no_word_with_a_part_in_a_facts_answer():
    """Read off the prompts themselves: no word of a facts subject, relation or answer can
    be inserted (a syllable beside a subject spells another entity; an attribute in the
    context is a second candidate answer), while IOI's frame words can."""
    from tl_mamba.toy import tasks as toy_tasks
    from tl_mamba.toy.tokenizer import hf_tokenizer
    from tl_mamba.toy.train import context_noise_pool

    tokenizer = hf_tokenizer()
    pool_words = {w for w, i in tokenizer.get_vocab().items() if i in set(context_noise_pool(tokenizer))}
    with_a_part = set()
    for prompt in toy_tasks.make_dataset("facts", "train", 3000, seed=0):
        with_a_part.add(prompt.answer)
        with_a_part.update(prompt.words[j - 1] for span in ("subject", "relation") for j in prompt.spans[span])
    assert len(with_a_part) > 50 and not with_a_part & pool_words
    frame_words = set()
    for prompt in toy_tasks.make_dataset("ioi", "train", 500, seed=0):
        frame_words.update(prompt.words[j - 1] for j in prompt.spans["context"])
    assert len(frame_words & pool_words) > 20


def test_context_noise_keeps_the_batch_stream(tmp_path):
    """The noise has its own random stream: the same seed with and without it trains on the
    same task sequence (equal token counts), and the metrics record what was replaced."""
    argv = ["--arch", "mamba", "--steps", "6", "--batch-size", "4", "--d-model", "16", "--n-layers", "1",
            "--d-state", "8", "--max-needle-len", "64", "--eval-n", "1", "--device", "cpu"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--context-noise", "0"]) == 0
    assert main(argv + ["--out", str(tmp_path / "b"), "--context-noise", "0.5"]) == 0
    quiet, noisy = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("a", "b"))
    assert quiet["tokens"] == noisy["tokens"]
    assert quiet["context_words_replaced"] == 0 < noisy["context_words_replaced"]
    assert noisy["context_noise"] == 0.5


@pytest.mark.parametrize("rate", ["1", "-0.1", "1.5"])
def test_bad_context_noise_exits_2(tmp_path, capsys, rate):
    exits_2_saying(capsys, "context-noise", ["--arch", "mamba", "--out", str(tmp_path), "--steps", "1",
                                             "--context-noise", rate])


def test_ssm_lr_moves_only_the_ssm_parameters(tmp_path, capsys):
    """--ssm-lr: with --lr ~0 and no weight decay, training moves the SSM parameters (conv,
    x_proj, dt_proj, A_log, D: listed here, not read from the code) and nothing else; a
    negative rate exits 2."""
    argv = ["--arch", "mamba", "--steps", "3", "--batch-size", "4", "--d-model", "16", "--n-layers", "1",
            "--d-state", "8", "--eval-n", "1", "--device", "cpu", "--task-weights", "1,1,1", "--seed", "3",
            "--weight-decay", "0", "--lr", "1e-30", "--ssm-lr", "1e-2", "--tie-embeddings", "yes",
            "--init", "default"]
    assert main(argv + ["--out", str(tmp_path / "a"), "--ssm-lr", "1e-30"]) == 0  # the same start, unmoved
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    start = torch.load(tmp_path / "a" / "pytorch_model.bin", weights_only=True)  # the mamba_ssm layout's file
    trained = torch.load(tmp_path / "b" / "pytorch_model.bin", weights_only=True)
    ssm = ("conv1d", "x_proj", "dt_proj", "A_log", ".D")
    moved = {k for k in start if (start[k] - trained[k]).abs().max() > 1e-6}
    assert moved and all(any(s in k for s in ssm) for k in moved), sorted(moved)
    assert any("x_proj" in k for k in moved) and any("A_log" in k for k in moved)
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["ssm_lr"] == 1e-2
    exits_2_saying(capsys, "--ssm-lr must be non-negative", argv + ["--out", str(tmp_path / "c"), "--ssm-lr", "-1"])


@pytest.mark.parametrize("flag, value, pattern", [
    ("--steps", "0", "--steps must be at least 1"),  # was a ZeroDivisionError
    ("--steps", "-5", "--steps must be at least 1"),  # trained nothing, saved, exited 0
    ("--batch-size", "0", "--batch-size must be at least 1"),
    ("--eval-n", "0", "--eval-n must be at least 1"),
    ("--d-model", "0", "--d-model must be at least 1"),
])
def test_bad_numbers_are_usage_errors(tmp_path, capsys, flag, value, pattern):
    exits_2_saying(capsys, pattern, ["--arch", "mamba", "--out", str(tmp_path / "x"), flag, value])
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("extra, pattern", [
    (["--lr", "-1"], "--lr must be non-negative"),  # was a traceback from the optimizer
    (["--weight-decay", "-5"], "--weight-decay must be non-negative"),
    (["--device", "gpu"], "--device gpu: not a torch device"),
    (["--time-limit", "-1"], "--time-limit is a number of seconds"),  # was accepted: stopped after one step
    (["--max-needle-len", "3"], "--max-needle-len must be at least 64"),  # was silently 64
    (["--init-from", "/nonexistent/toy"], "--init-from /nonexistent/toy: no such directory"),
    (["--arch", "mamba2", "--d-model", "20"], r"d_inner = 40 \(expand \* d_model\) must be a multiple of d_head = 32"),
])
def test_bad_training_options_are_usage_errors(tmp_path, capsys, extra, pattern):
    argv = ["--arch", "mamba", "--steps", "1", "--batch-size", "2", "--d-model", "16", "--n-layers", "1",
            "--d-state", "4", "--eval-n", "1", "--out", str(tmp_path / "x")]
    exits_2_saying(capsys, pattern, argv + extra)


def test_out_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    exits_2_saying(capsys, "is a file, not a directory", ["--arch", "mamba", "--steps", "1", "--out",
                                                          str(tmp_path / "file")])


def documented_training_commands():
    """``{out: options passed to train()}`` of each ``python -m tl_mamba.toy.train`` command of
    docs/toy_models.md, the last command for each ``--out`` (continuation lines joined)."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "toy_models.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
        for command in block.replace("\\\n", " ").splitlines():
            if command.strip().startswith("python -m tl_mamba.toy.train"):
                commands.append(shlex.split(command)[3:])
    return commands


def test_the_documented_commands_pass_what_the_shipped_models_record(monkeypatch):
    """The commands in docs/toy_models.md give the settings each shipped model's metrics.json
    records (the last stage's, for toy-mamba2): a recipe default that changed after a model was
    trained must be pinned in its documented command."""
    import tl_mamba.toy.train as train_module
    from tl_mamba.toy.shipped import shipped_metrics

    passed = {}

    def record(arch, out, steps, batch_size, lr, seed, device, max_needle_len, eval_n, **options):
        passed[str(out)] = dict(steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_n=eval_n, **options)
        return {}

    monkeypatch.setattr(train_module, "train", record)
    commands = documented_training_commands()
    assert len(commands) >= 4, commands
    for argv in commands:
        assert main(argv) == 0
    for name in ("toy-mamba", "toy-mamba2"):
        recorded = shipped_metrics(name)
        got = passed[name]
        for key in ("steps", "batch_size", "lr", "seed"):
            assert got[key] == pytest.approx(recorded[key]), (name, key)
        assert got["eval_n"] == recorded["eval"]["n"], name
        # metrics.json has recorded context_noise since the option existed; before, there was none
        assert got["context_noise"] == recorded.get("context_noise", 0.0), name
        for key in ("ssm_lr", "weight_decay", "balance", "partial_tie", "init"):
            if key in recorded:
                assert got[key] == recorded[key], (name, key)
