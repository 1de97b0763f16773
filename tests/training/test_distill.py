"""The distilled draft: cut from the target, trained on KL to the target's text (loss falls),
checkpointed with orbax (restore and resume), saved as a "draft" artifact, and lossless when it
drafts for its target."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.config import ModelConfig
from jdecode.decoding import phases
from jdecode.decoding.draft_model import (
    DraftWeights,
    draft_from_target,
    load_draft,
    select_layers,
)
from jdecode.decoding.generate import Generator
from jdecode.decoding.sampling import SamplingParams
from jdecode.decoding.speculative import build_speculative
from jdecode.io.artifacts import read_manifest
from jdecode.io.registry import Model
from jdecode.model.params import init_params
from jdecode.training.corpus import CorpusConfig, held_out_prompts
from jdecode.training.distill import DraftOptions, distill_loss, draft_objective, train_draft_model
from jdecode.training.trainer import TrainConfig, evaluate
from pallas_kernels.testing import assert_close

CFG = ModelConfig(vocab_size=64, hidden_size=64, num_layers=4, num_heads=4, num_kv_heads=2,
                  head_dim=16, intermediate_size=128, max_position_embeddings=512)
OPTS = DraftOptions(num_layers=2)
TC = TrainConfig(steps=12, batch_size=4, learning_rate=3e-3, warmup_steps=2, checkpoint_every=6)
CC = CorpusConfig(seq_len=32, new_tokens=24)


def all_logits(params, cfg, tokens):
    return phases.score(params, tokens, cfg=cfg)[0]


@pytest.fixture(scope="module")
def target():
    return Model("tiny-target", CFG, init_params(CFG, jax.random.key(0)), None)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in (4, 6, 8, 5, 7, 9, 3, 6)]


@pytest.fixture(scope="module")
def trained(target, prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("draft")
    draft, losses = train_draft_model(target, out, OPTS, TC, CC, prompts=prompts, progress=False)
    return out, draft, losses


def test_select_layers():
    assert select_layers(30, 4) == (0, 10, 19, 29)
    assert select_layers(30, 1) == (0,)
    assert select_layers(4, 4) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="choose 1..4"):
        select_layers(4, 5)


def test_draft_with_every_layer_is_the_target(target, prompts):
    tokens = jnp.asarray([prompts[2]], jnp.int32)
    full = draft_from_target(target, select_layers(CFG.num_layers, CFG.num_layers))
    assert_close(all_logits(full.params, full.cfg, tokens),
                 all_logits(target.params, CFG, tokens), "float32")
    cut = draft_from_target(target, (0, 3))
    assert cut.cfg.num_layers == 2
    np.testing.assert_array_equal(cut.params.layers.wq[1], target.params.layers.wq[3])


def test_training_lowers_kl_and_checkpoints(trained, target):
    out, draft, losses = trained
    assert len(losses) == TC.steps
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])
    meta = read_manifest(out)
    assert meta["kind"] == "draft" and meta["options"]["layers"] == [0, 3]
    assert meta["target"]["name"] == "tiny-target"
    assert (out / "loss.png").is_file()
    restored = load_draft(out, target)
    for a, b in zip(jax.tree_util.tree_leaves(restored.params),
                    jax.tree_util.tree_leaves(draft.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Trained layers moved away from the target's; the shared embedding did not.
    assert not np.allclose(restored.params.layers.wq[1], target.params.layers.wq[3])
    np.testing.assert_array_equal(restored.params.embed, target.params.embed)


def test_resume_continues_from_checkpoint(trained, target, prompts, tmp_path):
    out, _, _ = trained
    shutil.copytree(out / "checkpoints", tmp_path / "checkpoints")
    shutil.copy(out / "corpus.npz", tmp_path / "corpus.npz")
    longer = dataclasses.replace(TC, steps=TC.steps + 2)
    _, losses = train_draft_model(target, tmp_path, OPTS, longer, CC, prompts=prompts,
                                  progress=False)
    assert len(losses) == 2  # only the steps after the saved one ran


def test_distilled_draft_is_lossless(trained, target, prompts):
    out, _, _ = trained
    sp = SamplingParams(max_new_tokens=24, ignore_eos=True)
    baseline = Generator(target).generate(prompts[:3], sp)
    model, decoder_fn = build_speculative(target, str(out), k=3)
    results = Generator(model, decoder_fn).generate(prompts[:3], sp)
    assert [r.token_ids for r in results] == [b.token_ids for b in baseline]
    assert results[0].stats["mean_accepted"] > 1.0


def test_time_budget_and_bf16_save(target, prompts, tmp_path):
    """A zero budget stops after one step and still saves; a bf16 draft loads back in the
    target's dtype, equal to the trained weights up to bf16 rounding."""
    tc = dataclasses.replace(TC, steps=50, time_budget_s=0.0)
    cc = dataclasses.replace(CC, samples_per_prompt=2, gen_batch=4)
    draft, losses = train_draft_model(target, tmp_path, DraftOptions(2, "bfloat16"), tc, cc,
                                      prompts=prompts[:4], progress=False)
    assert len(losses) == 1
    meta = read_manifest(tmp_path)
    assert meta["saved_dtypes"] == ["bfloat16"] and meta["metrics"]["steps_done"] == 1
    assert np.load(tmp_path / "corpus.npz")["tokens"].shape[0] == 8  # 4 prompts x 2 samples
    restored = load_draft(tmp_path, target)
    assert restored.params.layers.wq.dtype == target.params.layers.wq.dtype
    assert_close(restored.params.layers.wq, draft.params.layers.wq, "bfloat16")


