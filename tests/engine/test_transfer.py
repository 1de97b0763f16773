"""The engine's one-transfer packing: every leaf comes back bit-exact inside jit, with the
tree's structure and static metadata, and unsupported dtypes are refused by name."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np
import pytest

from jdecode.decoding.sampling import SamplingArrays, SamplingParams
from jdecode.engine.transfer import pack, unpack


def test_pack_round_trips_every_leaf_bit_exact_under_jit(rng):
    sp = SamplingArrays.from_params([SamplingParams(temperature=0.7, top_k=3),
                                     SamplingParams()], 4, specialize_greedy=True)
    floats = rng.standard_normal(5).astype(np.float32)
    floats[:2] = [np.nan, -0.0]  # bit patterns a value-wise copy could lose
    tree = {"tokens": rng.integers(-5, 1 << 20, size=(3, 7)).astype(np.int32),
            "seeds": rng.integers(0, 1 << 32, size=4, dtype=np.uint64).astype(np.uint32),
            "floats": floats, "seen": rng.random((2, 9)) < 0.5, "none": None, "sp": sp}
    packed = pack(tree)
    assert sorted(packed.blobs) == ["w1", "w4"]  # two transfers for nine arrays
    got = jax.jit(partial(unpack, spec=packed.spec))(packed.blobs)
    assert jax.tree.structure(got) == jax.tree.structure(tree)
    assert got["sp"].specialized and not got["sp"].all_greedy and got["none"] is None
    for want, have in zip(jax.tree.leaves(tree), jax.tree.leaves(got), strict=True):
        have = np.asarray(have)
        assert have.dtype == want.dtype and have.shape == want.shape
        np.testing.assert_array_equal(have.view(np.uint8), np.asarray(want).view(np.uint8))


def test_pack_without_byte_leaves_is_one_buffer(rng):
    packed = pack((rng.integers(0, 9, 4).astype(np.int32), np.ones(3, np.float32)))
    assert list(packed.blobs) == ["w4"] and packed.blobs["w4"].shape == (7,)


def test_pack_refuses_8_byte_leaves_by_name():
    with pytest.raises(ValueError, match="cannot pack a int64 array"):
        pack([np.arange(3, dtype=np.int64)])
