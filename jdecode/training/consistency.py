"""Consistency training (CLLMs, Kou et al. 2024): fine-tune the target so that from any point of
a Jacobi trajectory it predicts the trajectory's fixed point, and Jacobi decoding converges in
fewer iterations.

Trajectories come from the target itself: Jacobi iteration of n-token blocks started inside
the corpus windows, run to their fixed point (the target's greedy continuation). The loss is
the paper's global consistency loss, with the original target's distribution at the fixed
point as the stationary teacher, plus an AR term (KL to the target on the fixed point itself)
that keeps the fine-tune's own outputs close to the target's. The result is a NEW model,
saved as a "consistency" artifact (`jdecode.decoding.cllm` loads and decodes it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.analysis.quality import kl_per_position
from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.cllm import (
    ARTIFACT_KIND,
    consistency_weights,
    tuned_layers,
    tuned_model,
    with_weights,
)
from jdecode.decoding.jacobi import initial_guesses
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.params import Params
from jdecode.options import option, to_dict
from jdecode.training import corpus as corpus_lib
from jdecode.training.corpus import Corpus, CorpusConfig
from jdecode.training.registry import register_trainer
from jdecode.training.trainer import Objective, TrainConfig, evaluate, fit

TRAJECTORY_BATCH = 64  # windows per jitted trajectory call (one compiled shape)


@dataclasses.dataclass(frozen=True)
class ConsistencyOptions:
    block_size: int = option(16, "n: tokens per Jacobi block of the training trajectories")
    blocks_per_window: int = option(2, "Jacobi blocks started in each corpus window")
    init: Literal["pad", "repeat", "ngram"] = option(
        "repeat", "initial guesses of a block, as Jacobi's `init`")
    pad_token: int = option(0, "the token init=pad guesses")
    max_ngram: int = option(3, "longest context suffix init=ngram matches")
    ar_weight: float = option(10.0, "weight of the KL to the target on the fixed point (keeps "
                              "the new model's outputs close to the target's; CLLM weighs its "
                              "AR loss 10)")
    layers: tuple[int, ...] | None = option(None, "layers fine-tuned (default: all); the "
                                            "embeddings and LM head stay the target's")
    save_dtype: str | None = option(None, "dtype of the saved weights, e.g. bfloat16 "
                                    "(default: the target's); loading casts back")

    def __post_init__(self) -> None:
        for name in ("block_size", "blocks_per_window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.ar_weight < 0:
            raise ValueError(f"ar_weight={self.ar_weight} must be >= 0")


def place_block(seqs: jax.Array, starts: jax.Array, block: jax.Array) -> jax.Array:
    """seqs [M, T] with block [M, n] written at columns starts .. starts + n - 1 per row."""
    cols = starts[:, None] + jnp.arange(block.shape[1])
    return seqs.at[jnp.arange(seqs.shape[0])[:, None], cols].set(block, mode="drop")


def jacobi_trajectories(params: Params, seqs: jax.Array, starts: jax.Array, *,
                        cfg: ModelConfig, opts: ConsistencyOptions) -> jax.Array:
    """Jacobi iteration of one n-token block per row, teacher-forced on its prefix.

    Row m's block starts at column starts[m] (its prefix seqs[m, :starts[m]] is given). A
    block of n tokens reaches its fixed point, the greedy continuation, in at most n
    iterations (each fixes at least one more token), so n iterations are run.

    Args:
      seqs: [M, T] int32 token rows. starts: [M] int32 in [1, T - n].
    Returns:
      iterates [n + 1, M, n] int32: iterates[0] the initial guesses, iterates[n] the fixed
      point.
    """
    n = opts.block_size
    rows = jnp.arange(seqs.shape[0])
    root = seqs[rows, starts - 1]
    block = initial_guesses(opts.init, n, root, seqs, starts - 1, opts.pad_token,
                            opts.max_ngram)
    cols = starts[:, None] - 1 + jnp.arange(n)  # [M, n] positions predicting the block

    def iterate(block, _):
        logits = phases.score(params, place_block(seqs, starts, block), cfg=cfg)[0]
        nxt = jnp.argmax(jnp.take_along_axis(logits, cols[..., None], axis=1), -1)
        return nxt.astype(jnp.int32), block

    fixed, path = jax.lax.scan(iterate, block, None, length=n)
    return jnp.concatenate([path, fixed[None]], axis=0)


_trajectories = jax.jit(jacobi_trajectories, static_argnames=("cfg", "opts"))


def trajectory_rows(target: Model, tokens: np.ndarray, mask: np.ndarray,
                    opts: ConsistencyOptions, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Training rows from corpus windows: one per (block, iterate before the fixed point).

    Block starts are drawn per window in [valid / 4, min(valid - 1, T - n)] (inside the
    target's own text, after some context). Returns the rows {"noisy", "fixed": [R, T] int32,
    "cmask", "mask": [R, T] f32} and stats: the mean iterations a block took to converge
    (`iterations_per_token` = that / n, the block-Jacobi cost under the target).
    """
    n, t = opts.block_size, tokens.shape[1]
    rng = np.random.default_rng(seed)
    valid = mask.sum(1).astype(int)
    lo, hi = np.maximum(1, valid // 4), np.minimum(valid - 1, t - n)
    windows = np.repeat(np.flatnonzero(hi >= lo), opts.blocks_per_window)
    if not len(windows):
        raise ValueError(f"no corpus window fits a block of {n} tokens after its context "
                         f"(windows of {t} tokens): lower block_size or raise seq_len")
    starts = rng.integers(lo[windows], hi[windows] + 1)
    paths = []
    for i in range(0, len(windows), TRAJECTORY_BATCH):  # padded to one shape: one compile
        idx = np.resize(np.arange(i, min(i + TRAJECTORY_BATCH, len(windows))), TRAJECTORY_BATCH)
        path = _trajectories(target.params, jnp.asarray(tokens[windows[idx]]),
                             jnp.asarray(starts[idx], jnp.int32), cfg=target.cfg, opts=opts)
        paths.append(np.asarray(path)[:, :len(windows) - i])
    path = np.concatenate(paths, axis=1)  # [n + 1, W, n]
    fixed = path[-1]
    # Iterations to converge: the first iterate equal to the fixed point.
    converged = (path == fixed[None]).all(-1)  # [n + 1, W]
    iters = converged.argmax(0)
    noisy_rows, fixed_rows, cmask = [], [], []
    cols = np.arange(t)
    for w, (win, s) in enumerate(zip(windows, starts, strict=True)):
        base = tokens[win].copy()
        base[s:s + n] = fixed[w]
        for k in range(iters[w]):
            noisy = base.copy()
            noisy[s:s + n] = path[k, w]
            # Position s - 1 + j predicts block token j from block tokens < j: it carries no
            # signal until some earlier block token is wrong (CLLM masks the converged prefix).
            first_wrong = int(np.argmax(path[k, w] != fixed[w]))
            noisy_rows.append(noisy)
            fixed_rows.append(base)
            cmask.append((cols >= s + first_wrong) & (cols < s + n - 1))
    rows = {"noisy": np.asarray(noisy_rows, np.int32).reshape(-1, t),
            "fixed": np.asarray(fixed_rows, np.int32).reshape(-1, t),
            "cmask": np.asarray(cmask, np.float32).reshape(-1, t)}
    if not noisy_rows:
        raise ValueError(f"all {len(windows)} blocks started at their fixed point (init="
                         f"{opts.init!r}): nothing to train; choose another init")
    rows["mask"] = (cols[None] < (starts.repeat(iters) + n)[:, None]).astype(np.float32)
    stats = {"blocks": len(windows), "rows": len(rows["noisy"]),
             "iterations_per_token": float(iters.mean() / n)}
    return rows, stats


def consistency_objective(cfg: ModelConfig, layers: tuple[int, ...], ar_weight: float
                          ) -> Objective:
    """frozen = the target's params (teacher, and the base the trained weights go into)."""

    def forward(weights, target, batch):
        """Teacher logits on the fixed rows; the student's on the noisy and the fixed rows (one
        pass over both: a forward and a backward instead of two of each)."""
        teacher = jax.lax.stop_gradient(phases.score(target, batch["fixed"], cfg=cfg)[0])
        rows = jnp.concatenate([batch["noisy"], batch["fixed"]], axis=0)  # [2B, T]
        student = phases.score(with_weights(target, weights, layers), rows, cfg=cfg)[0]
        noisy, fixed = jnp.split(student, 2, axis=0)
        return teacher, noisy, fixed

    def masked_kl(teacher, logits, mask):
        return jnp.sum(kl_per_position(teacher, logits) * mask) / jnp.maximum(mask.sum(), 1.0)

    def loss(weights, target, batch):
        teacher, noisy, fixed = forward(weights, target, batch)
        cons = masked_kl(teacher, noisy, batch["cmask"])
        ar = masked_kl(teacher, fixed, batch["mask"])
        return cons + ar_weight * ar, {"consistency": cons, "ar_kl": ar}

    def eval_sums(weights, target, batch):
        teacher, noisy, fixed = forward(weights, target, batch)
        m = batch["cmask"]
        # The fixed point's next token: what Jacobi needs predicted from the noisy context.
        nxt = jnp.roll(batch["fixed"], -1, axis=1)
        hit = (jnp.argmax(noisy, -1) == nxt).astype(jnp.float32)
        same = (jnp.argmax(fixed, -1) == jnp.argmax(teacher, -1)).astype(jnp.float32)
        return {"noisy_top1": jnp.sum(hit * m), "noisy_kl": jnp.sum(
            kl_per_position(teacher, noisy) * m), "fixed_top1": jnp.sum(same * m),
            "fixed_kl": jnp.sum(kl_per_position(teacher, fixed) * m), "count": jnp.sum(m)}

    return Objective(loss, eval_sums)


def train_consistency_model(target: Model, out_dir: str | Path,
                            opts: ConsistencyOptions | None = None,
                            tc: TrainConfig | None = None, cc: CorpusConfig | None = None,
                            prompts: list[str] | list[list[int]] | None = None,
                            progress: bool = True, corpus_path: str | Path | None = None,
                            corpus: Corpus | None = None) -> tuple[Model, list[float], dict]:
    """Fine-tunes `target` into a "consistency" artifact at out_dir (resumes from its latest
    checkpoint if one exists).

    Args:
      target: the loaded target. out_dir: checkpoints, the artifact, history.json, loss.png.
      opts, tc, cc: the fine-tune, the optimization (a full fine-tune wants a learning rate near
        2e-5, not the trainer's default) and the corpus (None: the defaults). prompts,
        corpus_path, corpus: as `distill.train_draft_model`.
    Returns:
      the fine-tuned `Model` (a new model), this run's per-step losses, and the metrics saved
      in the manifest (held-out evaluation and block-Jacobi iterations per token before and
      after).
    """
    from jdecode.data.prompts import train_prompts

    opts, tc, cc = opts or ConsistencyOptions(), tc or TrainConfig(), cc or CorpusConfig()
    out = Path(out_dir).resolve()
    layers = tuned_layers(target.cfg.num_layers, opts.layers)
    if corpus is None:
        corpus = corpus_lib.load_or_build(target, prompts or train_prompts(), cc,
                                          corpus_path or out / "corpus.npz", seed=tc.seed)
    train_rows, train_stats = trajectory_rows(target, corpus.tokens, corpus.mask, opts, tc.seed)
    val_rows, val_stats = trajectory_rows(target, corpus.val_tokens, corpus.val_mask, opts,
                                          tc.seed + 1) if len(corpus.val_tokens) else ({}, {})
    objective = consistency_objective(target.cfg, layers, opts.ar_weight)
    initial = consistency_weights(target.params, layers)
    before = evaluate(jax.jit(objective.eval_sums), initial, target.params, val_rows,
                      tc.batch_size) if val_rows else {}
    res = fit(objective, initial, target.params, train_rows, val_rows or None, out, tc,
              progress, desc="consistency")
    tuned = tuned_model(target, res.trainable, layers)
    metrics = {**res.counts(), **corpus.info(),
               "train_trajectories": train_stats, "val_before": before,
               "last_eval": res.history["eval"][-1] if res.history["eval"] else None}
    if val_rows:  # the same held-out blocks, iterated by the fine-tune
        _, after = trajectory_rows(tuned, corpus.val_tokens, corpus.val_mask, opts, tc.seed + 1)
        metrics["val_iterations_per_token_before"] = val_stats["iterations_per_token"]
        metrics["val_iterations_per_token_after"] = after["iterations_per_token"]
    artifacts.save_artifact(out, ARTIFACT_KIND, target, res.trainable,
                            {**to_dict(opts), "layers": list(layers), "train": to_dict(tc),
                             "corpus": to_dict(cc)}, metrics, save_dtype=opts.save_dtype)
    return tuned, res.losses, metrics


@register_trainer(ARTIFACT_KIND, ConsistencyOptions,
                  summary="a consistency-trained fine-tune of the target (a NEW model) whose "
                          "Jacobi decoding converges in fewer iterations (CLLMs)")
def train_consistency(target: Model, opts: ConsistencyOptions, tc: TrainConfig,
                      cc: CorpusConfig, out_dir: str | Path, prompts: list[str],
                      progress: bool = True, corpus_path: str | Path | None = None) -> dict:
    _, losses, metrics = train_consistency_model(target, out_dir, opts, tc, cc, prompts,
                                                 progress, corpus_path)
    return {"artifact": str(out_dir), "steps_run": len(losses),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, **metrics,
            "use": f"jdecode generate --method cllm --set weights={out_dir} (a new model)"}

