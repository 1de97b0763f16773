"""Training the distilled draft (DistillSpec-style, Zhou et al. 2024): a few of the target's
layers trained with optax to match the target's next-token distributions (forward KL) on text
the target wrote. The draft model itself and its loading live in
`jdecode.decoding.draft_model`; this module is its loss and its trainer.
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
from jdecode.decoding.draft_model import (
    ARTIFACT_KIND,
    DraftWeights,
    draft_from_target,
    draft_weights,
    select_layers,
    with_weights,
)
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.params import Params
from jdecode.options import option, to_dict
from jdecode.training import corpus as corpus_lib
from jdecode.training.corpus import Corpus, CorpusConfig
from jdecode.training.registry import register_trainer
from jdecode.training.trainer import Objective, TrainConfig, fit


@dataclasses.dataclass(frozen=True)
class DraftOptions:
    num_layers: int = option(4, "target layers kept, spread evenly over its depth")
    save_dtype: str | None = option(None, "dtype of the saved layers, e.g. bfloat16 (default: "
                                    "the target's); loading casts back")

    def __post_init__(self) -> None:
        if self.num_layers < 1:
            raise ValueError(f"num_layers={self.num_layers} must be >= 1")


def distill_loss(weights: DraftWeights, frozen: Params, cfg: ModelConfig,
                 target_logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over valid positions of KL(p_target || p_draft) of the next-token distributions.

    frozen: the draft's other params (layers and final_norm None). target_logits: [B, T, V];
    tokens: [B, T] int32; mask: [B, T] f32 (1 = real token).
    """
    params = dataclasses.replace(frozen, layers=weights.layers, final_norm=weights.final_norm)
    kl = kl_per_position(target_logits, phases.score(params, tokens, cfg=cfg)[0])  # [B, T]
    return jnp.sum(kl * mask) / jnp.maximum(mask.sum(), 1.0)


def draft_objective(tcfg: ModelConfig, dcfg: ModelConfig) -> Objective:
    """frozen = (target params, the draft's params without layers and final norm)."""

    def loss(weights, frozen, batch):
        target_params, draft_frozen = frozen
        # Computed here, not stored: [N, T, V] f32 logits for a corpus would not fit.
        target_logits = jax.lax.stop_gradient(
            phases.score(target_params, batch["tokens"], cfg=tcfg)[0])
        value = distill_loss(weights, draft_frozen, dcfg, target_logits, batch["tokens"],
                             batch["mask"])
        return value, {}

    def eval_sums(weights, frozen, batch):
        target_params, draft_frozen = frozen
        params = dataclasses.replace(draft_frozen, layers=weights.layers,
                                     final_norm=weights.final_norm)
        lt = phases.score(target_params, batch["tokens"], cfg=tcfg)[0]
        ld = phases.score(params, batch["tokens"], cfg=dcfg)[0]
        mask = batch["mask"]
        # Top-1 agreement (draft argmax == target argmax) is what greedy verification accepts.
        agree = (jnp.argmax(lt, -1) == jnp.argmax(ld, -1)).astype(jnp.float32)
        return {"kl": jnp.sum(kl_per_position(lt, ld) * mask), "top1": jnp.sum(agree * mask),
                "count": jnp.sum(mask)}

    return Objective(loss, eval_sums)


def train_draft_model(target: Model, out_dir: str | Path, opts: DraftOptions = DraftOptions(),
                      tc: TrainConfig = TrainConfig(), cc: CorpusConfig = CorpusConfig(),
                      prompts: list[str] | list[list[int]] | None = None, progress: bool = True,
                      corpus_path: str | Path | None = None, corpus: Corpus | None = None
                      ) -> tuple[Model, list[float]]:
    """Distils a draft from `target` into a "draft" artifact at out_dir; resumes from its latest
    checkpoint if one exists.

    Args:
      target: the loaded target model. out_dir: checkpoints, the artifact (manifest.json,
        params/), history.json and loss.png. opts, tc, cc: the draft, the optimization and the
        corpus. prompts: training user messages (default: `prompts.train_prompts()`; cc's
        val_fraction of them are held out). progress: show a progress bar. corpus_path: the
        corpus cache (default out_dir/corpus.npz; share one between trained parts). corpus:
        train on these windows instead (prompts and corpus_path are then unused).
    Returns:
      the trained draft `Model` and the per-step losses of this run.
    """
    from jdecode.data.prompts import train_prompts

    out = Path(out_dir).resolve()
    layers = select_layers(target.cfg.num_layers, opts.num_layers)
    draft = draft_from_target(target, layers)
    if corpus is None:
        corpus = corpus_lib.load_or_build(target, prompts or train_prompts(), cc,
                                          corpus_path or out / "corpus.npz", seed=tc.seed)
    frozen = (target.params, dataclasses.replace(draft.params, layers=None, final_norm=None))
    res = fit(draft_objective(target.cfg, draft.cfg), draft_weights(draft), frozen,
              {"tokens": corpus.tokens, "mask": corpus.mask},
              {"tokens": corpus.val_tokens, "mask": corpus.val_mask}, out, tc, progress,
              desc="distil draft")
    draft = with_weights(draft, res.trainable)
    evals = res.history["eval"]
    metrics = {**res.counts(), "last_kl_mean20": float(np.mean(res.history["loss"][-20:]))
               if res.history["loss"] else None, **corpus.info(),
               "last_eval": evals[-1] if evals else None}
    artifacts.save_artifact(out, ARTIFACT_KIND, target, res.trainable,
                            {"layers": list(layers), **to_dict(opts), "train": to_dict(tc),
                             "corpus": to_dict(cc)}, metrics, save_dtype=opts.save_dtype)
    return draft, res.losses


@register_trainer(ARTIFACT_KIND, DraftOptions,
                  summary="a draft of the target's layers for speculative decoding (KL to the "
                          "target on its own text)")
def train_draft(target: Model, opts: DraftOptions, tc: TrainConfig, cc: CorpusConfig,
                out_dir: str | Path, prompts: list[str], progress: bool = True,
                corpus_path: str | Path | None = None) -> dict:
    draft, losses = train_draft_model(target, out_dir, opts, tc, cc, prompts, progress,
                                      corpus_path)
    manifest = artifacts.read_manifest(out_dir)
    return {"artifact": str(out_dir), "draft_layers": draft.cfg.num_layers,
            "steps_run": len(losses), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, **manifest["metrics"],
            "use": f"jdecode generate --method speculative --set draft={out_dir}"}
