"""Interleaved timing for a shared, noisy machine.

All contenders run in one process, one call each per round, in a rotating order,
so that a slow spell on the machine hits every contender alike. Each contender
is warmed up first. We report the median over rounds of each contender's time
and, for every pair we compare, the median over rounds of the per-round ratio
(the two calls of a round ran seconds apart, so their ratio is steadier than the
ratio of the medians).

Each timed call also records its peak resident memory above the resident memory at
its start (Linux only: the kernel's high-water mark ``VmHWM``, reset before the
call through ``/proc/self/clear_refs``; ``None`` elsewhere).
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional


@dataclass
class Timings:
    """Seconds per call: ``samples[name][round]``."""

    samples: Dict[str, List[float]] = field(default_factory=dict)
    cpu_samples: Dict[str, List[float]] = field(default_factory=dict)  # process CPU seconds, all threads
    faults: Dict[str, List[int]] = field(default_factory=dict)  # minor page faults during the call
    peak_bytes: Dict[str, List[Optional[int]]] = field(default_factory=dict)  # peak RSS above the start

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def best(self, name: str) -> float:
        return min(self.samples[name])

    def spread(self, name: str) -> float:
        """(max - min) / median over the rounds: a rough noise gauge."""
        s = self.samples[name]
        return (max(s) - min(s)) / statistics.median(s)

    def paired_ratio(self, num: str, den: str, cpu: bool = False) -> float:
        """Median over rounds of ``time(num) / time(den)`` measured in the same round."""
        s = self.cpu_samples if cpu else self.samples
        return statistics.median(a / b for a, b in zip(s[num], s[den]))

    def cpu_median(self, name: str) -> float:
        return statistics.median(self.cpu_samples[name])

    def add(self, name: str, wall: float, cpu: float, faults: int, peak: Optional[int]) -> None:
        """Record one call of ``name`` (as returned by ``timed_call``, less its output)."""
        for store, value in ((self.samples, wall), (self.cpu_samples, cpu), (self.faults, faults),
                             (self.peak_bytes, peak)):
            store.setdefault(name, []).append(value)

    def peak_median(self, name: str) -> Optional[float]:
        """Median over rounds of the call's peak RSS above its start, in bytes (None if not measured)."""
        values = [v for v in self.peak_bytes.get(name, []) if v is not None]
        return statistics.median(values) if values else None

    def summary(self) -> dict:
        """Medians, fastest rounds, CPU medians, spreads, peak memory and every sample, per contender."""
        names = list(self.samples)
        return {
            "median_s": {n: self.median(n) for n in names},
            "best_s": {n: self.best(n) for n in names},
            "cpu_median_s": {n: self.cpu_median(n) for n in names},
            "spread": {n: self.spread(n) for n in names},
            "peak_bytes_median": {n: self.peak_median(n) for n in names},
            "samples_s": self.samples,
            "cpu_samples_s": self.cpu_samples,
            "minor_faults": self.faults,
            "peak_bytes": self.peak_bytes,
        }


def _status_kib(field_name: str) -> Optional[int]:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None where there is none."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (Linux >= 4.0); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def timed_call(fn: Callable[[], object]):
    """``(output, wall seconds, process CPU seconds, minor page faults, peak RSS bytes above the start)`` of one call.

    The peak is None where the kernel's high-water mark cannot be read or reset.
    """
    gc.collect()
    can_reset = _reset_peak_rss()
    rss0 = _status_kib("VmRSS")
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu0 = time.process_time()
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    hwm = _status_kib("VmHWM")
    peak = max(0, hwm - rss0) * 1024 if can_reset and rss0 is not None and hwm is not None else None
    return out, elapsed, cpu, faults, peak


def _time_once(fn: Callable[[], object]):
    """(wall seconds, process CPU seconds, minor page faults, peak RSS bytes above the start) of one call."""
    out, *measured = timed_call(fn)
    del out
    return tuple(measured)


def interleaved(
    contenders: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    log: Callable[[str], None] = lambda s: None,
    timings: Optional[Timings] = None,
) -> Timings:
    """Time every contender ``repeats`` times, interleaved, after ``warmup`` untimed calls each.

    ``timings``: rounds already measured (one call of every contender each, e.g.
    with ``timed_call``); the new rounds are appended to them, the rotation
    continuing where they left off.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    if timings is None:
        timings = Timings(*({name: [] for name in names} for _ in range(4)))
    done = min((len(timings.samples.get(name, [])) for name in names), default=0)
    for r in range(done, done + repeats):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        for name in order:
            timings.add(name, *_time_once(contenders[name]))
        log(f"  round {r + 1}/{done + repeats}: " + ", ".join(f"{n} {timings.samples[n][-1]:.3f}s" for n in names))
    return timings
