"""Training the cascade's deferral classifier (post-hoc deferral, Gupta et al. 2024): every
model of a ladder answers the training prompts and checkable tasks, each answer is scored by the
model that wrote it, and a small MLP learns from those features whether the answer is good:
"match" (it matches the next model's answer) or "correct" (on checkable tasks). The artifact
also keeps every rule's calibration scores, so a cascade can place any rule's threshold at a
deferral rate or a quality (`jdecode.decoding.cascade`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.analysis.quality import token_agreement
from jdecode.data.tasks import ANSWER_HINT, Task, is_correct, tasks
from jdecode.decoding import deferral as dr
from jdecode.decoding.cascade import (
    DEFAULT_LADDER,
    Deferral,
    SequenceCascade,
    Stage,
    stage_model,
)
from jdecode.decoding.generate import Generator
from jdecode.decoding.sampling import SamplingParams
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.options import option, to_dict
from jdecode.training.corpus import CorpusConfig, held_out_prompts
from jdecode.training.registry import register_trainer
from jdecode.training.trainer import Objective, TrainConfig, fit


@dataclasses.dataclass(frozen=True)
class DeferralOptions:
    models: tuple[str, ...] = option(DEFAULT_LADDER, "the ladder, cheapest first, as the "
                                     "cascade's models option (the last is the target)")
    label: Literal["match", "correct"] = option(
        "match", "what a good answer is: it matches the next model's (every row) or is "
        "correct (checkable tasks only)")
    min_agreement: float = option(1.0, "match: share of the next model's tokens the answer "
                                  "must agree with (1 = identical)")
    num_tasks: int = option(192, "synthetic checkable tasks (arithmetic, copying; disjoint "
                            "from the evaluation tasks) added to the prompts")
    max_new_tokens: int = option(64, "answer length (as the experiments')")
    hidden: int = option(32, "classifier hidden units")
    quantile: float = option(0.1, "q of the quantile rule whose scores are recorded")

    def __post_init__(self) -> None:
        if len(self.models) < 2:
            raise ValueError(f"models={list(self.models)}: a ladder needs at least 2 models")
        if not 0.0 < self.min_agreement <= 1.0:
            raise ValueError(f"min_agreement={self.min_agreement} must lie in (0, 1]")
        for name in ("max_new_tokens", "hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_tasks < 0:
            raise ValueError(f"num_tasks={self.num_tasks} must be >= 0")


_WORDS = ("amber", "bridge", "candle", "desert", "echo", "falcon", "garden", "harbor", "island",
          "jungle", "kettle", "lemon", "meadow", "nickel", "orchid", "pepper", "quartz",
          "rocket", "saddle", "tunnel", "umbrella", "velvet", "walnut", "yellow", "zipper",
          "copper", "maple", "silver", "thunder", "violet", "marble", "cotton")


def checkable_tasks(n: int, seed: int = 0) -> list[Task]:
    """n training tasks with exact answers, half arithmetic and half copying, none equal to an
    evaluation task (`jdecode.data.tasks`), in the same prompt formats."""
    rng = np.random.default_rng(seed)
    taken = {t.prompt for t in tasks()}
    out: list[Task] = []
    while len(out) < n:
        if len(out) % 2 == 0:
            a, b = (int(x) for x in rng.integers(2, 60, 2))
            op = str(rng.choice(["+", "-", "*"]))
            a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
            value = {"+": a + b, "-": a - b, "*": a * b}[op]
            task = Task("arithmetic", f"What is {a} {op} {b}? {ANSWER_HINT}", str(value))
        else:
            text = " ".join(rng.choice(_WORDS, int(rng.integers(2, 5)), replace=False))
            task = Task("copy", f"Repeat exactly this text and nothing else: {text}", text)
        if task.prompt not in taken:
            taken.add(task.prompt)
            out.append(task)
    return out


def ladder_answers(target: Model, opts: DeferralOptions, prompts: list, gen_batch: int,
                   progress: bool = True) -> list[dict]:
    """Every model's greedy answer to every prompt, scored: the cascade that always defers.

    Returns one record per prompt (see `SequenceCascade`), with "features" per step.
    """
    from tqdm.auto import tqdm

    # Stacked layers compile several times faster than the unrolled GPU layout, and at a
    # corpus-sized batch the step is not launch-bound (as `corpus.generate_continuations`).
    stages = [Stage(Generator(stage_model(target, spec), layout="stacked"))
              for spec in opts.models]
    always = Deferral("mean-logprob", (math.inf,) * (len(stages) - 1), opts.quantile)
    casc = SequenceCascade(stages, always, keep_features=True)
    chat = target.tokenizer is not None and isinstance(prompts[0], str)
    ids = [stages[0].generator.encode(p, chat) for p in prompts]
    sp = SamplingParams(max_new_tokens=opts.max_new_tokens)
    records = []
    for start in tqdm(range(0, len(ids), gen_batch), disable=not progress, desc="answers",
                      unit="batch"):
        records += [r.stats["cascade"] for r in casc.generate(ids[start:start + gen_batch], sp)]
    return records


def step_table(records: list[dict], cheap: int, dear: int, answers: list[str | None],
               held: set[int], min_agreement: float) -> tuple[dict, np.ndarray]:
    """The step from model `cheap` to model `dear` of the ladder: its calibration table (see
    `deferral.Calibration`) and the cheap model's answer features [N, F]."""
    match = [float(token_agreement([r["tokens"][cheap]], [r["tokens"][dear]])["agreement"]
                   >= min_agreement) for r in records]
    nan = float("nan")
    correct = [nan if a is None else float(is_correct(a, r["texts"][cheap]))
               for a, r in zip(answers, records)]
    correct_next = [nan if a is None else float(is_correct(a, r["texts"][dear]))
                    for a, r in zip(answers, records)]
    checkable = any(a is not None for a in answers)
    table = {"scores": {rule: [r["scores"][rule][cheap] for r in records]
                        for rule in records[0]["scores"]},
             "held_out": [i in held for i in range(len(records))],
             "keep": {"match": match, "correct": correct if checkable else None},
             "defer": {"match": [1.0] * len(records),
                       "correct": correct_next if checkable else None}}
    return table, np.stack([r["features"][cheap] for r in records]).astype(np.float32)


