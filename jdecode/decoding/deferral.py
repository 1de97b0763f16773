"""Deferral rules of cascades: when a cheaper model's answer goes to the next, dearer model.

Sequence level (`jdecode.decoding.cascade`): a score per answer (higher = more confident) and a
threshold below which the row defers. Chow's rule (Chow 1970) on the answer's probability or its
mean token log-probability, the alpha-quantile of its token log-probabilities (Gupta et al. 2024,
"Language Model Cascades: Token-level Uncertainty and Beyond"), or a classifier trained on
features of the answer (`jdecode.training.deferral`); thresholds are calibrated to a deferral
rate or a quality. Token level (the speculative cascade, Narasimhan et al. 2025, "Faster
Cascades via Speculative Decoding"): delta(q, p) per drafted position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jdecode.cache.dense import DenseMeta, make_dense_attend
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.linear import make_linear
from jdecode.model.params import Params
from jdecode.model.transformer import forward

# -- token level: the speculative cascade's delta(q, p) ------------------------------------

TokenDeferral = Callable[[jax.Array, jax.Array], jax.Array]
TOKEN_RULES = ("chow", "diff", "opt")


def token_deferral(rule: str, alpha: float) -> TokenDeferral:
    """delta(q [..., V], p [..., V]) -> [...] bool: True where the target's p replaces the
    draft's q (Narasimhan et al. 2025, sec. 4, each the plug-in of a cost-quality objective).

    chow: defer when max q < 1 - alpha (the draft is unsure).
    diff: defer when max q < max p - alpha (the target is surer by a margin).
    opt: defer when max q < max p - alpha * TV(p, q) (the optimal rule: the margin must pay for
      the expected rejection, the total-variation distance between the two).
    """
    if rule == "chow":
        return lambda q, p: q.max(-1) < 1.0 - alpha
    if rule == "diff":
        return lambda q, p: q.max(-1) < p.max(-1) - alpha
    if rule == "opt":
        return lambda q, p: q.max(-1) < p.max(-1) - alpha * 0.5 * jnp.abs(p - q).sum(-1)
    raise ValueError(f"token deferral rule {rule!r}: choose one of {', '.join(TOKEN_RULES)}")


# -- sequence level: statistics of an answer under the model that wrote it ------------------


@struct.dataclass
class AnswerStats:
    """Per-token statistics of answers, teacher-forced under the model that wrote them."""

    logprob: jax.Array  # [B, N] f32 log-probability of each answer token
    max_prob: jax.Array  # [B, N] f32 the model's top-1 probability at that step
    entropy: jax.Array  # [B, N] f32 of the next-token distribution (nats)
    mask: jax.Array  # [B, N] f32, 1 = an answer token (rows are right-padded)
    pooled: jax.Array  # [B, E] f32 mean final hidden state over the steps that wrote it


def answer_stats(params: Params, tokens: jax.Array, prompt_lens: jax.Array,
                 answer_lens: jax.Array, *, cfg: ModelConfig, n: int, impl: str = "xla"
                 ) -> AnswerStats:
    """One teacher-forced pass over prompt + answer; the LM head runs on answer steps only.

    Args:
      tokens: [B, T] int32, row b = prompt (prompt_lens[b] tokens) then answer (answer_lens[b]
        tokens), right-padded. n: answer slots (static, >= every answer length).
    Returns:
      `AnswerStats` with N = n.
    """
    b, t = tokens.shape
    j = jnp.arange(n)
    # Answer token j sits at position prompt_len + j; the step before it predicted it.
    at = jnp.clip(prompt_lens[:, None] - 1 + j[None], 0, t - 1)  # [B, N]
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cache = phases.layout_cache(params, cfg, b, t)
    logits, hidden, _ = forward(params, tokens, positions, cache, DenseMeta(positions), cfg=cfg,
                                attend=make_dense_attend(cfg, impl), logits_at=at,
                                linear=make_linear(impl))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, N, V]
    answer = jnp.take_along_axis(tokens, jnp.clip(at + 1, 0, t - 1), axis=1)  # [B, N]
    mask = (j[None] < answer_lens[:, None]).astype(jnp.float32)
    pooled = jnp.sum(hidden.astype(jnp.float32) * mask[..., None], axis=1) / jnp.maximum(
        mask.sum(1), 1.0)[:, None]
    return AnswerStats(
        logprob=jnp.take_along_axis(logp, answer[..., None], axis=-1)[..., 0] * mask,
        max_prob=jnp.exp(logp.max(-1)) * mask,
        entropy=-jnp.sum(jnp.exp(logp) * logp, axis=-1) * mask, mask=mask, pooled=pooled)


def masked_quantile(values: jax.Array, mask: jax.Array, q: float) -> jax.Array:
    """The lower q-quantile of each row's valid values: [B, N] -> [B] (rows need >= 1)."""
    n = mask.sum(1).astype(jnp.int32)
    ordered = jnp.sort(jnp.where(mask > 0, values, jnp.inf), axis=1)  # valid values first
    idx = jnp.floor(q * (jnp.maximum(n, 1) - 1)).astype(jnp.int32)
    return jnp.take_along_axis(ordered, idx[:, None], axis=1)[:, 0]


