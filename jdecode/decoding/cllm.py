"""The consistency-trained model (CLLMs, Kou et al. 2024) and its decoding method, `cllm`:
Jacobi decoding of a fine-tune of the target that converges in fewer iterations.

The fine-tune is a NEW model: its greedy output is its own, not the target's, so `cllm` is
registered as lossy and scored against the target by the quality metrics. The artifact
(kind "consistency", `jdecode train consistency`) holds the fine-tuned layers and final norm;
the embeddings and LM head stay the target's. Training lives in `jdecode.training.consistency`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.decoding import phases
from jdecode.decoding.jacobi import JacobiOptions, iteration_stats, jacobi_decoder_fn
from jdecode.decoding.methods import MethodBuild, register
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.params import LayerParams, Params
from jdecode.options import option

ARTIFACT_KIND = "consistency"


@struct.dataclass
class ConsistencyWeights:
    """What consistency training changes: some of the target's layers and its final norm."""

    layers: LayerParams | None  # [K, ...] stacked, the K fine-tuned layers; None when K = 0
    final_norm: jax.Array  # [E]


def tuned_layers(num_layers: int, layers: tuple[int, ...] | None) -> tuple[int, ...]:
    """The fine-tuned layer indices: `layers` checked, or every layer for None."""
    if layers is None:
        return tuple(range(num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad or len(set(layers)) != len(layers):
        raise ValueError(f"layers={list(layers)}: give distinct layer indices in "
                         f"[0, {num_layers}) (or leave it unset to fine-tune every layer)")
    return tuple(layers)


def consistency_weights(params: Params, layers: tuple[int, ...]) -> ConsistencyWeights:
    """The part of stacked `params` that consistency training changes."""
    idx = jnp.asarray(layers, jnp.int32)
    picked = jax.tree_util.tree_map(lambda a: a[idx], params.layers) if layers else None
    return ConsistencyWeights(picked, params.final_norm)


def with_weights(params: Params, weights: ConsistencyWeights, layers: tuple[int, ...]
                 ) -> Params:
    """Stacked `params` with the fine-tuned layers and final norm put in (differentiable)."""
    stacked = params.layers
    if layers:
        idx = jnp.asarray(layers, jnp.int32)
        stacked = jax.tree_util.tree_map(lambda a, t: a.at[idx].set(t), stacked, weights.layers)
    return dataclasses.replace(params, layers=stacked, final_norm=weights.final_norm)


def tuned_model(target: Model, weights: ConsistencyWeights, layers: tuple[int, ...],
                name: str | None = None) -> Model:
    """The fine-tuned model: the target with `weights` in place, under its own name."""
    return dataclasses.replace(target, name=name or f"{target.name}+consistency",
                               params=with_weights(target.params, weights, layers))


def load_consistency(path: str | Path, target: Model) -> Model:
    """The consistency-trained model of a "consistency" artifact trained for `target`."""
    manifest = artifacts.read_manifest(path)
    layers = tuned_layers(target.cfg.num_layers, tuple(manifest["options"].get("layers", ())))
    weights, _ = artifacts.load_artifact(
        path, ARTIFACT_KIND, target, lambda m: consistency_weights(target.params, layers))
    return tuned_model(target, weights, layers, name=f"{target.name}+consistency:{path}")


@dataclasses.dataclass(frozen=True)
class CllmOptions(JacobiOptions):
    weights: str | None = option(None, "the consistency-trained model: a directory or .tgz "
                                 "written by `jdecode train consistency`")


@register("cllm", CllmOptions, lossless=False,
          summary="Jacobi decoding of a consistency-trained fine-tune of the target (Kou et al. "
                  "2024): a NEW model, whose output is its own")
def build_cllm(model: Model, opts: CllmOptions, impl: str) -> MethodBuild:
    if opts.weights is None:
        raise ValueError("cllm decodes a consistency-trained model: pass weights=DIR (train "
                         "one with `jdecode train consistency`)")
    try:
        tuned = load_consistency(opts.weights, model)
    except FileNotFoundError as e:
        raise ValueError(f"weights={opts.weights!r}: {e}") from None
    cfg = tuned.cfg
    return MethodBuild(tuned, jacobi_decoder_fn(opts, impl), describe=iteration_stats,
                       score=lambda params, tokens: phases.score(params, tokens, cfg=cfg)[0])
