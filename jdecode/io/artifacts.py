"""One on-disk format for every trained part (distilled drafts, Medusa/EAGLE heads, exit heads,
routers, deferral classifiers): an orbax checkpoint of the part's pytree plus a JSON manifest
naming its kind, the target model it belongs to (with a fingerprint of the target's weights),
its options, its training metrics and the jdecode version.

    <dir>/manifest.json   {"format", "kind", "target", "options", "metrics", ...}
    <dir>/params/         orbax StandardCheckpointer tree

An artifact can also be given as a .tgz of such a directory (how small parts for the default
model are committed, under artifacts/): it is unpacked once into the jdecode cache.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jdecode import __version__
from jdecode.io.checkpoint import cache_root
from jdecode.io.registry import Model

ARTIFACT_FORMAT = 1
MANIFEST = "manifest.json"
PARAMS_DIR = "params"
# Weights sampled per parameter array for the fingerprint: enough to tell models apart, small
# enough to keep in the manifest for a tolerant comparison (see `same_target`).
PROBE_SIZE = 16


class ArtifactError(ValueError):
    """A trained part is missing, of another kind, or belongs to another target model."""


def weight_probe(params: Any) -> dict[str, list[float]]:
    """PROBE_SIZE evenly strided weights of every array of a Params pytree, as floats.

    The probe identifies the weights, not their dtype: the same checkpoint loaded in f32 or
    bf16 gives probes equal to bf16 precision.
    """
    probe = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat = np.asarray(leaf, np.float32).reshape(-1)
        idx = np.linspace(0, flat.size - 1, min(PROBE_SIZE, flat.size)).astype(np.int64)
        probe[jax.tree_util.keystr(path)] = [float(x) for x in flat[idx]]
    return probe


def fingerprint(probe: dict[str, list[float]]) -> str:
    """A short hash of a weight probe, rounded to bf16 so a dtype change keeps it."""
    h = hashlib.sha256()
    for name in sorted(probe):
        values = np.asarray(probe[name], np.float32)
        # bf16 keeps the top 16 bits of an f32: round to nearest even, then drop the rest.
        bits = values.view(np.uint32)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        h.update(name.encode())
        h.update(rounded.astype(np.uint16).tobytes())
    return h.hexdigest()[:16]


def target_identity(model: Model) -> dict[str, Any]:
    """What a manifest records of the target model: name, shape, fingerprint and probe."""
    probe = weight_probe(model.params)
    cfg = model.cfg
    return {"name": model.name, "fingerprint": fingerprint(probe),
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
            "num_layers": cfg.num_layers, "probe": probe}


def same_target(recorded: dict[str, Any], model: Model) -> bool:
    """True when `model` has the recorded target's weights (in any float dtype)."""
    here = target_identity(model)
    if recorded["fingerprint"] == here["fingerprint"]:
        return True
    # A fingerprint can differ for the same weights when an f16 load rounds a probe value
    # differently from bf16; compare the probe values themselves at bf16 precision.
    a, b = recorded.get("probe", {}), here["probe"]
    return a.keys() == b.keys() and all(
        np.allclose(a[k], b[k], rtol=1e-2, atol=1e-3) for k in a)


