"""ModelConfig: YAML files with `--set` overrides, the HF config.json mapping, validation errors
that name the key and the fix, and hashability (configs are static jit arguments)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from jdecode.config import (
    ConfigError,
    ModelConfig,
    RopeScaling,
    apply_overrides,
    load_model_config_yaml,
    model_config_from_hf,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "models"


@pytest.mark.parametrize("name, layers, kv_heads, tied", [
    ("tiny", 2, 2, False), ("smollm2-135m", 30, 3, True), ("llama-3.2-1b", 16, 8, True),
    ("llama-3-8b", 32, 8, False)])
def test_model_yamls_load(name, layers, kv_heads, tied):
    cfg = load_model_config_yaml(CONFIGS / f"{name}.yaml")
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.tie_word_embeddings) == (layers, kv_heads, tied)
    assert cfg.num_heads % cfg.num_kv_heads == 0


def test_llama32_yaml_has_llama3_rope_scaling():
    cfg = load_model_config_yaml(CONFIGS / "llama-3.2-1b.yaml")
    assert cfg.rope_scaling == RopeScaling(factor=32.0, low_freq_factor=1.0,
                                           high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)


def test_overrides_parse_yaml_values_and_nested_keys():
    cfg = load_model_config_yaml(CONFIGS / "llama-3.2-1b.yaml", (
        "num_layers=3", "rms_norm_eps=1e-6", "tie_word_embeddings=false",
        "rope_scaling.factor=4", "dtype=float16"))
    assert cfg.num_layers == 3 and cfg.rms_norm_eps == 1e-6
    assert cfg.tie_word_embeddings is False and cfg.dtype == "float16"
    assert cfg.rope_scaling.factor == 4 and cfg.rope_scaling.low_freq_factor == 1.0
    # Overrides do not mutate the mapping they were given.
    raw = {"num_layers": 2}
    assert apply_overrides(raw, ["num_layers=5"]) == {"num_layers": 5} and raw == {
        "num_layers": 2}


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['foo'\] in .*tiny\.yaml; "
                                          r"valid keys are: .*num_layers"):
        load_model_config_yaml(CONFIGS / "tiny.yaml", ("foo=1",))


def test_unknown_nested_key_names_the_key():
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['fctor'\] in rope_scaling"):
        load_model_config_yaml(CONFIGS / "llama-3.2-1b.yaml", ("rope_scaling.fctor=2",))


@pytest.mark.parametrize("override, message", [
    ("num_heads=3", "num_heads=3 is not divisible by num_kv_heads=2"),
    ("num_layers=0", "num_layers=0: must be a positive integer"),
    ("head_dim=15", "head_dim=15 must be even"),
    ("dtype=float64", "dtype='float64': choose one of float32, bfloat16, float16"),
])
def test_invalid_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_model_config_yaml(CONFIGS / "tiny.yaml", (override,))


def test_override_needs_key_equals_value():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_model_config_yaml(CONFIGS / "tiny.yaml", ("num_layers",))


def test_missing_yaml_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_config_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_model_config_yaml(bad)


def test_config_is_hashable_and_a_static_jit_argument(rng):
    cfg = load_model_config_yaml(CONFIGS / "llama-3.2-1b.yaml")
    same = load_model_config_yaml(CONFIGS / "llama-3.2-1b.yaml")
    assert cfg == same and hash(cfg) == hash(same)
    assert hash(cfg.replace(num_layers=3)) != hash(cfg)
    with pytest.raises(AttributeError):
        cfg.num_layers = 3  # frozen
    f = jax.jit(lambda x, c: x * c.num_layers, static_argnums=1)
    x = jnp.asarray(rng.standard_normal(3), jnp.float32)
    assert float(f(x, cfg)[0]) == pytest.approx(float(x[0]) * 16)


HF_LLAMA32 = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 2048,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 64, "intermediate_size": 8192, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "max_position_embeddings": 131072,
    "torch_dtype": "bfloat16", "bos_token_id": 128000,
}


def test_hf_config_maps_onto_the_yaml_shape():
    cfg = model_config_from_hf(HF_LLAMA32, dtype="bfloat16")
    assert cfg == load_model_config_yaml(CONFIGS / "llama-3.2-1b.yaml")


def test_hf_qwen2_gets_qkv_bias_and_no_window_unless_enabled():
    raw = dict(HF_LLAMA32, architectures=["Qwen2ForCausalLM"], rope_scaling=None,
               sliding_window=4096, use_sliding_window=False)
    cfg = model_config_from_hf(raw)
    assert cfg.qkv_bias and cfg.sliding_window is None and cfg.rope_scaling is None
    mistral = model_config_from_hf(dict(raw, architectures=["MistralForCausalLM"]))
    assert not mistral.qkv_bias and mistral.sliding_window == 4096


def test_hf_unsupported_architecture_and_rope_type():
    with pytest.raises(ConfigError, match="architecture 'GPT2LMHeadModel' is not supported"):
        model_config_from_hf(dict(HF_LLAMA32, architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ConfigError, match="rope scaling type 'yarn' is not supported"):
        model_config_from_hf(dict(HF_LLAMA32, rope_scaling={"rope_type": "yarn",
                                                             "factor": 4.0}))


def test_direct_construction_validates():
    with pytest.raises(ConfigError, match="vocab_size=-1"):
        ModelConfig(vocab_size=-1, hidden_size=8, num_layers=1, num_heads=1, num_kv_heads=1,
                    head_dim=8, intermediate_size=8)


def test_non_numeric_float_fields_are_named():
    from jdecode.config import ConfigError, load_model_config_yaml

    with pytest.raises(ConfigError, match="rms_norm_eps='tiny'"):
        load_model_config_yaml("configs/models/tiny.yaml", ("rms_norm_eps=tiny",))
    with pytest.raises(ConfigError, match="sliding_window=0"):
        load_model_config_yaml("configs/models/tiny.yaml", ("sliding_window=0",))
