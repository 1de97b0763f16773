"""Candidate token trees for one-pass verification (SpecInfer, Miao et al. 2024; Medusa, Cai et
al. 2024; EAGLE-2, Li et al. 2024): per-row tree arrays, their builders, and the commit of an
accepted path into the dense cache.

Cache layout. The dense cache keeps slot = position, which siblings (same depth, so the same
position) cannot share. `phases.verify_tree` therefore writes node i's K/V at slot
`root + i` (its RoPE position stays `root + depth[i]`), and `commit_path` then copies the
accepted path's nodes into slots `root .. root + len - 1`. Nodes are in topological order
(parent < child, so depth[i] <= i): the root and a chain's nodes already sit at their final
slot, so chain verification is the case with nothing to copy, and the copy is max_depth + 1
slots per layer, small next to the forward it saves (no recompute of the accepted K/V).
Slots past the accepted path keep stale nodes; the cache never shows a query a slot beyond its
own position, and each is rewritten before it becomes visible.

Extra slots: a step at root position p writes slots p .. p + N - 1, so a decoder allocates N - 1
slots more than autoregressive decoding of the same requests needs (max_len + N - 1, rounded
up as the cache requires). A node whose slot fell past the buffer would be dropped from the
cache and hidden from its descendants.

A step (`pos` = the root's position, `rule` any `acceptance.AcceptFn`):
    logits, hidden, cache = phases.verify_tree(params, cache, tokens, pos, tree, cfg=cfg)
    accepted = rule(tree, tokens, logits, draft_probs, sampling, keys)
    cache = commit_path(cache, pos, accepted.path)
    # next root accepted.next_token at pos + accepted.num_accepted;
    # StepOutput(accepted.tokens, accepted.num_accepted)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.cache.dense import DenseKVCache, copy_slots


@struct.dataclass
class Tree:
    """A candidate tree per row over N nodes (N static), in topological order.

    Node 0 is the root: the last emitted token, at the row's position, not yet in the cache.
    Every other node's parent has a smaller index. A static tree (Medusa) is one tree broadcast
    over rows; a dynamic one (EAGLE-2) differs per row and per step.
    """

    parents: jax.Array  # [B, N] int32, -1 at the root
    depths: jax.Array  # [B, N] int32, 0 at the root
    ancestors: jax.Array  # [B, N, N] bool, [b, i, j]: node j is node i or one of its ancestors
    max_depth: int = struct.field(pytree_node=False)  # static bound on depths (sizes paths)

    @property
    def num_nodes(self) -> int:
        return self.parents.shape[1]


def tree_from_parents(parents: jax.Array, max_depth: int | None = None) -> Tree:
    """Builds the tree arrays from parent indices; jittable, so dynamic trees build on device.

    Args:
      parents: [B, N] int32 parent of each node: -1 at node 0, parents[b, i] < i elsewhere
        (not checked: under jit it cannot be).
      max_depth: static bound on the depth of any node; None means N - 1 (a chain). Deeper
        nodes would get truncated ancestor rows.
    Returns:
      the `Tree` (depths and ancestor-or-self masks computed by walking up max_depth times).
    """
    parents = jnp.asarray(parents, jnp.int32)
    n = parents.shape[1]
    max_depth = n - 1 if max_depth is None else max_depth
    nodes = jnp.arange(n)
    ancestors = jnp.broadcast_to(jnp.eye(n, dtype=bool), (*parents.shape, n))
    hop = parents  # [B, N] each node's ancestor one level further up; -1 above the root
    for _ in range(max_depth):  # static and small (the tree's depth): unrolled
        ancestors = ancestors | (hop[..., None] == nodes)  # -1 matches no node
        up = jnp.take_along_axis(parents, jnp.maximum(hop, 0), axis=1)
        hop = jnp.where(hop >= 0, up, -1)
    depths = ancestors.sum(-1).astype(jnp.int32) - 1
    return Tree(parents=parents, depths=depths, ancestors=ancestors, max_depth=max_depth)


@dataclasses.dataclass(frozen=True)
class StaticTree:
    """A tree fixed ahead of time, as Medusa's `medusa_choices`; hashable (a static argument).

    Each non-root node is its root-to-node path of candidate ranks: (0,) is the top candidate
    at depth 1, (0, 2) the third candidate at depth 2 below it. Build with `from_paths`, which
    numbers the nodes Medusa's way: root first, then by (depth, path).
    """

    paths: tuple[tuple[int, ...], ...]  # node i >= 1 is paths[i - 1]

    @classmethod
    def from_paths(cls, paths: Sequence[Sequence[int]]) -> StaticTree:
        """Sorts, checks and numbers the paths (the root, the empty path, is implicit)."""
        ordered = sorted({tuple(int(r) for r in p) for p in paths}, key=lambda p: (len(p), p))
        known = set(ordered) | {()}
        for p in ordered:
            if not p or min(p) < 0:
                raise ValueError(f"tree path {p}: paths are non-empty tuples of ranks >= 0 "
                                 "(the root is implicit)")
            if p[:-1] not in known:
                raise ValueError(f"tree path {p} has no parent {p[:-1]}: add every prefix of "
                                 "a path to the tree")
        return cls(tuple(ordered))

    @property
    def num_nodes(self) -> int:
        return len(self.paths) + 1

    @property
    def max_depth(self) -> int:
        return max(map(len, self.paths), default=0)

    @property
    def parents(self) -> tuple[int, ...]:
        index = {p: i + 1 for i, p in enumerate(self.paths)} | {(): 0}
        return (-1, *(index[p[:-1]] for p in self.paths))

    @property
    def depths(self) -> tuple[int, ...]:
        return (0, *map(len, self.paths))

    @property
    def ranks(self) -> tuple[int, ...]:
        """Each node's candidate rank at its depth (0 for the root)."""
        return (0, *(p[-1] for p in self.paths))

    def arrays(self, batch: int) -> Tree:
        """The `Tree` for `batch` rows sharing this tree (constants under jit)."""
        parents = jnp.broadcast_to(jnp.asarray(self.parents, jnp.int32), (batch, self.num_nodes))
        return tree_from_parents(parents, self.max_depth)

    def fill(self, root: jax.Array, candidates: jax.Array) -> jax.Array:
        """Node tokens from ranked candidates per depth (Medusa heads' top-k, a draft's top-k).

        Args:
          root: [B] int32 the root token. candidates: [B, max_depth, K] int32, candidates[b, d]
            the ranked candidates for depth d + 1 (K > every rank in the tree).
        Returns:
          tokens [B, N] int32: node i gets candidates[:, depth_i - 1, rank_i].
        """
        depth = jnp.asarray(self.depths[1:], jnp.int32) - 1  # [N - 1]
        rank = jnp.asarray(self.ranks[1:], jnp.int32)
        return jnp.concatenate([root[:, None], candidates[:, depth, rank]], axis=1)


