"""Speculative decoding against plain greedy decoding on the real default model: acceptance,
mean accepted length and wall-clock speedup for the n-gram and distilled drafts (and a distilled
draft that gives way to prompt lookup where a 2+-gram matches), per k and batch size, beside the
cost model's prediction and the k it would choose (jdecode.analysis.spec_cost).

CPU (what fits in a few minutes per configuration):
  python scripts/bench_speculative.py --draft-dir artifacts/smollm2-135m-d2.tgz --batch 1 \
      --k 2,3,4,5 --out benchmarks/
GPU (several drafts, comma-separated; "distilled" expands to each of them):
  python scripts/bench_speculative.py --draft-dir D2,D4 --drafts ngram,distilled,distilled+ngram \
      --batch 1,4,16,64 --out $OUT
Writes speculative_<tag>.json, speculative_<tag>.md and speculative_<tag>.png (speedup against
batch size, measured and predicted) under --out after every batch size, so a run cut short keeps
what it finished. Timings are decode-phase wall time with compilation excluded; prompts are
grouped by kind and run in chunks of the batch size (every method on a chunk before the next
chunk), greedy (the decoders are specialized for it: no per-step cond or key split), stopping at
EOS. Every prompt is padded to one length bucket, so each method compiles once per batch size.

Before the full run, a calibration probe per batch size (one warm-up chunk, then max(6, batch)
prompts) times a full speculative round of every draft and k and the autoregressive step, and
`spec_cost.choose_k_calibrated` picks k from those (`chosen_k_calibrated`), with alpha from the
probe alone: the choice is made before the full measurement it is judged against.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.analysis.measure import time_fn
from jdecode.analysis.spec_cost import (
    calibrated_speedup,
    choose_k,
    choose_k_calibrated,
    expected_speedup,
)
from jdecode.data.prompts import eval_prompts
from jdecode.decoding import generate as generate_mod
from jdecode.decoding import phases
from jdecode.decoding.draft_model import load_draft
from jdecode.decoding.generate import Generator, next_pow2
from jdecode.decoding.sampling import SamplingParams
from jdecode.decoding.speculative import acceptance_stats
from jdecode.io.artifacts import read_manifest
from jdecode.io.registry import load
from jdecode.provenance import git_sha


def run_interleaved(gens: dict[str, Generator], prompts: list[tuple[str, list[int]]],
                    batch: int, sp: SamplingParams) -> dict[str, dict]:
    """Generates every prompt with every Generator in chunks of `batch`, the Generators taking
    turns chunk by chunk, so background load on a shared machine falls on all of them alike.
    At batch 1 the prompts run by kind (L per kind); larger batches mix kinds and repeat
    prompts cyclically to fill the last chunk, so every chunk is a full batch of that size
    (one compiled shape, and the batch size the row claims). Returns per name the summed
    timings and the token ids ("steps": live row-steps; "rounds": loop iterations of the batch)."""
    res = {name: {"tokens": [], "by_kind": {}, "summary": {
        "decode_s": 0.0, "prefill_s": 0.0, "new_tokens": 0, "accepted": 0.0, "steps": 0.0,
        "rounds": 0}} for name in gens}
    if batch == 1:
        groups = [(kind, [p for k, p in prompts if k == kind])
                  for kind in sorted({k for k, _ in prompts})]
    else:
        ids = [p for _, p in prompts]
        groups = [("mixed", ids + (ids * batch)[:-len(ids) % batch])]
    for kind, ids in groups:
        for start in range(0, len(ids), batch):
            chunk = ids[start:start + batch]
            for name, gen in gens.items():
                results = gen.generate(chunk, sp)
                st = results[0].stats  # batch-level figures, equal on every row
                accepted = st["batch_tokens"] - len(chunk)  # each row's first token: prefill
                steps = accepted / st["mean_accepted"] if st["mean_accepted"] else 0.0
                tot, agg = res[name]["summary"], res[name]["by_kind"].setdefault(kind, [0.0, 0.0])
                tot["decode_s"] += st["decode_s"]
                tot["prefill_s"] += st["prefill_ms"] / 1e3
                tot["new_tokens"] += st["batch_tokens"]
                tot["accepted"] += accepted
                tot["steps"] += steps
                tot["rounds"] += st["decode_steps"]
                agg[0] += accepted
                agg[1] += steps
                res[name]["tokens"] += [r.token_ids for r in results]
        print(f"  [b={batch}] {kind} done", flush=True)
    for r in res.values():
        tot = r["summary"]
        tot["tok_s"] = tot["new_tokens"] / max(tot["decode_s"], 1e-9)
        tot["mean_accepted"] = tot["accepted"] / max(tot["steps"], 1e-9)
        tot["mean_accepted_by_kind"] = {k: a / max(n, 1e-9) for k, (a, n) in r["by_kind"].items()}
    return res


def probe_prompts(prompts: list[tuple[str, list[int]]], batch: int, least: int = 6
                  ) -> list[tuple[str, list[int]]]:
    """max(least, batch) prompts spread evenly over the list (grouped by kind, so every kind is
    in; acceptance differs by kind), cycling when the batch is larger than the list."""
    n = max(least, batch)
    return [prompts[int((i + 0.5) * len(prompts) / n) % len(prompts)] for i in range(n)]


def calibrate(gens: dict[tuple[str, int], Generator], prompts: list[tuple[str, list[int]]],
              batch: int, sp: SamplingParams, workers: int = 1, least: int = 6) -> dict:
    """The calibration probe: seconds of one full round of each method, as its compiled loop
    runs it (draft, verify, acceptance, cache writes; decode time / loop iterations), and the
    mean accepted length L, on `probe_prompts`.

    A warm-up generation of one chunk per method comes first. It compiles the executables the
    full run then reuses (same shapes), in `workers` threads: XLA compiles outside the GIL, and
    compilation is most of a GPU bench's time. Timing starts after it, one method at a time.
    """
    probe = probe_prompts(prompts, batch, least)
    first = [p for _, p in probe[:batch]]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, workers)) as pool:
        list(pool.map(lambda g: g.generate(first, sp), gens.values()))
    t_warm = time.perf_counter()
    res = run_interleaved(gens, probe, batch, sp)
    out = {"probe_prompts": len(probe), "warmup_s": t_warm - t0,
           "probe_s": time.perf_counter() - t_warm, "round_s": {}, "mean_accepted": {}}
    for (name, k), r in res.items():
        s = r["summary"]
        out["round_s"].setdefault(name, {})[k] = s["decode_s"] / max(s["rounds"], 1)
        out["mean_accepted"].setdefault(name, {})[k] = s["mean_accepted"]
    out["ar_step_s"] = out["round_s"].pop("none")[0]
    out["mean_accepted"].pop("none")
    return out


def calibrated_choice(cal: dict, name: str, batch: int, num_tokens: int) -> dict:
    """`choose_k_calibrated` for one draft from the probe: round times, the AR step, and alpha
    per k fitted to the probe's L (the same for every row: per-row rates from a few rounds
    would be noise). Returns the chosen k, its predicted speedup and the prediction per k."""
    alphas = {k: [acceptance_stats(L, k)["alpha"]] * batch
              for k, L in cal["mean_accepted"][name].items()}
    rounds = cal["round_s"][name]
    k, pred = choose_k_calibrated(rounds, cal["ar_step_s"], alphas, num_tokens)
    return {"k": k, "predicted": pred, "by_k": {
        kk: calibrated_speedup(rounds[kk], cal["ar_step_s"], alphas[kk], kk, num_tokens)
        for kk in rounds}}


def step_costs(cfg, params, impl: str, batch: int, context: int, ts: list[int],
               inner: int = 16) -> dict[int, float]:
    """Seconds of one target pass scoring t tokens per row at this context, for t in ts
    (t = 1: the decode step, which takes the fused kernels where the Generator's does; t > 1:
    a verify pass). Each figure is `inner` passes in one dispatch (a fori_loop threading the
    cache), divided by `inner`: on the GPU a single call of a 135M model's pass costs its
    dispatch (1.91 ms on an H100 against 0.71 ms per step in a loop, stop 49), which made
    the isolated cost model's c and verify_cost ratios of dispatch times. Each pass runs over
    the cache its method builds: t = 1 over the plain method's (`phases.decode_cache`,
    stacked where the fused step runs), t > 1 over the params' layout, as the speculative
    methods' verify passes do (`phases.layout_cache`)."""
    max_len = -(-(context + max(ts) + 1) // 256) * 256
    out = {}
    for t in sorted(set(ts)):
        tokens = jax.random.randint(jax.random.key(t), (batch, t), 0, cfg.vocab_size)
        pos = context + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))

        def one(p, cache, tokens, pos):
            if tokens.shape[1] == 1:
                return phases.decode_step(p, cache, tokens[:, 0], pos[:, 0], cfg=cfg,
                                          impl=impl)[2]
            return phases.verify(p, cache, tokens, pos, cfg=cfg, impl=impl)[2]

        cache = (phases.decode_cache(params, cfg, batch, max_len, impl) if t == 1
                 else phases.layout_cache(params, cfg, batch, max_len))
        # The params, tokens and positions are arguments (closed over, they would be
        # constants compiled into the executable); the XLA options are the Generator's loop's
        # at this batch (cuBLAS from 64 rows).
        def inner_passes(p, cache, tokens, pos):
            return jax.lax.fori_loop(0, inner, lambda _, c: one(p, c, tokens, pos), cache)

        passes = generate_mod.compile_loop(jax.jit(inner_passes, donate_argnums=1), batch,
                                           params, cache, tokens, pos)
        state = {"cache": cache}

        def run(passes=passes, tokens=tokens, pos=pos):
            state["cache"] = passes(params, state["cache"], tokens, pos)
            return state["cache"]
        out[t] = time_fn(run, repeats=5) / inner
    return out


