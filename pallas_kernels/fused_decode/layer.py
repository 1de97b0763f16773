"""A decoder layer's decode step as one persistent Pallas kernel: five phases, grid barriers.

Why. At batch 1 the fused step is five kernels per layer (`kernel`, `attention`), ~175 per
step on SmolLM2-135M, and a dependent kernel costs ~1.4 us on the H200 however little it does
(scripts/probe_pdl.py). XLA does not launch Pallas kernels with programmatic dependent launch
(same probe), so the way below that floor is fewer kernels. Here the layer's five kernels are
the phases of one:

  0  qkv_rope         RMSNorm + QKV + RoPE                   -> qkv   [B, H + 2K, D]
  1  decode_attention the K/V cache write + split-K attention -> parts, lse
  2  attn_o_residual  the splits' merge + O + residual        -> mid   [B, E]
  3  gate_up_swiglu   RMSNorm + gate/up + SwiGLU              -> act   [B, F]
  4  gemv_residual    down + residual                         -> out   [B, E]

Each phase runs the same per-program code as its kernel, over its work items (a column tile,
or a (row, kv head, split) of attention): program p takes items p, p + P, p + 2P, ... The
grid is one program per SM (all resident at once), and between phases every program waits at
a grid-wide barrier: an atomic counter per barrier that each program bumps once its stores
are issued, then polls until all P have arrived (the CUTLASS grid-barrier pattern: a CTA
barrier, one release atomic, acquire polls, a CTA barrier). The phases hand over through
scratch buffers in HBM that are outputs of the call; each is written in one phase and read
only in later ones, so no program reads a line it may hold stale.

Counters: `new_counters(layers)` is zeroed once per step, one row per layer (a kernel never
reuses a row, so nothing resets them). A poll gives up after MAX_SPIN tries and bumps the
row's last slot instead of hanging the GPU; `barrier_timeouts` reads it (tests assert 0).

In the interpreter (CPU tests) programs run one after another, so a barrier would wait
forever: there the grid is (phases, P) and the interpreter's phase-major order stands in for
the barriers. The phases' code is the same; the barriers themselves are exercised only on the
GPU, where the same tests compile the kernel with them.

Scope: steps of <= FMA_MAX_ROWS rows over the [N, K] weight copies (the CUDA-core GEMVs), the
fused step's default.

Status (H200, benchmarks/fused_decode_h200.md): correct on the card, not faster. With one
program per SM the step ran 1194 tok/s against the five kernels' 1778 on the SmolLM2 shape
(493 vs 1031 on the Llama-3.2-1B shape): a program walks its items one at a time, so its
next item's weights are not in flight while it reduces the current one. Four programs of 4
warps per SM drew level with the five kernels, no better. Loading each GEMV item's weights
one item ahead (`prefetch`, and each phase's first item before its barrier) showed no gain
beyond the benchmark's run-to-run spread. A win would need deeper pipelining (several items
in flight per program) tuned by device time per kernel.

Where the time goes (H100, 2026-12-05, `trace=True` and `phase_breakdown`): a barrier costs
~0.35 us from the last arrival to the release; a layer is the sum of its five phases'
critical paths (qkv 3.0, attention 5.1, o 3.5, gate/up 3.5, down 2.4 us at 528 programs x 4
warps, against 17.2 us per layer for the five kernels): the slowest program of each phase,
not the barriers, sets the pace, and attention's 24 items (8 splits x 3 kv heads), each a
chain of dependent loads, are the longest phase. Tried against that chain on an H100 and taken
out (2026-12-05, stop 45): strided shares whose first blocks load before the row's position
(no gain), and the last split of each (row, kv head) merging the partials through an atomic
counter (at 16 splits attention's critical path grew 3.8 -> 5.9 us while O's shrank only
4.2 -> 2.9). 16 splits without it: 17.8 us per layer, against 18.1 at 8 and 17.2 for the
five kernels.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.tuning import resolve_interpret
from pallas_kernels.fused_decode.attention import BLOCK_K, _attn_kernel
from pallas_kernels.fused_decode.kernel import (
    FMA_MAX_ROWS,
    _qkv_kernel,
    _residual_kernel,
    _swiglu_kernel,
    default_tiles,
    fma_weights,
    prefetch_steps,
    qkv_cols,
    residual_cols,
    swiglu_cols,
    whole_block,
)

f32, i32 = jnp.float32, jnp.int32
PHASES = 5
ERROR_SLOT = PHASES - 1  # counters[layer, :ERROR_SLOT] are the barriers; this slot, timeouts
TRACE_SLOTS = 2 * PHASES  # a traced program's clock stamps: start, (arrive, release) x 4, end
MAX_SPIN = 1 << 18  # polls before a barrier gives up (~0.2 s: thousands of phases, so a bug)
INTERPRET_PROGRAMS = 3  # the interpreter's P: enough to leave programs with unequal items


def new_counters(num_layers: int) -> jax.Array:
    """[layers, PHASES] int32 zeros: the barrier counters of one step's layer kernels."""
    return jnp.zeros((num_layers, PHASES), i32)


