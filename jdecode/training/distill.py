"""A draft model distilled from its target: a few of the target's layers with its embeddings and
LM head, trained with optax to match the target's next-token distributions (KL) on text the
target generates (the "distilled draft" of speculative decoding; cf. DistillSpec, Zhou 2024).

Embeddings and head stay frozen and shared with the target, so a checkpoint holds only the
draft's layers and final norm; `load_draft` rebuilds the draft around a loaded target.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jdecode.cache.dense import DenseMeta, init_cache, make_dense_attend
from jdecode.config import ModelConfig
from jdecode.io.registry import Model
from jdecode.model.params import LayerParams, Params
from jdecode.model.transformer import forward

META_FILE = "draft.json"


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """How to build and train the draft (defaults fit a CPU run of a few minutes per 100 steps).

    num_layers: target layers kept, spread evenly over its depth (first and last included).
    steps, batch_size, seq_len, learning_rate, warmup_steps: the optimization (Adam, cosine).
    new_tokens, temperature: the target's continuation of each training prompt.
    samples_per_prompt: continuations per prompt: one greedy (what greedy speculative decoding
      verifies) and the rest sampled at `temperature`. gen_batch: prompts per generate call.
    time_budget_s: stop after this many seconds of training (checkpointed, cosine schedule
      shortened to the steps that fit, estimated after the first steps); None = no limit.
    save_dtype: dtype of the saved draft layers (e.g. "bfloat16" halves the file); None =
      the target's. Loading casts back to the target's dtype.
    val_fraction: share of the prompts held out (all their samples, spread over the prompt
      list): the draft is evaluated on them (KL and top-1 agreement with the target) every
      `eval_every` steps, beside the same metrics on as many training rows, so overfitting
      shows as a gap. 0 (or fewer prompts than 1 / val_fraction) = no held-out evaluation.
    max_epochs: warn when the planned steps pass over the training rows more often than this.
    """

    num_layers: int = 4
    steps: int = 200
    batch_size: int = 4
    seq_len: int = 128
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    new_tokens: int = 96
    temperature: float = 0.7
    seed: int = 0
    checkpoint_every: int = 50
    samples_per_prompt: int = 1
    gen_batch: int = 16
    time_budget_s: float | None = None
    save_dtype: str | None = None
    val_fraction: float = 0.1
    eval_every: int = 250
    max_epochs: float = 10.0

    def __post_init__(self) -> None:
        for name in ("num_layers", "steps", "batch_size", "seq_len", "new_tokens",
                     "checkpoint_every", "samples_per_prompt", "gen_batch", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must lie in [0, 1)")


@struct.dataclass
class Trainable:
    layers: LayerParams  # the draft's stacked layers [L_draft, ...]
    final_norm: jax.Array  # [E]


def select_layers(num_layers: int, n: int) -> tuple[int, ...]:
    """n layer indices spread evenly over [0, num_layers), first and last included."""
    if not 1 <= n <= num_layers:
        raise ValueError(f"a draft of {n} layers cannot be cut from a {num_layers}-layer target: "
                         f"choose 1..{num_layers}")
    if n == 1:
        return (0,)
    return tuple(round(i * (num_layers - 1) / (n - 1)) for i in range(n))


def draft_from_target(target: Model, layers: tuple[int, ...]) -> Model:
    """The draft before training: the chosen layers of the target, its embeddings and head."""
    idx = jnp.asarray(layers, jnp.int32)
    lp = jax.tree_util.tree_map(lambda a: a[idx], target.params.layers)  # [len(layers), ...]
    params = dataclasses.replace(target.params, layers=lp)
    return Model(f"{target.name}-draft-{'-'.join(map(str, layers))}",
                 target.cfg.replace(num_layers=len(layers)), params, target.tokenizer)


def all_logits(params: Params, cfg: ModelConfig, tokens: jax.Array) -> jax.Array:
    """Teacher-forced logits at every position: tokens [B, T] -> [B, T, V] f32."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    logits, _, _ = forward(params, tokens, positions, init_cache(cfg, b, t),
                           DenseMeta(positions), cfg=cfg, attend=make_dense_attend(cfg))
    return logits


