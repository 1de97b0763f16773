"""Medusa heads trained with the shared harness on a tiny random target's own text: the loss
falls, the held-out accuracy table is recorded, the artifact restores to identical drafts, and
the trained heads drive lossless Medusa decoding through the registry."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.generate import Generator
from jdecode.decoding.heads import head_logits, load_heads
from jdecode.decoding.sampling import SamplingParams
from jdecode.io import artifacts
from jdecode.io.registry import Model
from jdecode.model.params import init_params
from jdecode.training.corpus import CorpusConfig
from jdecode.training.medusa import MedusaTrainOptions, train_medusa_heads
from jdecode.training.trainer import TrainConfig

CFG = ModelConfig(vocab_size=64, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=512)
OPTS = MedusaTrainOptions(num_heads=3, eval_ranks=4)
TC = TrainConfig(steps=60, batch_size=8, learning_rate=1e-2, warmup_steps=5, checkpoint_every=30,
                 eval_every=30, max_epochs=100)
CC = CorpusConfig(seq_len=40, new_tokens=32, val_fraction=0.25)


@pytest.fixture(scope="module")
def target():
    return Model("tiny-medusa-target", CFG, init_params(CFG, jax.random.key(21)), None)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in rng.integers(3, 10, 24)]


@pytest.fixture(scope="module")
def trained(target, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("medusa")
    heads, losses, metrics = train_medusa_heads(target, out, OPTS, TC, CC, prompts=prompts,
                                                progress=False)
    return out, heads, losses, metrics


def test_loss_falls_and_the_accuracy_table_is_recorded(trained):
    out, _, losses, metrics = trained
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:5])
    acc = metrics["rank_accuracy"]
    assert np.shape(acc) == (OPTS.num_heads, OPTS.eval_ranks)
    assert metrics["accuracy_split"] == "held_out"
    for row, head in zip(acc, metrics["heads"]):
        assert head["top1"] == pytest.approx(row[0])
        assert 0.0 <= head["top1"] <= head["top5"] <= 1.0
        assert sum(row) <= 1.0 + 1e-6  # each position's token sits at one rank at most
    assert acc[0][0] > 4 / CFG.vocab_size  # well above chance
    manifest = artifacts.read_manifest(out)
    assert manifest["kind"] == "medusa" and manifest["options"]["num_heads"] == 3
    assert manifest["metrics"]["rank_accuracy"] == acc


def test_restored_heads_give_identical_drafts(trained, target, prompts):
    out, heads, _, _ = trained
    restored, _ = load_heads(out, target)
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(heads)):
        np.testing.assert_array_equal(a, b)
    _, hidden = phases.score(target.params, jnp.asarray([prompts[1]], jnp.int32), cfg=CFG)
    drafts = [jax.lax.top_k(head_logits(target.params, h, hidden), 4)[1]
              for h in (heads, restored)]
    np.testing.assert_array_equal(*drafts)


def test_trained_heads_decode_losslessly(trained, target, prompts):
    """Through the registry (`Generator(method="medusa")`): rows of different lengths, token-
    identical to autoregressive greedy, with more than one token per step. The Generator pads
    the 3 rows to a batch of 4, where the default plan decodes plainly: `{}` keeps the tree."""
    out = trained[0]
    batch = [prompts[i] for i in (0, 1, 2)]
    sp = SamplingParams(max_new_tokens=32, ignore_eos=True)
    want = [r.token_ids for r in Generator(target).generate(batch, sp)]
    results = Generator(target, method="medusa",
                        options={"heads": str(out), "tree_nodes": 10,
                                 "nodes_by_batch": {}}).generate(batch, sp)
    assert [r.token_ids for r in results] == want
    stats = results[0].stats
    assert stats["mean_accepted"] > 1.3, "the trained heads barely helped: the test is weak"
    assert stats["tree_nodes"] == 10 and stats["predicted_tokens"] > 1.0
