"""One host-to-device transfer per engine step: a pytree of numpy arrays travels as one flat
buffer per element size and is unpacked inside the jitted step.

Each separate array argument of a jitted call is a transfer of its own: on the H200 the
engine's 18 per-step inputs took 1.36 ms to transfer, more than a third of the step
(benchmarks/raw/probe_dispatch_h200.json).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import numpy as np

# Blob key per element size: 4-byte leaves (int32, uint32, float32) share one int32 buffer and
# are bitcast back on the device; 1-byte leaves (bool masks) share one uint8 buffer.
_BLOB_OF_ITEMSIZE = {4: ("w4", np.int32), 1: ("w1", np.uint8)}


@dataclasses.dataclass(frozen=True)
class PackSpec:
    """Static layout of a packed pytree (hashable: a static argument of the jitted step).

    leaves: per leaf in flatten order, (blob key, offset, shape, dtype string).
    """

    treedef: Any  # jax PyTreeDef: the tree's structure, None leaves and static metadata
    leaves: tuple[tuple[str, int, tuple[int, ...], str], ...]


class Packed(NamedTuple):
    """Host blobs ({"w4": [n] int32, "w1": [m] uint8 if any}) and their layout."""

    blobs: dict[str, np.ndarray]
    spec: PackSpec


def pack(tree) -> Packed:
    """Flattens a pytree of numpy arrays into one buffer per element size (host side).

    Raises:
      ValueError naming the dtype when a leaf is neither 4 nor 1 bytes per element.
    """
    leaves, treedef = jax.tree.flatten(tree)
    parts: dict[str, list[np.ndarray]] = {}
    offsets: dict[str, int] = {}
    layout = []
    for x in leaves:
        x = np.asarray(x)
        if x.dtype.itemsize not in _BLOB_OF_ITEMSIZE:
            raise ValueError(f"cannot pack a {x.dtype} array: use a 4-byte (int32, uint32, "
                             "float32) or 1-byte (bool, uint8) dtype")
        key, view_dtype = _BLOB_OF_ITEMSIZE[x.dtype.itemsize]
        flat = np.ascontiguousarray(x).reshape(-1).view(view_dtype)
        layout.append((key, offsets.get(key, 0), x.shape, x.dtype.str))
        parts.setdefault(key, []).append(flat)
        offsets[key] = offsets.get(key, 0) + flat.size
    blobs = {key: np.concatenate(p) for key, p in parts.items()}
    return Packed(blobs, PackSpec(treedef, tuple(layout)))


def unpack(blobs: dict[str, jax.Array], spec: PackSpec):
    """The pytree `pack` was given, rebuilt from its blobs (inside jit: slices and bitcasts)."""
    leaves = []
    for key, offset, shape, dtype in spec.leaves:
        flat = blobs[key][offset:offset + math.prod(shape)]
        dtype = np.dtype(dtype)
        if dtype == np.bool_:
            flat = flat != 0
        elif dtype != flat.dtype:
            flat = jax.lax.bitcast_convert_type(flat, dtype)
        leaves.append(flat.reshape(shape))
    return jax.tree.unflatten(spec.treedef, leaves)
