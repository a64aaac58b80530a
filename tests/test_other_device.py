"""The library's workflows run on a device other than the CPU, without a GPU.

Researchers run the circuit tools on CUDA models, where a tensor made on the CPU and
mixed with the model's raises "Expected all tensors to be on the same device". The GPU
sessions ran the kernels, not these tools. Here each workflow runs on the toy models put
on the "other" device of ``tests/other_device.py`` (CPU tensors in a subclass that reports
another device; every op that mixes one with a CPU tensor raises, as CUDA would), and its
result must equal the same call on the CPU model: forward, caches, hook edits, knockouts,
gradients, generate, ablations, statistics by class, patching, EAP / EAP-IG / exact
scores, ACDC, path patching, knockout attribution, SAE features, probes, hidden
attention and information flow; and every CLI command with ``--device``. Where there is a
GPU the same workflows run on CUDA too (``benchmarks/run_gpu_session.sh`` runs them).
"""

from __future__ import annotations

import dataclasses
import json
import math

import pandas as pd
import pytest
import torch

import tl_mamba
from tl_mamba import Knockout
from tl_mamba import circuits as C
from tl_mamba import experiments as E
from tl_mamba.circuits import patching as P
from tl_mamba.toy import make_dataset

from other_device import OTHER, Mismatch, Other, OtherDeviceMode, to_other

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["key fen is 4 . key vix is 1 . what is key fen ? it is", "key bif is 3 . what is key bif ? it is"]


def _metric(logits):
    return (logits[:, -1, 5] - logits[:, -1, 6]).sum()


class _SAE(torch.nn.Module):
    """A small SAE with sae-lens' encode / decode, on the model's device."""

    def __init__(self, d: int, device):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W_enc = torch.nn.Parameter((torch.randn(d, 16, generator=gen) * 0.1).to(device))
        self.b_enc = torch.nn.Parameter(torch.zeros(16).to(device))
        self.W_dec = torch.nn.Parameter((torch.randn(16, d, generator=gen) * 0.1).to(device))

    def encode(self, x):
        return torch.relu(x @ self.W_enc + self.b_enc)

    def decode(self, f):
        return f @ self.W_dec


def _features(model):
    return dict(heads=[0, 1]) if model.cfg.family == "mamba2" else dict(channels=range(8))


def _tokens(model):
    return model.to_tokens([TEXTS[0]] * 2)


def _left(model):
    return model.to_tokens(TEXTS, padding_side="left", return_attention_mask=True)


def _batches(model):
    return C.task_batches(model, "ioi", n=2)


def _graph_scores(model, level, method, **kw):
    batches = _batches(model)[:1] if kw.get("positional") else _batches(model)  # (one length)
    graph = C.Graph.from_model(model, level=level, **kw)
    C.attribute(model, graph, batches, None, C.logit_diff, method=method, ig_steps=2 if method == "EAP-IG" else None)
    graph.apply_topn(4, prune=False)
    return torch.cat([graph.scores.flatten(), torch.tensor([C.faithfulness(model, graph, batches, None,
                                                                            C.logit_diff)])])


def _edit_state(model):
    def zero(h, hook):
        h[:, 3:9] = 0
    return model.run_with_hooks(_tokens(model), fwd_hooks=[("blocks.1.hook_h", zero)])


def _dense_mask(model):
    def halve(mask, hook):
        mask[:, :, 8:, 2:4] = 0.5
    return model.run_with_hooks(_tokens(model), fwd_hooks=[("blocks.1.hook_ssm_mask", halve)])


def _gradients(model):
    with torch.enable_grad():
        model(_tokens(model), return_type="loss").backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return grads


def _generate_under_knockout(model):
    with model.knockouts(Knockout(layers=[1], sources=[2], targets=[-1])):
        return model.generate(_tokens(model), max_new_tokens=2, do_sample=False, verbose=False)


