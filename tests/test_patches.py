"""patches/: work kept off main until a card runs it must still apply to main, or the GPU
script that applies it (scripts/gpu_*.sh) stops before measuring anything."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PATCHES = sorted((ROOT / "patches").glob("*.patch"))


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the patch tool")
@pytest.mark.parametrize("path", PATCHES, ids=[p.name for p in PATCHES])
def test_patch_applies_to_this_tree(path):
    # `patch`, not `git apply`: the GPU scripts apply them with it, in a copy without .git.
    run = subprocess.run(["patch", "-p1", "--dry-run", "-s", "-i", str(path)], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, (
        f"{path.name} no longer applies to this tree:\n{run.stdout}{run.stderr}\n"
        "Regenerate it against main (apply it on a branch, fix the conflicts, `git diff`), "
        "or delete it with a note in patches/README.md")


def test_patches_are_described():
    readme = (ROOT / "patches" / "README.md").read_text()
    for path in PATCHES:
        assert f"`{path.name}`" in readme, f"patches/README.md does not describe {path.name}"