def barrier_timeouts(counters: jax.Array) -> jax.Array:
    """How many barrier waits gave up (0 unless the grid was not all resident: a bug)."""
    return counters[:, ERROR_SLOT].sum()


def default_programs(interpret: bool) -> int:
    """One program per SM: all resident at once, which the barriers need."""
    if interpret:
        return INTERPRET_PROGRAMS
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)


def _grid_barrier(cnt_ref, layer, k: int, num_programs: int, stamp=None) -> None:
    """Wait until all programs have arrived at barrier k of this layer. stamp(when, after),
    if given, records the arrival (when=0) and the release (1) as they happen (`_stamp`).

    The polls are the atomic itself. Polling with volatile loads and one acquire atomic after
    them was slower on an H100 (2026-12-05, benchmarks/fused_decode_h200.md; device span per
    layer of the SmolLM2 shape 24.1 vs 21.7 us at 132 programs x 8 warps, 25.1 vs 18.2 at
    528 x 4): every warp polls (Triton runs a scalar load in all of them) and the acquire is
    one more round trip. (A loop of loads must keep its result in use: a load is no effect
    to jax, and a loop whose result goes unused is dropped, barrier and all.)
    """
    plgpu.debug_barrier()  # every thread's stores of the phase are issued before the arrival
    arrived = plgpu.atomic_add(cnt_ref, (layer, k), 1) + 1  # acq_rel at GPU scope
    if stamp:
        stamp(0, arrived)

    def waiting(c):
        return (c[0] < num_programs) & (c[1] < MAX_SPIN)

    def poll(c):
        return plgpu.atomic_add(cnt_ref, (layer, k), 0), c[1] + 1

    seen, _ = jax.lax.while_loop(waiting, poll, (arrived, jnp.int32(0)))

    @pl.when(seen < num_programs)
    def _():
        plgpu.atomic_add(cnt_ref, (layer, ERROR_SLOT), 1)

    if stamp:
        stamp(1, seen)
    plgpu.debug_barrier()  # no thread reads the next phase's inputs before the poll is done


def _stamp(trace_ref, pid, slot: int, after) -> None:
    """Stores the GPU's global nanosecond clock (its low 32 bits) at trace_ref[pid, slot].

    Triton treats inline asm as pure: the clock read is placed by its data alone, so it takes
    `after` (a value the stamped event produced, e.g. an atomic's result) as an operand it
    does not read, which keeps it from moving above that event."""
    dep = jnp.full((1,), after, i32)  # [1]: Triton's inline asm takes no scalar operand
    now, = plgpu.elementwise_inline_asm(
        "{ .reg .u64 %gt; mov.u64 %gt, %globaltimer; cvt.u32.u64 $0, %gt; }", args=[dep],
        constraints="=r,r", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct((1,), i32)])
    plgpu.store(trace_ref.at[pid, pl.ds(slot, 1)], now)


