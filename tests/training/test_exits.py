"""Exit heads trained on the frozen target: the KL and classifier losses fall, held-out
agreement rises over the untrained exits, thresholds are calibrated into the manifest, the
checkpoint restores and resumes, and the early_exit method loads the artifact."""

from __future__ import annotations

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.config import ModelConfig
from jdecode.decoding import methods
from jdecode.decoding.early_exit import init_exits, load_exits
from jdecode.io.artifacts import read_manifest
from jdecode.io.registry import Model
from jdecode.model.params import init_params
from jdecode.training.corpus import Corpus
from jdecode.training.exits import (
    CALIBRATION_QUANTILES,
    ExitOptions,
    curve_point,
    exits_objective,
    propagated_curve,
    train_exits,
)
from jdecode.training.trainer import TrainConfig, fit

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, max_position_embeddings=128)
OPTS = ExitOptions(every=2, rank=4, calibration_rows=4)
TC = TrainConfig(steps=16, batch_size=4, learning_rate=1e-2, warmup_steps=2,
                 checkpoint_every=8, eval_every=8)


@pytest.fixture(scope="module")
def target():
    return Model("tiny-exits", CFG, init_params(CFG, jax.random.key(3)), None)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, CFG.vocab_size, int(rng.integers(16, 33))).tolist()
            for _ in range(28)]
    return Corpus.from_sequences(seqs[:24], 32, seqs[24:])


@pytest.fixture(scope="module")
def trained(target, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("exits")
    heads, losses, metrics = train_exits(target, out, OPTS, TC, corpus=corpus, progress=False)
    return out, heads, losses, metrics


def test_losses_fall_and_agreement_rises(trained):
    _, heads, losses, metrics = trained
    assert heads.layers == (1, 3) and len(losses) == TC.steps
    # The loss adds the classifiers' cross-entropy, which cannot fall far on random text.
    assert np.mean(losses[-3:]) < 0.95 * np.mean(losses[:3])
    before, after = metrics["exits_untrained"], metrics["exits_trained"]
    assert set(before["kl"]) == {"layer_1", "layer_3"}
    for layer in before["kl"]:  # held out: every exit's KL to the full model falls
        assert after["kl"][layer] < 0.9 * before["kl"][layer], layer
    assert np.mean(list(after["top1"].values())) > np.mean(list(before["top1"].values()))


def test_calibration_and_artifact(trained, target):
    out, heads, _, _ = trained
    meta = read_manifest(out)
    assert meta["kind"] == "exits" and meta["options"]["layers"] == [1, 3]
    curve = meta["metrics"]["calibration"]["margin"]
    assert set(meta["metrics"]["calibration"]) == {"entropy", "margin", "saturation",
                                                   "classifier"}
    assert len(curve) == len(CALIBRATION_QUANTILES)
    thresholds = [p["threshold"] for p in curve]
    assert thresholds == sorted(thresholds)  # looser to stricter
    shares = [p["layer_share"] for p in curve]
    assert all(0 < s <= 1 for s in shares) and shares[-1] >= shares[0]
    restored, _ = load_exits(out, target)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(heads)):
        np.testing.assert_array_equal(a, b)
    # The same thresholds measured with the method itself (K/V propagated).
    propagated = meta["metrics"]["calibration_propagated"]["margin"]
    assert [p["threshold"] for p in propagated] == thresholds
    assert all(0 < p["layer_share"] <= 1 and 0 <= p["top1"] <= 1 for p in propagated)
    # The method takes the calibrated threshold for its agreement target, from the
    # propagated curve: every point reaches 1e-6, so the one computing fewest layers.
    built = methods.build("early_exit", target, {"exits": str(out), "criterion": "margin",
                                                 "agreement": 1e-6, "share_tokens": 0})
    cheapest = min(propagated, key=lambda p: p["layer_share"])
    assert float(built.model.params[2]) == pytest.approx(cheapest["threshold"])
    tokens = jnp.zeros((1, 8), jnp.int32)
    assert built.score(built.model.params, tokens).shape == (1, 8, CFG.vocab_size)


def test_propagated_curve_at_the_extremes(trained, target, corpus):
    """Entropy <= -1 never holds: every token runs the whole model, agreeing with it. Entropy
    <= 1e9 always holds: every token leaves at the first exit (layer 1 of 6: 2 layers)."""
    _, heads, _, _ = trained
    data = {"tokens": corpus.val_tokens, "mask": corpus.val_mask}
    never, always = propagated_curve(heads, target.params, data, CFG, "entropy", [-1.0, 1e9],
                                     batch_size=2)
    assert never["top1"] == 1.0 and never["layer_share"] == 1.0
    assert never["kl"] == pytest.approx(0.0, abs=1e-5)
    assert always["layer_share"] == pytest.approx((heads.layers[0] + 1) / CFG.num_layers)
    assert always["kl"] > 0


def test_training_resumes_from_its_checkpoint(trained, target, corpus, tmp_path):
    out, heads, _, _ = trained
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    fresh = init_exits(target.params, heads.layers, OPTS.rank, jax.random.key(9))
    res = fit(exits_objective(CFG, OPTS.classifier_weight), fresh, target.params,
              {"tokens": corpus.tokens, "mask": corpus.mask}, None, tmp_path,
              dataclasses.replace(TC, steps=TC.steps + 2), progress=False)
    assert len(res.losses) == 2 and res.steps_done == TC.steps + 2  # only the new steps ran


def test_calibration_point_exits_at_the_first_passing_exit():
    """A token leaves at the first exit whose confidence passes; its agreement, KL and depth
    are that exit's; a token no exit lets go runs the full model (exits after layers 1, 3 of
    6, four tokens)."""
    heads = init_exits(init_params(CFG, jax.random.key(0)), (1, 3), 0, jax.random.key(0))
    stats = {"margin": np.array([[0.9, 0.1, 0.1, 0.6], [0.95, 0.8, 0.2, 0.7]]),
             "agree": np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]]),
             "kl": np.array([[0.1, 2.0, 2.0, 1.0], [0.0, 0.2, 1.0, 0.3]])}
    for score, want in ((0.65, (1.0, 0.15, 16 / 24)), (0.85, (1.0, 0.025, 20 / 24)),
                        (0.05, (0.25, 1.275, 8 / 24))):
        got = curve_point(heads, stats, "margin", score, CFG.num_layers)
        assert (got["top1"], got["kl"], got["layer_share"]) == pytest.approx(want), score
