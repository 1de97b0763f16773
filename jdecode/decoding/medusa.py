"""Medusa decoding (Cai et al. 2024): the heads' top-k candidates fill a static tree, the target
scores every node in one `verify_tree` pass, an acceptance rule keeps a path, and the path's
last hidden state feeds the heads for the next step. One target pass per step.

`heads_decoder` is shared with blockwise parallel decoding (`jdecode.decoding.blockwise`),
whose tree is the chain of the heads' top-1 tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.analysis.spec_cost import expected_tokens_tree
from jdecode.cache.dense import with_scratch
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.acceptance import (
    AcceptFn,
    accept_step,
    sampled_tree_accept,
    typical_tree_accept,
)
from jdecode.decoding.autoregressive import autoregressive
from jdecode.decoding.base import (
    Decoder,
    DecodeState,
    StepOutput,
    by_batch,
    parse_plan,
    plan_lookup,
    sample_next,
)
from jdecode.decoding.heads import bundle, head_logits, load_heads, rank_accuracy
from jdecode.decoding.methods import MethodBuild, register
from jdecode.decoding.tree import StaticTree, commit_path
from jdecode.io.registry import Model
from jdecode.options import option


@struct.dataclass
class HeadsAux:
    cache: Any  # target dense cache [L, B, max_len + N - 1 (rounded up, `with_scratch`), K, D]
    hidden: jax.Array  # [B, E] final-normed hidden at positions - 1: the heads' input


def medusa_tree(accuracy: Sequence[Sequence[float]], num_nodes: int) -> StaticTree:
    """Medusa's greedy tree: the num_nodes - 1 nodes of largest path probability.

    A node's path probability (the product of its ranks' accuracies, `expected_tokens_tree`)
    is at most its parent's, so the best set is closed under taking parents, and growing the
    tree from the root by always adding the most probable child of a chosen node finds it: the
    tree maximizes the expected accepted length under the node budget.

    Args:
      accuracy: [depth][rank] measured probability that the rank-th candidate of that depth's
        head is the target's token (`heads.rank_accuracy`); its shape bounds the tree.
      num_nodes: nodes including the root (1 = the root alone: plain decoding).
    Returns:
      the StaticTree (ties go to the lexicographically smaller path).
    """
    if num_nodes < 1:
        raise ValueError(f"num_nodes={num_nodes}: a tree has at least its root")
    frontier = [(-p, (r,)) for r, p in enumerate(accuracy[0])] if accuracy else []
    heapq.heapify(frontier)
    chosen = []
    while frontier and len(chosen) < num_nodes - 1:
        neg_p, path = heapq.heappop(frontier)
        chosen.append(path)
        if len(path) < len(accuracy):
            for r, p in enumerate(accuracy[len(path)]):
                heapq.heappush(frontier, (neg_p * p, path + (r,)))
    return StaticTree.from_paths(chosen)


def chain_tree(depth: int) -> StaticTree:
    """The chain of top-1 candidates, depth nodes below the root (blockwise decoding)."""
    return StaticTree.from_paths([(0,) * d for d in range(1, depth + 1)])


def heads_decoder(cfg: ModelConfig, max_len: int, trees: Mapping[int, StaticTree],
                  impl: str = "xla", rule: AcceptFn = sampled_tree_accept) -> Decoder:
    """Decodes with heads proposing a static tree per step; params = `heads.bundle(...)`.

    The tree is chosen when the step is traced, from the (static) batch size: `trees` maps a
    batch size to the tree used from that size up, so a large batch can verify a smaller tree,
    a chain, or the root alone: that is the `autoregressive` decoder itself (heads skipped, no
    tree bookkeeping), so a plan that switches speculation off costs what plain decoding does.

    Args:
      cfg: the target's config. max_len: cache slots per sequence before the tree's scratch
        slots. trees: batch size -> StaticTree (key 1 for a single tree). impl: attention.
      rule: the `AcceptFn` for batches that sample (greedy ones take `greedy_tree_accept`,
        statically).
    Returns:
      a Decoder emitting up to the batch size's tree depth + 1 tokens per step.
    """

    def init(params, prompt, lengths, sampling, keys, track_seen=False):
        if track_seen:
            raise ValueError("repetition_penalty != 1 is not supported by tree decoding (the "
                             "penalty would change inside one verified path): set it to 1 or "
                             "use the autoregressive method")
        b = prompt.shape[0]
        spec = plan_lookup(trees, b)
        cache = phases.layout_cache(params, cfg, b, with_scratch(max_len, spec.num_nodes - 1))
        logits, hidden, cache = phases.prefill(params, cache, prompt, lengths, cfg=cfg, impl=impl)
        state = DecodeState(tokens=jnp.zeros((b,), jnp.int32), positions=lengths, keys=keys,
                            sampling=sampling, seen=None, aux=HeadsAux(cache, hidden))
        first, state = sample_next(logits, state)
        return state.replace(tokens=first)

    def step(params, state):
        aux, b = state.aux, state.tokens.shape[0]
        spec = plan_lookup(trees, b)
        cand_logits = head_logits(params, params.extra, aux.hidden)[:, :spec.max_depth]
        top_k = max(spec.ranks) + 1
        cands = jax.lax.top_k(cand_logits, top_k)[1].astype(jnp.int32)  # [B, D, top_k]
        tokens = spec.fill(state.tokens, cands)  # [B, N]
        tree = spec.arrays(b)
        # Rows that finished long ago keep stepping: clamp them inside the buffer.
        pos = jnp.minimum(state.positions, max_len - 1)
        chain = spec.parents == tuple(range(-1, spec.num_nodes - 1))
        if chain:  # nodes already sit at slot = position: no mask, nothing to commit
            seq_pos = pos[:, None] + jnp.arange(spec.num_nodes)
            logits, hidden, cache = phases.verify(params, aux.cache, tokens, seq_pos, cfg=cfg,
                                                  impl=impl)
        else:
            logits, hidden, cache = phases.verify_tree(params, aux.cache, tokens, pos, tree,
                                                       cfg=cfg, impl=impl)
        keys, accepted = accept_step(rule, tree, tokens, logits, state.sampling, state.keys)
        if not chain:
            cache = commit_path(cache, pos, accepted.path)
        rows = jnp.arange(b)
        state = state.replace(tokens=accepted.next_token,
                              positions=state.positions + accepted.num_accepted, keys=keys,
                              aux=HeadsAux(cache, hidden[rows, accepted.last_node]))
        return state, StepOutput(accepted.tokens, accepted.num_accepted)

    tree_decoder = Decoder(init=init, step=step)
    plain = autoregressive(cfg, max_len, impl)
    return by_batch(lambda b: plain if plan_lookup(trees, b).num_nodes == 1 else tree_decoder)


# The per-batch plan a head-tree method follows unless told otherwise: verify the root alone
# (plain decoding) from batch 4 up. `scripts/spec_plan.py` chose it from the H200 sweep of the
# default model (benchmarks/medusa_eagle_batches_h200.md -> benchmarks/spec_plan_h200.json):
# every tree ran at 0.39-0.81x of plain decoding from batch 4 on. A larger model, whose step is
# bound by bytes rather than launches, keeps trees paying to larger batches: measure it and
# pass its own plan (or {} for the tree at every batch size).
MEASURED_PLAN = {4: 1}


def acceptance_describe(trees: Mapping[int, StaticTree], accuracy: Sequence[Sequence[float]]):
    """describe(stats) for head-tree methods: the tree used at the result's batch size, its
    expected tokens per step from the heads' held-out accuracies, and the acceptance rate."""

    def describe(stats: dict) -> dict:
        spec = plan_lookup(trees, int(stats.get("batch", 1)))
        mean = stats["mean_accepted"]
        return {"mean_accepted": mean, "tree_nodes": spec.num_nodes, "depth": spec.max_depth,
                "predicted_tokens": expected_tokens_tree(spec.paths, accuracy),
                "acceptance_rate": (mean - 1.0) / max(spec.max_depth, 1)}

    return describe


