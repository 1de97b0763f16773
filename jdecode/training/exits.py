"""Training early-exit heads on the frozen target (CALM, Schuster et al. 2022; LayerSkip's
early-exit loss, Elhoushi et al. 2024): each exit's norm and adapter learn the full model's
next-token distribution (KL), each exit's classifier learns whether the exit's argmax is the
full model's (binary cross-entropy); then thresholds are calibrated on held-out windows.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdecode.analysis.quality import kl_per_position
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.early_exit import (
    ARTIFACT_KIND,
    CRITERIA,
    ExitHeads,
    classifier_logit,
    exit_hidden,
    exit_layers,
    exit_logits,
    exit_score,
    init_exits,
    score_early_exit,
)
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.params import Params
from jdecode.model.transformer import collect_hidden, lm_head
from jdecode.options import option, to_dict
from jdecode.training import corpus as corpus_lib
from jdecode.training.corpus import Corpus, CorpusConfig
from jdecode.training.registry import register_trainer
from jdecode.training.trainer import Batch, Objective, TrainConfig, fit

# Quantiles of each criterion's held-out confidence tried as thresholds (high = strict).
CALIBRATION_QUANTILES = (0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995,
                         0.998, 0.999)
THRESHOLD_CRITERIA = tuple(c for c in CRITERIA if c != "fixed")


@dataclasses.dataclass(frozen=True)
class ExitOptions:
    every: int = option(3, "an exit after every N-th layer")
    rank: int = option(32, "rank of each exit's adapter (0: the norm only, as LayerSkip)")
    classifier_weight: float = option(1.0, "weight of the exit classifiers' loss")
    calibration_rows: int = option(64, "held-out windows the per-exit figures and the "
                                   "thresholds are measured on")
    save_dtype: str | None = option(None, "dtype of the saved heads (default: the target's)")
    propagated_calibration: bool = option(
        True, "also measure each candidate threshold with the early_exit method itself "
        "(skipped layers' K/V propagated), which the calibrated threshold is then taken from")

    def __post_init__(self) -> None:
        if self.every < 1 or self.rank < 0 or self.calibration_rows < 1:
            raise ValueError(f"every={self.every} and calibration_rows="
                             f"{self.calibration_rows} must be >= 1, rank={self.rank} >= 0")


def exit_terms(heads: ExitHeads, target: Params, tokens: jax.Array, mask: jax.Array,
               cfg: ModelConfig) -> dict[str, jax.Array]:
    """Per-exit sums over valid positions: kl, bce (classifier), top1 (exit argmax = full
    argmax) and cls_correct, each [N]; plus count.

    The target's logits and hidden states are computed here, not stored: [N, T, V] f32 for a
    corpus would not fit. One exit's logits are live at a time (`lax.map`, rematerialized).
    """
    full, _, feats = phases.score(target, tokens, cfg=cfg, hooks=collect_hidden(heads.layers))
    full, feats = jax.lax.stop_gradient(full), jax.lax.stop_gradient(feats)  # [B,T,V], [N,...]
    full_top = jnp.argmax(full, -1)

    @jax.checkpoint
    def one(args):
        norm, down, up, cls_w, cls_b, x = args
        head = ExitHeads(norm[None], down[None], up[None], cls_w[None], cls_b[None], (0,))
        h = exit_hidden(head, 0, x, cfg.rms_norm_eps)
        logits = lm_head(target, h)
        agree = (jnp.argmax(logits, -1) == full_top).astype(jnp.float32)  # [B, T]
        # The classifier reads the exit's head input but does not shape it.
        cls = classifier_logit(head, 0, jax.lax.stop_gradient(h))
        bce = optax.sigmoid_binary_cross_entropy(cls, agree)
        correct = ((cls > 0) == (agree > 0)).astype(jnp.float32)
        return tuple(jnp.sum(v * mask) for v in (kl_per_position(full, logits), bce, agree,
                                                  correct))

    kl, bce, top1, correct = jax.lax.map(one, (heads.norm, heads.down, heads.up, heads.cls_w,
                                               heads.cls_b, feats))
    return {"kl": kl, "bce": bce, "top1": top1, "cls_correct": correct, "count": mask.sum()}


def exits_objective(cfg: ModelConfig, classifier_weight: float) -> Objective:
    """frozen = the target's params; batch = {"tokens", "mask"}."""

    def loss(heads, target, batch):
        t = exit_terms(heads, target, batch["tokens"], batch["mask"], cfg)
        n = jnp.maximum(t["count"], 1.0)
        kl, bce = jnp.mean(t["kl"]) / n, jnp.mean(t["bce"]) / n
        return kl + classifier_weight * bce, {"kl": kl, "bce": bce}

    def eval_sums(heads, target, batch):
        t = exit_terms(heads, target, batch["tokens"], batch["mask"], cfg)
        return {"kl": jnp.mean(t["kl"]), "top1": jnp.mean(t["top1"]),
                "cls_acc": jnp.mean(t["cls_correct"]), "count": t["count"]}

    return Objective(loss, eval_sums)


