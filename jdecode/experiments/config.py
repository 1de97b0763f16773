"""Experiment configs (`configs/experiments/*.yaml`): a model, prompt sets, batch sizes and a
grid of methods with their options, validated before anything loads.

    name: all-methods-b1
    model: smollm2-135m          # or a list of models
    dtype: float32
    prompts: [chat, code, summarization]   # built-in sets, "tasks", or JSONL files
    batch_sizes: [1]
    methods:
      - {method: speculative, label: ngram-k4, options: {draft: ngram, k: 4}}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from jdecode import options as opts_lib
from jdecode.config import DTYPES, ConfigError, parse_override, read_yaml_mapping
from jdecode.data.prompts import eval_prompts
from jdecode.data.tasks import tasks
from jdecode.decoding import methods
from jdecode.provenance import switches

BUILTIN_SETS = ("chat", "code", "summarization", "tasks")
BASELINE = "autoregressive"


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    """One method of the grid; `label` names its row (default: the method's name)."""

    method: str = opts_lib.option(BASELINE, "a registered method (`jdecode methods`)")
    label: str | None = opts_lib.option(None, "row name in the tables and plots")
    options: dict | None = opts_lib.option(None, "the method's options")

    @property
    def name(self) -> str:
        return self.label or self.method


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str = opts_lib.option("experiment", "names the output directory and the tables")
    model: str | tuple[str, ...] = opts_lib.option(
        "smollm2-135m", "model name, HF dir, .gguf or configs/models YAML (or a list)")
    dtype: str = opts_lib.option("float32", "float32, bfloat16 or float16 (not auto: cells "
                                 "resume across machines)")
    impl: str = opts_lib.option("auto", "attention implementation: auto, xla or pallas")
    prompts: tuple[str, ...] = opts_lib.option(
        ("chat", "code", "summarization"),
        "prompt sets: chat, code, summarization, tasks (checkable answers) or JSONL files")
    prompts_per_set: int | None = opts_lib.option(None, "use this many prompts of each set, "
                                                 "spread over it (default: all)")
    max_new_tokens: int = opts_lib.option(64, "tokens generated per prompt")
    batch_sizes: tuple[int, ...] = opts_lib.option((1,), "batch sizes, each a separate cell")
    chat: bool = opts_lib.option(True, "apply the chat template to text prompts")
    temperature: float = opts_lib.option(0.0, "0 = greedy (lossless methods are checked token "
                                        "for token against autoregressive)")
    seed: int = opts_lib.option(0, "sampling seed of prompt i is seed + i")
    ignore_eos: bool = opts_lib.option(False, "generate max_new_tokens even past EOS")
    quality: bool = opts_lib.option(True, "quality metrics (agreement, KL, perplexity, task "
                                   "accuracy) for lossy methods")
    perplexity_paragraphs: int = opts_lib.option(8, "held-out paragraphs for perplexity")
    methods: tuple[MethodEntry, ...] = opts_lib.option((), "the method grid; autoregressive "
                                                      "always runs first as the baseline")

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            object.__setattr__(self, "model", (self.model,))
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes={list(self.batch_sizes)}: give batch sizes >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        labels = [m.name for m in self.methods]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"methods: label {dup[0]!r} is used twice: give each entry a "
                             "distinct label")


def set_path(raw: dict[str, Any], key: str, value: Any) -> None:
    """Sets a dotted key (`methods.0.options.k`, digits index lists) in a nested mapping."""
    parts = key.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {key}: {part!r} is not an index of a list of "
                                  f"{len(node)}")
            node = node[int(part)]
        else:
            if node.get(part) is None:
                node[part] = [] if nxt.isdigit() else {}
            node = node[part]
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"--set {key}: {last!r} is not an index of a list of {len(node)}")
        node[int(last)] = value
    else:
        node[last] = value


