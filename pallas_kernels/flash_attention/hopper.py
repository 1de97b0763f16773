"""Flash attention forward for Hopper in Pallas Mosaic GPU: TMA loads, wgmma, warp specialization.

The Triton kernel (`kernel.py`) leaves the H100/H200's tensor cores a third idle: Triton's
Pallas lowering has no wgmma pipelining across warpgroups, no TMA and no producer warps. This
kernel is the FlashAttention-3 layout written for our signature:

- a tile is 2 * block_q query rows of one (sequence, query head); two *compute* warpgroups
  take block_q rows each, a third *producer* warpgroup streams K and V blocks of the kv head
  into a ring of `stages` shared-memory slots with TMA, one mbarrier per slot and direction;
- each compute warpgroup runs S = Q K^T (wgmma, f32 accumulator), the online softmax in
  registers (base-2, the row max kept in log2 units), then O += P V (wgmma);
- with `pingpong`, a two-arrival barrier makes the two compute warpgroups alternate: one's
  softmax overlaps the other's matmuls (FA3's inter-warpgroup schedule);
- persistent (the default at D <= 128): about one CTA per SM loops over the tiles, its ring
  running on across them, so the next tile's K/V (and, with q_ahead, its queries) load while
  this tile finishes; a CTA per tile paid that latency on every tile;
- split tail: when a non-causal launch's last round would leave most CTAs idle, its tiles'
  keys are split into shares over those CTAs, merged after the kernel by their log-sum-exps.

Features are the Triton kernel's: causal or not, GQA (query head h reads kv head h // group),
per-sequence `q_offset` (query t sits at position q_offset + t) and `kv_lens`, and a tanh soft
cap. A tree mask is not here: `flash_attention` keeps masked calls on the Triton kernel.

Shapes: T is padded to a multiple of 2 * block_q, S to a multiple of block_kv (padded keys are
past kv_lens; padded queries are dropped). bf16 / f16 only (wgmma), D a multiple of 64.

interpret=True runs the Mosaic GPU interpreter on CPU. It runs the three warpgroups as separate
XLA:CPU computations that block on simulated barriers, so XLA's CPU thread pool needs at least
4 threads: on a machine with fewer cores, set PJRT_NPROC (tests/conftest.py sets 8), or a
kernel can deadlock.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.flash_attention.logits import LOG2E, scale_logits
from pallas_kernels.flash_attention.reference import MASK_VALUE

COMPUTE_WGS = 2


def mosaic_gpu_available() -> bool:
    """Whether this jax has Pallas Mosaic GPU (the import is what fails on old or CPU-less wheels)."""
    try:
        import jax.experimental.pallas.mosaic_gpu  # noqa: F401
    except ImportError:
        return False
    return True


def wgmma_unsupported(dtype, head_dim: int) -> str | None:
    """Why no Hopper kernel here can take this dtype and head size on this jax, or None."""
    if dtype not in (jnp.bfloat16, jnp.float16):
        return f"dtype {dtype} (wgmma takes bf16/f16)"
    if head_dim % 64 or head_dim > 256:
        return f"head_dim {head_dim} (it needs a multiple of 64, at most 256)"
    if not mosaic_gpu_available():
        return "this jax has no Pallas Mosaic GPU"
    return None


def plgpu_module():
    """jax.experimental.pallas.mosaic_gpu, imported late: CPU-only or old jax wheels lack it."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    return plgpu


@dataclasses.dataclass(frozen=True)
class Tweaks:
    """Instruction-order options of the compute warpgroups, each off by default until measured
    (scripts/bench_flash.py --tweaks); none changes the result beyond rounding."""

    fma: bool = False  # scale the logits inside exp2's argument (one FMA), not in a pass of its own
    fence: bool = False  # an optimization barrier: the softmax is done before the ping-pong hand-off
    early_k: bool = False  # wait for the next K block while this block's P V wgmma runs
    # FA3's intra-warpgroup overlap: block j's Q K^T and block j-1's P V go out together, and
    # block j's softmax runs while that P V is still on the tensor cores (early_k is moot).
    # Slower as written on an H200 (bench_flash --overlap, a9d0cf3): 0.84-1.02x the default
    # with fma alone, 0.68-0.82x with fence too, so it stays off (benchmarks/flash_h200.md).
    overlap: bool = False


class Scratch(NamedTuple):
    """A CTA's shared memory and mbarriers (`scratch_shapes` allocates them)."""

    q: Any  # [COMPUTE_WGS, block_q, D] each compute warpgroup's query tile, then its output
    k: Any  # [stages, block_kv, D] the K ring
    v: Any  # [stages, block_kv, D] the V ring
    k_ready: Any  # [stages] a K slot's copies landed
    v_ready: Any  # [stages]
    q_ready: Any  # [COMPUTE_WGS]
    k_free: Any  # [stages] both compute warpgroups are done with a K slot
    v_free: Any  # [stages]
    sched: Any  # the ping-pong rendezvous of the two compute warpgroups
    o: Any = None  # [COMPUTE_WGS, block_q, D] output tiles, when q's tiles are loaded ahead
    lse: Any = None  # [COMPUTE_WGS, block_q] f32 row log-sum-exps, when a tile's keys are split
    # [COMPUTE_WGS, block_q, D] untiled output tiles, for a caller's `store` that copies out
    # row ranges no 8-row tile boundary aligns (the ragged kernel's valid tokens).
    stage: Any = None


