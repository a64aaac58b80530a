"""Exceptions for indices (layers, heads, channels, positions, features) that every tool
raises alike. Each subclasses two builtins, so code that catches either keeps working:
``Knockout(layers=99)``, ``ablate(..., layers=99)`` and ``run_with_cache(pos_slice=...)``
out of range are all an ``IndexError`` and a ``ValueError``."""

from __future__ import annotations


class OutOfRangeError(IndexError, ValueError):
    """An index outside its range: a layer past the model's, a position past the prompt's."""


class NotAnIndexError(TypeError, ValueError):
    """An index that is not an integer: a float, a string, a bool where ints are expected."""
