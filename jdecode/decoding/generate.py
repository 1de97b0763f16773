"""Host-side generation: tokenize, bucket, run the jitted loop in chunks, detokenize.

Shapes are bucketed (prompt length and batch to powers of two, prompts past 1024 tokens to a
multiple of 1024, cache length to a multiple of 256) so a new request of a familiar size reuses
the compiled executables.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.decoding import methods
from jdecode.decoding.base import Decoder
from jdecode.decoding.loop import LoopState, init_loop, run_loop
from jdecode.decoding.sampling import SamplingArrays, SamplingParams, stop_prefix_len
from jdecode.io.registry import Model
from jdecode.io.tokenizer import IncrementalDetokenizer
from jdecode.model.attention import resolve_impl
from jdecode.model.compile_options import step_compiler_options
from jdecode.model.fused_decode import wants_decode_copies, with_decode_copies
from jdecode.model.layout import inference_layout
from jdecode.model.params import Params

MIN_PROMPT_BUCKET = 16
# Past this length prompt buckets grow in steps of it, not to the next power of two: a
# 2049-token prompt pads to 3072, not 4096 (prefill cost grows faster than linearly in T).
LONG_PROMPT_STEP = 1024
CACHE_ROUND = 256
# While a prefill runs, `stream(on_prefill=...)` is told the elapsed time this often.
PREFILL_POLL_S = 0.25
GREEDY = SamplingParams()  # the default: greedy, 64 new tokens
# Steps per fixed-trip-count group of the decode loop (run_loop's `block`): measured on the
# H100 in benchmarks/decode.md.
LOOP_BLOCK = 4


def compile_loop(jitted, batch: int, *args):
    """`jitted` (a jax.jit of a decode loop over `batch` rows) lowered for args and compiled
    with `compile_options.step_compiler_options` for this backend: the Generator's loop, and
    the benchmarks' loops that time the same step."""
    return jitted.lower(*args).compile(
        compiler_options=step_compiler_options(batch, jax.default_backend()))