def scratch_shapes(dtype, d: int, *, block_q: int, block_kv: int, stages: int,
                   copies_per_block: int = 1, interpret: bool = False, out_tiles: bool = False,
                   lse_tiles: bool = False, q_copies: int = 1, stage_tiles: bool = False):
    """`pl.run_scoped` arguments for a `Scratch` (build it with `Scratch(*refs)`; with lse_tiles
    and no out_tiles, pass o=None): tiles in the wgmma's swizzled layout; a slot's ready
    barrier completes after `copies_per_block` TMA copies (one per page when K/V are paged) and
    all their bytes, a query tile's after `q_copies`. out_tiles: separate output tiles
    (`Scratch.o`), so the next tile's queries can load while this tile's last blocks and its
    store run. lse_tiles: the rows' log-sum-exps (`Scratch.lse`) for a tile whose keys are
    split over CTAs. stage_tiles: untiled output tiles (`Scratch.stage`, after the others)."""
    plgpu = plgpu_module()
    swizzle = 128
    transforms = () if interpret else (plgpu.TilingTransform((8, swizzle // dtype.itemsize)),
                                       plgpu.SwizzleTransform(swizzle))
    ring = plgpu.Barrier(num_arrivals=copies_per_block, num_barriers=stages)
    free = plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages)
    return (
        plgpu.SMEM((COMPUTE_WGS, block_q, d), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
        plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
        ring, ring, plgpu.Barrier(num_arrivals=q_copies, num_barriers=COMPUTE_WGS), free, free,
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
    ) + ((plgpu.SMEM((COMPUTE_WGS, block_q, d), dtype, transforms=transforms),) if out_tiles
         else ()) + ((plgpu.SMEM((COMPUTE_WGS, block_q), jnp.float32),) if lse_tiles else ()
                     ) + ((plgpu.SMEM((COMPUTE_WGS, block_q, d), dtype),) if stage_tiles else ())


def block_steps(end, full_end, block_kv: int):
    """(kv blocks to read, blocks needing no mask) for rows that see keys [0, end) and whose
    every row sees at least keys [0, full_end)."""
    n = (jnp.maximum(end, 0) + block_kv - 1) // block_kv
    return n, jnp.clip(full_end // block_kv, 0, n)


def consume(scr: Scratch, q_src, o_dst, *, n_steps, n_full, cta_steps, kv_len, q_pos,
            sm_scale: float, soft_cap: float | None, block_kv: int, stages: int,
            pingpong: bool, interpret: bool, tweaks: Tweaks = Tweaks(), has_rows=None,
            base=0, setup_registers: bool = True, q_loaded: bool = False, load_next_q=None,
            kv_first=0, lse_dst=None, store=None, on_q_ready=None):
    """A compute warpgroup: loads its [block_q, D] query tile from q_src (GMEM), runs the online
    softmax over kv blocks [kv_first, n_steps) of the ring (blocks below n_full unmasked),
    hands back the slots of the blocks up to kv_first + cta_steps that only the other
    warpgroup reads, and stores the normalized output to o_dst.

    kv_first: the first key block (a share of a tile whose keys are split over CTAs); its
    blocks sit in the ring from `base` on. lse_dst: where that share's rows' log-sum-exps
    (base 2, [block_q] f32) go, for the caller's merge of the shares.

    base: the ring position of this tile's block 0 (the blocks a persistent CTA streamed for
    its earlier tiles; block j sits in slot (base + j) % stages). setup_registers=False when
    the caller, looping over tiles, has raised the register budget once already.
    q_loaded: the query tile's copy was started earlier (by the previous tile's
    `load_next_q`); only its barrier is waited for. load_next_q(): starts the next tile's query
    copy into this warpgroup's query tile; it runs right after the last Q K^T read the tile
    (which needs `Scratch.o`: the output then leaves through its own tile).

    q_pos(shape) -> int32 positions of the rows broadcast over `shape`, or None (non-causal):
    key k is visible to a row at position p when k < kv_len and k <= p.
    has_rows: a bool scalar; where false (a tile past a ragged item's tokens, with n_steps 0),
    the query tile is neither loaded nor its output stored: the caller drops those rows.
    store(out): stores the normalized [block_q, D] f32 output in the caller's way (o_dst and
    lse_dst are then unused), and has finished reading shared memory when it returns.
    on_q_ready(): runs once the query tile's copies have landed, before its first read (a
    caller that stages the rows elsewhere moves them into the tile here).
    """
    plgpu = plgpu_module()
    wg = lax.axis_index("wg")
    if setup_registers:
        set_compute_registers()

    def with_layout(x, layout):
        # The GPU interpreter evaluates layout casts through XLA:CPU, which has no rule for them;
        # layouts only matter to the compiled kernel.
        return x if interpret else plgpu.layout_cast(x, layout)

    def iota(shape, dim):
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def rendezvous():
        plgpu.barrier_arrive(scr.sched)
        plgpu.barrier_wait(scr.sched)

    q_smem = scr.q.at[wg]
    block_q, d = q_smem.shape
    def only_with_rows(f):
        return f() if has_rows is None else pl.when(has_rows)(f)

    @only_with_rows
    def _load_q():
        if not q_loaded:
            plgpu.copy_gmem_to_smem(q_src, q_smem, scr.q_ready.at[wg])
        plgpu.barrier_wait(scr.q_ready.at[wg])
        if on_q_ready is not None:
            on_q_ready()

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    m = with_layout(jnp.full((block_q,), MASK_VALUE, jnp.float32), row_layout)
    l = with_layout(jnp.zeros((block_q,), jnp.float32), row_layout)
    acc = with_layout(jnp.zeros((block_q, d), jnp.float32), plgpu.Layout.WGMMA)
    if pingpong:
        # Warpgroup 1 starts one rendezvous behind: from then on one warpgroup's softmax
        # runs while the other's matmuls hold the tensor cores.
        pl.when(wg == 1)(rendezvous)
    fma = tweaks.fma and soft_cap is None
    from_first_block = isinstance(kv_first, int) and kv_first == 0
    if tweaks.overlap and not from_first_block:
        raise ValueError("Tweaks.overlap does not take a tile's share of keys (kv_first)")
    if tweaks.early_k and not tweaks.overlap:
        # Block j's K is waited for during block j - 1's P V (wait_next_k); the first one's here.
        pl.when(n_steps > kv_first)(
            lambda: plgpu.barrier_wait(scr.k_ready.at[lax.rem(base, stages)]))

    def softmax(s, j, masked, m, l):
        """Block j's logits s [block_q, block_kv] f32 -> (p in the K/V dtype, the new row max,
        the new row sum, alpha: the factor for what was accumulated before)."""
        # fma: s stays raw; the row max is scaled instead and exp2 takes s * c - m in one FMA.
        c = sm_scale * LOG2E
        if not fma:
            s = scale_logits(s, sm_scale, soft_cap)
        if masked:
            shape = (block_q, block_kv)
            k_pos = j * block_kv + iota(shape, 1)
            visible = k_pos < kv_len
            if q_pos is not None:
                visible = visible & (k_pos <= q_pos(shape, iota))
            s = jnp.where(visible, s, MASK_VALUE)
        if fma:
            m_new = jnp.maximum(m, s.max(axis=1) * c)
            p = jnp.exp2(s * c - lax.broadcast_in_dim(m_new, s.shape, [0]))
        else:
            m_new = jnp.maximum(m, s.max(axis=1))
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        alpha = jnp.exp2(m - m_new)
        return p.astype(scr.k.dtype), m_new, l * alpha + p.sum(axis=1), alpha

    def step(j, carry, masked):
        acc, m, l = carry
        slot = lax.rem(base + j - kv_first, stages)
        if not tweaks.early_k:
            plgpu.barrier_wait(scr.k_ready.at[slot])

        def qk(s_ref):
            plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(scr.k.at[slot], (1, 0)))
            if pingpong:
                rendezvous()
            return s_ref[...]

        if interpret:
            # The interpreter (jax 0.10) has no transposed wgmma operand nor run_state: it
            # checks the pipeline, masks and softmax with plain dots of the same tiles.
            s = jnp.dot(q_smem[...], scr.k[slot].T, preferred_element_type=jnp.float32)
            if pingpong:
                rendezvous()
        else:
            s = pl.run_scoped(qk, plgpu.ACC((block_q, block_kv), jnp.float32))
        plgpu.barrier_arrive(scr.k_free.at[slot])
        if load_next_q is not None:
            pl.when(j == n_steps - 1)(load_next_q)  # this was the tile's last read of Q
        p, m_new, l, alpha = softmax(s, j, masked, m, l)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        if tweaks.fence:
            # Keep the compiler from sinking softmax work past the hand-off below, into the
            # window where the other warpgroup's matmuls should be overlapping it.
            acc, l, m_new, p = lax.optimization_barrier((acc, l, m_new, p))
        if pingpong:
            plgpu.barrier_arrive(scr.sched)  # this softmax is done
        plgpu.barrier_wait(scr.v_ready.at[slot])
        if pingpong:
            plgpu.barrier_wait(scr.sched)  # the other warpgroup's matmuls are done

        def wait_next_k():
            if tweaks.early_k:
                nxt = j + 1
                pl.when(nxt < n_steps)(lambda: plgpu.barrier_wait(
                    scr.k_ready.at[lax.rem(base + nxt - kv_first, stages)]))

        if interpret:
            acc = acc + jnp.dot(p, scr.v[slot], preferred_element_type=jnp.float32)
            wait_next_k()
        else:
            def pv(acc_ref):
                plgpu.wgmma(acc_ref, p, scr.v.at[slot])
                wait_next_k()  # while the wgmma runs

            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(scr.v_free.at[slot])
        return acc, m_new, l

    def overlapped_block(j, carry, masked, first=False, last=False):
        """Block j's Q K^T issued with block j-1's P V, then block j's softmax while that P V
        runs. first (j == 0): no P V yet. last (j == n_steps): only block j-1's P V.

        carry: (acc, m, l, p): acc holds blocks < j - 1 at the row max m of block j - 1, whose
        probabilities p [block_q, block_kv] (K/V dtype) are not yet in it."""
        acc, m, l, p_prev = carry
        slot, prev = lax.rem(base + j, stages), lax.rem(base + j - 1, stages)
        if pingpong and not first:
            plgpu.barrier_wait(scr.sched)  # the other warpgroup's matmuls are done
        if not last:
            plgpu.barrier_wait(scr.k_ready.at[slot])
        if not first:
            plgpu.barrier_wait(scr.v_ready.at[prev])
        if last:
            if interpret:
                acc = acc + jnp.dot(p_prev, scr.v[prev], preferred_element_type=jnp.float32)
            else:
                acc = pl.run_state(lambda o_ref: plgpu.wgmma(o_ref, p_prev, scr.v.at[prev]))(
                    plgpu.ACC.init(acc))
            plgpu.barrier_arrive(scr.v_free.at[prev])
            return acc, m, l, p_prev

        def after_qk(s):
            plgpu.barrier_arrive(scr.k_free.at[slot])
            p, m_new, l_new, alpha = softmax(s, j, masked, m, l)
            if tweaks.fence:
                p, m_new, l_new, alpha = lax.optimization_barrier((p, m_new, l_new, alpha))
            if pingpong:
                plgpu.barrier_arrive(scr.sched)  # this softmax is done
            return p, m_new, l_new, alpha

        if interpret:
            # Plain dots of the same tiles, in the compiled order of barrier operations.
            s = jnp.dot(q_smem[...], scr.k[slot].T, preferred_element_type=jnp.float32)
            if not first:
                acc = acc + jnp.dot(p_prev, scr.v[prev], preferred_element_type=jnp.float32)
            if pingpong:
                rendezvous()
            p, m_new, l_new, alpha = after_qk(s)
        else:
            zeros_s = with_layout(jnp.zeros((block_q, block_kv), jnp.float32),
                                  plgpu.Layout.WGMMA)

            def mma_softmax(refs):
                s_ref, o_ref, p_ref, m_ref, l_ref, a_ref = refs
                plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(scr.k.at[slot], (1, 0)))
                if not first:
                    plgpu.wgmma(o_ref, p_ref[...], scr.v.at[prev])
                if pingpong:
                    rendezvous()
                # Q K^T was issued first: with one group left in flight it is done, and the
                # softmax below overlaps the P V.
                s = plgpu.wgmma_accumulator_load(s_ref, wait_n=0 if first else 1)
                p_ref[...], m_ref[...], l_ref[...], a_ref[...] = after_qk(s)

            _, acc, p, m_new, l_new, alpha = pl.run_state(mma_softmax)(
                (plgpu.ACC.init(zeros_s), plgpu.ACC.init(acc), p_prev, m, l, m))
        if not first:
            plgpu.barrier_arrive(scr.v_free.at[prev])
        if load_next_q is not None:
            pl.when(j == n_steps - 1)(load_next_q)  # this was the tile's last read of Q
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        return acc, m_new, l_new, p

    if tweaks.overlap:
        p0 = with_layout(jnp.zeros((block_q, block_kv), scr.k.dtype), plgpu.Layout.WGMMA)
        carry = (acc, m, l, p0)
        # Block 0 (masked: whether it needs the mask is only known at run time), the unmasked
        # blocks, the masked ones, then the last P V; the 0/1-trip loops skip an empty tile.
        carry = lax.fori_loop(0, jnp.minimum(n_steps, 1), functools.partial(
            overlapped_block, masked=True, first=True), carry)
        carry = lax.fori_loop(1, jnp.maximum(n_full, 1), functools.partial(
            overlapped_block, masked=False), carry)
        carry = lax.fori_loop(jnp.maximum(n_full, 1), n_steps, functools.partial(
            overlapped_block, masked=True), carry)
        carry = lax.fori_loop(jnp.maximum(n_steps, 1), n_steps + 1, functools.partial(
            overlapped_block, masked=True, last=True), carry)
        acc, m, l, _ = carry
    else:
        carry = (acc, m, l)
        if not from_first_block:
            n_full = jnp.clip(n_full, kv_first, n_steps)
        carry = lax.fori_loop(kv_first, n_full, functools.partial(step, masked=False), carry)
        carry = lax.fori_loop(n_full, n_steps, functools.partial(step, masked=True), carry)
        acc, m, l = carry
    if load_next_q is not None:
        pl.when(n_steps <= kv_first)(load_next_q)  # rows that see no key never read Q

    @pl.loop(n_steps - kv_first, cta_steps)
    def _release(j):
        # Blocks only the other warpgroup needs: hand their slots back in step (each arrival
        # waits for the load, so this warpgroup never counts twice in one phase).
        slot = lax.rem(base + j, stages)
        plgpu.barrier_wait(scr.k_ready.at[slot])
        plgpu.barrier_arrive(scr.k_free.at[slot])
        if pingpong:
            rendezvous()
        plgpu.barrier_wait(scr.v_ready.at[slot])
        plgpu.barrier_arrive(scr.v_free.at[slot])
        if pingpong:
            rendezvous()

    if pingpong:
        pl.when(wg == 0)(rendezvous)
    l_safe = jnp.where(l == 0.0, 1.0, l)  # a row that saw no key is 0, not NaN
    out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])

    def store_lse():
        # Base 2, as m; a row that saw no key gets m itself (MASK_VALUE): no weight in a merge.
        lse_smem = scr.lse.at[wg]
        lse_smem[...] = m + jnp.log2(l_safe)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(lse_smem, lse_dst)

    @only_with_rows
    def _store():
        if store is not None:
            store(out)
            return
        if scr.o is None:
            q_smem[...] = out.astype(q_smem.dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_smem, o_dst)
            if lse_dst is not None:
                store_lse()
            plgpu.wait_smem_to_gmem(0)
            return
        # Its own output tile: the previous tile's store must only have read it, and this
        # store completes while the next tile runs (the caller waits once at the end).
        o_smem = scr.o.at[wg]
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        o_smem[...] = out.astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_dst)
        if lse_dst is not None:
            store_lse()


