"""One training loop for every trained part: a jitted optax step (warmup-cosine schedule,
gradient clipping), orbax checkpoints with resume, a time budget, held-out evaluation, a
progress bar, `history.json` and a loss/eval plot.

A part plugs in through an `Objective`: its loss and its evaluation sums, pure functions of
(trainable, frozen, batch). `frozen` (the target's weights) is an argument, never a closure:
closed-over arrays would be baked into the compiled step as constants.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Batch = dict[str, jax.Array]  # e.g. {"tokens": [B, T] int32, "mask": [B, T] f32}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The optimization, shared by every trained part.

    steps, batch_size: Adam steps and rows per step. learning_rate, warmup_steps,
      end_lr_ratio: linear warmup to the peak, then cosine decay to end_lr_ratio x peak.
    clip_norm: global gradient-norm clip. weight_decay: decoupled (AdamW) when > 0.
    checkpoint_every, eval_every: steps between checkpoints / held-out evaluations (both also
      run at the last step). time_budget_s: stop after this many seconds of training, counted
      from the end of the first step (its compilation is not training: under a loaded GPU it
      took longer than the budget); the schedule shrinks to the steps that fit, estimated
      after the first steps. max_epochs:
      warn when the planned steps pass over the training rows more often than this.
    """

    steps: int = 200
    batch_size: int = 4
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    end_lr_ratio: float = 0.1
    clip_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 50
    eval_every: int = 250
    time_budget_s: float | None = None
    max_epochs: float = 10.0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be >= 0")


class Objective(NamedTuple):
    """What a trained part gives the trainer.

    loss(trainable, frozen, batch) -> (scalar loss, dict of scalar metrics), differentiable in
      `trainable`. eval_sums(trainable, frozen, batch) -> dict of metric sums over the batch's
      valid positions, with "count" (the trainer reports sum / count per metric).
    """

    loss: Callable[[Any, Any, Batch], tuple[jax.Array, dict[str, jax.Array]]]
    eval_sums: Callable[[Any, Any, Batch], dict[str, jax.Array]]


@dataclasses.dataclass
class TrainResult:
    trainable: Any
    losses: list[float]  # this run's per-step losses (empty if the checkpoint was final)
    history: dict  # {"loss": [...], "eval": [...]} over every run into the same directory
    steps_done: int
    train_seconds: float
    epochs_done: float

    def counts(self) -> dict[str, float]:
        """How far the run got, as every trainer's manifest metrics record it."""
        return {"steps_done": self.steps_done, "train_seconds": self.train_seconds,
                "epochs_done": self.epochs_done}


def lr_schedule(tc: TrainConfig, total: int) -> optax.Schedule:
    """Linear warmup, then cosine decay to end_lr_ratio x peak at step `total`."""
    warmup = min(tc.warmup_steps, total - 1) if total > 1 else 0
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, max(warmup, 0), max(total, warmup + 1),
        end_value=tc.learning_rate * tc.end_lr_ratio)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """Adam(W) on clipped gradients, without the learning rate: the step scales the update by
    the schedule's value, passed in, so a time budget can shorten the schedule mid-run."""
    parts = [optax.clip_by_global_norm(tc.clip_norm), optax.scale_by_adam()]
    if tc.weight_decay > 0:
        parts.append(optax.add_decayed_weights(tc.weight_decay))
    return optax.chain(*parts)


def make_train_step(objective: Objective, opt: optax.GradientTransformation) -> Callable:
    """The jitted step (trainable, opt_state, frozen, batch, lr) -> (trainable, opt_state, loss,
    metrics); trainable and opt_state are donated (updated in place)."""

    def step(trainable, opt_state, frozen, batch, lr):
        (loss, metrics), grads = jax.value_and_grad(objective.loss, has_aux=True)(
            trainable, frozen, batch)
        updates, opt_state = opt.update(grads, opt_state, trainable)
        updates = jax.tree_util.tree_map(lambda u: -lr * u, updates)
        return optax.apply_updates(trainable, updates), opt_state, loss, metrics

    return jax.jit(step, donate_argnums=(0, 1))


def evaluate(eval_fn: Callable, trainable: Any, frozen: Any, data: Batch, batch_size: int
             ) -> dict[str, float]:
    """Means of `eval_sums` over every row of `data` (batches of one shape; the last is padded
    with zero-mask rows, which count nothing)."""
    n = len(next(iter(data.values())))
    totals: dict[str, float] = {}
    for start in range(0, n, batch_size):
        batch = {}
        for key, arr in data.items():
            part = arr[start:start + batch_size]
            pad = batch_size - len(part)
            if pad:
                part = np.concatenate([part, np.zeros((pad, *part.shape[1:]), part.dtype)])
            batch[key] = jnp.asarray(part)
        for key, value in eval_fn(trainable, frozen, batch).items():
            totals[key] = totals.get(key, 0.0) + float(value)
    count = max(totals.pop("count", 0.0), 1.0)
    return {key: value / count for key, value in totals.items()}