def verify_cost(step_s: dict[int, float], k: int) -> float:
    """Target pass over k+1 tokens / one decode step, interpolated linearly between the
    measured t (step_s[t] = seconds of a t-token pass; t = 1 is the decode step)."""
    ts = sorted(step_s)
    return float(np.interp(k + 1, ts, [step_s[t] for t in ts])) / step_s[1]


def draft_names(drafts: list[str], draft_dirs: list[str], target) -> dict[str, tuple]:
    """Bench name -> (loaded draft or "ngram", with_ngram, the speculative method's `draft`
    option): "distilled" and "distilled+ngram" expand to one entry per draft artifact, named
    by its layer count."""
    loaded = {d: load_draft(d, target) for d in draft_dirs}
    out = {}
    for name in drafts:
        if name == "ngram":
            out[name] = ("ngram", False, "ngram")
        elif name in ("distilled", "distilled+ngram"):
            for d, model in loaded.items():
                label = f"distilled-{model.cfg.num_layers}L"
                if label in {n.split("+")[0] for n in out} and name == "distilled":
                    label += f"-{Path(d).name}"  # two drafts of one depth
                out[label + ("+ngram" if name.endswith("+ngram") else "")] = (
                    model, name.endswith("+ngram"), d)
        else:
            raise SystemExit(f"--drafts {name!r}: choose from ngram, distilled, distilled+ngram")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draft-dir", default="", help="distilled draft(s) (`jdecode train "
                    "draft`), comma-separated")
    ap.add_argument("--drafts", default="ngram,distilled",
                    help="ngram, distilled, distilled+ngram; NAME:K1/K2 overrides --k for one")
    ap.add_argument("--k", default="2,3,4,5")
    ap.add_argument("--batch", default="1")
    ap.add_argument("--num-prompts", type=int, default=52)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--impl", default="auto")
    ap.add_argument("--probe-prompts", type=int, default=6,
                    help="calibration probe: at least this many prompts (else one full batch)")
    ap.add_argument("--compile-workers", type=int, default=1,
                    help="threads compiling the methods of one batch size in the warm-up")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds: start no further batch size once the last one would not fit")
    ap.add_argument("--tag", default=None, help="file suffix (default: cpu or gpu)")
    ap.add_argument("--out", default="benchmarks")
    ap.add_argument("--note", default=None, help="a remark recorded with the results (e.g. "
                    "which code ran when the git field is stale)")
    ap.add_argument("--merge", default=None, help="comma-separated speculative_*.json of runs "
                    "on other batch sizes: write one table and plot from them, then exit")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.merge:
        merge(args.merge.split(","), Path(args.out), args.tag or "gpu", args.note)
        return

    ks = [int(k) for k in args.k.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    drafts = [d.split(":")[0] for d in args.drafts.split(",") if d]
    draft_ks = {d.split(":")[0]: [int(k) for k in d.split(":")[1].split("/")]
                for d in args.drafts.split(",") if ":" in d}
    draft_dirs = [d for d in args.draft_dir.split(",") if d]
    if any(d.startswith("distilled") for d in drafts) and not draft_dirs:
        raise SystemExit("--drafts includes a distilled draft but no --draft-dir was given: "
                         "train one with `jdecode train draft --out DIR` or pass --drafts ngram")
    backend = jax.default_backend()
    tag = args.tag or backend
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    target = load(args.model, dtype="float32")  # as its recorded runs: not auto
    tok = target.tokenizer
    prompts = [(kind, tok.encode(tok.apply_chat_template([{"role": "user", "content": text}])))
               for kind, text in eval_prompts()[:args.num_prompts]]
    # One prompt bucket for every chunk: one compile per method and batch size, not one per
    # length bucket (the bigger prefill is not timed; decode reads a few more masked slots).
    generate_mod.MIN_PROMPT_BUCKET = next_pow2(max(len(p) for _, p in prompts))
    sp = SamplingParams(max_new_tokens=args.max_new_tokens)
    draft_models = draft_names(drafts, draft_dirs, target)
    # Bench name -> its ks (a distilled entry's override applies to each of its drafts).
    ks_of = {name: draft_ks.get(name if name == "ngram" else "distilled" + (
        "+ngram" if name.endswith("+ngram") else ""), ks) for name in draft_models}
    ks = sorted({k for v in ks_of.values() for k in v})

    ar_gen = Generator(target, impl=args.impl)
    impl = ar_gen.impl
    rows, cost_model, meta = [], {}, {}
    for d in draft_dirs:
        info = read_manifest(d)
        meta[d] = {"layers": info["options"]["layers"], "saved_dtypes": info["saved_dtypes"],
                   **{key: info["metrics"].get(key) for key in (
                       "steps_done", "last_kl_mean20", "train_seconds")}}
    context = sum(len(p) for _, p in prompts) // len(prompts) + args.max_new_tokens // 2
    record = {
        "benchmark": "speculative", "model": args.model, "draft_dirs": meta,
        "num_prompts": len(prompts), "kinds": sorted({k for k, _ in prompts}),
        "max_new_tokens": args.max_new_tokens, "ks": ks, "batches": batches, "impl": impl,
        "jax_version": jax.__version__, "device": jax.devices()[0].device_kind,
        "backend": backend, "git_sha": git_sha(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv]), "cost_model": cost_model, "rows": rows,
        "skipped_batches": [], **({"note": args.note} if args.note else {}),
    }
    last_batch_s = 0.0
    for batch in batches:
        elapsed = time.perf_counter() - t_start
        if args.time_budget is not None and elapsed + last_batch_s > args.time_budget:
            print(f"[b={batch}] skipped: {elapsed:.0f} s used, the last batch size took "
                  f"{last_batch_s:.0f} s, budget {args.time_budget:.0f} s", flush=True)
            record["skipped_batches"].append(batch)
            write_results(record, out_dir, tag)
            continue
        t_batch = time.perf_counter()
        # Cost model inputs measured on this device: verify cost of k+1 tokens and c. Only the
        # smallest and largest k + 1 are timed, the rest interpolated: each length is a GPU
        # compile of tens of seconds, and the cost is close to linear in k over 2..5.
        t_target = step_costs(target.cfg, ar_gen.params, impl, batch, context,
                              [1, min(ks) + 1, max(ks) + 1])
        costs = {"verify_cost": {k: verify_cost(t_target, k) for k in ks},
                 "target_step_s": t_target[1], "c": {}, "chosen_k": {},
                 "predicted_at_chosen_k": {}, "chosen_k_calibrated": {},
                 "predicted_calibrated": {}}
        for name, (draft, _, _) in draft_models.items():
            if draft == "ngram":
                costs["c"][name] = 0.0
            elif name.endswith("+ngram"):  # the same model (lookup's cost is not counted)
                costs["c"][name] = costs["c"].get(name.removesuffix("+ngram"))
            if costs["c"].get(name) is None:
                d_params = Generator(draft, impl=args.impl).params  # the target's layout
                costs["c"][name] = step_costs(draft.cfg, d_params, impl, batch, context,
                                              [1])[1] / t_target[1]
        cost_model[batch] = costs
        gens = {("none", 0): ar_gen}
        for name, (_, with_ngram, draft_opt) in draft_models.items():
            for k in ks_of[name]:  # resolved through the method registry, as users do
                # k at every batch size ({}), not the method's default plan: this measures it.
                gens[(name, k)] = Generator(target, impl=impl, method="speculative", options={
                    "draft": draft_opt, "k": k, "with_ngram": with_ngram, "k_by_batch": {}})
        # The first token of each row comes from prefill: the loop decodes the rest.
        num_tokens = args.max_new_tokens - 1
        cal = calibrate(gens, prompts, batch, sp, args.compile_workers, args.probe_prompts)
        costs["calibration"] = cal
        cal_by_k = {}
        for name in draft_models:
            choice = calibrated_choice(cal, name, batch, num_tokens)
            costs["chosen_k_calibrated"][name] = choice["k"]
            costs["predicted_calibrated"][name] = choice["predicted"]
            cal_by_k[name] = choice["by_k"]
        print(f"[b={batch}] probe ({cal['probe_prompts']} prompts, warm-up "
              f"{cal['warmup_s']:.0f} s, timed {cal['probe_s']:.1f} s): calibrated k "
              f"{costs['chosen_k_calibrated']}", flush=True)
        res = run_interleaved(gens, prompts, batch, sp)
        base = res[("none", 0)]
        print(f"[b={batch}] autoregressive: {base['summary']['tok_s']:.1f} tok/s "
              f"({time.perf_counter() - t_batch:.0f} s for all methods)", flush=True)
        rows.append({"batch": batch, "draft": "none", "k": 0, **base["summary"],
                     "speedup": 1.0, "exact_prompts": len(prompts)})
        for (name, k), r in res.items():
            if name == "none":
                continue
            s = r["summary"]
            acc = acceptance_stats(s["mean_accepted"], k)
            c, vc = costs["c"][name], costs["verify_cost"][k]
            row = {"batch": batch, "draft": name, "k": k, **s, **acc,
                   "speedup": base["summary"]["decode_s"] / s["decode_s"],
                   "predicted_speedup": expected_speedup(acc["alpha"], k, c, vc),
                   "predicted_calibrated": cal_by_k[name][k],
                   # The first len(prompts) lists are the prompts; the rest repeat them.
                   "exact_prompts": sum(a == b for a, b in zip(r["tokens"][:len(prompts)],
                                                               base["tokens"]))}
            rows.append(row)
            print(f"[b={batch}] {name} k={k}: L={s['mean_accepted']:.2f} "
                  f"alpha={acc['alpha']:.2f} speedup={row['speedup']:.2f}x "
                  f"(predicted {row['predicted_speedup']:.2f}x, calibrated "
                  f"{row['predicted_calibrated']:.2f}x) exact "
                  f"{row['exact_prompts']}/{len(prompts)}", flush=True)
        # The k the cost model picks at this batch size from the alpha measured at the largest
        # k (0 = speculation off), and the speedup it predicts there.
        vfn = partial(verify_cost, t_target)
        for name in draft_models:
            last = next(r for r in reversed(rows) if r["draft"] == name and r["batch"] == batch)
            kc = choose_k(last["alpha"], costs["c"][name], max(ks_of[name]), vfn)
            costs["chosen_k"][name] = kc
            costs["predicted_at_chosen_k"][name] = (
                expected_speedup(last["alpha"], kc, costs["c"][name], vfn) if kc else 1.0)
        last_batch_s = time.perf_counter() - t_batch
        costs["bench_s"] = last_batch_s
        write_results(record, out_dir, tag)

    print(markdown(record))


