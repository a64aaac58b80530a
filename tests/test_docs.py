"""The code in the user docs runs, and its asserts hold.

Every fenced ```python block of ``docs/quickstart.md`` and ``docs/porting.md``
is executed, in order, in one namespace per file, exactly as a reader would
paste them into a session. The blocks build small random models, so nothing is
downloaded. Info-string tags after ``python`` say how a block is treated:

- ``python``                    run everywhere;
- ``python no-run``             shown only (hub ids, files that do not exist here);
- ``python hooked-transformer`` run only where ``transformer_lens.HookedTransformer``
  exists (transformer-lens 3.x; 4.0 removed it). Later blocks must not depend on
  these, which the run on 4.x checks.

A failing block is reported with its line in the markdown file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest
import torch

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOC_FILES = ("quickstart.md", "porting.md", "circuits.md")
TAGS = {"", "no-run", "hooked-transformer"}

_FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


@dataclass
class Block:
    doc: str
    line: int  # 1-based line of the first code line in the markdown file
    lang: str
    tag: str
    code: str


def extract_blocks(doc: str) -> List[Block]:
    """Every fenced block of ``docs/<doc>`` with its language, tag and starting line."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    blocks = []
    for match in _FENCE.finditer(text):
        info = match.group(1).strip().split(None, 1)
        lang = info[0] if info else ""
        tag = info[1].strip() if len(info) > 1 else ""
        line = text.count("\n", 0, match.start(2)) + 1
        blocks.append(Block(doc, line, lang, tag, match.group(2)))
    return blocks


def python_blocks(doc: str) -> List[Block]:
    return [b for b in extract_blocks(doc) if b.lang == "python"]


def hooked_transformer_available() -> bool:
    try:
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def docs_environment(monkeypatch, tmp_path):
    """What a doc may change globally is put back afterwards; one torch thread keeps it fast."""
    monkeypatch.delenv("TL_MAMBA_BACKEND", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    threads, grad = torch.get_num_threads(), torch.is_grad_enabled()
    torch.set_num_threads(1)  # tiny models: threads only cost time on a shared 2-core machine
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_grad_enabled(grad)


def run_blocks(blocks: List[Block], skip_hooked_transformer: bool) -> int:
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for block in blocks:
        if block.tag == "no-run" or (block.tag == "hooked-transformer" and skip_hooked_transformer):
            continue
        # pad with newlines so that tracebacks give the line in the markdown file
        source = "\n" * (block.line - 1) + block.code
        code = compile(source, str(DOCS / block.doc), "exec")
        exec(code, namespace)  # noqa: S102 - executing our own documentation
        ran += 1
    return ran


@pytest.mark.parametrize("doc", DOC_FILES)
def test_doc_python_blocks_run(doc, docs_environment):
    blocks = python_blocks(doc)
    ran = run_blocks(blocks, skip_hooked_transformer=not hooked_transformer_available())
    assert ran >= 5, f"{doc}: only {ran} runnable python blocks"


@pytest.mark.parametrize("doc", DOC_FILES)
def test_doc_blocks_are_tagged_and_offline(doc):
    """Tags are known; runnable blocks name no hub id and carry asserts that check their claim."""
    blocks = extract_blocks(doc)
    assert blocks, f"{doc} has no code blocks"
    for block in blocks:
        if block.lang != "python":
            continue
        where = f"{doc}:{block.line}"
        assert block.tag in TAGS, f"{where}: unknown tag {block.tag!r} (known: {sorted(TAGS)})"
        if block.tag == "no-run":
            continue
        # shipped toy models ("toy-mamba", "toy-mamba2") are package data, not hub ids
        assert not re.search(r"from_pretrained\([\"'](?!toy-mamba2?[\"'])", block.code), (
            f"{where}: runnable blocks must not load from the hub; mark the block no-run"
        )
    runnable = [b for b in blocks if b.lang == "python" and b.tag != "no-run"]
    with_asserts = [b for b in runnable if re.search(r"^\s*assert\b", b.code, re.MULTILINE)]
    assert len(with_asserts) >= len(runnable) * 0.6, f"{doc}: most runnable blocks should check their claim"


def test_hooked_transformer_blocks_run_only_on_transformer_lens_3():
    """Reports (as a skip) that the HookedTransformer side of porting.md is not run on 4.x."""
    blocks = [b for b in python_blocks("porting.md") if b.tag == "hooked-transformer"]
    assert blocks, "porting.md should show the HookedTransformer version of each workflow"
    if not hooked_transformer_available():
        pytest.skip(
            f"{len(blocks)} hooked-transformer blocks of porting.md not run: transformer-lens 4.x removed "
            "HookedTransformer (they run in the transformer-lens 3.x leg)"
        )


def test_every_figure_in_the_docs_exists_and_is_made_by_a_script():
    """Images linked from docs/*.md are in the repo, and each figure under docs/figures/<name>/
    is written by examples/<name>_tutorial.py (the command the doc names)."""
    root = DOCS.parent
    linked = []
    for doc in DOCS.glob("*.md"):
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc.read_text(encoding="utf-8")):
            linked.append(target)
            assert (DOCS / target).is_file(), f"{doc.name} links a missing figure {target}"
            assert target.startswith("figures/"), f"{doc.name}: figures live under docs/figures/, got {target}"
    assert linked, "the docs link no figures"
    for folder in (DOCS / "figures").iterdir():
        script = root / "examples" / f"{folder.name.rstrip('s')}_tutorial.py"
        assert script.is_file(), f"docs/figures/{folder.name} has no generating script {script.name}"
        source = script.read_text(encoding="utf-8")
        for png in folder.glob("*.png"):
            stem = re.sub(r"\d+$", "{layer}", png.stem) if png.stem[-1].isdigit() else png.stem
            assert stem in source, f"{png.relative_to(root)} is not written by {script.relative_to(root)}"
