"""What every result records about where it came from: git commit, date, jax version, device."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_sha(short: bool = True) -> str:
    """The checkout's commit ("" outside git). `JDECODE_GIT_SHA` (or the older
    `BENCH_GIT_SHA`) overrides it: a working tree copied to another machine can carry a stale
    .git, so the sender names the commit."""
    for name in ("JDECODE_GIT_SHA", "BENCH_GIT_SHA"):
        if os.environ.get(name):
            return os.environ[name]
    cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO_ROOT,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine() -> str:
    """The host's CPU model and core count ("<model>, <n> cores"): what a host-side figure
    depends on."""
    try:
        lscpu = subprocess.run(["lscpu"], check=False, capture_output=True, text=True,
                               timeout=5).stdout
        name = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


# Environment variables that change what runs (and so its speed) without changing the code:
# the fused decode/verify switch (jdecode.model.fused_decode) and XLA's flags.
SWITCHES = ("JDECODE_FUSED_DECODE", "XLA_FLAGS")


def switches() -> str:
    """The SWITCHES set in this environment, "NAME=value" joined by spaces ("" when none)."""
    return " ".join(f"{n}={os.environ[n]}" for n in SWITCHES if os.environ.get(n))


def environment() -> dict[str, str]:
    """Date (UTC), git commit, jax version, backend and device kind, Python version, and the
    switches set (`switches`)."""
    import jax

    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_sha": git_sha(), "jax_version": jax.__version__,
            "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
            "python": platform.python_version(), "switches": switches()}


def write_record(stem: Path | str, result: dict, markdown: str) -> tuple[Path, Path]:
    """Write a benchmark's record beside its table: `<stem>.json` and `<stem>.md`.

    Why not `Path(stem).with_suffix(".json")`: that cuts a tag at its first dot (a run tagged
    `llama-3.2-1b_A` wrote `..._llama-3.json`, and one model's runs overwrote each other).
    """
    js, md = Path(f"{stem}.json"), Path(f"{stem}.md")
    js.write_text(json.dumps(result, indent=2) + "\n")
    md.write_text(markdown)
    return js, md
