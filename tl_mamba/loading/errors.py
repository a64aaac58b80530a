"""Exceptions raised while finding, reading and converting checkpoints.

Every error subclasses a builtin (``FileNotFoundError`` or ``ValueError``), so code
that already catches those keeps working; the subclasses let callers and tests tell
the failure modes apart.
"""

from __future__ import annotations

from typing import Iterable, Sequence


class CheckpointNotFoundError(FileNotFoundError):
    """The checkpoint (local directory or hub id) could not be found or fetched."""


class CheckpointFilesError(FileNotFoundError):
    """The checkpoint directory exists but lacks a file we need (config or weights)."""


class CheckpointConfigError(ValueError):
    """The checkpoint's config file (config.json, or Mistral's params.json) lacks a field
    tl_mamba needs, or holds a value it cannot read. The message names the file, the
    field and the layout."""


class UnsupportedArchitectureError(ValueError):
    """The checkpoint is not a pure Mamba-1 / Falcon-Mamba / Mamba-2 language model,
    or uses an option our models cannot represent."""


class WrongModelClassError(ValueError):
    """The checkpoint's family does not match the model class it was loaded with."""


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not match the parameters the config implies.

    Attributes hold the complete lists (the message may truncate them):
    ``missing`` (``"<checkpoint name> (-> <our name>)"``), ``unexpected``
    (checkpoint names only: nothing of the model takes them) and ``misshapen``
    (``(checkpoint name, our name, expected shape, got shape)``), plus free-form
    ``other`` problems (e.g. an untied lm_head in a checkpoint whose config says tied).
    """

    def __init__(
        self,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        misshapen: Sequence[tuple] = (),
        other: Sequence[str] = (),
        context: str = "",
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        self.misshapen = list(misshapen)
        self.other = list(other)
        super().__init__(self._format(context))

    def _format(self, context: str) -> str:
        parts = [f"checkpoint does not match the model{(' (' + context + ')') if context else ''}:"]
        if self.missing:
            parts.append(f"  missing keys ({len(self.missing)}): " + _join(self.missing))
        if self.unexpected:
            parts.append(f"  unexpected keys ({len(self.unexpected)}): " + _join(self.unexpected))
        if self.misshapen:
            rows = [
                f"{ckpt} -> {ours}: expected {tuple(exp)}, got {tuple(got)}"
                for ckpt, ours, exp, got in self.misshapen
            ]
            parts.append(f"  misshapen keys ({len(rows)}): " + _join(rows))
        for line in self.other:
            parts.append("  " + line)
        return "\n".join(parts)


def _join(items: Iterable[str], limit: int = 12) -> str:
    """Comma-join at most ``limit`` items, then say how many were left out."""
    items = list(items)
    shown = ", ".join(items[:limit])
    if len(items) > limit:
        shown += f", ... and {len(items) - limit} more"
    return shown
