"""Paged KV-cache allocator: free list, ref counts, chained-hash prefix caching, copy-on-write.

Host side only (no jax). PagedAttention's block manager (Kwon et al., 2023) with vLLM v1's
prefix cache: full pages are keyed by a hash chained over every token before them.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from jdecode.engine.request import Request

_NO_PAGES = np.zeros(0, np.int32)
_NO_PAGES.flags.writeable = False


def hash_page(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Chained page hash: equal hashes mean equal tokens in this page *and* every page before."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


class BlockManager:
    """Owns `num_pages` KV pages of `page_size` token slots each.

    A page is either free (ref count 0, in the free queue) or used (ref count > 0). Free pages
    may still hold a cached prefix (a hash); they are evicted in LRU order when the free queue
    hands them out again. Free pages without a hash are worth nothing, so they sit at the front
    of the queue and are reused before any cached page is evicted.

    Only pages whose tokens have all been *computed* (by a launched step) get a hash. A page filled
    by the step being scheduled is hashed on the request's next allocation or when it is freed,
    so a prefix hit never reads a page whose K/V a preempted request never wrote.

    Args:
        num_pages: pages in the device pool.
        page_size: token slots per page.
        enable_prefix_caching: share full pages between requests with equal prefixes.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True
                 ) -> None:
        if num_pages <= 0 or page_size <= 0:
            raise ValueError(f"num_pages={num_pages}, page_size={page_size}: both must be > 0")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_pages
        self.page_hash: list[bytes | None] = [None] * num_pages
        self.cached: dict[bytes, int] = {}  # hash -> page id
        # Front = next page handed out. Insertion order is the eviction (LRU) order.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_pages))
        self.req_pages: dict[str, list[int]] = {}
        # req_pages again as int32 arrays (capacity doubling), kept in step with every change:
        # the runner copies a step's block-table rows from them. From the lists, numpy's
        # per-element conversion cost ~3 us a row at 1000 tokens (engine_host_cpu.md).
        self._arrays: dict[str, np.ndarray] = {}
        # Pages [0, n) of a request already offered to the prefix cache.
        self._num_hashed: dict[str, int] = {}
        # (src, dst) page copies the runner must apply before the next forward (copy-on-write).
        self.pending_copies: list[tuple[int, int]] = []

    # ---- accounting ----------------------------------------------------------------------

    @property
    def num_free_pages(self) -> int:
        return len(self.free_queue)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of pages referenced by some request (cached-but-free pages count as free)."""
        return self.num_used_pages / self.num_pages

    def page_ids(self, request_id: str) -> list[int]:
        """The request's page table (logical page i -> physical page id)."""
        return self.req_pages.get(request_id, [])

    def page_array(self, request_id: str) -> np.ndarray:
        """`page_ids` as an int32 array: a read-only view, valid until the request's pages
        next change."""
        n = len(self.req_pages.get(request_id, ()))
        if not n:
            return _NO_PAGES
        view = self._arrays[request_id][:n]
        view.flags.writeable = False
        return view

    def _mirror(self, rid: str, first: int) -> None:
        """Brings the request's array up to its list from index `first` on."""
        pages = self.req_pages[rid]
        arr = self._arrays.get(rid)
        if arr is None or len(arr) < len(pages):
            grown = np.zeros(max(16, 2 * len(pages)), np.int32)
            if arr is not None:
                grown[:first] = arr[:first]
            arr = self._arrays[rid] = grown
        arr[first:len(pages)] = pages[first:]

    def pages_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    # ---- prefix cache --------------------------------------------------------------------

    def _update_hashes(self, req: Request) -> None:
        """Extends req.page_hashes to every full page of its known tokens."""
        ps = self.page_size
        for i in range(len(req.page_hashes), req.num_tokens // ps):
            parent = req.page_hashes[i - 1] if i else None
            req.page_hashes.append(hash_page(parent, req.all_token_ids[i * ps:(i + 1) * ps]))

    def find_cached_prefix(self, req: Request) -> list[int]:
        """Pages holding the longest cached prefix of `req` (no side effects).

        At most (num_tokens - 1) // page_size pages hit: the last token must be computed to give
        the logits of the next one.
        """
        if not self.enable_prefix_caching:
            return []
        self._update_hashes(req)
        hits = []
        for h in req.page_hashes[:(req.num_tokens - 1) // self.page_size]:
            page = self.cached.get(h)
            if page is None:
                break
            hits.append(page)
        return hits

    def _cache_computed_pages(self, req: Request) -> None:
        """Offers the request's fully computed pages to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        pages = self.req_pages[req.request_id]
        # A page computed by a step in flight is hashed only once its tokens are on the host; its
        # K/V is written before any later step can read it (the device runs steps in order).
        num_full = min(req.num_computed_tokens, req.num_tokens) // self.page_size
        num_full = min(num_full, len(pages))
        start = self._num_hashed.get(req.request_id, 0)
        if num_full <= start:
            return
        self._update_hashes(req)
        for i in range(start, num_full):
            page, h = pages[i], req.page_hashes[i]
            # A page already hashed is shared (a hit or a fork). A duplicate of a cached prefix
            # (computed twice in one step) stays unhashed and is freed as worthless.
            if self.page_hash[page] is None and h not in self.cached:
                self.cached[h] = page
                self.page_hash[page] = h
        self._num_hashed[req.request_id] = num_full

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix held by free pages (used pages keep theirs)."""
        for page in list(self.free_queue):
            h = self.page_hash[page]
            if h is not None:
                del self.cached[h]
                self.page_hash[page] = None

    # ---- allocation ----------------------------------------------------------------------

    def _pop_free(self) -> int:
        page, _ = self.free_queue.popitem(last=False)
        h = self.page_hash[page]
        if h is not None:  # evict the least recently freed cached prefix
            del self.cached[h]
            self.page_hash[page] = None
        self.ref_counts[page] = 1
        return page

    def _touch(self, page: int) -> None:
        if self.ref_counts[page] == 0:
            del self.free_queue[page]
        self.ref_counts[page] += 1

    def _release(self, page: int) -> None:
        self.ref_counts[page] -= 1
        if self.ref_counts[page] < 0:
            raise RuntimeError(f"page {page} released more often than referenced")
        if self.ref_counts[page] == 0:
            self.free_queue[page] = None  # most recently used: evicted last
            if self.page_hash[page] is None:
                self.free_queue.move_to_end(page, last=False)

    def allocate_slots(self, req: Request, num_new_tokens: int,
                       cached_pages: Sequence[int] = ()) -> bool:
        """Makes room for `num_new_tokens` tokens after req.num_computed_tokens.

        Atomic: on False nothing changed. The caller advances num_computed_tokens.

        Args:
            req: the request; its first allocation may pass `cached_pages`.
            num_new_tokens: tokens computed this step (0 just takes the cached pages).
            cached_pages: prefix-cache hits from `find_cached_prefix`; the new tokens start
                after them, at req.num_computed_tokens + len(cached_pages) * page_size.

        Returns:
            False when the free queue cannot supply the pages (the caller preempts or waits).
        """
        rid = req.request_id
        pages = self.req_pages.get(rid, [])
        if cached_pages and pages:
            raise ValueError(f"request {rid!r} already holds pages; prefix hits only apply to "
                             "a request's first allocation")
        ps = self.page_size
        if pages:
            self._cache_computed_pages(req)
            # Most decode steps: the tokens fit the pages held and their page is not shared
            # with a fork, so nothing changes (what the general path below would conclude; it
            # runs for every running sequence every step). Tested here, before the general
            # path's page count: returning after it instead (num_new_pages == 0, no copy) made
            # the schedule phase ~10% slower at 64 sequences (engine_host_cpu.md).
            start = req.num_computed_tokens
            if start + num_new_tokens <= len(pages) * ps and (
                    num_new_tokens == 0 or start % ps == 0
                    or self.ref_counts[pages[start // ps]] == 1):
                return True
        start = req.num_computed_tokens + len(cached_pages) * ps
        end = start + num_new_tokens
        num_new_pages = max(0, self.pages_needed(end) - len(pages) - len(cached_pages))
        # Writing into a partly filled page that a fork shares needs a private copy first.
        cow = (num_new_tokens > 0 and start % ps != 0
               and self.ref_counts[pages[start // ps]] > 1)
        # Cached pages sitting in the free queue leave it when touched.
        available = self.num_free_pages
        if cached_pages:
            available -= sum(1 for p in cached_pages if self.ref_counts[p] == 0)
        if num_new_pages + cow > available:
            return False
        pages = self.req_pages.setdefault(rid, pages)
        first = len(pages)  # the array changes from here (or from a copied page, below)
        for page in cached_pages:
            self._touch(page)
            pages.append(page)
        if cached_pages:
            self._num_hashed[rid] = len(cached_pages)
        if cow:
            i = start // ps
            src, dst = pages[i], self._pop_free()
            self.ref_counts[src] -= 1  # stays >= 1: another sequence still shares it
            pages[i] = dst
            self.pending_copies.append((src, dst))
            first = min(first, i)
        for _ in range(num_new_pages):
            pages.append(self._pop_free())
        if first < len(pages):
            self._mirror(rid, first)
        return True

    def fork(self, parent: Request, child: Request) -> None:
        """Gives `child` the parent's pages (shared, copy-on-write)."""
        if child.request_id in self.req_pages:
            raise ValueError(f"fork target {child.request_id!r} already holds pages")
        pages = list(self.page_ids(parent.request_id))
        for page in pages:
            self.ref_counts[page] += 1
        self.req_pages[child.request_id] = pages
        if pages:
            self._mirror(child.request_id, 0)
        self._num_hashed[child.request_id] = self._num_hashed.get(parent.request_id, 0)

    def free(self, req: Request) -> None:
        """Releases every page of `req` at once (finish, abort or preemption)."""
        rid = req.request_id
        if rid not in self.req_pages:
            return
        self._cache_computed_pages(req)
        pages = self.req_pages.pop(rid)
        self._arrays.pop(rid, None)
        self._num_hashed.pop(rid, None)
        # Reverse order: the prefix's tail is freed first, so it is evicted before its head.
        for page in reversed(pages):
            self._release(page)
        # A copy into a page the request no longer owns must not run (the page may be reused).
        freed = {p for p in pages if self.ref_counts[p] == 0}
        self.pending_copies = [(s, d) for s, d in self.pending_copies if d not in freed]

    def take_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write page copies scheduled since the last call."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def check_invariants(self) -> None:
        """Raises AssertionError if the pool's bookkeeping is inconsistent (for tests)."""
        refs = [0] * self.num_pages
        for pages in self.req_pages.values():
            for p in pages:
                refs[p] += 1
        assert refs == self.ref_counts, "ref counts differ from the page tables"
        for rid, pages in self.req_pages.items():
            assert self.page_array(rid).tolist() == pages, f"{rid}'s page array is stale"
        assert all(r >= 0 for r in self.ref_counts)
        used = sum(r > 0 for r in self.ref_counts)
        assert used + self.num_free_pages == self.num_pages, "free + used != total"
        assert all(self.ref_counts[p] == 0 for p in self.free_queue), "a free page is referenced"
        for h, p in self.cached.items():
            assert self.page_hash[p] == h, f"page {p} lost its hash"
        assert sum(h is not None for h in self.page_hash) == len(self.cached)
