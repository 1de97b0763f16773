"""Trainable parts by kind: `jdecode train KIND` resolves its trainer here.

A trainer module registers `train(target, options, tc, cc, out_dir, prompts, progress,
corpus_path) -> summary` with `@register_trainer(...)`; `BUILTIN_TRAINERS` names the modules
imported on first lookup. Every trainer uses the shared corpus (`corpus.py`), loop
(`trainer.py`) and artifact format (`jdecode.io.artifacts`).
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable

from jdecode.config import ConfigError

BUILTIN_TRAINERS = (
    "jdecode.training.distill",
    "jdecode.training.medusa",
    "jdecode.training.eagle",
    "jdecode.training.consistency",
    "jdecode.training.exits",
    "jdecode.training.router",
    "jdecode.training.deferral",
)


@dataclasses.dataclass(frozen=True)
class TrainerSpec:
    """kind: the artifact kind it writes. options_cls: the part's own options (a dataclass
    with defaults); the shared `TrainConfig` and `CorpusConfig` come beside them. train: see
    the module docstring; returns a JSON-ready summary (artifact path, metrics)."""

    kind: str
    options_cls: type
    train: Callable[..., dict]
    summary: str


_TRAINERS: dict[str, TrainerSpec] = {}
_LOADED = False


def register_trainer(kind: str, options_cls: type, summary: str
                     ) -> Callable[[Callable], Callable]:
    def wrap(train: Callable) -> Callable:
        _TRAINERS[kind] = TrainerSpec(kind, options_cls, train, summary)
        return train

    return wrap


def trainers() -> dict[str, TrainerSpec]:
    global _LOADED
    if not _LOADED:
        for module in BUILTIN_TRAINERS:
            importlib.import_module(module)
        _LOADED = True
    return dict(sorted(_TRAINERS.items()))


def get_trainer(kind: str) -> TrainerSpec:
    available = trainers()
    if kind not in available:
        raise ConfigError(f"nothing trains {kind!r}: choose one of {', '.join(available)}")
    return available[kind]