def test_held_out_eval_and_epoch_warning(target, prompts, tmp_path):
    """Held-out prompts (all their samples) stay out of training and are evaluated: KL and top-1
    agreement beside the same metrics on training rows, in history.json and draft.json; a plan
    of many epochs over a tiny corpus warns."""
    tc = dataclasses.replace(TC, steps=8, eval_every=4, max_epochs=2.0)
    cc = dataclasses.replace(CC, val_fraction=0.25, samples_per_prompt=2, gen_batch=4)
    with pytest.warns(UserWarning, match="memorize"):
        train_draft_model(target, tmp_path, OPTS, tc, cc, prompts=prompts, progress=False)
    data = np.load(tmp_path / "corpus.npz")
    assert data["tokens"].shape[0] == 12 and data["val_tokens"].shape[0] == 4  # 6 + 2 prompts
    assert held_out_prompts(8, 0.25) == {2, 6} and held_out_prompts(4, 0.1) == set()
    train_rows = {tuple(r) for r in data["tokens"]}
    assert not any(tuple(r) in train_rows for r in data["val_tokens"])
    evals = json.loads((tmp_path / "history.json").read_text())["eval"]
    assert [e["step"] for e in evals] == [4, 8]
    for e in evals:
        assert e["val_kl"] >= 0 and e["train_kl"] >= 0
        assert 0 <= e["val_top1"] <= 1 and 0 <= e["train_top1"] <= 1
    meta = read_manifest(tmp_path)["metrics"]
    assert meta["val_rows"] == 4 and meta["epochs_done"] == pytest.approx(8 * 4 / 12)
    assert meta["last_eval"] == evals[-1]


def test_evaluate_matches_the_training_loss(trained, target):
    """evaluate's KL is distill_loss's (one batch), and a draft with every layer agrees 100 %."""
    out, draft, _ = trained
    tokens, mask = np.load(out / "corpus.npz")["tokens"][:4], np.load(out / "corpus.npz")["mask"][:4]
    frozen = dataclasses.replace(draft.params, layers=None, final_norm=None)
    tr = DraftWeights(draft.params.layers, draft.params.final_norm)
    data = {"tokens": tokens, "mask": mask}
    eval_fn = jax.jit(draft_objective(CFG, draft.cfg).eval_sums)
    ev = evaluate(eval_fn, tr, (target.params, frozen), data, batch_size=3)  # a padded batch
    loss = distill_loss(tr, frozen, draft.cfg, all_logits(target.params, CFG, jnp.asarray(tokens)),
                        jnp.asarray(tokens), jnp.asarray(mask))
    assert ev["kl"] == pytest.approx(float(loss), rel=1e-4)
    full = draft_from_target(target, select_layers(CFG.num_layers, CFG.num_layers))
    same = evaluate(jax.jit(draft_objective(CFG, full.cfg).eval_sums),
                    DraftWeights(full.params.layers, full.params.final_norm),
                    (target.params, frozen), data, batch_size=4)
    assert same["top1"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-5)
