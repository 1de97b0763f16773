"""Adds the propagated calibration curve to an existing exits artifact, without retraining.

`jdecode train exits` now measures every candidate threshold with the early_exit method itself:
the skipped layers' K/V are propagated, as in decoding (`training.exits.propagated_curve`), and
the calibrated threshold is taken from that curve. Artifacts trained before that change have
only the curve read off the full model's states, which promised agreement the method did not
reach (benchmarks/depth_cpu.md). This script measures the propagated curve for such an artifact
on the target's own greedy text for held-out training prompts (the corpus split the trainer
holds out), at the thresholds already in its manifest, and writes the artifact back with it.

    python scripts/recalibrate_exits.py artifacts/smollm2-135m-exits.tgz --prompts 16 \
        --out artifacts/smollm2-135m-exits.tgz
"""

from __future__ import annotations

import argparse
import json
import tarfile
import tempfile
import time
from pathlib import Path

from jdecode.data.prompts import train_prompts
from jdecode.decoding.early_exit import ARTIFACT_KIND, load_exits
from jdecode.io import artifacts
from jdecode.io.registry import load
from jdecode.training.corpus import CorpusConfig, generate_continuations, held_out_prompts, pack
from jdecode.training.exits import THRESHOLD_CRITERIA, propagated_curve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts to continue")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--criteria", default=",".join(THRESHOLD_CRITERIA))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", required=True, help="artifact directory, or a .tgz to write")
    args = ap.parse_args()

    model = load(args.model, dtype="float32")  # as its recorded runs: not auto
    heads, manifest = load_exits(args.artifact, model)
    naive = manifest["metrics"]["calibration"]
    # The prompts the trainer's corpus holds out (its val split), so the text is the target's
    # own on prompts the heads never trained on.
    prompts = train_prompts()
    val_fraction = manifest["options"].get("corpus", {}).get("val_fraction", 0.1)
    held = sorted(held_out_prompts(len(prompts), val_fraction))[:args.prompts]
    cc = CorpusConfig(new_tokens=args.new_tokens, temperature=0.0, samples_per_prompt=1,
                      gen_batch=len(held), seq_len=args.seq_len)
    t0 = time.perf_counter()
    seqs, _ = generate_continuations(model, [prompts[i] for i in held], cc)
    tokens, mask = pack(seqs, args.seq_len)
    print(f"{len(seqs)} greedy continuations in {time.perf_counter() - t0:.0f}s", flush=True)
    metrics = dict(manifest["metrics"])
    curves = dict(metrics.get("calibration_propagated", {}))
    for criterion in args.criteria.split(","):
        t0 = time.perf_counter()
        curves[criterion] = propagated_curve(
            heads, model.params, {"tokens": tokens, "mask": mask}, model.cfg, criterion,
            [p["threshold"] for p in naive[criterion]], args.batch_size)
        print(f"{criterion}: {time.perf_counter() - t0:.0f}s", flush=True)
        for p, q in zip(naive[criterion], curves[criterion]):
            print(f"  threshold {p['threshold']:9.4f}: top1 {p['top1']:.3f} -> {q['top1']:.3f}, "
                  f"layers {p['layer_share']:.3f} -> {q['layer_share']:.3f}", flush=True)
    metrics["calibration_propagated"] = curves
    metrics["calibration_propagated_data"] = (
        f"{len(seqs)} greedy continuations ({args.new_tokens} new tokens, last {args.seq_len} "
        f"tokens) of held-out training prompts, {model.cfg.dtype}, measured by "
        "scripts/recalibrate_exits.py")
    options = manifest["options"]
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        name = out.name.removesuffix(".tgz").removesuffix(".tar.gz")
        target_dir = Path(tmp) / name if out.suffix == ".tgz" else out
        artifacts.save_artifact(target_dir, ARTIFACT_KIND, model, heads, options, metrics,
                                save_dtype=options.get("save_dtype"))
        if out.suffix == ".tgz":
            with tarfile.open(out, "w:gz") as tar:
                tar.add(target_dir, arcname=name)
    print(json.dumps({c: curves[c][-1] for c in curves}, indent=1))


if __name__ == "__main__":
    main()
