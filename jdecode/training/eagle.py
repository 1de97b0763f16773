"""Training the EAGLE draft with training-time test (EAGLE-3, Li et al. 2025, sec. 3): the
draft is unrolled a few steps over the target's text. Step 1 reads the target's features; step
s reads its own step-(s - 1) output one position back, as it will when it drafts a tree, and
attends to what a depth-(s - 1) tree node sees: the target-fed context up to s - 1 positions
back, then its own chain. Each step matches the target's next-token distribution in KL
(weights decay**(s - 1)); the target stays frozen.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.analysis.quality import kl_per_position
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.eagle_draft import (
    ARTIFACT_KIND,
    EagleDraft,
    attention_visible,
    draft_config,
    draft_layer,
    draft_logits,
    eagle3_layers,
    features_of,
    fuse,
    init_draft,
)
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.params import Params
from jdecode.model.transformer import collect_hidden
from jdecode.options import option, to_dict
from jdecode.training import corpus as corpus_lib
from jdecode.training.corpus import Corpus, CorpusConfig
from jdecode.training.registry import register_trainer
from jdecode.training.trainer import Objective, TrainConfig, evaluate, fit


@dataclasses.dataclass(frozen=True)
class EagleTrainOptions:
    features: str = option("eagle3", "target features the draft reads: eagle3 (the residual "
                           "stream after a low, a middle and a high layer, fused) or final (the "
                           "last layer's, EAGLE-1)")
    unroll: int = option(3, "training-time-test steps: step s trains the draft on its own "
                         "features s - 1 levels deep (1 = teacher forcing only)")
    decay: float = option(0.8, "step s's loss weight is decay**(s - 1)")
    save_dtype: str | None = option(None, "dtype of the saved draft, e.g. bfloat16 (default: "
                                    "float32); loading casts to the target's")

    def __post_init__(self) -> None:
        if self.features not in ("eagle3", "final"):
            raise ValueError(f"features={self.features!r}: choose eagle3 or final")
        if self.unroll < 1:
            raise ValueError(f"unroll={self.unroll} must be >= 1")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay={self.decay} must lie in (0, 1]")


def unroll_attend(q, k, v, previous: tuple, layer, meta) -> tuple[jax.Array, tuple]:
    """Training's AttendFn: step s = len(previous) + 1 attends over every step's K/V so far.

    The query at position j sees step 1's keys at positions <= j - s + 1 (the context the
    target fed) and step r's key at position j - s + r for r = 2..s (its own ancestors). With
    s = 1 this is causal attention.
    """
    s, t = len(previous) + 1, q.shape[1]
    j, i = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    visible = jnp.concatenate([i <= j - s + 1] + [i == j - s + r for r in range(2, s + 1)],
                              axis=1)  # [T, s * T]
    keys = jnp.concatenate([a for a, _ in previous] + [k], axis=1)  # [B, s * T, K, D]
    values = jnp.concatenate([b for _, b in previous] + [v], axis=1)
    visible = jnp.broadcast_to(visible, (q.shape[0], *visible.shape))
    return attention_visible(q, keys, values, visible), (*previous, (k, v))


def unrolled_outputs(draft: EagleDraft, target: Params, tokens: jax.Array,
                     features: jax.Array, unroll: int, dcfg: ModelConfig) -> list[jax.Array]:
    """The draft's outputs [B, T - 1, E] at each unrolled step, input position j reading
    x_{j+1} (tokens: [B, T] int32; features: [B, T, F] the target's)."""
    nxt = tokens[:, 1:]
    positions = jnp.broadcast_to(jnp.arange(nxt.shape[1], dtype=jnp.int32), nxt.shape)
    feature, previous, outs = fuse(draft, features[:, :-1]), (), []
    for _ in range(unroll):  # unrolled: a few static steps
        out, previous = draft_layer(draft, target, nxt, feature, positions, previous, None,
                                    dcfg=dcfg, attend=unroll_attend)
        outs.append(out)
        # The next step reads this step's output one position back (position 0 has none;
        # its loss is masked).
        feature = jnp.concatenate([jnp.zeros_like(out[:, :1]), out[:, :-1]], axis=1)
    return outs


def feature_layers(cfg: ModelConfig, features: str) -> tuple[int, ...]:
    """The target layers an EAGLE draft reads: EAGLE-3's three, or the last one."""
    return eagle3_layers(cfg.num_layers) if features == "eagle3" else (cfg.num_layers - 1,)


def eagle_objective(cfg: ModelConfig, layers: tuple[int, ...], unroll: int, decay: float
                    ) -> Objective:
    """frozen = the target's params; batch = {"tokens" [B, T] int32, "mask" [B, T] f32};
    the draft reads the residual stream after each of `layers`."""
    dcfg = draft_config(cfg)
    eps = cfg.rms_norm_eps
    hooks = collect_hidden(tuple(layers))

    def teacher(target, tokens):
        # Computed in the step, not stored: [N, T, V] f32 logits for a corpus would not fit.
        logits, _, carry = phases.score(target, tokens, cfg=cfg, hooks=hooks)
        return (jax.lax.stop_gradient(logits[:, 1:]),
                jax.lax.stop_gradient(features_of(carry)))

    def masks(mask, s):
        """Input j counts when x_j and x_{j+1} are real and step s has s - 1 positions back."""
        base = mask[:, :-1] * mask[:, 1:]  # [B, T - 1]
        return base * (jnp.arange(base.shape[1]) >= s - 1)

    def loss(draft, target, batch):
        want, features = teacher(target, batch["tokens"])
        outs = unrolled_outputs(draft, target, batch["tokens"], features, unroll, dcfg)
        total, metrics = 0.0, {}
        for s, out in enumerate(outs, start=1):
            valid = masks(batch["mask"], s)
            kl = jnp.sum(kl_per_position(want, draft_logits(draft, target, out, eps)) * valid
                         ) / jnp.maximum(valid.sum(), 1.0)
            total += decay ** (s - 1) * kl
            metrics[f"step{s}_kl"] = kl
        return total, metrics

    def eval_sums(draft, target, batch):
        want, features = teacher(target, batch["tokens"])
        outs = unrolled_outputs(draft, target, batch["tokens"], features, unroll, dcfg)
        valid = masks(batch["mask"], unroll)  # one set of positions for every step
        out = {"count": valid.sum()}
        for s, o in enumerate(outs, start=1):
            logits = draft_logits(draft, target, o, eps)
            agree = jnp.argmax(logits, -1) == jnp.argmax(want, -1)
            out[f"step{s}_top1"] = jnp.sum(agree * valid)
            out[f"step{s}_kl"] = jnp.sum(kl_per_position(want, logits) * valid)
        return out

    return Objective(loss, eval_sums)


def train_eagle_draft(target: Model, out_dir: str | Path, opts: EagleTrainOptions | None = None,
                      tc: TrainConfig | None = None, cc: CorpusConfig | None = None,
                      prompts: list[str] | list[list[int]] | None = None,
                      progress: bool = True, corpus_path: str | Path | None = None,
                      corpus: Corpus | None = None) -> tuple[EagleDraft, list[float], dict]:
    """Trains an EAGLE draft for `target` into an "eagle" artifact at out_dir (resuming from
    its latest checkpoint if one exists), then measures it on the held-out rows.

    Args: as `jdecode.training.medusa.train_medusa_heads`.
    Returns:
      (draft, this run's losses, metrics); metrics["steps"][s - 1] holds unrolled step s's
      held-out top-1 agreement with the target (step 1: a depth-1 node; step s: depth s).
    """
    from jdecode.data.prompts import train_prompts

    opts, tc, cc = opts or EagleTrainOptions(), tc or TrainConfig(), cc or CorpusConfig()
    out = Path(out_dir).resolve()
    if corpus is None:
        corpus = corpus_lib.load_or_build(target, prompts or train_prompts(), cc,
                                          corpus_path or out / "corpus.npz", seed=tc.seed)
    layers = feature_layers(target.cfg, opts.features)
    objective = eagle_objective(target.cfg, layers, opts.unroll, opts.decay)
    train = {"tokens": corpus.tokens, "mask": corpus.mask}
    val = {"tokens": corpus.val_tokens, "mask": corpus.val_mask}
    # f32 whatever the target's dtype; train.seed draws the input projection.
    draft = init_draft(target.params, target.cfg, jax.random.key(tc.seed), len(layers))
    res = fit(objective, draft, target.params, train, val if len(corpus.val_tokens) else None,
              out, tc, progress, desc="eagle draft")
    evals = res.history["eval"]
    if len(corpus.val_tokens) and evals:  # `fit` evaluated the final draft on held-out rows
        split, ev = "held_out", {k[4:]: v for k, v in evals[-1].items() if k.startswith("val_")}
    else:
        split = "train"
        ev = evaluate(jax.jit(objective.eval_sums), res.trainable, target.params, train,
                      tc.batch_size)
    steps = [{"step": s, "top1": ev[f"step{s}_top1"], "kl": ev[f"step{s}_kl"]}
             for s in range(1, opts.unroll + 1)]
    metrics = {"steps": steps, "accuracy_split": split, **res.counts(),
               "last_loss_mean20": float(np.mean(res.history["loss"][-20:]))
               if res.history["loss"] else None, **corpus.info()}
    artifacts.save_artifact(out, ARTIFACT_KIND, target, res.trainable,
                            {"feature_layers": list(layers), **to_dict(opts),
                             "train": to_dict(tc), "corpus": to_dict(cc)},
                            metrics, save_dtype=opts.save_dtype)
    return res.trainable, res.losses, metrics


@register_trainer(ARTIFACT_KIND, EagleTrainOptions,
                  summary="an EAGLE feature draft (one layer over the target's hidden states, "
                          "training-time test)")
def train_eagle(target: Model, opts: EagleTrainOptions, tc: TrainConfig, cc: CorpusConfig,
                out_dir: str | Path, prompts: list[str], progress: bool = True,
                corpus_path: str | Path | None = None) -> dict:
    _, losses, metrics = train_eagle_draft(target, out_dir, opts, tc, cc, prompts, progress,
                                           corpus_path)
    last = {f"val_step{row['step']}_top1": row["top1"] for row in metrics["steps"]}
    return {"artifact": str(out_dir), "steps_run": len(losses),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, **metrics, "last_eval": last,
            "use": f"jdecode generate --method eagle --set draft={out_dir}"}
