"""Training mixture-of-depths routers on the frozen target (router tuning): each layer's router
gates its block, trained to keep the routed model's next-token distribution close to the full
model's (KL) under a compute penalty on the share of tokens computing beyond a capacity.

The gate is hard in the forward pass (a token with router probability > 0.5 computes the
layer and stores its K/V, as at inference) and soft in the backward pass (straight-through):
the KL's gradient says how much each token would gain from the layer.
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
from jdecode.decoding.mixture_of_depths import (
    ARTIFACT_KIND,
    QUANTILE_LEVELS,
    Routers,
    init_routers,
    router_logits,
)
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.params import Params
from jdecode.model.transformer import LayerControl, LayerHooks
from jdecode.options import option, to_dict
from jdecode.training import corpus as corpus_lib
from jdecode.training.corpus import Corpus, CorpusConfig
from jdecode.training.registry import register_trainer
from jdecode.training.trainer import Batch, Objective, TrainConfig, fit


@dataclasses.dataclass(frozen=True)
class RouterOptions:
    capacity: float = option(0.75, "share of tokens that may compute each layer before the "
                             "penalty applies")
    compute_penalty: float = option(1.0, "weight of the penalty on the share computing above "
                                    "capacity")
    save_dtype: str | None = option(None, "dtype of the saved routers (default: the target's)")

    def __post_init__(self) -> None:
        if not 0.0 < self.capacity <= 1.0:
            raise ValueError(f"capacity={self.capacity} must lie in (0, 1]")
        if self.compute_penalty < 0:
            raise ValueError(f"compute_penalty={self.compute_penalty} must be >= 0")


def gated_hooks(routers: Routers) -> LayerHooks:
    """Straight-through routing: the carry is (this layer's gate [B, T], gate sum [B, T])."""

    def before(carry, x, layer):
        _, total = carry
        soft = jax.nn.sigmoid(router_logits(routers, layer, x))  # [B, T]
        hard = soft > 0.5
        gate = hard + soft - jax.lax.stop_gradient(soft)  # forward: hard; backward: soft
        return (gate, total + gate), x, LayerControl(write_kv=hard)

    def after(carry, x_in, x_out, layer):
        gate, _ = carry
        return carry, x_in + gate[..., None].astype(x_in.dtype) * (x_out - x_in)

    def init(x):
        zeros = jnp.zeros(x.shape[:2], jnp.float32)
        return zeros, zeros

    return LayerHooks(init=init, before=before, after=after)


def routed_terms(routers: Routers, target: Params, tokens: jax.Array, mask: jax.Array,
                 cfg: ModelConfig) -> dict[str, jax.Array]:
    """Sums over valid positions: kl (routed vs full), share (layers computed / L), top1."""
    full = jax.lax.stop_gradient(phases.score(target, tokens, cfg=cfg)[0])
    logits, _, (_, total) = phases.score(target, tokens, cfg=cfg, hooks=gated_hooks(routers),
                                         track_writes=True)
    agree = (jnp.argmax(logits, -1) == jnp.argmax(full, -1)).astype(jnp.float32)
    return {"kl": jnp.sum(kl_per_position(full, logits) * mask),
            "share": jnp.sum(total / cfg.num_layers * mask), "top1": jnp.sum(agree * mask),
            "count": mask.sum()}


def router_objective(cfg: ModelConfig, opts: RouterOptions) -> Objective:
    """frozen = the target's params; batch = {"tokens", "mask"}."""

    def loss(routers, target, batch):
        t = routed_terms(routers, target, batch["tokens"], batch["mask"], cfg)
        n = jnp.maximum(t["count"], 1.0)
        kl, share = t["kl"] / n, t["share"] / n
        penalty = opts.compute_penalty * jax.nn.relu(share - opts.capacity)
        return kl + penalty, {"kl": kl, "share": share}

    def eval_sums(routers, target, batch):
        return routed_terms(routers, target, batch["tokens"], batch["mask"], cfg)

    return Objective(loss, eval_sums)


def logit_quantiles(routers: Routers, target: Params, data: Batch, cfg: ModelConfig,
                    batch_size: int) -> jax.Array:
    """[L, Q] quantiles at QUANTILE_LEVELS of each layer's router logits over the valid tokens
    of `data`, on the full model's residual stream (the threshold rule's cuts)."""

    def before(logs, x, layer):
        return logs.at[layer].set(router_logits(routers, layer, x)), x, LayerControl()

    @jax.jit
    def logits_of(r, p, toks):
        hooks = LayerHooks(init=lambda x: jnp.zeros((cfg.num_layers, *x.shape[:2])),
                           before=before)
        return phases.score(p, toks, cfg=cfg, hooks=hooks)[2]  # [L, B, T]

    logs = [np.asarray(logits_of(routers, target, jnp.asarray(data["tokens"][i:i + batch_size])))
            [:, data["mask"][i:i + batch_size] > 0] for i in range(0, len(data["tokens"]),
                                                                   batch_size)]
    return jnp.asarray(np.quantile(np.concatenate(logs, axis=1), QUANTILE_LEVELS, axis=1).T,
                       jnp.dtype(cfg.dtype))


def train_routers(target: Model, out_dir: str | Path, opts: RouterOptions | None = None,
                  tc: TrainConfig | None = None, cc: CorpusConfig | None = None,
                  prompts: list | None = None, progress: bool = True,
                  corpus_path: str | Path | None = None, corpus: Corpus | None = None
                  ) -> tuple[Routers, list[float], dict]:
    """Trains routers for `target` into a "router" artifact at out_dir (resuming from its
    checkpoints) and records their logit quantiles on held-out windows.

    Args:
      as `jdecode.training.exits.train_exits`.
    Returns:
      the trained routers (with quantiles), this run's per-step losses, the metrics.
    """
    from jdecode.data.prompts import train_prompts

    opts, tc, cc = opts or RouterOptions(), tc or TrainConfig(), cc or CorpusConfig()
    out = Path(out_dir).resolve()
    cfg = target.cfg
    if corpus is None:
        corpus = corpus_lib.load_or_build(target, prompts or train_prompts(), cc,
                                          corpus_path or out / "corpus.npz", seed=tc.seed)
    val = {"tokens": corpus.val_tokens, "mask": corpus.val_mask}
    has_val = len(corpus.val_tokens) > 0
    res = fit(router_objective(cfg, opts), init_routers(cfg, opts.capacity,
                                                        jax.random.key(tc.seed)),
              target.params, {"tokens": corpus.tokens, "mask": corpus.mask},
              val if has_val else None, out, tc, progress, desc="train routers")
    routers = res.trainable.replace(quantiles=logit_quantiles(
        res.trainable, target.params, val if has_val else {"tokens": corpus.tokens,
                                                            "mask": corpus.mask},
        cfg, tc.batch_size))
    evals = res.history["eval"]
    metrics = {**res.counts(), **corpus.info(),
               "last_eval": evals[-1] if evals else None}
    artifacts.save_artifact(out, ARTIFACT_KIND, target, routers,
                            {**to_dict(opts), "train": to_dict(tc), "corpus": to_dict(cc)},
                            metrics, save_dtype=opts.save_dtype)
    return routers, res.losses, metrics


@register_trainer(ARTIFACT_KIND, RouterOptions,
                  summary="mixture-of-depths routers on the frozen target (KL to the full "
                          "model under a compute penalty)")
def train(target: Model, opts: RouterOptions, tc: TrainConfig, cc: CorpusConfig,
          out_dir: str | Path, prompts: list[str], progress: bool = True,
          corpus_path: str | Path | None = None) -> dict:
    _, losses, metrics = train_routers(target, out_dir, opts, tc, cc, prompts, progress,
                                       corpus_path)
    return {"artifact": str(out_dir), "steps_run": len(losses),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, **metrics,
            "use": f"jdecode generate --method mixture_of_depths --set routers={out_dir}"}
