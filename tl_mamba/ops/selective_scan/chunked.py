"""The ``"torch"`` backend of the Mamba-1 selective scan.

The per-position work of the recurrence is one fused ``addcmul`` on the state.
Everything else (discretisation ``exp(Δ ⊗ A)``, the write ``Δx ⊗ B`` and the read-out
``h · C``) is done for a chunk of positions at once, so the chunk's intermediates stay
in cache and the Python loop carries a single op per step. One forward loop serves
every call (:func:`_forward`): it holds the state in the public ``[b, e, n]`` layout
and writes a chunk's states in place, into a chunk buffer or straight into the
``[b, p, e, n]`` result when every state is asked for. So a forward gives the same y
bit for bit with or without ``hook_h`` observed, and with or without autograd.

With autograd, the scan is a :class:`_ChunkedScan` function whose backward is
written out by hand: it walks the chunks from last to first, recomputes a chunk's
states from the state saved at its start, runs the adjoint recurrence

    g_t = C_t ⊗ ∂L/∂y_t [+ ∂L/∂h_t from the states returned] + exp(Δ_{t+1} A) ⊙ g_{t+1}
                                                            (g: ∂L/∂h_t, [b, n, e])

one in-place ``addcmul`` per position, and forms the gradients of x, Δ, A, B, C and
the initial state from g with whole-chunk ops. Saved between forward and backward:
the inputs and one state per chunk, O(b·(p/T)·e·n), instead of every position's
decay, write and state that autograd through the Python loop would keep (and the
graph's per-position bookkeeping, which made training on a CPU several times
slower). The D skip and the gate stay outside, under ordinary autograd. When every
state is returned as well (``hook_h`` hooked while taking gradients), their gradient
enters the same adjoint recurrence, so that too costs one state per chunk beyond the
states themselves.

On a 2-core CPU this backward is memory-bound: its cost is the passes it makes over
[b, T, n, e] chunk tensors, so it makes few. The sums over e are batched
matrix-vector products (no temporary), h_{t-1} is read from the recomputed states
in place (no concatenated copy), and the recurrence is one op per position. Timed
alternately in one process against the version with a copy, mul-then-sum
reductions and two ops per position (2026-12-05, 2-vCPU Intel Xeon): scan forward
and backward 0.78-0.83x the time at toy widths (b 32, p 156), a whole toy Mamba-1
training step 0.89-0.92x on needle and IOI batches (docs/performance.md). Keeping
every chunk's states from the forward instead of recomputing them saved nothing at
p 156: reading them back costs what recomputing them does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from tl_mamba.ops.buffers import states_buffer
from tl_mamba.ops.precision import compute_dtype, needs_grad, silu_gate, zero_subnormals_

DEFAULT_CHUNK = 64
"""The longest chunk (positions) the scan takes when no ``chunk_size`` is given."""

CHUNK_BYTES = 2 << 20
"""With no ``chunk_size`` given, the chunk is the longest power of two up to
:data:`DEFAULT_CHUNK` (and at least 8 positions) whose ``[b, L, e, n]`` tensors (decays,
writes, states) each fit in this many bytes (:func:`chunk_for`; under autograd at most
:data:`GRAD_CHUNK`). Their size grows with the batch, and a chunk that spills out of cache,
or past the allocator's 32 MB ``mmap`` threshold (then it faults in fresh pages every
chunk), is slow. 2 MB is a core's L2 on the host measured. Measured 2026-12-07 (2-vCPU
Intel Xeon, 2 MB L2 a core, 1 thread), the scan alone, chunk lengths alternated in one
process, time against 64 (the old 8 MB budget's pick at b 1):

- 130m widths (e 1536, n 16), b 1, p 1024: 8 0.54, **16 0.50** (picked), 32 0.55; caching
  the states: 8 0.63, 16 0.69, 32 0.82; p 2048: 8 0.77, 16 0.70, 32 0.81;
- 370m widths (e 2048), b 1, p 1024: 8 0.60, **16 0.57** (picked: 2 MB exactly), 32 0.60;
- b 4, p 512: **8 0.41** (picked; the old budget picked 16, 0.62); b 8: 8 0.35 (picked either way);
- toy widths (b 32, e 192, n 8, p 156): **8 0.54** (picked; the old pick 32: 0.77).

Under autograd (forward and backward, against 16): toy widths 8 0.87-0.93x (picked), 130m
widths b 4 0.94x (picked), b 1 picks 16 as before. On 2026-12-05's host the 8 MB budget had
taken b 8, p 512 to 0.59x of a fixed 64 (a 4-layer model's forward).

``benchmarks/bench_scan_chunk_cpu.py`` re-checks the pick on another machine. On a second
host the same day (Intel Xeon, 1.25 MB of L2 a core), each length against the pick: 130m
widths b 1 8 0.92, 32 1.14; with the states 8 1.02, 32 0.93; 370m widths 8 0.96; b 4 16 1.13;
toy widths within 2 %. The pick was within 8 % of the fastest length at every shape there."""

GRAD_CHUNK = 16
"""Positions per chunk of the differentiable scan (at most ``chunk_size``). Its backward
makes several [b, T, e, n] temporaries per chunk, and saves one state per chunk. In whole
training steps on a CPU (toy widths b 32 p 512, 130m widths b 1 p 1024), T = 16, 32 and 64
timed within noise of each other; 16 keeps the temporaries small. For larger batches the
rule of :data:`CHUNK_BYTES` picks less: at 130m widths, b 8, p 512 it picks 8, which took
0.92x the time of 16 for the scan's forward and backward (b 1: 16, toy widths b 32: 16)."""


def chunk_for(b: int, e: int, n: int, itemsize: int) -> int:
    """The chunk length when none is given, for ``[b, e, n]`` states of ``itemsize`` bytes: see :data:`CHUNK_BYTES`."""
    length, per_position = DEFAULT_CHUNK, b * e * n * itemsize
    while length > 8 and length * per_position > CHUNK_BYTES:
        length //= 2
    return length


def selective_scan_chunked(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    *,
    initial_state: Optional[Tensor] = None,
    return_states: bool = False,
    z: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
):
    """Chunked scan. Shapes as in ``tl_mamba.ops.selective_scan.selective_scan``.

    ``chunk_size``: positions per chunk (speed and memory only); None picks it by the
    batch's size (:data:`CHUNK_BYTES`; under autograd at most :data:`GRAD_CHUNK`).
    """
    from tl_mamba.ops.selective_scan import ScanOutput

    b, p, e = x.shape
    n = A.shape[-1]
    cdt = compute_dtype(x, delta, A, B, C, initial_state)
    xf, df, Bf, Cf = (t.to(cdt) for t in (x, delta, B, C))
    length = chunk_for(b, e, n, xf.element_size()) if chunk_size is None else chunk_size
    A_c = A.to(cdt)
    h = x.new_zeros(b, e, n, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    states = None
    if not needs_grad(x, delta, A, B, C, initial_state):
        if return_states:
            states = states_buffer((b, p, e, n), like=x, dtype=cdt)  # one buffer for every state
        y, h = _forward(xf, df, A_c, Bf, Cf, h, length, states)
    else:
        y, h, states = _ChunkedScan.apply(xf, df, A_c, Bf, Cf, h, min(length, GRAD_CHUNK), return_states)
    if D is not None:
        y = y + D.to(cdt) * xf
    if z is not None:
        y = silu_gate(y, z)
    return ScanOutput(y=y, final_state=h, states=states)


def _forward(x: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, h: Tensor, chunk_size: int,
             states: Optional[Tensor] = None, bounds: Optional[Tensor] = None):
    """The scan's forward loop, a chunk at a time, recording no autograd: ``(y [b, p, e],
    final state [b, e, n])`` from A ``[e, n]`` and the initial state ``h`` [b, e, n].

    Both the no-grad scan and the forward of :class:`_ChunkedScan` run it, so a forward with
    autograd on gives bit for bit the y of one with it off (at the same ``chunk_size``).

    ``states`` ([b, p, e, n]), when given, receives every state: the recurrence writes each
    one straight into it. The same ops run whether or not it is given, so observing
    ``hook_h`` leaves y bit for bit as it was. ``bounds`` ([b, ceil(p / chunk_size), n, e]),
    when given, receives the state entering each chunk, transposed, for the backward.

    Why the ``[e, n]`` layout and not the backward's ``[n, e]`` (measured 2026-12-05, 1
    thread, Intel Xeon): keeping the states then cost a transposed copy of all of them (a
    Mamba-1 scan at 130m widths, p = 1024: 90 ms with states against 66 ms now, 64 ms
    without); and without states this layout took 0.85-0.90x the time at d_state 16 (130m
    widths, and b 8-32 at e 320-1536), 1.06-1.09x at the toy models' d_state 8.
    """
    b, p, e = x.shape
    y = x.new_empty(b, p, e)
    for k, start in enumerate(range(0, p, chunk_size)):
        w = slice(start, min(start + chunk_size, p))
        if bounds is not None:
            bounds[:, k] = h.transpose(1, 2)
        decay = (delta[:, w, :, None] * A).exp_()  # [b, L, e, n]; exp in place: one fresh buffer, not two
        write = (delta[:, w] * x[:, w])[..., None] * B[:, w, None, :]
        chunk_states = torch.empty_like(write) if states is None else states[:, w]
        h = _run_chunk(decay, write, h, chunk_states)
        y[:, w] = torch.einsum("blen,bln->ble", chunk_states, C[:, w])
    # h is a slice of the last chunk's buffer (or the caller's initial state when p = 0): a copy
    # of its own, so the final state neither keeps that buffer alive nor aliases an input
    return y, h.clone(memory_format=torch.contiguous_format)


def _discretise(x: Tensor, delta: Tensor, At: Tensor, B: Tensor):
    """``exp(Δ ⊗ A)`` and ``Δx ⊗ B`` of a chunk: [b, L, n, e] each (x, Δ [b, L, e]; At [n, e]; B [b, L, n])."""
    # exp in place: one fresh [b, L, n, e] buffer instead of two
    return (delta[:, :, None, :] * At).exp_(), (delta * x)[:, :, None, :] * B[..., None]


def _read_out(states: Tensor, C: Tensor) -> Tensor:
    """``y_t = h_t · C_t``: [b, L, e] from states [b, L, n, e] and C [b, L, n]."""
    return torch.matmul(C[:, :, None, :], states).squeeze(2)


def _run_chunk(decay: Tensor, write: Tensor, h: Tensor, states: Tensor) -> Tensor:
    """``h_t = decay_t ⊙ h_{t-1} + write_t`` over a chunk, written into ``states`` [b, L, ...]; returns the last.

    Elementwise, so any layout of the state (``[n, e]`` or ``[e, n]``) as long as all four agree."""
    for t in range(decay.shape[1]):
        h = torch.addcmul(write[:, t], decay[:, t], h, out=states[:, t])
    return h


class _ChunkedScan(torch.autograd.Function):
    """The ungated, D-free scan ``(y [b, p, e], h_final [b, e, n], states)`` with a hand-written chunked
    backward; ``states`` is every state, [b, p, e, n], when ``return_states``, else None.

    Inputs as in :func:`_forward` (A [e, n], states [b, e, n]). The forward is that loop; the
    backward holds a state as ``[b, n, e]``: every gradient sums over the small n (d_state), and
    a sum over a non-innermost axis is a vectorised add across e, where einsum over an
    innermost n of 8-16 made batched matmuls 5-10x slower on a CPU. The states it recomputes
    equal the forward's bit for bit: the recurrence is elementwise, so the layout does not
    change a single rounding."""

    @staticmethod
    def forward(ctx, x, delta, A, B, C, h0, chunk_size, return_states):
        b, p, e = x.shape
        n = A.shape[1]
        bounds = x.new_empty(b, -(-p // chunk_size), n, e)  # the state entering each chunk, [n, e]
        states = states_buffer((b, p, e, n), like=x, dtype=x.dtype) if return_states else None
        y, h = _forward(x, delta, A, B, C, h0, chunk_size, states=states, bounds=bounds)
        ctx.save_for_backward(x, delta, A, B, C, bounds)
        ctx.chunk_size = chunk_size
        ctx.set_materialize_grads(False)  # an output no gradient reached comes as None (handled below)
        return y, h, states

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_final, grad_states):
        x, delta, A, B, C, bounds = ctx.saved_tensors
        At = A.transpose(0, 1)  # [n, e]
        b, p, e = x.shape
        grad_y = torch.zeros_like(x) if grad_y is None else grad_y.contiguous()
        # carry: ∂L/∂h_{t-1} that flows out of position t, exp(Δ_t A) ⊙ g_t; it enters the
        # position before as g_{t-1} += carry (at the end, ∂L/∂h_final; at the start, ∂L/∂h_0)
        carry = bounds.new_zeros(b, A.shape[1], e) if grad_final is None else grad_final.transpose(1, 2).clone(memory_format=torch.contiguous_format)
        dx, ddelta, dAt, dB, dC = (torch.empty_like(x), torch.empty_like(delta), torch.zeros_like(At),
                                   torch.empty_like(B), torch.empty_like(C))
        T = ctx.chunk_size
        for k in reversed(range(bounds.shape[1])):
            w = slice(k * T, min(k * T + T, p))
            x_c, delta_c, B_c, C_c, gy_c = x[:, w], delta[:, w], B[:, w], C[:, w], grad_y[:, w]
            decay, write = _discretise(x_c, delta_c, At, B_c)
            states = torch.empty_like(write)
            _run_chunk(decay, write, bounds[:, k], states)
            # adjoint recurrence, last position first; g holds ∂L/∂h_t, [b, L, n, e]:
            # g_t = C_t ⊗ ∂L/∂y_t + exp(Δ_{t+1} A) ⊙ g_{t+1}, one in-place addcmul per position
            g = C_c[..., None] * gy_c[:, :, None, :]
            if grad_states is not None:  # ∂L/∂h_t from the returned states enters as it is
                g += grad_states[:, w].transpose(2, 3)
            g[:, -1].add_(carry)
            for t in reversed(range(g.shape[1] - 1)):
                g[:, t].addcmul_(decay[:, t + 1], g[:, t + 1])
            # h_t = decay_t ⊙ h_{t-1} + Δ_t x_t B_t: the chunk's gradients from g in whole-chunk
            # ops; the sums over e (innermost) are batched matrix-vector products, which read
            # their operands once and write no [b, L, n, e] temporary
            d_write_B = _read_out(g, B_c)  # ∂L/∂(Δx), [b, L, e]
            dC[:, w] = torch.matmul(states, gy_c[..., None]).squeeze(-1)
            dB[:, w] = torch.matmul(g, (delta_c * x_c)[..., None]).squeeze(-1)
            d_dA = g.mul_(decay)  # decay_t ⊙ g_t, in g's memory; times h_{t-1} below
            carry = zero_subnormals_(d_dA[:, 0].clone())  # what flows back decays to subnormals (slow)
            d_dA[:, 1:].mul_(states[:, :-1])
            d_dA[:, 0].mul_(bounds[:, k])  # ∂L/∂(Δ ⊗ A), [b, L, n, e]
            dAt += (d_dA * delta_c[:, :, None, :]).sum((0, 1))
            ddelta[:, w] = d_dA.mul_(At).sum(2) + d_write_B * x_c
            dx[:, w] = d_write_B * delta_c
        return dx, ddelta, dAt.transpose(0, 1), dB, dC, carry.transpose(1, 2), None, None
