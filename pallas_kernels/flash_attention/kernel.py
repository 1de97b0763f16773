"""Flash attention forward (FlashAttention-2 tiling, online softmax) as a Pallas Triton kernel.

Supports causal/non-causal, GQA through the K/V index map, per-sequence kv lengths, a query
offset for chunked prefill over cached K/V, and an optional mask among the queries' own keys
(tree attention, SpecInfer / Medusa), compiled as a separate static specialization.

On Hopper, `flash_attention` can route unmasked bf16/f16 calls to the Mosaic GPU kernel of
`hopper.py` (same signature and features); `tuning.flash_backend` says when it does.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.hopper import hopper_flash_call, wgmma_unsupported
from pallas_kernels.flash_attention.logits import scale_logits
from pallas_kernels.flash_attention.reference import (
    MASK_VALUE,
    attention_xla,
    flash_attention_reference,
)
from pallas_kernels.flash_attention.tuning import (
    HOPPER_SMEM,
    flash_backend,
    flash_config,
    hopper_config,
    hopper_smem_bytes,
    resolve_interpret,
    sm_count,
)


def _precision(x: jax.Array):
    # Triton's default for an f32 dot is TF32 (~1e-3 error, seen on the H100): ask for IEEE f32.
    return jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] . b [N, K] -> [M, N] in f32 (b contracted on its last dim: no transpose copy)."""
    dims = (((1,), (1,)), ((), ()))
    return jax.lax.dot_general(
        a, b, dims, precision=_precision(a), preferred_element_type=jnp.float32
    )


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] . b [K, N] -> [M, N] in f32."""
    dims = (((1,), (0,)), ((), ()))
    return jax.lax.dot_general(
        a, b, dims, precision=_precision(a), preferred_element_type=jnp.float32
    )


def online_softmax_step(carry, s, v, mask):
    """One FlashAttention-2 update with base-2 logits s [M, N] and values v [N, D].

    carry = (acc [M, D] f32 unnormalized output, m [M] running max, l [M] running sum).
    `mask` [M, N] (or None when the whole tile is visible) removes invisible keys; the masked
    probabilities are zeroed as well so that a row with no visible key keeps l == 0 (output 0)
    instead of averaging the masked values.
    """
    acc, m, l = carry
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)  # rescales what was accumulated under the old max
    p = jnp.exp2(s - m_new[:, None])
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    l = l * alpha + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + dot_nn(p.astype(v.dtype), v)
    return acc, m_new, l


def finish_softmax(acc: jax.Array, l: jax.Array) -> jax.Array:
    """acc / l, with rows that saw no key (l == 0) left at 0."""
    return acc / jnp.where(l == 0.0, 1.0, l)[:, None]


def _flash_kernel(
    q_offset_ref,  # [] int32
    kv_len_ref,  # [] int32
    q_ref,  # [block_q, D]
    k_ref,  # [S_pad, D]  (one kv head of one sequence)
    v_ref,  # [S_pad, D]
    *refs,  # (mask_ref [block_q, num_mask_tiles * block_k] int32, o_ref) or (o_ref [block_q, D],)
    sm_scale: float,
    causal: bool,
    soft_cap: float | None,
    block_q: int,
    block_k: int,
    num_q_blocks: int,
    num_mask_tiles: int,
):
    # num_mask_tiles is static: 0 compiles the plain kernel, without a mask operand.
    mask_ref, o_ref = refs if num_mask_tiles else (None, *refs)
    # Heaviest causal q blocks first (they see the most keys): better tail balance.
    qi = num_q_blocks - 1 - pl.program_id(0)
    q_off = q_offset_ref[()]
    kv_len = kv_len_ref[()]
    q = q_ref[...]
    head_dim = q.shape[-1]

    q_first = q_off + qi * block_q  # absolute position of this block's first query
    if causal:
        # The last query (q_first + block_q - 1) sees keys < q_first + block_q.
        end = jnp.minimum(kv_len, q_first + block_q)
        # Block j needs no mask when its last key (j+1)*block_k - 1 <= q_first and it ends
        # inside kv_len: j < (q_first + 1) // block_k and j < kv_len // block_k.
        num_full = jnp.minimum(kv_len // block_k, (q_first + 1) // block_k)
    else:
        end = kv_len
        num_full = kv_len // block_k
    num_blocks = (end + block_k - 1) // block_k
    if mask_ref is not None:
        # The queries' own keys start in tile first_tile: only tiles before it skip the mask.
        first_tile = q_off // block_k
        num_full = jnp.minimum(num_full, first_tile)
    num_full = jnp.minimum(num_full, num_blocks)

    def body(j, carry, masked):
        k = k_ref[pl.ds(j * block_k, block_k), :]  # [block_k, D]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = scale_logits(dot_nt(q, k), sm_scale, soft_cap)  # [block_q, block_k]
        mask = None
        if masked:
            k_pos = j * block_k + jnp.arange(block_k)
            in_len = k_pos < kv_len
            # Keys past kv_len may be stale cache rows: zero V so 0-probability * NaN stays 0.
            v = jnp.where(in_len[:, None], v, jnp.zeros_like(v))
            mask = jnp.broadcast_to(in_len[None, :], (block_q, block_k))
            if causal:
                q_pos = q_first + jnp.arange(block_q)
                mask = mask & (k_pos[None, :] <= q_pos[:, None])
            if mask_ref is not None:
                # Window tile w holds kv tile first_tile + w (see `_mask_window`); tiles outside
                # the window hold no query's own key, so the mask leaves them alone.
                w = j - first_tile
                in_window = (w >= 0) & (w < num_mask_tiles)
                cols = pl.ds(jnp.clip(w, 0, num_mask_tiles - 1) * block_k, block_k)
                mask = mask & ((mask_ref[:, cols] != 0) | ~in_window)
        return online_softmax_step(carry, s, v, mask)

    carry = (
        jnp.zeros((block_q, head_dim), jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    carry = jax.lax.fori_loop(0, num_full, functools.partial(body, masked=False), carry)
    carry = jax.lax.fori_loop(num_full, num_blocks, functools.partial(body, masked=True), carry)
    acc, _, l = carry
    o_ref[...] = finish_softmax(acc, l).astype(o_ref.dtype)


def _check_inputs(q, k, v, q_offset, kv_lens, mask=None) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(
            f"expected q [B, T, H, D] and k, v [B, S, K, D] of equal shape; got q {q.shape}, "
            f"k {k.shape}, v {v.shape}"
        )
    b, _, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"q {q.shape} and k {k.shape} disagree on batch or head_dim: pass K/V of the same "
            "batch and head_dim as q"
        )
    if h % k.shape[2]:
        raise ValueError(
            f"q has {h} heads, not a multiple of the {k.shape[2]} kv heads of k {k.shape}"
        )
    if d not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {d} of q {q.shape} is not a power of two in [16, 256]")
    for name, x in (("q_offset", q_offset), ("kv_lens", kv_lens)):
        if x is not None and tuple(x.shape) != (b,):
            raise ValueError(f"{name} has shape {tuple(x.shape)}; expected ({b},) for q {q.shape}")
    t = q.shape[1]
    if mask is not None and tuple(mask.shape) != (b, t, t):
        raise ValueError(
            f"mask has shape {tuple(mask.shape)}; expected ({b}, {t}, {t}) (query t, own key u) "
            f"for q {q.shape}"
        )


def _pad_axis(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    """Zero-pads `axis` up to a multiple (no copy when already aligned)."""
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _mask_window(mask: jax.Array, q_offset: jax.Array, block_k: int, num_tiles: int) -> jax.Array:
    """The [B, T, T] mask laid out over the kv tiles that hold the queries' own keys.

    Key q_offset + u sits in column r + u of a window of num_tiles kv tiles starting at tile
    q_offset // block_k, where r = q_offset % block_k; so the kernel reads whole aligned tiles
    instead of gathering. Columns outside [r, r + T) hold other keys: 1, unrestricted.
    Returns [B, T, num_tiles * block_k] int32 (Triton loads no bool refs).
    """
    b, t, _ = mask.shape
    u = jnp.arange(num_tiles * block_k)[None, :] - (q_offset % block_k)[:, None]  # [B, W]
    own = (u >= 0) & (u < t)
    u = jnp.broadcast_to(jnp.clip(u, 0, t - 1)[:, None, :], (b, t, u.shape[1]))
    return jnp.where(own[:, None, :], jnp.take_along_axis(mask, u, axis=2), True).astype(jnp.int32)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    sm_scale: float | None = None,
    q_offset: jax.Array | None = None,
    kv_lens: jax.Array | None = None,
    soft_cap: float | None = None,
    mask: jax.Array | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
    impl: str = "pallas",
    backend: str = "auto",
) -> jax.Array:
    """Tiled online-softmax attention (forward only), GQA without repeating K/V.

    Query t of sequence b sits at absolute position q_offset[b] + t; key s at position s. A key
    is visible when s < kv_lens[b] and (if causal) s <= q_offset[b] + t. Chunked prefill over a
    cache: pass the cache as k/v and the chunk's start position as q_offset.

    Args:
      q: [B, T, H, D] queries, f32 / bf16 / f16. D a power of two in [16, 256].
      k: [B, S, K, D] keys, same dtype; H must be a multiple of K.
      v: [B, S, K, D] values.
      causal: apply the causal mask at the offset positions.
      sm_scale: logit scale; defaults to 1/sqrt(D).
      q_offset: [B] int32 position of each sequence's first query; defaults to 0.
      kv_lens: [B] int32 valid keys per sequence (the rest is padding); defaults to S.
      soft_cap: if set, logits become soft_cap * tanh(logits / soft_cap).
      mask: optional [B, T, T] bool. Key q_offset[b] + u (the one query u wrote into the cache)
        is visible to query t only if mask[b, t, u]; other keys follow the rules above. With
        causal=True this is tree attention: each node sees the prefix, its ancestors and itself.
        None compiles the plain kernel (no mask operand, no extra work).
      block_q, block_k, num_warps, num_stages: override `tuning.flash_config`.
      interpret: run the Pallas interpreter; None = interpret unless the backend is GPU.
      impl: "pallas" (this kernel); "xla" (dense jnp in the input dtype, materializes the
        [B, H, T, S] logits); "reference" (the same in f32 at HIGHEST precision: the spec).
      backend: which Pallas kernel serves impl="pallas": "triton", "mosaic" (the Hopper
        kernel of `hopper.py`: bf16/f16, D a multiple of 64, no mask; interpret=True runs the
        Mosaic GPU interpreter) or "auto" (`tuning.flash_backend`: mosaic on Hopper where it
        measured faster, else triton). The block and launch overrides above are Triton's.

    Returns:
      [B, T, H, D] in q.dtype, f32 accumulation. Rows that see no key are 0; K/V rows past
      kv_lens are never used (they may hold stale data, even NaN).
    """
    _check_inputs(q, k, v, q_offset, kv_lens, mask)
    if impl in ("reference", "xla"):
        dense = flash_attention_reference if impl == "reference" else attention_xla
        return dense(
            q,
            k,
            v,
            causal=causal,
            sm_scale=sm_scale,
            q_offset=q_offset,
            kv_lens=kv_lens,
            soft_cap=soft_cap,
            mask=mask,
        )
    if impl != "pallas":
        raise ValueError(f"impl={impl!r}; expected 'pallas', 'reference' or 'xla'")
    if backend not in ("auto", "triton", "mosaic"):
        raise ValueError(f"backend={backend!r}; expected 'auto', 'triton' or 'mosaic'")
    b, t, _, d = q.shape
    s = k.shape[1]
    interpret = resolve_interpret(interpret)
    why_not = _mosaic_unsupported(q, mask)
    if backend == "mosaic" and why_not:
        raise ValueError(f"backend='mosaic' cannot run this call: {why_not}; use "
                         "backend='triton' (or 'auto', which picks it)")
    if backend == "auto":
        backend = "triton" if why_not or interpret else flash_backend(d, t, q.dtype)
    if backend == "mosaic":
        return hopper_flash_attention(q, k, v, q_offset, kv_lens, sm_scale=sm_scale,
                                      causal=causal, soft_cap=soft_cap, interpret=interpret)
    cfg = flash_config(d, q.dtype)
    # Blocks never exceed the (power-of-two rounded) problem: small decode/test shapes stay small.
    block_q = min(block_q or cfg.block_q, max(16, pl.next_power_of_2(t)))
    block_k = min(block_k or cfg.block_k, max(16, pl.next_power_of_2(s)))
    q_offset = jnp.zeros((b,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)
    kv_lens = jnp.full((b,), s, jnp.int32) if kv_lens is None else kv_lens.astype(jnp.int32)
    # Clamp so a too-large length never reads past the (padded) arrays.
    kv_lens = jnp.minimum(kv_lens, s)
    return _flash_call(
        q,
        k,
        v,
        q_offset,
        kv_lens,
        mask,
        sm_scale=d**-0.5 if sm_scale is None else float(sm_scale),
        causal=causal,
        soft_cap=soft_cap,
        block_q=block_q,
        block_k=block_k,
        num_warps=num_warps or cfg.num_warps,
        num_stages=num_stages or cfg.num_stages,
        interpret=interpret,
    )


def _mosaic_unsupported(q: jax.Array, mask: jax.Array | None) -> str | None:
    """Why the Hopper kernel cannot take this call, or None."""
    if mask is not None:
        return "it has no tree mask"
    return wgmma_unsupported(q.dtype, q.shape[-1])


@functools.partial(
    jax.jit,
    static_argnames=("sm_scale", "causal", "soft_cap", "interpret", "block_q", "block_kv",
                     "stages", "pingpong", "tweaks", "ctas", "q_ahead", "split_tail"),
)
def hopper_flash_attention(q, k, v, q_offset=None, kv_lens=None, *, sm_scale=None, causal=True,
                           soft_cap=None, interpret=False, block_q=None, block_kv=None,
                           stages=None, pingpong=None, tweaks=None, ctas=None, q_ahead=None,
                           split_tail=None):
    """`flash_attention`'s contract on the Hopper kernel (no mask): pads T and S to its tiles,
    zeroes V past kv_lens, calls it. block_q (rows per compute warpgroup) / block_kv / stages /
    pingpong / tweaks (`hopper.Tweaks`) override `hopper_config`. ctas: how many CTAs share
    the tiles (0: one per tile; default: one per SM when the config is persistent, else 0).
    q_ahead: load each tile's queries during the CTA's previous tile (persistent launches).
    split_tail: split the keys of a non-causal persistent launch's last-round tiles over the
    idle CTAs (`hopper.tail_parts`)."""
    b, t, _, d = q.shape
    s = k.shape[1]
    cfg = hopper_config(d, causal=causal, kv_len=s)
    block_q = block_q or cfg.block_q
    block_kv = min(block_kv or cfg.block_kv, max(64, pl.next_power_of_2(s)))
    stages = stages or cfg.stages
    pingpong = cfg.pingpong if pingpong is None else pingpong
    q_ahead = cfg.q_ahead if q_ahead is None else q_ahead
    split_tail = cfg.split_tail if split_tail is None else split_tail
    smem = hopper_smem_bytes(block_q, block_kv, stages, d, q.dtype.itemsize, q_ahead)
    if smem > HOPPER_SMEM:
        raise ValueError(
            f"the Hopper flash tiles need {smem // 1024} KB of shared memory (block_q {block_q}, "
            f"block_kv {block_kv}, stages {stages}, q_ahead {q_ahead}, D {d}); an H100/H200 CTA "
            "has 227 KB: lower stages or block_kv, or pass q_ahead=False")
    q_offset = jnp.zeros((b,), jnp.int32) if q_offset is None else q_offset.astype(jnp.int32)
    if kv_lens is None:
        kv_lens = jnp.full((b,), s, jnp.int32)
    else:
        kv_lens = jnp.minimum(kv_lens.astype(jnp.int32), s)
        # p = 0 times a stale NaN is NaN inside the wgmma: the kernel needs finite V rows.
        live = jnp.arange(s)[None, :] < kv_lens[:, None]  # [B, S]
        v = jnp.where(live[:, :, None, None], v, jnp.zeros((), v.dtype))
    qp = _pad_axis(q, 1, 2 * block_q)
    kp = _pad_axis(k, 1, block_kv)
    vp = _pad_axis(v, 1, block_kv)
    out = hopper_flash_call(
        qp, kp, vp, q_offset, kv_lens,
        sm_scale=d**-0.5 if sm_scale is None else float(sm_scale), causal=causal,
        soft_cap=soft_cap, block_q=block_q, block_kv=block_kv, stages=min(stages,
        kp.shape[1] // block_kv), pingpong=pingpong, interpret=interpret,
        tweaks=cfg.tweaks if tweaks is None else tweaks,
        num_ctas=(sm_count() if cfg.persistent else None) if ctas is None else (ctas or None),
        q_ahead=q_ahead, split_tail=split_tail,
    )
    return out[:, :t]


@functools.partial(
    jax.jit,
    static_argnames=(
        "sm_scale",
        "causal",
        "soft_cap",
        "block_q",
        "block_k",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def _flash_call(
    q,
    k,
    v,
    q_offset,
    kv_lens,
    mask,
    *,
    sm_scale,
    causal,
    soft_cap,
    block_q,
    block_k,
    num_warps,
    num_stages,
    interpret,
):
    b, t, h, d = q.shape
    num_kv = k.shape[2]
    group = h // num_kv
    # Ragged tails are zero-padded; padded keys are beyond kv_lens, padded queries are dropped.
    qp = _pad_axis(q, 1, block_q)  # [B, T_pad, H, D]
    kp = _pad_axis(k, 1, block_k)  # [B, S_pad, K, D]
    vp = _pad_axis(v, 1, block_k)
    num_q_blocks = qp.shape[1] // block_q
    s_pad = kp.shape[1]

    def q_map(i, bi, hi):
        return (bi, num_q_blocks - 1 - i, hi, 0)

    def kv_map(i, bi, hi):
        return (bi, 0, hi // group, 0)  # GQA: query head hi reads kv head hi // group

    in_specs = [
        pl.BlockSpec((None,), lambda i, bi, hi: (bi,)),
        pl.BlockSpec((None,), lambda i, bi, hi: (bi,)),
        pl.BlockSpec((None, block_q, None, d), q_map),
        pl.BlockSpec((None, s_pad, None, d), kv_map),
        pl.BlockSpec((None, s_pad, None, d), kv_map),
    ]
    operands = [q_offset, kv_lens, qp, kp, vp]
    num_mask_tiles = 0
    if mask is not None:
        # The T own keys start anywhere in a tile: they span at most
        # cdiv(T + block_k - 1, block_k) tiles.
        num_mask_tiles = pl.cdiv(t + block_k - 1, block_k)
        window = _pad_axis(_mask_window(mask, q_offset, block_k, num_mask_tiles), 1, block_q)
        in_specs.append(
            pl.BlockSpec(
                (None, block_q, num_mask_tiles * block_k),
                lambda i, bi, hi: (bi, num_q_blocks - 1 - i, 0),
            )
        )
        operands.append(window)  # [B, T_pad, W] int32
    kernel = functools.partial(
        _flash_kernel,
        sm_scale=sm_scale,
        causal=causal,
        soft_cap=soft_cap,
        block_q=block_q,
        block_k=block_k,
        num_q_blocks=num_q_blocks,
        num_mask_tiles=num_mask_tiles,
    )
    out = pl.pallas_call(
        kernel,
        grid=(num_q_blocks, b, h),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, block_q, None, d), q_map),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="flash_attention",
    )(*operands)
    return out[:, :t]