def phase_breakdown(trace) -> dict:
    """Where a traced layer kernel's time went (`decode_layer(trace=True)`), in us.

    trace: [P, TRACE_SLOTS] (or [layers, P, TRACE_SLOTS]: medians over layers) of the low 32
    bits of ns clock stamps: start, then per barrier k < PHASES - 1 its arrival and its
    release, then the end. Returns per phase k "work" (the median program's time from its
    release of barrier k - 1, or its start, to its next arrival), "critical" (the first
    program's start of the phase to the last arrival at its end), per barrier "release"
    (the last arrival to the median program's release: what the barrier itself costs) and
    "skew" (the median arrival to the last), and "ramp" (the first program's start to the
    last's) and "total" (the first start to the last end)."""
    import numpy as np

    t = np.asarray(trace, np.int64)
    if t.ndim == 3:
        per = [phase_breakdown(x) for x in t]
        return {k: (float(np.median([p[k] for p in per])) if not isinstance(per[0][k], list)
                    else [float(np.median([p[k][i] for p in per]))
                          for i in range(len(per[0][k]))]) for k in per[0]}
    t = (t - t[:, :1].min()) % (1 << 32) * 1e-3  # us since the first start; the clock wraps
    start, end = t[:, 0], t[:, -1]
    arrive, release = t[:, 1:-1:2], t[:, 2:-1:2]  # [P, PHASES - 1]
    begins = np.concatenate([start[:, None], release], axis=1)  # [P, PHASES]
    ends = np.concatenate([arrive, end[:, None]], axis=1)
    return {"work": list(np.median(ends - begins, axis=0)),
            "critical": list(ends.max(axis=0) - begins.min(axis=0)),
            "release": list(np.median(release - arrive.max(axis=0), axis=0)),
            "skew": list(arrive.max(axis=0) - np.median(arrive, axis=0)),
            "ramp": float(start.max() - start.min()), "total": float(end.max() - start.min())}