def set_compute_registers():
    """A compute warpgroup's register budget (it holds the S and O tiles): once per kernel."""
    plgpu_module().set_max_registers(232, action="increase")


def set_producer_registers():
    """The producer warpgroup only issues copies: it gives its registers to the compute ones."""
    plgpu_module().set_max_registers(40, action="decrease")


def produce(scr: Scratch, issue, *, cta_steps, stages: int):
    """The producer warpgroup of a CTA that serves one tile: kv blocks [0, cta_steps) into the
    ring (`stream`), then the last releases observed (`drain`)."""
    set_producer_registers()
    stream(scr, issue, base=0, count=cta_steps, stages=stages)
    drain(scr, total=cta_steps, stages=stages)


def stream(scr: Scratch, issue, *, base, count, stages: int):
    """A tile's kv blocks [0, count) into the ring at positions base + j: block j goes to slot
    (base + j) % stages. issue(j, slot, which) starts the TMA copies of block j's K (which 0)
    or V (which 1) into that slot, arriving on its ready barrier; a slot used before first
    waits for both compute warpgroups' release of it, so a persistent CTA's producer runs into
    its next tile while the compute warpgroups finish this one."""
    plgpu = plgpu_module()

    @pl.loop(0, count)
    def _stream(j):
        g = base + j
        slot = lax.rem(g, stages)
        for which, free in enumerate((scr.k_free, scr.v_free)):
            pl.when(g >= stages)(lambda free=free: plgpu.barrier_wait(free.at[slot]))
            issue(j, slot, which)


