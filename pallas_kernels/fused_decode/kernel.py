"""A decoder layer's decode step in three Pallas Triton kernels, for a few rows (batch <= 8).

Why: at batch 1 the default model (SmolLM2-135M, 30 layers, 7 MB of weights per layer) spends
its step in ~530 XLA kernels of 1-3.5 us each, about 13x what its bytes cost (issue 16,
../shared/GPU.md). A layer's weights stream in ~2 us at the HBM rate, so what a layer costs
is its number of launches. Here a layer is three:

  qkv:  merge the previous layer's MLP partials into the residual, RMSNorm, the QKV
        projection (one program per head), RoPE, and the K/V cache write in place.
  attn: decode attention of each kv head's query group over its cache slots, then that
        group's rows of the O projection, as a per-kv-head partial sum.
  mlp:  merge the O partials, RMSNorm, gate/up, SwiGLU, and the down projection's rows of
        this program's F block, as a per-block partial sum.

A projection whose output every program of the next stage needs in full (O, down) is left as
split-K partial sums in f32, and the next kernel adds them in its prologue: no kernel of its
own, and no grid-wide barrier inside one. Matmuls are multiply + reduce on CUDA cores: with
one to eight rows, tensor-core tiles (16 rows at least) would be mostly padding, and the
weights, not the FLOPs, set the time. Every loaded or stored block has power-of-two shape
(Triton's rule); rows and hidden-size chunks are static Python loops for that reason.

References: `pallas_kernels.fused_decode.reference`, one per kernel.

Status (H200, benchmarks/fused_decode_h200.md): exact, but slower than the general path. Each
kernel runs 11-21 us against ~2.3 us for the general path's average: with 15-27 programs on
132 SMs, and each program a serial chain of loads and reductions, a kernel streams ~100 GB/s.
Hence opt-in (jdecode.model.fused_decode). The next version wants ~128+ programs per kernel
(split K) and 16-row tensor-core tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.tuning import resolve_interpret

f32 = jnp.float32
MAX_ROWS = 8  # rows are unrolled; past this the XLA GEMMs' path is the better one
ATTN_BLOCK = 64  # cache slots per attention step; the dense cache's S is a multiple of 256
NEG = -1e30  # finite "minus infinity": exp(NEG - m) is 0 without inf - inf = NaN


def hidden_chunk(e: int) -> int:
    """The widest power of two <= 128 that divides e (the hidden-size tile)."""
    c = 128
    while e % c:
        c //= 2
    return c


def _round(x: jax.Array, dtype) -> jax.Array:
    """x rounded to the model dtype and back to f32 (what a stored activation would hold)."""
    return x.astype(dtype).astype(f32)


def _merged_rows(x_ref, parts_ref, b: int, e: int, chunk: int, dtype) -> list[jax.Array]:
    """Row b of x plus its pending partial sums, as [chunk] f32 pieces (see `merge_residual`)."""
    pieces = []
    for i in range(e // chunk):
        cols = pl.ds(i * chunk, chunk)
        xi = x_ref[b, cols].astype(f32)
        if parts_ref is not None:
            proj = parts_ref[0, b, cols]
            for p in range(1, parts_ref.shape[0]):
                proj = proj + parts_ref[p, b, cols]
            xi = _round(xi + _round(proj, dtype), dtype)
        pieces.append(xi)
    return pieces


def _rms_normed(pieces: list[jax.Array], norm_ref, chunk: int, eps: float, dtype
                ) -> list[jax.Array]:
    """HF RMSNorm of one row given as f32 pieces: f32 statistics, rounded, scaled in dtype."""
    ss = sum(jnp.sum(p * p) for p in pieces)
    r = jax.lax.rsqrt(ss / (len(pieces) * chunk) + eps)
    return [_round(norm_ref[pl.ds(i * chunk, chunk)].astype(f32) * _round(p * r, dtype), dtype)
            for i, p in enumerate(pieces)]


def _matvec(rows: list[list[jax.Array]], w_ref, col0, width: int, chunk: int) -> list[jax.Array]:
    """For each row (a list of [chunk] pieces of h): sum_e h[e] * w[e, col0:col0+width], f32.

    Every weight tile is loaded before any is used, and products accumulate in a
    [chunk, width] tile reduced once at the end: a reduction between loads puts a barrier
    there, and the loads behind it would each wait out the full memory latency in turn.
    """
    tiles = [w_ref[pl.ds(i * chunk, chunk), pl.ds(col0, width)] for i in range(len(rows[0]))]
    out = []
    for h in rows:
        acc = h[0][:, None] * tiles[0].astype(f32)  # [chunk, width]
        for hi, w in zip(h[1:], tiles[1:]):
            acc = acc + hi[:, None] * w.astype(f32)
        out.append(jnp.sum(acc, axis=0))
    return out


# --- stage 1: residual merge, RMSNorm, QKV, RoPE, cache write --------------------------------

def _qkv_kernel(pos_ref, cos_ref, sin_ref, x_ref, *refs, rows: int, heads: int,
                kv_heads: int, head_dim: int, chunk: int, eps: float, has_parts: bool):
    if has_parts:
        parts_ref, *refs = refs
    else:
        parts_ref = None
    norm_ref, w_ref, _, _, q_ref, kc_ref, vc_ref, *x_out = refs
    H, K, D, half = heads, kv_heads, head_dim, head_dim // 2
    j = pl.program_id(0)  # head j of the fused [q heads | k heads | v heads] columns
    dtype = x_ref.dtype
    e = x_ref.shape[1]
    slots = kc_ref.shape[1]

    merged = [_merged_rows(x_ref, parts_ref, b, e, chunk, dtype) for b in range(rows)]
    if x_out:
        @pl.when(j == 0)
        def _():
            for b in range(rows):
                for i, xi in enumerate(merged[b]):
                    x_out[0][b, pl.ds(i * chunk, chunk)] = xi.astype(dtype)

    normed = [_rms_normed(m, norm_ref, chunk, eps, dtype) for m in merged]
    # The head's two halves as separate products: RoPE pairs element d with d + D/2, and a
    # register tensor cannot be sliced in Triton.
    lo = _matvec(normed, w_ref, j * D, half, chunk)
    hi = _matvec(normed, w_ref, j * D + half, half, chunk)
    is_q, is_k = j < H, (j >= H) & (j < H + K)
    for b in range(rows):
        y1, y2 = _round(lo[b], dtype), _round(hi[b], dtype)
        c, s = cos_ref[b, :], sin_ref[b, :]  # [D/2] f32
        r1 = jnp.where(j < H + K, y1 * c - y2 * s, y1)  # V is not rotated
        r2 = jnp.where(j < H + K, y2 * c + y1 * s, y2)
        pos = pos_ref[b]
        # A position past the buffer writes nothing (the XLA path's mode="drop").
        fits = pos < slots
        pl.when(is_q)(functools.partial(
            _store_halves, q_ref, (b, jnp.minimum(j, H - 1)), r1, r2))
        pl.when(is_k & fits)(functools.partial(
            _store_halves, kc_ref, (b, pos, jnp.clip(j - H, 0, K - 1)), r1, r2))
        pl.when((j >= H + K) & fits)(functools.partial(
            _store_halves, vc_ref, (b, pos, jnp.clip(j - H - K, 0, K - 1)), r1, r2))


def _store_halves(ref, index: tuple, r1: jax.Array, r2: jax.Array) -> None:
    """ref[*index, :D/2] = r1 and ref[*index, D/2:] = r2, in ref's dtype."""
    half = r1.shape[0]
    ref[(*index, pl.ds(0, half))] = r1.astype(ref.dtype)
    ref[(*index, pl.ds(half, half))] = r2.astype(ref.dtype)


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "eps", "num_warps",
                                             "interpret"))
