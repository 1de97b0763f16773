"""Acceptance rules over a verified candidate tree: which root-to-node path to keep, and the
bonus token after it. A chain is the one-child tree, so these cover speculative decoding too.

Every rule has the `AcceptFn` signature, so a method takes any of them (and a cascade's deferral
rule can join later):

    rule(tree, tokens [B, N], logits [B, N, V], draft_probs [B, N, V] | None, sampling, keys [B])
      -> Accepted

- `greedy_tree_accept`: the longest path that matches the target's argmax (lossless).
- `sampled_tree_accept`: multi-draft recursive rejection sampling (SpecInfer, Miao et al. 2024,
  as in EAGLE), whose output is distributed exactly as the target's; greedy rows stay greedy.
- `typical_tree_accept`: Medusa-2's typical acceptance (Cai et al. 2024, sec. 2.3.1). LOSSY.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.decoding.base import split_keys
from jdecode.decoding.drafters import filtered_probs
from jdecode.decoding.sampling import SamplingArrays
from jdecode.decoding.tree import Tree, path_to


@struct.dataclass
class Accepted:
    """What a rule keeps, per row; D = tree.max_depth. Feeds `StepOutput(tokens, num_accepted)`
    and `tree.commit_path(cache, positions, path)` directly."""

    tokens: jax.Array  # [B, D + 1] int32 emitted: the path's tokens after the root, then the
    #                    bonus token at num_accepted - 1 (repeated after it)
    num_accepted: jax.Array  # [B] int32 in [1, D + 1]: path nodes counting the root = tokens
    path: jax.Array  # [B, D + 1] int32 node indices, path[:, 0] = 0; repeats the last node

    @property
    def next_token(self) -> jax.Array:
        """[B] int32 the bonus token: the next step's root."""
        return jnp.take_along_axis(self.tokens, self.num_accepted[:, None] - 1, axis=1)[:, 0]

    @property
    def last_node(self) -> jax.Array:
        """[B] int32 the last accepted node (its hidden state is the next draft's input)."""
        return self.path[:, -1]


AcceptFn = Callable[
    [Tree, jax.Array, jax.Array, jax.Array | None, SamplingArrays | None, jax.Array | None],
    Accepted,
]


def emitted_tokens(tokens: jax.Array, path: jax.Array, num: jax.Array, bonus: jax.Array
                   ) -> jax.Array:
    """The tokens a step emits: tokens[path[1:num]] then the bonus ([B, D + 1] int32).

    tokens: [B, N] node tokens; path: [B, D + 1]; num: [B]; bonus: [B].
    """
    after_root = jnp.take_along_axis(tokens, path[:, 1:], axis=1)  # [B, D]
    after_root = jnp.concatenate([after_root, bonus[:, None]], axis=1)  # [B, D + 1]
    j = jnp.arange(path.shape[1])[None]
    return jnp.where(j < num[:, None] - 1, after_root, bonus[:, None]).astype(jnp.int32)


def longest_accepted_path(tree: Tree, ok: jax.Array, score: jax.Array | None = None
                          ) -> tuple[jax.Array, jax.Array]:
    """The deepest node whose path passes: every node on it but the root has ok set.

    Args:
      ok: [B, N] bool per-node test (ok[:, 0], the root, is ignored).
      score: optional [B, N] f32 tie-break among the deepest passing nodes (higher wins);
        remaining ties go to the lowest node index.
    Returns:
      path [B, D + 1] int32 (see `tree.path_to`) and num_accepted [B] int32 = its depth + 1.
    """
    ok = ok.at[:, 0].set(True)
    passes = ~jnp.any(tree.ancestors & ~ok[:, None, :], axis=-1)  # [B, N]
    depth = jnp.where(passes, tree.depths, -1)
    if score is not None:  # only the deepest passing nodes compete on score
        deepest = depth == depth.max(-1, keepdims=True)
        best = jnp.argmax(jnp.where(deepest, score, -jnp.inf), axis=-1)
    else:
        best = jnp.argmax(depth, axis=-1)  # first maximum: the lowest index
    return path_to(tree, best.astype(jnp.int32))