def drain(scr: Scratch, *, total, stages: int):
    """Observe the releases of the last blocks streamed (ring positions [total - stages,
    total)): every completed barrier phase is waited for once (the GPU interpreter checks it;
    on the card it costs the idle producer nothing)."""
    plgpu = plgpu_module()

    @pl.loop(jnp.maximum(total - stages, 0), total)
    def _drain(g):
        slot = lax.rem(g, stages)
        plgpu.barrier_wait(scr.k_free.at[slot])
        plgpu.barrier_wait(scr.v_free.at[slot])


def _kernel(q_off_ref, kv_len_ref, q_ref, k_ref, v_ref, o_ref, op_ref, lse_ref, scr: Scratch, *,
            sm_scale, causal, soft_cap, block_q, block_kv, stages, group, num_heads,
            num_q_tiles, num_tiles, num_ctas, num_parts, pingpong, interpret, tweaks):
    """Tiles are ranked heaviest first (query tiles from the last, which under a causal mask
    read the most keys; within one, head fastest, so CTAs running side by side share kv heads
    in L2). Rank r is query rows [tile * 2 * block_q, +2 * block_q) of head r % H of sequence
    (r // H) % B. The CTAs take the ranks in rounds of num_ctas, alternating direction (CTA c
    takes rank k * G + c in even rounds and k * G + G - 1 - c in odd ones), so under a causal
    mask every CTA's sum of tile costs comes out about equal. With num_ctas == num_tiles each
    CTA serves one tile.

    Persistent (num_ctas < num_tiles): the ring runs on across a CTA's tiles, so the producer
    loads the next tile's first K/V blocks while the compute warpgroups finish the current one
    (its last blocks, the normalization and the output store); a CTA per tile pays that
    latency, and its launch, on every tile.

    Split tail (num_parts > 1, non-causal): the last, partial round's `rem` tiles would leave
    the other CTAs idle for a whole tile. Instead each of those tiles' keys is split into
    num_parts shares of about equal blocks, CTA c taking share c % num_parts of tail tile
    c // num_parts after its full rounds. A share's normalized output goes to op_ref and its
    rows' base-2 log-sum-exps to lse_ref ([rem * num_parts, 2 * block_q] rows), for the
    caller's merge (`merge_tail`).

    q_off_ref, kv_len_ref: [B] int32 in GMEM. q_ref/o_ref: [B, T_pad, H, D]; k_ref, v_ref:
    [B, S_pad, K, D]; op_ref [rem * num_parts, 2 * block_q, D] and lse_ref: see above (None
    without a split tail).
    """
    cta = lax.axis_index("cta")
    wg = lax.axis_index("wg")
    rounds, rem = divmod(num_tiles, num_ctas)
    split = num_parts > 1
    if split:  # full rounds, then at most one share of a tail tile
        has_part = cta < rem * num_parts
        n_mine = rounds + has_part.astype(jnp.int32)
    else:
        # The last, partial round goes to the first `rem` CTAs if it runs forward, else the
        # last.
        in_last = (cta < rem) if rounds % 2 == 0 else (cta >= num_ctas - rem)
        n_mine = rounds + in_last.astype(jnp.int32)  # this CTA's tiles
    n_whole = rounds if split else n_mine  # whole tiles, walked by `one_tile`; a share follows

    def steps_of(q_first, q_off, kv_len):
        """(kv blocks, unmasked blocks) of the query rows [q_first, q_first + block_q)."""
        if causal:
            return block_steps(jnp.minimum(kv_len, q_off + q_first + block_q),
                               jnp.minimum(kv_len, q_off + q_first + 1), block_kv)
        return block_steps(kv_len, kv_len, block_kv)

    def tile_of(i):
        """(sequence, head, first query row, q_offset, kv_len, the CTA's kv blocks) of the
        CTA's i-th tile (with a split tail, i == rounds is its share's tile, whose kv blocks
        are all of the tile's: `share`)."""
        r = i * num_ctas + jnp.where(lax.rem(i, 2) == 0, cta, num_ctas - 1 - cta)
        if split:
            r = jnp.where(i < rounds, r, rounds * num_ctas + lax.div(cta, num_parts))
        b, h, tile = tile_coords(r, num_heads=num_heads, num_tiles=num_tiles,
                                 num_q_tiles=num_q_tiles)
        q_off, kv_len = q_off_ref[b], kv_len_ref[b]
        tile_first = tile * (COMPUTE_WGS * block_q)
        # The second compute warpgroup's rows are later: it reads the most blocks of the tile.
        cta_steps, _ = steps_of(tile_first + (COMPUTE_WGS - 1) * block_q, q_off, kv_len)
        return b, h, tile_first, q_off, kv_len, cta_steps

    def share(kv_len):
        """(first kv block, end block, unmasked end) of this CTA's share of its tail tile, whose
        sequence has kv_len keys (non-causal: both warpgroups read the same blocks); an empty
        range without one."""
        n, n_full = steps_of(0, 0, kv_len)
        part = lax.rem(cta, num_parts)
        lo, hi = part * n // num_parts, (part + 1) * n // num_parts
        return jnp.where(has_part, lo, 0), jnp.where(has_part, hi, 0), n_full

    @pl.when(wg < COMPUTE_WGS)
    def _compute():
        plgpu = plgpu_module()
        set_compute_registers()
        q_ahead = scr.o is not None  # each tile's queries load during the previous tile

        def rows_of(b, h, tile_first):
            return b, pl.ds(tile_first + wg * block_q, block_q), h

        def load_q(i):
            b, h, tile_first, *_ = tile_of(i)
            plgpu.copy_gmem_to_smem(q_ref.at[rows_of(b, h, tile_first)], scr.q.at[wg],
                                    scr.q_ready.at[wg])

        def one_tile(i, base):
            b, h, tile_first, q_off, kv_len, cta_steps = tile_of(i)
            q_first = tile_first + wg * block_q
            n_steps, n_full = steps_of(q_first, q_off, kv_len)
            rows = rows_of(b, h, tile_first)

            def q_pos(shape, iota):
                return q_off + q_first + iota(shape, 0)

            def load_next_q():
                pl.when(i + 1 < n_mine)(lambda: load_q(i + 1))

            consume(scr, q_ref.at[rows], o_ref.at[rows], n_steps=n_steps, n_full=n_full,
                    cta_steps=cta_steps, kv_len=kv_len, q_pos=q_pos if causal else None,
                    sm_scale=sm_scale, soft_cap=soft_cap, block_kv=block_kv, stages=stages,
                    pingpong=pingpong, interpret=interpret, tweaks=tweaks, base=base,
                    setup_registers=False, q_loaded=q_ahead,
                    load_next_q=load_next_q if q_ahead else None)
            return base + cta_steps

        if q_ahead:
            load_q(0)  # every CTA has at least one tile
        base = lax.fori_loop(0, n_whole, one_tile, jnp.int32(0))
        if split:
            b, h, tile_first, _, kv_len, _ = tile_of(rounds)
            lo, hi, n_full = share(kv_len)
            rows = pl.ds(wg * block_q, block_q)
            # Run by every CTA (a CTA without a share has no blocks, loads and stores
            # nothing), so the two warpgroups' ping-pong rendezvous stay paired.
            consume(scr, q_ref.at[rows_of(b, h, tile_first)], op_ref.at[cta, rows],
                    n_steps=hi, n_full=n_full, cta_steps=hi - lo, kv_len=kv_len, q_pos=None,
                    sm_scale=sm_scale, soft_cap=soft_cap, block_kv=block_kv, stages=stages,
                    pingpong=pingpong, interpret=interpret, tweaks=tweaks, base=base,
                    setup_registers=False, q_loaded=q_ahead, has_rows=has_part,
                    kv_first=lo, lse_dst=lse_ref.at[cta, rows])
        if q_ahead:
            plgpu.wait_smem_to_gmem(0)  # the last tile's store

    @pl.when(wg == COMPUTE_WGS)
    def _producer():
        plgpu = plgpu_module()
        set_producer_registers()

        def issue_from(b, h, first):
            """`stream`'s issue for blocks first + j of sequence b's kv head for query head h."""
            def issue(j, slot, which):
                ref, smem, ready = ((k_ref, scr.k, scr.k_ready), (v_ref, scr.v, scr.v_ready))[which]
                plgpu.copy_gmem_to_smem(
                    ref.at[b, pl.ds((first + j) * block_kv, block_kv), lax.div(h, group)],
                    smem.at[slot], ready.at[slot])
            return issue

        def one_tile(i, base):
            b, h, _, _, _, cta_steps = tile_of(i)
            stream(scr, issue_from(b, h, 0), base=base, count=cta_steps, stages=stages)
            return base + cta_steps

        total = lax.fori_loop(0, n_whole, one_tile, jnp.int32(0))
        if split:
            b, h, _, _, kv_len, _ = tile_of(rounds)
            lo, hi, _ = share(kv_len)
            stream(scr, issue_from(b, h, lo), base=total, count=hi - lo, stages=stages)
            total = total + hi - lo
        drain(scr, total=total, stages=stages)


