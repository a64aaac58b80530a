"""Public names of the contract whose implementation has not landed yet.

They import (so ``from tl_mamba import HookedMamba2, Knockout`` works) but
raise a clear ``NotImplementedError`` when used. Each is replaced by the real
implementation in its own issue.
"""

from __future__ import annotations


class _Pending:
    _what = ""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError(self._what)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        raise NotImplementedError(cls._what)

    @classmethod
    def from_hf(cls, *args, **kwargs):
        raise NotImplementedError(cls._what)


class Knockout(_Pending):
    """Token-to-token knockout: not implemented yet (issue 'Knockout and hidden attention')."""

    _what = (
        "Knockout is not implemented yet in this version of tl_mamba. The underlying mechanism already "
        "works: a hook on blocks.{l}.hook_ssm_mask that zeroes entries [b, head, target, source] (head 0 for "
        "Mamba-1) removes those hidden-attention edges."
    )
