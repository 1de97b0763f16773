"""The engine core: requests in, one scheduled and executed step at a time, streaming deltas out.

Shared by the offline `LLM` API and the server. Stop conditions and detokenization live here.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import random
import time
from collections.abc import Sequence

import jax

from jdecode.decoding.sampling import SamplingParams, stop_prefix_len
from jdecode.engine.block_manager import BlockManager
from jdecode.engine.request import InvalidRequest, Request, RequestStatus, TokenIds
from jdecode.engine.runner import MAX_LOGPROBS, InFlightStep, ModelRunner
from jdecode.engine.scheduler import Scheduler, SchedulerConfig
from jdecode.io.registry import Model
from jdecode.io.tokenizer import IncrementalDetokenizer

log = logging.getLogger(__name__)

# Multi-step scheduling's default on a GPU: 4 and 8 decodes per launch measured alike on the
# H200 (48.2k and 46.8k tok/s at batch 64); 4 keeps bursts and wasted decodes after a stop short.
DEFAULT_GPU_SCHEDULER_STEPS = 4


def resolve_scheduler_steps(steps: int | None) -> int:
    """None -> DEFAULT_GPU_SCHEDULER_STEPS on a GPU, 1 elsewhere (a CPU step is compute-bound:
    nothing to amortize)."""
    if steps is None:
        return DEFAULT_GPU_SCHEDULER_STEPS if jax.default_backend() == "gpu" else 1
    return steps


@dataclasses.dataclass(frozen=True)
class EngineArgs:
    """Engine limits (vLLM names).

    Attributes:
        page_size: tokens per KV page.
        num_pages: pages in the pool; None sizes it from kv_cache_gb.
        kv_cache_gb: memory for the pool when num_pages is None.
        max_num_seqs, max_num_batched_tokens, max_model_len, policy, enable_chunked_prefill,
            max_chunk_tokens, min_prefill_batch: see `SchedulerConfig` (max_model_len None =
            the model's limit, capped at 4096).
        enable_prefix_caching: share full KV pages between requests with equal prefixes.
        impl: attention implementation: "auto" (Pallas on GPU, XLA elsewhere), "xla" or
            "pallas". With XLA, each step's block tables are cut to a width bucket that holds
            its longest context (`runner.kv_buckets`).
        layout: parameter layout, "auto", "inference" or "stacked" (see `ModelRunner`).
        token_buckets: padded token counts of a step below the budget (each compiles once);
            empty = powers of two from 16. On a GPU a decode step costs about the same at 16 or
            64 tokens, so a few coarse buckets cut compile time at no cost.
        async_scheduling: plan and dispatch step n+1 before reading back step n, so the host's
            scheduling, packing and post-processing overlap the device's step instead of
            following it (vLLM's async scheduling). Outputs are identical either way; a
            request that stops on EOS or a stop string costs one discarded decode slot.
        num_scheduler_steps: decodes per launch when a step is all decodes (vLLM's multi-step
            scheduling; `SchedulerConfig`). Outputs are identical; tokens land in bursts. None
            = DEFAULT_GPU_SCHEDULER_STEPS on a GPU, where the engine's step is bound by the
            host (+48% decode throughput at batch 64 on the H200,
            benchmarks/engine_multistep_h200.md), and 1 elsewhere.
    """

    page_size: int = 16
    num_pages: int | None = None
    kv_cache_gb: float = 1.0
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    policy: str = "continuous"
    enable_chunked_prefill: bool = True
    max_chunk_tokens: int = 0
    min_prefill_batch: int | None = None
    enable_prefix_caching: bool = True
    impl: str = "auto"
    layout: str = "auto"
    token_buckets: tuple[int, ...] = ()
    async_scheduling: bool = True
    num_scheduler_steps: int | None = None


@dataclasses.dataclass
class Logprob:
    """Log-probability of the sampled token and the top alternatives at one position."""

    token_id: int
    logprob: float
    top: dict[int, float]


@dataclasses.dataclass
class SequenceOutput:
    """What one step produced for one sequence (a streaming delta: one token, or a multi-step
    burst of several), plus its state so far."""

    request_id: str  # the user's request id (shared by the n siblings)
    index: int  # which of the n sequences
    new_token_ids: list[int]
    delta_text: str
    token_ids: TokenIds  # the tokens so far: a snapshot, list(...) for a list
    text: str
    finished: bool
    finish_reason: str | None
    logprobs: list[Logprob] | None  # for the new tokens
    num_prompt_tokens: int
    num_cached_tokens: int
    error: str | None = None  # set when the request failed (finish_reason "abort")


class _Seq:
    """Host-side state of one sequence beyond the scheduler's Request."""

    def __init__(self, req: Request, user_id: str, stop_ids: set[int], logprobs: int | None,
                 detok: IncrementalDetokenizer | None) -> None:
        self.req, self.user_id, self.stop_ids = req, user_id, stop_ids
        self.num_logprobs, self.detok = logprobs, detok
        self.text = ""  # final text (stop strings cut)
        self.pending = ""  # text held back while it could still become a stop string
        self.logprobs: list[Logprob] = []


class _Burst:
    """The tokens one step landed for one sequence, gathered into its one output."""

    __slots__ = ("seq", "tokens", "deltas", "status")

    def __init__(self, seq: _Seq) -> None:
        self.seq = seq
        self.tokens: list[int] = []
        self.deltas: list[str] = []
        self.status: RequestStatus | None = None


class LLMEngine:
    """Continuous-batching engine over a paged KV cache.

    Args:
      model: a loaded model (cfg, params, tokenizer).
      args: engine limits.
    """

    def __init__(self, model: Model, args: EngineArgs | None = None, **overrides) -> None:
        args = dataclasses.replace(args or EngineArgs(), **overrides)
        args = dataclasses.replace(
            args, num_scheduler_steps=resolve_scheduler_steps(args.num_scheduler_steps))
        cfg = model.cfg
        max_model_len = args.max_model_len or min(cfg.max_position_embeddings, 4096)
        if max_model_len > cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's "
                             f"max_position_embeddings={cfg.max_position_embeddings}")
        pages_per_seq = -(-max_model_len // args.page_size)
        num_pages = args.num_pages
        if num_pages is None:
            itemsize = 2 if cfg.dtype in ("bfloat16", "float16") else 4
            page_bytes = (2 * cfg.num_layers * args.page_size * cfg.num_kv_heads * cfg.head_dim
                          * itemsize)
            # No more than every slot at full length needs; at least one full-length sequence.
            num_pages = min(int(args.kv_cache_gb * 2**30) // page_bytes,
                            args.max_num_seqs * pages_per_seq)
            num_pages = max(num_pages, pages_per_seq)
        if num_pages < pages_per_seq:
            # Otherwise one sequence could preempt all others and still not fit: a livelock.
            raise ValueError(f"num_pages={num_pages} cannot hold one max_model_len="
                             f"{max_model_len} sequence ({pages_per_seq} pages of "
                             f"{args.page_size}): raise num_pages or lower max_model_len")
        self.args, self.model, self.max_model_len = args, model, max_model_len
        self.block_manager = BlockManager(num_pages, args.page_size, args.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens,
                            max_model_len=max_model_len, policy=args.policy,
                            enable_chunked_prefill=args.enable_chunked_prefill,
                            max_chunk_tokens=args.max_chunk_tokens,
                            min_prefill_batch=args.min_prefill_batch,
                            num_scheduler_steps=args.num_scheduler_steps),
            self.block_manager)
        self.runner = ModelRunner(cfg, model.params, num_pages=num_pages,
                                  page_size=args.page_size, max_num_seqs=args.max_num_seqs,
                                  max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_model_len=max_model_len, impl=args.impl,
                                  layout=args.layout, token_bucket_sizes=args.token_buckets,
                                  num_scheduler_steps=args.num_scheduler_steps)
        self._seqs: dict[str, _Seq] = {}  # internal sequence id -> state
        self._groups: dict[str, list[str]] = {}  # user request id -> sequence ids
        self._ids = itertools.count()
        self._in_flight: InFlightStep | None = None  # dispatched, not yet read back
        self.num_steps = 0
        self.num_generated_tokens = 0

    # ---- requests --------------------------------------------------------------------------

    def validate_request(self, prompt_token_ids: Sequence[int], sampling_params: SamplingParams,
                         logprobs: int | None = None) -> None:
        """Checks that a request fits this engine, without queuing it (no engine state read).

        Raises:
          InvalidRequest naming the problem and the request field at fault (empty or too long
          prompt, token ids outside the vocabulary, n above max_num_seqs, bad logprobs).
        """
        vocab, sp = self.model.cfg.vocab_size, sampling_params
        if not prompt_token_ids:
            raise InvalidRequest("the prompt is empty: give at least one token", "prompt")
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})",
                                 "prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequest(
                f"prompt has {len(prompt_token_ids)} tokens; max_model_len is "
                f"{self.max_model_len}: shorten the prompt or raise max_model_len", "prompt")
        bad = [t for t in sp.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(f"stop token ids {bad[:5]} are outside the vocabulary "
                                 f"[0, {vocab})", "stop_token_ids")
        if sp.n > self.args.max_num_seqs:
            raise InvalidRequest(f"n={sp.n} sequences do not fit max_num_seqs="
                                 f"{self.args.max_num_seqs}: lower n or raise max_num_seqs", "n")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"logprobs={logprobs!r}: must lie in [0, {MAX_LOGPROBS}]",
                                 "logprobs")

    def add_request(self, request_id: str, prompt_token_ids: Sequence[int],
                    sampling_params: SamplingParams | None = None, *,
                    logprobs: int | None = None, arrival_time: float | None = None) -> None:
        """Queues a request of `sampling_params.n` sequences sampled from one prompt.

        Raises:
          InvalidRequest (a ValueError) as `validate_request` does, or for a duplicate id.
        """
        sp = sampling_params or SamplingParams()
        ids = [int(t) for t in prompt_token_ids]
        if request_id in self._groups:
            raise InvalidRequest(f"request id {request_id!r} is already in use")
        self.validate_request(ids, sp, logprobs)
        tok = self.model.tokenizer
        stop_ids = set(sp.stop_token_ids)
        if tok is not None and not sp.ignore_eos:
            stop_ids |= set(tok.eos_ids)
        seed = sp.seed if sp.seed is not None else random.getrandbits(31)
        sid = f"{request_id}#{next(self._ids)}"
        parent = Request(sid, ids, sp, arrival_time=arrival_time)
        parent.seed = seed
        parent.max_output_tokens = sp.max_new_tokens
        parent.children = [parent.make_child(f"{sid}/{i}", i) for i in range(1, sp.n)]
        self.scheduler.add_request(parent)
        self._groups[request_id] = [parent.request_id] + [c.request_id for c in parent.children]
        for req in (parent, *parent.children):
            detok = IncrementalDetokenizer(tok) if tok is not None else None
            self._seqs[req.request_id] = _Seq(req, request_id, stop_ids, logprobs, detok)

    def abort_request(self, request_id: str) -> None:
        """Frees every sequence of the request at once (client gone, or cancelled)."""
        for sid in self._groups.pop(request_id, []):
            self.scheduler.finish_request(sid, RequestStatus.FINISHED_ABORTED)
            self._seqs.pop(sid, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or self._in_flight is not None

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._groups)

    # ---- the step --------------------------------------------------------------------------

    def step(self) -> list[SequenceOutput]:
        """Plans and dispatches one step, and returns the sequences that changed.

        With async scheduling the outputs returned are those of the previous step, read back
        while this one runs on the device; otherwise those of this step.
        """
        out = self.scheduler.schedule()
        launched = None
        if not out.is_empty:
            bm = self.block_manager
            page_tables = {c.request.request_id: bm.page_array(c.request.request_id)
                           for c in out.chunks}
            want = {sid: s.num_logprobs for sid, s in self._seqs.items()
                    if s.num_logprobs is not None}
            launched = self.runner.dispatch(out, page_tables, want)
            self.num_steps += 1
        done, self._in_flight = self._in_flight, launched
        if not self.args.async_scheduling:
            done, self._in_flight = launched, None
        return [] if done is None else self._complete(done)

    def _complete(self, step: InFlightStep) -> list[SequenceOutput]:
        """Reads a step's samples back, appends them and applies the stop conditions.

        One output per sequence that received tokens: a multi-step step lands several tokens
        per sequence, and they come as one output (its `new_token_ids`, `delta_text` and
        `logprobs` hold the burst, in order). A sequence that stops takes none of the rest of
        its burst. Why one: an output per token cost the engine's host and the server's loop
        their largest per-token share (benchmarks/engine_host_cpu.md).
        """
        result = self.runner.collect(step)
        now = time.monotonic()
        outputs: list[SequenceOutput] = []
        burst: _Burst | None = None  # the sequence whose tokens are landing (they come in a row)
        for req in self.scheduler.land(step.out, result.tokens):
            seq = self._seqs.get(req.request_id)
            if seq is None:  # a sibling failed earlier in this loop and took its group along
                continue
            self.num_generated_tokens += 1
            if req.first_token_time is None:
                req.first_token_time = now
            token = req.output_token_ids[-1]
            if burst is None or burst.seq is not seq:
                if burst is not None:
                    outputs.append(self._output(burst))
                burst = _Burst(seq)
            try:
                if req.request_id in result.logprobs:
                    chosen, top_ids, top_vals = result.logprobs[req.request_id][len(burst.tokens)]
                    seq.logprobs.append(Logprob(token, chosen, dict(zip(top_ids, top_vals))))
                delta, burst.status = self._postprocess(seq, token, now)
                burst.tokens.append(token)
                burst.deltas.append(delta)
            except Exception as e:  # this request's failure ends this request only
                log.exception("request %s failed in post-processing", seq.user_id)
                if burst.tokens:
                    outputs.append(self._output(burst))
                outputs.append(self._fail(seq, f"{type(e).__name__}: {e}"))
                burst = None
        if burst is not None:
            outputs.append(self._output(burst))
        return outputs

    def _fail(self, seq: _Seq, error: str) -> SequenceOutput:
        """Aborts the sequence's whole request; the output carries the error."""
        self.abort_request(seq.user_id)
        req = seq.req
        return SequenceOutput(
            request_id=seq.user_id, index=req.index, new_token_ids=[], delta_text="",
            token_ids=req.output_so_far(), text=seq.text, finished=True,
            finish_reason=RequestStatus.FINISHED_ABORTED.finish_reason, logprobs=None,
            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens,
            error=error)

    def _postprocess(self, seq: _Seq, token: int, now: float
                     ) -> tuple[str, RequestStatus | None]:
        """Detokenizes the new token and applies the stop conditions (finishing the request
        on one). Returns the text that became final and the status the request finished with
        (None: it goes on)."""
        req = seq.req
        sp: SamplingParams = req.sampling_params
        stops = sp.stop
        status = None
        if token in seq.stop_ids:  # the stop token is kept in token_ids but not in the text
            status = RequestStatus.FINISHED_STOPPED
        elif seq.detok is not None:
            seq.pending += seq.detok.step(token)
            hit = stops and min(((seq.pending.find(s), s) for s in stops
                                 if s in seq.pending), default=None)
            if hit:
                seq.pending = seq.pending[:hit[0]]
                status = RequestStatus.FINISHED_STOPPED
        # len() of the lists, not their properties: this runs once per token (the engine's
        # largest per-token share of host time, benchmarks/engine_host_cpu.md).
        if status is None and (len(req.output_token_ids) >= sp.max_new_tokens
                               or len(req.all_token_ids) >= self.max_model_len):
            status = RequestStatus.FINISHED_LENGTH
        if stops and status is None:
            # Hold back the tail that might be the start of a stop string until it is decided.
            cut = len(seq.pending) - stop_prefix_len(seq.pending, stops)
            delta, seq.pending = seq.pending[:cut], seq.pending[cut:]
        else:
            delta, seq.pending = seq.pending, ""
        if delta:
            seq.text += delta
        if status is not None:
            self.scheduler.finish_request(req.request_id, status)
            req.finish_time = now
            self._finish_group(seq)
        return delta, status

    @staticmethod
    def _output(burst: _Burst) -> SequenceOutput:
        seq, status = burst.seq, burst.status
        req = seq.req
        n = len(burst.tokens)
        return SequenceOutput(
            request_id=seq.user_id, index=req.index, new_token_ids=burst.tokens,
            delta_text="".join(burst.deltas), token_ids=req.output_so_far(), text=seq.text,
            finished=status is not None, finish_reason=status.finish_reason if status else None,
            logprobs=seq.logprobs[-n:] if seq.num_logprobs is not None else None,
            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=req.num_cached_tokens)

    def _finish_group(self, seq: _Seq) -> None:
        sids = self._groups.get(seq.user_id, [])
        if all(self._seqs[s].req.is_finished for s in sids):
            self._groups.pop(seq.user_id, None)
            for s in sids:
                self._seqs.pop(s, None)

    # ---- warm-up ---------------------------------------------------------------------------

    def warmup(self) -> dict:
        """Compiles the step executables that plain requests use before the first request
        needs them (vLLM captures its CUDA graphs at startup for the same reason): a request
        would otherwise wait seconds for each new step shape, on a GPU ~10-60 s in all.

        Runs throwaway requests through the engine: one prompt per token bucket, then, with
        multi-step scheduling, full bursts of all-decode steps at every row count's bucket, and
        decodes at each of the runner's `decode_buckets` (the fused decode step's); all of it
        twice, greedy and sampled, since an all-greedy step compiles without the sampler
        (`SamplingArrays.from_params(specialize_greedy=True)`) and a step with a sampled row
        with it. Then it forgets them: the prefix cache is emptied and the step and scheduler
        counters start from zero. Not covered (they compile on first use): logprobs requests,
        repetition penalties, with impl "xla" the block-table widths of contexts longer than
        the warm-up prompts, and with impl "pallas" a step that pairs a chunk with a decode of
        more than `UNIFIED_DECODE_MAX_CONTEXT` keys (`PagedMeta.short_decodes` false).

        Returns {"prefill_buckets": token buckets run, "burst_buckets": row buckets of
        decode-only steps run, "seconds": wall time}.
        Raises RuntimeError when requests are pending: call it before serving.
        """
        if self.has_unfinished_requests():
            raise RuntimeError("warmup() runs throwaway requests through an idle engine: call "
                               "it before adding requests")
        t0 = time.perf_counter()
        buckets = self.runner.buckets
        burst = self.args.num_scheduler_steps
        rows = {min(b, self.args.max_num_seqs) for b in buckets} if burst > 1 else set()
        # Decode-only steps of a few rows have buckets of their own (the fused kernels'), in
        # one-decode and in multi-step executables.
        rows = sorted(rows | set(self.runner.decode_buckets))
        for kind, temperature in (("greedy", 0.0), ("sampled", 1.0)):
            prefill = SamplingParams(max_new_tokens=2, temperature=temperature, seed=0,
                                     ignore_eos=True)
            for i, b in enumerate(buckets):
                # A different prompt each time: a prefix-cache hit would shrink the chunk.
                n = max(1, min(b, self.max_model_len - 4))
                token = i + 1 + (len(buckets) if temperature else 0)
                self.add_request(f"__warmup-{kind}-{i}", [token] * n, prefill)
                self._drain()
            params = dataclasses.replace(prefill, max_new_tokens=burst + 2)
            for n in rows:  # n decoding rows land in bucket(n): one burst executable each
                for j in range(n):
                    self.add_request(f"__warmup-{kind}-decode{n}-{j}", [j + 1, n], params)
                self._drain()
        self.runner.apply_copies([])  # the copy-on-write executable (copies nothing here)
        self.block_manager.reset_prefix_cache()
        self.scheduler.stats = type(self.scheduler.stats)()
        self.num_steps = self.num_generated_tokens = 0
        return {"prefill_buckets": len(buckets), "burst_buckets": len(rows),
                "seconds": time.perf_counter() - t0}

    def _drain(self) -> None:
        while self.has_unfinished_requests():
            self.step()

    # ---- metrics ---------------------------------------------------------------------------

    def stats(self) -> dict:
        """Gauges and counters for /metrics and benchmarks."""
        s = self.scheduler
        return {"num_running": s.num_running, "num_waiting": s.num_waiting,
                    "kv_usage": self.block_manager.usage, "num_pages": self.block_manager.num_pages,
                    "num_preemptions": s.stats.num_preemptions,
                    "prefix_hit_rate": s.stats.prefix_hit_rate,
                    "prefix_query_tokens": s.stats.prefix_query_tokens,
                    "prefix_hit_tokens": s.stats.prefix_hit_tokens, "num_steps": self.num_steps}