def hopper_flash_call(q, k, v, q_offset, kv_lens, *, sm_scale: float, causal: bool,
                      soft_cap: float | None, block_q: int, block_kv: int, stages: int,
                      pingpong: bool, interpret: bool, tweaks: Tweaks = Tweaks(),
                      num_ctas: int | None = None, q_ahead: bool = False,
                      split_tail: bool = False):
    """q [B, T_pad, H, D] (T_pad % (2 * block_q) == 0), k/v [B, S_pad, K, D] (S_pad % block_kv
    == 0), q_offset/kv_lens [B] int32 -> [B, T_pad, H, D]. V rows past kv_lens must be finite
    (`flash_attention` zeroes them): a probability of 0 times NaN is NaN inside the wgmma.

    num_ctas: how many CTAs share the B * H * T_pad / (2 * block_q) tiles (persistent: about one
    per SM); None launches one CTA per tile. q_ahead: a CTA loads each tile's queries while its
    previous tile finishes, through separate output tiles in shared memory. split_tail: in a
    persistent non-causal launch whose last round is at most half full, split that round's
    tiles' keys over the CTAs (`tail_parts`) and merge the shares here."""
    bsz, t_pad, h, d = q.shape
    group = h // k.shape[2]
    num_q_tiles = t_pad // (COMPUTE_WGS * block_q)
    num_tiles = bsz * h * num_q_tiles
    num_ctas = num_tiles if num_ctas is None else max(1, min(num_ctas, num_tiles))
    num_parts = (tail_parts(num_tiles, num_ctas, k.shape[1] // block_kv)
                 if split_tail and not causal else 1)
    kernel = functools.partial(
        _kernel, sm_scale=sm_scale, causal=causal, soft_cap=soft_cap, block_q=block_q,
        block_kv=block_kv, stages=stages, group=group, num_heads=h, num_q_tiles=num_q_tiles,
        num_tiles=num_tiles, num_ctas=num_ctas, num_parts=num_parts, pingpong=pingpong,
        interpret=interpret, tweaks=tweaks)
    split = num_parts > 1
    scratch = scratch_shapes(q.dtype, d, block_q=block_q, block_kv=block_kv, stages=stages,
                             interpret=interpret, out_tiles=q_ahead, lse_tiles=split)
    out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype)]
    if split:
        shares = (num_tiles % num_ctas) * num_parts
        out_type += [jax.ShapeDtypeStruct((shares, COMPUTE_WGS * block_q, d), q.dtype),
                     jax.ShapeDtypeStruct((shares, COMPUTE_WGS * block_q), jnp.float32)]

    def entry(q_off_ref, kv_len_ref, q_ref, k_ref, v_ref, o_ref, op_ref=None, lse_ref=None):
        def body(*refs):
            scr = Scratch(*refs[:9], o=refs[9] if q_ahead else None,
                          lse=refs[-1] if split else None)
            kernel(q_off_ref, kv_len_ref, q_ref, k_ref, v_ref, o_ref, op_ref, lse_ref, scr)

        pl.run_scoped(body, *scratch, collective_axes="wg")

    outs = launch(entry, tuple(out_type) if split else out_type[0], grid=(num_ctas,),
                  grid_names=("cta",), interpret=interpret)(q_offset, kv_lens, q, k, v)
    if not split:
        return outs
    return merge_tail(*outs, num_ctas=num_ctas, num_parts=num_parts, num_q_tiles=num_q_tiles)


