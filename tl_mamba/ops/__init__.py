"""Tensor ops. Each op keeps its reference implementation beside its fast ones,
behind one dispatch function (``selective_scan``, ``causal_conv1d``)."""

from tl_mamba.ops.conv import causal_conv1d
from tl_mamba.ops.selective_scan import ScanOutput, StateOverride, selective_scan

__all__ = ["causal_conv1d", "selective_scan", "ScanOutput", "StateOverride"]