def fused_qkv(x, parts, norm_w, wqkv, cos, sin, positions, k_cache, v_cache, *,
              num_heads: int, num_kv_heads: int, eps: float, num_warps: int = 4,
              interpret: bool | None = None):
    """Stage 1 (see `reference.qkv_stage_reference` for the arguments and results).

    The cache buffers are aliased to the outputs: donate them in the enclosing jit or XLA
    copies them first. Returns (q, k_cache, v_cache, x_merged); x_merged is x itself when
    parts is None.
    """
    b, e = x.shape
    H, K = num_heads, num_kv_heads
    D = wqkv.shape[1] // (H + 2 * K)
    has_parts = parts is not None
    inputs = [positions.astype(jnp.int32), cos.astype(f32), sin.astype(f32), x]
    inputs += [parts] if has_parts else []
    inputs += [norm_w, wqkv, k_cache, v_cache]
    out_shape = [jax.ShapeDtypeStruct((b, H, D), x.dtype),
                 jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
                 jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype)]
    if has_parts:
        out_shape.append(jax.ShapeDtypeStruct(x.shape, x.dtype))
    n_in = len(inputs)
    outs = pl.pallas_call(
        functools.partial(_qkv_kernel, rows=b, heads=H, kv_heads=K, head_dim=D,
                          chunk=hidden_chunk(e), eps=eps, has_parts=has_parts),
        grid=(H + 2 * K,),
        in_specs=[_whole(a) for a in inputs],
        out_specs=[_whole(s) for s in out_shape],
        out_shape=out_shape,
        input_output_aliases={n_in - 2: 1, n_in - 1: 2},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=resolve_interpret(interpret),
        name="fused_qkv",
    )(*inputs)
    q, k_cache, v_cache = outs[:3]
    return q, k_cache, v_cache, (outs[3] if has_parts else x)


