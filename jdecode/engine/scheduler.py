"""Iteration-level scheduler: token budget, chunked prefill, FCFS, preemption by recompute.

Host side only (no jax). vLLM v1's rule (Orca's continuous batching, Sarathi's chunked prefill):
every step, each running request contributes its next chunk so computed tokens catch up with
total tokens, under `max_num_batched_tokens` and `max_num_seqs`.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator

from jdecode.engine.block_manager import BlockManager
from jdecode.engine.request import Request, RequestStatus

POLICIES = ("continuous", "static")


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits and policy.

    Attributes:
        max_num_seqs: sequences running at once (the runner's batch slots).
        max_num_batched_tokens: tokens computed per step, over all sequences.
        max_model_len: longest sequence (prompt + output).
        policy: "continuous" (iteration-level admission) or "static" (a batch is admitted only
            when the previous one has finished: the traditional batch inference baseline).
        enable_chunked_prefill: split prefills into chunks that share steps with decodes. When
            off, a prompt is computed in one step, in a prefill-only step that runs before
            decodes (vLLM v0's default), so it must fit max_num_batched_tokens.
        max_chunk_tokens: optional cap on one request's chunk per step (0 = budget only).
        min_prefill_batch: without chunked prefill, a prefill-only step stalls every running
            decode, so one runs only once it can seat this many waiting sequences (or all that
            wait, or nothing is running): the stall is paid once per group, not per request
            (vLLM v0's delay factor serves the same end). None = max(1, max_num_seqs // 8).
        num_scheduler_steps: decode steps the device runs per planned step (vLLM's multi-step
            scheduling). A step whose every chunk is a decode runs up to this many decodes in
            one launch, each row as many as its max_tokens and max_model_len leave; the host's
            planning, packing and read-back are paid once for all of them. A step with a
            prefill chunk, a preemption or a page copy runs one, and so does a step where a
            row would end within the burst while requests wait for a seat. Tokens land in
            bursts, and a request that stops on EOS or a stop string wastes the rest of its
            burst.
    """

    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    policy: str = "continuous"
    enable_chunked_prefill: bool = True
    max_chunk_tokens: int = 0
    min_prefill_batch: int | None = None
    num_scheduler_steps: int = 1

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy={self.policy!r}: choose one of {', '.join(POLICIES)}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len",
                     "num_scheduler_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.min_prefill_batch is not None and self.min_prefill_batch <= 0:
            raise ValueError(f"min_prefill_batch={self.min_prefill_batch} must be > 0 (or None "
                             "for max_num_seqs // 8)")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} < max_model_len="
                f"{self.max_model_len} without chunked prefill: a long prompt could never be "
                "scheduled; raise max_num_batched_tokens or enable chunked prefill")


@dataclasses.dataclass
class ScheduledChunk:
    """`num_tokens` tokens of `request` computed this step, starting at position `start`.

    The scheduler fills the rest when it commits the step:
      samples: the chunk reaches the request's last token, so its logits sample the next one.
      output_index: which output token that sample is (the key of its random stream).
      token_src: -1 when every token of the chunk is on the host; else the chunk is the decode
        of a token still in flight, and this is its row in the previous step's samples.
      steps: decodes of this row in a multi-step step (`SchedulerConfig.num_scheduler_steps`):
        the chunk's token, then steps - 1 tokens the device samples and feeds back itself.
        The row computes positions start .. start + steps - 1 and samples `steps` tokens.
    """

    request: Request
    start: int
    num_tokens: int
    samples: bool = False
    output_index: int = 0
    token_src: int = -1
    steps: int = 1


@dataclasses.dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    page_copies: list[tuple[int, int]]  # copy-on-write (src, dst) to apply before the forward
    preempted: list[Request]
    # Decodes the device runs (1, or num_scheduler_steps for a multi-step plan): the most
    # chunk.steps, or more, where rows idle once their own count is done.
    num_steps: int = 1

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclasses.dataclass
class SchedulerStats:
    num_preemptions: int = 0
    prefix_query_tokens: int = 0  # prompt tokens looked up in the prefix cache at admission
    prefix_hit_tokens: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / max(1, self.prefix_query_tokens)


