"""GPU check and benchmark of the ``"triton"`` backends (one command, needs CUDA).

    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_triton_gpu.py            # full
    HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_triton_gpu.py --quick    # fewer lengths/rounds
    TRITON_INTERPRET=1 HF_HUB_OFFLINE=1 PYTHONPATH=. python benchmarks/bench_triton_gpu.py --smoke  # tiny, CPU ok

``--smoke`` runs every step at toy sizes (on CPU under ``TRITON_INTERPRET=1`` when
there is no GPU), so the script itself is tested (``tests/test_bench_triton_gpu.py``)
and a GPU session spends its time measuring, not debugging. Its numbers mean nothing.

1. Correctness at real sizes: the scan of every family and width below, Triton
   against the ``"reference"`` sequential backend computed in float64 on the GPU,
   for p in ``--check-lengths`` (up to 4096), inputs in fp32 and bf16: y and the final
   state, every position's state (``return_states``), and y under a structured knockout
   in the same pass (forced on, as by default). Reports
   the max abs error relative to the reference's scale.
   (Knockouts, ``hook_h`` edits and gradients through models: ``tests/test_triton.py``,
   which ``run_gpu_session.sh`` runs compiled on the GPU.)
2. Speed at 130m widths, 4 layers, vocab 8192, batch 1, ``--p`` (2048), median of
   interleaved rounds (``_timing.py``), each call followed by ``cuda.synchronize``:
   ``triton`` and ``torch`` forwards, ``knockout`` (Triton, all layers, 3 sources →
   last, by the default route: in the same pass as the scan; to compare, each route
   forced: same pass, edges, a separate scan),
   ``hook_h`` cached forward (Triton), layer 0's state halved at every position
   (``state_ablation_*``: the override by segments against the masked recurrence,
   ``tl_mamba.ops.state_override``), transformers' forward (its own path:
   the fused mamba_ssm kernels when installed, else its torch fallback), and the
   TransformerLens bridge's eager-scan ``hook_ssm_state`` cache.
3. The scans alone at 130m widths, batch 1, ``--p``, fp32 and bf16: ``triton``
   (Mamba-1 with its gate fused, as the model runs it; for Mamba-1 both kernels,
   ``chunked``, the default, and ``sequential``), ``torch``, and mamba_ssm's
   ``selective_scan_fn`` / ``mamba_chunk_scan_combined`` when mamba_ssm imports; plus
   the memory floor of each scan: the bytes it must move (inputs read once, y and the
   final state written once) over the device's copy bandwidth, measured in the same
   run with a large device-to-device copy. For Mamba-2 also the removed terms of a
   general ``[1, h, p, p]`` knockout mask in the quadratic form, by masked tiles
   (Triton) and in torch: their "vs triton" is their cost in scans, which is what
   ``tl_mamba.ops.knockout.DENSE_MASK_AFTER_CUDA`` is set from; and Mamba-2's three
   chunked kernels at explicit tile sizes, plain and with the same-pass knockout (what
   ``triton_chunked.TILE_CAPS`` is set from). Each of these, and mamba_ssm's scan, is
   checked before it is timed (``rel_err`` in its row): the masked tiles against the
   torch quadratic form in float64, the tiled kernels' y (plain and knocked out)
   against the torch backend in float64, mamba_ssm's y against ours.
4. Forward + backward of the scans alone (fp32): Triton (Mamba-1 with its backward
   kernel, and with the chunked torch recompute; Mamba-2 at its default recompute
   chunk and at 512), torch.

Targets (issue "Triton scan kernels"), printed as met / NOT met:
knockout / plain <= 1.3; bridge eager-scan state cache / our hook_h cache >= 50;
plain Triton forward <= 1.5x transformers with mamba_ssm, and the Triton scan <= 1.5x
mamba_ssm's (reported only when mamba_ssm is importable, for the scans also from
``--vendor-path``, and after its y was checked against ours; otherwise the scan's
distance from its memory floor is what to read).

Widths: Mamba-1 130m (d 768, e 1536, n 16) and 370m (d 1024, e 2048, n 16);
Mamba-2 130m (d 768, 24 heads of 64, n 128) and 370m (d 1024, 32 heads of 64, n 128).
Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/triton_gpu``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import pathlib
import sys
import time
import traceback
import warnings
from typing import Optional

import torch
from torch import Tensor

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from _env import machine_info, package_revision, triton_toolchain, write_results  # noqa: E402
from _timing import interleaved  # noqa: E402

from tl_mamba.ops.triton_scan import _FAILED_KERNELS  # noqa: E402  (kernels that fell back on this GPU)

WIDTHS = {
    "mamba1": {"130m": dict(d_model=768, d_state=16), "370m": dict(d_model=1024, d_state=16)},
    "mamba2": {"130m": dict(d_model=768, d_state=128, n_heads=24), "370m": dict(d_model=1024, d_state=128, n_heads=32)},
}
#: Mamba-1's chunked kernel, timed alone at these BLOCK_T × BLOCK_E tiles (the default is 32 × 8 at n = 16;
#: benchmarks/results/compile_triton_tiles.md has their registers and spills)
MAMBA1_TILES = ((32, 8), (64, 4), (128, 2), (128, 4), (256, 1))
#: --smoke: every step at toy sizes (Mamba-2 heads of 16 channels)
SMOKE_WIDTHS = {"mamba1": {"tiny": dict(d_model=16, d_state=4)}, "mamba2": {"tiny": dict(d_model=32, d_state=8, n_heads=4)}}
#: the models of the speed section: 130m widths, 4 layers (and a toy size for --smoke)
MODEL_SIZES = {"full": dict(hidden=768, state1=16, state2=128, heads=24, head_dim=64, layers=4, vocab=8192, chunk=256),
               "smoke": dict(hidden=32, state1=4, state2=8, heads=4, head_dim=16, layers=2, vocab=64, chunk=8)}


def synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def scan_inputs(family, widths, p, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    e = 2 * widths["d_model"]
    n = widths["d_state"]
    if family == "mamba1":
        shapes = dict(x=(1, p, e), delta=(1, p, e), A=(e, n), B=(1, p, n), C=(1, p, n), D=(e,))
    else:
        h = widths["n_heads"]
        shapes = dict(x=(1, p, h, e // h), delta=(1, p, h), A=(h,), B=(1, p, 1, n), C=(1, p, 1, n), D=(h,))
    t = {k: torch.randn(*s, generator=g) for k, s in shapes.items()}
    t["delta"] = torch.rand(*shapes["delta"], generator=g) * 0.1 + 0.001
    t["A"] = -torch.rand(*shapes["A"], generator=g) * 4 - 0.1
    return {k: v.to(device=device, dtype=dtype) for k, v in t.items()}


@contextlib.contextmanager
def mamba1_kernel(name: str):
    """Run the Mamba-1 Triton backend with its ``"chunked"`` or ``"sequential"`` kernel."""
    from tl_mamba.ops.selective_scan import triton_kernel

    default, triton_kernel.KERNEL = triton_kernel.KERNEL, name
    try:
        yield
    finally:
        triton_kernel.KERNEL = default


@contextlib.contextmanager
def knockout_route(same_pass: bool, pairs_per_position: Optional[dict] = None):
    """Force the knockout route of both families: a single S → T knockout in the Triton
    kernels' own pass (``same_pass``, the default of both) or not, and, when given,
    the edge route's threshold (``tl_mamba.ops.knockout.PAIRS_PER_SCANNED_POSITION``)."""
    from tl_mamba.ops import knockout as ops_knockout
    from tl_mamba.ops.selective_scan import triton_kernel
    from tl_mamba.ops.ssd import triton_kernel as ssd_triton_kernel

    saved = triton_kernel.fuses_knockout, ssd_triton_kernel.fuses_knockout, ops_knockout.PAIRS_PER_SCANNED_POSITION
    triton_kernel.fuses_knockout = ssd_triton_kernel.fuses_knockout = lambda: same_pass
    if pairs_per_position is not None:
        ops_knockout.PAIRS_PER_SCANNED_POSITION = pairs_per_position
    try:
        yield
    finally:
        (triton_kernel.fuses_knockout, ssd_triton_kernel.fuses_knockout,
         ops_knockout.PAIRS_PER_SCANNED_POSITION) = saved