@partial(jax.jit, static_argnames=("cfg",))
def exit_statistics(heads: ExitHeads, target: Params, tokens: jax.Array, *, cfg: ModelConfig
                    ) -> dict[str, jax.Array]:
    """Per exit and token, on the full model's residual stream: whether the exit's argmax is
    the full model's ("agree"), the KL to the full model ("kl") and every criterion's
    confidence (`exit_score`), each [N, B, T] f32."""
    hooks = collect_hidden(tuple(x for layer in heads.layers for x in (layer - 1, layer)))
    full, _, feats = phases.score(target, tokens, cfg=cfg, hooks=hooks)
    full_top = jnp.argmax(full, -1)
    eps = cfg.rms_norm_eps

    def one(j):  # static j: one exit's [B, T, V] logits live at a time
        x_in, x = feats[2 * j], feats[2 * j + 1]
        logits = exit_logits(target, heads, j, x, eps)
        out = {"agree": (jnp.argmax(logits, -1) == full_top).astype(jnp.float32),
               "kl": kl_per_position(full, logits)}
        for c in THRESHOLD_CRITERIA:
            out[c] = exit_score(c, target, heads, j, x_in, x, eps)
        return out

    per_exit = [one(j) for j in range(len(heads.layers))]
    return {k: jnp.stack([o[k] for o in per_exit]) for k in per_exit[0]}


def gather_statistics(heads: ExitHeads, target: Params, data: Batch, cfg: ModelConfig,
                      batch_size: int) -> dict[str, np.ndarray]:
    """`exit_statistics` of every valid token of `data`: [N, tokens] f32 each."""
    parts: dict[str, list] = {}
    for start in range(0, len(data["tokens"]), batch_size):
        mask = np.asarray(data["mask"][start:start + batch_size]) > 0
        stats = exit_statistics(heads, target, jnp.asarray(data["tokens"][start:start +
                                                                          batch_size]), cfg=cfg)
        for key, value in stats.items():
            parts.setdefault(key, []).append(np.asarray(value)[:, mask])
    return {key: np.concatenate(v, axis=1) for key, v in parts.items()}


def per_exit_metrics(heads: ExitHeads, stats: dict[str, np.ndarray]) -> dict[str, dict]:
    """Mean top-1 agreement and KL of each exit: {"top1": {"layer_<l>": ...}, "kl": {...}}."""
    return {name: {f"layer_{layer}": float(v) for layer, v in zip(heads.layers,
                                                                  stats[key].mean(1))}
            for name, key in (("top1", "agree"), ("kl", "kl"))}