def _layer_kernel(layer_ref, pos_ref, x_ref, attn_norm_ref, wqkv_ref, cos_ref, sin_ref, kc_ref,
                  vc_ref, wo_ref, mlp_norm_ref, wgu_ref, wd_ref, cnt_ref,
                  out_ref, kc_out, vc_out, cnt_out, qkv_s, parts_s, lse_s, mid_s, act_s,
                  trace_ref=None, *, rows: int, num_heads: int, num_kv_heads: int, eps: float,
                  num_splits: int, num_programs: int, block_n: int, prefetch: bool,
                  phased: bool):
    del cnt_ref  # aliased to cnt_out, which the barriers use
    # The layer (its counter row) is data, not a constant: every layer is then the same
    # kernel, compiled once.
    layer = layer_ref[0]
    H, K, ns, P = num_heads, num_kv_heads, num_splits, num_programs
    D = qkv_s.shape[2]
    E, F = x_ref.shape[1], act_s.shape[1]
    pid = pl.program_id(1 if phased else 0)
    if trace_ref is not None:
        _stamp(trace_ref, pid, 0, pid)

    def phase(k: int, n_items: int, run_item, load_ahead=None) -> None:
        """Program pid's items of phase k: pid, pid + P, ... < n_items, after barrier k - 1.

        load_ahead(item) issues an item's weight loads (`fma_weights`): the first item's go
        out before the barrier, and each next item's before the current one's arithmetic.
        """
        ahead = load_ahead if prefetch else None

        def run():
            first = ahead(jnp.minimum(pid, n_items - 1)) if ahead else None  # read-only
            if k and not phased:
                stamp = None if trace_ref is None else (
                    lambda when, after: _stamp(trace_ref, pid, 2 * k - 1 + when, after))
                _grid_barrier(cnt_out, layer, k - 1, P, stamp)
            if ahead is None:
                @pl.loop(pid, n_items, step=P)
                def _(i):
                    run_item(i, None)
                return

            def body(j, weights):
                i = pid + j * P
                nxt = ahead(jnp.minimum(i + P, n_items - 1))  # clamped: a spare load at the end
                run_item(i, weights)
                return nxt

            jax.lax.fori_loop(0, (n_items - pid + P - 1) // P, body, first)

        if phased:
            pl.when(pl.program_id(0) == k)(run)
        else:
            run()

    def gemv_ahead(w_ref, cols_of, kdim: int, tiles):
        if not prefetch_steps(kdim, tiles):
            return None
        return lambda i: fma_weights(w_ref, cols_of(i), kdim, tiles)

    t_e, t_a, t_f = (dataclasses.replace(default_tiles(n, rows, True), block_n=block_n)
                     for n in (E, H * D, F))
    qkv_items = qkv_s.shape[1] * (D // 2 // t_e.block_n)
    phase(0, qkv_items, lambda i, w: _qkv_kernel(
        x_ref, attn_norm_ref, wqkv_ref, cos_ref, sin_ref, qkv_s, rows=rows, rotated=H + K,
        head_dim=D, eps=eps, tiles=t_e, transposed=True, item=i, weights=w),
        gemv_ahead(wqkv_ref, lambda i: qkv_cols(i, t_e, D), E, t_e))
    phase(1, rows * K * ns, lambda i, w: _attn_kernel(
        pos_ref, qkv_s, kc_ref, vc_ref, parts_s, lse_s, kc_out, vc_out, num_heads=H,
        group=H // K, block_k=BLOCK_K, num_splits=ns, sm_scale=D ** -0.5,
        item=(i // (K * ns), i // ns % K, i % ns)))
    phase(2, E // t_a.block_n, lambda i, w: _residual_kernel(
        parts_s, lse_s, wo_ref, x_ref, mid_s, rows=rows, tiles=t_a, transposed=True,
        num_heads=H, item=i, weights=w),
        gemv_ahead(wo_ref, lambda i: residual_cols(i, t_a), H * D, t_a))
    phase(3, F // t_e.block_n, lambda i, w: _swiglu_kernel(
        mid_s, mlp_norm_ref, wgu_ref, act_s, rows=rows, eps=eps, tiles=t_e, transposed=True,
        item=i, weights=w),
        gemv_ahead(wgu_ref, lambda i: swiglu_cols(i, t_e, F), E, t_e))
    phase(4, E // t_f.block_n, lambda i, w: _residual_kernel(
        act_s, wd_ref, mid_s, out_ref, rows=rows, tiles=t_f, transposed=True, item=i,
        weights=w),
        gemv_ahead(wd_ref, lambda i: residual_cols(i, t_f), F, t_f))
    if trace_ref is not None:  # the end: an atomic after the last phase's stores, stamped
        plgpu.debug_barrier()
        done = plgpu.atomic_add(cnt_out, (layer, ERROR_SLOT), 0)
        _stamp(trace_ref, pid, TRACE_SLOTS - 1, done)


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "eps",
                                             "num_splits", "num_programs", "num_warps",
                                             "block_n", "prefetch", "trace", "interpret"))
