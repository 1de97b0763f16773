"""Flash attention forward for Hopper in Pallas Mosaic GPU: TMA loads, wgmma, warp specialization.

The Triton kernel (`kernel.py`) leaves the H100/H200's tensor cores a third idle: Triton's
Pallas lowering has no wgmma pipelining across warpgroups, no TMA and no producer warps. This
kernel is the FlashAttention-3 layout written for our signature:

- a CTA owns 2 * block_q query rows of one (sequence, query head); two *compute* warpgroups
  take block_q rows each, a third *producer* warpgroup streams K and V blocks of the kv head
  into a ring of `stages` shared-memory slots with TMA, one mbarrier per slot and direction;
- each compute warpgroup runs S = Q K^T (wgmma, f32 accumulator), the online softmax in
  registers (base-2, the row max kept in log2 units), then O += P V (wgmma);
- with `pingpong`, a two-arrival barrier makes the two compute warpgroups alternate: one's
  softmax overlaps the other's matmuls (FA3's inter-warpgroup schedule).

Features are the Triton kernel's: causal or not, GQA (query head h reads kv head h // group),
per-sequence `q_offset` (query t sits at position q_offset + t) and `kv_lens`, and a tanh soft
cap. A tree mask is not here: `flash_attention` keeps masked calls on the Triton kernel.

Shapes: T is padded to a multiple of 2 * block_q, S to a multiple of block_kv (padded keys are
past kv_lens; padded queries are dropped). bf16 / f16 only (wgmma), D a multiple of 64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_attention.logits import scale_logits
from pallas_kernels.flash_attention.reference import MASK_VALUE

COMPUTE_WGS = 2


def mosaic_gpu_available() -> bool:
    """Whether this jax has Pallas Mosaic GPU (the import is what fails on old or CPU-less wheels)."""
    try:
        import jax.experimental.pallas.mosaic_gpu  # noqa: F401
    except ImportError:
        return False
    return True


def _plgpu():
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu


def _kernel(q_off_ref, kv_len_ref, q_ref, k_ref, v_ref, o_ref, scoped, *, sm_scale, causal,
            soft_cap, block_q, block_kv, stages, group, num_q_tiles, num_kv_blocks, pingpong,
            interpret):
    """One CTA: query rows [tile * 2 * block_q, +2 * block_q) of head h of sequence b.

    q_off_ref, kv_len_ref: [B] int32 in GMEM. q_ref/o_ref: [B, T_pad, H, D]; k_ref, v_ref:
    [B, S_pad, K, D]. scoped: the shared-memory tiles and mbarriers of `hopper_flash_call`.
    """
    plgpu = _plgpu()

    def with_layout(x, layout):
        # The GPU interpreter evaluates layout casts through XLA:CPU, which has no rule for them;
        # layouts only matter to the compiled kernel.
        return x if interpret else plgpu.layout_cast(x, layout)

    def iota(shape, dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    (q_smem2, k_smem, v_smem), (k_ready, v_ready, q_ready), (k_free, v_free), sched = scoped
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    # Heaviest causal tiles (most keys) first: the grid's tail is then the cheap tiles.
    tile = num_q_tiles - 1 - lax.axis_index("q_seq")
    wg = lax.axis_index("wg")
    q_off = q_off_ref[b]
    kv_len = kv_len_ref[b]

    def steps_of(q_first):
        """(kv blocks this query block reads, blocks needing no mask) for rows from q_first."""
        if causal:
            end = jnp.minimum(kv_len, q_off + q_first + block_q)
            full = jnp.minimum(kv_len // block_kv, (q_off + q_first + 1) // block_kv)
        else:
            end = kv_len
            full = kv_len // block_kv
        n = (jnp.maximum(end, 0) + block_kv - 1) // block_kv
        return n, jnp.clip(full, 0, n)

    tile_first = tile * (COMPUTE_WGS * block_q)
    # The second compute warpgroup's rows are later: it reads the most blocks of the CTA.
    cta_steps, _ = steps_of(tile_first + (COMPUTE_WGS - 1) * block_q)

    def rendezvous():
        plgpu.barrier_arrive(sched)
        plgpu.barrier_wait(sched)

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_smem = q_smem2.at[wg]
        q_first = tile_first + wg * block_q
        n_steps, n_full = steps_of(q_first)
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q_first, block_q), h], q_smem,
                                q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        m = with_layout(jnp.full((block_q,), MASK_VALUE, jnp.float32), row_layout)
        l = with_layout(jnp.zeros((block_q,), jnp.float32), row_layout)
        acc = with_layout(jnp.zeros((block_q, q_smem.shape[-1]), jnp.float32),
                          plgpu.Layout.WGMMA)
        if pingpong:
            # Warpgroup 1 starts one rendezvous behind: from then on one warpgroup's softmax
            # runs while the other's matmuls hold the tensor cores.
            pl.when(wg == 1)(rendezvous)

        def step(j, carry, masked):
            acc, m, l = carry
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_ready.at[slot])

            def qk(s_ref):
                plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                if pingpong:
                    rendezvous()
                return s_ref[...]

            if interpret:
                # The interpreter (jax 0.10) has no transposed wgmma operand nor run_state: it
                # checks the pipeline, masks and softmax with plain dots of the same tiles.
                s = jnp.dot(q_smem[...], k_smem[slot].T, preferred_element_type=jnp.float32)
                if pingpong:
                    rendezvous()
            else:
                s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            s = scale_logits(s, sm_scale, soft_cap)
            if masked:
                shape = (block_q, block_kv)
                k_pos = j * block_kv + iota(shape, 1)
                visible = k_pos < kv_len
                if causal:
                    q_pos = q_off + q_first + iota(shape, 0)
                    visible = visible & (k_pos <= q_pos)
                s = jnp.where(visible, s, MASK_VALUE)
            m_new = jnp.maximum(m, s.max(axis=1))
            alpha = jnp.exp2(m - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            l = l * alpha + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            p = p.astype(k_smem.dtype)
            if pingpong:
                plgpu.barrier_arrive(sched)  # this softmax is done
            plgpu.barrier_wait(v_ready.at[slot])
            if pingpong:
                plgpu.barrier_wait(sched)  # the other warpgroup's matmuls are done

            if interpret:
                acc = acc + jnp.dot(p, v_smem[slot], preferred_element_type=jnp.float32)
            else:
                def pv(acc_ref):
                    plgpu.wgmma(acc_ref, p, v_smem.at[slot])

                acc = pl.run_state(pv)(plgpu.ACC.init(acc))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l

        carry = (acc, m, l)
        carry = lax.fori_loop(0, n_full, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)
        acc, m, l = carry

        @pl.loop(n_steps, cta_steps)
        def _release(j):
            # Blocks only the other warpgroup needs: hand their slots back in step (each arrival
            # waits for the load, so this warpgroup never counts twice in one phase).
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            if pingpong:
                rendezvous()
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            if pingpong:
                rendezvous()

        if pingpong:
            pl.when(wg == 0)(rendezvous)
        l_safe = jnp.where(l == 0.0, 1.0, l)  # a row that saw no key is 0, not NaN
        out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
        q_smem[...] = out.astype(q_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, o_ref.at[b, pl.ds(q_first, block_q), h])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(h, group)

        def load(j, slot, reuse=False):
            """K then V of block j into `slot`; a reused slot waits for both warpgroups' release."""
            rows = (b, pl.ds(j * block_kv, block_kv), kv_head)
            for ref, smem, ready, free in ((k_ref, k_smem, k_ready, k_free),
                                           (v_ref, v_smem, v_ready, v_free)):
                if reuse:
                    plgpu.barrier_wait(free.at[slot])
                plgpu.copy_gmem_to_smem(ref.at[rows], smem.at[slot], ready.at[slot])

        for i in range(min(stages, num_kv_blocks)):
            pl.when(i < cta_steps)(functools.partial(load, i, i))

        @pl.loop(stages, jnp.maximum(cta_steps, stages))
        def _stream(j):
            load(j, lax.rem(j, stages), reuse=True)

        @pl.loop(jnp.maximum(cta_steps - stages, 0), cta_steps)
        def _drain(j):
            # Observe the last releases too: every completed barrier phase is waited for once
            # (the GPU interpreter checks it; on the card it costs the idle producer nothing).
            slot = lax.rem(j, stages)
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


