"""Host-side request state for the engine: tokens, progress and status (no jax)."""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Sequence
from typing import Any


class RequestStatus(enum.Enum):
    """Lifecycle of a request; the FINISHED_* values are terminal."""

    WAITING = "waiting"  # queued for admission (new, or preempted and waiting to recompute)
    RUNNING = "running"
    FORK_PENDING = "fork_pending"  # an n > 1 child waiting for its parent to reach the fork point
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context length
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        # Identity against module constants: `in` a tuple of members compares with Enum's
        # __eq__, and the engine asks this once per token.
        return self is _STOPPED or self is _LENGTH or self is _ABORTED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


_STOPPED, _LENGTH, _ABORTED = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                               RequestStatus.FINISHED_ABORTED)


class TokenIds(Sequence):
    """An append-only list's tokens now, as a read-only snapshot made in O(1).

    Why: the engine's output for every new token carries the sequence's tokens so far. A list
    copy per token cost O(length): at 64 sequences of 1000 output tokens, ~0.3 ms of host time
    per decode step (benchmarks/engine_host_cpu.md). The list only grows, so its first n
    items never change. Compares equal to a list or tuple of the same tokens; `list(...)`
    makes a real list.
    """

    __slots__ = ("_ids", "_n")

    def __init__(self, ids: list[int]) -> None:
        self._ids, self._n = ids, len(ids)

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._ids[:self._n][i]
        j = i + self._n if i < 0 else i
        if not 0 <= j < self._n:
            raise IndexError(f"token index {i} out of range for {self._n} tokens")
        return self._ids[j]

    def __iter__(self):
        return itertools.islice(self._ids, self._n)

    def __eq__(self, other) -> bool:
        if isinstance(other, (TokenIds, list, tuple)):
            return len(other) == self._n and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None  # equal to lists, which are unhashable

    def __repr__(self) -> str:
        return repr(list(self))


class Request:
    """One sequence being generated.

    Progress follows vLLM v1's single rule: `num_computed_tokens` (tokens whose K/V are in the
    cache) catches up with `num_tokens` (prompt + sampled outputs). A step computes a chunk of
    the gap; when the chunk closes the gap, the logits at its last token give the next token.
    A decode is simply a gap of 1. Preemption by recompute resets `num_computed_tokens` to 0 and
    keeps the outputs, so the recomputed prefix is prompt + outputs.

    With asynchronous scheduling the next step is planned while the current one runs, before
    its sampled tokens reach the host: `num_pending` counts those in-flight tokens. They count
    towards the gap (`num_tokens_with_pending`), and the device feeds them to the next step
    itself, from row `sample_slot` of the step that sampled them.

    Args:
        request_id: unique id.
        prompt_token_ids: the prompt.
        sampling_params: opaque to the scheduler; the runner reads it.
        arrival_time: seconds (time.monotonic), for FCFS and latency metrics.
        children: n > 1 siblings. They share the parent's pages (copy-on-write) once the parent
            has computed all prompt tokens but the last; each then computes that last token
            itself, so every sibling samples its first token from its own logits row.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: Any = None,
                 arrival_time: float | None = None, children: list[Request] | None = None,
                 parent_id: str | None = None, index: int = 0) -> None:
        if len(prompt_token_ids) == 0:
            raise ValueError(f"request {request_id!r} has an empty prompt: pass at least one "
                             "token (e.g. the BOS token)")
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at first admission
        self.num_preemptions = 0
        self.num_pending = 0  # tokens sampled by launched steps, not yet on the host
        self.sample_slot = -1  # row of the last launched step that samples for this request
        # Output cap known to the scheduler (None = none), so that with tokens in flight it does
        # not schedule a decode whose token would be past max_tokens.
        self.max_output_tokens: int | None = None
        self.children: list[Request] = list(children or [])
        self.parent_id = parent_id
        self.index = index  # position among the n siblings
        # The sampling key of output token i is fold_in(fold_in(key(seed), index), i): it does
        # not depend on batch neighbours, chunking or preemption.
        self.seed = 0
        for child in self.children:
            child.status = RequestStatus.FORK_PENDING
        # Chained hashes of this request's full pages, extended lazily by the block manager.
        self.page_hashes: list[bytes] = []
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_pending(self) -> int:
        """Tokens once every in-flight sample has landed: what computed tokens catch up with."""
        return len(self.all_token_ids) + self.num_pending

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_seqs(self) -> int:
        """Sequences this request will occupy once forked (itself + pending children)."""
        return 1 + len(self.children)

    @property
    def fork_point(self) -> int:
        """num_computed_tokens at which pending children fork off (all prompt tokens but one)."""
        return self.num_prompt_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def output_so_far(self) -> TokenIds:
        """The output tokens now, as a snapshot that later tokens do not change."""
        return TokenIds(self.output_token_ids)

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def make_child(self, request_id: str, index: int, sampling_params: Any = None) -> Request:
        """A sibling for n > 1 with the same prompt; register it in `children` to fork it."""
        child = Request(request_id, self.prompt_token_ids,
                        self.sampling_params if sampling_params is None else sampling_params,
                        arrival_time=self.arrival_time, parent_id=self.request_id, index=index)
        child.seed = self.seed
        child.max_output_tokens = self.max_output_tokens
        return child

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, "
                f"tokens={self.num_computed_tokens}/{self.num_tokens}, "
                f"prompt={self.num_prompt_tokens})")


class InvalidRequest(ValueError):
    """A request the engine cannot run, with the request field at fault (`param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