# Scores of the rules that need no training; "classifier" comes from `classifier_logits`.
SEQUENCE_RULES = ("max-prob", "mean-logprob", "quantile", "classifier")
# Thresholds used when none is given or calibrated: a geometric-mean token probability of
# e^-1 ~ 0.37, an answer probability of e^-16, a 10th-percentile token of e^-4, odds of 1.
DEFAULT_THRESHOLDS = {"max-prob": -16.0, "mean-logprob": -1.0, "quantile": -4.0,
                      "classifier": 0.0}


def rule_scores(stats: AnswerStats, quantile: float = 0.1) -> dict[str, jax.Array]:
    """Each untrained rule's score [B] f32 (higher = keep the answer).

    max-prob: Chow's rule on the answer's probability, sum of token log-probabilities (the
      model's own top-1 sequence under greedy decoding; Chow-Sum in Gupta et al.).
    mean-logprob: the length-normalized form (Chow-Average).
    quantile: the `quantile`-quantile of the token log-probabilities (Chow-Quantile), which
      one unsure token can pull down where an average would hide it.
    """
    total = stats.logprob.sum(1)
    return {"max-prob": total,
            "mean-logprob": total / jnp.maximum(stats.mask.sum(1), 1.0),
            "quantile": masked_quantile(stats.logprob, stats.mask, quantile)}


# -- the trained classifier -------------------------------------------------------------------

STAT_FEATURES = ("mean_logprob", "sum_logprob", "min_logprob", "q10_logprob", "q25_logprob",
                 "q50_logprob", "mean_max_prob", "min_max_prob", "mean_entropy", "max_entropy",
                 "length")


def answer_features(stats: AnswerStats) -> jax.Array:
    """The classifier's input: token statistics then the pooled hidden state, [B, F] f32
    with F = len(STAT_FEATURES) + E."""
    m = stats.mask
    n = jnp.maximum(m.sum(1), 1.0)
    big = jnp.finfo(jnp.float32).max
    # Length is a count, not a share of N: N is a bucket, and a row's features must not
    # depend on the batch it came in.
    cols = [stats.logprob.sum(1) / n, stats.logprob.sum(1),
            jnp.where(m > 0, stats.logprob, big).min(1),
            masked_quantile(stats.logprob, m, 0.1), masked_quantile(stats.logprob, m, 0.25),
            masked_quantile(stats.logprob, m, 0.5),
            stats.max_prob.sum(1) / n, jnp.where(m > 0, stats.max_prob, big).min(1),
            stats.entropy.sum(1) / n, stats.entropy.max(1), m.sum(1)]
    return jnp.concatenate([jnp.stack(cols, axis=1), stats.pooled], axis=1)


@struct.dataclass
class DeferralClassifier:
    """A one-hidden-layer MLP on standardized answer features: logit of "keep the answer"."""

    mean: jax.Array  # [F] feature means over the training rows (frozen at init)
    scale: jax.Array  # [F] feature standard deviations (frozen at init)
    w1: jax.Array  # [F, H]
    b1: jax.Array  # [H]
    w2: jax.Array  # [H]
    b2: jax.Array  # []


def init_classifier(key: jax.Array, features: np.ndarray, hidden: int = 32
                    ) -> DeferralClassifier:
    """Random weights, standardization from `features` [N, F] (the training rows)."""
    f = features.shape[1]
    k1, k2 = jax.random.split(key)
    std = features.std(0)
    return DeferralClassifier(
        mean=jnp.asarray(features.mean(0), jnp.float32),
        scale=jnp.asarray(np.where(std > 1e-6, std, 1.0), jnp.float32),
        w1=jax.random.normal(k1, (f, hidden), jnp.float32) / np.sqrt(f),
        b1=jnp.zeros((hidden,), jnp.float32),
        w2=jax.random.normal(k2, (hidden,), jnp.float32) / np.sqrt(hidden),
        b2=jnp.zeros((), jnp.float32))


def classifier_logits(clf: DeferralClassifier, features: jax.Array) -> jax.Array:
    """features [B, F] -> [B] f32 logit that the answer is good (the classifier's score)."""
    x = (features - clf.mean) / clf.scale
    return jax.nn.gelu(x @ clf.w1 + clf.b1) @ clf.w2 + clf.b2


# -- calibration --------------------------------------------------------------------------------


