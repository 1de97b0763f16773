"""The EAGLE draft trained with the shared harness and training-time test on a tiny random
target: the loss falls, the per-step table is recorded, and the artifact restores to identical
drafts (lossless decoding with a draft: tests/decoding/test_eagle.py and the registry recipes)."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.eagle_draft import draft_config, eagle3_layers, features_of, load_draft
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.params import init_params
from jdecode.model.transformer import collect_hidden
from jdecode.training.corpus import Corpus
from jdecode.training.eagle import EagleTrainOptions, train_eagle_draft, unrolled_outputs
from jdecode.training.trainer import TrainConfig
from pallas_kernels.testing import jit_for_tests

CFG = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=512)
OPTS = EagleTrainOptions(unroll=3)
TC = TrainConfig(steps=40, batch_size=8, learning_rate=3e-3, warmup_steps=4, checkpoint_every=40,
                 eval_every=40, max_epochs=100)


@pytest.fixture(scope="module")
def target():
    return Model("tiny-eagle-target", CFG, init_params(CFG, jax.random.key(41)), None)


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    # Any text trains the draft to mimic the target on it; random windows skip generation.
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, CFG.vocab_size, 24).tolist() for _ in range(40)]
    corpus = Corpus.from_sequences(seqs[:32], 24, seqs[32:])
    out = tmp_path_factory.mktemp("eagle")
    draft, losses, metrics = train_eagle_draft(target, out, OPTS, TC, corpus=corpus,
                                               progress=False)
    return out, draft, losses, metrics


def test_loss_falls_and_the_step_table_is_recorded(trained):
    out, _, losses, metrics = trained
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3])
    steps = metrics["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3] and metrics["accuracy_split"] == "held_out"
    assert all(0.0 <= s["top1"] <= 1.0 and s["kl"] >= 0.0 for s in steps)
    manifest = artifacts.read_manifest(out)
    assert manifest["kind"] == "eagle"
    assert manifest["options"]["feature_layers"] == list(eagle3_layers(CFG.num_layers))
    assert manifest["metrics"]["steps"] == steps


def test_restored_draft_gives_identical_drafts(trained, target):
    out, draft, _, _ = trained
    restored, _ = load_draft(str(out), target)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(draft)):
        np.testing.assert_array_equal(a, b)
    tokens = jnp.asarray(np.random.default_rng(8).integers(0, CFG.vocab_size, (1, 12)),
                         jnp.int32)
    hooks = collect_hidden(eagle3_layers(CFG.num_layers))
    features = features_of(phases.score(target.params, tokens, cfg=CFG, hooks=hooks)[2])
    unroll = jit_for_tests(partial(unrolled_outputs, unroll=2, dcfg=draft_config(CFG)))
    outs = [unroll(d, target.params, tokens, features) for d in (draft, restored)]
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