def _patching(model):
    clean, corrupted, _ = _batches(model)[0]
    metric = lambda logits: (logits[:, -1, 5] - logits[:, -1, 6]).mean()  # noqa: E731
    by_state = P.patch_layer_position(model, clean, corrupted, metric, hook="h", progress=False)
    if model.cfg.family == "mamba2":
        by_feature = P.patch_heads(model, clean, corrupted, metric, hook="y", per_position=True, progress=False)
    else:
        by_feature = P.patch_channel_groups(model, clean, corrupted, metric, 4, hook="x", progress=False)
    named = P.patch_layer_position(model, clean, corrupted, metric, progress=False,
                                   positions={"last": torch.ones_like(clean, dtype=torch.bool)})
    return torch.cat([by_state.flatten(), by_feature.flatten(), named.flatten()])


def _feature_attribution(model):
    hook = "blocks.1.hook_resid_pre"
    sae = _SAE(model.cfg.d_model, next(model.parameters()).device)
    scores = C.feature_attribution(model, {hook: sae}, _batches(model), None, C.logit_diff, method="EAP")[hook]
    kept = C.evaluate_features(model, {hook: sae}, {hook: [0, 1]}, _batches(model), None, C.logit_diff)
    return torch.cat([scores.scores.flatten(), torch.as_tensor(kept, dtype=torch.float64).flatten()])


WORKFLOWS = {
    "forward, padded": lambda m: m(_left(m)[0], attention_mask=_left(m)[1]),
    "cache of hook_h": lambda m: m.run_with_cache(_tokens(m), names_filter=lambda n: n.endswith("hook_h"))[1][
        "blocks.1.hook_h"],
    "hook_h edit": _edit_state,
    "knockout, [b, p] sources and restricted": lambda m: m.run_with_knockout(
        _tokens(m), Knockout(layers=[0, 1], sources=_tokens(m) == m.to_single_token("fen"), targets=[-1],
                             **_features(m))),
    "knockout, conv and ssm": lambda m: m.run_with_knockout(_tokens(m), Knockout(layers=[0], sources=[5], targets=[6],
                                                                                 path="both")),
    "dense mask edit": _dense_mask,
    "gradients": _gradients,
    "hidden attention, padded": lambda m: m.hidden_attention(_left(m)[0], layer=1, attention_mask=_left(m)[1]),
    "generate, padded": lambda m: m.generate(_left(m)[0], attention_mask=_left(m)[1], max_new_tokens=3,
                                             do_sample=False, verbose=False),
    "generate under a knockout": _generate_under_knockout,
    "mean and resample ablation": lambda m: torch.cat([
        m.run_with_hooks(_tokens(m), fwd_hooks=C.mean_ablation_hooks(
            m, "x", _left(m)[0], layers=[0], reference_attention_mask=_left(m)[1], per_position=True)),
        m.run_with_hooks(_tokens(m), fwd_hooks=C.resample_ablation_hooks(
            m, "delta", m.to_tokens([TEXTS[0].replace("4", "7").replace("1", "2")] * 2), layers=[0]))]),
    "needle accuracy, class-conditional mean": lambda m: torch.tensor(C.needle_accuracy(
        m, lengths=(32,), n=4, progress=False, fwd_hooks=C.class_conditional_hook_factory(
            m, {0: None}, token_class="bos", kind="mean", reference_tokens=_tokens(m)))[32]),
    "statistics by class": lambda m: [
        C.delta_stats_by_class(m, _left(m)[0], {"is": ["is"]}, attention_mask=_left(m)[1], progress=False),
        C.similarity_by_class(m, _left(m)[0], {"is": ["is"], "key": ["key"]}, attention_mask=_left(m)[1],
                              progress=False),
        C.loss_by_class(m, _left(m)[0], {"is": ["is"]}, attention_mask=_left(m)[1], progress=False)],
    "EAP-IG by head": lambda m: _graph_scores(m, "head", "EAP-IG", **({} if m.cfg.family == "mamba2"
                                                                      else dict(channel_groups=4))),
    "EAP by component": lambda m: _graph_scores(m, "component", "EAP"),
    "EAP at positions": lambda m: _graph_scores(m, "layer", "EAP", positional=True, n_pos=_batches(m)[0][0].shape[1]),
    "exact scores by layer": lambda m: _graph_scores(m, "layer", "exact"),
    "ACDC": lambda m: C.acdc(m, C.Graph.from_model(m, level="layer"), _batches(m), threshold=0.01,
                             quiet=True).in_graph,
    "path patching": lambda m: C.path_patch(m, *_batches(m)[0][:2], lambda lg: lg[:, -1, 5] - lg[:, -1, 6],
                                            senders=["m0"], receivers=["m1", "logits"], positions=[3, -1]),
    "activation patching": _patching,
    "knockout attribution": lambda m: C.knockout_attribution(m, _batches(m)[0][0], _metric, layers=[1],
                                                             progress=False),
    "SAE feature attribution": _feature_attribution,
    "linear probe and top activations": lambda m: [
        torch.tensor(C.linear_probe(m, "blocks.1.hook_resid_pre", torch.cat([_tokens(m)] * 4),
                                    torch.tensor([0, 1] * 4)).test_accuracy),
        C.top_activations(m, "blocks.1.hook_resid_pre", torch.cat([_tokens(m)] * 2), features=[0, 1], k=2)],
    "information flow": lambda m: E.information_flow(m, make_dataset("facts", n=2, seed=1), window=1,
                                                     progress=False),
}