def decode_layer(x, positions, cos, sin, k_cache, v_cache, counters, layer, attn_norm, wqkv_t,
                 wo_t, mlp_norm, w_gate_up_t, w_down_t, *, num_heads: int,
                 num_kv_heads: int, eps: float, num_splits: int, num_programs: int | None = None,
                 num_warps: int = 8, block_n: int = 4, prefetch: bool = True,
                 trace: bool = False, interpret: bool | None = None):
    """One layer of the decode step (the five fused kernels' function) in one launch.

    Args:
      x: [B, E] residual stream, B <= FMA_MAX_ROWS. positions: [B] int32 cache slots.
      cos, sin: [B, D/2] RoPE tables of the positions.
      k_cache, v_cache: [B, S, K, D] this layer's cache (aliased: updated in place in a jit
        that owns them).
      counters: `new_counters(L)`, this step's; row `layer` (an int32 scalar, L > layer >= 0)
        is this kernel's.
      attn_norm, mlp_norm: [E]. wqkv_t [(H + 2K) D, E], wo_t [E, H D], w_gate_up_t [2F, E],
        w_down_t [E, F]: the [N, K] copies (`jdecode.model.fused_decode.with_decode_copies`).
      num_splits: attention's split-K partitions (`attention.default_splits`).
      block_n: weight rows per GEMV work item (the five kernels' default is 4); it must
        divide D/2, E and F.
      prefetch: issue each GEMV item's weight loads one item ahead, and each phase's first
        item's before the barrier that precedes it (K loops of up to 4 steps).
      trace: also return each program's clock stamps, [P, TRACE_SLOTS] int32 (GPU only;
        `phase_breakdown` reads them).
      num_programs: the persistent grid; default one per SM (3 in the interpreter). More
        than fit on the device at once would leave the barriers waiting on programs that
        cannot start: they give up after MAX_SPIN polls and count it (`barrier_timeouts`).

    Returns:
      (x_out [B, E], k_cache, v_cache, counters), as the five kernels in sequence give them,
      and with trace=True the stamps after them.
    """
    if trace and resolve_interpret(interpret):
        raise ValueError("decode_layer: trace=True reads the GPU's clock; the interpreter "
                         "has none (run it on the GPU, or pass trace=False)")
    b, E = x.shape
    H, K = num_heads, num_kv_heads
    D = k_cache.shape[3]
    F = w_down_t.shape[1]
    if not 1 <= b <= FMA_MAX_ROWS:
        raise ValueError(f"decode_layer: {b} rows; it covers 1..{FMA_MAX_ROWS} (the CUDA-core "
                         "GEMVs): run more rows through the five-kernel step")
    if (wqkv_t.shape != ((H + 2 * K) * D, E) or wo_t.shape != (E, H * D)
            or w_gate_up_t.shape != (2 * F, E) or k_cache.shape[2] != K
            or k_cache.shape[1] % BLOCK_K):
        raise ValueError(f"decode_layer: weights wqkv_t {wqkv_t.shape}, wo_t {wo_t.shape}, "
                         f"w_gate_up_t {w_gate_up_t.shape}, w_down_t {w_down_t.shape} must be "
                         f"the [N, K] copies for E={E}, H={H}, K={K}, D={D}, F={F}, and the "
                         f"cache {k_cache.shape} [B, S, K, D] with S a multiple of {BLOCK_K}")
    if counters.shape[1:] != (PHASES,) or counters.dtype != i32:
        raise ValueError(f"decode_layer: counters {counters.shape} {counters.dtype} must be "
                         "new_counters(L)")
    if (D // 2) % block_n or E % block_n or F % block_n:
        raise ValueError(f"decode_layer: block_n={block_n} must divide D/2={D // 2}, E={E} "
                         f"and F={F}: pick a power of two that does (4 always does)")
    interpret = resolve_interpret(interpret)
    P = num_programs or default_programs(interpret)
    kernel = functools.partial(
        _layer_kernel, rows=b, num_heads=H, num_kv_heads=K, eps=eps, num_splits=num_splits,
        num_programs=P, block_n=block_n, prefetch=prefetch, phased=interpret)
    inputs = (jnp.asarray(layer, i32).reshape(1), positions.astype(i32), x, attn_norm, wqkv_t,
              cos.astype(f32), sin.astype(f32), k_cache, v_cache, wo_t, mlp_norm, w_gate_up_t,
              w_down_t, counters)
    out_shape = (jax.ShapeDtypeStruct(x.shape, x.dtype),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype),
                 jax.ShapeDtypeStruct(counters.shape, i32),
                 # scratch: the phases' hand-overs
                 jax.ShapeDtypeStruct((b, H + 2 * K, D), x.dtype),
                 jax.ShapeDtypeStruct((b, num_splits, H * D), f32),
                 jax.ShapeDtypeStruct((b * num_splits * H,), f32),
                 jax.ShapeDtypeStruct((b, E), x.dtype),
                 jax.ShapeDtypeStruct((b, F), x.dtype))
    if trace:
        out_shape += (jax.ShapeDtypeStruct((P, TRACE_SLOTS), i32),)
    grid = (PHASES, P) if interpret else (P,)
    out, k_cache, v_cache, counters, *rest = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=[whole_block(a) for a in inputs],
        out_specs=[whole_block(s) for s in out_shape],
        out_shape=out_shape,
        input_output_aliases={7: 1, 8: 2, 13: 3},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=2),
        interpret=interpret,
        name="decode_layer",
    )(*inputs)
    if trace:
        return out, k_cache, v_cache, counters, rest[-1]
    return out, k_cache, v_cache, counters