# The fewest key blocks a share of a split tile gets: each share pays a query load, an output
# and lse store and its part of the merge. On an H200 (flash_h200.md run 10) one-block shares
# (D128 T4096, 32 blocks in 32 shares) read 0.98x no split, ~4-block shares (T16384) 1.02x;
# with this floor (run 11) D128 non-causal T4096/8192/16384 read 1.05/1.02/1.01x no split.
MIN_SHARE_BLOCKS = 4


def tail_parts(num_tiles: int, num_ctas: int, max_blocks: int) -> int:
    """Shares per tile of a persistent launch's last round (1: no split). The round's `rem`
    tiles would hold one CTA each for a whole tile while the others idle (4 of 132 CTAs at
    issue 17's long non-causal points: ~3% of the kernel); split into p >= 2 shares of their
    keys, rem * p CTAs finish it in about 1 / p of a tile. Not for a first round (nothing to
    hide the merge behind), nor shares below MIN_SHARE_BLOCKS blocks."""
    rounds, rem = divmod(num_tiles, num_ctas)
    if not rem or not rounds:
        return 1
    p = min(num_ctas // rem, max_blocks // MIN_SHARE_BLOCKS)
    return p if p >= 2 else 1


def tile_coords(r, *, num_heads: int, num_tiles: int, num_q_tiles: int):
    """Tile rank(s) r (int32) -> (sequence, head, query tile): the kernel's order, query tiles
    from the last (heaviest under a causal mask) and, within one, head fastest. One mapping
    for the kernel's CTAs and for `merge_tail`'s placement of the split tiles."""
    seq_heads = num_tiles // num_q_tiles  # B * H
    tile = num_q_tiles - 1 - lax.div(r, seq_heads)
    return (lax.rem(lax.div(r, num_heads), seq_heads // num_heads), lax.rem(r, num_heads), tile)


def merge_tail(out, o_parts, lse_parts, *, num_ctas: int, num_parts: int, num_q_tiles: int):
    """out [B, T_pad, H, D] with the tail tiles unwritten; o_parts [rem * p, 2 * block_q, D]
    each share's normalized rows, lse_parts [rem * p, 2 * block_q] their base-2 log-sum-exps
    -> out with the tail tiles' rows merged in (the flash-decoding combine, in f32)."""
    bsz, _, h, d = out.shape
    num_tiles = bsz * h * num_q_tiles
    rounds, rem = divmod(num_tiles, num_ctas)
    rows = o_parts.shape[1]
    lse = lse_parts.reshape(rem, num_parts, rows)
    w = jnp.exp2(lse - lse.max(axis=1, keepdims=True))  # [rem, p, rows]
    o = o_parts.reshape(rem, num_parts, rows, d).astype(jnp.float32)
    merged = (w[..., None] * o).sum(axis=1) / w.sum(axis=1)[..., None]  # [rem, rows, D]
    # The tail tiles' (sequence, head, rows): the ranks after the full rounds.
    b, hh, tile = tile_coords(jnp.arange(rounds * num_ctas, num_tiles, dtype=jnp.int32),
                              num_heads=h, num_tiles=num_tiles, num_q_tiles=num_q_tiles)
    t = tile[:, None] * rows + jnp.arange(rows)[None, :]  # [rem, rows]
    return out.at[b[:, None], t, hh[:, None]].set(merged.astype(out.dtype))


def launch(entry, out_type, *, grid, grid_names, interpret: bool):
    """`plgpu.kernel` with two compute warpgroups plus the producer, in the GPU interpreter
    when asked."""
    plgpu = plgpu_module()
    kw = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        kw["interpret"] = InterpretGPUParams()
    return plgpu.kernel(
        entry,
        out_type=out_type,
        grid=grid,
        grid_names=grid_names,
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        **kw,
    )
