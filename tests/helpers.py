"""Small helpers shared by the jdecode tests (importable because conftest puts tests/ on the
path): stable seeds and tiny random models."""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def seed_of(name: str) -> int:
    """A stable 31-bit seed from a name (a test id, a module, a variant)."""
    return zlib.crc32(name.encode()) % 2**31


def load_script(name: str):
    """scripts/<name>.py as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model(seed: int, tokenizer=None, **overrides):
    """A `Model` of configs/models/tiny.yaml (f32) with random weights from `seed`.

    overrides: ModelConfig fields to change, e.g. vocab_size to match `tokenizer`.
    """
    import jax

    from jdecode.config import load_model_config_yaml
    from jdecode.io.registry import CONFIG_DIR, Model
    from jdecode.model.params import init_params

    cfg = load_model_config_yaml(CONFIG_DIR / "tiny.yaml").replace(**overrides)
    return Model("tiny", cfg, init_params(cfg, jax.random.key(seed)), tokenizer)


def rope_at(positions, head_dim: int):
    """RoPE's (cos, sin) [..., D/2] at `positions` [B, T] for heads of `head_dim`, from the
    model's own `layers.rope_tables` (tiny.yaml's theta, no scaling): for kernel tests whose
    shapes are not a model's."""
    from jdecode.config import load_model_config_yaml
    from jdecode.io.registry import CONFIG_DIR
    from jdecode.model.layers import rope_tables

    cfg = load_model_config_yaml(CONFIG_DIR / "tiny.yaml").replace(head_dim=head_dim)
    return rope_tables(positions, cfg)


def spy_fused_verify(monkeypatch) -> list:
    """Records each trace that takes `phases.fused_verify_step` (the hooks it was given; None
    without), so a test of the fused verify step fails where it silently falls back."""
    from jdecode.decoding import phases

    calls, real_step = [], phases.fused_verify_step

    def spy(*args, **kwargs):
        calls.append(kwargs.get("hooks"))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(phases, "fused_verify_step", spy)
    return calls
