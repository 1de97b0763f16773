"""The method registry: every registered method runs the same way through the Python API, the
CLI and the experiment runner on the real default model, lossless ones reproducing
autoregressive greedy tokens exactly; unknown methods, options and values are one-line errors."""

from __future__ import annotations

import inspect
import json

import jax
import pytest
import yaml
from helpers import tiny_model
from typer.testing import CliRunner

import jdecode
from jdecode.cli import app
from jdecode.config import ConfigError
from jdecode.decoding import generate as generate_module
from jdecode.decoding import methods
from jdecode.decoding.cllm import consistency_weights
from jdecode.decoding.draft_model import draft_from_target, draft_weights
from jdecode.decoding.eagle_draft import init_draft
from jdecode.decoding.generate import Generator
from jdecode.decoding.heads import init_heads
from jdecode.decoding.sampling import SamplingParams
from jdecode.experiments.config import load_config
from jdecode.experiments.runner import run_experiment
from jdecode.io import artifacts, registry

PROMPT = "Write a Python function that returns the square of a number."
NEW = 12


def untrained_heads(smol, tmp_path) -> str:
    """Two Medusa heads as initialized (each predicts what the LM head does), with made-up
    accuracies to build the tree from: enough to run the method, not to speed it up."""
    path = tmp_path / "medusa-heads"
    artifacts.save_artifact(path, "medusa", smol, init_heads(smol.cfg.hidden_size, 2),
                            {"num_heads": 2},
                            {"rank_accuracy": [[0.6, 0.2, 0.1], [0.4, 0.2, 0.1]]})
    return str(path)


def untrained_eagle(smol, tmp_path) -> str:
    """An EAGLE-3 draft as initialized (the target's last layer over three fused layers)."""
    path = tmp_path / "eagle-draft"
    draft = init_draft(smol.params, smol.cfg, jax.random.key(0), num_features=3)
    artifacts.save_artifact(path, "eagle", smol, draft, {"feature_layers": [2, 15, 27]},
                            save_dtype="bfloat16")
    return str(path)



def untrained_consistency(smol, tmp_path) -> dict:
    """A "consistency" artifact that fine-tuned nothing (no layers; the target's final norm):
    a few KB, so the recipe checks the plumbing, not training (tests/training covers that)."""
    artifacts.save_artifact(tmp_path / "consistency", "consistency", smol,
                            consistency_weights(smol.params, ()), {"layers": []})
    return {"weights": str(tmp_path / "consistency"), "block_size": 3, "init": "ngram"}


# Options that make a method runnable on the default model in CI: a mapping, or a callable
# (smol, tmp_path) -> options that first writes the trained part it needs (a method whose
# defaults need a trained part points at a committed artifact or writes one). A new method
# without a working default must add its entry here, or test_every_method_has_a_recipe fails.
RECIPES = {
    "autoregressive": {},
    "speculative": {"draft": "artifacts/smollm2-135m-d2.tgz", "k": 2},
    "medusa": lambda smol, tmp: {"heads": untrained_heads(smol, tmp), "tree_nodes": 5},
    "medusa-typical": lambda smol, tmp: {"heads": untrained_heads(smol, tmp), "tree_nodes": 5},
    "blockwise": lambda smol, tmp: {"heads": untrained_heads(smol, tmp), "k": 2},
    "eagle": lambda smol, tmp: {"draft": untrained_eagle(smol, tmp), "depth": 1, "width": 1,
                                "top_k": 3, "tree_nodes": 4},
    "jacobi": {"block_size": 3, "init": "ngram"},
    "lookahead": {"window": 3, "ngram": 3, "guesses": 2},
    "cllm": untrained_consistency,
    "early_exit": {"exits": "untrained:6", "criterion": "saturation", "threshold": 0.99,
                   "share_tokens": 0},
    "mixture_of_depths": {"routers": "untrained", "capacity": 0.5, "mode": "sequence"},
    "cascade": {"models": ["artifacts/smollm2-135m-d2.tgz", "target"], "threshold": -1.0},
    "speculative-cascade": {"draft": "artifacts/smollm2-135m-d2.tgz", "k": 2, "rule": "opt",
                            "alpha": 0.3},
}
runner = CliRunner()


def test_every_method_has_a_recipe():
    assert set(methods.available()) <= set(RECIPES), \
        f"add a CI recipe for {sorted(set(methods.available()) - set(RECIPES))}"


