"""Compile every Triton kernel the models launch, at real widths, for GPUs that are not here.

    env -u TRITON_INTERPRET PYTHONPATH=. python benchmarks/compile_triton.py     # sm_90 (H100), 130m, 370m
    env -u TRITON_INTERPRET PYTHONPATH=. python benchmarks/compile_triton.py --arch 80 86 89 90 \
        --out benchmarks/results/compile_triton.md                          # A100, RTX 30xx, L40 / 40xx, H100

Triton compiles ahead of time without a GPU: its compiler and ``ptxas`` ship in the
wheel, and a GPU is needed only to load and run the result. This script runs
``HookedMamba`` and ``HookedMamba2`` (one layer, the real checkpoints' widths, random
weights) on CPU with ``set_backend("triton")`` through every route that launches a
kernel: the plain forward in fp32 and bf16, ``hook_h`` cached, the S → T knockouts
(positions, per-row, heads / channels), a general ``hook_ssm_mask`` edit, a ``hook_h``
edit, a backward through the parameters and through the mask, and ``generate``; then
the forward, ``hook_h``, knockout, mask and backward routes again with the kernels that
serve when the first choice fails or is switched off (Mamba-1's sequential kernel,
Mamba-2's separate knockout scan and its recurrent kernel). Every
launch is intercepted: the kernel is compiled for the target (TTIR → PTX → cubin, as on
the GPU, with the launch's own arguments, so with the block sizes the dispatchers choose
at that width, and each variant Triton's own specialization tells apart: dtypes,
integers equal to 1, 16-byte alignment) instead of run. The outputs are therefore never written, and nothing this
script computes is a result; what it reports, per kernel variant, is what the GPU would
refuse or slow down for:

- whether it compiles at all (``tests/test_triton.py`` runs the kernels in the
  interpreter, which never compiles them);
- shared memory per block against the target's limit (Triton refuses the launch above
  it: "out of resources");
- registers per thread, and the blocks a multiprocessor holds at once (from registers,
  shared memory and warps: the occupancy a spill-free tile may cost);
- bytes spilled per thread (ptxas' spill stores, and its stack frame: local memory,
  slow, not wrong), from ptxas' own report.

``--sweep`` compiles the kernels over their tile sizes instead (Mamba-2's plain chunked
kernels over hd × n and its masked-tile kernel over BLOCK_I × BLOCK_D; Mamba-1's chunked
kernel over BLOCK_T × BLOCK_E, plain and with the same-pass knockout; fp32 and bf16
inputs): what ``triton_chunked.TILE_CAPS`` and the other kernels' blocks were chosen from
(``benchmarks/results/compile_triton_tiles.md``).

The exit status is 1 when a kernel does not compile or does not fit its target.
``--out`` writes the table as markdown (``benchmarks/results/compile_triton.md`` is the
one docs/performance.md reads). ``tests/test_compile_triton.py`` runs it at toy widths.
The kernels' speed and their results on a GPU are ``bench_triton_gpu.py``'s to measure.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("compile_triton.py compiles the kernels: unset TRITON_INTERPRET (it makes triton.jit interpret them)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]  # the package, and _env

import tl_mamba.backends  # noqa: E402
from _env import triton_toolchain  # noqa: E402
from _setup import patched  # noqa: E402
from tl_mamba import HookedMamba, HookedMamba2, HookedMambaConfig, Knockout  # noqa: E402

#: per target capability, from CUDA's tables: the GPUs, the shared memory one block may opt into
#: (Triton refuses a launch above it, comparing when it loads the kernel), and per multiprocessor
#: the shared memory, warps and blocks it holds at most (for the occupancy column)
TARGETS = {
    80: dict(gpu="A100", block_shared=166912, sm_shared=167936, sm_warps=64, sm_blocks=32),
    86: dict(gpu="RTX 30xx / A6000", block_shared=101376, sm_shared=102400, sm_warps=48, sm_blocks=16),
    89: dict(gpu="L40 / RTX 40xx", block_shared=101376, sm_shared=102400, sm_warps=48, sm_blocks=24),
    90: dict(gpu="H100 / H200", block_shared=232448, sm_shared=233472, sm_warps=64, sm_blocks=32),
}
REGISTERS_PER_SM = 65536  # every target here
RESERVED_SHARED_PER_BLOCK = 1024  # what CUDA keeps of a multiprocessor's shared memory per resident block


def blocks_per_sm(variant: "Variant", capability: int) -> int:
    """How many blocks of ``variant`` one multiprocessor holds at once: the least of what its
    registers (allocated per warp in units of 256), shared memory, warps and blocks allow."""
    target = TARGETS[capability]
    per_warp = -(-variant.registers * 32 // 256) * 256
    limits = [REGISTERS_PER_SM // (per_warp * variant.num_warps), target["sm_warps"] // variant.num_warps,
              target["sm_blocks"]]
    if variant.shared:
        limits.append(target["sm_shared"] // (variant.shared + RESERVED_SHARED_PER_BLOCK))
    return min(limits)


#: one layer at the widths of the released checkpoints (d_inner = 2·d_model; Mamba-2 heads of 64;
#: "2.8b" is mamba-2.8b and mamba2-2.7b)
WIDTHS = {
    "130m": {"mamba1": dict(d_model=768, d_state=16), "mamba2": dict(d_model=768, d_state=128, n_heads=24)},
    "370m": {"mamba1": dict(d_model=1024, d_state=16), "mamba2": dict(d_model=1024, d_state=128, n_heads=32)},
    "2.8b": {"mamba1": dict(d_model=2560, d_state=16), "mamba2": dict(d_model=2560, d_state=128, n_heads=80)},
    "toy": {"mamba1": dict(d_model=16, d_state=4), "mamba2": dict(d_model=32, d_state=8, n_heads=4)},
}


class _CompileOnlyDriver:
    """What ``JITFunction.run`` asks of the active driver before it compiles: the target, a
    device index and a stream. Nothing here talks to a GPU."""

    def __init__(self, capability: int):
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@dataclass
class Variant:
    """One compiled kernel: what Triton compiles once, a kernel with one specialization
    (constexprs, argument dtypes, integers equal to 1, 16-byte alignment)."""

    kernel: str
    constexprs: Dict[str, object]
    inputs: str  # dtype of the first tensor argument (x for the scans, the states for the state passing)
    specialized: str = ""  # integer arguments Triton made constants (=1) or found not divisible by 16
    routes: List[str] = field(default_factory=list)
    seconds: float = 0.0
    shared: int = 0
    num_warps: int = 0
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None  # ptxas' "bytes spill stores"
    stack_bytes: Optional[int] = None  # ptxas' "bytes stack frame": the local memory each thread holds
    error: Optional[str] = None


def ptxas_usage(log: str) -> tuple:
    """``(registers, spill-store bytes, stack-frame bytes)`` per thread from ``ptxas -v``'s
    report, which Triton prints with ``knobs.nvidia.dump_ptxas_log`` (each kernel here is one
    entry function; cuobjdump's LOCAL column misses spills)."""
    found = [re.search(pattern, log) for pattern in
             (r"Used (\d+) registers", r"(\d+) bytes spill stores", r"(\d+) bytes stack frame")]
    if None in found:
        raise RuntimeError(f"no register, spill or stack count in ptxas' report:\n{log}")
    return tuple(int(match.group(1)) for match in found)


def _specialized(params, specialization) -> str:
    """The integer arguments Triton specialized: ``=1`` (compiled as that constant) and ``¬16``
    (not divisible by 16); the others are 16-divisible, as at real widths."""
    ones, odd = [], []
    for param, (kind, attribute) in zip(params, specialization):
        if param.is_constexpr or not isinstance(kind, str):
            continue
        if kind == "constexpr":
            ones.append(param.name)
        elif kind[0] in "iu" and attribute != "D":
            odd.append(param.name)
    return "; ".join(part for part in (", ".join(f"{name}=1" for name in ones), "¬16: " + ", ".join(odd) if odd else "")
                     if part)


class Interceptor:
    """Replaces ``JITFunction.run`` for the duration: compile for the target, never launch."""

    def __init__(self, capability: int, keep: Optional[str] = None):
        self.capability, self.keep = capability, keep
        self.variants: Dict[tuple, Variant] = {}
        self.touched: list = []  # the JITFunctions whose caches this interceptor reset
        self.route = "?"

    @contextlib.contextmanager
    def active(self):
        original_run, original_usable = JITFunction.run, tl_mamba.backends.triton_usable
        interceptor = self

        def compile_only(self, *args, grid, warmup, **kwargs):
            if getattr(self, "_compiled_by", None) is not interceptor:
                # Triton keeps one binder (with its target) and one kernel cache per device index:
                # start both afresh for each interceptor, or an earlier target's kernels come back
                # (and ptxas, not run again, reports nothing)
                self.device_caches.clear()
                self._compiled_by = interceptor
                interceptor.touched.append(self)
            # what Triton compiles separately: its own specialization of this call's arguments
            _, specialization, options = self.device_caches[0][4](*args, **kwargs)
            key = (self.fn.__module__, self.fn.__qualname__, str(specialization), str(options))
            variant = interceptor.variants.get(key)
            if variant is None:
                constexprs = {k: v for k, v in kwargs.items() if k.isupper()}
                first = next((str(a.dtype)[6:] for a in args if isinstance(a, torch.Tensor)), "-")
                variant = interceptor.variants[key] = Variant(self.fn.__name__, constexprs, first,
                                                              _specialized(self.params, specialization))
                start, report = time.perf_counter(), io.StringIO()
                try:
                    with contextlib.redirect_stdout(report):  # where Triton prints ptxas' report
                        compiled = original_run(self, *args, grid=grid, warmup=True, **kwargs)
                    variant.shared, variant.num_warps = compiled.metadata.shared, compiled.metadata.num_warps
                    variant.registers, variant.spill_bytes, variant.stack_bytes = ptxas_usage(report.getvalue())
                except Exception as err:  # what a GPU would raise at its first launch
                    first_line = (str(err).strip().splitlines() or [""])[0]
                    variant.error = f"{type(err).__name__}: {first_line[:300]}"
                variant.seconds = time.perf_counter() - start
            if interceptor.route not in variant.routes:
                variant.routes.append(interceptor.route)
            if variant.error:
                raise RuntimeError(f"{variant.kernel} did not compile for sm_{interceptor.capability}: {variant.error}")

        previous = driver._active  # None until a driver was needed; a real one on a GPU machine
        driver.set_active(_CompileOnlyDriver(self.capability))
        cache = tempfile.TemporaryDirectory(prefix="compile_triton_")
        JITFunction.run = compile_only
        # the dispatchers run Triton on CUDA tensors (or under the interpreter); these are CPU tensors
        tl_mamba.backends.triton_usable = lambda device: True
        try:
            with knobs.cache.scope(), knobs.nvidia.scope():  # restored on exit, os.environ included
                # a cache of our own, so that every variant is compiled here (ptxas reports only then)
                knobs.cache.dir = os.path.join(self.keep, f"sm_{self.capability}") if self.keep else cache.name
                knobs.nvidia.dump_ptxas_log = True
                yield self
        finally:
            JITFunction.run, tl_mamba.backends.triton_usable = original_run, original_usable
            driver._active = previous
            for kernel in self.touched:  # their caches hold this target's binder and kernels
                kernel.device_caches.clear()
                del kernel._compiled_by
            cache.cleanup()


def build(family: str, widths: dict, dtype: torch.dtype):
    cfg = HookedMambaConfig(n_layers=1, d_vocab=512, family=family, dtype=dtype, seed=0, **widths)
    model = (HookedMamba if family == "mamba1" else HookedMamba2)(cfg)
    return model.set_backend("triton")


def routes(family: str, model, p: int) -> Dict[str, Callable[[], object]]:
    """The calls that launch kernels, by name. Their outputs are garbage (nothing ran)."""
    tokens = torch.randint(1, 512, (1, p))
    pair = torch.randint(1, 512, (2, p))
    e = model.cfg.d_inner
    restrict = dict(heads=[0, model.cfg.n_heads - 1]) if family == "mamba2" else dict(channels=list(range(0, e, 3)))
    rows = torch.zeros(2, p, dtype=torch.bool)
    rows[0, 1], rows[1, 5] = True, True

    def general_mask(mask, hook):
        # not an S → T block. Mamba-2: half the edges at random, past any scan count, so the
        # quadratic form (the masked-tile kernel); Mamba-1: a few edges (its quadratic form is torch)
        if family == "mamba2":
            return mask * (torch.rand(mask.shape[-2:], generator=torch.Generator().manual_seed(0)) > 0.5)
        mask[..., p - 1, 1::7] = 0
        return mask

    def edit_state(h, hook):
        h[:, p // 3] = 0
        return h

    def backward():
        model.zero_grad()
        model(tokens, return_type="loss").backward()

    def mask_gradient():
        from tl_mamba.circuits.knockout_attribution import knockout_attribution

        knockout_attribution(model, pair[:1], lambda logits: logits[:, -1, 0].nan_to_num().sum(),  # the kernels wrote nothing
                             layers=[0], progress=False)

    return {
        "forward": lambda: model(tokens),
        "hook_h cached": lambda: model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_h")),
        "knockout S→T": lambda: model.run_with_knockout(tokens, Knockout(layers=0, sources=[1, 2], targets=[-1])),
        "knockout per row": lambda: model.run_with_knockout(pair, Knockout(layers=0, sources=rows, targets=[-1])),
        "knockout " + next(iter(restrict)): lambda: model.run_with_knockout(
            tokens, Knockout(layers=0, sources=[1, 2], targets=[-1], **restrict)),
        "hook_ssm_mask edit": lambda: model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_ssm_mask", general_mask)]),
        "hook_h edit": lambda: model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_h", edit_state)]),
        "backward": backward,
        "mask gradient": mask_gradient,
        "generate": lambda: model.generate(  # the logits are garbage: an EOS would stop it before a decode step
            tokens[:, :8], max_new_tokens=2, do_sample=False, stop_at_eos=False, verbose=False),
    }


def fallback_routes(family: str) -> Dict[str, List[tuple]]:
    """Settings under which the other kernels run, by route name: ``[(module, attribute, value)]``.

    They serve where the first-choice kernel fails on a GPU (``kernel_or_fallback``) or is
    switched off; a GPU that never ran them would meet them exactly then. Each is run
    through the forward, ``hook_h`` cached, the S → T knockout, the ``hook_ssm_mask`` edit and
    the backward."""
    if family == "mamba1":
        from tl_mamba.ops.selective_scan import triton_kernel
        return {"sequential kernel": [(triton_kernel, "KERNEL", "sequential"), (triton_kernel, "BACKWARD", "recompute")]}
    from tl_mamba.ops.ssd import triton_kernel
    return {
        "knockout as a separate scan": [(triton_kernel, "SAME_PASS", False)],
        "recurrent kernel": [(triton_kernel, "BACKWARD_CHUNK", 96)],  # not a multiple of the chunk: recurrent
    }


def check_target(capability: int, sizes: List[str], p: int, dtypes: List[torch.dtype], keep: Optional[str] = None,
                 log=print) -> tuple:
    """Compile what every route launches for ``capability``: ``(variants, failed routes)``."""
    interceptor = Interceptor(capability, keep)
    failures = []
    with interceptor.active():
        for size in sizes:
            for family in ("mamba1", "mamba2"):
                for dtype in dtypes:
                    model = build(family, WIDTHS[size][family], dtype)
                    model_routes = routes(family, model, p)
                    calls = [(name, [], call) for name, call in model_routes.items()]
                    for setting, changes in fallback_routes(family).items():
                        calls += [(f"{name} ({setting})", changes, call) for name, call in model_routes.items()
                                  if name in ("forward", "hook_h cached", "knockout S→T", "hook_ssm_mask edit", "backward")]
                    for name, changes, call in calls:
                        interceptor.route = f"{family} {size} {str(dtype)[6:]} {name}"
                        try:
                            with patched(changes), torch.inference_mode("backward" not in name and "gradient" not in name):
                                call()
                        except Exception as err:  # noqa: BLE001 - reported, and the exit status says so
                            failures.append(f"{interceptor.route}: {type(err).__name__}: {err}")
                            log(f"  FAILED {interceptor.route}: {type(err).__name__}: {err}")
                    log(f"sm_{capability} {family} {size} {str(dtype)[6:]}: {len(interceptor.variants)} variants so far")
    variants = list(interceptor.variants.values())
    for variant in variants:
        variant.routes = sorted(set(variant.routes))
    return variants, failures


def problems(variant: Variant, capability: int) -> List[str]:
    """Why ``variant`` would not run on ``capability`` (empty when it would)."""
    if variant.error:
        return [f"does not compile: {variant.error}"]
    if variant.registers is None:
        return ["ptxas reported no registers"]
    found = []
    limit = TARGETS[capability]["block_shared"]
    if variant.shared > limit:
        found.append(f"shared memory {variant.shared} B > {limit} B")
    if blocks_per_sm(variant, capability) < 1:  # registers × threads past a multiprocessor's
        found.append(f"{variant.registers} registers × {32 * variant.num_warps} threads > {REGISTERS_PER_SM}")
    return found


def table(variants: List[Variant], capability: int, tools: dict) -> List[str]:
    target = TARGETS[capability]
    lines = [f"### sm_{capability} ({target['gpu']}; shared memory limit {target['block_shared']} B; "
             f"ptxas {tools.get('ptxas', 'unknown')})", "",
             "| kernel | x | constexprs | specialized | warps | registers | spilled B | stack B | shared B | "
             "blocks / SM | compile s | fits | routes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in sorted(variants, key=lambda v: (v.kernel, str(v.constexprs), v.inputs, v.specialized)):
        shown = ", ".join(f"{k}={v.constexprs[k]}" for k in sorted(v.constexprs)
                          if not (isinstance(v.constexprs[k], bool) and not v.constexprs[k]))
        found = problems(v, capability)
        occupancy = blocks_per_sm(v, capability) if not found else "-"
        lines.append(f"| `{v.kernel}` | {v.inputs} | {shown} | {v.specialized} | {v.num_warps} | {v.registers} | "
                     f"{v.spill_bytes} | {v.stack_bytes} | {v.shared} | {occupancy} | {v.seconds:.1f} | "
                     f"{'no: ' + '; '.join(found) if found else 'yes'} | {len(v.routes)} |")
    return lines


SWEEP_SHAPE = dict(b=1, p=256, h=24, hd=64, g=1, n=128)  # one Mamba-2 130m layer (p only sets the grid)
SWEEP_SHAPE_MAMBA1 = dict(b=1, p=256, e=1536, n=16)  # one Mamba-1 130m layer
#: Mamba-1's chunked kernel: positions × channels per tile (BLOCK_T × BLOCK_E; × n = 16 state entries),
#: from half to twice the default's 32 × 8 entries. At batch 1 a layer has e / BLOCK_E programs, each
#: walking p / BLOCK_T tiles in turn: fewer channels per tile is more programs and fewer steps.
MAMBA1_TILES = [(t, e) for t in (16, 32, 64, 128, 256) for e in (1, 2, 4, 8, 16) if 128 <= t * e <= 512]


def sweep_tiles(capability: int, log=print) -> tuple:
    """The tile choices compiled for ``capability``, in fp32 and bf16: Mamba-2's plain chunked
    kernels over hd × n tiles and its masked-tile kernel over ``BLOCK_I`` × ``BLOCK_D``, and
    Mamba-1's chunked kernel over ``BLOCK_T`` × ``BLOCK_E`` (:data:`MAMBA1_TILES`), plain and with
    the same-pass knockout. The masked kernel is launched directly, also on bf16 tensors: what
    ran before its inputs were upcast (2026-12-06). Returns ``(markdown rows, how many sizes did
    not compile)``."""
    import triton.language as tl

    from tl_mamba.ops.knockout import EdgeRemoval
    from tl_mamba.ops.selective_scan import triton_kernel as mamba1_kernels
    from tl_mamba.ops.ssd import triton_chunked, triton_masked

    shape = SWEEP_SHAPE
    lines = [f"### sm_{capability}: tiles", "", "| kernel | x | tile | registers | spilled B | stack B | shared B |",
             "|---|---|---|---|---|---|---|"]

    failed = 0

    def compile_tile(launch, tile):
        nonlocal failed
        interceptor = Interceptor(capability)
        try:
            with interceptor.active():
                launch()
        except RuntimeError:  # the variant holds the error; its row shows it
            failed += 1
        row(interceptor, tile)

    def row(interceptor, tile):
        for v in sorted(interceptor.variants.values(), key=lambda v: v.kernel):
            if v.kernel in ("_chunk_state_kernel", "_chunk_scan_kernel", "_masked_removed_terms_kernel",
                            "_selective_scan_chunked_fwd_kernel"):
                lines.append(f"| `{v.kernel}` | {v.inputs} | {tile} | {v.registers} | {v.spill_bytes} | "
                             f"{v.stack_bytes} | {v.shared} |" if not v.error else f"| `{v.kernel}` | {v.inputs} | "
                             f"{tile} | {v.error} | | | |")

    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        b, p, h, hd, g, n = (shape[k] for k in ("b", "p", "h", "hd", "g", "n"))
        x, B, C = (torch.randn(*size, generator=generator).to(dtype) for size in ((b, p, h, hd), (b, p, g, n),
                                                                                   (b, p, g, n)))
        delta, A, D = torch.rand(b, p, h).to(dtype), -torch.rand(h), torch.randn(h)
        for block_hd in (16, 32, 64):
            for block_n in (16, 32, 64, 128):
                compile_tile(lambda: triton_chunked.ssd_chunked_triton(x, delta, A, B, C, D, None, block_hd=block_hd,
                                                                       block_n=block_n),
                             f"hd × n {block_hd} × {block_n}")
        for block_hd, block_n in ((32, 64), (64, 64)):  # tensor-core dots: not the default ("ieee"), for comparison
            with patched([(triton_chunked, "DOT_PRECISION", "tf32")]):
                compile_tile(lambda: triton_chunked.ssd_chunked_triton(x, delta, A, B, C, D, None, block_hd=block_hd,
                                                                       block_n=block_n),
                             f"hd × n {block_hd} × {block_n}, tf32 dots")
        removed, cumsum = torch.rand(b, h, p, p), torch.rand(b, h, p, dtype=torch.float64)
        out = torch.empty(b, p, h, hd)
        for block_i in (16, 32, 64):
            for block_d in (16, 32, 64):
                compile_tile(lambda: triton_masked._masked_removed_terms_kernel[(1,)](
                    x, delta, A, B, C, removed, cumsum, out, p, h, hd, g, n, h // g, h, ACC=tl.float32,
                    DOT=triton_chunked.DOT_PRECISION, BLOCK_I=block_i, BLOCK_D=block_d, BLOCK_N=n),
                    f"I × D {block_i} × {block_d}")
        b, p, e, n = (SWEEP_SHAPE_MAMBA1[k] for k in ("b", "p", "e", "n"))
        x, delta, z = (torch.randn(b, p, e, generator=generator).to(dtype) for _ in range(3))
        B, C = (torch.randn(b, p, n, generator=generator).to(dtype) for _ in range(2))
        A, D = -torch.rand(e, n), torch.randn(e)
        sources, targets = torch.zeros(b, p), torch.zeros(b, p)
        sources[:, 1:4], targets[:, -1] = 1, 1
        knockout = EdgeRemoval(sources, targets)
        for block_t, block_e in MAMBA1_TILES:
            for removal in (None, knockout):
                compile_tile(lambda: mamba1_kernels._forward(x, delta, A, B, C, D, None, False, block_e=block_e,
                                                             block_t=block_t, z=z, kernel="chunked", removal=removal),
                             f"T × E {block_t} × {block_e}" + (", knockout" if removal is not None else ""))
        log(f"sm_{capability} {str(dtype)[6:]}: tiles compiled")
    return lines, failed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(TARGETS),
                        help="compute capabilities to compile for (default: 90)")
    parser.add_argument("--widths", nargs="+", default=["130m", "370m"], choices=sorted(WIDTHS),
                        help="model widths (default: 130m 370m)")
    parser.add_argument("--p", type=int, default=2048, help="sequence length (default 2048)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--out", help="write the tables as markdown here")
    parser.add_argument("--sweep", action="store_true", help="instead of the models' routes, compile the "
                        "kernels over their tile sizes (Mamba-2: hd × n, BLOCK_I × BLOCK_D; Mamba-1: BLOCK_T × "
                        "BLOCK_E) at 130m widths, fp32 and bf16")
    parser.add_argument("--keep", metavar="DIR", help="compile into DIR/sm_<arch> and keep it (each variant's TTIR, "
                        "PTX and cubin, to read); default: a temporary folder. Every variant is compiled afresh "
                        "either way (ptxas reports only then), so point it at an empty folder")
    args = parser.parse_args(argv)
    if args.p < 8:
        parser.error(f"--p must be at least 8 (the routes knock out positions 1 to 5 and generate from 8), got {args.p}")
    if args.sweep and args.keep:
        parser.error("--keep applies to the routes, not to --sweep (whose tile sizes compile into folders of their own)")
    for capability in args.arch if args.keep else ():
        folder = os.path.join(args.keep, f"sm_{capability}")
        if os.path.isdir(folder) and os.listdir(folder):
            parser.error(f"--keep: {folder} is not empty (its cached kernels would not be compiled again, and "
                         "ptxas reports only when it runs)")
    torch.manual_seed(0)
    dtypes = [getattr(torch, d) for d in args.dtypes]
    sections, bad = [], 0
    for capability in args.arch:
        tools = triton_toolchain(capability)
        print(f"sm_{capability}: triton {tools.get('triton')}, ptxas {tools.get('ptxas')}")
        if args.sweep:
            rows, failed = sweep_tiles(capability)
            sections += rows + [""]
            print("\n".join(rows))
            bad += failed
            continue
        variants, failures = check_target(capability, args.widths, args.p, dtypes, args.keep)
        rows = table(variants, capability, tools)
        sections += rows + [""]
        # a kernel that does not compile fails its routes too: count the routes that failed for another reason
        broken = sum(bool(problems(v, capability)) for v in variants)
        bad += broken + sum("did not compile" not in failure for failure in failures)
        print("\n".join(rows))
    if args.out:
        fusion = os.environ.get("TRITON_DEFAULT_FP_FUSION", "unset (Triton's default)")
        what = ("the kernels over their tile sizes, at 130m widths" if args.sweep else
                f"widths {', '.join(args.widths)}, p = {args.p}, {', '.join(args.dtypes)}. One row per compiled "
                "variant (Triton's specialization); `routes` counts the calls that launched it")
        header = [f"# Triton kernels compiled without a GPU ({time.strftime('%Y-%m-%d')}, triton {triton.__version__})",
                  "", f"`python benchmarks/compile_triton.py {' '.join(argv if argv is not None else sys.argv[1:])}`: "
                  f"{what}. TRITON_DEFAULT_FP_FUSION: {fusion}.", ""]
        with open(args.out, "w") as handle:
            handle.write("\n".join(header + sections))
    print("all kernels compile and fit" if not bad else f"{bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