@pytest.fixture(scope="module")
def models():
    """``{family: (CPU model, the same model on the other device)}``."""
    out = {}
    for name, family in (("toy-mamba", "mamba1"), ("toy-mamba2", "mamba2")):
        other = to_other(tl_mamba.from_pretrained(name))
        other.cfg.device = OTHER
        out[family] = (tl_mamba.from_pretrained(name), other)
    return out


@pytest.fixture(scope="module")
def cuda_models():
    """``{family: the model on CUDA}`` (GPU machines: benchmarks/run_gpu_session.sh runs these)."""
    return {family: tl_mamba.from_pretrained(name, device="cuda")
            for name, family in (("toy-mamba", "mamba1"), ("toy-mamba2", "mamba2"))}


def _on_cpu(value):
    """A result with every tensor read back to the CPU, for comparison."""
    if isinstance(value, Other):
        return value.elem
    if isinstance(value, torch.Tensor) and value.device.type != "cpu":
        return value.cpu()
    if isinstance(value, (list, tuple)):
        return [_on_cpu(v) for v in value]
    if hasattr(value, "_asdict"):  # a named tuple
        return [_on_cpu(v) for v in value]
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return {field.name: _on_cpu(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, pd.DataFrame):
        return value.map(lambda v: _on_cpu(v) if isinstance(v, torch.Tensor) else v)
    return value


def _assert_same(got, want, where="result", tol=1e-6):
    """``got == want`` to ``tol``. On CUDA (``tol=None``) the numbers come from other kernels: only
    shapes, dtypes and finiteness are compared, the device mixing being what is tested."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and type(got) is torch.Tensor, (where, type(got))
        if tol is None:
            assert got.shape == want.shape and got.dtype == want.dtype, (where, got.shape, want.shape)
            assert torch.isfinite(got.double()).eq(torch.isfinite(want.double())).all(), where
        else:
            torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True, msg=where)
    elif isinstance(want, pd.DataFrame):
        if tol is None:
            assert got.shape == want.shape and list(got.columns) == list(want.columns), where
        else:
            pd.testing.assert_frame_equal(got, want, check_exact=False, rtol=tol, atol=tol)
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{where}[{i}]", tol)
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key in want:
            _assert_same(got[key], want[key], f"{where}[{key!r}]", tol)
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), where
    elif tol is None and isinstance(want, float):
        assert isinstance(got, float) and math.isfinite(got) == math.isfinite(want), where
    else:
        assert got == want, (where, got, want)


@pytest.mark.parametrize("workflow", list(WORKFLOWS))
@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_workflow_runs_on_another_device_as_on_the_cpu(models, family, workflow):
    cpu_model, other_model = models[family]
    want = _on_cpu(WORKFLOWS[workflow](cpu_model))
    with OtherDeviceMode():
        got = WORKFLOWS[workflow](other_model)
    _assert_same(_on_cpu(got), want, workflow)


# (one skipped case without CUDA, not one per workflow)
@pytest.mark.parametrize("family, workflow", [(family, workflow) for family in ("mamba1", "mamba2")
                                              for workflow in WORKFLOWS] if torch.cuda.is_available() else [])
def test_workflow_runs_on_cuda(models, cuda_models, family, workflow):
    want = _on_cpu(WORKFLOWS[workflow](models[family][0]))
    _assert_same(_on_cpu(WORKFLOWS[workflow](cuda_models[family])), want, workflow, tol=None)


def test_the_other_device_refuses_what_cuda_refuses(models):
    """The harness itself: a CPU tensor mixed into an op with the model's tensors raises, as on
    CUDA, while what CUDA allows (0-dim CPU tensors, CPU indices, copies) runs."""
    _, model = models["mamba2"]
    with OtherDeviceMode():
        x = torch.ones(3, device=next(model.parameters()).device)
        assert type(x) is Other and x.device == OTHER
        with pytest.raises(Mismatch, match="aten.add"):
            x + torch.ones(3)
        with pytest.raises(Mismatch, match="numpy"):
            x.numpy()
        y = x * torch.tensor(2.0) + x[torch.tensor([0, 2])].sum()  # 0-dim CPU tensor; CPU index
        y[1] = 0
        assert y.tolist() == [4.0, 0.0, 4.0] and y.cpu().device.type == "cpu"

        def mixes_in_a_cpu_tensor(act, hook):
            return act + torch.ones(act.shape[-1])

        with pytest.raises(Mismatch):
            model.run_with_hooks(_tokens(model), fwd_hooks=[("blocks.0.hook_resid_pre", mixes_in_a_cpu_tensor)])


CLI_COMMANDS = {
    "hooks": ["hooks", "toy-mamba"],
    "eval": ["eval", "toy-mamba2", "--n", "4", "--tasks", "facts,needle", "--lengths", "32"],
    "knockout by task": ["knockout", "toy-mamba", "--task", "facts", "--n", "4"],
    "knockout by token": ["knockout", "toy-mamba2", "--prompt", "key fen is 4 . what is key fen ? it is"],
    "circuit": ["circuit", "toy-mamba2", "--n", "4", "--method", "EAP-IG", "--steps", "2"],
    "circuit by ACDC": ["circuit", "toy-mamba", "--n", "4", "--method", "ACDC"],
    "run": ["run", "toy-mamba2", "key fen is 4 . what is key fen ? it is"],
    "demo": ["demo"],
}


@pytest.mark.parametrize("command", list(CLI_COMMANDS))
def test_cli_runs_on_another_device_as_on_the_cpu(tmp_path, capsys, command):
    """``tl-mamba ... --device`` puts the model there; every command then runs without mixing devices,
    and the CSV / JSON it writes hold what the CPU run writes."""
    from tl_mamba import cli

    args = CLI_COMMANDS[command]
    if args[0] in ("knockout", "circuit", "demo"):
        args = args + ["--out", "OUT"]
    written = {}
    for device in ("cpu", "lazy"):
        out = tmp_path / device
        argv = [str(out) if a == "OUT" else a for a in args] + ["--device", device]
        with OtherDeviceMode():
            assert cli.main(argv) == 0, capsys.readouterr().err
        written[device] = {path.relative_to(out): path.read_text() for path in sorted(out.rglob("*"))
                           if path.suffix in (".csv", ".json")} if out.exists() else {}
    capsys.readouterr()
    assert written["lazy"].keys() == written["cpu"].keys()
    for name, text in written["cpu"].items():
        if name.suffix == ".csv":
            pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "lazy" / name), pd.read_csv(tmp_path / "cpu" / name),
                                          check_exact=False, rtol=1e-6, atol=1e-6)
        else:
            _assert_json_close(json.loads(written["lazy"][name]), json.loads(text), str(name))


def _assert_json_close(got, want, where):
    """JSON records equal, floats to 1e-5 (a gradient summed in another order differs in the last bits)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _assert_json_close(got[key], want[key], f"{where}/{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_json_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-5, abs=1e-6), where
    else:
        assert got == want, where


def test_cli_device_names_are_checked(capsys):
    from tl_mamba import cli

    assert cli.main(["hooks", "toy-mamba", "--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert "--device 'gpu0'" in err and "is not a torch device" in err
    if not torch.cuda.is_available():
        assert cli.main(["hooks", "toy-mamba", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "--device 'cuda'" in err and "cannot be used" in err
