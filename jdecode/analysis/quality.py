"""Quality metrics for lossy decoding methods (early exit, mixture-of-depths, cascades, typical
acceptance), always reported beside their cost:

- token agreement with the full model's greedy output;
- per-token KL to the full model and top-1 agreement, teacher-forced on the same text;
- perplexity on held-out natural text (`jdecode.data.heldout`);
- accuracy on the checkable task set (`jdecode.data.tasks`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.data.tasks import Task, is_correct


def kl_per_position(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
    """KL(p || q) of each position's next-token distribution: [..., V] -> [...] f32.

    With p the full model (or a teacher) this is the forward KL: q is penalized wherever it
    misses mass that p would sample.
    """
    log_p = jax.nn.log_softmax(p_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(q_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def token_agreement(outputs: Sequence[Sequence[int]], references: Sequence[Sequence[int]]
                    ) -> dict[str, float]:
    """Greedy-token agreement with the full model's outputs, over prompts.

    Returns:
      agreement: share of reference positions holding the same token (positions past the end
        of the shorter output disagree); prefix: mean share of each reference matched before
        the first difference (what a lossless method gets as 1.0); exact: share of outputs
        identical to their reference.
    """
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references")
    same = total = 0
    prefixes, exact = [], 0
    for out, ref in zip(outputs, references):
        n = len(ref)
        agree = [i < len(out) and out[i] == ref[i] for i in range(n)]
        same += sum(agree)
        total += n
        first_diff = agree.index(False) if False in agree else n
        prefixes.append(first_diff / max(n, 1))
        exact += list(out) == list(ref)
    return {"agreement": same / max(total, 1), "prefix": float(np.mean(prefixes)),
            "exact": exact / max(len(references), 1)}


def teacher_forced_metrics(full_logits: jax.Array, method_logits: jax.Array,
                           mask: jax.Array) -> dict[str, float]:
    """Mean KL(full || method) and top-1 agreement over valid positions of the same text.

    full_logits, method_logits: [B, T, V]; mask: [B, T] (1 = a position whose next token
    counts).
    """
    mask = jnp.asarray(mask, jnp.float32)
    n = jnp.maximum(mask.sum(), 1.0)
    kl = jnp.sum(kl_per_position(full_logits, method_logits) * mask) / n
    top1 = jnp.sum((jnp.argmax(full_logits, -1) == jnp.argmax(method_logits, -1)) * mask) / n
    return {"kl": float(kl), "top1": float(top1)}


def nll_sums(logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> tuple[float, float]:
    """(sum of next-token negative log-likelihoods, number of predicted tokens).

    logits: [B, T, V] where position t predicts tokens[:, t + 1]; tokens: [B, T] int32;
    mask: [B, T] (1 = real token). A prediction counts when both t and t + 1 are real.
    """
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = tokens[:, 1:]
    nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]  # [B, T-1]
    valid = jnp.asarray(mask[:, 1:], jnp.float32) * jnp.asarray(mask[:, :-1], jnp.float32)
    return float(jnp.sum(nll * valid)), float(valid.sum())


def perplexity(nll_sum: float, count: float) -> float:
    """exp(mean negative log-likelihood per predicted token)."""
    return float(np.exp(nll_sum / max(count, 1.0)))


def task_accuracy(texts: Sequence[str], tasks: Sequence[Task]) -> dict[str, float]:
    """Share of tasks answered correctly (`tasks.is_correct`), overall and per task kind."""
    if len(texts) != len(tasks):
        raise ValueError(f"{len(texts)} outputs for {len(tasks)} tasks")
    right: dict[str, list[bool]] = {}
    for text, task in zip(texts, tasks):
        right.setdefault(task.kind, []).append(is_correct(task.answer, text))
    every = [r for rs in right.values() for r in rs]
    out = {"accuracy": float(np.mean(every)) if every else 0.0}
    out.update({f"accuracy_{kind}": float(np.mean(rs)) for kind, rs in right.items()})
    return out
