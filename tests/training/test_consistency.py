"""Consistency training on a tiny random model: trajectories run to the greedy fixed point,
the rows mask what carries no signal, training raises the fixed-point agreement from noisy
blocks, and the saved "consistency" artifact decodes with `cllm` exactly as the new model's own
greedy decoding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nar_common import CFG, MAX_NEW, greedy_reference, make_prompts

import jdecode
from jdecode.decoding.cllm import CllmOptions, consistency_weights, load_consistency
from jdecode.decoding.sampling import SamplingParams
from jdecode.io.artifacts import ArtifactError, save_artifact
from jdecode.io.registry import Model
from jdecode.model.params import init_params
from jdecode.training.consistency import (
    ConsistencyOptions,
    consistency_objective,
    jacobi_trajectories,
    train_consistency_model,
    trajectory_rows,
)
from jdecode.training.corpus import Corpus
from jdecode.training.registry import get_trainer
from jdecode.training.trainer import TrainConfig, evaluate

N = 6


@pytest.fixture(scope="module")
def target():
    return Model("tiny-nar", CFG, init_params(CFG, jax.random.key(5)), None)


def windows(rng, count: int, length: int = 24) -> list[list[int]]:
    return [rng.integers(0, CFG.vocab_size, length).tolist() for _ in range(count)]


def test_trajectories_reach_the_greedy_continuation(target, rng):
    """Iterate 0 is the initial guess (the last prefix token repeated), iterate k has its first
    k tokens right, and iterate n is greedy decoding's continuation of the prefix."""
    starts = np.asarray([5, 11, 17], np.int32)
    prompt, _ = make_prompts(rng)  # lengths 5, 11, 17: the block starts
    seqs = np.zeros((3, 32), np.int32)
    seqs[:, :17] = np.asarray(prompt)[:, :17]
    path = np.asarray(jax.jit(jacobi_trajectories, static_argnames=("cfg", "opts"))(
        target.params, jnp.asarray(seqs), jnp.asarray(starts), cfg=CFG,
        opts=ConsistencyOptions(block_size=N)))
    assert path.shape == (N + 1, 3, N)
    want = greedy_reference(target.params, prompt, jnp.asarray(starts))  # prefixes = starts
    np.testing.assert_array_equal(path[0], np.repeat(seqs[[0, 1, 2], starts - 1][:, None], N, 1))
    for k in range(1, N + 1):
        np.testing.assert_array_equal(path[k][:, :k], want[:, :k])
    np.testing.assert_array_equal(path[N], want[:, :N])


def test_rows_hold_every_unconverged_iterate_with_its_signal_mask(target, rng):
    seqs = windows(rng, 6)
    corpus = Corpus.from_sequences(seqs, 24)
    opts = ConsistencyOptions(block_size=N, blocks_per_window=2)
    rows, stats = trajectory_rows(target, corpus.tokens, corpus.mask, opts, seed=0)
    assert stats["blocks"] == 12 and stats["rows"] == len(rows["noisy"]) > 12
    assert 0 < stats["iterations_per_token"] <= 1
    for noisy, fixed, cmask, mask in zip(rows["noisy"], rows["fixed"], rows["cmask"],
                                         rows["mask"], strict=True):
        diff = np.flatnonzero(noisy != fixed)
        assert len(diff) and diff.max() - diff.min() < N  # only inside one block
        end = int(mask.sum())  # the row is valid up to the block's end
        start = end - N
        assert mask[:end].all() and diff.min() >= start and diff.max() < end
        # Positions predicting block tokens after the first wrong one, inside the block.
        np.testing.assert_array_equal(np.flatnonzero(cmask),
                                      np.arange(diff.min(), end - 1))


TC = TrainConfig(steps=30, batch_size=8, learning_rate=3e-3, warmup_steps=2, eval_every=30,
                 checkpoint_every=30)
# A light AR anchor: on a random model the consistency term's effect is then clear in 30 steps.
OPTS = ConsistencyOptions(block_size=N, blocks_per_window=2, layers=(1,), ar_weight=1.0)


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    """A short run on random windows: enough steps to move the fixed-point agreement."""
    rng = np.random.default_rng(7)
    corpus = Corpus.from_sequences(windows(rng, 24), 24, windows(rng, 6))
    out = tmp_path_factory.mktemp("consistency")
    tuned, losses, metrics = train_consistency_model(target, out, OPTS, TC, corpus=corpus,
                                                     progress=False)
    return out, tuned, losses, metrics, corpus


def test_training_raises_fixed_point_agreement_and_saves_a_new_model(target, trained):
    out, tuned, losses, metrics, corpus = trained
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    # The training rows (same seed: the same blocks), scored before and after.
    rows, _ = trajectory_rows(target, corpus.tokens, corpus.mask, OPTS, TC.seed)
    eval_sums = jax.jit(consistency_objective(CFG, (1,), OPTS.ar_weight).eval_sums)
    before = evaluate(eval_sums, consistency_weights(target.params, (1,)), target.params, rows,
                      16)
    after = evaluate(eval_sums, consistency_weights(tuned.params, (1,)), target.params, rows, 16)
    assert after["noisy_top1"] > before["noisy_top1"] + 0.02  # measured: 0.039 -> 0.086
    assert before["fixed_top1"] == 1.0 and before["fixed_kl"] < 1e-6  # the start is the target
    assert metrics["val_before"]["fixed_top1"] == 1.0
    assert {"val_iterations_per_token_before", "val_iterations_per_token_after"} <= set(metrics)
    restored = load_consistency(out, target)
    assert "consistency" in restored.name  # a new model, named as one
    for a, b in zip(jax.tree_util.tree_leaves(restored.params),
                    jax.tree_util.tree_leaves(tuned.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Only layer 1 and the final norm moved; layer 0 and the embeddings are the target's.
    np.testing.assert_array_equal(restored.params.layers.wq[0], target.params.layers.wq[0])
    np.testing.assert_array_equal(restored.params.embed, target.params.embed)
    assert not np.array_equal(restored.params.layers.wq[1], target.params.layers.wq[1])


def test_cllm_decodes_the_new_model_exactly(target, trained, rng):
    """`cllm` is Jacobi decoding of the fine-tune: lossless with respect to the new model."""
    out, tuned = trained[:2]
    prompt = rng.integers(0, CFG.vocab_size, 9).tolist()
    sp = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    (got,) = jdecode.generate(target, prompt, sp, method="cllm", weights=str(out),
                              block_size=4, init="ngram")
    (want,) = jdecode.generate(tuned, prompt, sp)
    assert got.token_ids == want.token_ids
    assert got.stats["iterations_per_token"] == pytest.approx(1 / got.stats["mean_accepted"])


def test_cllm_needs_a_consistency_artifact_for_this_target(target, tmp_path):
    with pytest.raises(ValueError, match="pass weights=DIR"):
        jdecode.generate(target, [1, 2, 3], method="cllm")
    other = Model("tiny-other", CFG, init_params(CFG, jax.random.key(99)), None)
    save_artifact(tmp_path / "c", "consistency", other, consistency_weights(other.params, ()),
                  {"layers": []})
    with pytest.raises(ArtifactError, match="was trained for target 'tiny-other'"):
        load_consistency(tmp_path / "c", target)
    with pytest.raises(ValueError, match=r"layers=\[2\]: give distinct layer indices"):
        train_consistency_model(target, tmp_path / "x", ConsistencyOptions(layers=(2,)),
                                corpus=Corpus.from_sequences([[1, 2]], 4))
    assert get_trainer("consistency").options_cls is ConsistencyOptions
    assert CllmOptions(weights="x").block_size == 8