def distill_loss(trainable: Trainable, frozen: Params, cfg: ModelConfig,
                 target_logits: jax.Array, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over valid positions of KL(p_target || p_draft) of the next-token distributions.

    frozen: the draft's other params (layers and final_norm may be None). target_logits:
    [B, T, V]; tokens: [B, T] int32; mask: [B, T] f32 (1 = real token).
    """
    params = dataclasses.replace(frozen, layers=trainable.layers, final_norm=trainable.final_norm)
    log_pd = jax.nn.log_softmax(all_logits(params, cfg, tokens), axis=-1)
    log_pt = jax.nn.log_softmax(target_logits, axis=-1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_pd), axis=-1)  # [B, T]
    return jnp.sum(kl * mask) / jnp.maximum(mask.sum(), 1.0)


@partial(jax.jit, static_argnames=("tcfg", "dcfg"))
def eval_sums(trainable: Trainable, frozen: Params, target_params: Params, tokens: jax.Array,
              mask: jax.Array, *, tcfg: ModelConfig, dcfg: ModelConfig) -> jax.Array:
    """[sum of KL(target || draft), sum of top-1 agreement, valid positions] over a batch.

    Top-1 agreement (draft argmax == target argmax) is what greedy speculative decoding accepts.
    """
    params = dataclasses.replace(frozen, layers=trainable.layers, final_norm=trainable.final_norm)
    lt = all_logits(target_params, tcfg, tokens)
    ld = all_logits(params, dcfg, tokens)
    log_pt, log_pd = jax.nn.log_softmax(lt, axis=-1), jax.nn.log_softmax(ld, axis=-1)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_pd), axis=-1)
    agree = (jnp.argmax(lt, -1) == jnp.argmax(ld, -1)).astype(jnp.float32)
    return jnp.stack([jnp.sum(kl * mask), jnp.sum(agree * mask), jnp.sum(mask)])


def evaluate(trainable: Trainable, frozen: Params, target: Model, dcfg: ModelConfig,
             tokens: np.ndarray, mask: np.ndarray, batch_size: int) -> dict[str, float]:
    """Mean KL and top-1 agreement over rows (batches of one shape; the last is padded)."""
    sums = np.zeros(3)
    for start in range(0, len(tokens), batch_size):
        t, m = tokens[start:start + batch_size], mask[start:start + batch_size]
        pad = batch_size - len(t)
        if pad:
            t = np.concatenate([t, np.zeros((pad, t.shape[1]), t.dtype)])
            m = np.concatenate([m, np.zeros((pad, m.shape[1]), m.dtype)])
        sums += np.asarray(eval_sums(trainable, frozen, target.params, jnp.asarray(t),
                                     jnp.asarray(m), tcfg=target.cfg, dcfg=dcfg))
    n = max(sums[2], 1.0)
    return {"kl": float(sums[0] / n), "top1": float(sums[1] / n)}


def held_out_prompts(n: int, val_fraction: float) -> set[int]:
    """int(n * val_fraction) prompt indices spread evenly over [0, n) (the prompt list is
    grouped by kind, so every kind is represented)."""
    k = int(n * val_fraction)
    return {int((i + 0.5) * n / k) for i in range(k)} if k else set()


def make_optimizer(dc: DistillConfig) -> optax.GradientTransformation:
    """Adam on clipped gradients, without the learning rate: `train_step` scales by
    `learning_rate_at`, so a time budget can shorten the schedule after training started."""
    return optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())


def learning_rate_at(step: int, dc: DistillConfig, total: int) -> float:
    """Linear warmup, then cosine decay to 10 % of the peak at step `total`."""
    warmup = min(dc.warmup_steps, total - 1) if total > 1 else 0
    if step < warmup:
        return dc.learning_rate * step / warmup
    frac = min(1.0, (step - warmup) / max(total - warmup, 1))
    return dc.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + np.cos(np.pi * frac)))


@partial(jax.jit, static_argnames=("tcfg", "dcfg", "opt"), donate_argnums=(0, 1))
def train_step(trainable: Trainable, opt_state, frozen: Params, target_params: Params,
               tokens: jax.Array, mask: jax.Array, lr: jax.Array, *, tcfg: ModelConfig,
               dcfg: ModelConfig, opt: optax.GradientTransformation):
    """One Adam step at learning rate `lr` on the KL to the target (whose logits are computed
    here, not stored: [N, T, V] f32 for a whole corpus would not fit).
    Returns (trainable, opt_state, loss)."""
    target_logits = jax.lax.stop_gradient(all_logits(target_params, tcfg, tokens))
    loss, grads = jax.value_and_grad(distill_loss)(trainable, frozen, dcfg, target_logits,
                                                   tokens, mask)
    updates, opt_state = opt.update(grads, opt_state, trainable)
    updates = jax.tree_util.tree_map(lambda u: -lr * u, updates)
    return optax.apply_updates(trainable, updates), opt_state, loss


def build_corpus(target: Model, prompts: list[str] | list[list[int]], dc: DistillConfig,
                 with_index: bool = False
                 ) -> list[list[int]] | tuple[list[list[int]], list[int]]:
    """Prompts (text goes through the chat template), each continued by the target
    `dc.samples_per_prompt` times (greedily, then sampled at dc.temperature): prompt + output
    ids (and, with_index, the index of each sequence's prompt)."""
    from jdecode.decoding.generate import Generator
    from jdecode.decoding.sampling import SamplingParams

    # Stacked layers compile several times faster than the unrolled GPU layout, and at a
    # corpus-sized batch the step is not launch-bound.
    gen = Generator(target, layout="stacked")
    jobs = [(i, s) for s in range(dc.samples_per_prompt) for i in range(len(prompts))]
    # Similar lengths and kinds (greedy or sampled) share a chunk, and every chunk is full: few
    # shape buckets, so few compiles. The wrapped-around extra jobs are just more samples.
    jobs.sort(key=lambda j: (j[1] > 0, len(prompts[j[0]])))
    jobs += jobs[:-len(jobs) % dc.gen_batch]  # pad to a multiple of gen_batch
    seqs: list[list[int]] = []
    index: list[int] = []
    for start in range(0, len(jobs), dc.gen_batch):
        chunk = jobs[start:start + dc.gen_batch]
        # Sample 0 is greedy (top_p 1: greedy ignores it anyway); one batch mixes both.
        sps = [SamplingParams(temperature=dc.temperature if s else 0.0, top_p=0.95 if s else 1.0,
                              seed=dc.seed + start + i, max_new_tokens=dc.new_tokens)
               for i, (_, s) in enumerate(chunk)]
        prompts_chunk = [prompts[i] for i, _ in chunk]
        chat = target.tokenizer is not None and isinstance(prompts_chunk[0], str)
        for r in gen.generate(prompts_chunk, sps, chat=chat):
            seqs.append(r.prompt_token_ids + r.token_ids)
        index += [i for i, _ in chunk]
    return (seqs, index) if with_index else seqs


def pack(seqs: list[list[int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Last seq_len tokens of each sequence (the target's own text, not the shared system
    prompt), right-padded: [N, seq_len] int32 tokens and a [N, seq_len] f32 mask."""
    tokens = np.zeros((len(seqs), seq_len), np.int32)
    mask = np.zeros((len(seqs), seq_len), np.float32)
    for i, s in enumerate(seqs):
        s = s[-seq_len:]
        tokens[i, :len(s)], mask[i, :len(s)] = s, 1.0
    return tokens, mask


def _split(draft: Model) -> Trainable:
    return Trainable(draft.params.layers, draft.params.final_norm)


def _merge(draft: Model, trainable: Trainable) -> Model:
    params = dataclasses.replace(draft.params, layers=trainable.layers,
                                 final_norm=trainable.final_norm)
    return dataclasses.replace(draft, params=params)


def train_draft_model(target: Model, out_dir: str | Path, dc: DistillConfig = DistillConfig(),
                      prompts: list[str] | list[list[int]] | None = None, progress: bool = True
                      ) -> tuple[Model, list[float]]:
    """Distils a draft from `target` and saves it (orbax) to out_dir; resumes from its latest
    checkpoint if one exists.

    Args:
      target: the loaded target model. out_dir: where the corpus, orbax checkpoints
        (`checkpoints/`), the final draft (`draft/`, `draft.json`), the loss history and its
        plot go. dc: sizes and optimization. prompts: training user messages (default:
        `prompts.train_prompts()`; `dc.val_fraction` of them are held out for evaluation).
        progress: show a tqdm bar.
    Returns:
      the trained draft `Model` and the per-step losses of this run.
    """
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from jdecode.training.prompts import train_prompts

    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    layers = select_layers(target.cfg.num_layers, dc.num_layers)
    draft = draft_from_target(target, layers)
    corpus_file = out / "corpus.npz"
    if corpus_file.exists():
        data = np.load(corpus_file)
        tokens, mask = data["tokens"], data["mask"]
        val_tokens, val_mask = ((data["val_tokens"], data["val_mask"]) if "val_tokens" in
                                data.files else (tokens[:0], mask[:0]))  # an older corpus
    else:
        prompts = prompts or train_prompts()
        seqs, index = build_corpus(target, prompts, dc, with_index=True)
        held = held_out_prompts(len(prompts), dc.val_fraction)
        tokens, mask = pack([s for s, i in zip(seqs, index) if i not in held], dc.seq_len)
        val_tokens, val_mask = pack([s for s, i in zip(seqs, index) if i in held], dc.seq_len)
        np.savez(corpus_file, tokens=tokens, mask=mask, val_tokens=val_tokens,
                 val_mask=val_mask)
    epochs = dc.steps * dc.batch_size / len(tokens)
    corpus_info = {"train_rows": len(tokens), "train_tokens": int(mask.sum()),
                   "val_rows": len(val_tokens), "val_tokens": int(val_mask.sum()),
                   "planned_epochs": epochs}
    if epochs > dc.max_epochs:
        warnings.warn(f"{dc.steps} steps x batch {dc.batch_size} pass over the {len(tokens)} "
                      f"training rows ({int(mask.sum())} tokens) {epochs:.0f} times (> "
                      f"max_epochs={dc.max_epochs:g}): the draft will memorize its corpus. Use "
                      "more prompts or samples per prompt, or fewer steps.", stacklevel=2)
    # Training rows evaluated beside the held-out ones (as many), to show the gap.
    train_eval = np.random.default_rng(dc.seed + 1).permutation(len(tokens))[:len(val_tokens)]

    opt = make_optimizer(dc)
    # A copy: the step donates `trainable`, whose leaves would otherwise alias draft.params.
    trainable = jax.tree_util.tree_map(jnp.copy, _split(draft))
    frozen = dataclasses.replace(draft.params, layers=None, final_norm=None)
    opt_state = opt.init(trainable)
    mngr = ocp.CheckpointManager(out / "checkpoints",
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2))
    start = mngr.latest_step() or 0
    if start:
        state = mngr.restore(start, args=ocp.args.StandardRestore(
            {"trainable": trainable, "opt_state": opt_state}))
        trainable, opt_state = state["trainable"], state["opt_state"]

    rng = np.random.default_rng(dc.seed)
    losses: list[float] = []
    evals: list[dict] = []
    shown: dict[str, str] = {}  # the last evaluation, kept on the progress bar
    total = dc.steps  # shortened once the time budget's step rate is known
    bar = tqdm(range(start, dc.steps), initial=start, total=dc.steps, disable=not progress,
               desc="distil draft", unit="step")
    t0 = time.perf_counter()
    t_rate = None  # (time, step) after the compiled first steps, to estimate the step rate
    for step in bar:
        idx = rng.choice(len(tokens), size=dc.batch_size, replace=len(tokens) < dc.batch_size)
        lr = jnp.float32(learning_rate_at(step, dc, total))
        trainable, opt_state, loss = train_step(
            trainable, opt_state, frozen, target.params, jnp.asarray(tokens[idx]),
            jnp.asarray(mask[idx]), lr, tcfg=target.cfg, dcfg=draft.cfg, opt=opt)
        losses.append(float(loss))
        bar.set_postfix(kl=f"{losses[-1]:.3f}", **shown)
        now = time.perf_counter()
        if dc.time_budget_s is not None:
            if len(losses) == 3:
                t_rate = (now, step)
            elif t_rate is not None and len(losses) == 23:  # 20 steps past compilation
                per_step = (now - t_rate[0]) / (step - t_rate[1])
                fit = step + 1 + int((dc.time_budget_s - (now - t0)) / per_step)
                total = max(step + 1, min(dc.steps, fit))
                bar.total = total
        last = step + 1 == total or (dc.time_budget_s is not None
                                     and now - t0 > dc.time_budget_s)
        if len(val_tokens) and ((step + 1) % dc.eval_every == 0 or last):
            ev = {"step": step + 1}
            for split, (t, m) in {"val": (val_tokens, val_mask),
                                  "train": (tokens[train_eval], mask[train_eval])}.items():
                ev.update({f"{split}_{key}": v for key, v in evaluate(
                    trainable, frozen, target, draft.cfg, t, m, dc.batch_size).items()})
            evals.append(ev)
            shown = {key: f"{ev[key]:.3f}" for key in ("val_kl", "val_top1", "train_top1")}
            bar.set_postfix(kl=f"{losses[-1]:.3f}", **shown)
        if (step + 1) % dc.checkpoint_every == 0 or last:
            mngr.save(step + 1, args=ocp.args.StandardSave(
                {"trainable": trainable, "opt_state": opt_state}))
        if last:
            break
    mngr.wait_until_finished()
    mngr.close()

    draft = _merge(draft, trainable)
    small = _split(draft)
    if dc.save_dtype is not None:
        small = jax.tree_util.tree_map(lambda a: a.astype(dc.save_dtype), small)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(out / "draft", small, force=True)
    meta = {"target": target.name, "layers": list(layers), "hidden_size": target.cfg.hidden_size,
            "vocab_size": target.cfg.vocab_size, "distill": dataclasses.asdict(dc),
            "saved_dtype": str(jax.tree_util.tree_leaves(small)[0].dtype),
            "steps_done": start + len(losses), "train_seconds": time.perf_counter() - t0,
            "last_kl_mean20": float(np.mean(losses[-20:])) if losses else None,
            **corpus_info, "epochs_done": (start + len(losses)) * dc.batch_size / len(tokens),
            "last_eval": evals[-1] if evals else None}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    history = out / "history.json"
    old = json.loads(history.read_text()) if history.exists() and start else {}
    hist = {"loss": old.get("loss", []) + losses, "eval": old.get("eval", []) + evals}
    history.write_text(json.dumps(hist))
    _plot_losses(hist["loss"], out / "loss.png", hist["eval"])
    return draft, losses


def _plot_losses(losses: list[float], path: Path, evals: list[dict] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8, label="train batch KL")
    if evals:
        steps = [e["step"] for e in evals]
        ax.plot(steps, [e["train_kl"] for e in evals], "o-", ms=3, label="train rows KL (eval)")
        ax.plot(steps, [e["val_kl"] for e in evals], "s-", ms=3, label="held-out KL")
        ax2 = ax.twinx()
        ax2.plot(steps, [e["val_top1"] for e in evals], "s:", ms=3, color="C3",
                 label="held-out top-1")
        ax2.plot(steps, [e["train_top1"] for e in evals], "o:", ms=3, color="C4",
                 label="train top-1")
        ax2.set(ylabel="top-1 agreement", ylim=(0, 1))
        ax2.legend(fontsize=6, loc="center right")
        ax.legend(fontsize=6, loc="upper right")
    ax.set(xlabel="step", ylabel="KL(target || draft)", title="draft distillation", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def is_draft_dir(path: str | Path) -> bool:
    return (Path(path) / META_FILE).is_file()


def load_draft(name_or_path: str | Path, target: Model) -> Model:
    """A draft for `target`: a distilled draft directory (written by `train_draft_model`), or
    any model `jdecode.load` understands (HF directory, .gguf, known name)."""
    import orbax.checkpoint as ocp

    path = Path(name_or_path)
    if not is_draft_dir(path):
        from jdecode.io.registry import load

        return load(str(name_or_path), dtype=target.cfg.dtype)
    meta = json.loads((path / META_FILE).read_text())
    if (meta["hidden_size"], meta["vocab_size"]) != (target.cfg.hidden_size,
                                                     target.cfg.vocab_size):
        raise ValueError(f"draft {str(path)!r} was distilled from {meta['target']!r} (hidden "
                         f"{meta['hidden_size']}, vocab {meta['vocab_size']}), not from "
                         f"{target.name!r}: pass the target it was trained for")
    draft = draft_from_target(target, tuple(meta["layers"]))
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = meta.get("saved_dtype")  # a draft saved in bf16 is cast back to the target's dtype
    abstract = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, saved or a.dtype, sharding=sharding),
        _split(draft))
    with ocp.StandardCheckpointer() as ckptr:
        trainable = ckptr.restore((path / "draft").resolve(), abstract)
    trainable = jax.tree_util.tree_map(lambda r, a: r.astype(a.dtype), trainable, _split(draft))
    return dataclasses.replace(_merge(draft, trainable), name=str(path))
