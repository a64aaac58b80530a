"""Exceptions for indices (layers, heads, channels, positions, features) that every tool
raises alike. Each subclasses two builtins, so code that catches either keeps working:
``Knockout(layers=99)``, ``ablate(..., layers=99)`` and ``run_with_cache(pos_slice=...)``
out of range are all an ``IndexError`` and a ``ValueError``. Also where a warning should
point: :func:`caller_stacklevel`."""

from __future__ import annotations


class OutOfRangeError(IndexError, ValueError):
    """An index outside its range: a layer past the model's, a position past the prompt's."""


class NotAnIndexError(TypeError, ValueError):
    """An index that is not an integer: a float, a string, a bool where ints are expected."""


def check_index(value, size: int, what: str) -> int:
    """One index ``value`` of an axis of ``size`` (negative from the end) as an int in ``[0, size)``:
    :class:`NotAnIndexError` for anything but an integer (1.5 would be truncated, a bool read as
    0 or 1), :class:`OutOfRangeError` outside ``[-size, size)``. ``what`` names it in the message."""
    if hasattr(value, "ndim") and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a 0-d tensor or numpy scalar: its Python value
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise NotAnIndexError(f"{what} must be an integer index, got {value!r} of type {type(value).__name__}")
    value = int(value)
    if not -size <= value < size:
        raise OutOfRangeError(f"{what} {value} is out of range [0, {size})")
    return value % size


def refuse_a_mapping(values, what: str, hint: str = "") -> None:
    """:class:`NotAnIndexError` when ``values`` is a mapping (``{layer: heads}``) where a flat list
    of indices is read. Iterated, a dict gives its keys, so ``heads={1: [0, 1], 2: [4, 5]}`` would
    silently mean heads 1 and 2 in every layer. ``what`` names the argument; ``hint`` says what
    to give instead (the functions that do read one list per layer, such as
    ``zero_ablation_hooks``, take mappings before calling here)."""
    from collections.abc import Mapping

    if isinstance(values, Mapping):
        keys = list(values)
        shown = f"{keys[:6]}{' ...' if len(keys) > 6 else ''}"
        raise NotAnIndexError(f"{what}: got a {type(values).__name__} with keys {shown}, which is not read per "
                              f"key here: read as a list it would give its keys as the indices. "
                              f"{hint or 'Give a list of indices.'}")


def reusable(values):
    """``values`` as something to read more than once: a one-shot iterator (a generator) read
    into a list, anything else as it is. Index arguments are checked once and read again by each
    layer's hook or knockout, which would find a generator used up."""
    from collections.abc import Iterator

    return list(values) if isinstance(values, Iterator) else values


def caller_stacklevel() -> int:
    """The ``stacklevel`` of a warning raised here that points at the first frame outside
    tl_mamba, torch and transformer_lens: the user's call, however deep the forward was entered."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.split(".")[0] in ("tl_mamba", "torch", "transformer_lens"):
            return level
        frame, level = frame.f_back, level + 1
    return level
