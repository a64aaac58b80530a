"""Progress bars: every long-running tool takes ``progress=``; those that first spelled it
``quiet=`` take both (``tl_mamba.circuits.progress``)."""

from __future__ import annotations

import inspect

import pytest
import torch

from tl_mamba.circuits import acdc, attribute, evaluate_graph, faithfulness, path_patch
from tl_mamba.circuits.graph import Graph
from tl_mamba.circuits.progress import hide_progress
from tests.test_acdc import metric, pair, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hide_progress_reads_either_spelling_and_refuses_a_contradiction():
    for quiet, progress, default, hidden in ((None, None, False, False), (None, None, True, True),
                                             (True, None, False, True), (False, None, True, False),
                                             (None, False, False, True), (None, True, True, False),
                                             (True, False, False, True), (False, True, True, False)):
        assert hide_progress(quiet, progress, default) is hidden, (quiet, progress, default)
    for quiet, progress in ((True, True), (False, False)):
        with pytest.raises(ValueError, match="contradict each other"):
            hide_progress(quiet, progress, False)


def test_every_tool_with_quiet_also_takes_progress():
    """Scanned, not listed: a tool added later with ``quiet=`` alone fails here."""
    import tl_mamba.circuits as circuits

    with_quiet = []
    for name in circuits.__all__:
        fn = getattr(circuits, name)
        if callable(fn) and not inspect.isclass(fn) and "quiet" in inspect.signature(fn).parameters:
            with_quiet.append(name)
            assert "progress" in inspect.signature(fn).parameters, name
    assert {"attribute", "acdc", "faithfulness", "path_patch", "top_activations", "linear_probe"} <= set(with_quiet)


@pytest.mark.parametrize("tool", ["attribute", "evaluate_graph", "path_patch", "acdc", "faithfulness"])
def test_progress_false_hides_the_bar_and_true_shows_it(capsys, tool):
    model = tiny("mamba2")
    clean, corrupted = pair(3)

    def run(**switch):
        graph = Graph.from_model(model, "layer")
        if tool == "attribute":
            return attribute(model, graph, clean, corrupted, metric, method="EAP", batch_size=2, **switch)
        if tool == "evaluate_graph":
            return evaluate_graph(model, graph, clean, corrupted, metric, batch_size=2, **switch)
        if tool == "path_patch":
            return path_patch(model, clean, corrupted, metric, senders=["m0"], receivers=["m1"], batch_size=2,
                              **switch)
        if tool == "faithfulness":
            return faithfulness(model, graph, clean, corrupted, metric, batch_size=2, **switch)
        return acdc(model, graph, clean, corrupted, metric, threshold=0.5, **switch)

    shown = {}
    for switch in ({}, {"progress": True}, {"progress": False}, {"quiet": True}, {"quiet": False}):
        capsys.readouterr()
        first = run(**switch)
        shown[tuple(switch.items())] = "\r" in capsys.readouterr().err  # tqdm redraws with a carriage return
        if switch:  # the switch changes the bar, never the result
            if isinstance(first, Graph):
                assert torch.equal(first.scores, run(progress=False).scores)
            else:
                assert torch.equal(torch.as_tensor(first), torch.as_tensor(run(progress=False)))
    assert shown == {(): True, (("progress", True),): True, (("progress", False),): False,
                     (("quiet", True),): False, (("quiet", False),): True}
    with pytest.raises(ValueError, match="contradict"):
        run(quiet=True, progress=True)
