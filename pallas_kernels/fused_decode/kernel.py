"""A decoder layer's decode-step matmuls with their neighbours fused in, as Pallas Triton GEMVs.

Why: at batch 1 the default model (SmolLM2-135M, 30 layers, 7 MB of weights per layer) spends
its step in ~530 XLA kernels of 1-5 us each, about 13x what its bytes cost (issue 16). A
layer's weights stream in ~2 us at the HBM rate, so what a layer costs is its number of
kernels and each one's latency. The general path runs RMSNorm, RoPE, SwiGLU and each residual
add as XLA fusions of their own, and the MLP matmuls as XLA multiply+reduce fusions. Here the
layer's four projections are four kernels, and everything elementwise rides along:

  qkv_rope:        RMSNorm (prologue) -> x @ wqkv -> RoPE on the Q and K heads (epilogue)
  gate_up_swiglu:  RMSNorm (prologue) -> x @ [w_gate | w_up] -> silu(gate) * up (epilogue)
  gemv_residual:   a @ w -> + residual (epilogue); the down projection
  attn_o_residual: merge of attention's split-K partials (prologue) -> a @ wo -> + residual

Attention between them, with the cache write, is `attention.decode_attention`.

How the work is laid out, and why. The first fused attempt had three kernels per layer with
15-27 programs, and ran 5-9x longer per kernel than the general path's
(benchmarks/fused_decode_h200.md).

- Every program owns a narrow column tile over the whole K: no split-K partials, hence no
  reduction kernel after.
- Two ways to multiply, chosen by `GemvTiles.fma` (`default_tiles` picks):
  - **CUDA cores** (the default for <= FMA_MAX_ROWS rows over [N, K] weights): each program
    multiplies a [4, 1024] tile of weights, contiguous along K, by every row and reduces
    along K. The tile goes from HBM to registers without shared-memory staging, so all of
    it is in flight at once.
  - **Tensor cores** (more rows, or [K, N] weights): rows form one `dot` tile of 16, 32 or
    64 rows (`tile_rows`), and the K loop is a `fori_loop` that Triton software-pipelines.
- Rows are loaded with a mask (nothing is padded in XLA), and so is a K tail that does not
  fill a step.

Status (H200, benchmarks/fused_decode_h200.md). With the CUDA-core path, the GEMVs take
1.7-3.4 us each on SmolLM2 (device time per launch), against 3.7-5.2 for the general path's
pieces; the fused step runs 2.15x the general path at batch 1 on the real model. On tensor
cores these kernels stream at 0.5-2 TB/s at 64 rows of the 1B shape (best tiles of a sweep),
against 2.7-3.5 for XLA's GEMMs there: slower than the general path, so steps of more than 4
rows keep it by default.

Roundings follow the model's (see `reference`): projections are rounded to the model dtype
before RoPE, SwiGLU or the residual add; RMSNorm is HF's (f32 statistics, rounded, scaled in
the model dtype). f32 inputs ask for true f32 products (Triton would otherwise use TF32).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.tuning import resolve_interpret

f32 = jnp.float32
ROWS = 16  # the smallest tensor-core tile of rows (tl.dot needs >= 16)
MAX_ROWS = 64  # a step's rows form one tile of ROWS..MAX_ROWS rows (`tile_rows`)
# Rows of a 4-byte (f32) step at most. Past 32 the tile is 64 rows, and qkv_rope and
# gate_up_swiglu stage 258 KB of shared memory on tensor-core tiles, over an H100's or
# H200's 227 KB (compiled for sm_90a without a card, stop 56, benchmarks/deviceless_h200.md;
# both model shapes; bf16 stages 145 KB).
F32_MAX_ROWS = 32


def tile_rows(rows: int) -> int:
    """Rows of the one tile a step of `rows` (1..MAX_ROWS, which `_check` enforces) rows is
    held in: a power of two >= ROWS. Rows past `rows` are masked on load and store (nothing
    is padded in XLA)."""
    return max(ROWS, pl.next_power_of_2(rows))


@dataclasses.dataclass(frozen=True)
class GemvTiles:
    """Launch parameters of one fused GEMV: columns per program, K per loop step, warps,
    pipeline stages, and whether the K loop is unrolled in Python (all loads issued up front)
    instead of a pipelined `fori_loop`."""

    block_n: int = 16
    block_k: int = 128  # may exceed K (or not divide it): the tail is masked
    num_warps: int = 4
    num_stages: int = 3
    unroll: bool = False
    # Multiply + reduce on CUDA cores, row by row, instead of 16-row tensor-core dots: no
    # shared-memory staging, so a whole [block_n, block_k] tile is in flight at once. Needs
    # weights given [N, K] (contiguous along the reduction) and few rows.
    fma: bool = False
    # fma with an unrolled K loop: issue the weight loads before the prologue's (the RMSNorm
    # statistics, the split merge), so the HBM latency of the weights overlaps that chain
    # instead of following it. Costs registers: the whole tile is live from the start.
    weights_first: bool = False


# Past this many rows the CUDA-core path's per-row work outgrows its gain. On the H200
# (benchmarks/verify_h200.md, SmolLM2 shape, batch 1) a fused verify step of 5 rows cost 1.95
# decode steps on CUDA cores against 3.55 on tensor-core tiles; at 8 rows 2.94 against 3.65,
# both behind the general path's 2.4.
FMA_MAX_ROWS = 5
# Weights of at most this many elements get `weights_first` by default. On the H200 (device
# time per launch, benchmarks/fused_decode_h200.md) it took 0.2-0.3 us off SmolLM2's qkv
# (0.55M) and down (0.88M), ~0 off o (0.33M) and gate/up (1.8M), and added 0.3-3 us to the
# 1B shape's qkv (6.3M) and gate/up (34M): the early tile's registers cost occupancy.
WEIGHTS_FIRST_MAX = 1 << 20
# One-row steps over matrices of at least this many elements take `LARGE_TILES`: 2 columns x
# up to 2048 of K per program, 4 warps. On the H200 (device time per launch, bench_fused_decode
# --sweep fma, benchmarks/fused_decode_h200.md) that was the best or within 3% of the best of
# 27 CUDA-core tiles for all four of the Llama-3.2-1B shape's projections (qkv 6.56 -> 5.42 us,
# o 4.26 -> 3.90, gate/up 20.99 -> 19.55, down 11.98 -> 10.88), where SmolLM2's smaller
# matrices (<= 1.8M) kept the 4 x 1024, 8-warp tiles (its gate/up: 3.36 against 3.62).
LARGE_GEMV = 1 << 22
# (columns per program, warps) of the CUDA-core tiles for steps of MULTI_ROW_MIN..FMA_MAX_ROWS
# rows (a verify step, or a batch of a few rows): half the columns and warps of the one-row
# tiles. On an H100 (device time per launch, bench_fused_decode --batch 5 --sweep fma,
# benchmarks/verify_h200.md stop 55) the SmolLM2 shape's gate/up took 7.28 us on them against
# 10.11 on the one-row tiles, its down 3.62 against 4.48: the best of 36 tiles for both. In
# the model (bench_verify, batch 1, same run, stop 56) the step of T = 3 / 4 / 5 tokens was
# 5 / 7 / 9% shorter on the SmolLM2 shape and 12 / - / 19% on the 1B shape; at T = 2 it was
# 0.4% and 2.9% longer, so 2 rows keep the one-row tiles.
MULTI_ROW_TILES = (2, 4)
MULTI_ROW_MIN = 3
# Whether `attn_o_residual` takes them too. No: every one of its programs re-reads all of the
# attention's split partials, and 2 columns per program doubles the programs. In the model
# (bench_decode, 1B shape, batch 1, same run) the step ran 1098 / 1110 tok/s with the O
# projection on 4 columns against 1085 / 1095 with it on 2 (1034 / 1041 before LARGE_GEMV).
O_LARGE_TILES = False


def default_tiles(k: int, rows: int = ROWS, transposed: bool = False, n: int = 0,
                  large: bool = True) -> GemvTiles:
    """Tiles for a K of k, N of n (0: unknown) and a step of `rows` rows.

    [N, K] weights at <= FMA_MAX_ROWS rows take the CUDA-core path, 4 columns x 1024 of K per
    program, 8 warps: among the best of every kernel of both model shapes in the H200 sweep
    (benchmarks/fused_decode_h200.md), with `weights_first` for small matrices (see
    WEIGHTS_FIRST_MAX); one row over large matrices takes 2 columns x 2048 of K, 4 warps (see
    LARGE_GEMV; `large=False` keeps the 4-column tiles there); MULTI_ROW_MIN..FMA_MAX_ROWS
    rows take MULTI_ROW_TILES. Otherwise tensor-core tiles, K steps of up to 256.
    """
    if large and transposed and rows == 1 and n * k >= LARGE_GEMV:
        bk = min(2048, pl.next_power_of_2(k))
        return GemvTiles(block_n=2, block_k=bk, num_warps=4, fma=True,
                         unroll=-(-k // bk) <= 4)
    if transposed and rows <= FMA_MAX_ROWS:
        bk = min(1024, max(16, pl.next_power_of_2(k)))
        unroll = -(-k // bk) <= 4
        bn, warps = MULTI_ROW_TILES if rows >= MULTI_ROW_MIN else (4, 8)
        return GemvTiles(block_n=bn, block_k=bk, num_warps=warps, fma=True, unroll=unroll,
                         weights_first=unroll and 0 < n * k <= WEIGHTS_FIRST_MAX)
    return GemvTiles(block_k=min(256, max(16, pl.next_power_of_2(k))))


def _row_mask(rows: int) -> jax.Array:
    return jnp.arange(tile_rows(rows)) < rows  # [R]


def _load_rows(ref, rows: int, cols, limit: int | None = None) -> jax.Array:
    """ref [B, N]: the R-row tile (`tile_rows`) of columns `cols`, zero past row B
    and, with `limit`, zero from column `limit` on (a K tail)."""
    mask = _row_mask(rows)[:, None]
    if limit is not None:
        mask = mask & (cols.start + jnp.arange(cols.size) < limit)[None, :]
    return plgpu.load(ref.at[pl.ds(0, tile_rows(rows)), cols], mask=mask, other=0)


def _load_weights(w_ref, k0, bk: int, cols, k: int, transposed: bool) -> jax.Array:
    """The [bk, bn] weight tile at K offset k0 of column tile `cols`, zero past K.

    transposed: w_ref is [N, K] (each output column's weights contiguous), the tile is read as
    [bn, bk] rows of bk contiguous elements and returned as such (see `_dot`).
    """
    ks = pl.ds(k0, bk)
    kmask = k0 + jnp.arange(bk) < k  # [bk]
    if transposed:
        return plgpu.load(w_ref.at[cols, ks], mask=kmask[None, :], other=0)
    return plgpu.load(w_ref.at[ks, cols], mask=kmask[:, None], other=0)


def _load_k(ref, k0, bk: int, *lead) -> jax.Array:
    """ref[*lead, k0:k0 + bk] (ref's last axis is K) as f32, zero past K.

    `lead` indexes the axes before K in the same indexer: Triton lowers one indexer per load,
    not a chain of `.at` views.
    """
    k = ref.shape[-1]
    return plgpu.load(ref.at[(*lead, pl.ds(k0, bk))], mask=k0 + jnp.arange(bk) < k,
                      other=0).astype(f32)


def _run_k_steps(body, accs, k: int, tiles: GemvTiles):
    """body(i, accs) over the ceil(k / block_k) K steps: unrolled, or a pipelined fori_loop."""
    steps = -(-k // tiles.block_k)
    if not tiles.unroll:
        return jax.lax.fori_loop(0, steps, body, accs)
    for i in range(steps):  # a traced step: Pallas rejects static slices past the end
        accs = body(jnp.int32(i), accs)
    return accs


def _store_rows(ref, rows: int, cols, value: jax.Array) -> None:
    plgpu.store(ref.at[pl.ds(0, tile_rows(rows)), cols], value.astype(ref.dtype),
                mask=_row_mask(rows)[:, None])


def _round(x: jax.Array, dtype) -> jax.Array:
    """x rounded to the model dtype and back to f32 (what a stored activation would hold)."""
    return x.astype(dtype).astype(f32)


def _dot(a: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    """a [R, bk] times the tile w ([bk, bn], or [bn, bk] when transposed) -> [R, bn]."""
    precision = jax.lax.Precision.HIGHEST if a.dtype == f32 else None
    dims = (((1,), (1 if transposed else 0,)), ((), ()))
    return jax.lax.dot_general(a, w, dims, precision=precision, preferred_element_type=f32)


def _k_loop(load_a: Callable[[jax.Array], jax.Array], w_ref, cols: list, k: int,
            tiles: GemvTiles, transposed: bool, rows: int) -> list[jax.Array]:
    """sum over K chunks of load_a(k0) [R, bk] @ w[k0:k0+bk, c] for each column tile c.

    w_ref is [K, N], or [N, K] when transposed. Returns one [R, bn] f32 accumulator per
    column tile (two tiles share each a-chunk: RoPE's halves, or gate and up).
    """
    bk = tiles.block_k

    def body(i, accs):
        a = load_a(i * bk)
        return tuple(acc + _dot(a, _load_weights(w_ref, i * bk, bk, c, k, transposed),
                                transposed) for acc, c in zip(accs, cols))

    accs = tuple(jnp.zeros((tile_rows(rows), tiles.block_n), f32) for _ in cols)
    return list(_run_k_steps(body, accs, k, tiles))


def _normed_loader(x_ref, norm_ref, rows: int, eps: float, bk: int
                   ) -> Callable[[jax.Array], jax.Array]:
    """A loader of RMSNorm(x)[:, k0:k0+bk] in x's dtype, HF's arithmetic (see `_k_loop`).

    The row statistics take one pass over x first: x is B x E values that stay in L2, and no
    program then needs a whole row in registers.
    """
    e = x_ref.shape[1]
    dtype = x_ref.dtype

    def sumsq(i, ss):
        xs = _load_rows(x_ref, rows, pl.ds(i * bk, bk), e).astype(f32)
        return ss + jnp.sum(xs * xs, axis=1)

    ss = jax.lax.fori_loop(0, -(-e // bk), sumsq, jnp.zeros((tile_rows(rows),), f32))
    inv = jax.lax.rsqrt(ss / e + eps)[:, None]  # [R, 1]

    def load(k0):
        xs = _load_rows(x_ref, rows, pl.ds(k0, bk), e).astype(f32)
        w = _load_k(norm_ref, k0, bk)
        return (w[None, :] * _round(xs * inv, dtype)).astype(dtype)

    return load


def prefetch_steps(k: int, tiles: GemvTiles) -> int:
    """K steps of an item whose weights `fma_weights` loads ahead: all of them when the K loop
    is unrolled, none when it is a `fori_loop` (its steps are traced once)."""
    return -(-k // tiles.block_k) if tiles.fma and tiles.unroll else 0


def fma_weights(w_ref, cols: list, k: int, tiles: GemvTiles) -> tuple:
    """The [bn, bk] weight tiles of an item's columns, per K step (`prefetch_steps`) and
    column tile: loads issued ahead of the item's arithmetic (`layer` prefetches the next
    item's, and the next phase's first, while it computes or waits)."""
    bk = tiles.block_k
    return tuple(tuple(_load_weights(w_ref, jnp.int32(i * bk), bk, c, k, True) for c in cols)
                 for i in range(prefetch_steps(k, tiles)))


def _fma_loop(load_rows: Callable[[jax.Array], list], w_ref, cols: list, k: int,
              tiles: GemvTiles, rows: int, weights: tuple | None = None) -> list[jax.Array]:
    """`_k_loop` on CUDA cores: w_ref [N, K]; load_rows(k0) gives the B rows' [bk] f32 chunks.

    Each weight tile [bn, bk] is multiplied by every row and reduced along K (contiguous, so
    within a thread and then a warp). weights: the tiles `fma_weights` loaded ahead (else
    each step loads its own). Returns [R, bn] f32 per column tile, zero past row B.
    """
    bk, bn = tiles.block_k, tiles.block_n

    def step(i, accs, ws=None):
        xs = load_rows(i * bk)
        out = []
        for j, (acc, c) in enumerate(zip(accs, cols)):
            # [bn, bk]: loaded ahead, or here
            w = (ws[j] if ws else _load_weights(w_ref, i * bk, bk, c, k, True)).astype(f32)
            out.append(tuple(a + jnp.sum(w * x[None, :], axis=1) for a, x in zip(acc, xs)))
        return tuple(out)

    accs = tuple(tuple(jnp.zeros((bn,), f32) for _ in range(rows)) for _ in cols)
    if weights:  # loaded ahead, one entry per (unrolled) K step
        for i, ws in enumerate(weights):
            accs = step(jnp.int32(i), accs, ws)
    else:
        accs = _run_k_steps(step, accs, k, tiles)
    rid = jnp.arange(tile_rows(rows))[:, None]
    tiles_out = []
    for acc in accs:  # rows into one [R, bn] tile, for the shared epilogues
        t = jnp.zeros((tile_rows(rows), bn), f32)
        for b, a in enumerate(acc):
            t = jnp.where(rid == b, a[None, :], t)
        tiles_out.append(t)
    return tiles_out


def _row_chunk(ref, b: int, k0, bk: int) -> jax.Array:
    """Row b of ref [B, K] at [k0, k0 + bk) as f32, zero past K."""
    row = jnp.asarray(b, jnp.int32)  # a traced index: Pallas' masked load wants an array
    return _load_k(ref, k0, bk, row)


def _normed_rows_loader(x_ref, norm_ref, rows: int, eps: float, bk: int
                        ) -> Callable[[jax.Array], list]:
    """`_normed_loader` for `_fma_loop`: a list of the rows' normed [bk] chunks, f32."""
    e = x_ref.shape[1]
    dtype = x_ref.dtype
    steps = -(-e // bk)
    invs = []
    for b in range(rows):
        chunks = (_row_chunk(x_ref, b, jnp.int32(i * bk), bk) for i in range(steps))
        ss = sum(jnp.sum(c * c) for c in chunks)
        invs.append(jax.lax.rsqrt(ss / e + eps))

    def load(k0):
        w = _load_k(norm_ref, k0, bk)
        return [_round(w * _round(_row_chunk(x_ref, b, k0, bk) * inv, dtype), dtype)
                for b, inv in enumerate(invs)]

    return load


# A source of a GEMV's left operand: source(fma, bk) gives load(k0), the B rows' [bk] f32
# chunks at K offset k0 (the CUDA-core path) or their [R, bk] tile (the tensor-core path).
Source = Callable[[bool, int], Callable[[jax.Array], Any]]


def _plain(a_ref, rows: int) -> Source:
    """a_ref [B, K] as it is."""
    k = a_ref.shape[1]

    def source(fma: bool, bk: int):
        if fma:
            return lambda k0: [_row_chunk(a_ref, b, k0, bk) for b in range(rows)]
        return lambda k0: _load_rows(a_ref, rows, pl.ds(k0, bk), k)

    return source


def _normed(x_ref, norm_ref, rows: int, eps: float) -> Source:
    """RMSNorm(x) of x_ref [B, E], HF's arithmetic."""
    def source(fma: bool, bk: int):
        make = _normed_rows_loader if fma else _normed_loader
        return make(x_ref, norm_ref, rows, eps, bk)

    return source


def _merge(num_splits: int, load_split, dtype) -> jax.Array:
    """Split-K attention partials merged: load_split(s) gives split s's (output, base-2
    log-sum-exp) of one shape; the result is rounded to the model dtype, as the attention
    output the general path stores. An online merge: one split's pair live at a time."""
    num, m = load_split(0)
    den = jnp.ones_like(m)
    for s in range(1, num_splits):
        o, lse = load_split(s)
        m_new = jnp.maximum(m, lse)
        keep, w = jnp.exp2(m - m_new), jnp.exp2(lse - m_new)
        num, den, m = num * keep + w * o, den * keep + w, m_new
    return _round(num / den, dtype)


def _merged(parts_ref, lse_ref, rows: int, num_heads: int, dtype) -> Source:
    """The attention output merged from parts_ref [B, splits, H * D] and lse_ref, the
    [B, splits, H] log-sum-exps flattened (see `attention.decode_attention`), in the model
    dtype. Each element's head's lse is gathered by address (Triton lowers one array index on
    a flat ref): one f32 per head is stored, not one per element."""
    ns, k = parts_ref.shape[1], parts_ref.shape[2]
    head_dim = k // num_heads

    def lse_index(b, s, k0, bk):  # b: int or [R, 1]; flat index of each element's lse
        h = jnp.minimum((k0 + jnp.arange(bk)) // head_dim, num_heads - 1)  # [bk] (K tail)
        return (b * ns + s) * num_heads + h

    def source(fma: bool, bk: int):
        if fma:
            def load(k0):
                def row(b):
                    r = jnp.asarray(b, jnp.int32)
                    return _merge(ns, lambda s: (
                        _load_k(parts_ref, k0, bk, r, jnp.int32(s)),
                        lse_ref[lse_index(b, s, k0, bk)]), dtype)
                return [row(b) for b in range(rows)]
            return load

        one_head = head_dim % bk == 0  # a K step inside one head: one lse per row

        def load(k0):
            mask = _row_mask(rows)[:, None] & (k0 + jnp.arange(bk) < k)[None, :]
            r = tile_rows(rows)
            rid = jnp.minimum(jnp.arange(r), rows - 1)[:, None]  # rows past B: zero parts

            def lse(s):
                if one_head:  # [R, 1], broadcast: a gather of R values, not R x bk
                    return lse_ref[(rid * ns + s) * num_heads + k0 // head_dim]
                return lse_ref[lse_index(rid, s, k0, bk)]

            return _merge(ns, lambda s: (
                plgpu.load(parts_ref.at[pl.ds(0, r), jnp.int32(s), pl.ds(k0, bk)],
                           mask=mask, other=0), lse(s)), dtype).astype(dtype)
        return load

    return source


def _matmul(source: Source, w_ref, cols: list, *, k: int, rows: int, tiles: GemvTiles,
            transposed: bool, weights: tuple | None = None) -> list[jax.Array]:
    """[R, bn] f32 products of the source's [B, k] operand with each column tile of w, on
    tensor cores or (tiles.fma) on CUDA cores, there with `fma_weights` tiles if given."""
    if tiles.fma:
        if weights is None and tiles.weights_first:
            weights = fma_weights(w_ref, cols, k, tiles)  # before source() issues its loads
        return _fma_loop(source(True, tiles.block_k), w_ref, cols, k, tiles, rows, weights)
    return _k_loop(source(False, tiles.block_k), w_ref, cols, k, tiles, transposed, rows)


def _params(tiles: GemvTiles) -> plgpu.CompilerParams:
    return plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def whole_block(a) -> pl.BlockSpec:
    """The whole array as every program's block, on a grid of any rank: programs index into
    it themselves."""
    zeros = (0,) * len(a.shape)
    return pl.BlockSpec(a.shape, lambda *_: zeros)


def _launch(kernel, inputs: tuple, out_shape: jax.ShapeDtypeStruct, tiles: GemvTiles,
            grid: int, interpret: bool | None, name: str) -> jax.Array:
    """A 1-D grid of `kernel` over whole-array inputs, writing disjoint columns of one output."""
    return pl.pallas_call(
        kernel,
        grid=(grid,),
        in_specs=[whole_block(a) for a in inputs],
        out_specs=whole_block(out_shape),
        out_shape=out_shape,
        compiler_params=_params(tiles),
        interpret=resolve_interpret(interpret),
        name=name,
    )(*inputs)


def _check(name: str, x, k: int, n: int, tiles: GemvTiles, transposed: bool) -> None:
    if not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"{name}: {x.shape[0]} rows; the kernel handles 1..{MAX_ROWS} (one "
                         "tile of rows): run larger batches through the general forward")
    bk, bn = tiles.block_k, tiles.block_n
    if tiles.fma and not transposed:
        raise ValueError(f"{name}: tiles.fma reads weights along K: give them [N, K] "
                         "(transposed=True)")
    if bk < 16 or bk & (bk - 1) or n % bn:
        raise ValueError(f"{name}: N {n} does not tile by block_n={bn}, or block_k={bk} is not "
                         "a power of two >= 16: pick a block_n that divides N")


# --- RMSNorm -> QKV -> RoPE -----------------------------------------------------------------

def _qkv_head_sub(item, tiles: GemvTiles, head_dim: int):
    """Item `item`'s head and its column tile within the head's first half."""
    per_head = head_dim // 2 // tiles.block_n
    return item // per_head, item % per_head


def qkv_cols(item, tiles: GemvTiles, head_dim: int) -> list:
    """Item `item`'s weight columns: a tile of a head's first half and its RoPE partner in
    the second half (HF's rotate_half pairs d with d + D/2)."""
    head, sub = _qkv_head_sub(item, tiles, head_dim)
    lo = head * head_dim + sub * tiles.block_n
    return [pl.ds(lo, tiles.block_n), pl.ds(lo + head_dim // 2, tiles.block_n)]


def _qkv_kernel(x_ref, norm_ref, w_ref, cos_ref, sin_ref, o_ref, *, rows: int, rotated: int,
                head_dim: int, eps: float, tiles: GemvTiles, transposed: bool, item=None,
                weights=None):
    """o_ref [B, H + 2K, D]; item: the work item when a persistent kernel runs this (`layer`),
    else the program's id; weights: its tiles loaded ahead (`fma_weights`)."""
    bh = tiles.block_n
    half = head_dim // 2
    p = pl.program_id(0) if item is None else item
    head, sub = _qkv_head_sub(p, tiles, head_dim)
    cols = qkv_cols(p, tiles, head_dim)
    y1, y2 = (_round(y, x_ref.dtype) for y in _matmul(
        _normed(x_ref, norm_ref, rows, eps), w_ref, cols, k=x_ref.shape[1], rows=rows,
        tiles=tiles, transposed=transposed, weights=weights))
    c = _load_rows(cos_ref, rows, pl.ds(sub * bh, bh))  # [R, bh] f32
    s = _load_rows(sin_ref, rows, pl.ds(sub * bh, bh))
    rot = head < rotated  # Q and K heads turn; V heads pass through
    mask = _row_mask(rows)[:, None]
    for d0, y in ((sub * bh, jnp.where(rot, y1 * c - y2 * s, y1)),
                  (half + sub * bh, jnp.where(rot, y2 * c + y1 * s, y2))):
        plgpu.store(o_ref.at[pl.ds(0, tile_rows(rows)), head, pl.ds(d0, bh)],
                    y.astype(o_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("num_heads", "num_kv_heads", "eps", "tiles",
                                             "transposed", "interpret"))
def qkv_rope(x, norm_w, wqkv, cos, sin, *, num_heads: int, num_kv_heads: int, eps: float,
             tiles: GemvTiles | None = None, transposed: bool = False,
             interpret: bool | None = None) -> jax.Array:
    """RMSNorm(x) @ wqkv with RoPE applied to the Q and K heads.

    Args:
      x: [B, E] residual stream (B <= MAX_ROWS). norm_w: [E]. wqkv: [E, (H + 2K) * D], columns
        [Q heads | K heads | V heads] ([(H + 2K) * D, E] when transposed). cos, sin: [B, D/2]
        f32 tables of the rows' positions.
    Returns:
      [B, (H + 2K) * D] in x.dtype (see `reference.qkv_rope_reference`).
    """
    b, e = x.shape
    n = wqkv.shape[0 if transposed else 1]
    D = n // (num_heads + 2 * num_kv_heads)
    tiles = tiles or default_tiles(e, b, transposed, n)
    _check("qkv_rope", x, e, D // 2, tiles, transposed)
    kernel = functools.partial(_qkv_kernel, rows=b, rotated=num_heads + num_kv_heads,
                               head_dim=D, eps=eps, tiles=tiles, transposed=transposed)
    # A program per (head, column tile of its first half): it also owns the second half's.
    # Written [B, heads, D] (what attention indexes), returned [B, heads x D]: the same bytes.
    out = _launch(kernel, (x, norm_w, wqkv, cos.astype(f32), sin.astype(f32)),
                  jax.ShapeDtypeStruct((b, n // D, D), x.dtype), tiles, n // tiles.block_n // 2,
                  interpret, "qkv_rope")
    return out.reshape(b, n)


# --- RMSNorm -> gate/up -> SwiGLU -----------------------------------------------------------

def swiglu_cols(item, tiles: GemvTiles, F: int) -> list:
    """Item `item`'s gate and up columns of the same features."""
    bn = tiles.block_n
    return [pl.ds(item * bn, bn), pl.ds(F + item * bn, bn)]


def _swiglu_kernel(x_ref, norm_ref, w_ref, o_ref, *, rows: int, eps: float, tiles: GemvTiles,
                   transposed: bool, item=None, weights=None):
    j = pl.program_id(0) if item is None else item
    cols = swiglu_cols(j, tiles, o_ref.shape[1])
    dtype = x_ref.dtype
    gate, up = (_round(y, dtype) for y in _matmul(
        _normed(x_ref, norm_ref, rows, eps), w_ref, cols, k=x_ref.shape[1], rows=rows,
        tiles=tiles, transposed=transposed, weights=weights))
    _store_rows(o_ref, rows, cols[0], _round(jax.nn.silu(gate), dtype) * up)


@functools.partial(jax.jit, static_argnames=("eps", "tiles", "transposed", "interpret"))
def gate_up_swiglu(x, norm_w, w_gate_up, *, eps: float, tiles: GemvTiles | None = None,
                   transposed: bool = False, interpret: bool | None = None) -> jax.Array:
    """silu(RMSNorm(x) @ w_gate) * (RMSNorm(x) @ w_up).

    Args:
      x: [B, E] (B <= MAX_ROWS). norm_w: [E]. w_gate_up: [E, 2F], gate columns first ([2F, E]
        when transposed).
    Returns:
      [B, F] in x.dtype (see `reference.gate_up_swiglu_reference`).
    """
    b, e = x.shape
    F = w_gate_up.shape[0 if transposed else 1] // 2
    tiles = tiles or default_tiles(e, b, transposed, 2 * F)
    _check("gate_up_swiglu", x, e, F, tiles, transposed)
    kernel = functools.partial(_swiglu_kernel, rows=b, eps=eps, tiles=tiles,
                               transposed=transposed)
    return _launch(kernel, (x, norm_w, w_gate_up), jax.ShapeDtypeStruct((b, F), x.dtype), tiles,
                   F // tiles.block_n, interpret, "gate_up_swiglu")


# --- a @ w + residual -----------------------------------------------------------------------

def residual_cols(item, tiles: GemvTiles) -> list:
    """Item `item`'s output columns."""
    return [pl.ds(item * tiles.block_n, tiles.block_n)]


def _residual_kernel(*refs, rows: int, tiles: GemvTiles, transposed: bool, num_heads: int = 0,
                     item=None, weights=None):
    if num_heads:  # `attn_o_residual`: the attention's split partials, merged in the prologue
        parts_ref, lse_ref, w_ref, res_ref, o_ref = refs
        source = _merged(parts_ref, lse_ref, rows, num_heads, res_ref.dtype)
        k = parts_ref.shape[2]
    else:
        a_ref, w_ref, res_ref, o_ref = refs
        source, k = _plain(a_ref, rows), a_ref.shape[1]
    (col,) = residual_cols(pl.program_id(0) if item is None else item, tiles)
    (y,) = _matmul(source, w_ref, [col], k=k, rows=rows, tiles=tiles, transposed=transposed,
                   weights=weights)
    dtype = res_ref.dtype
    res = _load_rows(res_ref, rows, col).astype(f32)
    _store_rows(o_ref, rows, col, _round(res + _round(y, dtype), dtype))


@functools.partial(jax.jit, static_argnames=("tiles", "transposed", "interpret"))
def gemv_residual(a, w, residual, *, tiles: GemvTiles | None = None, transposed: bool = False,
                  interpret: bool | None = None) -> jax.Array:
    """residual + a @ w, the product rounded to the model dtype before the add.

    Args:
      a: [B, K] (B <= MAX_ROWS). w: [K, N] ([N, K] when transposed). residual: [B, N], a's
        dtype.
    Returns:
      [B, N] in residual.dtype (see `reference.gemv_residual_reference`).
    """
    b, k = a.shape
    n = w.shape[0 if transposed else 1]
    tiles = tiles or default_tiles(k, b, transposed, n)
    _check("gemv_residual", a, k, n, tiles, transposed)
    kernel = functools.partial(_residual_kernel, rows=b, tiles=tiles, transposed=transposed)
    return _launch(kernel, (a, w, residual), jax.ShapeDtypeStruct((b, n), residual.dtype),
                   tiles, n // tiles.block_n, interpret, "gemv_residual")


def merge_block_k(head_dim: int) -> int:
    """K step of the tensor-core O projection when it merges split partials: the largest power
    of two dividing head_dim (head_dim itself for 64 or 128), so a step lies in one head and
    takes one lse per row and split. Why: at K steps of 256 the merge held every split's
    [R, 256] partials and per-element lse in registers at once, and ptxas spilled 11-27 KB
    per thread at 4-8 splits, SmolLM2's verify steps of 5-16 rows among them
    (scripts/deviceless_check.py, benchmarks/deviceless_h200.md); at one head per step: 128
    registers, no spill, at 8 splits."""
    return max(16, min(256, head_dim & -head_dim))


@functools.partial(jax.jit, static_argnames=("tiles", "transposed", "interpret"))
def attn_o_residual(parts, lse, w, residual, *, tiles: GemvTiles | None = None,
                    transposed: bool = False, interpret: bool | None = None) -> jax.Array:
    """residual + merge(parts, lse) @ w: the O projection with attention's split-K merge as its
    prologue, so the merge costs no kernel of its own.

    Every program merges the whole [B, splits, K] partials it multiplies: a few KB per split
    from L2, against the weight tile it streams.

    Args:
      parts: [B, splits, K] f32 and lse [B, splits, H] f32 from `attention.decode_attention`
        (B <= MAX_ROWS), K = H x head_dim.
      w: [K, N] ([N, K] when transposed). residual: [B, N] in the model dtype.
    Returns:
      [B, N] in residual.dtype (see `reference.attn_o_residual_reference`).
    """
    b, _, k = parts.shape
    n = w.shape[0 if transposed else 1]
    if lse.shape[:2] != parts.shape[:2] or k % lse.shape[2]:
        raise ValueError(f"attn_o_residual: lse {lse.shape} must be [B, splits, heads] for "
                         f"parts {parts.shape} [B, splits, heads x head_dim]")
    if tiles is None:
        tiles = default_tiles(k, b, transposed, n, large=O_LARGE_TILES)
        if not tiles.fma and parts.shape[1] > 1:
            tiles = dataclasses.replace(tiles, block_k=merge_block_k(k // lse.shape[2]))
    if not tiles.fma:  # pipelined, each split's f32 [R, block_k] partials per stage overflow
        tiles = dataclasses.replace(tiles, num_stages=1)  # shared memory (seen on the H200)
    _check("attn_o_residual", parts, k, n, tiles, transposed)
    kernel = functools.partial(_residual_kernel, rows=b, tiles=tiles, transposed=transposed,
                               num_heads=lse.shape[2])
    return _launch(kernel, (parts, lse.reshape(-1), w, residual),
                   jax.ShapeDtypeStruct((b, n), residual.dtype), tiles, n // tiles.block_n,
                   interpret, "attn_o_residual")