def merge(files: list[str], out_dir: Path, tag: str, note: str | None = None) -> None:
    """One record from runs over different batch sizes (the first run's header, every run's
    command), rows and cost model ordered by batch size."""
    recs = [json.loads(Path(f).read_text()) for f in files]
    rec = dict(recs[0])
    rec["rows"] = sorted((r for x in recs for r in x["rows"]), key=lambda r: r["batch"])
    rec["cost_model"] = dict(sorted((int(b), c) for x in recs for b, c in x["cost_model"].items()))
    rec["merged_from"] = files
    if note:
        rec["note"] = note
    rec["batches"] = sorted({r["batch"] for r in rec["rows"]})
    rec["command"] = " ; ".join(x["command"] for x in recs)
    rec["date"] = " / ".join(x["date"] for x in recs)
    rec["skipped_batches"] = [b for x in recs for b in x.get("skipped_batches", [])
                              if b not in rec["batches"]]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_results(rec, out_dir, tag)
    print(markdown(rec))


def write_results(record: dict, out_dir: Path, tag: str) -> None:
    """JSON, markdown and (with several batch sizes) the plot; called after every batch size,
    so a run cut short by a time limit keeps what it finished."""
    (out_dir / f"speculative_{tag}.json").write_text(json.dumps(record, indent=1))
    (out_dir / f"speculative_{tag}.md").write_text(markdown(record))
    if record["rows"]:
        plot(record, out_dir / f"speculative_{tag}.png")


