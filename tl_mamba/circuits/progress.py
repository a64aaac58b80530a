"""Progress bars: one switch under two spellings.

Every long-running tool shows a tqdm bar and takes ``progress=`` (True: show it). The
tools that first spelled it ``quiet=`` (``attribute``, ``evaluate_graph``, ``faithfulness``,
``path_patch``, ``acdc``, the feature and probe tools) take both, so that code written
either way runs: :func:`hide_progress` reads them.
"""

from __future__ import annotations

from typing import Optional


def hide_progress(quiet: Optional[bool], progress: Optional[bool], default_quiet: bool) -> bool:
    """Whether to hide the progress bar, from ``quiet=`` and ``progress=`` (None: not given).

    ``ValueError`` when both are given and disagree (``quiet=True, progress=True``)."""
    if quiet is not None and progress is not None and bool(quiet) == bool(progress):
        raise ValueError(f"quiet={quiet!r} and progress={progress!r} contradict each other: give one of them "
                         "(progress=False is quiet=True)")
    if progress is not None:
        return not progress
    return default_quiet if quiet is None else bool(quiet)
