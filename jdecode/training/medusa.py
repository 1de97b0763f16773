"""Training Medusa-1 heads by self-distillation (Cai et al. 2024, sec. 2.1.1 and 2.3.2): on text
the target wrote, head k at position t matches the target's own distribution at t + k + 1 (the
token k + 2 ahead) in KL, with loss weight decay**k; the target stays frozen.

Evaluation records, per head, how often its rank-r candidate is the target's greedy token
there: the held-out `rank_accuracy` the Medusa tree is built from (top-1 and top-5 beside it).
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
from jdecode.decoding.heads import ARTIFACT_KIND, MedusaHeads, head_logits, init_heads
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.params import Params
from jdecode.options import option, to_dict
from jdecode.training import corpus as corpus_lib
from jdecode.training.corpus import Corpus, CorpusConfig
from jdecode.training.registry import register_trainer
from jdecode.training.trainer import Objective, TrainConfig, evaluate, fit


@dataclasses.dataclass(frozen=True)
class MedusaTrainOptions:
    num_heads: int = option(4, "heads: head k predicts the token k + 2 ahead")
    decay: float = option(0.8, "head k's loss weight is decay**k (Medusa-1's lambda_k)")
    eval_ranks: int = option(10, "ranks whose held-out accuracy is recorded per head (the "
                             "Medusa tree draws its candidates from these)")
    save_dtype: str | None = option(None, "dtype of the saved heads, e.g. bfloat16 (default: "
                                    "float32); loading casts to the target's")

    def __post_init__(self) -> None:
        if self.num_heads < 1:
            raise ValueError(f"num_heads={self.num_heads} must be >= 1")
        if not 0.0 < self.decay <= 1.0:
            raise ValueError(f"decay={self.decay} must lie in (0, 1]")
        if self.eval_ranks < 1:
            raise ValueError(f"eval_ranks={self.eval_ranks} must be >= 1")


def one_head(heads: MedusaHeads, k: int) -> MedusaHeads:
    """Head k alone (a one-head MedusaHeads), so a loss holds one [B, T, V] at a time."""
    return jax.tree_util.tree_map(lambda a: a[k:k + 1], heads)


def medusa_objective(cfg: ModelConfig, decay: float, eval_ranks: int) -> Objective:
    """frozen = the target's params; batch = {"tokens" [B, T] int32, "mask" [B, T] f32}."""

    def teacher(target: Params, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
        # Computed in the step, not stored: [N, T, V] f32 logits for a corpus would not fit.
        logits, hidden = phases.score(target, tokens, cfg=cfg)
        return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(hidden)

    def loss(heads, target, batch):
        logits, hidden = teacher(target, batch["tokens"])
        mask, total, metrics = batch["mask"], 0.0, {}
        for k in range(heads.num_heads):  # unrolled: K is small and static
            shift = k + 1
            # Head k at t is matched to the target at t + k + 1, both real tokens.
            valid = mask[:, :-shift] * mask[:, shift:]  # [B, T - shift]
            student = head_logits(target, one_head(heads, k), hidden[:, :-shift])[..., 0, :]
            kl = jnp.sum(kl_per_position(logits[:, shift:], student) * valid) / jnp.maximum(
                valid.sum(), 1.0)
            total += decay**k * kl
            metrics[f"head{k}_kl"] = kl
        return total, metrics

    def eval_sums(heads, target, batch):
        logits, hidden = teacher(target, batch["tokens"])
        n_heads, mask = heads.num_heads, batch["mask"]
        # The positions every head can be scored at, so all heads share one count.
        valid = mask[:, :-n_heads] * mask[:, n_heads:]  # [B, T - K]
        t = valid.shape[1]
        out = {"count": valid.sum()}
        for k in range(n_heads):
            shift = k + 1
            student = head_logits(target, one_head(heads, k), hidden[:, :t])[..., 0, :]
            want = jnp.argmax(logits[:, shift:shift + t], axis=-1)  # the target's greedy token
            ranked = jax.lax.top_k(student, eval_ranks)[1]  # [B, t, R]
            hits = jnp.sum((ranked == want[..., None]) * valid[..., None], axis=(0, 1))  # [R]
            out[f"head{k}_kl"] = jnp.sum(kl_per_position(logits[:, shift:shift + t], student)
                                         * valid)
            out[f"head{k}_top1"] = hits[0]
            out[f"head{k}_top5"] = hits[:5].sum()
            out.update({f"head{k}_rank{r}": hits[r] for r in range(eval_ranks)})
        return out

    return Objective(loss, eval_sums)


def head_table(ev: dict[str, float], num_heads: int, eval_ranks: int
               ) -> tuple[list[list[float]], list[dict[str, float]]]:
    """From one evaluation's means: rank_accuracy [K][R] and per-head top1/top5/kl rows."""
    acc = [[ev[f"head{k}_rank{r}"] for r in range(eval_ranks)] for k in range(num_heads)]
    rows = [{"head": k, "top1": ev[f"head{k}_top1"], "top5": ev[f"head{k}_top5"],
             "kl": ev[f"head{k}_kl"]} for k in range(num_heads)]
    return acc, rows


def train_medusa_heads(target: Model, out_dir: str | Path,
                       opts: MedusaTrainOptions | None = None, tc: TrainConfig | None = None,
                       cc: CorpusConfig | None = None,
                       prompts: list[str] | list[list[int]] | None = None,
                       progress: bool = True, corpus_path: str | Path | None = None,
                       corpus: Corpus | None = None) -> tuple[MedusaHeads, list[float], dict]:
    """Trains Medusa heads for `target` into a "medusa" artifact at out_dir (resuming from its
    latest checkpoint if one exists), then measures them on the held-out rows.

    Args:
      target: the loaded target. out_dir: checkpoints, the artifact, history.json, loss.png.
      opts, tc, cc: the heads, the optimization and the corpus (None: defaults). prompts: training user
        messages (default `prompts.train_prompts()`). progress: a progress bar. corpus_path:
        the shared corpus cache (default out_dir/corpus.npz). corpus: train on these windows
        instead (prompts and corpus_path are then unused).
    Returns:
      (heads, this run's losses, metrics); metrics["rank_accuracy"][k][r] is the held-out rate
      at which head k's rank-r candidate is the target's greedy token (the training rows when
      nothing is held out, said by metrics["accuracy_split"]).
    """
    from jdecode.data.prompts import train_prompts

    opts, tc, cc = opts or MedusaTrainOptions(), tc or TrainConfig(), cc or CorpusConfig()
    out = Path(out_dir).resolve()
    if corpus is None:
        corpus = corpus_lib.load_or_build(target, prompts or train_prompts(), cc,
                                          corpus_path or out / "corpus.npz", seed=tc.seed)
    objective = medusa_objective(target.cfg, opts.decay, opts.eval_ranks)
    train = {"tokens": corpus.tokens, "mask": corpus.mask}
    val = {"tokens": corpus.val_tokens, "mask": corpus.val_mask}
    # The heads train in f32 whatever the target's dtype; the artifact can be saved smaller.
    heads = init_heads(target.cfg.hidden_size, opts.num_heads, jnp.float32)
    res = fit(objective, heads, target.params, train, val if len(corpus.val_tokens) else None,
              out, tc, progress, desc="medusa heads")
    evals = res.history["eval"]
    if len(corpus.val_tokens) and evals:  # `fit` evaluated the final heads on held-out rows
        split, ev = "held_out", {k[4:]: v for k, v in evals[-1].items() if k.startswith("val_")}
    else:
        split = "train"
        ev = evaluate(jax.jit(objective.eval_sums), res.trainable, target.params, train,
                      tc.batch_size)
    accuracy, per_head = head_table(ev, opts.num_heads, opts.eval_ranks)
    metrics = {"rank_accuracy": accuracy, "heads": per_head, "accuracy_split": split,
               **res.counts(), "last_loss_mean20": float(np.mean(res.history["loss"][-20:]))
               if res.history["loss"] else None, **corpus.info()}
    artifacts.save_artifact(out, ARTIFACT_KIND, target, res.trainable,
                            {**to_dict(opts), "train": to_dict(tc), "corpus": to_dict(cc)},
                            metrics, save_dtype=opts.save_dtype)
    return res.trainable, res.losses, metrics


@register_trainer(ARTIFACT_KIND, MedusaTrainOptions,
                  summary="Medusa heads (one residual SiLU block per head on the target's LM "
                          "head), self-distilled from the target")
def train_medusa(target: Model, opts: MedusaTrainOptions, tc: TrainConfig, cc: CorpusConfig,
                 out_dir: str | Path, prompts: list[str], progress: bool = True,
                 corpus_path: str | Path | None = None) -> dict:
    _, losses, metrics = train_medusa_heads(target, out_dir, opts, tc, cc, prompts, progress,
                                            corpus_path)
    last = {f"val_head{row['head']}_{m}": row[m] for row in metrics["heads"]
            for m in ("top1", "top5")}
    return {"artifact": str(out_dir), "num_heads": opts.num_heads, "steps_run": len(losses),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, **metrics, "last_eval": last,
            "use": f"jdecode generate --method medusa --set heads={out_dir}"}