def classifier_objective() -> Objective:
    """Binary cross-entropy of "the answer is good" on the classifier's logit; the feature
    standardization stays as initialized."""

    def logits(clf, batch):
        clf = clf.replace(mean=jax.lax.stop_gradient(clf.mean),
                          scale=jax.lax.stop_gradient(clf.scale))
        return dr.classifier_logits(clf, batch["x"])

    def bce(z, y):  # stable log(1 + e^-z) for y = 1, log(1 + e^z) for y = 0
        return jnp.logaddexp(0.0, z) - y * z

    def loss(clf, frozen, batch):
        return jnp.mean(bce(logits(clf, batch), batch["y"])), {}

    def eval_sums(clf, frozen, batch):
        z, y, w = logits(clf, batch), batch["y"], batch["w"]  # w = 0 on padding rows
        return {"bce": jnp.sum(bce(z, y) * w), "accuracy": jnp.sum(((z > 0) == (y > 0.5)) * w),
                "count": jnp.sum(w)}

    return Objective(loss, eval_sums)


def rows_of(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """The trainer's batch rows: features, labels and unit weights (padding rows get 0)."""
    return {"x": x[idx], "y": y[idx], "w": np.ones(len(idx), np.float32)}


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (ties count half), or None with one class only."""
    pos, neg = scores[labels > 0.5], scores[labels <= 0.5]
    if not len(pos) or not len(neg):
        return None
    return float(np.mean((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])))


def train_deferral_model(target: Model, out_dir: str | Path, opts: DeferralOptions,
                         tc: TrainConfig, cc: CorpusConfig,
                         prompts: list[str] | list[list[int]] | None = None,
                         progress: bool = True) -> dict:
    """Answers, features and labels for every step (pair of models) of the ladder, one
    classifier per step, and the "deferral" artifact at out_dir (resumes from checkpoints).

    Args:
      target: the ladder's last model ("target" in its specs). out_dir: the artifact, with a
        checkpoint directory per step. opts, tc, cc: the part, the optimization (time_budget_s
        is shared between the steps) and cc.gen_batch / cc.val_fraction (prompts held out).
      prompts: user messages (default `train_prompts()`) or token-id prompts; opts.num_tasks
        checkable tasks join text prompts.
    Returns:
      the summary: per step the held-out accuracy, AUC and base rate, and the artifact path.
    """
    from jdecode.data.prompts import train_prompts

    out = Path(out_dir).resolve()
    prompts = list(prompts or train_prompts())
    answers: list[str | None] = [None] * len(prompts)
    if isinstance(prompts[0], str) and target.tokenizer is not None:
        extra = checkable_tasks(opts.num_tasks, tc.seed)
        prompts += [t.prompt for t in extra]
        answers += [t.answer for t in extra]
    if opts.label == "correct" and not any(a is not None for a in answers):
        raise ValueError("label=correct needs checkable tasks: text prompts, a tokenizer and "
                         "num_tasks > 0")
    records = ladder_answers(target, opts, prompts, cc.gen_batch, progress)
    held = held_out_prompts(len(records), cc.val_fraction)
    # Every model answered every row, so every pair of the ladder is a step some sub-ladder
    # takes (d2 -> f32 as well as d2 -> bf16 -> f32): each gets its table and classifier.
    pairs = list(itertools.combinations(range(len(opts.models)), 2))
    steps = [dr.transition(opts.models[a], opts.models[b]) for a, b in pairs]
    budget = None if tc.time_budget_s is None else tc.time_budget_s / len(steps)
    step_tc = dataclasses.replace(tc, time_budget_s=budget)
    tables, classifiers, metrics, losses = {}, [], {}, []
    for i, (step, (cheap, dear)) in enumerate(zip(steps, pairs)):
        table, x = step_table(records, cheap, dear, answers, held, opts.min_agreement)
        y = np.asarray(table["keep"][opts.label], np.float32)
        rows = np.flatnonzero(~np.isnan(y))  # "correct": the checkable rows only
        val = np.asarray([r for r in rows if r in held], np.int64)
        train = np.asarray([r for r in rows if r not in held], np.int64)
        clf = dr.init_classifier(jax.random.key(tc.seed + i), x[train], opts.hidden)
        res = fit(classifier_objective(), clf, None, rows_of(x, y, train),
                  rows_of(x, y, val) if len(val) else None, out / f"step{i}", step_tc, progress,
                  desc=f"deferral {i}")
        classifiers.append(res.trainable)
        losses.append(res.losses)
        z = np.asarray(dr.classifier_logits(res.trainable, jnp.asarray(x)))
        table["scores"]["classifier"] = [float(v) for v in z]
        tables[step] = table
        metrics[step] = {
            "train_rows": len(train), "val_rows": len(val),
            "base_rate": float(y[rows].mean()),
            "val_accuracy": float(np.mean((z[val] > 0) == (y[val] > 0.5))) if len(val) else None,
            "val_auc": auc(z[val], y[val]) if len(val) else None,
            # The untrained rules on the same held-out rows, for comparison.
            **{f"val_auc_{rule}": auc(np.asarray(table["scores"][rule])[val], y[val])
               for rule in ("max-prob", "mean-logprob", "quantile") if len(val)},
            **res.counts()}
    num_features = classifiers[0].w1.shape[0]
    artifacts.save_artifact(out, dr.ARTIFACT_KIND, target, tuple(classifiers), {
        **to_dict(opts), "transitions": steps, "num_features": num_features, "tables": tables,
        "train": to_dict(tc), "corpus": to_dict(cc)}, metrics)
    flat = [v for run in losses for v in run]
    return {"artifact": str(out), "steps": metrics, "rows": len(records),
            "first_loss": losses[0][0] if losses[0] else None,
            "last_loss": flat[-1] if flat else None,
            "epochs_done": float(np.mean([m["epochs_done"] for m in metrics.values()])),
            "train_seconds": float(sum(m["train_seconds"] for m in metrics.values())),
            "use": f"jdecode generate --method cascade --set rule=classifier "
                   f"--set calibration={out}"}


@register_trainer(dr.ARTIFACT_KIND, DeferralOptions,
                  summary="a cascade's deferral classifiers and calibration scores (every model "
                          "of the ladder answers the training prompts)")
def train_deferral(target: Model, opts: DeferralOptions, tc: TrainConfig, cc: CorpusConfig,
                   out_dir: str | Path, prompts: list[str], progress: bool = True,
                   corpus_path: str | Path | None = None) -> dict:
    # corpus_path is the distillation corpus: the classifier needs the ladder's own answers.
    return train_deferral_model(target, out_dir, opts, tc, cc, prompts, progress)