def parse_config(raw: dict[str, Any], where: str) -> ExperimentConfig:
    """Validates a raw mapping: unknown keys, wrong types, unknown methods or options and
    unknown prompt sets are ConfigErrors naming the key and the fix."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must hold a mapping of experiment settings")
    raw = dict(raw)
    entries = raw.pop("methods", None) or []
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: methods must be a list of {{method, label, options}}")
    parsed = []
    for i, entry in enumerate(entries):
        e = opts_lib.parse(MethodEntry, entry, f"{where}: methods[{i}]")
        spec = methods.get(e.method)
        methods.parse_options(spec, e.options, where=f"{where}: methods[{i}]")
        parsed.append(dataclasses.replace(e, options=dict(e.options or {})))
    cfg = opts_lib.parse(ExperimentConfig, raw, f"experiment {where}")
    cfg = dataclasses.replace(cfg, methods=tuple(parsed))
    if cfg.dtype not in DTYPES:  # not `auto`: a resumed run must not mix a CPU's and a GPU's
        raise ConfigError(f"{where}: dtype={cfg.dtype!r}: an experiment names its dtype, "
                          f"one of {', '.join(DTYPES)}")
    for name in cfg.prompts:
        if name not in BUILTIN_SETS and not Path(name).is_file():
            raise ConfigError(f"{where}: prompt set {name!r} is neither built in "
                              f"({', '.join(BUILTIN_SETS)}) nor a JSONL file")
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()
                ) -> ExperimentConfig:
    """Reads an experiment YAML and applies `--set key=value` (dotted keys reach into lists)."""
    raw = read_yaml_mapping(path, "experiment config",
                            "pass a YAML file such as configs/experiments/all-methods-b1.yaml")
    for item in overrides:
        set_path(raw, *parse_override(item))
    return parse_config(raw, str(path))


@dataclasses.dataclass(frozen=True)
class Prompt:
    kind: str  # the set's name, or a JSONL row's "kind"
    text: str | None  # a user message, or None when given as token ids
    token_ids: tuple[int, ...] | None
    answer: str | None  # checkable answer (the task set, or a JSONL "answer")


def _spread(items: list, n: int | None) -> list:
    if n is None or n >= len(items):
        return items
    return [items[int((i + 0.5) * len(items) / n)] for i in range(n)]


def _jsonl(path: Path) -> list[Prompt]:
    out = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{i + 1} is not JSON ({e})") from None
        if not isinstance(row, dict) or ("prompt" in row) == ("token_ids" in row):
            raise ConfigError(f"{path}:{i + 1}: each line needs exactly one of \"prompt\" "
                              "(text) or \"token_ids\" (a list of ints)")
        ids = row.get("token_ids")
        out.append(Prompt(row.get("kind", path.stem), row.get("prompt"),
                          tuple(int(t) for t in ids) if ids is not None else None,
                          row.get("answer")))
    return out


def resolve_prompts(cfg: ExperimentConfig) -> list[Prompt]:
    """The prompts of every set, in order, `prompts_per_set` of each."""
    out: list[Prompt] = []
    for name in cfg.prompts:
        if name == "tasks":
            rows = [Prompt("tasks", t.prompt, None, t.answer) for t in tasks()]
        elif name in BUILTIN_SETS:
            rows = [Prompt(kind, text, None, None) for kind, text in eval_prompts()
                    if kind == name]
        else:
            rows = _jsonl(Path(name))
        out += _spread(rows, cfg.prompts_per_set)
    return out


def cell_key(cfg: ExperimentConfig, model: str, entry: MethodEntry, batch: int,
             prompts: list[Prompt]) -> str:
    """Identity of a cell: everything its numbers depend on (a resumed run skips it),
    including the environment's switches (`provenance.switches`) where any is set, so a run
    with JDECODE_FUSED_DECODE=1 does not resume from one without (keys without them stay as
    they were)."""
    ident = {"model": model, "dtype": cfg.dtype, "impl": cfg.impl,
             "prompts": [dataclasses.astuple(p) for p in prompts],
             "max_new_tokens": cfg.max_new_tokens, "chat": cfg.chat,
             "temperature": cfg.temperature, "seed": cfg.seed, "ignore_eos": cfg.ignore_eos,
             "method": entry.method, "options": entry.options, "batch": batch}
    if switches():
        ident["switches"] = switches()
    blob = json.dumps(ident, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