def markdown(rec: dict) -> str:
    lines = [f"# Speculative decoding, {rec['model']} on {rec['device']} ({rec['backend']})", "",
             (f"{rec['date']} | {rec['device']} | jax {rec['jax_version']} | git "
              f"{rec['git_sha']} | impl {rec['impl']} | `{rec['command']}`"), "",
             *([f"Note: {rec['note']}", ""] if rec.get("note") else []),
             (f"{rec['num_prompts']} prompts ({', '.join(rec['kinds'])}), greedy, up to "
             f"{rec['max_new_tokens']} new tokens, stop at EOS; jax {rec['jax_version']}, git "
             f"{rec['git_sha']}, {rec['date']}. Speedup = autoregressive decode time / "
             "speculative decode time on the same prompts (compilation excluded). L = mean "
             "tokens per target step; alpha = per-token acceptance fitted to L; predicted = "
             "`expected_speedup(alpha, k, c, verify_cost)` with c and verify_cost measured here; "
             "calibrated = `calibrated_speedup` from the probe's full-round time and alpha, "
             "with stragglers (E[max over rows] rounds)."),
             "", ("| batch | draft | k | L | acc. rate | alpha | tok/s | speedup | predicted | "
                  "calibrated | exact | L chat / code / summ |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["rows"]:
        by = r.get("mean_accepted_by_kind", {})
        kinds = " / ".join(f"{by[k]:.2f}" for k in ("chat", "code", "summarization") if k in by)
        if r["draft"] == "none":
            lines.append(f"| {r['batch']} | autoregressive | - | 1 | - | - | {r['tok_s']:.1f} | "
                         f"1.00 | - | - | - | - |")
            continue
        lines.append(f"| {r['batch']} | {r['draft']} | {r['k']} | {r['mean_accepted']:.2f} | "
                     f"{r['acceptance_rate']:.2f} | {r['alpha']:.2f} | {r['tok_s']:.1f} | "
                     f"{r['speedup']:.2f} | {r['predicted_speedup']:.2f} | "
                     f"{_fmt(r.get('predicted_calibrated'))} | "
                     f"{r['exact_prompts']}/{rec['num_prompts']} | {kinds} |")
    lines += ["", ("Cost model inputs per batch: target step time, c (draft step / target "
                   "step), verify_cost(k) (target pass over k+1 tokens / one decode step); the "
                   "probe's full round per k in AR steps (round / AR step) and its L."), ""]
    for b, cm in rec["cost_model"].items():
        vc = ", ".join(f"{k}: {v:.2f}" for k, v in cm["verify_cost"].items())
        c = ", ".join(f"{k}: {v:.3f}" for k, v in cm["c"].items())
        lines.append(f"- batch {b}: step {1e3 * cm['target_step_s']:.2f} ms; c {{{c}}}; "
                     f"verify_cost {{{vc}}}")
        cal = cm.get("calibration")
        if cal:
            per = "; ".join(
                f"{name} " + ", ".join(f"k={k}: {t / cal['ar_step_s']:.2f} (L "
                                       f"{cal['mean_accepted'][name][k]:.2f})"
                                       for k, t in by_k.items())
                for name, by_k in cal["round_s"].items())
            lines.append(f"  - probe ({cal['probe_prompts']} prompts): AR step "
                         f"{1e3 * cal['ar_step_s']:.2f} ms; round in AR steps: {per}")
    lines += ["", ("Chosen k (0 = speculation off), the speedup predicted there and the speedup "
                   "measured there. isolated: `choose_k(alpha, c, max k, verify_cost)` with alpha "
                   "measured at the largest k in the full run. calibrated: `choose_k_calibrated` "
                   "from the probe alone (full-round times, the AR step, alpha per k, stragglers "
                   "over max_new_tokens - 1 tokens), chosen before the full run."), "",
              ("| batch | draft | isolated k | predicted | measured | calibrated k | predicted | "
               "measured | best measured |"), "|---|---|---|---|---|---|---|---|---|"]
    for b, cm in rec["cost_model"].items():
        for name, kc in cm.get("chosen_k", {}).items():
            mine = [r for r in rec["rows"] if r["batch"] == b and r["draft"] == name]
            best = max(mine, key=lambda r: r["speedup"])
            kcal = cm.get("chosen_k_calibrated", {}).get(name)
            cal = ("- | - | -" if kcal is None else
                   f"{kcal} | {cm['predicted_calibrated'][name]:.2f} | "
                   f"{_fmt(_measured_at(mine, kcal))}")
            lines.append(f"| {b} | {name} | {kc} | {cm['predicted_at_chosen_k'][name]:.2f} | "
                         f"{_fmt(_measured_at(mine, kc))} | {cal} | {best['speedup']:.2f} "
                         f"(k={best['k']}) |")
    if rec.get("skipped_batches"):
        lines += ["", f"Skipped for the time budget: batch {rec['skipped_batches']}."]
    return "\n".join(lines) + "\n"


def _measured_at(rows: list[dict], k: int) -> float | None:
    """The measured speedup at k (1.0 for k = 0: plain decoding), None if k was not run."""
    return next((r["speedup"] for r in rows if r["k"] == k), 1.0 if k == 0 else None)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def plot(rec: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    # The calibrated model (probe's full rounds) where the record has it; older records carry
    # only the isolated one.
    calibrated = any("predicted_calibrated" in r for r in rec["rows"])
    pred_key, k_key = (("predicted_calibrated", "chosen_k_calibrated") if calibrated
                       else ("predicted_speedup", "chosen_k"))
    for name in sorted({r["draft"] for r in rec["rows"]} - {"none"}):
        best = {}
        for r in rec["rows"]:
            if r["draft"] == name and r["speedup"] > best.get(r["batch"], {}).get("speedup", 0):
                best[r["batch"]] = r
        bs = sorted(best)
        line, = ax.plot(bs, [best[b]["speedup"] for b in bs], "o-", label=f"{name} (best k)")
        ax.plot(bs, [best[b][pred_key] for b in bs], "x--", color=line.get_color(),
                label=f"{name} {'calibrated ' if calibrated else ''}predicted (same k)")
        for b in bs:  # the best measured k, and the k the cost model chooses
            kc = rec["cost_model"].get(b, {}).get(k_key, {}).get(name)
            ax.annotate(f"k={best[b]['k']}" + ("" if kc is None else f" ({kc})"),
                        (b, best[b]["speedup"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=line.get_color())
    ax.axhline(1.0, color="gray", lw=0.8)
    batches = sorted({r["batch"] for r in rec["rows"]})
    ax.set_xscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.set(xlabel="batch size", ylabel="speedup over autoregressive",
           title=f"speculative decoding, {rec['device']}\nlabels: best k (cost model's k"
                 f"{', calibrated' if calibrated else ''}; 0 = off)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
