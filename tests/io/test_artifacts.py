"""The trained-artifact format: save -> load gives the same arrays (any pytree, any saved
dtype, as a directory or a .tgz); a part of another kind or trained for another target is a
clear error, while the same weights in another dtype are accepted."""

from __future__ import annotations

import dataclasses
import json
import tarfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import seed_of, tiny_model

from jdecode.io import artifacts
from jdecode.io.artifacts import ArtifactError
from jdecode.model.params import cast_params


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed_of("artifacts-target"))


def part_like(model, rng):
    """A made-up trained part: a dict of arrays shaped after the model."""
    e, v = model.cfg.hidden_size, model.cfg.vocab_size
    return {"heads": jnp.asarray(rng.normal(size=(3, e, e)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(3, v)), jnp.float32),
            "count": jnp.asarray(rng.integers(0, 9, (4,)), jnp.int32)}


def abstract_of(part):
    return lambda manifest: jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), part)


def test_round_trip_and_manifest(target, rng, tmp_path):
    part = part_like(target, rng)
    artifacts.save_artifact(tmp_path / "a", "medusa", target, part, {"num_heads": 3},
                            {"top1": [0.5, 0.3, 0.2]})
    restored, manifest = artifacts.load_artifact(tmp_path / "a", "medusa", target,
                                                 abstract_of(part))
    chex.assert_trees_all_equal(restored, part)
    assert manifest["kind"] == "medusa" and manifest["options"] == {"num_heads": 3}
    assert manifest["metrics"] == {"top1": [0.5, 0.3, 0.2]}
    assert manifest["target"]["name"] == "tiny"
    assert len(manifest["target"]["fingerprint"]) == 16
    assert {"jdecode_version", "jax_version", "created"} <= manifest.keys()


def test_bf16_save_loads_back_in_the_target_dtype(target, rng, tmp_path):
    part = part_like(target, rng)
    artifacts.save_artifact(tmp_path, "exits", target, part, {}, save_dtype="bfloat16")
    restored, manifest = artifacts.load_artifact(tmp_path, "exits", target, abstract_of(part))
    assert manifest["saved_dtypes"] == ["bfloat16", "int32"]
    chex.assert_trees_all_equal_dtypes(restored, part)
    chex.assert_trees_all_close(restored, part, rtol=1e-2, atol=1e-2)  # bf16 rounding
    np.testing.assert_array_equal(restored["count"], part["count"])  # ints are not cast


def test_another_kind_or_target_is_refused(target, rng, tmp_path):
    part = part_like(target, rng)
    artifacts.save_artifact(tmp_path, "medusa", target, part, {})
    with pytest.raises(ArtifactError, match="holds a trained 'medusa', not a 'router': pass a "
                                            r"router artifact \(`jdecode train router`\)"):
        artifacts.load_artifact(tmp_path, "router", target, abstract_of(part))
    other = dataclasses.replace(tiny_model(seed_of("another target")), name="other-tiny")
    with pytest.raises(ArtifactError) as e:
        artifacts.load_artifact(tmp_path, "medusa", other, abstract_of(part))
    msg = str(e.value)
    assert "was trained for target 'tiny'" in msg and "but the model is 'other-tiny'" in msg
    assert "jdecode train medusa --model other-tiny" in msg


def test_same_weights_in_another_dtype_are_the_same_target(target, rng, tmp_path):
    part = part_like(target, rng)
    artifacts.save_artifact(tmp_path, "medusa", target, part, {})
    for dtype in ("bfloat16", "float16"):
        cast = dataclasses.replace(target, params=cast_params(target.params, dtype))
        assert artifacts.same_target(artifacts.read_manifest(tmp_path)["target"], cast)
    # One changed weight in the probe is another model.
    params = target.params
    nudged = dataclasses.replace(params, final_norm=params.final_norm.at[0].add(0.5))
    assert not artifacts.same_target(artifacts.read_manifest(tmp_path)["target"],
                                     dataclasses.replace(target, params=nudged))


def test_tgz_archives_and_damaged_manifests(target, rng, tmp_path, monkeypatch):
    monkeypatch.setenv("JDECODE_CACHE", str(tmp_path / "cache"))
    part = part_like(target, rng)
    artifacts.save_artifact(tmp_path / "part", "draft", target, part, {"layers": [0]})
    archive = tmp_path / "part.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "part", arcname="part")
    restored, _ = artifacts.load_artifact(archive, "draft", target, abstract_of(part))
    chex.assert_trees_all_equal(restored, part)
    assert artifacts.is_artifact(archive) and not artifacts.is_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="is not a trained artifact"):
        artifacts.read_manifest(tmp_path)
    manifest = tmp_path / "part" / artifacts.MANIFEST
    manifest.write_text("{not json")
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        artifacts.read_manifest(tmp_path / "part")
    manifest.write_text(json.dumps({"format": 99}))
    with pytest.raises(ArtifactError, match="has format 99; this jdecode reads format 1"):
        artifacts.read_manifest(tmp_path / "part")