@dataclasses.dataclass(frozen=True)
class MedusaOptions:
    heads: str = option("artifacts/smollm2-135m-medusa.tgz", "Medusa heads: a `jdecode "
                        "train medusa` artifact (directory or .tgz; the default model's are "
                        "committed)")
    tree_nodes: int = option(64, "nodes verified per step, root included: the tree of largest "
                             "expected accepted length from the heads' held-out accuracies "
                             "(Medusa's greedy construction); 1 = plain decoding")
    top_k: int = option(10, "candidates per head the tree may draw on")
    num_heads: int = option(0, "heads used (the tree's depth); 0 = all")
    nodes_by_batch: dict | None = option(  # noqa: RUF009 (`option` returns a field)
        None, "batch size -> tree_nodes from that size up, e.g. {16: 8, 64: 1} (the cost "
        "model's per-batch choice; 1 = plain decoding); null = the plan measured for the "
        "default model, plain decoding from batch 4 ({4: 1}); {} = the tree at every size")

    def __post_init__(self) -> None:
        if self.tree_nodes < 1:
            raise ValueError(f"tree_nodes={self.tree_nodes}: verify at least the root (1 = "
                             "plain decoding)")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.num_heads < 0:
            raise ValueError(f"num_heads={self.num_heads}: 0 (all) or a positive count")
        if self.nodes_by_batch is None:
            object.__setattr__(self, "nodes_by_batch", dict(MEASURED_PLAN))
        parse_plan(self.nodes_by_batch, self.tree_nodes, "nodes_by_batch")