def rel_err(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (want in float64)."""
    return float((got.double() - want).abs().max()) / float(want.abs().max())


def check_scans(lengths, device, log, widths_by_family=WIDTHS, rows=None):
    """Triton against the float64 reference; appends a row per check to ``rows`` (returned).

    Per family, width, p and dtype: y and the final state of the plain scan, every
    position's state (``return_states``, what a ``hook_h`` cache holds), and y under a
    structured knockout (3 sources at p/3 → the last position, applied in the same pass
    as the scan, forced on for both families), each as max |error| / max |reference|.
    """
    from tl_mamba.ops.knockout import EdgeRemoval
    from tl_mamba.ops.selective_scan import selective_scan
    from tl_mamba.ops.ssd import ssd_scan

    rows = [] if rows is None else rows
    for family, by_width in widths_by_family.items():
        scan = selective_scan if family == "mamba1" else ssd_scan
        kernels = ("chunked", "sequential") if family == "mamba1" else ("chunked",)
        for width, widths in by_width.items():
            for p in lengths:
                sources = torch.zeros(1, p, device=device)
                sources[:, p // 3:p // 3 + 3] = 1
                targets = torch.zeros(1, p, device=device)
                targets[:, -1] = 1
                knockout = [EdgeRemoval(sources, targets)]
                for dtype in (torch.float32, torch.bfloat16):
                    t = scan_inputs(family, widths, p, dtype, device)
                    ref = scan(*(v.double() for v in t.values()), backend="reference", return_states=True)
                    ref_ko = scan(*(v.double() for v in t.values()), backend="reference", ssm_mask=knockout).y
                    for kernel in kernels:
                        with mamba1_kernel(kernel) if family == "mamba1" else contextlib.nullcontext():
                            out = scan(*t.values(), backend="triton", return_states=False)
                            row = dict(family=family, width=width, p=p, dtype=str(dtype).split(".")[-1],
                                       kernel=kernel, rel_err_y=rel_err(out.y, ref.y),
                                       rel_err_final=rel_err(out.final_state, ref.final_state))
                            del out
                            out = scan(*t.values(), backend="triton", return_states=True)
                            row["rel_err_states"] = rel_err(out.states, ref.states)
                            del out
                            # (Mamba-1's sequential kernel has no same-pass knockout: its default route)
                            with knockout_route(True) if kernel != "sequential" else contextlib.nullcontext():
                                row["rel_err_knockout"] = rel_err(
                                    scan(*t.values(), backend="triton", ssm_mask=knockout).y, ref_ko)
                        rows.append(row)
                        log(f"check {family} {width} p={p} {dtype} {kernel}: rel err y {row['rel_err_y']:.2e}, "
                            f"final {row['rel_err_final']:.2e}, states {row['rel_err_states']:.2e}, "
                            f"knockout {row['rel_err_knockout']:.2e}")
                    del ref, ref_ko, t
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return rows


@contextlib.contextmanager
def section(results: dict, name: str, flush):
    """Run one section of the benchmark; on an error, record its traceback under
    ``results["errors"][name]`` and go on with the next section. Write what is measured
    so far after every section, so a run cut short by its time limit still leaves numbers.
    Each section's wall time goes to ``results["section_seconds"]``, to plan the next lease."""
    start = time.perf_counter()
    try:
        yield
    except Exception:  # one broken section must not cost a GPU session the others
        tb = traceback.format_exc()
        print(f"section {name} failed:\n{tb}", flush=True)
        results.setdefault("errors", {})[name] = tb
    finally:
        elapsed = time.perf_counter() - start
        results.setdefault("section_seconds", {})[name] = round(elapsed, 1)
        print(f"section {name}: {elapsed:.1f} s", flush=True)
        flush()


def copy_bandwidth(device, nbytes: int, repeats: int) -> float:
    """Bytes per second of a device-to-device copy of ``nbytes`` (read + write counted)."""
    src = torch.empty(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    synchronize(device)
    timings = interleaved({"copy": lambda: (dst.copy_(src), synchronize(device))}, repeats=repeats, warmup=1)
    return 2 * src.numel() * 4 / timings.median("copy")


def scan_bytes(family: str, t: dict) -> int:
    """Bytes a scan must move at least: every input read once, y (fp32) and the final state written once."""
    read = sum(v.numel() * v.element_size() for v in t.values())
    if family == "mamba1":
        b, p, e = t["x"].shape
        read += t["x"].numel() * t["x"].element_size()  # z, the gate input, same shape as x
        final = b * e * t["A"].shape[-1]
    else:
        b, p, h, hd = t["x"].shape
        final = b * h * hd * t["B"].shape[-1]
    return read + (t["x"].numel() + final) * 4


def scan_contenders(family, t, device, log, vendor_path: str = "", notes: Optional[dict] = None):
    """The scans on the same inputs: ours (``triton``, ``torch``) and mamba_ssm's when it imports.

    ``vendor_path``: a folder holding mamba_ssm installed without its CUDA extension
    (``--vendor-path``), put on ``sys.path`` only here, after transformers' models were
    built: mamba_ssm's Mamba-2 scan is pure Triton, but a transformers that finds mamba_ssm
    at import would route its Mamba-1 through the missing extension. ``notes`` receives,
    per contender, ``rel_err`` (max |Δ| / max |reference|) and what it was measured against:
    mamba_ssm's y against our Triton y (so the timing compares the same computation), the
    masked tiles' removed terms against the torch quadratic form in float64, and each tile
    size's y of the chunked kernels (plain and same-pass knockout) against the torch backend
    in float64: checks of those kernels at this size.
    """
    from tl_mamba.ops.selective_scan import selective_scan
    from tl_mamba.ops.ssd import ssd_scan

    if vendor_path and vendor_path not in sys.path:
        sys.path.append(vendor_path)

    def sync(fn):
        return lambda: (fn(), synchronize(device))[0]

    calls = {}
    if family == "mamba1":
        z = torch.randn_like(t["x"])
        for backend in ("triton", "torch"):
            calls[backend] = sync(lambda backend=backend: selective_scan(*t.values(), z=z, backend=backend))

        def sequential_kernel():  # the other Triton kernel (one position at a time), to choose the default
            with mamba1_kernel("sequential"):
                return selective_scan(*t.values(), z=z, backend="triton")

        calls["triton_sequential"] = sync(sequential_kernel)
        # the chunked kernel alone at explicit BLOCK_T × BLOCK_E tiles (the default: 32 × 8 at n = 16): at
        # batch 1 a layer has e / BLOCK_E programs, each walking p / BLOCK_T tiles in turn, so fewer channels
        # per tile is more programs and fewer steps; what triton_kernel.BLOCK_T / TILE_ENTRIES are set from
        from tl_mamba.ops.selective_scan import triton_kernel

        scan_args = [t[k] for k in ("x", "delta", "A", "B", "C", "D")] + [None, False]
        for block_t, block_e in MAMBA1_TILES:
            calls[f"chunked_kernel_{block_t}x{block_e}"] = sync(
                lambda block_t=block_t, block_e=block_e: triton_kernel._forward(
                    *scan_args, block_t=block_t, block_e=block_e, z=z, kernel="chunked"))
        if notes is not None:  # each tile size's y against the torch backend in float64
            reference = selective_scan(*(v.double() for v in t.values()), z=z.double(), backend="torch").y
            for name in [c for c in calls if c.startswith("chunked_kernel_")]:
                notes[name] = dict(rel_err=rel_err(calls[name]()[0], reference), against="the torch backend in float64")
            del reference
        try:  # mamba_ssm's layout: channels before positions
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            u, delta, zz = (v.transpose(1, 2).contiguous() for v in (t["x"], t["delta"], z))
            B, C = (v.transpose(1, 2).contiguous() for v in (t["B"], t["C"]))
            A, D = t["A"].float(), t["D"].float()
            calls["mamba_ssm"] = sync(lambda: selective_scan_fn(u, delta, A, B, C, D, z=zz, return_last_state=True))
            ours = lambda: selective_scan(*t.values(), z=z, backend="triton").y  # noqa: E731
            theirs = lambda out: out[0].transpose(1, 2)  # noqa: E731  ([b, e, p] -> [b, p, e])
        except ImportError:
            pass
    else:
        from tl_mamba.ops.knockout import dense_removed_terms_bphd
        from tl_mamba.ops.ssd.triton_masked import masked_removed_terms_triton

        for backend in ("triton", "torch"):
            calls[backend] = sync(lambda backend=backend: ssd_scan(*t.values(), backend=backend))
        # a general knockout mask's removed terms in the quadratic form (what replaces one scan per
        # column pattern past dense_mask_after(p)); "vs triton" reads as "costs this many scans"
        p, h = t["x"].shape[1], t["x"].shape[2]
        removed = torch.rand(1, h, p, p, device=device).tril_()
        quadratic_inputs = [t[k] for k in ("x", "delta", "A", "B", "C")]
        calls["dense_mask_masked_tiles_triton"] = sync(lambda: masked_removed_terms_triton(removed, *quadratic_inputs))
        # 32 head channels per program: no spills on sm_80 / sm_90 (docs/performance.md, "Compiled without a GPU")
        calls["dense_mask_masked_tiles_d32_triton"] = sync(
            lambda: masked_removed_terms_triton(removed, *quadratic_inputs, block_d=32))
        calls["dense_mask_quadratic_torch"] = sync(lambda: dense_removed_terms_bphd(removed, *quadratic_inputs))
        if notes is not None:
            reference = dense_removed_terms_bphd(removed.double(), *(v.double() for v in quadratic_inputs))
            for name, block_d in (("dense_mask_masked_tiles_triton", None), ("dense_mask_masked_tiles_d32_triton", 32)):
                notes[name] = dict(
                    rel_err=rel_err(masked_removed_terms_triton(removed, *quadratic_inputs, block_d=block_d), reference),
                    against="the torch quadratic form in float64")
            del reference
        # the three chunked kernels alone at explicit (hd, n) tiles, plain and with the same-pass
        # knockout (3 sources at p/3 → the last position): what triton_chunked.TILE_CAPS is set from
        from _setup import patched
        from tl_mamba.ops.knockout import EdgeRemoval
        from tl_mamba.ops.ssd import triton_chunked
        from tl_mamba.ops.ssd.triton_chunked import ssd_chunked_triton

        sources = torch.zeros(1, p, device=device)
        sources[:, p // 3:p // 3 + 3] = 1
        targets = torch.zeros(1, p, device=device)
        targets[:, -1] = 1
        removal = EdgeRemoval(sources, targets)
        scan_args = [t[k] for k in ("x", "delta", "A", "B", "C", "D")] + [None]
        for hd_tile, n_tile in ((64, 64), (32, 64), (32, 32), (16, 32)):
            tiles = dict(block_hd=hd_tile, block_n=n_tile)
            calls[f"same_pass_knockout_kernels_{hd_tile}x{n_tile}"] = sync(
                lambda tiles=tiles: ssd_chunked_triton(*scan_args, removal=removal, **tiles))
        for hd_tile, n_tile in ((64, 64), (32, 64)):
            calls[f"plain_chunked_kernels_{hd_tile}x{n_tile}"] = sync(
                lambda tiles=dict(block_hd=hd_tile, block_n=n_tile): ssd_chunked_triton(*scan_args, **tiles))

        def tf32_dots():  # the default tiles with tensor-core dots (not the default's exact fp32 "ieee" dots)
            with patched([(triton_chunked, "DOT_PRECISION", "tf32")]):
                return ssd_chunked_triton(*scan_args)

        calls["chunked_tf32_dots"] = sync(tf32_dots)
        if notes is not None:  # each tile size's y, plain and knocked out, against the torch backend in float64
            wide = [v.double() for v in scan_args[:-1]]
            # one reference per computation: the plain kernels and the tf32 dots compute the same y
            for names, knocked_out in ((("same_pass_knockout_kernels",), True),
                                       (("plain_chunked_kernels", "chunked_tf32_dots"), False)):
                reference = ssd_scan(*wide, backend="torch", ssm_mask=[removal] if knocked_out else None).y
                for name_of_call in [c for c in calls if c.startswith(names)]:
                    notes[name_of_call] = dict(rel_err=rel_err(calls[name_of_call]()[0], reference),
                                               against="the torch backend in float64")
            del wide, reference
        try:
            from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

            calls["mamba_ssm"] = sync(lambda: mamba_chunk_scan_combined(
                t["x"], t["delta"], t["A"].float(), t["B"], t["C"], chunk_size=256, D=t["D"].float(),
                return_final_states=True))
            ours = lambda: ssd_scan(*t.values(), backend="triton").y  # noqa: E731
            theirs = lambda out: out[0]  # noqa: E731
        except ImportError:
            pass
    if "mamba_ssm" in calls:
        try:
            err = rel_err(theirs(calls["mamba_ssm"]()), ours().double())
            log(f"mamba_ssm {family} scan: max |y - ours| / max |ours| = {err:.1e}")
            if notes is not None:
                notes["mamba_ssm"] = dict(rel_err=err, against="our Triton scan")
        except Exception as err:  # a version whose signature differs, or no CUDA extension: report, time the rest
            log(f"mamba_ssm {family} scan failed, not timed: {err!r}")
            del calls["mamba_ssm"]
    return calls


def backward_contenders(family, t, device):
    """Forward + backward of one scan (gradients of every input): Triton (for Mamba-1 with its
    backward kernel, the default, and with the chunked torch recompute) and torch."""
    from tl_mamba.ops.selective_scan import selective_scan, triton_kernel
    from tl_mamba.ops.ssd import ssd_scan

    scan = selective_scan if family == "mamba1" else ssd_scan
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in t.items()}

    def step(backend, backward=None):
        def call():
            default = triton_kernel.BACKWARD
            if backward is not None:
                triton_kernel.BACKWARD = backward
            try:
                out = scan(*leaves.values(), backend=backend)
                (out.y.sum() + out.final_state.sum()).backward()
            finally:
                triton_kernel.BACKWARD = default
            for leaf in leaves.values():
                leaf.grad = None
            synchronize(device)
        return call

    calls = {"triton": step("triton"), "torch": step("torch")}
    if family == "mamba1":
        calls["triton_recompute_backward"] = step("triton", "recompute")
    else:  # the recompute chunk T (default 2048) against 512: fewer, longer chunks launch fewer kernels
        from tl_mamba.ops.ssd import triton_kernel as ssd_triton_kernel

        def with_chunk(T):
            def call():
                default, ssd_triton_kernel.BACKWARD_CHUNK = ssd_triton_kernel.BACKWARD_CHUNK, T
                try:
                    calls["triton"]()
                finally:
                    ssd_triton_kernel.BACKWARD_CHUNK = default
            return call

        calls["triton_backward_chunk_512"] = with_chunk(512)
    return calls


def host_syncs(fn, device) -> Optional[int]:
    """How many times one call of ``fn`` makes the host wait for the GPU (CUDA's sync debug
    mode: ``nonzero``, ``.item()``, blocking copies); None off CUDA."""
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def build_models(device, size):
    from transformers import Mamba2Config, Mamba2ForCausalLM, MambaConfig, MambaForCausalLM

    from tl_mamba import HookedMamba, HookedMamba2

    s = MODEL_SIZES[size]
    torch.manual_seed(0)
    hf1 = MambaForCausalLM(MambaConfig(hidden_size=s["hidden"], state_size=s["state1"], num_hidden_layers=s["layers"],
                                       vocab_size=s["vocab"], bos_token_id=0, eos_token_id=1,
                                       pad_token_id=2)).eval().to(device)
    hf2 = Mamba2ForCausalLM(Mamba2Config(hidden_size=s["hidden"], num_heads=s["heads"], head_dim=s["head_dim"],
                                         state_size=s["state2"], n_groups=1, num_hidden_layers=s["layers"],
                                         vocab_size=s["vocab"], chunk_size=s["chunk"], bos_token_id=0,
                                         eos_token_id=1, pad_token_id=2)).eval().to(device)
    return {"mamba1": (hf1, HookedMamba.from_hf(hf1).to(device).eval()),
            "mamba2": (hf2, HookedMamba2.from_hf(hf2).to(device).eval())}


def contenders(family, hf, model, p, device, with_bridge):
    from tl_mamba import Knockout

    tokens = torch.randint(0, model.cfg.d_vocab, (1, p), device=device)
    ko = Knockout(layers=range(model.cfg.n_layers), sources=[p // 3, p // 3 + 1, p // 3 + 2], targets=[-1])
    names = [f"blocks.{layer}.hook_h" for layer in range(model.cfg.n_layers)]

    def sync(fn):
        def call():
            out = fn()
            synchronize(device)
            return out
        return call

    def backend(name, fn):
        def call():
            model.set_backend(name)
            return fn()
        return call

    calls = {
        "triton": backend("triton", lambda: model(tokens)),
        "torch": backend("torch", lambda: model(tokens)),
        "knockout_triton": backend("triton", lambda: model.run_with_knockout(tokens, ko)),
        "hook_h_cache_triton": backend("triton", lambda: model.run_with_cache(tokens, names_filter=names)),
        "transformers": lambda: hf(tokens),
    }
    def forced(same_pass: bool, pairs_per_position: Optional[dict] = None):
        """The Triton knockout by the route :func:`knockout_route` forces."""
        def call():
            with knockout_route(same_pass, pairs_per_position):
                model.set_backend("triton")
                return model.run_with_knockout(tokens, ko)
        return call

    def state_ablation(route: str):
        """Layer 0's state halved at every position (no grad), by ``route``: segments (two scans
        per position) or one masked recurrence."""
        from _setup import override_route

        def call():
            with override_route(route), torch.no_grad():
                model.set_backend("triton")
                return model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_h", lambda h, hook: h * 0.5)])
        return call

    calls["state_ablation_segments"] = state_ablation("segments")
    calls["state_ablation_recurrence"] = state_ablation("recurrence")
    # the default route (in the same pass as the scan, both families) against each route forced
    calls["knockout_triton_same_pass"] = forced(True)
    calls["knockout_triton_edges"] = forced(False)
    calls["knockout_triton_separate_scan"] = forced(False, {"bpe": 0.0, "bphd": 0.0})
    if with_bridge:
        try:
            from _setup import build_bridge, set_eager_scan

            bridge = build_bridge(hf.cpu()).to(device)
            hf.to(device)
            set_eager_scan(bridge, True)
            bridge_names = [n for n in bridge.hook_dict if n.endswith("hook_ssm_state")]
            calls["bridge_eager_state_cache"] = lambda: bridge.run_with_cache(tokens, use_cache=False,
                                                                              names_filter=bridge_names)
        except Exception as err:  # the bridge is optional here: report why it is missing
            print(f"bridge unavailable: {err}")
    return {name: sync(fn) for name, fn in calls.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--p", type=int, default=2048)
    parser.add_argument("--check-lengths", default="512,2048,4096")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-bridge", action="store_true", help="skip the TransformerLens bridge")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: checks, models, scans, backward")
    parser.add_argument("--families", default="mamba1,mamba2", help="which families to time (scans, backward)")
    parser.add_argument("--out", default="benchmarks/results/triton_gpu")
    parser.add_argument("--vendor-path", default="",
                        help="a folder with mamba_ssm installed without its CUDA extension, used for the scans "
                             "alone (benchmarks/README.md says how to build it)")
    parser.add_argument("--smoke", action="store_true",
                        help="every step at toy sizes, on CPU under TRITON_INTERPRET=1 without a GPU (tests the script)")
    args = parser.parse_args()
    if torch.cuda.is_available():
        device = torch.device("cuda")
    elif args.smoke and os.environ.get("TRITON_INTERPRET") == "1":
        device = torch.device("cpu")
    else:
        print("bench_triton_gpu.py needs a CUDA device (or --smoke with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    lengths = [int(x) for x in args.check_lengths.split(",")]
    widths, size, copy_bytes = WIDTHS, "full", 1 << 30
    if args.quick:
        lengths, args.repeats = lengths[:1], 3
    if args.smoke:
        lengths, args.repeats, args.p, widths, size, copy_bytes = [8, 13], 1, 16, SMOKE_WIDTHS, "smoke", 1 << 20
    skip = set(filter(None, args.skip.split(",")))
    if skip - {"checks", "models", "scans", "backward"}:
        parser.error(f"--skip takes checks, models, scans, backward; got {args.skip!r}")
    scan_widths = {family: next(iter(by_width.items())) for family, by_width in widths.items()  # 130m (or tiny)
                   if family in args.families.split(",")}
    results = {"date": _dt.date.today().isoformat(), "machine": machine_info(), "device": str(device),
               "gpu": torch.cuda.get_device_name() if device.type == "cuda" else "none (smoke run in the interpreter)",
               "revision": package_revision(), "p": args.p, "smoke": args.smoke}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        results["toolchain"] = triton_toolchain(10 * major + minor)
    try:
        import mamba_ssm  # noqa: F401

        results["mamba_ssm"] = True
    except ImportError:
        results["mamba_ssm"] = False
    toolchain = results.get("toolchain") or {}
    built_with = f", triton {toolchain['triton']} with ptxas {toolchain['ptxas']}" if toolchain else ""
    lines = [f"# Triton backends on {results['gpu']} ({results['date']}, revision {results['revision']}{built_with})", "",
             "## Correctness (max |error| / max |reference|, reference in float64)", "",
             "| family | width | p | dtype | kernel | y | final state | states | knockout y |",
             "|---|---|---|---|---|---|---|---|---|"]

    def flush():
        results["kernel_fallbacks"] = dict(_FAILED_KERNELS)
        write_results(args.out, results, "\n".join(lines))

    results["checks"] = []
    with section(results, "checks", flush):
        if "checks" not in skip:
            check_scans(lengths, device, print, widths, rows=results["checks"])
    for row in results["checks"]:
        lines.append(f"| {row['family']} | {row['width']} | {row['p']} | {row['dtype']} | {row['kernel']} | "
                     f"{row['rel_err_y']:.1e} | {row['rel_err_final']:.1e} | {row['rel_err_states']:.1e} | "
                     f"{row['rel_err_knockout']:.1e} |")
    results["speed"] = {}
    lines += ["", f"## Speed of the models, {MODEL_SIZES[size]['layers']} layers at "
              f"{'130m' if size == 'full' else 'toy'} widths, p = {args.p} (median s; mamba_ssm installed: "
              f"{results['mamba_ssm']})", "", "| family | contender | median s | vs triton |", "|---|---|---|---|"]
    with torch.inference_mode():
        with section(results, "models", flush):
            models = build_models(device, size) if "models" not in skip else {}
        for family, (hf, model) in (models.items() if "models" not in results.get("errors", {}) else ()):
            with section(results, f"speed {family}", flush):
                calls = contenders(family, hf, model, args.p, device, not args.no_bridge)
                timings = interleaved(calls, repeats=args.repeats, warmup=2, log=print)
                speed = {name: timings.median(name) for name in calls}
                ratios = {name: timings.paired_ratio(name, "triton") for name in calls}
                results["speed"][family] = {"median_s": speed, "vs_triton": ratios}
                for name in calls:
                    lines.append(f"| {family} | {name} | {speed[name]:.4f} | {ratios[name]:.2f}x |")
                targets = {"knockout / plain <= 1.3": ratios["knockout_triton"] <= 1.3}
                if "bridge_eager_state_cache" in calls:
                    targets["bridge state cache / hook_h cache >= 50"] = (
                        timings.paired_ratio("bridge_eager_state_cache", "hook_h_cache_triton") >= 50)
                if results["mamba_ssm"]:
                    targets["triton <= 1.5x transformers+mamba_ssm"] = timings.paired_ratio("triton", "transformers") <= 1.5
                results["speed"][family]["targets"] = targets
                syncs = {name: host_syncs(calls[name], device)
                         for name in ("triton", "knockout_triton", "knockout_triton_edges", "hook_h_cache_triton")}
                results["speed"][family]["host_syncs"] = syncs
                lines.append(f"| {family} | host syncs in one call: " + ", ".join(f"{k} {v}" for k, v in syncs.items())
                             + " | | |")
                lines += [f"| {family} | target: {k} | {'met' if v else 'NOT met'} | |" for k, v in targets.items()]
            del hf, model
        models = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        bandwidth = copy_bandwidth(device, copy_bytes, max(args.repeats, 3))
        results["copy_bandwidth_GBps"] = bandwidth / 1e9
        results["scans"] = []
        lines += ["", f"## The scans alone, batch 1, p = {args.p} (median s; device copy bandwidth "
                  f"{bandwidth / 1e9:.0f} GB/s, measured; floor = bytes moved / bandwidth)", "",
                  "| family | width | dtype | contender | median s | vs triton | floor s | / floor |",
                  "|---|---|---|---|---|---|---|---|"]
        for family, (width, widths_of) in (scan_widths.items() if "scans" not in skip else ()):
            for dtype in (torch.float32, torch.bfloat16):
                with section(results, f"scans {family} {dtype}", flush):
                    t = scan_inputs(family, widths_of, args.p, dtype, device)
                    notes = {}
                    calls = scan_contenders(family, t, device, print, args.vendor_path, notes)
                    timings = interleaved(calls, repeats=args.repeats, warmup=2, log=print)
                    floor = scan_bytes(family, t) / bandwidth
                    for name in calls:
                        row = dict(family=family, width=width, dtype=str(dtype).split(".")[-1], contender=name,
                                   median_s=timings.median(name), vs_triton=timings.paired_ratio(name, "triton"),
                                   floor_s=floor, over_floor=timings.median(name) / floor,
                                   **notes.get(name, {}))
                        results["scans"].append(row)
                        lines.append(f"| {family} | {width} | {row['dtype']} | {name} | {row['median_s']:.2e} | "
                                     f"{row['vs_triton']:.2f}x | {floor:.1e} | {row['over_floor']:.0f}x |")
                    for name, note in notes.items():
                        lines.append(f"| {family} | {width} | {str(dtype).split('.')[-1]} | {name} against "
                                     f"{note['against']}: {note['rel_err']:.1e} (max |Δ| / max |reference|) "
                                     f"| | | | |")
                    if "mamba_ssm" in calls:
                        met = timings.paired_ratio("triton", "mamba_ssm") <= 1.5
                        lines.append(f"| {family} | {width} | {str(dtype).split('.')[-1]} | target: triton scan <= "
                                     f"1.5x mamba_ssm's | {'met' if met else 'NOT met'} | | | |")
    results["backward"] = []
    lines += ["", f"## Forward + backward of the scans, batch 1, p = {args.p}, fp32 (median s)", "",
              "| family | contender | median s | vs triton |", "|---|---|---|---|"]
    for family, (width, widths_of) in (scan_widths.items() if "backward" not in skip else ()):
        with section(results, f"backward {family}", flush):
            t = scan_inputs(family, widths_of, args.p, torch.float32, device)
            calls = backward_contenders(family, t, device)
            timings = interleaved(calls, repeats=args.repeats, warmup=2, log=print)
            for name in calls:
                row = dict(family=family, width=width, contender=name, median_s=timings.median(name),
                           vs_triton=timings.paired_ratio(name, "triton"))
                results["backward"].append(row)
                lines.append(f"| {family} | {name} | {row['median_s']:.2e} | {row['vs_triton']:.2f}x |")
    lines += ["", "## Kernels that failed on this device and fell back (same results, slower)", ""]
    lines += [f"- {name}: {err}" for name, err in _FAILED_KERNELS.items()] or ["none"]
    if results.get("errors"):
        lines += ["", "## Sections that failed (tracebacks in the .json)", ""]
        lines += [f"- {name}: {tb.strip().splitlines()[-1]}" for name, tb in results["errors"].items()]
    flush()
    print("\n".join(lines))
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    raise SystemExit(main())
