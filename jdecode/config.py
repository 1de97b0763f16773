"""Frozen, hashable configs (usable as static jit arguments) and their YAML / HF loaders."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import yaml

DTYPES = ("float32", "bfloat16", "float16")
# What loading accepts: `auto` picks one of DTYPES for the backend (`io/registry.resolve_dtype`).
DTYPE_CHOICES = ("auto", *DTYPES)
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the fix."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder (Llama, Mistral, Qwen2)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    max_position_embeddings: int = 2048
    dtype: str = "float32"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name}={value!r}: must be a positive integer")
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"{name}={value!r}: must be a positive number")
        if self.sliding_window is not None and (
                not isinstance(self.sliding_window, int) or self.sliding_window <= 0):
            raise ConfigError(f"sliding_window={self.sliding_window!r}: must be a positive "
                              "integer or null")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads="
                f"{self.num_kv_heads}: GQA needs whole groups of query heads per KV head")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if isinstance(self.rope_scaling, dict):  # YAML / --set give a plain mapping
            object.__setattr__(self, "rope_scaling", _build(RopeScaling, self.rope_scaling,
                                                            "rope_scaling"))

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _build(cls: type, raw: dict[str, Any], where: str) -> Any:
    """Constructs a config dataclass from a mapping; unknown keys are errors naming the key."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {unknown} in {where}; valid keys are: {', '.join(sorted(names))}")
    try:
        return cls(**raw)
    except TypeError as e:  # a required key is missing
        raise ConfigError(f"{where}: {e}") from None


def parse_override(item: str) -> tuple[str, Any]:
    """Parses one `--set key=value` (value read as YAML, so 3, 1e-5, true, null all work)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set num_layers=4")
    key, value = item.split("=", 1)
    parsed = yaml.safe_load(value)
    # PyYAML follows YAML 1.1, which reads exponents without a dot (1e-5) as strings.
    if isinstance(parsed, str) and _EXPONENT_FLOAT.fullmatch(parsed.strip()):
        parsed = float(parsed)
    return key.strip(), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict:
    """Applies `key=value` and `outer.inner=value` overrides to a raw config mapping."""
    raw = dict(raw)
    for item in overrides:
        key, value = parse_override(item)
        if "." in key:
            outer, inner = key.split(".", 1)
            nested = dict(raw.get(outer) or {})
            nested[inner] = value
            raw[outer] = nested
        else:
            raw[key] = value
    return raw


def model_config_from_dict(raw: dict[str, Any], where: str = "model config") -> ModelConfig:
    return _build(ModelConfig, raw, where)


def read_yaml_mapping(path: str | Path, what: str, fix: str) -> dict[str, Any]:
    """A YAML file holding a mapping (an empty file is {}); a missing file, invalid YAML or
    another top-level type is a ConfigError naming the file.

    Args:
      what: names the file in errors ("model config"). fix: where valid ones are, e.g.
        "pass a YAML file from configs/models/ or a model name".
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist: {fix}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of {what} keys, got "
                          f"{type(raw).__name__}: {fix}")
    return raw


def load_model_config_yaml(path: str | Path, overrides: tuple[str, ...] = ()) -> ModelConfig:
    """Reads `configs/models/*.yaml` (keys are ModelConfig fields) with `--set` overrides."""
    raw = read_yaml_mapping(path, "model config",
                            "pass a YAML file from configs/models/ or a model name")
    return model_config_from_dict(apply_overrides(raw, overrides), str(path))


SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def model_config_from_hf(config: dict[str, Any] | str | Path, dtype: str = "float32"
                         ) -> ModelConfig:
    """Maps an HF `config.json` (Llama, Mistral or Qwen2) onto ModelConfig.

    HF configs carry many keys that do not change the forward pass, so only the architecture
    is checked strictly; a rope scaling type other than llama3 is rejected.
    """
    if not isinstance(config, dict):
        config = json.loads(Path(config).read_text())
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if archs[0] not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"architecture {archs[0]!r} is not supported; jdecode runs "
                          f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    heads = config["num_attention_heads"]
    hidden = config["hidden_size"]
    scaling = config.get("rope_scaling") or (config.get("rope_parameters") or None)
    rope_theta = config.get("rope_theta")
    if isinstance(scaling, dict):
        rope_theta = rope_theta or scaling.get("rope_theta")
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            scaling = None
        elif kind == "llama3":
            scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_position_embeddings=int(
                    scaling["original_max_position_embeddings"]))
        else:
            raise ConfigError(f"rope scaling type {kind!r} is not supported (only llama3)")
    is_qwen2 = archs[0] == "Qwen2ForCausalLM"
    window = config.get("sliding_window")
    if is_qwen2 and not config.get("use_sliding_window", False):
        window = None
    return ModelConfig(
        vocab_size=config["vocab_size"],
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim") or hidden // heads,
        intermediate_size=config["intermediate_size"],
        rope_theta=float(rope_theta or 10000.0),
        rope_scaling=scaling,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=is_qwen2 or bool(config.get("attention_bias", False)),
        sliding_window=window,
        max_position_embeddings=config.get("max_position_embeddings", 2048),
        dtype=dtype,
    )
