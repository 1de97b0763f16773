"""Loads a llama-architecture GGUF file: config from metadata, weights dequantized by the
`gguf` package, llama.cpp's Q/K row permutation undone, tokenizer from its vocabulary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.config import ConfigError, ModelConfig
from jdecode.io.safetensors_loader import to_device
from jdecode.io.tokenizer import Tokenizer
from jdecode.model.params import LayerParams, Params, abstract_params

_LAYER_TENSORS = {  # our field <- GGUF tensor name inside `blk.{i}.`
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
    "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
}


def read_fields(reader) -> dict[str, Any]:
    """GGUF metadata as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def corrupt(path: str | Path, e: Exception) -> ConfigError:
    """The one-line error for a GGUF file that cannot be parsed."""
    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
    return ConfigError(f"{path} is not a readable GGUF file: it is truncated or corrupt "
                       f"({reason}); download or convert it again")


def open_gguf(path: str | Path):
    """(reader, fields) of a GGUF file; a truncated or corrupt file is a ConfigError naming it.

    The reader maps the file and checks every tensor's extent, so a cut file fails here.
    """
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
        return reader, read_fields(reader)
    except (ValueError, IndexError, KeyError, OSError, EOFError, UnicodeDecodeError) as e:
        raise corrupt(path, e) from None


def gguf_config(reader, fields: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    """The model config of an opened GGUF file (tied embeddings: no `output.weight`)."""
    tied = all(t.name != "output.weight" for t in reader.tensors)
    return gguf_model_config(fields, dtype).replace(tie_word_embeddings=tied)


def gguf_model_config(fields: dict[str, Any], dtype: str = "float32") -> ModelConfig:
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"GGUF architecture {arch!r} is not supported (only 'llama')")

    def f(key: str, default: Any = None) -> Any:
        value = fields.get(f"llama.{key}", default)
        if value is None:
            raise ConfigError(f"GGUF metadata lacks llama.{key}; the file is incomplete")
        return value

    hidden, heads = int(f("embedding_length")), int(f("attention.head_count"))
    vocab = fields.get("llama.vocab_size") or len(fields["tokenizer.ggml.tokens"])
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden, num_layers=int(f("block_count")),
        num_heads=heads, num_kv_heads=int(f("attention.head_count_kv", heads)),
        head_dim=int(f("rope.dimension_count", hidden // heads)),
        intermediate_size=int(f("feed_forward_length")),
        rope_theta=float(f("rope.freq_base", 10000.0)),
        rms_norm_eps=float(f("attention.layer_norm_rms_epsilon")),
        tie_word_embeddings=False, max_position_embeddings=int(f("context_length", 2048)),
        dtype=dtype)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's convert-time permutation of Q/K rows ([out, in]).

    llama.cpp interleaves the two rotary halves of each head (pairs 2i, 2i+1); HF keeps them
    as first half / second half. Rows were reshaped (n_head, 2, D/2) -> (n_head, D/2, 2).
    """
    out = w.shape[0]
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stack_layers(ws: list[np.ndarray]) -> jax.Array:
    """[L, in, out] (2-D GGUF tensors, [out, in] each) or [L, n] from one array per layer.

    Stacked and transposed by XLA, not numpy. Why: numpy writes each result into fresh
    pages, and on the 2-core CI machine first touching them cost more than the copy (a
    106 MB `np.stack` took 1.2-1.5 s, XLA's stack and transpose of it 0.25 s: its copies
    reuse its allocator's memory). SmolLM2's first load (GGUF to params, f32): 16.3-19.2 s
    before, 10.6-16.8 s after, five runs each (stop 65). On a GPU the two run there.
    """
    stacked = jnp.stack([jnp.asarray(w) for w in ws])
    return jnp.swapaxes(stacked, 1, 2) if stacked.ndim == 3 else stacked


def load_gguf(path: str | Path, dtype: str = "float32"
              ) -> tuple[ModelConfig, Params, Tokenizer]:
    """Reads config, dequantized weights (as [in, out]) and tokenizer from one GGUF file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    reader, fields = open_gguf(path)
    cfg = gguf_config(reader, fields, dtype)
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str) -> np.ndarray:
        if name not in tensors:
            raise ConfigError(f"GGUF file {path} is missing tensor {name!r}")
        t = tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
            return w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims inner-first
        except ValueError as e:  # a tensor's data shorter than its header says
            raise corrupt(path, e) from None

    abstract = abstract_params(cfg)
    layers = {}
    for field, name in _LAYER_TENSORS.items():
        if getattr(abstract.layers, field) is None:
            continue
        ws = []
        for i in range(cfg.num_layers):
            w = get(f"blk.{i}.{name}")
            if field in ("wq", "bq"):
                w = unpermute_qk(w, cfg.num_heads)
            elif field in ("wk", "bk"):
                w = unpermute_qk(w, cfg.num_kv_heads)
            ws.append(w)
        layers[field] = stack_layers(ws)
    params = Params(embed=get("token_embd.weight"), layers=LayerParams(**layers),
                    final_norm=get("output_norm.weight"),
                    lm_head=None if cfg.tie_word_embeddings else get("output.weight").T)
    return cfg, to_device(params, abstract), Tokenizer.from_gguf_fields(fields)
