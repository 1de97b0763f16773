"""Loads an HF checkpoint directory (config.json + safetensors, sharded or not) into Params."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from jdecode.config import ConfigError, ModelConfig, model_config_from_hf
from jdecode.model.params import LayerParams, Params, abstract_params

# Our field <- HF tensor name inside `model.layers.{i}.`; True = stored [out, in], transpose it.
_LAYER_TENSORS = {
    "attn_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "bq": ("self_attn.q_proj.bias", False),
    "bk": ("self_attn.k_proj.bias", False),
    "bv": ("self_attn.v_proj.bias", False),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "w_gate": ("mlp.gate_proj.weight", True),
    "w_up": ("mlp.up_proj.weight", True),
    "w_down": ("mlp.down_proj.weight", True),
}


def read_json(file: Path) -> dict:
    """A JSON file's contents; invalid JSON is a ConfigError naming the file."""
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file} is not valid JSON ({e}): the checkpoint is truncated or "
                          "corrupt; download or save it again") from None


def read_hf_config(path: Path, dtype: str = "float32") -> ModelConfig:
    """The ModelConfig of an HF checkpoint directory's config.json."""
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no config.json: pass an HF checkpoint directory")
    try:
        return model_config_from_hf(read_json(file), dtype=dtype)
    except KeyError as e:
        raise ConfigError(f"{file} lacks {e.args[0]!r}: it is not the config of a Llama-family "
                          "model") from None


def saved_half_dtype(path: Path) -> str | None:
    """float16 or bfloat16 where the checkpoint's config.json says it was saved so (newer
    transformers write `dtype`, older `torch_dtype`); None for f32, or without a config.json
    (`read_hf_config` names that)."""
    file = path / "config.json"
    raw = read_json(file) if file.is_file() else None
    saved = raw.get("dtype", raw.get("torch_dtype")) if isinstance(raw, dict) else None
    return saved if saved in ("float16", "bfloat16") else None


def open_safetensors(file: Path):
    """A safe_open handle; a truncated or corrupt file is a ConfigError naming it."""
    try:
        return safe_open(file, framework="flax")
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{file} is not a readable safetensors file: it is truncated or "
                          f"corrupt ({e}); download or save it again") from None


def _tensor_files(path: Path) -> dict[str, Path]:
    """Maps every tensor name to the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index)["weight_map"]
        return {name: path / fname for name, fname in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}: pass an HF checkpoint "
                                "directory (config.json + model.safetensors)")
    out = {}
    for f in files:
        with open_safetensors(f) as sf:
            out.update({name: f for name in sf.keys()})  # noqa: SIM118 (not a dict)
    return out


def load_hf_checkpoint(path: str | Path, dtype: str = "float32") -> tuple[ModelConfig, Params]:
    """Reads config.json and the weights, transposed to [in, out] and cast to `dtype`.

    Raises:
      FileNotFoundError / ConfigError naming the missing file or tensor.
    """
    path = Path(path)
    cfg = read_hf_config(path, dtype)
    files = _tensor_files(path)
    handles: dict[Path, object] = {}

    def get(name: str) -> np.ndarray:
        if name not in files:
            raise ConfigError(f"checkpoint {path} is missing tensor {name!r}; it was saved "
                              "incompletely or for another architecture")
        f = files[name]
        if f not in handles:
            handles[f] = open_safetensors(f)
        try:
            return np.asarray(handles[f].get_tensor(name)).astype(np.float32)
        except SafetensorError as e:
            raise ConfigError(f"{f}: tensor {name!r} cannot be read ({e}); the file is "
                              "truncated or corrupt: download or save it again") from None

    abstract = abstract_params(cfg)
    layers = {}
    for field, (name, transpose) in _LAYER_TENSORS.items():
        if getattr(abstract.layers, field) is None:
            continue
        per_layer = [get(f"model.layers.{i}.{name}") for i in range(cfg.num_layers)]
        layers[field] = np.stack([w.T if transpose else w for w in per_layer])
    lm_head = None if cfg.tie_word_embeddings else get("lm_head.weight").T
    params = Params(embed=get("model.embed_tokens.weight"), layers=LayerParams(**layers),
                    final_norm=get("model.norm.weight"), lm_head=lm_head)
    return cfg, to_device(params, abstract)


def to_device(params: Params, abstract: Params) -> Params:
    """Checks every host array against the abstract shape, then casts and puts it on device."""
    import jax
    import jax.numpy as jnp

    def put(x, a):
        if tuple(x.shape) != tuple(a.shape):
            raise ConfigError(f"tensor has shape {tuple(x.shape)}, config expects {a.shape}")
        return jnp.asarray(x, dtype=a.dtype)

    return jax.tree_util.tree_map(put, params, abstract)
