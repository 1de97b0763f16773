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
CALIBRATION_QUANTILES = (0.2, 0.4, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)


@dataclasses.dataclass(frozen=True)
class ExitOptions:
    every: int = option(3, "an exit after every N-th layer")
    rank: int = option(32, "rank of each exit's adapter (0: the norm only, as LayerSkip)")
    classifier_weight: float = option(1.0, "weight of the exit classifiers' loss")
    calibration_rows: int = option(64, "held-out windows the thresholds are calibrated on")
    criteria: tuple[str, ...] = option(("entropy", "margin", "saturation", "classifier"),
                                       "criteria whose thresholds are calibrated")
    save_dtype: str | None = option(None, "dtype of the saved heads (default: the target's)")

    def __post_init__(self) -> None:
        if self.every < 1 or self.rank < 0 or self.calibration_rows < 1:
            raise ValueError(f"every={self.every} and calibration_rows="
                             f"{self.calibration_rows} must be >= 1, rank={self.rank} >= 0")
        bad = [c for c in self.criteria if c not in CRITERIA or c == "fixed"]
        if bad:
            raise ValueError(f"criteria: {bad[0]!r} has no threshold; choose from "
                             f"{', '.join(c for c in CRITERIA if c != 'fixed')}")


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
def _exit_sums(heads: ExitHeads, target: Params, tokens: jax.Array, mask: jax.Array, *,
               cfg: ModelConfig) -> dict[str, jax.Array]:
    t = exit_terms(heads, target, tokens, mask, cfg)
    return {"top1": t["top1"], "kl": t["kl"], "count": t["count"]}


def per_exit_metrics(heads: ExitHeads, target: Params, data: Batch, cfg: ModelConfig,
                     batch_size: int) -> dict[str, dict[str, float]]:
    """Held-out top-1 agreement and KL of each exit against the full model:
    {"top1": {"layer_<l>": ...}, "kl": {...}}."""
    totals = {"top1": np.zeros(len(heads.layers)), "kl": np.zeros(len(heads.layers))}
    count = 0.0
    for start in range(0, len(data["tokens"]), batch_size):
        out = _exit_sums(heads, target, jnp.asarray(data["tokens"][start:start + batch_size]),
                         jnp.asarray(data["mask"][start:start + batch_size]), cfg=cfg)
        for key in totals:
            totals[key] += np.asarray(out[key])
        count += float(out["count"])
    return {key: {f"layer_{layer}": float(v / max(count, 1.0))
                  for layer, v in zip(heads.layers, sums)} for key, sums in totals.items()}


@partial(jax.jit, static_argnames=("cfg",))
def _full_logits(target: Params, tokens: jax.Array, *, cfg: ModelConfig) -> jax.Array:
    return phases.score(target, tokens, cfg=cfg)[0]


def calibration_curve(target: Params, heads: ExitHeads, cfg: ModelConfig, tokens: np.ndarray,
                      mask: np.ndarray, criterion: str, batch_size: int) -> list[dict]:
    """Held-out top-1 agreement with the full model and the share of layers computed, per
    candidate threshold: quantiles of the criterion's confidence over every exit and token.

    Returns:
      [{"threshold", "top1", "kl", "layer_share"}, ...], the threshold in the criterion's own
      units (`early_exit.CRITERIA`), from the loosest to the strictest.
    """
    batches = [(jnp.asarray(tokens[i:i + batch_size]), jnp.asarray(mask[i:i + batch_size]))
               for i in range(0, len(tokens), batch_size)]

    @jax.jit
    def confidences(p, h, toks):  # [N, B, T] at every exit, on the full model's states
        hooks = collect_hidden(tuple(x for layer in h.layers for x in (layer - 1, layer)))
        _, _, feats = phases.score(p, toks, cfg=cfg, hooks=hooks)
        return jnp.stack([exit_score(criterion, p, h, j, feats[2 * j], feats[2 * j + 1],
                                     cfg.rms_norm_eps) for j in range(len(h.layers))])

    pooled = np.concatenate([np.asarray(confidences(target, heads, t))[:, np.asarray(m) > 0]
                             .ravel() for t, m in batches])
    scores = np.quantile(pooled, CALIBRATION_QUANTILES)
    thresholds = -scores if criterion == "entropy" else scores  # the user's units

    full = [_full_logits(target, t, cfg=cfg) for t, _ in batches]  # once for all thresholds

    @jax.jit
    def measure(p, h, thr, toks, m, full):
        logits, computed = score_early_exit(p, h, thr, toks, cfg=cfg, criterion=criterion)
        agree = jnp.argmax(logits, -1) == jnp.argmax(full, -1)
        return (jnp.sum(agree * m), jnp.sum(kl_per_position(full, logits) * m),
                jnp.sum(computed * m))

    curve = []
    for thr in thresholds:
        sums = np.zeros(3)
        for (t, m), f in zip(batches, full):
            sums += np.asarray(measure(target, heads, jnp.float32(thr), t, m, f), np.float64)
        n = float(mask.sum())
        curve.append({"threshold": float(thr), "top1": sums[0] / n, "kl": sums[1] / n,
                      "layer_share": sums[2] / n / cfg.num_layers})
    return curve


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
    before = per_exit_metrics(heads, target.params, val, cfg, tc.batch_size) if has_val else {}
    res = fit(exits_objective(cfg, opts.classifier_weight), heads, target.params,
              {"tokens": corpus.tokens, "mask": corpus.mask}, val if has_val else None, out,
              tc, progress, desc="train exits")
    heads = res.trainable
    cal_tokens, cal_mask = (corpus.val_tokens, corpus.val_mask) if has_val else (
        corpus.tokens, corpus.mask)
    cal_tokens, cal_mask = cal_tokens[:opts.calibration_rows], cal_mask[:opts.calibration_rows]
    evals = res.history["eval"]
    metrics = {
        "steps_done": res.steps_done, "train_seconds": res.train_seconds,
        "epochs_done": res.epochs_done, **corpus.info(),
        "last_eval": evals[-1] if evals else None,
        "exits_untrained": before,
        "exits_trained": per_exit_metrics(heads, target.params, val, cfg, tc.batch_size)
        if has_val else {},
        "calibration_rows": len(cal_tokens),
        "calibration": {c: calibration_curve(target.params, heads, cfg, cal_tokens, cal_mask, c,
                                             tc.batch_size) for c in opts.criteria},
    }
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
