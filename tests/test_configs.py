"""Every committed config parses: a renamed option or method breaks here, not on the GPU."""

from pathlib import Path

import pytest

from jdecode.cli import read_decode_config
from jdecode.decoding import methods
from jdecode.experiments.config import load_config
from jdecode.training.cli import read_train_config, resolve

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "experiments").glob("*.yaml")), ids=str)
def test_experiment_configs_parse(path):
    cfg = load_config(path)
    assert cfg.methods, f"{path.name} runs no method"
    labels = [m.label or m.method for m in cfg.methods]
    assert len(set(labels)) == len(labels), f"{path.name} repeats a label"


@pytest.mark.parametrize("path", sorted((CONFIGS / "decode").glob("*.yaml")), ids=str)
def test_decode_configs_parse(path):
    raw = read_decode_config(str(path))
    spec = methods.get(raw["method"])
    methods.parse_options(spec, raw.get("options"), where=str(path))


@pytest.mark.parametrize("path", sorted((CONFIGS / "train").glob("*.yaml")), ids=str)
def test_train_configs_parse(path):
    raw = read_train_config(str(path))
    spec, opts, tc, _ = resolve(raw["kind"], raw, [])
    assert spec.kind == raw["kind"] and tc.steps > 0
    assert opts is not None