def path_to(tree: Tree, node: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The root-to-node path of one node per row.

    Args:
      node: [B] int32 node index.
    Returns:
      path [B, max_depth + 1] int32 (path[:, d] is the ancestor at depth d; entries past the
      node's depth repeat the node) and length [B] int32 = depth + 1.
    """
    rows = jnp.arange(node.shape[0])
    on_path = tree.ancestors[rows, node]  # [B, N]
    levels = jnp.arange(tree.max_depth + 1)
    at_level = on_path[:, None, :] & (tree.depths[:, None, :] == levels[None, :, None])  # [B,D+1,N]
    path = jnp.where(at_level.any(-1), jnp.argmax(at_level, axis=-1), node[:, None])
    return path.astype(jnp.int32), tree.depths[rows, node] + 1


def commit_path(cache: DenseKVCache, positions: jax.Array, path: jax.Array) -> DenseKVCache:
    """Moves the accepted path's K/V from their scratch slots into place after `verify_tree`.

    Node path[b, j] was written at slot positions[b] + path[b, j]; it moves to positions[b] + j.
    path[b, j] >= j (topological order) and all slots are read before any is written. Entries
    past the accepted length write slots beyond the new position, which stay invisible.

    Args:
      cache: the cache `verify_tree` returned. positions: [B] int32 the root's position.
      path: [B, D + 1] int32 accepted node indices from the root (`Accepted.path`).
    Returns:
      the cache with slots positions .. positions + D holding the path (in place if donated).
    """
    dst = positions[:, None] + jnp.arange(path.shape[1])  # [B, D + 1]
    return copy_slots(cache, positions[:, None] + path, dst)