def threshold_for_rate(scores: np.ndarray, rate: float) -> float:
    """The threshold at which the share `rate` of rows (the lowest scores) defers.

    scores: [N] calibration scores. Returns +inf for rate 1 (defer all), -inf for rate 0.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"defer_rate={rate} must lie in [0, 1]")
    s = np.sort(np.asarray(scores, np.float64))
    k = round(rate * len(s))
    if k >= len(s):
        return float("inf")
    return float("-inf") if k == 0 else float(s[k])


def threshold_for_quality(scores: np.ndarray, keep_quality: np.ndarray,
                          defer_quality: np.ndarray, target: float) -> float:
    """The highest-keeping threshold whose mean quality reaches `target`.

    Args:
      scores: [N] calibration scores. keep_quality: [N] a row's quality if it keeps this
        model's answer (1 = it matches the next model's, or is correct). defer_quality: [N] its
        quality if deferred (1 for "matches the next model"; the next model's correctness).
      target: the mean quality wanted, e.g. 0.95.
    Returns:
      the threshold (defer when score < threshold); +inf when only deferring everything
      reaches the target (or nothing does: then the next model's quality is the best there is).
    """
    order = np.argsort(np.asarray(scores, np.float64))
    s = np.asarray(scores, np.float64)[order]
    keep = np.asarray(keep_quality, np.float64)[order]
    defer = np.asarray(defer_quality, np.float64)[order]
    n = len(s)
    # Deferring the k lowest scores: quality = (sum of defer[:k] + sum of keep[k:]) / n.
    quality = (np.concatenate([[0.0], np.cumsum(defer)])
               + np.concatenate([np.cumsum(keep[::-1])[::-1], [0.0]])) / max(n, 1)
    for k in range(n + 1):  # the fewest deferrals first
        # A cut between equal scores cannot be expressed by a threshold: skip it.
        if quality[k] >= target - 1e-12 and (k in (0, n) or s[k - 1] < s[k]):
            return float("-inf") if k == 0 else (float("inf") if k == n else float(s[k]))
    return float("inf")


# -- the trained artifact: classifiers and calibration tables per transition -------------------

ARTIFACT_KIND = "deferral"


def transition(cheap: str, dear: str) -> str:
    """The name of a ladder step, from the two models' specs: "a -> b"."""
    return f"{cheap} -> {dear}"


@dataclasses.dataclass
class Calibration:
    """What `jdecode train deferral` learned about each transition "a -> b" of its ladder.

    classifiers: transition -> the trained `DeferralClassifier`. tables: transition -> the
    calibration rows: "scores" {rule: [N]} (every rule's score of model a's answer),
    "held_out" [N] bool (rows the classifier never trained on), "keep" and "defer"
    {label: [N] or None}: a row's quality if it keeps a's answer / defers to b, for the labels
    "match" (a's answer matches b's) and "correct" (on checkable tasks; None elsewhere).
    """

    classifiers: dict[str, DeferralClassifier]
    tables: dict[str, dict]
    quantile: float

    def table(self, step: str) -> dict:
        if step not in self.tables:
            raise ValueError(f"the deferral artifact was trained for the steps "
                             f"{sorted(self.tables)}, not {step!r}: train one for this ladder "
                             "(`jdecode train deferral --set models=[...]`)")
        return self.tables[step]

    def scores(self, step: str, rule: str) -> np.ndarray:
        """Calibration scores of `rule`: the classifier's on held-out rows only."""
        t = self.table(step)
        s = np.asarray(t["scores"][rule], np.float64)
        return s[np.asarray(t["held_out"], bool)] if rule == "classifier" else s

    def qualities(self, step: str, rule: str, label: str) -> tuple[np.ndarray, np.ndarray]:
        """(scores, keep quality, defer quality), each [M], over the rows `scores(step, rule)`
        covers where `label` is known (the checkable rows for "correct")."""
        t = self.table(step)
        keep, defer = t["keep"].get(label), t["defer"].get(label)
        if keep is None:
            raise ValueError(f"the deferral artifact has no {label!r} quality: train it with "
                             "checkable tasks (`--set num_tasks=...`)")
        rows = np.asarray(t["held_out"], bool) if rule == "classifier" else np.ones(
            len(keep), bool)
        known = rows & ~np.isnan(np.asarray(keep, np.float64))
        scores = np.asarray(t["scores"][rule], np.float64)[known]
        return scores, np.asarray(keep, np.float64)[known], np.asarray(defer, np.float64)[known]


def classifier_like(num_features: int, hidden: int) -> DeferralClassifier:
    """The classifier's structure (for restoring an artifact)."""
    f32 = jnp.float32
    return DeferralClassifier(
        jax.ShapeDtypeStruct((num_features,), f32), jax.ShapeDtypeStruct((num_features,), f32),
        jax.ShapeDtypeStruct((num_features, hidden), f32), jax.ShapeDtypeStruct((hidden,), f32),
        jax.ShapeDtypeStruct((hidden,), f32), jax.ShapeDtypeStruct((), f32))


def load_calibration(path: str | Path, target: Model) -> Calibration:
    """A `jdecode train deferral` artifact for `target` (the ladder's last model)."""

    def abstract(manifest):
        o = manifest["options"]
        return tuple(classifier_like(o["num_features"], o["hidden"]) for _ in o["transitions"])

    clfs, manifest = artifacts.load_artifact(path, ARTIFACT_KIND, target, abstract)
    o = manifest["options"]
    return Calibration(dict(zip(o["transitions"], clfs)), o["tables"], o["quantile"])
