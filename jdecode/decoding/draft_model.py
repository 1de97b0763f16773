"""The distilled draft model: a few of the target's layers with its embeddings and LM head.

Embeddings and head stay frozen and shared with the target, so a trained draft is only its
layers and final norm (`DraftWeights`), saved as a "draft" artifact (`jdecode.io.artifacts`)
and rebuilt around a loaded target by `load_draft`. Training lives in `jdecode.training.distill`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import struct

from jdecode.io import artifacts
from jdecode.io.registry import Model, load
from jdecode.model.params import LayerParams

ARTIFACT_KIND = "draft"


@struct.dataclass
class DraftWeights:
    """What training changes in a draft: its stacked layers and its final norm."""

    layers: LayerParams  # [L_draft, ...] stacked
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


def draft_weights(draft: Model) -> DraftWeights:
    return DraftWeights(draft.params.layers, draft.params.final_norm)


def with_weights(draft: Model, weights: DraftWeights) -> Model:
    """The draft with its layers and final norm replaced by `weights`."""
    params = dataclasses.replace(draft.params, layers=weights.layers,
                                 final_norm=weights.final_norm)
    return dataclasses.replace(draft, params=params)


def load_draft(name_or_path: str | Path, target: Model) -> Model:
    """A draft for `target`: a trained draft artifact (`jdecode train draft`), or any model
    `jdecode.load` understands (HF directory, .gguf, known name) in the target's dtype."""
    if not artifacts.is_artifact(name_or_path):
        return load(str(name_or_path), dtype=target.cfg.dtype)

    def abstract(manifest):
        return draft_weights(draft_from_target(target, tuple(manifest["options"]["layers"])))

    weights, manifest = artifacts.load_artifact(name_or_path, ARTIFACT_KIND, target, abstract)
    draft = draft_from_target(target, tuple(manifest["options"]["layers"]))
    return dataclasses.replace(with_weights(draft, weights), name=str(name_or_path))
