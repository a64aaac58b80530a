"""Interleaved timing for a shared, noisy machine.

All contenders run in one process, one call each per round, in a rotating order,
so that a slow spell on the machine hits every contender alike. Each contender
is warmed up first. We report the median over rounds of each contender's time
and, for every pair we compare, the median over rounds of the per-round ratio
(the two calls of a round ran seconds apart, so their ratio is steadier than the
ratio of the medians).
"""

from __future__ import annotations

import gc
import resource
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List


@dataclass
class Timings:
    """Seconds per call: ``samples[name][round]``."""

    samples: Dict[str, List[float]] = field(default_factory=dict)
    cpu_samples: Dict[str, List[float]] = field(default_factory=dict)  # process CPU seconds, all threads
    faults: Dict[str, List[int]] = field(default_factory=dict)  # minor page faults during the call

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


def _time_once(fn: Callable[[], object]):
    """(wall seconds, process CPU seconds, minor page faults) of one call."""
    gc.collect()
    faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    cpu0 = time.process_time()
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0
    del out
    return elapsed, cpu, faults


def interleaved(
    contenders: Dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    log: Callable[[str], None] = lambda s: None,
) -> Timings:
    """Time every contender ``repeats`` times, interleaved, after ``warmup`` untimed calls each."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    timings = Timings(*({name: [] for name in names} for _ in range(3)))
    for r in range(repeats):
        shift = r % len(names)
        order = names[shift:] + names[:shift]
        for name in order:
            wall, cpu, faults = _time_once(contenders[name])
            timings.samples[name].append(wall)
            timings.cpu_samples[name].append(cpu)
            timings.faults[name].append(faults)
        log(f"  round {r + 1}/{repeats}: " + ", ".join(f"{n} {timings.samples[n][-1]:.3f}s" for n in names))
    return timings
