"""A second device on a CPU-only machine, to find device mismatches without a GPU.

A tensor on the "other" device is a CPU tensor wrapped in :class:`Other`, a tensor subclass
that reports the device ``lazy`` (a device type this CPU build knows, and that nothing in
the library treats specially). Every aten op that mixes one with a plain CPU tensor of one
or more dimensions raises :class:`Mismatch`, as CUDA would, except the ops PyTorch allows
across devices (copies, and indexing with CPU indices); zero-dimensional CPU tensors mix
freely, as they do with CUDA tensors. ``.numpy()`` of an ``Other`` raises, as CUDA's does.

Tensors made for the device (``torch.zeros(..., device=x.device)``, ``t.to(device)``) are
``Other`` tensors too: in the calling thread through :class:`OtherDeviceMode`, and where
C++ makes them (the autograd engine's threads, a Python scalar wrapped for an op) through
kernels registered for the Lazy dispatch key. Used by ``tests/test_other_device.py``.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

OTHER = torch.device("lazy")

# ops PyTorch runs with a CPU tensor beside a CUDA one
CROSS_DEVICE_OPS = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default, torch.ops.aten.index.Tensor,
                    torch.ops.aten.index_put_.default, torch.ops.aten.index_put.default,
                    torch.ops.aten._index_put_impl_.default, torch.ops.aten.lift_fresh.default}


class Mismatch(RuntimeError):
    """A CPU tensor met a tensor on the other device in an op CUDA would refuse."""


def _wrap(value):
    return Other(value) if type(value) is torch.Tensor else value


def _unwrap(value):
    return value.elem if isinstance(value, Other) else value


def _names_other(device) -> bool:
    return device is not None and not isinstance(device, (torch.Tensor, torch.dtype)) and \
        torch.device(device).type == OTHER.type


class Other(torch.Tensor):
    """A CPU tensor (``elem``) that reports the other device."""

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        assert type(elem) is torch.Tensor and elem.device.type == "cpu", (type(elem), elem.device)
        out = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                  storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                  device=OTHER, requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def __repr__(self):
        return f"Other({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        plain = [t for t in tree_flatten((args, kwargs))[0] if type(t) is torch.Tensor and t.dim() > 0]
        if plain and func not in CROSS_DEVICE_OPS:
            raise Mismatch(f"{func}: a CPU tensor {tuple(plain[0].shape)} {plain[0].dtype} meets one on the other "
                           "device")
        to_cpu = func is torch.ops.aten._to_copy.default and kwargs.get("device") is not None \
            and torch.device(kwargs["device"]).type == "cpu"
        if _names_other(kwargs.get("device")) or to_cpu:
            kwargs["device"] = torch.device("cpu")
        out = func(*tree_map(_unwrap, args), **tree_map(_unwrap, kwargs))
        if to_cpu or (func is torch.ops.aten.copy_.default and not isinstance(args[0], Other)):
            return out
        return tree_map(_wrap, out)


class OtherDeviceMode(TorchFunctionMode):
    """In its thread: calls that name the other device make ``Other`` tensors; ``tolist`` and ``item``
    read the values; ``numpy`` raises."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and args and isinstance(args[0], Other):
            raise Mismatch("numpy() of a tensor on the other device (CUDA refuses it: .cpu() first)")
        if func in (torch.Tensor.tolist, torch.Tensor.item) and args and isinstance(args[0], Other):
            return func(args[0].elem, *args[1:], **kwargs)  # (tolist refuses tensor subclasses)
        if _names_other(kwargs.get("device")):
            kwargs["device"] = "cpu"
            return tree_map(_wrap, func(*args, **kwargs))
        if func is torch.Tensor.to and len(args) > 1:
            if _names_other(args[1]):
                out = func(args[0], "cpu", *args[2:], **kwargs)
                return out if isinstance(out, Other) else Other(out)
            if isinstance(args[1], Other) and not isinstance(args[0], Other):  # t.to(other_tensor)
                return Other(func(args[0], args[1].elem, *args[2:], **kwargs))
        return func(*args, **kwargs)


def to_other(module: torch.nn.Module) -> torch.nn.Module:
    """Put a module's parameters and buffers on the other device (in place)."""
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and not isinstance(param, Other):
                sub._parameters[name] = torch.nn.Parameter(Other(param.detach()), requires_grad=param.requires_grad)
        for name, buf in list(sub._buffers.items()):
            if buf is not None and not isinstance(buf, Other):
                sub._buffers[name] = Other(buf)
    return module


def _cpu_factory(op):
    def make(*args, **kwargs):
        kwargs = dict(kwargs, device="cpu")
        kwargs.pop("pin_memory", None)
        return Other(op(*args, **kwargs))
    return make


_LAZY_FACTORIES = torch.library.Library("aten", "IMPL")
for _name, _op in (("empty.memory_format", torch.ops.aten.empty.memory_format),
                   ("empty_strided", torch.ops.aten.empty_strided.default),
                   ("arange", torch.ops.aten.arange.default), ("arange.start", torch.ops.aten.arange.start),
                   ("arange.start_step", torch.ops.aten.arange.start_step), ("zeros", torch.ops.aten.zeros.default),
                   ("ones", torch.ops.aten.ones.default), ("full", torch.ops.aten.full.default),
                   ("scalar_tensor", torch.ops.aten.scalar_tensor.default), ("eye", torch.ops.aten.eye.default),
                   ("linspace", torch.ops.aten.linspace.default)):
    _LAZY_FACTORIES.impl(_name, _cpu_factory(_op), "Lazy")


def _copy_from(source, destination, non_blocking=False):
    # a copy into an Other that C++ routes to the Lazy backend (``t[i] = 0`` wraps the scalar first)
    destination.elem.copy_(_unwrap(source))
    return destination


_LAZY_FACTORIES.impl("_copy_from", _copy_from, "Lazy")