def greedy_tree_accept(tree: Tree, tokens: jax.Array, logits: jax.Array,
                       draft_probs: jax.Array | None = None,
                       sampling: SamplingArrays | None = None,
                       keys: jax.Array | None = None) -> Accepted:
    """The longest path whose every token is the target's argmax at its parent. Lossless.

    Args:
      tree: the verified trees. tokens: [B, N] int32 node tokens. logits: [B, N, V] target
        logits from `verify_tree`. draft_probs, sampling, keys: unused (the `AcceptFn` shape).
    Returns:
      `Accepted`: the emitted tokens are exactly greedy decoding's next num_accepted tokens.
    """
    target = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B, N] choice after each node
    wanted = jnp.take_along_axis(target, jnp.maximum(tree.parents, 0), axis=1)
    path, num = longest_accepted_path(tree, tokens == wanted)
    bonus = jnp.take_along_axis(target, path[:, -1:], axis=1)[:, 0]
    return Accepted(emitted_tokens(tokens, path, num, bonus), num, path)


def sampled_tree_accept(tree: Tree, tokens: jax.Array, logits: jax.Array,
                        draft_probs: jax.Array | None, sampling: SamplingArrays | None,
                        keys: jax.Array | None) -> Accepted:
    """Multi-draft recursive rejection sampling; the emitted tokens follow the target exactly.

    At the current node (from the root) with target distribution r = p, each child x_i (in
    index order) is accepted with probability min(1, r(x_i) / q_i(x_i)); on rejection
    r <- norm(max(0, r - q_i)) and the next child is tried. Acceptance moves to the child with
    r = p there; when no child is left the bonus token is drawn from r. Lossless when each
    child was drawn from q_i independently of its siblings given the parent (i.i.d. from the
    draft, or from different drafters), or is a deterministic candidate (q_i one-hot).

    Args:
      tree, tokens, logits: as `greedy_tree_accept`.
      draft_probs: [B, N, V] f32, row i the distribution node i's token was drawn from (row 0
        unused), or None: every candidate is deterministic (Medusa / EAGLE top-k, n-grams).
        None is lossless for sampled candidates too (any candidates fixed before the rule
        runs are), but accepts them less often than their q would.
      sampling: per-row parameters; p is the target's filtered distribution (`filtered_probs`),
        and rows with temperature 0 use the greedy rule. None means all greedy.
      keys: [B] typed PRNG keys, one per row (used only by sampling rows).
    Returns:
      `Accepted`.
    """
    greedy = greedy_tree_accept(tree, tokens, logits)

    def sampled(_):
        p = filtered_probs(logits, sampling)  # [B, N, V]
        q_axis = None if draft_probs is None else 0
        walk = jax.vmap(_rejection_walk, in_axes=(0, 0, 0, 0, q_axis))
        cur, bonus = walk(keys, tree.parents, tokens, p, draft_probs)
        path, num = path_to(tree, cur)
        return Accepted(emitted_tokens(tokens, path, num, bonus), num, path)

    return _with_greedy_rows(sampling, keys, greedy, sampled)


def _rejection_walk(key, parents, tokens, p, q):
    """One row of `sampled_tree_accept`: (last accepted node, bonus token), both int32."""
    n, v = p.shape
    k_accept, k_bonus = jax.random.split(key)
    u = jax.random.uniform(k_accept, (n,))

    def visit(carry, i):
        cur, r = carry  # r: the distribution still to be matched at `cur`, normalized
        x = tokens[i]
        q_i = jax.nn.one_hot(x, v, dtype=p.dtype) if q is None else q[i]
        child = parents[i] == cur
        # u < r/q written as u * q < r: no division, and q > 0 for any token drawn from q.
        accept = child & (u[i] * q_i[x] < r[x])
        residual = jnp.maximum(r - q_i, 0.0)
        total = residual.sum()
        # total == 0 means r <= q everywhere, i.e. r == q: rejection had probability 0, and
        # only float rounding got here; keep r.
        residual = jnp.where(total > 0, residual / jnp.where(total > 0, total, 1.0), r)
        r = jnp.where(accept, p[i], jnp.where(child, residual, r))
        return (jnp.where(accept, i, cur), r), None

    # Children follow their parent (topological order), so one pass in index order tries each
    # node's children in turn, after the node itself was accepted.
    (cur, r), _ = jax.lax.scan(visit, (jnp.int32(0), p[0]), jnp.arange(1, n, dtype=jnp.int32))
    bonus = jax.random.categorical(k_bonus, jnp.log(r)).astype(jnp.int32)
    return cur, bonus


