"""Where the host's time goes when the engine launches one step: argument transfers, pytree
handling, or the launch itself. Times the jitted engine step at a full decode batch, launched
without waiting, with its per-step inputs as host buffers (as the engine passes them: packed
by `jdecode.engine.transfer`) and already on the device, and the transfer alone.

GPU (Llama-3.2-1B shape, random weights; about a minute on an H200):
  PYTHONPATH=. python3 scripts/probe_dispatch.py --model configs/models/llama-3.2-1b.yaml \
      --impl pallas --layout inference --out $OUT
Writes probe_dispatch.json under --out and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_serving import load_model

from jdecode.decoding.sampling import SamplingParams
from jdecode.engine.engine import EngineArgs, LLMEngine
from jdecode.engine.runner import resolve_layout


def per_call_ms(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e3 * (time.perf_counter() - t) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="configs/models/tiny.yaml")
    ap.add_argument("--impl", default="xla")
    ap.add_argument("--layout", default="auto")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default="out")
    args = ap.parse_args()
    model = load_model(args.model, None)
    engine = LLMEngine(model, EngineArgs(max_num_seqs=args.batch, max_model_len=512,
                                         num_pages=args.batch * 40, impl=args.impl,
                                         layout=args.layout, token_buckets=(args.batch,)))
    rng = np.random.default_rng(0)
    for i in range(args.batch):
        engine.add_request(str(i), rng.integers(0, model.cfg.vocab_size, 64).tolist(),
                           SamplingParams(max_new_tokens=400, ignore_eos=True))
    while engine.scheduler.waiting or any(r.num_tokens_with_pending - r.num_computed_tokens > 1
                                          for r in engine.scheduler.running):
        engine.step()
    engine.step()
    runner = engine.runner
    out = engine.scheduler.schedule()
    tables = {c.request.request_id: engine.block_manager.page_ids(c.request.request_id)
              for c in out.chunks}
    inputs, k = runner.step_inputs(out, tables)
    on_device = inputs._replace(blobs=jax.device_put(inputs.blobs))
    n = args.steps
    options = runner.step_options(out)  # the executable the engine would run, chosen once
    launch = lambda x: runner.launch(x, k, options=options)[0]
    jax.block_until_ready([launch(inputs), launch(on_device)])  # compiled, warm
    leaves = {"params": len(jax.tree.leaves(runner.params)),
              "cache": len(jax.tree.leaves(runner.cache)),
              "input_arrays": len(inputs.spec.leaves), "input_transfers": len(inputs.blobs)}
    res = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "model": args.model,
           "impl": args.impl, "layout": resolve_layout(args.layout), "batch": args.batch,
           "leaves": leaves,
           "synced_step_ms": per_call_ms(lambda: np.asarray(launch(inputs)), n),
           "launch_numpy_inputs_ms": per_call_ms(lambda: launch(inputs), n)}
    jax.block_until_ready(runner.cache)
    res["launch_device_inputs_ms"] = per_call_ms(lambda: launch(on_device), n)
    jax.block_until_ready(runner.cache)
    res["device_put_inputs_ms"] = per_call_ms(lambda: jax.block_until_ready(
        jax.device_put(inputs.blobs)), n)
    res["host_prep_ms"] = per_call_ms(lambda: runner.step_inputs(out, tables), n)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "probe_dispatch.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
