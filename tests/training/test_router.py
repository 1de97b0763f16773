"""Mixture-of-depths routers trained on the frozen target: the routed model's loss falls at the
capacity, held-out logit quantiles are recorded, the checkpoint restores and resumes, and the
mixture_of_depths method loads the artifact."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.config import ModelConfig
from jdecode.decoding import methods
from jdecode.decoding.mixture_of_depths import QUANTILE_LEVELS, load_routers
from jdecode.io.artifacts import read_manifest
from jdecode.io.registry import Model
from jdecode.model.params import init_params
from jdecode.training.corpus import Corpus
from jdecode.training.router import RouterOptions, train_routers
from jdecode.training.trainer import TrainConfig

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=6, num_heads=4, num_kv_heads=2,
                  head_dim=8, intermediate_size=64, max_position_embeddings=128)
OPTS = RouterOptions(capacity=0.6, compute_penalty=2.0)
TC = TrainConfig(steps=48, batch_size=8, learning_rate=0.1, warmup_steps=2,
                 checkpoint_every=24, eval_every=24, max_epochs=100)


@pytest.fixture(scope="module")
def target():
    return Model("tiny-router", CFG, init_params(CFG, jax.random.key(5)), None)


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, CFG.vocab_size, int(rng.integers(16, 33))).tolist()
            for _ in range(28)]
    return Corpus.from_sequences(seqs[:24], 32, seqs[24:])


@pytest.fixture(scope="module")
def trained(target, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("router")
    routers, losses, metrics = train_routers(target, out, OPTS, TC, corpus=corpus,
                                             progress=False)
    return out, routers, losses, metrics


def test_loss_falls_within_the_capacity(trained):
    _, _, losses, metrics = trained
    assert len(losses) == TC.steps
    # Routing starts at the capacity with random routers: what falls is the KL of the choice.
    assert np.mean(losses[-6:]) < 0.85 * np.mean(losses[:6])
    ev = metrics["last_eval"]
    assert ev["val_share"] <= OPTS.capacity + 0.1  # held out, the penalty holds the share
    assert 0 < ev["val_kl"] and 0 <= ev["val_top1"] <= 1


def test_artifact_restores_and_the_method_loads_it(trained, target):
    out, routers, _, _ = trained
    assert read_manifest(out)["kind"] == "router"
    restored = load_routers(out, target)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(routers)):
        np.testing.assert_array_equal(a, b)
    q = np.asarray(restored.quantiles)
    assert q.shape == (CFG.num_layers, len(QUANTILE_LEVELS)) and (np.diff(q, axis=1) >= 0).all()
    built = methods.build("mixture_of_depths", target, {"routers": str(out), "rule": "threshold",
                                                        "capacity": 0.5, "share_tokens": 0})
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)
    assert built.score(built.model.params, tokens).shape == (2, 16, CFG.vocab_size)
    assert built.describe({"batch": 8}) == {}  # no tokenizer: no held-out share
    top_c = methods.build("mixture_of_depths", target, {"routers": str(out), "capacity": 0.3})
    assert top_c.describe({"batch": 8}) == {"layer_share": 3 / 8}
