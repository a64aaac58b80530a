"""Tensor ops. Each op keeps its reference implementation beside its fast ones,
behind one dispatch function: ``selective_scan`` (Mamba-1), ``ssd_scan`` (Mamba-2),
``causal_conv1d``. ``knockout.py`` and ``state_override.py`` hold what every scan backend
shares to honour knockouts and ``hook_h`` edits."""

from tl_mamba.ops.conv import causal_conv1d
from tl_mamba.ops.selective_scan import ScanOutput, StateOverride, selective_scan
from tl_mamba.ops.ssd import SSDOutput, ssd_scan

__all__ = ["causal_conv1d", "selective_scan", "ScanOutput", "StateOverride", "ssd_scan", "SSDOutput"]
