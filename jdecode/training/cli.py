"""`jdecode train KIND`: trains any registered part (`jdecode.training.registry`) of a target
model, with options from a YAML file and `--set key=value` overrides."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from jdecode.config import ConfigError, read_yaml_mapping
from jdecode.console import fail, stderr
from jdecode.io import registry

SECTIONS = ("options", "train", "corpus")


def read_train_config(path: str | None) -> dict[str, Any]:
    """A training YAML: optional `kind`, `model`, `dtype` and sections options/train/corpus."""
    if path is None:
        return {}
    raw = read_yaml_mapping(path, "training config",
                            "pass a YAML file such as configs/train/draft.yaml")
    valid = {"kind", "model", "dtype", *SECTIONS}
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}; valid keys are: "
                          f"{', '.join(sorted(valid))}")
    return raw


def resolve(kind: str, raw: dict[str, Any], overrides: list[str]):
    """(spec, options, TrainConfig, CorpusConfig) from the YAML sections and `--set` items."""
    from jdecode import options as opts_lib
    from jdecode.training.corpus import CorpusConfig
    from jdecode.training.registry import get_trainer
    from jdecode.training.trainer import TrainConfig

    spec = get_trainer(kind)
    groups = {"options": spec.options_cls, "train": TrainConfig, "corpus": CorpusConfig}
    values = {name: dict(raw.get(name) or {}) for name in groups}
    for name, items in opts_lib.split_overrides(overrides, groups).items():
        values[name].update(items)
    return (spec, opts_lib.parse(spec.options_cls, values["options"], f"train {kind} options"),
            opts_lib.parse(TrainConfig, values["train"], f"train {kind}: train"),
            opts_lib.parse(CorpusConfig, values["corpus"], f"train {kind}: corpus"))


def train(
    kind: Annotated[str, typer.Argument(help="what to train: draft (`jdecode train --help` "
                                        "lists the kinds in the error for an unknown one)")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="target: name, HF dir or "
                                              ".gguf (default smollm2-135m)")] = None,
    out: Annotated[str | None, typer.Option("--out", help="artifact directory (resumes from "
                                            "its checkpoints); default artifacts/<kind>")] = None,
    config: Annotated[str | None, typer.Option("--config", help="YAML with sections options, "
                                               "train and corpus")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="key=value for the part's options, train (steps, batch_size, "
        "learning_rate, time_budget_s, ...) or corpus (new_tokens, samples_per_prompt, "
        "seq_len, ...); repeatable")] = None,
    dtype: Annotated[str | None, typer.Option(help="target dtype (default float32)")] = None,
    num_prompts: Annotated[int | None, typer.Option(help="use this many training prompts, "
                                                    "spread over their kinds")] = None,
    corpus: Annotated[str | None, typer.Option(help="corpus cache (.npz) shared between "
                                               "trained parts of one target")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Train a part of a decoding method on the target's own text (optax, orbax artifact)."""
    try:
        raw = read_train_config(config)
        spec, opts, tc, cc = resolve(raw.get("kind", kind), raw, set_ or [])
        model = model or raw.get("model", "smollm2-135m")
        registry.check_model(model)  # a bad name fails before anything loads
    except (ConfigError, FileNotFoundError) as e:
        fail(str(e))
    from jdecode.data.prompts import train_prompts

    try:
        target = registry.load(model, dtype=dtype or raw.get("dtype", "float32"))
        prompts = train_prompts()
        if num_prompts is not None:  # an even spread keeps chat, code and summarization
            prompts = prompts[::max(1, len(prompts) // num_prompts)][:num_prompts]
        summary = spec.train(target, opts, tc, cc, out or f"artifacts/{spec.kind}", prompts,
                             progress=not as_json, corpus_path=corpus)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    if as_json:
        print(json.dumps(summary))
        return
    ev = summary.get("last_eval") or {}
    held = ", ".join(f"{k} {v:.4g}" for k, v in ev.items() if k.startswith("val_"))
    losses = " -> ".join(f"{summary[k]:.4g}" for k in ("first_loss", "last_loss")
                         if summary.get(k) is not None)
    stderr().print(f"{spec.kind} saved to {summary['artifact']} | loss {losses or 'n/a'} | "
                   f"{summary['epochs_done']:.1f} epochs"
                   + (f" | held-out: {held}" if held else "")
                   + (f"\nuse: {summary['use']}" if summary.get("use") else ""),
                   highlight=False)
