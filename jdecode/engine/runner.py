"""Model runner: packs a scheduled step into fixed-size device arrays and runs one jitted step.

The flat token axis is padded to a few buckets and the sequence axis to max_num_seqs, so a new
mix of prefill chunks and decodes never recompiles (vLLM v1's unified batch). Each bucket
compiles at most twice: for all-greedy steps and for steps where some request samples; and with
multi-step scheduling, the buckets of all-decode steps once more for each.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.cache.paged import (
    IMPLS,
    PagedKVCache,
    PagedMeta,
    copy_pages,
    decode_layout,
    init_paged_cache,
    make_paged_attend,
)
from jdecode.config import ModelConfig
from jdecode.decoding.sampling import SamplingArrays, SamplingParams, sample
from jdecode.engine import transfer
from jdecode.engine.scheduler import SchedulerOutput
from jdecode.model.compile_options import step_compiler_options
from jdecode.model.fused_decode import (
    fused_paged_decode_step,
    fused_paged_reason,
    fused_paged_rows,
    wants_decode_copies,
    with_decode_copies,
)
from jdecode.model.layout import inference_layout
from jdecode.model.params import Params
from jdecode.model.transformer import forward

# Incremented at trace time only: a test proves that new batch mixes do not retrace.
TRACE_COUNTS: collections.Counter = collections.Counter()
MIN_TOKEN_BUCKET = 16
# Narrowest block table (tokens) of an XLA step: the gather's cost follows the width, and a
# table of a few pages costs little next to the rest of the step.
MIN_KV_BUCKET_TOKENS = 64
MAX_LOGPROBS = 20  # OpenAI's limit for top logprobs
# Row counts of a decode-only step under the fused kernels' limit (`ModelRunner.decode_buckets`).
DECODE_BUCKETS = (1, 2, 4, 8, 16, 32)


def token_buckets(max_num_batched_tokens: int, sizes: tuple[int, ...] = ()
                  ) -> tuple[int, ...]:
    """Padded token counts of a step: `sizes` (default powers of two from MIN_TOKEN_BUCKET) below
    the budget, then the budget itself. Each bucket is one executable to compile.
    """
    if not sizes:
        sizes, b = [], MIN_TOKEN_BUCKET
        while b < max_num_batched_tokens:
            sizes.append(b)
            b *= 2
    if any(b <= 0 for b in sizes):
        raise ValueError(f"token buckets {sizes} must be positive")
    return (*sorted({b for b in sizes if b < max_num_batched_tokens}), max_num_batched_tokens)


def kv_buckets(max_pages: int, page_size: int, impl: str) -> tuple[int, ...]:
    """Block-table widths (pages) a step may be padded to; each is one more executable.

    The XLA attention gathers every page of the table, so its cost follows the table's width,
    not the context: with 4096-token tables the CPU engine took 25-37x the Generator's time per
    token, and 1.4x with these widths (benchmarks/engine_latency_cpu.md). Its steps get the
    narrowest power of two (from MIN_KV_BUCKET_TOKENS) that holds their longest context. The
    Pallas kernel reads only the pages within the context, so the width costs it nothing and
    one executable serves.
    """
    if impl == "pallas":
        return (max_pages,)
    widths, w = [], max(1, MIN_KV_BUCKET_TOKENS // page_size)
    while w < max_pages:
        widths.append(w)
        w *= 2
    return (*widths, max_pages)


def resolve_impl(impl: str) -> str:
    """Resolves "auto": the Pallas kernels on GPU, XLA elsewhere (they would be interpreted)."""
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: choose auto, {', '.join(IMPLS)}")
    return impl


def resolve_layout(layout: str) -> str:
    """Resolves "auto": the inference layout on GPU, stacked elsewhere (faster compiles)."""
    if layout == "auto":
        layout = "inference" if jax.default_backend() == "gpu" else "stacked"
    if layout not in ("inference", "stacked"):
        raise ValueError(f"layout={layout!r}: choose auto, inference or stacked")
    return layout


@dataclasses.dataclass
class InFlightStep:
    """A dispatched step: its plan and its device outputs, not yet read back."""

    out: SchedulerOutput
    sampled: jax.Array  # [W, B] int32: row j < chunk.steps is a row's j-th sample
    logprobs: tuple | None  # device (chosen [S, B], top ids [S, B, k], top values), or None
    num_logprobs: dict[str, int]


@dataclasses.dataclass
class StepResult:
    """Per sampled chunk: its tokens (`chunk.steps` of them), and their logprobs when asked."""

    tokens: dict[str, list[int]]
    # Per token: chosen, top ids, top values.
    logprobs: dict[str, list[tuple[float, list[int], list[float]]]]


def _forward_sample(params: Params, cache: PagedKVCache, tokens, positions, meta: PagedMeta,
                    logits_at, sp: SamplingArrays, seeds, indices, counters, seen, *,
                    cfg: ModelConfig, impl: str, num_logprobs: int):
    """One forward over the flat tokens, and one sample per sequence slot given: S slots,
    which `_step` cuts to those that can hold a chunk.

    Returns sampled [S] int32, logprobs (chosen [S], top ids [S, k], top values [S, k]) or
    None, the cache, and `seen` with each row's input token marked.
    """
    if seen is not None:  # each row's last token may have been in flight: mark it here
        seen = seen.at[jnp.arange(seen.shape[0]), tokens[logits_at]].set(True)
    if impl == "pallas" and fused_paged_reason(params, cache, meta, cfg,
                                               tokens.shape[0]) is None:
        # A decode-only step of a few rows (the runner's `decode_buckets`): the fused kernels.
        logits, cache = fused_paged_decode_step(params, cache, tokens, positions, meta, cfg=cfg)
        logits = logits[logits_at]  # [B, V] f32: slot b's row (empty slots read row 0)
    else:
        logits, _, cache = forward(params, tokens[None], positions[None], cache, meta, cfg=cfg,
                                   attend=make_paged_attend(impl), logits_at=logits_at[None])
        logits = logits[0]  # [B, V] f32

    def key(seed, index, count):
        return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), count)

    keys = jax.vmap(key)(seeds, indices, counters)
    sampled = sample(logits, sp, keys, seen)  # [B]
    logprobs = None
    if num_logprobs:
        lp = jax.nn.log_softmax(logits, axis=-1)  # raw model distribution, as vLLM reports
        chosen = jnp.take_along_axis(lp, sampled[:, None], axis=-1)[:, 0]
        top_vals, top_ids = jax.lax.top_k(lp, num_logprobs)
        logprobs = (chosen, top_ids, top_vals)
    return sampled, logprobs, cache, seen


def _step(params: Params, cache: PagedKVCache, prev_burst, tokens, token_src, positions,
          meta: PagedMeta, logits_at, sp: SamplingArrays, seeds, indices, counters, seen, steps,
          *, cfg: ModelConfig, impl: str, num_logprobs: int, num_steps: int):
    """One engine step on device: one forward, or `num_steps` decodes of a decode-only batch.

    Args:
      prev_burst: [W, B] int32 the previous step's samples per row, the row's last sample
        repeated past its count (W = the runner's num_scheduler_steps).
      tokens, positions: [N] int32 flat tokens (padding: token 0, slot -1).
      token_src: [N] int32: -1, or the row of `prev_burst` whose last sample is this token (a
        token still in flight when the step was planned; its host entry in `tokens` is 0).
      meta: the ragged batch over B sequence slots. logits_at: [B] flat row of each slot's
        last token. (Copy-on-write page copies run before, in a call of their own:
        `ModelRunner.apply_copies`.)
      sp: [B] sampling parameters. seeds, indices, counters: [B] uint32/int32 key material
        (counters: the output index of each row's first sample).
      seen: [B, V] bool or None (repetition penalty), without the tokens still in flight: all
        of `prev_burst`'s row for a slot whose input token is in flight.
      steps: None (one forward), or [B] int32 decodes per row (0 = empty slot) when the batch
        is decodes only, slot b's token in row b (`PagedMeta.decodes_only`'s layout).
    Returns:
      this step's burst [W, B] (rows past num_steps repeat the last), logprobs stacked
      [num_steps, B, ...] or None, and the cache (donated by the caller, so written in place).
    """
    TRACE_COUNTS["step"] += 1
    width, b = prev_burst.shape
    n = tokens.shape[0]
    tokens = jnp.where(token_src >= 0, prev_burst[-1, jnp.maximum(token_src, 0)], tokens)
    # Only the first S = min(N, B) slots can hold a chunk: chunks take slots 0..C-1 in order
    # (`ModelRunner.pack`) and each has a token. The LM head, the sampler (a sort of [rows, V]
    # when a row samples) and the logprobs run on those S rows, not on all max_num_seqs slots:
    # a one-request decode step of a 256-slot engine sorted 256 x V logits to use one row.
    s = min(n, b)
    logits_at, seeds, indices, counters = (x[:s] for x in (logits_at, seeds, indices, counters))
    sp = jax.tree.map(lambda x: x[:s], sp)
    seen = None if seen is None else seen[:s]

    def to_slots(x):  # [S, ...] per live slot -> [B, ...] (the rest zero)
        return jnp.zeros((b, *x.shape[1:]), x.dtype).at[:s].set(x)

    if seen is not None:  # the in-flight samples the host could not mark
        src = token_src[logits_at]  # [S]
        burst = prev_burst[:, jnp.maximum(src, 0)].T  # [S, W]
        vocab = seen.shape[1]  # out of range: dropped
        seen = seen.at[jnp.arange(s)[:, None], jnp.where(src[:, None] >= 0, burst, vocab)
                       ].set(True, mode="drop")
    run = functools.partial(_forward_sample, params, sp=sp, seeds=seeds, indices=indices,
                            logits_at=logits_at, cfg=cfg, impl=impl, num_logprobs=num_logprobs)
    if steps is None:
        sampled, logprobs, cache, _ = run(cache, tokens, positions, meta, counters=counters,
                                          seen=seen)
        logprobs = None if logprobs is None else jax.tree.map(
            lambda x: to_slots(x)[None], logprobs)
        return jnp.broadcast_to(to_slots(sampled), (width, b)), logprobs, cache

    page_size = cache.page_size
    steps = steps[:s]
    live = steps > 0  # [S]

    def token_rows(x):  # [S] per slot -> [N] per flat row (slot b's token is row b)
        return jnp.zeros(n, x.dtype).at[jnp.arange(s)].set(x)

    def decode(carry, j):
        cache, toks, seen, last = carry
        # A row past its count recomputes its last position without writing it (slot -1).
        active = j < steps  # [S]
        advance = jnp.where(live, jnp.minimum(j, steps - 1), 0)  # [S]
        pos = positions + token_rows(advance)  # [N]
        page = meta.block_tables[jnp.minimum(jnp.arange(n), b - 1), pos // page_size]  # [N]
        slots = jnp.where(token_rows(active), page * page_size + pos % page_size, -1)
        m = meta.replace(slot_mapping=slots, context_lens=meta.context_lens + to_slots(advance))
        sampled, logprobs, cache, seen = run(cache, toks, pos, m, counters=counters + j,
                                             seen=seen)
        # Each live row's sample is its next input token; out of range (n) drops the rest.
        toks = toks.at[jnp.where(live, logits_at, n)].set(sampled, mode="drop")
        last = jnp.where(active, sampled, last)
        return (cache, toks, seen, last), (last, logprobs)

    (cache, _, _, last), (burst, logprobs) = jax.lax.scan(
        decode, (cache, tokens, seen, prev_burst[-1, :s]), jnp.arange(num_steps))
    burst = jnp.concatenate([burst, jnp.broadcast_to(last, (width - num_steps, s))])
    burst = jnp.zeros((width, b), burst.dtype).at[:, :s].set(burst)  # [W, B]
    if logprobs is not None:  # [num_steps, S, ...] -> [num_steps, B, ...]
        logprobs = jax.tree.map(lambda x: jax.vmap(to_slots)(x), logprobs)
    return burst, logprobs, cache


def _packed_step(params: Params, cache: PagedKVCache, prev_burst, blobs, *,
                 spec: transfer.PackSpec, cfg: ModelConfig, impl: str, num_logprobs: int,
                 num_steps: int):
    """`_step` over its host inputs packed into one or two buffers (`transfer.pack`)."""
    return _step(params, cache, prev_burst, *transfer.unpack(blobs, spec), cfg=cfg,
                 impl=impl, num_logprobs=num_logprobs, num_steps=num_steps)


@functools.cache
def _step_jit_with(options: tuple[tuple[str, object], ...]):
    """The jitted step whose executables compile with these XLA options (sorted (name, value)
    pairs, `ModelRunner.step_options`). One jit per set of options for every runner: engines
    with equal shapes (tests, benchmarks) share executables. The cache (argument 1) is
    donated: XLA updates the pool in place instead of copying it."""
    return jax.jit(_packed_step, donate_argnums=(1,), compiler_options=dict(options) or None,
                   static_argnames=("spec", "cfg", "impl", "num_logprobs", "num_steps"))


_step_jit = _step_jit_with(())  # XLA's own choices: every step but the wide decode-only ones
# Copy-on-write in a call of its own, only for the steps that have copies (forks writing
# into a shared partial page): inside the step it cost every step a gather of [L, B] pages
# and two scatters that dropped them (3 kernels, ~12 MB for SmolLM2's pool at 32 slots).
_copy_jit = jax.jit(copy_pages, donate_argnums=(0,))


class ModelRunner:
    """Owns the device state (params, page pool) and the jitted step.

    Args:
      cfg: model config. params: its parameters. num_pages, page_size: the pool.
      max_num_seqs: sequence slots per step. max_num_batched_tokens: token budget per step.
      max_model_len: longest sequence (the widest block table). impl: attention impl, or
        "auto" (`resolve_impl`).
      layout: "inference" (fused projections, unrolled layers: ~2x faster decode on the H100,
        benchmarks/decode.md; compile time grows with depth), "stacked" (`lax.scan`), or
        "auto" (inference on GPU). token_bucket_sizes: see `token_buckets`.
      num_scheduler_steps: most decodes a step may run (`SchedulerConfig`).
    """

    def __init__(self, cfg: ModelConfig, params: Params, *, num_pages: int, page_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int,
                 impl: str = "auto", layout: str = "auto",
                 token_bucket_sizes: tuple[int, ...] = (), num_scheduler_steps: int = 1) -> None:
        if cfg.sliding_window is not None:
            raise ValueError(f"sliding_window={cfg.sliding_window}: the paged engine does not "
                             "implement sliding-window attention; use `jdecode generate`")
        layout, impl = resolve_layout(layout), resolve_impl(impl)
        # A no-op on params already in the inference layout (engines can share one copy).
        params = inference_layout(params) if layout == "inference" else params
        if impl == "pallas" and layout == "inference" and wants_decode_copies(params):
            # The fused decode step's [N, K] weight copies, as the Generator adds them.
            params = with_decode_copies(params)
        self.params = params
        self.cfg = cfg
        self.page_size, self.max_num_seqs = page_size, max_num_seqs
        self.max_pages = -(-max_model_len // page_size)
        self.buckets = token_buckets(max_num_batched_tokens, token_bucket_sizes)
        # Decode-only steps of as many rows as the fused kernels take here (5 by default on
        # the GPU, `fused_paged_rows`) run them (`fused_paged_decode_step`) and get buckets of
        # their own, powers of two up to that count: the kernels' cost follows the rows,
        # where the general path pads to the 16-token bucket at least.
        rows = fused_paged_rows(self.params, cfg, page_size, cfg.dtype, max_num_seqs) \
            if impl == "pallas" else 0
        self.decode_buckets = token_buckets(rows, DECODE_BUCKETS) if rows else ()
        self.kv_buckets = kv_buckets(self.max_pages, page_size, impl)
        self.cache = init_paged_cache(cfg, num_pages, page_size)
        # [W, B] the last step's samples per row (`_step`'s burst).
        self.last_burst = jnp.zeros((num_scheduler_steps, max_num_seqs), jnp.int32)
        self.impl = impl
        self.backend = jax.default_backend()  # `step_options` decides by it
        # The last step's sampling rows: (its SamplingParams, their arrays, any penalty).
        self._sampling: tuple[list, SamplingArrays | None, bool] = ([], None, False)

    def bucket(self, num_tokens: int, decodes_only: bool = False) -> int:
        """The step's padded token count: a decode bucket for a decode-only step that the
        fused kernels take, else the smallest token bucket that holds it."""
        if decodes_only and self.decode_buckets and num_tokens <= self.decode_buckets[-1]:
            return next(b for b in self.decode_buckets if b >= num_tokens)
        return next(b for b in self.buckets if b >= num_tokens)

    def step_options(self, out: SchedulerOutput) -> tuple[tuple[str, object], ...]:
        """XLA options of the executable that runs `out` (`launch`'s `options`): a decode-only
        step is a decode step of its bucket's rows, compiled as the Generator compiles its loop
        at that many rows (`compile_options.step_compiler_options`: cuBLAS GEMMs from 64 rows
        on the GPU). A step with a prefill chunk keeps XLA's choices: its GEMMs have the
        chunk's rows, where the two were not compared."""
        if out.num_batched_tokens != len(out.chunks):
            return ()
        rows = self.bucket(out.num_batched_tokens, decodes_only=True)
        return tuple(sorted(step_compiler_options(rows, self.backend).items()))

    def pack(self, out: SchedulerOutput, page_tables: dict[str, Sequence[int]]) -> dict:
        """Host arrays for one step (numpy), padded to the token bucket, the block-table width
        bucket and max_num_seqs."""
        ps, B = self.page_size, self.max_num_seqs
        # Each chunk has a token at least: as many tokens as chunks means decodes alone.
        n = self.bucket(out.num_batched_tokens, out.num_batched_tokens == len(out.chunks))
        tokens = np.zeros(n, np.int32)
        positions = np.zeros(n, np.int32)
        slots = np.full(n, -1, np.int32)
        context_lens = np.zeros(B, np.int32)
        qsl = np.zeros(B + 1, np.int32)
        logits_at = np.zeros(B, np.int32)
        chunks = out.chunks
        c = len(chunks)
        # Keys of the longest context, after a multi-step row's last decode.
        longest = max(ch.start + ch.num_tokens + ch.steps - 1 for ch in chunks)
        width = next(w for w in self.kv_buckets if w * ps >= longest)
        tables = np.zeros((B, width), np.int32)  # [B, width] pages past a context are unread
        # Per-chunk Python work is kept to list building; the per-token arithmetic is numpy
        # (at 64 decodes per step, per-chunk numpy calls cost more than the H100's step).
        starts = np.fromiter((ch.start for ch in chunks), np.int32, c)  # [C]
        lens = np.fromiter((ch.num_tokens for ch in chunks), np.int32, c)  # [C]
        total = int(lens.sum())
        qsl[1:c + 1] = np.cumsum(lens)
        qsl[c + 1:] = total  # empty slots: zero-length query ranges
        context_lens[:c] = starts + lens
        logits_at[:c] = qsl[1:c + 1] - 1
        owner = np.repeat(np.arange(c), lens)  # [T] chunk of each flat token
        pos = np.arange(total, dtype=np.int32) - np.repeat(qsl[:c] - starts, lens)  # [T]
        positions[:total] = pos
        # A chunk whose token is still in flight is a one-token decode: the device fills it in.
        src = np.fromiter((ch.token_src for ch in chunks), np.int32, c)  # [C]
        in_flight = src >= 0
        token_src = np.full(n, -1, np.int32)
        token_src[qsl[:c][in_flight]] = src[in_flight]
        tokens[:total][np.repeat(~in_flight, lens)] = [
            t for ch in chunks if ch.token_src < 0
            for t in ch.request.all_token_ids[ch.start:ch.start + ch.num_tokens]]
        for b, ch in enumerate(chunks):
            pages = page_tables[ch.request.request_id][:width]
            tables[b, :len(pages)] = pages
        slots[:total] = tables[owner, pos // ps] * ps + pos % ps
        return {"tokens": tokens, "token_src": token_src, "positions": positions,
                    # Chunks sit in rows in slot order, so a step of one-token chunks has
                    # the layout decodes_only promises.
                    "meta": PagedMeta(slots, tables, context_lens, qsl,
                                      **self.decode_layout(chunks, lens)),
                    "logits_at": logits_at}

    def decode_layout(self, chunks, lens: np.ndarray) -> dict[str, bool]:
        """PagedMeta's static layout facts for a step's chunks ([C] token counts `lens`):
        decodes only, or a chunk beside decodes short enough to share its launch. Only the
        kernels read them (each value is its own executable per bucket), so the XLA path
        compiles once."""
        if self.impl != "pallas":
            return {}
        # Keys of a one-token row's context after its last step (a multi-step row's too).
        longest = max((ch.start + ch.steps for ch in chunks if ch.num_tokens == 1), default=0)
        return decode_layout(bool((lens == 1).all()), longest)

    def step_inputs(self, out: SchedulerOutput, page_tables: dict[str, Sequence[int]],
                    num_logprobs: dict[str, int] | None = None) -> tuple[transfer.Packed, int]:
        """Host arguments of one step, packed for one transfer, and how many top logprobs it
        returns."""
        B = self.max_num_seqs
        arrays = self.pack(out, page_tables)
        params_list: list[SamplingParams] = [c.request.sampling_params for c in out.chunks]
        last, sp, penalized = self._sampling
        # Rows of the same requests in the same order (every decode step of a steady batch)
        # have the same arrays: stacking 64 rows' parameters cost ~27 us a step.
        if len(last) != len(params_list) or any(a is not b for a, b in zip(last, params_list)):
            # Decided here, not by a lax.cond in the step: on XLA:GPU a cond waits for its
            # predicate on the host, which would block the launch until the forward is done
            # and leave nothing for async scheduling to overlap.
            sp = SamplingArrays.from_params(params_list, B, specialize_greedy=True)
            penalized = any(p.repetition_penalty != 1.0 for p in params_list)
            self._sampling = (params_list, sp, penalized)
        reqs = [c.request for c in out.chunks]
        c = len(reqs)
        seeds = np.zeros(B, np.uint32)
        indices = np.zeros(B, np.int32)
        counters = np.zeros(B, np.int32)
        # One slice per array: numpy's per-element stores took 2x as long (64 rows: 16 us).
        seeds[:c] = [r.seed for r in reqs]
        indices[:c] = [r.index for r in reqs]
        counters[:c] = [ch.output_index for ch in out.chunks]
        seen = None
        if penalized:
            seen = np.zeros((B, self.cfg.vocab_size), bool)
            for b, r in enumerate(reqs):
                seen[b, r.all_token_ids] = True
        want_lp = num_logprobs and any(num_logprobs.get(r.request_id) is not None for r in reqs)
        steps = None
        if out.num_steps > 1:
            steps = np.zeros(B, np.int32)
            steps[:len(out.chunks)] = [c.steps for c in out.chunks]
        inputs = (arrays["tokens"], arrays["token_src"], arrays["positions"], arrays["meta"],
                  arrays["logits_at"], sp, seeds, indices, counters, seen, steps)
        return transfer.pack(inputs), MAX_LOGPROBS if want_lp else 0

    def launch(self, inputs: transfer.Packed, num_logprobs: int = 0, num_steps: int = 1,
               options: tuple[tuple[str, object], ...] = ()) -> tuple:
        """Dispatches the jitted step (asynchronously); returns device (samples [W, B],
        logprobs). num_steps: decodes of a multi-step plan (`SchedulerOutput.num_steps`).
        options: the step's XLA options (`step_options` of its plan)."""
        if num_steps > self.last_burst.shape[0]:
            raise ValueError(f"num_steps={num_steps} exceeds this runner's "
                             f"num_scheduler_steps={self.last_burst.shape[0]}")
        self.last_burst, logprobs, self.cache = _step_jit_with(options)(
            self.params, self.cache, self.last_burst, inputs.blobs, spec=inputs.spec,
            cfg=self.cfg, impl=self.impl, num_logprobs=num_logprobs, num_steps=num_steps)
        return self.last_burst, logprobs

    def apply_copies(self, copies: list[tuple[int, int]]) -> None:
        """Dispatches copy-on-write page copies (src, dst), at most max_num_seqs of them (the
        scheduler plans one per sequence at most), padded to that many: one executable."""
        B = self.max_num_seqs
        if len(copies) > B:
            raise ValueError(f"{len(copies)} page copies in one step: at most max_num_seqs={B}")
        pairs = np.full((2, B), -1, np.int32)
        if copies:
            pairs[:, :len(copies)] = np.asarray(copies, np.int32).T
        self.cache = _copy_jit(self.cache, pairs[0], pairs[1])

    def dispatch(self, out: SchedulerOutput, page_tables: dict[str, Sequence[int]],
                 num_logprobs: dict[str, int] | None = None) -> InFlightStep:
        """Packs and dispatches a planned step (after its page copies, if any) without
        waiting for it."""
        if out.page_copies:
            self.apply_copies(out.page_copies)
        sampled, logprobs = self.launch(*self.step_inputs(out, page_tables, num_logprobs),
                                        num_steps=out.num_steps, options=self.step_options(out))
        return InFlightStep(out, sampled, logprobs, num_logprobs or {})

    @staticmethod
    def collect(step: InFlightStep) -> StepResult:
        """Waits for a dispatched step; returns the tokens sampled for every chunk that samples."""
        sampled = np.asarray(step.sampled)  # [W, B]
        logprobs = None if step.logprobs is None else [np.asarray(x) for x in step.logprobs]
        result = StepResult({}, {})
        for b, chunk in enumerate(step.out.chunks):
            if not chunk.samples:
                continue
            rid = chunk.request.request_id
            result.tokens[rid] = sampled[:chunk.steps, b].tolist()
            k = step.num_logprobs.get(rid)
            if logprobs is not None and k is not None:
                chosen, top_ids, top_vals = logprobs
                result.logprobs[rid] = [
                    (float(chosen[j, b]), top_ids[j, b, :k].tolist(), top_vals[j, b, :k].tolist())
                    for j in range(chunk.steps)]
        return result