def calibration_curve(heads: ExitHeads, stats: dict[str, np.ndarray], criterion: str,
                      num_layers: int) -> list[dict]:
    """Top-1 agreement with the full model, KL and the share of layers computed, per candidate
    threshold: quantiles of the criterion's confidence over every exit and token.

    A token leaves at the first exit whose confidence passes; its agreement and KL are that
    exit's on the full model's residual stream. That ignores how propagated K/V shift the
    states of later tokens (the early_exit method's own score measures it, teacher-forced).

    Returns:
      [{"threshold", "top1", "kl", "layer_share"}, ...], the threshold in the criterion's own
      units (`early_exit.CRITERIA`), from the loosest to the strictest.
    """
    scores = np.quantile(stats[criterion], CALIBRATION_QUANTILES)
    return [{"threshold": float(-score if criterion == "entropy" else score),
             **curve_point(heads, stats, criterion, float(score), num_layers)}
            for score in scores]


def curve_point(heads: ExitHeads, stats: dict[str, np.ndarray], criterion: str, score: float,
                num_layers: int) -> dict[str, float]:
    """top1, kl and layer_share when tokens leave where the confidence reaches `score` (in
    `exit_score`'s units), from `exit_statistics` [N, M]."""
    passed = stats[criterion] >= score  # [N, M]
    leaves = passed.any(0)
    first = np.argmax(passed, axis=0)  # the first exit passing (0 where none does)
    cols = np.arange(passed.shape[1])
    depth = np.asarray([layer + 1 for layer in heads.layers], np.float64)
    return {"top1": float(np.where(leaves, stats["agree"][first, cols], 1.0).mean()),
            "kl": float(np.where(leaves, stats["kl"][first, cols], 0.0).mean()),
            "layer_share": float((np.where(leaves, depth[first], num_layers)
                                  / num_layers).mean())}


def propagated_curve(heads: ExitHeads, target: Params, data: Batch, cfg: ModelConfig,
                     criterion: str, thresholds: list[float], batch_size: int) -> list[dict]:
    """top1, kl and layer_share of the early_exit method itself at each threshold.

    Teacher-forced over `data` with a fresh cache per window (`score_early_exit`), so a token
    that left early hands its later layers propagated K/V, and the tokens after it attend to
    those: the states decoding sees. `calibration_curve` reads every exit off the full model's
    own states instead, and on the default model it promised agreement the method did not
    reach (benchmarks/depth_cpu.md: 0.97 promised, 0.70 measured).

    Returns:
      [{"threshold", "top1", "kl", "layer_share"}, ...] in the order of `thresholds` (the
      criterion's own units), averaged over the valid tokens of `data`.
    """
    score = jax.jit(partial(score_early_exit, cfg=cfg, criterion=criterion))
    full_fn = jax.jit(lambda p, t: phases.score(p, t, cfg=cfg)[0])
    # Batches outside, thresholds inside: one batch's full-model logits [B, T, V] are live at
    # a time (every window's would be gigabytes on the default model).
    sums = np.zeros((len(thresholds), 3))  # per threshold: agreeing, KL, layers computed
    count = 0.0
    for start in range(0, len(data["tokens"]), batch_size):
        tokens = jnp.asarray(data["tokens"][start:start + batch_size])
        mask = jnp.asarray(data["mask"][start:start + batch_size], jnp.float32)
        full = full_fn(target, tokens)
        count += float(mask.sum())
        for i, threshold in enumerate(thresholds):
            logits, computed = score(target, heads, jnp.float32(threshold), tokens)
            agree = (jnp.argmax(logits, -1) == jnp.argmax(full, -1)).astype(jnp.float32)
            sums[i] += np.asarray([(agree * mask).sum(),
                                   (kl_per_position(full, logits) * mask).sum(),
                                   (computed * mask).sum()], np.float64)
    points = []
    for threshold, (agreed, kl, layers) in zip(thresholds, sums / max(count, 1.0)):
        points.append({"threshold": float(threshold), "top1": float(agreed), "kl": float(kl),
                       "layer_share": float(layers / cfg.num_layers)})
    return points


