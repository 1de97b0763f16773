"""`jdecode experiment` on the tiny model: two methods x two batch sizes write all three outputs,
lossless methods reproduce the baseline token for token, a rerun computes nothing, and bad
configs are one-line errors."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from jdecode.cli import app
from jdecode.config import ConfigError
from jdecode.experiments import runner
from jdecode.experiments.config import cell_key, load_config, resolve_prompts
from jdecode.provenance import SWITCHES, environment

GRID = {
    "name": "tiny-grid", "model": "tiny", "chat": False, "max_new_tokens": 10,
    "ignore_eos": True, "batch_sizes": [1, 2],
    "methods": [{"method": "speculative", "label": "ngram-k2", "options": {"k": 2}},
                {"method": "speculative", "label": "ngram-k3", "options": {"k": 3}}],
}


@pytest.fixture
def experiment(tmp_path, rng):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"token_ids": rng.integers(0, 64, n).tolist(), "kind": kind}
            for n, kind in ((6, "a"), (9, "a"), (5, "b"))]
    rows[0]["token_ids"] += rows[0]["token_ids"]  # a repeat for prompt lookup to find
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({**GRID, "prompts": [str(prompts)]}))
    return path


def test_grid_writes_results_and_resumes(experiment, tmp_path, monkeypatch):
    out = tmp_path / "out"
    rows = runner.run_experiment(load_config(experiment), out, progress=False)
    assert [(r["label"], r["batch"]) for r in rows] == [
        ("autoregressive", 1), ("ngram-k2", 1), ("ngram-k3", 1),
        ("autoregressive", 2), ("ngram-k2", 2), ("ngram-k3", 2)]
    for r in rows:
        assert r["exact_prompts"] == 3 and r["lossless"]  # greedy speculative is exact
        assert r["tok_s"] > 0 and r["speedup"] > 0 and 1.0 <= r["mean_accepted"] <= 4.0
        assert r["quality"]["agreement"] == 1.0
        assert r["jax_version"] and r["device"] and r["config"]["name"] == "tiny-grid"
    assert rows[0]["speedup"] == 1.0 and set(rows[1]["by_kind"]) == {"a", "b"}
    assert rows[1]["method_stats"]["acceptance_rate"] == pytest.approx(
        (rows[1]["mean_accepted"] - 1) / 2)
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6
    table = (out / "results.md").read_text()
    assert "| tiny | ngram-k3 | draft=ngram, k=3" in table and "Per prompt kind" in table
    assert (out / "speedup_vs_batch.png").stat().st_size > 0
    outputs = json.loads((out / "outputs" / f"{rows[1]['cell']}.json").read_text())
    assert len(outputs["tokens"]) == 3 and all(len(t) == 10 for t in outputs["tokens"])

    def fail(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(runner, "run_cell", fail)
    again = runner.run_experiment(load_config(experiment), out, progress=False)
    assert again == rows and len((out / "results.jsonl").read_text().splitlines()) == 6


def test_a_switch_in_the_environment_is_part_of_a_cell(experiment, monkeypatch):
    """A run with JDECODE_FUSED_DECODE set runs other kernels: it must not resume from the
    cells of a run without it, and its rows name it. Unset, keys stay as they were."""
    cfg = load_config(experiment)
    prompts = resolve_prompts(cfg)
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)
    plain = cell_key(cfg, "tiny", cfg.methods[0], 1, prompts)
    assert environment()["switches"] == ""
    monkeypatch.setenv("JDECODE_FUSED_DECODE", "1")
    assert cell_key(cfg, "tiny", cfg.methods[0], 1, prompts) != plain
    assert environment()["switches"] == "JDECODE_FUSED_DECODE=1"


@pytest.mark.parametrize("change, message", [
    ({"batch_size": [1]}, "has no option 'batch_size'; valid options are: name, model"),
    ({"max_new_tokens": "ten"}, "max_new_tokens='ten' must be int"),
    ({"methods": [{"method": "beam"}]}, "unknown method 'beam': choose one of autoregressive"),
    ({"methods": [{"method": "speculative", "options": {"kk": 1}}]},
     "method 'speculative' (grid.yaml: methods[0]) has no option 'kk'; valid options are: draft, "
     "k"),
    ({"methods": [{"method": "speculative", "options": {"k": "x"}}]}, "k='x' must be int"),
    ({"prompts": ["poems"]}, "prompt set 'poems' is neither built in (chat, code, summarization, "
                             "tasks) nor a JSONL file"),
    ({"batch_sizes": [0]}, "batch_sizes=[0]: give batch sizes >= 1"),
    ({"dtype": "auto"}, "dtype='auto': an experiment names its dtype, one of float32, bfloat16"),
])
def test_bad_configs_are_one_line_errors(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({**GRID, **change}))
    with pytest.raises(ConfigError, match=None) as e:
        load_config("grid.yaml")
    assert message in str(e.value), str(e.value)
    result = CliRunner().invoke(app, ["experiment", "grid.yaml"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert message in " ".join(result.output.split())


def test_set_reaches_into_the_method_list(experiment):
    cfg = load_config(experiment, ["methods.1.options.k=4", "batch_sizes=[4]"])
    assert cfg.methods[1].options == {"k": 4} and cfg.batch_sizes == (4,)
    with pytest.raises(ConfigError, match="'5' is not an index of a list of 2"):
        load_config(experiment, ["methods.5.options.k=4"])