def hopper_flash_call(q, k, v, q_offset, kv_lens, *, sm_scale: float, causal: bool,
                      soft_cap: float | None, block_q: int, block_kv: int, stages: int,
                      pingpong: bool, interpret: bool):
    """q [B, T_pad, H, D] (T_pad % (2 * block_q) == 0), k/v [B, S_pad, K, D] (S_pad % block_kv
    == 0), q_offset/kv_lens [B] int32 -> [B, T_pad, H, D]. V rows past kv_lens must be finite
    (`flash_attention` zeroes them): a probability of 0 times NaN is NaN inside the wgmma."""
    plgpu = _plgpu()
    bsz, t_pad, h, d = q.shape
    group = h // k.shape[2]
    num_q_tiles = t_pad // (COMPUTE_WGS * block_q)
    dtype = q.dtype
    swizzle = 128
    transforms = () if interpret else (plgpu.TilingTransform((8, swizzle // dtype.itemsize)),
                  plgpu.SwizzleTransform(swizzle))
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, causal=causal, soft_cap=soft_cap, block_q=block_q,
        block_kv=block_kv, stages=stages, group=group, num_q_tiles=num_q_tiles,
        num_kv_blocks=k.shape[1] // block_kv,
        pingpong=pingpong, interpret=interpret)

    def entry(q_off_ref, kv_len_ref, q_ref, k_ref, v_ref, o_ref):
        pl.run_scoped(
            lambda *scoped: kernel(q_off_ref, kv_len_ref, q_ref, k_ref, v_ref, o_ref, scoped),
            (
                plgpu.SMEM((COMPUTE_WGS, block_q, d), dtype, transforms=transforms),
                plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
                plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
            ),
            (
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=COMPUTE_WGS),
            ),
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
            collective_axes="wg",
        )

    kw = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        kw["interpret"] = InterpretGPUParams()
    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct(q.shape, dtype),
        grid=(h, num_q_tiles, bsz),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kw,
    )(q_offset, kv_lens, q, k, v)