def train_exits(target: Model, out_dir: str | Path, opts: ExitOptions | None = None,
                tc: TrainConfig | None = None, cc: CorpusConfig | None = None,
                prompts: list | None = None, progress: bool = True,
                corpus_path: str | Path | None = None, corpus: Corpus | None = None
                ) -> tuple[ExitHeads, list[float], dict]:
    """Trains exit heads for `target` into an "exits" artifact at out_dir (resuming from its
    checkpoints), then calibrates every criterion's threshold on held-out windows.

    Args:
      target: the frozen model. opts, tc, cc: the exits, the optimization, the corpus
        (default: their defaults).
      prompts, corpus_path, corpus: as `jdecode.training.distill.train_draft_model`.
    Returns:
      the trained heads, this run's per-step losses, and the manifest's metrics.
    """
    from jdecode.data.prompts import train_prompts

    opts, tc, cc = opts or ExitOptions(), tc or TrainConfig(), cc or CorpusConfig()
    out = Path(out_dir).resolve()
    cfg = target.cfg
    layers = exit_layers(cfg.num_layers, opts.every)
    if corpus is None:
        corpus = corpus_lib.load_or_build(target, prompts or train_prompts(), cc,
                                          corpus_path or out / "corpus.npz", seed=tc.seed)
    heads = init_exits(target.params, layers, opts.rank, jax.random.key(tc.seed))
    val = {"tokens": corpus.val_tokens, "mask": corpus.val_mask}
    has_val = len(corpus.val_tokens) > 0
    # Held-out windows (training ones if none are held out) for the per-exit figures and the
    # calibration.
    held = {k: v[:opts.calibration_rows] for k, v in (
        val if has_val else {"tokens": corpus.tokens, "mask": corpus.mask}).items()}
    before = per_exit_metrics(heads, gather_statistics(heads, target.params, held, cfg,
                                                       tc.batch_size))
    res = fit(exits_objective(cfg, opts.classifier_weight), heads, target.params,
              {"tokens": corpus.tokens, "mask": corpus.mask}, val if has_val else None, out,
              tc, progress, desc="train exits")
    heads = res.trainable
    stats = gather_statistics(heads, target.params, held, cfg, tc.batch_size)
    evals = res.history["eval"]
    metrics = {
        **res.counts(), **corpus.info(),
        "last_eval": evals[-1] if evals else None,
        "calibration_rows": len(held["tokens"]), "held_out": has_val,
        "exits_untrained": before, "exits_trained": per_exit_metrics(heads, stats),
        "calibration": {c: calibration_curve(heads, stats, c, cfg.num_layers)
                        for c in THRESHOLD_CRITERIA},
    }
    if opts.propagated_calibration:  # the same thresholds, measured as the method runs
        metrics["calibration_propagated"] = {
            c: propagated_curve(heads, target.params, held, cfg, c,
                                [p["threshold"] for p in metrics["calibration"][c]],
                                tc.batch_size)
            for c in THRESHOLD_CRITERIA}
    artifacts.save_artifact(out, ARTIFACT_KIND, target, heads,
                            {"layers": list(layers), **to_dict(opts), "train": to_dict(tc),
                             "corpus": to_dict(cc)}, metrics, save_dtype=opts.save_dtype)
    return heads, res.losses, metrics


@register_trainer(ARTIFACT_KIND, ExitOptions,
                  summary="early-exit heads and CALM classifiers on the frozen target (KL to "
                          "the full model), with thresholds calibrated on held-out text")
def train(target: Model, opts: ExitOptions, tc: TrainConfig, cc: CorpusConfig,
          out_dir: str | Path, prompts: list[str], progress: bool = True,
          corpus_path: str | Path | None = None) -> dict:
    heads, losses, metrics = train_exits(target, out_dir, opts, tc, cc, prompts, progress,
                                         corpus_path)
    return {"artifact": str(out_dir), "exit_layers": list(heads.layers),
            "steps_run": len(losses), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, **metrics,
            "use": f"jdecode generate --method early_exit --set exits={out_dir}"}
