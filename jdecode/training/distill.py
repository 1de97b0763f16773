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
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jdecode.cache.dense import DenseMeta, init_cache, make_dense_attend
from jdecode.config import ModelConfig
from jdecode.io.registry import Model
from jdecode.model.params import LayerParams, Params, _register
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

    def __post_init__(self) -> None:
        for name in ("num_layers", "steps", "batch_size", "seq_len", "new_tokens",
                     "checkpoint_every", "samples_per_prompt", "gen_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0")


@_register
@dataclasses.dataclass(frozen=True)
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


def build_corpus(target: Model, prompts: list[str] | list[list[int]], dc: DistillConfig
                 ) -> list[list[int]]:
    """Prompts (text goes through the chat template), each continued by the target
    `dc.samples_per_prompt` times (greedily, then sampled at dc.temperature): prompt + output
    ids."""
    from jdecode.decoding.generate import Generator
    from jdecode.decoding.sampling import SamplingParams

    # Stacked layers compile several times faster than the unrolled GPU layout, and at a
    # corpus-sized batch the step is not launch-bound.
    gen = Generator(target, layout="stacked")
    jobs = [(p, s) for s in range(dc.samples_per_prompt) for p in prompts]
    # Similar lengths and kinds (greedy or sampled) share a chunk, and every chunk is full: few
    # shape buckets, so few compiles. The wrapped-around extra jobs are just more samples.
    jobs.sort(key=lambda j: (j[1] > 0, len(j[0])))
    jobs += jobs[:-len(jobs) % dc.gen_batch]  # pad to a multiple of gen_batch
    seqs: list[list[int]] = []
    for start in range(0, len(jobs), dc.gen_batch):
        chunk = jobs[start:start + dc.gen_batch]
        # Sample 0 is greedy (top_p 1: greedy ignores it anyway); one batch mixes both.
        sps = [SamplingParams(temperature=dc.temperature if s else 0.0, top_p=0.95 if s else 1.0,
                              seed=dc.seed + start + i, max_new_tokens=dc.new_tokens)
               for i, (_, s) in enumerate(chunk)]
        prompts_chunk = [p for p, _ in chunk]
        chat = target.tokenizer is not None and isinstance(prompts_chunk[0], str)
        for r in gen.generate(prompts_chunk, sps, chat=chat):
            seqs.append(r.prompt_token_ids + r.token_ids)
    return seqs


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
        `prompts.train_prompts()`). progress: show a tqdm bar.
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
    else:
        seqs = build_corpus(target, prompts or train_prompts(), dc)
        tokens, mask = pack(seqs, dc.seq_len)
        np.savez(corpus_file, tokens=tokens, mask=mask)

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
        bar.set_postfix(kl=f"{losses[-1]:.3f}")
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
            "last_kl_mean20": float(np.mean(losses[-20:])) if losses else None}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    history = out / "history.json"
    old = json.loads(history.read_text())["loss"] if history.exists() and start else []
    (out / "history.json").write_text(json.dumps({"loss": old + losses}))
    _plot_losses(old + losses, out / "loss.png")
    return draft, losses


def _plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(np.arange(1, len(losses) + 1), losses)
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
