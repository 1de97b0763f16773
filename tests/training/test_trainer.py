"""The shared training loop on a toy objective (linear regression): the loss falls, held-out
evaluation runs beside training rows, checkpoints resume, and a time budget stops early."""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest

from jdecode.training.trainer import Objective, TrainConfig, fit, lr_schedule


def regression():
    def loss(params, frozen, batch):
        err = batch["x"] @ params["w"] + frozen["b"] - batch["y"]
        return jnp.mean(err ** 2), {}

    def eval_sums(params, frozen, batch):
        err = batch["x"] @ params["w"] + frozen["b"] - batch["y"]
        return {"mse": jnp.sum(err ** 2), "count": jnp.float32(batch["x"].shape[0])}

    return Objective(loss, eval_sums)


@pytest.fixture
def data(rng):
    w = rng.normal(size=4).astype(np.float32)
    x = rng.normal(size=(96, 4)).astype(np.float32)
    y = (x @ w + 0.5).astype(np.float32)
    return {"x": x[:80], "y": y[:80]}, {"x": x[80:], "y": y[80:]}


TC = TrainConfig(steps=60, batch_size=8, learning_rate=0.1, warmup_steps=3, eval_every=20,
                 checkpoint_every=30)


def test_loss_falls_and_history_is_written(data, tmp_path):
    train, val = data
    res = fit(regression(), {"w": jnp.zeros(4)}, {"b": jnp.float32(0.5)}, train, val, tmp_path,
              TC, progress=False)
    assert len(res.losses) == 60 and res.steps_done == 60
    assert np.mean(res.losses[-5:]) < 0.05 * np.mean(res.losses[:5])
    evals = res.history["eval"]
    assert [e["step"] for e in evals] == [20, 40, 60]
    assert evals[-1]["val_mse"] < 0.05 * evals[0]["val_mse"] and "train_mse" in evals[0]
    assert json.loads((tmp_path / "history.json").read_text()) == res.history
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert res.epochs_done == pytest.approx(60 * 8 / 80)


def test_resume_runs_only_the_remaining_steps(data, tmp_path):
    train, val = data
    half = dataclasses.replace(TC, steps=30)
    first = fit(regression(), {"w": jnp.zeros(4)}, {"b": jnp.float32(0.5)}, train, val,
                tmp_path, half, progress=False)
    res = fit(regression(), {"w": jnp.zeros(4)}, {"b": jnp.float32(0.5)}, train, val, tmp_path,
              TC, progress=False)
    assert len(res.losses) == 30 and res.steps_done == 60
    assert len(res.history["loss"]) == 60  # this run's losses follow the first run's
    assert res.history["loss"][:30] == first.losses
    assert res.losses[0] < first.losses[0]  # it started from the trained weights


def test_zero_time_budget_stops_after_one_step(data, tmp_path):
    train, val = data
    res = fit(regression(), {"w": jnp.zeros(4)}, {"b": jnp.float32(0.5)}, train, val, tmp_path,
              dataclasses.replace(TC, time_budget_s=0.0), progress=False)
    assert len(res.losses) == 1 and res.history["eval"][-1]["step"] == 1


def test_schedule_warms_up_then_decays_to_the_floor():
    sched = lr_schedule(TC, 60)
    assert float(sched(0)) == 0.0 and float(sched(3)) == pytest.approx(0.1)
    assert float(sched(60)) == pytest.approx(0.1 * TC.end_lr_ratio)
    with pytest.raises(ValueError, match="learning_rate=0 must be > 0"):
        TrainConfig(learning_rate=0)


@pytest.mark.parametrize("budget", [None, 0.0])
def test_progress_bar_ends_full(data, tmp_path, capsys, budget):
    """The bar reads 100% when training ends, at its last step or cut short by the time
    budget (a bar stopped with `break` used to be closed one step short)."""
    train, val = data
    fit(regression(), {"w": jnp.zeros(4)}, {"b": jnp.float32(0.5)}, train, val, tmp_path,
        dataclasses.replace(TC, steps=12, time_budget_s=budget), progress=True)
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in last, last