def typical_tree_accept(tree: Tree, tokens: jax.Array, logits: jax.Array,
                        draft_probs: jax.Array | None, sampling: SamplingArrays | None,
                        keys: jax.Array | None, *, epsilon: float = 0.09, alpha: float = 0.3
                        ) -> Accepted:
    """Medusa-2's typical acceptance. LOSSY: it does not sample the target's distribution.

    With p the target's filtered distribution at a node (temperature, top-k/p) and H its
    entropy, a child token x passes if p(x) > min(epsilon, alpha * exp(-H)). The deepest path
    of passing nodes is kept (ties: the highest path log-likelihood), and the bonus token is
    drawn from p restricted to the tokens that would pass (the argmax always does). epsilon -> 0
    accepts every candidate of nonzero probability (the deepest path, no quality check) with a
    bonus drawn from p itself; temperature -> 0 approaches the greedy rule, which rows with
    temperature 0 use exactly. Bind epsilon and alpha with functools.partial for an `AcceptFn`.

    Args:
      tree, tokens, logits, sampling, keys: as `sampled_tree_accept` (draft_probs unused).
      epsilon: the hard probability threshold (Medusa's posterior_threshold).
      alpha: the entropy-adaptive factor (Medusa's posterior_alpha).
    Returns:
      `Accepted`.
    """
    greedy = greedy_tree_accept(tree, tokens, logits)

    def typical(_):
        p = filtered_probs(logits, sampling)  # [B, N, V]
        # Medusa's smoothed entropy: log(p + 1e-5) stays finite where p == 0.
        entropy = -jnp.sum(p * jnp.log(p + 1e-5), axis=-1)  # [B, N]
        threshold = jnp.minimum(epsilon, alpha * jnp.exp(-entropy))  # [B, N]
        parent = jnp.maximum(tree.parents, 0)
        p_parent = jnp.take_along_axis(p, parent[..., None], axis=1)  # [B, N, V]
        p_token = jnp.take_along_axis(p_parent, tokens[..., None], axis=2)[..., 0]  # [B, N]
        ok = p_token > jnp.take_along_axis(threshold, parent, axis=1)
        log_p = jnp.log(p_token).at[:, 0].set(0.0)  # the root is given, not drafted
        # Path log-likelihood; a where, not a product: 0 * log(0) would be NaN.
        score = jnp.where(tree.ancestors, log_p[:, None, :], 0.0).sum(-1)  # [B, N]
        path, num = longest_accepted_path(tree, ok, score)
        rows = jnp.arange(tokens.shape[0])
        p_last = p[rows, path[:, -1]]  # [B, V]
        keep = (p_last >= threshold[rows, path[:, -1], None]) | (
            p_last == p_last.max(-1, keepdims=True))
        bonus = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, jnp.log(p_last), -jnp.inf))
        return Accepted(emitted_tokens(tokens, path, num, bonus.astype(jnp.int32)), num, path)

    return _with_greedy_rows(sampling, keys, greedy, typical)


def accept_step(rule: AcceptFn, tree: Tree, tokens: jax.Array, logits: jax.Array,
                sampling: SamplingArrays, keys: jax.Array) -> tuple[jax.Array, Accepted]:
    """A tree method's acceptance for one step: `greedy_tree_accept` for an all-greedy batch
    (static: no key is consumed and no vocabulary sorted), else `rule` with a fresh key per
    row. Returns the keys the state carries on, and what was accepted."""
    if sampling.all_greedy:
        return keys, greedy_tree_accept(tree, tokens, logits)
    keys, now = split_keys(keys)
    return keys, rule(tree, tokens, logits, None, sampling, now)


def _with_greedy_rows(sampling: SamplingArrays | None, keys: jax.Array | None,
                        greedy: Accepted, sampled: Callable[[None], Accepted]) -> Accepted:
    """`sampled` on rows with temperature > 0, `greedy` elsewhere; an all-greedy batch (static
    `all_greedy`, or at run time through `lax.cond`) never sorts the vocabulary."""
    if sampling is None or sampling.all_greedy:
        return greedy
    if keys is None:
        raise ValueError("keys=None with a sampling batch: pass one PRNG key per row, or mark "
                         "the batch all greedy (SamplingArrays.all_greedy)")

    def mixed(_):
        out = sampled(None)
        is_sampled = sampling.temperature > 0  # [B]
        return jax.tree_util.tree_map(
            lambda s, g: jnp.where(is_sampled.reshape(-1, *[1] * (s.ndim - 1)), s, g), out,
            greedy)

    if sampling.specialized:  # known on the host: some row samples
        return mixed(None)
    return jax.lax.cond(jnp.any(sampling.temperature > 0), mixed, lambda _: greedy, None)