def fit(objective: Objective, trainable: Any, frozen: Any, train: Batch, val: Batch | None,
        out_dir: str | Path, tc: TrainConfig = TrainConfig(), progress: bool = True,
        desc: str = "train") -> TrainResult:
    """Trains `trainable` on rows of `train`, checkpointing into out_dir/checkpoints; resumes
    from the latest checkpoint there.

    Args:
      objective: the part's loss and evaluation. trainable: initial pytree (copied: the step
        donates its buffers). frozen: arrays the loss reads but does not train. train, val:
        dicts of equal-length row arrays (e.g. "tokens" [N, T], "mask" [N, T]); val rows are
        evaluated every `tc.eval_every` steps beside as many training rows, so overfitting
        shows as a gap (val None or empty: no evaluation). out_dir: checkpoints, history.json,
        loss.png. progress: show a tqdm bar labelled `desc`.
    Returns:
      a TrainResult; history["eval"] rows hold "step" and "val_<metric>" / "train_<metric>".
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    n_rows = len(next(iter(train.values())))
    epochs = tc.steps * tc.batch_size / n_rows
    if epochs > tc.max_epochs:
        warnings.warn(f"{tc.steps} steps x batch {tc.batch_size} pass over the {n_rows} "
                      f"training rows {epochs:.0f} times (> max_epochs={tc.max_epochs:g}): the "
                      "part will memorize its corpus. Use more prompts or samples per prompt, "
                      "or fewer steps.", stacklevel=2)
    n_val = 0 if val is None else len(next(iter(val.values())))
    # Training rows evaluated beside the held-out ones (as many), to show the gap.
    train_eval = np.random.default_rng(tc.seed + 1).permutation(n_rows)[:n_val]

    opt = make_optimizer(tc)
    train_step = make_train_step(objective, opt)
    eval_fn = jax.jit(objective.eval_sums)
    trainable = jax.tree_util.tree_map(jnp.copy, trainable)  # the step donates it
    opt_state = opt.init(trainable)
    mngr = ocp.CheckpointManager(out / "checkpoints",
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start = mngr.latest_step() or 0
    if start:
        state = mngr.restore(start, args=ocp.args.StandardRestore(
            {"trainable": trainable, "opt_state": opt_state}))
        trainable, opt_state = state["trainable"], state["opt_state"]
    history_file = out / "history.json"
    history = (json.loads(history_file.read_text()) if start and history_file.exists()
               else {"loss": [], "eval": []})
    history["loss"] = history["loss"][:start]  # steps past the checkpoint are redone

    rng = np.random.default_rng(tc.seed + start)
    losses: list[float] = []
    shown: dict[str, str] = {}  # the last evaluation, kept on the progress bar
    total = tc.steps  # shortened once the time budget's step rate is known
    schedule = lr_schedule(tc, total)
    # Updated by hand, not iterated: a bar left by `break` is closed later by its iterator's
    # cleanup, which writes back the count before the last step (the bar stopped at 97%).
    bar = tqdm(initial=start, total=tc.steps, disable=not progress, desc=desc, unit="step")
    t0 = time.perf_counter()
    t_rate = None  # (time, step) after the compiled first steps, to estimate the step rate
    for step in range(start, tc.steps):
        idx = rng.choice(n_rows, size=tc.batch_size, replace=n_rows < tc.batch_size)
        batch = {key: jnp.asarray(arr[idx]) for key, arr in train.items()}
        trainable, opt_state, loss, _ = train_step(trainable, opt_state, frozen, batch,
                                                   jnp.float32(schedule(step)))
        losses.append(float(loss))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4g}", **shown)
        now = time.perf_counter()
        if tc.time_budget_s is not None:
            if len(losses) == 3:
                t_rate = (now, step)
            elif t_rate is not None and len(losses) == 23:  # 20 steps past compilation
                per_step = (now - t_rate[0]) / (step - t_rate[1])
                fit_steps = step + 1 + int((tc.time_budget_s - (now - t0)) / per_step)
                total = max(step + 1, min(tc.steps, fit_steps))
                schedule = lr_schedule(tc, total)
                bar.total = total
        if step == start:  # the budget counts training, not the first step's compilation
            t0 = now
        last = step + 1 == total or (tc.time_budget_s is not None
                                     and now - t0 >= tc.time_budget_s)
        if n_val and ((step + 1) % tc.eval_every == 0 or last):
            ev: dict[str, Any] = {"step": step + 1}
            for split, data in {"val": val, "train": {k: a[train_eval]
                                                      for k, a in train.items()}}.items():
                ev.update({f"{split}_{key}": v for key, v in evaluate(
                    eval_fn, trainable, frozen, data, tc.batch_size).items()})
            history["eval"].append(ev)
            shown = {key: f"{value:.3g}" for key, value in ev.items()
                     if key.startswith("val_")}
            bar.set_postfix(loss=f"{losses[-1]:.4g}", **shown)
        if (step + 1) % tc.checkpoint_every == 0 or last:
            mngr.save(step + 1, args=ocp.args.StandardSave(
                {"trainable": trainable, "opt_state": opt_state}))
        if last:
            bar.total = step + 1  # a budget-shortened run ends the bar full
            bar.refresh()
            break
    bar.close()
    mngr.wait_until_finished()
    mngr.close()

    history["loss"] += losses
    history_file.write_text(json.dumps(history))
    plot_history(history, out / "loss.png", desc)
    steps_done = start + len(losses)
    return TrainResult(trainable, losses, history, steps_done, time.perf_counter() - t0,
                       steps_done * tc.batch_size / n_rows)


def plot_history(history: dict, path: Path, title: str) -> None:
    """Training loss per step, and every evaluated metric (held-out solid, train dotted)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = history["eval"]
    metrics = sorted({k[4:] for e in evals for k in e if k.startswith("val_")})
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(4.2 * (1 + len(metrics)), 3.2),
                             squeeze=False)
    ax = axes[0, 0]
    ax.plot(np.arange(1, len(history["loss"]) + 1), history["loss"], lw=0.8)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    if min(history["loss"], default=1.0) > 0:
        ax.set_yscale("log")
    steps = [e["step"] for e in evals]
    for ax, m in zip(axes[0, 1:], metrics):
        ax.plot(steps, [e.get(f"val_{m}") for e in evals], "s-", ms=3, label="held-out")
        ax.plot(steps, [e.get(f"train_{m}") for e in evals], "o:", ms=3, label="train rows")
        ax.set(xlabel="step", ylabel=m)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