def save_artifact(path: str | Path, kind: str, target: Model, params: Any,
                  options: dict[str, Any], metrics: dict[str, Any] | None = None,
                  save_dtype: str | None = None) -> Path:
    """Writes a trained part: `params` (any pytree of arrays) and its manifest.

    Args:
      path: the artifact directory (created; an earlier artifact there is replaced).
      kind: "draft", "medusa", "eagle", "exits", "router", "deferral", ...
      target: the model the part was trained for. options: what rebuilding the part needs
        (JSON-serializable). metrics: training figures. save_dtype: cast float arrays to it
        (e.g. "bfloat16" halves the file); loading casts back to the target's dtype.
    Returns:
      the resolved artifact directory.
    """
    import orbax.checkpoint as ocp

    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    if save_dtype is not None:
        params = jax.tree_util.tree_map(
            lambda a: a.astype(save_dtype) if np.issubdtype(a.dtype, np.floating) else a,
            params)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path / PARAMS_DIR, params, force=True)
    dtypes = sorted({str(a.dtype) for a in jax.tree_util.tree_leaves(params)})
    manifest = {"format": ARTIFACT_FORMAT, "kind": kind, "target": target_identity(target),
                "options": options, "metrics": metrics or {}, "saved_dtypes": dtypes,
                "jdecode_version": __version__, "jax_version": jax.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds")}
    (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


def artifact_dir(path: str | Path) -> Path:
    """The directory holding the manifest: `path` itself, or for a .tgz/.tar.gz archive the
    directory it unpacks to (once, under $JDECODE_CACHE/artifacts/<hash of the archive>)."""
    path = Path(path)
    if not (path.is_file() and path.name.endswith((".tgz", ".tar.gz"))):
        return path
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    dest = cache_root() / "artifacts" / digest
    if not any(dest.glob(f"**/{MANIFEST}")):
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(path) as tar:
            tar.extractall(dest, filter="data")  # "data": no absolute paths or links out
    found = sorted(dest.glob(f"**/{MANIFEST}"))
    return found[0].parent if found else dest


def is_artifact(path: str | Path) -> bool:
    return (artifact_dir(path) / MANIFEST).is_file()


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of an artifact directory; a missing or unreadable one is an ArtifactError."""
    file = artifact_dir(path) / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{str(path)!r} is not a trained artifact (no {MANIFEST}): pass a "
                            "directory written by `jdecode train ...`")
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{file} is not valid JSON ({e}): the artifact is damaged; "
                            "train it again") from None
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{file} has format {manifest.get('format')!r}; this jdecode reads "
                            f"format {ARTIFACT_FORMAT}: train it again")
    return manifest


def check_manifest(manifest: dict[str, Any], path: str | Path, kind: str, target: Model
                   ) -> None:
    """Raises ArtifactError unless the artifact is of `kind` and was trained for `target`."""
    if manifest["kind"] != kind:
        raise ArtifactError(f"{str(path)!r} holds a trained {manifest['kind']!r}, not a "
                            f"{kind!r}: pass a {kind} artifact (`jdecode train {kind}`)")
    rec = manifest["target"]
    if not same_target(rec, target):
        raise ArtifactError(
            f"{str(path)!r} was trained for target {rec['name']!r} (fingerprint "
            f"{rec['fingerprint']}, hidden {rec['hidden_size']}, {rec['num_layers']} layers), "
            f"but the model is {target.name!r} (fingerprint "
            f"{target_identity(target)['fingerprint']}, hidden {target.cfg.hidden_size}, "
            f"{target.cfg.num_layers} layers): train one for this model with "
            f"`jdecode train {kind} --model {target.name}`")


def load_artifact(path: str | Path, kind: str, target: Model,
                  abstract: Callable[[dict[str, Any]], Any]) -> tuple[Any, dict[str, Any]]:
    """Restores a trained part for `target` after checking its manifest.

    Args:
      path: the artifact directory. kind: the expected kind. target: the loaded target model.
      abstract: manifest -> a pytree of arrays (or ShapeDtypeStructs) with the part's
        structure, shapes and the dtypes to return (usually the target's).
    Returns:
      (params, manifest): params restored and cast to `abstract`'s dtypes.
    """
    import orbax.checkpoint as ocp

    manifest = read_manifest(path)
    check_manifest(manifest, path, kind, target)
    like = abstract(manifest)
    saved = manifest["saved_dtypes"]
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    # Restore in the saved dtype (a bf16 file into f32 structs would be refused), then cast.
    restore_as = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, saved[0] if len(saved) == 1 else a.dtype,
                                       sharding=sharding), like)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore((artifact_dir(path) / PARAMS_DIR).resolve(), restore_as)
        except (ValueError, FileNotFoundError) as e:
            raise ArtifactError(f"{str(path)!r}: its checkpoint does not match the {kind} it "
                                f"describes ({str(e).splitlines()[0]}): train it again") from None
    params = jax.tree_util.tree_map(lambda r, a: r.astype(a.dtype), params, like)
    return params, manifest