STREAM_INTERVAL_S = 0.05
"""`stream` grows its chunks (doubling from `chunk_steps`) until one takes about this long:
every chunk is a call of the loop executable, and on the GPU that call waits for its while
loop's predicate reads, so the host's share of a chunk (its ~300 parameter buffers'
dispatch, the state's transfer, the text) leaves the device idle: ~1.4 ms a chunk on an H100,
a 135M step's 0.5 ms almost three times over at 8 steps a chunk. 20 updates a second reads as
smooth text; the first chunks stay small so the first words show at once."""


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def prompt_bucket(n: int) -> int:
    """The padded prompt length for n tokens: a power of two up to LONG_PROMPT_STEP, then a
    multiple of it."""
    if n <= LONG_PROMPT_STEP:
        return next_pow2(n, MIN_PROMPT_BUCKET)
    return -(-n // LONG_PROMPT_STEP) * LONG_PROMPT_STEP


@dataclasses.dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (eos / stop id / stop string) or "length"
    stats: dict


@dataclasses.dataclass
class _Compiled:
    init: Callable
    loop: Callable
    compile_s: float


def _tokens_to_stop(tokenizer, toks: list[int], stops: tuple[str, ...]) -> int:
    """The fewest leading tokens whose text contains a stop string (as vLLM reports them)."""
    for j in range(1, len(toks) + 1):
        text = tokenizer.decode(toks[:j])
        if any(stop in text for stop in stops):
            return j
    return len(toks)


def wait_reporting(x: jax.Array, report: Callable[[float], None]) -> None:
    """Waits for x, calling report(elapsed_s) every PREFILL_POLL_S until it is ready."""
    done = threading.Event()

    def wait():
        try:
            x.block_until_ready()
        finally:  # an error is raised again by the caller's own block_until_ready
            done.set()

    threading.Thread(target=wait, daemon=True).start()
    t0 = time.perf_counter()
    while not done.wait(PREFILL_POLL_S):
        report(time.perf_counter() - t0)


class Generator:
    """Generates with any decoding method; caches one executable pair per shape bucket.

    Args:
      model: a loaded `Model`. method, options: a registered method by name
        (`jdecode.decoding.methods`; `jdecode methods` lists them) and its options (a mapping
        or the method's options dataclass). decoder_fn(cfg, max_len) -> Decoder: a decoder
        factory given directly instead of a method (for decoders under development).
      impl: attention implementation: "xla", "pallas" or "auto" (Pallas on GPU, XLA on CPU,
        where the kernels would run in the interpreter). max_seq_len: cache slots per sequence
        (default: the model's max_position_embeddings). layout: "inference" (fused, unrolled
        layers; the GPU default), "stacked" (lax.scan; the CPU default, compiles fastest) or
        "auto".
      specialize_greedy: decide greedy vs sampling on the host (see `SamplingArrays`): an
        all-greedy batch compiles without the sampling branch, any other without the cond.
      loop_block: decoder steps per fixed-trip-count group in the loop (see `run_loop`).
    """

    def __init__(self, model: Model, decoder_fn: Callable[..., Decoder] | None = None,
                 impl: str = "auto", max_seq_len: int | None = None, layout: str = "auto",
                 specialize_greedy: bool = True, loop_block: int = LOOP_BLOCK,
                 method: str = "autoregressive", options: Any = None):
        # "auto": Pallas attention is faster on the GPU (benchmarks/decode.md)
        self.impl = impl = resolve_impl(impl)
        self.method, self.describe, self.score, self.run = method, lambda stats: {}, None, None
        if decoder_fn is None:
            built = methods.build(method, model, options, impl)
            model, decoder_fn, self.describe = built.model, built.decoder_fn, built.describe
            self.score, self.run = built.score, built.run
        elif method != "autoregressive" or options:
            raise ValueError("pass a method (with its options) or a decoder_fn, not both")
        self.model = model
        if layout == "auto":  # unrolled + fused is 1.8x faster at batch 1 on the H100
            layout = "inference" if jax.default_backend() == "gpu" else "stacked"
        if layout not in ("inference", "stacked"):
            raise ValueError(f"layout={layout!r}: choose auto, inference or stacked")
        self.layout = layout
        # Every Params in the pytree (speculative decoding passes (target, draft) params).
        self.params = jax.tree_util.tree_map(
            lambda x: inference_layout(x) if isinstance(x, Params) else x, model.params,
            is_leaf=lambda x: isinstance(x, Params)) if layout == "inference" else model.params
        if self.impl == "pallas":  # the fused decode step's [N, K] weight copies
            self.params = jax.tree_util.tree_map(
                lambda x: with_decode_copies(x)
                if isinstance(x, Params) and wants_decode_copies(x) else x,
                self.params, is_leaf=lambda x: isinstance(x, Params))
        self.decoder_fn = decoder_fn
        self.max_seq_len = max_seq_len or model.cfg.max_position_embeddings
        self.specialize_greedy, self.loop_block = specialize_greedy, loop_block
        self._compiled: dict[tuple, _Compiled] = {}

    # -- host helpers --------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            tok = self.model.tokenizer
            if tok is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            if chat:
                prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
            return tok.encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.model.cfg.vocab_size]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary "
                             f"[0, {self.model.cfg.vocab_size})")
        return ids

    def _stop_ids(self, sp: SamplingParams) -> list[int]:
        eos = () if (sp.ignore_eos or self.model.tokenizer is None) else \
            self.model.tokenizer.eos_ids
        return list(dict.fromkeys([*eos, *sp.stop_token_ids]))

    def _executables(self, batch: int, t_bucket: int, max_len: int, max_out: int,
                     n_stop: int, track_seen: bool, args) -> _Compiled:
        key = (batch, t_bucket, max_len, max_out, n_stop, track_seen, args[3].all_greedy)
        if key not in self._compiled:
            t0 = time.perf_counter()
            decoder = self.decoder_fn(self.model.cfg, max_len)
            init = jax.jit(partial(init_loop, decoder, max_out=max_out, track_seen=track_seen))
            init_c = init.lower(*args).compile()
            ls_shape = jax.eval_shape(init, *args)
            # The loop state (cache included) is donated: updated in place every chunk.
            loop = jax.jit(partial(run_loop, decoder, block=self.loop_block),
                           donate_argnums=(1,))
            loop_c = compile_loop(loop, batch, self.params, ls_shape, jnp.int32(0))
            self._compiled[key] = _Compiled(init_c, loop_c, time.perf_counter() - t0)
        return self._compiled[key]

    @property
    def compile_seconds(self) -> float:
        """Seconds spent compiling, over every shape bucket seen so far."""
        return sum(c.compile_s for c in self._compiled.values())

    # -- the API -----------------------------------------------------------------------
    def stream(self, prompts: Sequence[str | Sequence[int]],
               sampling: SamplingParams | Sequence[SamplingParams] = GREEDY,
               chat: bool = False, chunk_steps: int = 16,
               on_prefill: Callable[[int, float], None] | None = None,
               stream_interval_s: float = STREAM_INTERVAL_S
               ) -> Iterator[tuple[list[str], list[GenerationResult] | None]]:
        """Yields per-prompt text deltas after the prefill, then after `chunk_steps` decoder
        steps, then after chunks that double until one takes about `stream_interval_s`
        (0: every `chunk_steps` steps), then the results.

        Each yield is (deltas, None); the last is ([...], results). on_prefill(prompt_tokens,
        elapsed_s), if given, is called every PREFILL_POLL_S while the prefill runs (a long
        prompt on CPU takes seconds to minutes), so a caller can show progress.
        """
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling)} SamplingParams: pass "
                             "one SamplingParams or one per prompt")
        if not prompts:
            raise ValueError("no prompts given")
        ids = [self.encode(p, chat) for p in prompts]
        for i, (p, sp) in enumerate(zip(ids, sampling)):
            if not p:
                raise ValueError(f"prompt {i} is empty: give at least one token")
            if len(p) + sp.max_new_tokens > self.max_seq_len:
                raise ValueError(
                    f"prompt {i} has {len(p)} tokens and asks for {sp.max_new_tokens} new ones; "
                    f"max_seq_len is {self.max_seq_len}: shorten the prompt or lower "
                    "max_new_tokens")
        if self.run is not None:  # a method that runs whole generations itself (MethodBuild)
            results = self.run(self, ids, list(sampling))
            yield [r.text for r in results], results
            return
        n = len(ids)
        batch = next_pow2(n)
        t_bucket = prompt_bucket(max(map(len, ids)))
        max_new = max(sp.max_new_tokens for sp in sampling)
        max_out = next_pow2(max_new, 16)
        max_len = min(-(-(t_bucket + max_out + 1) // CACHE_ROUND) * CACHE_ROUND,
                      max(self.max_seq_len, t_bucket))
        stops = [self._stop_ids(sp) for sp in sampling]
        n_stop = next_pow2(max(1, max(map(len, stops))))
        track_seen = any(sp.repetition_penalty != 1.0 for sp in sampling)

        prompt = np.zeros((batch, t_bucket), np.int32)
        lengths = np.ones((batch,), np.int32)
        for i, p in enumerate(ids):
            prompt[i, :len(p)], lengths[i] = p, len(p)
        stop_ids = np.full((batch, n_stop), -1, np.int32)
        for i, s in enumerate(stops):
            stop_ids[i, :len(s)] = s
        # Padding rows ask for one token so they are done right after prefill.
        max_new_arr = np.array([sp.max_new_tokens for sp in sampling] + [1] * (batch - n),
                               np.int32)
        seeds = [sp.seed if sp.seed is not None else np.random.randint(2**31) for sp in sampling]
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds + [0] * (batch - n), jnp.uint32))
        args = (self.params, jnp.asarray(prompt), jnp.asarray(lengths),
                SamplingArrays.from_params(sampling, batch, self.specialize_greedy), keys,
                jnp.asarray(max_new_arr), jnp.asarray(stop_ids))
        exe = self._executables(batch, t_bucket, max_len, max_out, n_stop, track_seen, args)

        limits: dict[int, jax.Array] = {}  # device scalars, one per chunk size: each put
        # of a fresh one costs the host ~0.1 ms on the GPU

        def run_chunk(ls: LoopState, steps: int) -> LoopState:
            if steps not in limits:
                limits[steps] = jnp.int32(steps)
            return exe.loop(self.params, ls, limits[steps])

        t0 = time.perf_counter()
        ls: LoopState = exe.init(*args)  # dispatched asynchronously
        if on_prefill is not None:
            wait_reporting(ls.n_out, lambda s: on_prefill(int(lengths[:n].sum()), s))
        ls.n_out.block_until_ready()
        t_prefill = time.perf_counter() - t0
        detoks = [IncrementalDetokenizer(self.model.tokenizer) if self.model.tokenizer else None
                  for _ in range(n)]
        texts, emitted, sent, streamed = [""] * n, [0] * n, [0] * n, [0] * n
        stopped_by_string = [False] * n
        chunk, last_steps = chunk_steps, 0
        t1 = t_chunk = time.perf_counter()
        while True:
            # The state's fields are read before the next chunk's call donates them.
            out, n_out, done, counts = jax.device_get((ls.out, ls.n_out, ls.done, ls.counts))
            done = np.array(done)  # a writable copy: device_get can return a read-only view
            deltas = []
            newly_stopped = False
            for i in range(n):
                new = out[i, emitted[i]:n_out[i]].tolist()
                emitted[i] = int(n_out[i])
                if detoks[i] and not stopped_by_string[i]:
                    texts[i] += detoks[i].add(new)
                hit = next((s for s in sampling[i].stop if s in texts[i]), None)
                if hit is not None and not stopped_by_string[i]:
                    texts[i], stopped_by_string[i] = texts[i][:texts[i].index(hit)], True
                    done[i] = newly_stopped = True
                # Hold back a tail that may be the start of a stop string: once streamed, text
                # cannot be taken back if the next tokens complete the stop string.
                end = len(texts[i]) if done[i] else len(texts[i]) - stop_prefix_len(
                    texts[i], sampling[i].stop)
                deltas.append(texts[i][sent[i]:end])
                sent[i] = max(sent[i], end)
            if done[:n].all() or int(counts[0]) >= max_out:  # counts[0]: steps; a safety bound
                break
            yield deltas, None
            streamed = [a + len(d) for a, d in zip(streamed, deltas)]
            if newly_stopped:  # the next chunk skips rows a stop string ended
                ls = dataclasses.replace(ls, done=jnp.asarray(done))
            now, ran = time.perf_counter(), int(counts[0]) - last_steps
            if ran > 0 and stream_interval_s > 0:  # the next chunk: double, up to the interval
                per_step = (now - t_chunk) / ran
                chunk = max(chunk_steps, min(2 * chunk, int(stream_interval_s / per_step)))
            t_chunk, last_steps = now, int(counts[0])
            ls = run_chunk(ls, chunk)
        t_decode = time.perf_counter() - t1
        results = []
        steps, accepted, live_steps = counts
        total_new = int(sum(emitted))
        for i in range(n):
            toks = out[i, :emitted[i]].tolist()
            if stopped_by_string[i]:  # keep tokens up to the one completing the stop string
                toks = toks[:_tokens_to_stop(self.model.tokenizer, toks, sampling[i].stop)]
            stop_hit = stopped_by_string[i] or (toks and toks[-1] in stops[i])
            toks_text = toks[:-1] if stop_hit and not stopped_by_string[i] else toks  # no eos text
            text = texts[i] if stopped_by_string[i] else (
                self.model.tokenizer.decode(toks_text) if self.model.tokenizer else "")
            results.append(GenerationResult(
                prompt_token_ids=ids[i], token_ids=toks, text=text,
                finish_reason="stop" if stop_hit else "length",
                stats=dict(prefill_ms=1e3 * t_prefill, decode_s=t_decode,
                           num_tokens=len(toks), batch_tokens=total_new,
                           decode_steps=int(steps),
                           decode_tok_s=(total_new - n) / t_decode if t_decode > 0 else 0.0,
                           mean_accepted=float(accepted) / max(int(live_steps), 1),
                           compile_s=exe.compile_s, batch=n)))
            results[-1].stats.update(self.describe(results[-1].stats))
        # The last deltas complete each stream to its final text, including text held back
        # for a stop string or a character cut at the token budget (U+FFFD, as in `text`).
        yield [r.text[k:] for r, k in zip(results, streamed)], results

    def generate(self, prompts, sampling=GREEDY, chat: bool = False,
                 chunk_steps: int | None = None,
                 on_prefill: Callable[[int, float], None] | None = None
                 ) -> list[GenerationResult]:
        """Runs to completion: the whole decode in one dispatch, or (chunk_steps) in chunks as
        `stream` makes them, the first of chunk_steps steps. on_prefill: see `stream`."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        for _, results in self.stream(prompts, sampling, chat, chunk_steps or 1 << 30,
                                      on_prefill):
            if results is not None:
                return results
        raise AssertionError("stream ended without results")


def shared_generator(model: Model, impl: str = "auto", method: str = "autoregressive",
                     options: Any = None) -> Generator:
    """The Generator that `jdecode.generate` runs: the one it last built for this `model` if
    that was built with the same impl, method and options from the same params, tokenizer
    and config, else a new one, which replaces it (`Model.shared_generator`).

    Why: a Generator compiles its executables per instance, so a fresh one per call traced
    and compiled them again (~2 s a call on the tiny model on a 2-core CPU, against ~0 for a
    reused one; more on the real model). One per model, not more: on the GPU a Generator
    holds its own inference-layout copy of the weights, so the old one is dropped before
    the new one is built. Options are compared by value (their repr), artifacts named by a
    path by that path: a file rewritten in place is not read again; build a `Generator` to
    hold one explicitly.
    """
    opts = methods.parse_options(methods.get(method), options)  # bad options: a ConfigError
    key = (impl, method, repr(opts))
    sources = (model.params, model.tokenizer, model.cfg)  # compared by identity
    cached = model.shared_generator
    if cached is not None and cached[0] == key and all(a is b for a, b in zip(cached[1],
                                                                                sources)):
        return cached[2]
    model.shared_generator = None  # release the old copies before building the new ones
    gen = Generator(model, impl=impl, method=method, options=opts)
    model.shared_generator = (key, sources, gen)
    return gen