class Scheduler:
    """Decides, every step, which tokens of which requests run.

    Order within a step: running decodes first (a decode is a gap of one token), then running
    prefill chunks, then FCFS admission of waiting requests into what is left of the budget.
    When a request needs a page and none is free, the lowest-priority running request (the
    latest admitted) is preempted: its pages are freed and it goes back to the front of the
    queue, to be recomputed from prompt + outputs (the prefix cache usually returns most pages).
    """

    def __init__(self, cfg: SchedulerConfig, block_manager: BlockManager) -> None:
        self.cfg = cfg
        self.block_manager = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.stats = SchedulerStats()
        # Per-step state, reset by schedule().
        self._budget = 0
        self._chunks: dict[str, ScheduledChunk] = {}
        self._preempted: list[Request] = []

    # ---- queue -----------------------------------------------------------------------------

    def add_request(self, req: Request) -> None:
        total = req.num_prompt_tokens
        if total >= self.cfg.max_model_len:
            raise ValueError(f"request {req.request_id!r}: prompt has {total} tokens; "
                             f"max_model_len is {self.cfg.max_model_len}: shorten the prompt or "
                             "raise max_model_len")
        if req.num_seqs > self.cfg.max_num_seqs:
            raise ValueError(f"request {req.request_id!r} asks for n={req.num_seqs} sequences; "
                             f"max_num_seqs is {self.cfg.max_num_seqs}: lower n or raise "
                             "max_num_seqs")
        worst = self.block_manager.pages_needed(self.cfg.max_model_len)
        if worst > self.block_manager.num_pages:
            # Otherwise one sequence could preempt all others and still not fit: a livelock.
            raise ValueError(f"request {req.request_id!r} may need {worst} pages; the pool has "
                             f"{self.block_manager.num_pages}: raise num_pages or lower "
                             "max_model_len")
        for r in (req, *req.children):
            if r.request_id in self.requests:
                raise ValueError(f"request id {r.request_id!r} is already in use")
            self.requests[r.request_id] = r
            r.status = RequestStatus.FORK_PENDING
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Marks a request finished (stop, length or abort) and frees its pages at once.

        Aborting a parent that has not forked yet also aborts its pending children.
        """
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING:
            self.waiting.remove(req)
        req.status = status
        self.block_manager.free(req)
        if status == RequestStatus.FINISHED_ABORTED:
            for child in req.children:
                self.finish_request(child.request_id, status)
        return req

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(len(r.children) for r in self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plans one step. The caller runs it, then calls `update_from_output`."""
        self._budget = self.cfg.max_num_batched_tokens
        self._chunks = {}
        self._preempted = []
        cfg = self.cfg
        if cfg.policy == "static":
            if not self.running:
                self._admit(allow_chunk=True, max_seqs=cfg.max_num_seqs)
            else:
                self._schedule_running()
        elif cfg.enable_chunked_prefill:
            self._schedule_running()
            if not self._preempted:
                self._admit(allow_chunk=True, max_seqs=cfg.max_num_seqs)
        else:
            # A prefill-only step when a group can be admitted; decodes wait for it.
            if self._prefill_step_due():
                self._admit(allow_chunk=False, max_seqs=cfg.max_num_seqs)
            if not self._chunks:
                self._schedule_running()
        chunks = list(self._chunks.values())
        copies = self.block_manager.take_copies()
        num_steps = 1
        if cfg.num_scheduler_steps > 1 and not copies and not self._preempted:
            num_steps = self._plan_steps(chunks)
        self._commit(chunks)
        return SchedulerOutput(chunks, copies, self._preempted, num_steps)

    def _plan_steps(self, chunks: list[ScheduledChunk]) -> int:
        """Multi-step: when every chunk is a decode, gives each row as many decodes as its
        limits allow (at most num_scheduler_steps) and reserves their pages. Returns the
        step's decode count: num_scheduler_steps, or 1 for a single decode.

        The device always runs num_scheduler_steps decodes (one executable per token bucket);
        a row that ends sooner idles for the rest. While requests wait, a step where some row
        would end within the burst runs one decode instead, so its seat frees at once. A row
        whose extra pages are not free runs one decode: looking ahead never preempts.
        """
        if not chunks or any(c.num_tokens != 1 or c.start + 1 != c.request.num_tokens_with_pending
                             for c in chunks):
            return 1
        burst = self.cfg.num_scheduler_steps
        limits = []
        for chunk in chunks:
            req = chunk.request
            steps = min(burst, self.cfg.max_model_len - req.num_tokens_with_pending)
            if req.max_output_tokens is not None:
                steps = min(steps, req.max_output_tokens - req.num_output_tokens - req.num_pending)
            limits.append(steps)
        if self.waiting and min(limits) < burst:
            return 1
        for chunk, steps in zip(chunks, limits, strict=True):
            if steps > 1 and self.block_manager.allocate_slots(chunk.request, steps):
                chunk.steps = steps
        return burst if any(c.steps > 1 for c in chunks) else 1

    def _commit(self, chunks: list[ScheduledChunk]) -> None:
        """Advances the scheduled requests as if the step had run (vLLM v1 does the same), so the
        next step can be planned before this one's samples are back. Chunk b runs in row b."""
        for b, chunk in enumerate(chunks):
            req = chunk.request
            end = chunk.start + chunk.num_tokens
            if end > req.num_tokens:  # the decode of the previous step's in-flight sample
                chunk.token_src = req.sample_slot
            req.num_computed_tokens = end + chunk.steps - 1
            chunk.samples = end == req.num_tokens_with_pending
            if chunk.samples:
                chunk.output_index = req.num_output_tokens + req.num_pending
                req.num_pending += chunk.steps
                req.sample_slot = b

    def _done_when_pending_land(self, req: Request) -> bool:
        """Whether the in-flight samples already take `req` to max tokens or max_model_len; the
        engine finishes it when they land, so a further decode would be wasted."""
        return req.num_pending > 0 and (
            req.num_tokens_with_pending >= self.cfg.max_model_len
            or (req.max_output_tokens is not None
                and req.num_output_tokens + req.num_pending >= req.max_output_tokens))

    def _prefill_step_due(self) -> bool:
        """Unchunked policy: whether enough seats are free to make a prefill-only step worth
        stalling the running decodes for (see `SchedulerConfig.min_prefill_batch`)."""
        cfg = self.cfg
        group = cfg.min_prefill_batch or max(1, cfg.max_num_seqs // 8)
        free = cfg.max_num_seqs - len(self.running)
        return not self.running or free >= min(group, self.num_waiting)

    def _chunk_size(self, req: Request) -> int:
        n = min(req.num_tokens_with_pending - req.num_computed_tokens, self._budget)
        if self.cfg.max_chunk_tokens:
            n = min(n, self.cfg.max_chunk_tokens)
        if req.children:  # stop before the last prompt token: the siblings fork there
            n = min(n, req.fork_point - req.num_computed_tokens)
        return max(n, 0)

    def _schedule_running(self) -> None:
        """Schedules running requests: decodes first, then prefill chunks."""
        for req in list(self.running):
            if req.children and req.num_computed_tokens == req.fork_point:
                self._fork(req)
        gaps = [r.num_tokens_with_pending - r.num_computed_tokens for r in self.running]
        decodes = [r for r, g in zip(self.running, gaps) if g == 1]
        prefills = [r for r, g in zip(self.running, gaps) if g > 1]
        for req in decodes + prefills:
            if self._budget == 0:
                break
            if req.status != RequestStatus.RUNNING:  # preempted earlier in this loop
                continue
            if self._done_when_pending_land(req):
                continue
            n = self._chunk_size(req)
            if n == 0:
                continue
            while not self.block_manager.allocate_slots(req, n):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is req:
                    break
            else:
                self._chunks[req.request_id] = ScheduledChunk(req, req.num_computed_tokens, n)
                self._budget -= n

    def _fork(self, parent: Request) -> None:
        """Turns the parent's pending children into running siblings sharing its pages."""
        at = self.running.index(parent) + 1
        for child in parent.children:
            self.block_manager.fork(parent, child)
            child.num_computed_tokens = parent.num_computed_tokens
            child.num_cached_tokens = parent.num_cached_tokens
            child.status = RequestStatus.RUNNING
        self.running[at:at] = parent.children
        parent.children = []

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.block_manager.free(req)
        chunk = self._chunks.pop(req.request_id, None)
        if chunk is not None:  # a decode scheduled earlier this step: return its budget
            self._budget += chunk.num_tokens
        req.num_computed_tokens = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self.waiting.appendleft(req)
        self._preempted.append(req)

    def _admit(self, allow_chunk: bool, max_seqs: int) -> None:
        """Moves waiting requests into running, FCFS, while seats, budget and pages last.

        Static batching admits a whole batch even past the budget; the prefills of requests
        admitted with no budget left run in the following steps.
        """
        bm = self.block_manager
        static = self.cfg.policy == "static"
        while self.waiting and (self._budget > 0 or static):
            req = self.waiting[0]
            if len(self.running) + req.num_seqs > max_seqs:
                break
            if req.num_pending:  # preempted with a sample in flight: recompute once it lands
                break
            hits = bm.find_cached_prefix(req)
            num_cached = len(hits) * bm.page_size
            req.num_computed_tokens = num_cached
            n = self._chunk_size(req)
            # allocate_slots counts the hits itself: they are not computed until it succeeds.
            req.num_computed_tokens = 0
            if not allow_chunk and num_cached + n < req.num_tokens - (1 if req.children else 0):
                break
            if not bm.allocate_slots(req, n, hits):
                break
            req.num_computed_tokens = num_cached
            self.waiting.popleft()
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_cached
                self.stats.prefix_query_tokens += req.num_prompt_tokens
                self.stats.prefix_hit_tokens += num_cached
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            if n:
                self._chunks[req.request_id] = ScheduledChunk(req, num_cached, n)
                self._budget -= n

    def land(self, out: SchedulerOutput, sampled: dict[str, list[int]]) -> Iterator[Request]:
        """Appends the tokens a step sampled, one at a time (its chunks were committed when it
        was scheduled).

        Yields each request right after appending one of its tokens, so the caller can apply
        the stop conditions before the next: a request that finishes (or is aborted) takes no
        further tokens of its burst.

        Args:
            out: the step that ran.
            sampled: request id -> its `chunk.steps` tokens, for every chunk with `samples`.

        A request preempted after this step was launched still receives its tokens: they were
        computed from pages that were intact then.
        """
        for chunk in out.chunks:
            req = chunk.request
            if not chunk.samples:
                continue
            for token in sampled[req.request_id]:
                if req.is_finished:  # finished or aborted while it ran, or by a token before
                    break
                req.num_pending -= 1
                req.append_output(token)
                yield req

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]
                           ) -> list[Request]:
        """`land` for a single-step plan: one token per sampling chunk.

        Returns:
            Requests that received a new token (the caller checks stop conditions).
        """
        if out.num_steps != 1:
            raise ValueError(f"a {out.num_steps}-step plan samples several tokens per row: "
                             "land it with Scheduler.land")
        return list(self.land(out, {rid: [t] for rid, t in sampled.items()}))