@dataclasses.dataclass(frozen=True)
class MedusaTypicalOptions(MedusaOptions):
    epsilon: float = option(0.09, "typical acceptance's hard threshold (Medusa's "
                            "posterior_threshold)")
    alpha: float = option(0.3, "typical acceptance's entropy factor (Medusa's posterior_alpha)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.epsilon <= 1.0 or self.alpha < 0.0:
            raise ValueError(f"epsilon={self.epsilon}, alpha={self.alpha}: epsilon lies in "
                             "[0, 1] and alpha is >= 0")


def load_for_method(model: Model, path: str, num_heads: int, top_k: int
                    ) -> tuple[Model, list[list[float]]]:
    """The target bundled with its heads (the first num_heads; 0 = all) and their measured
    [depth][rank] accuracies, cut to the heads and the top_k ranks used."""
    heads, manifest = load_heads(path, model)
    if num_heads > heads.num_heads:
        raise ValueError(f"num_heads={num_heads} but {path!r} has {heads.num_heads} heads: use "
                         f"at most {heads.num_heads} or train more (--set num_heads=...)")
    k = num_heads or heads.num_heads
    heads = jax.tree_util.tree_map(lambda a: a[:k], heads)
    accuracy = [row[:top_k] for row in rank_accuracy(manifest, path)[:k]]
    return dataclasses.replace(model, params=bundle(model.params, heads)), accuracy


def build_heads_method(model: Model, opts: MedusaOptions, impl: str, rule: AcceptFn
                       ) -> MethodBuild:
    model, accuracy = load_for_method(model, opts.heads, opts.num_heads, opts.top_k)
    trees = {batch: medusa_tree(accuracy, nodes) for batch, nodes in
             parse_plan(opts.nodes_by_batch, opts.tree_nodes, "nodes_by_batch").items()}
    return MethodBuild(model, lambda cfg, max_len: heads_decoder(cfg, max_len, trees, impl, rule),
                       describe=acceptance_describe(trees, accuracy))


@register("medusa", MedusaOptions, lossless=True,
          summary="Medusa heads propose a static tree from their top-k tokens, verified in one "
                  "pass (greedy, or lossless tree rejection sampling; Cai et al. 2024)")
def build_medusa(model: Model, opts: MedusaOptions, impl: str) -> MethodBuild:
    return build_heads_method(model, opts, impl, sampled_tree_accept)


@register("medusa-typical", MedusaTypicalOptions, lossless=False,
          summary="Medusa with Medusa-2's typical acceptance when sampling (LOSSY: it does not "
                  "sample the target's distribution; greedy rows stay exact)")
def build_medusa_typical(model: Model, opts: MedusaTypicalOptions, impl: str) -> MethodBuild:
    rule = functools.partial(typical_tree_accept, epsilon=opts.epsilon, alpha=opts.alpha)
    return build_heads_method(model, opts, impl, rule)