def test_methods_command_lists_every_method_and_its_options():
    result = runner.invoke(app, ["methods", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.stdout)
    assert set(listed) == set(methods.available())
    assert listed["autoregressive"]["lossless"] and listed["speculative"]["lossless"]
    assert listed["speculative"]["options"]["k"] == {"type": "int", "default": 4,
                                                     "help": "tokens drafted per step"}
    table = runner.invoke(app, ["methods"])
    assert table.exit_code == 0 and "speculative" in table.output and "k: int = 4" in table.output


@pytest.fixture(scope="module")
def reference(smol_generator):
    (r,) = smol_generator.generate(PROMPT, SamplingParams(max_new_tokens=NEW, ignore_eos=True),
                                   chat=True)
    return r.token_ids


def generator_key(*args, **kwargs) -> str:
    """The arguments of `Generator(*args, **kwargs)`, defaults filled in, as a string."""
    bound = inspect.signature(Generator).bind(*args, **kwargs)
    bound.apply_defaults()
    named = dict(bound.arguments)
    model, options = named.pop("model"), named.pop("options")
    # As the Generator reads them: a mapping (API, experiment) or the parsed options (CLI).
    options = methods.parse_options(methods.get(named["method"]), options)
    return json.dumps([id(model), named, repr(options)], sort_keys=True, default=repr)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_method_runs_alike_through_api_cli_and_experiment(name, smol, smol_cache, reference,
                                                          smol_generator, tmp_path, monkeypatch):
    opts = RECIPES[name](smol, tmp_path) if callable(RECIPES[name]) else RECIPES[name]
    sp = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    # The three paths share the Generator their arguments name, so its steps compile once, not
    # three times (a fresh Generator re-traces them: ~2 s of CI each). Each path still parses
    # its own options and makes its own generate call; one whose arguments differed would get
    # its own Generator, and the test asserts below that none did.
    plain = generator_key(smol)  # the experiment's baseline, the session's plain Generator
    built = {plain: smol_generator}
    keys = []  # the arguments each path built (or took) its Generator with

    def shared(*args, **kwargs):
        keys.append(key := generator_key(*args, **kwargs))
        if key not in built:
            built[key] = Generator(*args, **kwargs)
        return built[key]

    monkeypatch.setattr(generate_module, "Generator", shared)  # the API's and CLI's lookup
    # The API reuses the Generator an earlier call on this session's model left
    # (`shared_generator`): start without one, so this test's API call builds its own here.
    monkeypatch.setattr(smol, "shared_generator", None)
    monkeypatch.setattr("jdecode.experiments.runner.Generator", shared)
    (api,) = jdecode.generate(smol, PROMPT, sp, chat=True, method=name, **opts)

    monkeypatch.setattr(registry, "load", lambda *a, **k: smol)  # the CLI loads nothing new
    args = ["generate", PROMPT, "--chat", "--max-new-tokens", str(NEW), "--json",
            "--method", name] + [f"--set={k}={v}" for k, v in opts.items()]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    cli = json.loads(result.stdout)
    assert cli["method"] == name and cli["options"].items() >= opts.items()

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT}))
    cfg = tmp_path / "e.yaml"
    cfg.write_text(yaml.safe_dump({"name": "one", "model": "smollm2-135m", "ignore_eos": True,
                                   "quality": False,
                                   "prompts": [str(prompts)], "max_new_tokens": NEW,
                                   "methods": [{"method": name, "label": "m",
                                                "options": opts}]}))
    monkeypatch.setattr("jdecode.experiments.runner.load", lambda *a, **k: smol)
    rows = run_experiment(load_config(cfg), tmp_path / "out", progress=False)
    row = rows[-1]
    outputs = json.loads((tmp_path / "out" / "outputs" / f"{row['cell']}.json").read_text())

    assert api.token_ids == cli["token_ids"] == outputs["tokens"][0]
    # API, CLI and experiment built the method's Generator with equal arguments (the
    # experiment's baseline, the plain Generator, aside).
    method_keys = [k for k in keys if k != plain] if name != "autoregressive" else keys
    assert len(method_keys) >= 3 and len(set(method_keys)) == 1, "\n".join(method_keys)
    if methods.get(name).lossless:
        assert api.token_ids == reference
        assert row["exact_prompts"] == 1


def test_bad_method_input_is_one_line(smol, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="unknown method 'beam': choose one of "
                                          "autoregressive, .*speculative"):
        Generator(smol, method="beam")
    with pytest.raises(ConfigError, match="method 'speculative' has no option 'kk'; valid "
                                          "options are: draft, k, max_ngram, with_ngram"):
        Generator(smol, method="speculative", options={"kk": 2})
    with pytest.raises(ConfigError, match="k=2.5 must be int"):
        jdecode.generate(smol, "hi", method="speculative", k=2.5)
    with pytest.raises(ValueError, match="pass a method .* or a decoder_fn, not both"):
        Generator(smol, decoder_fn=lambda cfg, n: None, method="speculative")

    # A draft trained for another model: the artifact check names both and the fix.
    tiny = tiny_model(3)
    artifacts.save_artifact(tmp_path / "d", "draft", tiny,
                            draft_weights(draft_from_target(tiny, (0,))), {"layers": [0]})
    monkeypatch.setattr(registry, "load", lambda *a, **k: smol)
    result = runner.invoke(app, ["generate", "hi", "--method", "speculative",
                                 "--set", f"draft={tmp_path / 'd'}"])
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "was trained for target 'tiny'" in out and "jdecode train draft --model" in out
    result = runner.invoke(app, ["generate", "hi", "--method", "beam"])
    assert result.exit_code == 2 and "unknown method 'beam'" in result.output