# --- stage 2: decode attention and the O projection's rows of one kv head --------------------

def _attn_kernel(pos_ref, q_ref, kc_ref, vc_ref, wo_ref, o_ref, *, rows: int, group: int,
                 block_e: int):
    kh, c = pl.program_id(0), pl.program_id(1)  # kv head, O-projection column block
    D = q_ref.shape[2]
    slots = kc_ref.shape[1]
    dtype = q_ref.dtype
    scale = D ** -0.5
    cols = pl.ds(c * block_e, block_e)
    for b in range(rows):
        pos = jnp.minimum(pos_ref[b], slots - 1)
        qs = [q_ref[b, kh * group + g, :].astype(f32) * scale for g in range(group)]

        def step(t, carry, b=b, pos=pos, qs=qs):
            span = pl.ds(t * ATTN_BLOCK, ATTN_BLOCK)
            k = kc_ref[b, span, kh, :].astype(f32)  # [block, D]
            v = vc_ref[b, span, kh, :].astype(f32)
            visible = t * ATTN_BLOCK + jnp.arange(ATTN_BLOCK) <= pos
            out = []
            for g, (m, l, acc) in enumerate(carry):
                s = jnp.where(visible, jnp.sum(k * qs[g][None, :], axis=1), NEG)  # [block]
                m_new = jnp.maximum(m, jnp.max(s))
                alpha = jnp.exp(m - m_new)
                p = jnp.exp(s - m_new)
                out.append((m_new, l * alpha + jnp.sum(p),
                            acc * alpha + jnp.sum(p[:, None] * v, axis=0)))
            return tuple(out)

        init = tuple((jnp.full((), NEG, f32), jnp.zeros((), f32), jnp.zeros((D,), f32))
                     for _ in range(group))
        final = jax.lax.fori_loop(0, pos // ATTN_BLOCK + 1, step, init)
        part = jnp.zeros((block_e,), f32)
        for g, (_, l, acc) in enumerate(final):
            out = _round(acc / l, dtype)  # [D]: the attention output as the model holds it
            w = wo_ref[pl.ds((kh * group + g) * D, D), cols].astype(f32)  # [D, block_e]
            part = part + jnp.sum(out[:, None] * w, axis=0)
        o_ref[kh, b, cols] = part


def attn_block_e(e: int, kv_heads: int, target_programs: int = 64) -> int:
    """O-projection columns per program: each program re-reads its kv head's cache, so the
    column split stops once kv_heads x (e / block) reaches about `target_programs`."""
    block = hidden_chunk(e)
    while kv_heads * (e // block) > target_programs and e % (2 * block) == 0:
        block *= 2
    return block


@functools.partial(jax.jit, static_argnames=("block_e", "num_warps", "interpret"))
def fused_attn(q, k_cache, v_cache, positions, wo, *, block_e: int | None = None,
               num_warps: int = 4, interpret: bool | None = None):
    """Stage 2 (see `reference.attn_stage_reference`): -> [K, B, E] f32 partials."""
    b, H, _D = q.shape
    K = k_cache.shape[2]
    e = wo.shape[1]
    block_e = block_e or attn_block_e(e, K)
    if k_cache.shape[1] % ATTN_BLOCK:
        raise ValueError(f"fused_attn: cache length {k_cache.shape[1]} must be a multiple of "
                         f"{ATTN_BLOCK}; the dense cache rounds it to 256")
    inputs = [positions.astype(jnp.int32), q, k_cache, v_cache, wo]
    out_shape = jax.ShapeDtypeStruct((K, b, e), f32)
    return pl.pallas_call(
        functools.partial(_attn_kernel, rows=b, group=H // K, block_e=block_e),
        grid=(K, e // block_e),
        in_specs=[_whole(a, 2) for a in inputs],
        out_specs=_whole(out_shape, 2),
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=resolve_interpret(interpret),
        name="fused_attn",
    )(*inputs)


# --- stage 3: residual merge, RMSNorm, SwiGLU, down projection partials ----------------------

def _mlp_kernel(x_ref, parts_ref, norm_ref, wgu_ref, wd_ref, o_ref, x_out_ref, *, rows: int,
                block_f: int, chunk: int, eps: float):
    j = pl.program_id(0)  # this program's block of the F intermediate features
    dtype = x_ref.dtype
    e = x_ref.shape[1]
    F = wd_ref.shape[0]
    merged = [_merged_rows(x_ref, parts_ref, b, e, chunk, dtype) for b in range(rows)]

    @pl.when(j == 0)
    def _():
        for b in range(rows):
            for i, xi in enumerate(merged[b]):
                x_out_ref[b, pl.ds(i * chunk, chunk)] = xi.astype(dtype)

    normed = [_rms_normed(m, norm_ref, chunk, eps, dtype) for m in merged]
    gate = _matvec(normed, wgu_ref, j * block_f, block_f, chunk)
    up = _matvec(normed, wgu_ref, F + j * block_f, block_f, chunk)
    # silu(gate) * up with the model's roundings: projections, then silu, then the product.
    act = [_round(_round(jax.nn.silu(_round(g, dtype)), dtype) * _round(u, dtype), dtype)
           for g, u in zip(gate, up)]
    for i in range(e // chunk):
        cols = pl.ds(i * chunk, chunk)
        w = wd_ref[pl.ds(j * block_f, block_f), cols].astype(f32)  # [block_f, chunk]
        for b in range(rows):
            o_ref[j, b, cols] = jnp.sum(act[b][:, None] * w, axis=0)


def mlp_block_f(f: int) -> int:
    """F features per program: 64 (24 programs for SmolLM2's 1536), or the widest power of
    two below it that divides f."""
    block = 64
    while f % block:
        block //= 2
    return block


@functools.partial(jax.jit, static_argnames=("eps", "block_f", "num_warps", "interpret"))
def fused_mlp(x, parts, norm_w, w_gate_up, w_down, *, eps: float, block_f: int | None = None,
              num_warps: int = 4, interpret: bool | None = None):
    """Stage 3 (see `reference.mlp_stage_reference`): -> ([F/block_f, B, E] f32, x merged)."""
    b, e = x.shape
    F = w_down.shape[0]
    block_f = block_f or mlp_block_f(F)
    if F % block_f:
        raise ValueError(f"fused_mlp: intermediate size {F} does not divide by {block_f}")
    inputs = [x, parts, norm_w, w_gate_up, w_down]
    out_shape = [jax.ShapeDtypeStruct((F // block_f, b, e), f32),
                 jax.ShapeDtypeStruct(x.shape, x.dtype)]
    return pl.pallas_call(
        functools.partial(_mlp_kernel, rows=b, block_f=block_f, chunk=hidden_chunk(e),
                          eps=eps),
        grid=(F // block_f,),
        in_specs=[_whole(a) for a in inputs],
        out_specs=[_whole(s) for s in out_shape],
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=resolve_interpret(interpret),
        name="fused_mlp",
    )(*inputs)


def _whole(a, grid_rank: int = 1) -> pl.BlockSpec:
    """The whole array as every program's block: kernels index into it themselves."""
    zeros = (0,) * len(a.shape)
    if grid_rank == 1:
        return pl.BlockSpec(a.shape, lambda i: zeros)
    return pl.BlockSpec(a.shape, lambda i, j: zeros)
