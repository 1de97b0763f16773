"""Runs an experiment's grid in one process: per model and batch size, autoregressive decoding
first (the same-run baseline), then every method. Lossless methods are checked token for token
against the baseline; every method gets quality metrics beside its cost.

Writes into the output directory, after every cell (a run cut short keeps what it finished):
  results.jsonl     one row per cell (skipped when a later run finds it: resumable)
  outputs/<cell>.json   each prompt's token ids and text
  results.md        the tables; speedup_vs_batch.png, quality_vs_cost.png
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jdecode.analysis import quality
from jdecode.data.heldout import prose_paragraphs, text_id
from jdecode.data.tasks import is_correct
from jdecode.decoding import methods, phases
from jdecode.decoding.generate import Generator, next_pow2
from jdecode.decoding.sampling import SamplingParams
from jdecode.experiments import report
from jdecode.experiments.config import (
    BASELINE,
    ExperimentConfig,
    MethodEntry,
    Prompt,
    cell_key,
    resolve_prompts,
)
from jdecode.io.registry import Model, load
from jdecode.options import to_dict
from jdecode.provenance import environment

RESULTS = "results.jsonl"
PPL_TOKENS = 128  # held-out paragraphs are cut to this many tokens (one compiled shape)


def chunks(prompts: list[Prompt], batch: int) -> list[list[int]]:
    """Prompt indices per generate call. Batch 1 runs prompts one by one; larger batches take
    consecutive prompts and fill the last chunk by cycling from the start, so every call has
    the batch size the row claims (the extra rows are timed, not recorded)."""
    idx = list(range(len(prompts)))
    if batch > 1 and len(idx) % batch:
        idx += (idx * batch)[:batch - len(idx) % batch]
    return [idx[i:i + batch] for i in range(0, len(idx), batch)]


def run_cell(gen: Generator, prompts: list[Prompt], batch: int, cfg: ExperimentConfig
             ) -> dict[str, Any]:
    """Generates every prompt in chunks of `batch`; returns timings, tokens and texts.

    Throughput counts every row's tokens but its first (which prefill produces); the mean
    accepted tokens per step is per live row-step, as the loop counts it.
    """
    sps = [SamplingParams(temperature=cfg.temperature, seed=cfg.seed + i,
                          max_new_tokens=cfg.max_new_tokens, ignore_eos=cfg.ignore_eos)
           for i in range(len(prompts))]
    tokens: list[list[int] | None] = [None] * len(prompts)
    texts: list[str] = [""] * len(prompts)
    row_stats: list[dict] = [{}] * len(prompts)  # each prompt's own result stats
    kinds: dict[str, list[float]] = {}  # kind -> [decode_s, tokens, steps]
    total = {"decode_s": 0.0, "prefill_s": 0.0, "tokens": 0.0, "steps": 0.0, "calls": 0}
    for chunk in chunks(prompts, batch):
        inputs = [list(prompts[i].token_ids) if prompts[i].token_ids is not None
                  else prompts[i].text for i in chunk]
        results = gen.generate(inputs, [sps[i] for i in chunk], chat=cfg.chat)
        st = results[0].stats  # batch-level figures, equal on every row
        new = st["batch_tokens"] - len(chunk)  # each row's first token comes from prefill
        steps = new / st["mean_accepted"] if st["mean_accepted"] else 0.0
        kind = prompts[chunk[0]].kind if len({prompts[i].kind for i in chunk}) == 1 else "mixed"
        agg = kinds.setdefault(kind, [0.0, 0.0, 0.0])
        agg[0] += st["decode_s"]
        agg[1] += new
        agg[2] += steps
        total["decode_s"] += st["decode_s"]
        total["prefill_s"] += st["prefill_ms"] / 1e3
        total["tokens"] += new
        total["steps"] += steps
        total["calls"] += 1
        for i, r in zip(chunk, results):
            if tokens[i] is None:  # the first time a prompt runs (cycled rows repeat it)
                tokens[i], texts[i], row_stats[i] = r.token_ids, r.text, r.stats
    tok_s = total["tokens"] / max(total["decode_s"], 1e-9)
    mean_accepted = total["tokens"] / max(total["steps"], 1e-9)
    return {
        "tok_s": tok_s, "decode_s": total["decode_s"], "new_tokens": int(total["tokens"]),
        "prefill_ms_mean": 1e3 * total["prefill_s"] / max(total["calls"], 1),
        "mean_accepted": mean_accepted,
        "by_kind": {k: {"tok_s": t / max(s, 1e-9), "mean_accepted": t / max(n, 1e-9)}
                    for k, (s, t, n) in kinds.items()},
        # The method's own figures, from the whole cell's (e.g. acceptance from tau) and each
        # prompt's result stats (e.g. a cascade's per-row calls).
        "method_stats": {k: float(v) for k, v in gen.describe(
            {"mean_accepted": mean_accepted, "decode_tok_s": tok_s, "batch": batch,
             "rows": row_stats}).items() if k != "mean_accepted"},
        "tokens": tokens, "texts": texts, "stats": row_stats,
    }


class Scorer:
    """Teacher-forced logits of the full model or of a lossy method, jitted once per shape."""

    def __init__(self, fn: Callable[[Any, jax.Array], jax.Array], params: Any):
        self.fn, self.params = jax.jit(fn), params

    def __call__(self, tokens: np.ndarray) -> jax.Array:
        return self.fn(self.params, jnp.asarray(tokens))


def full_scorer(model: Model) -> Scorer:
    return Scorer(lambda p, t: phases.score(p, t, cfg=model.cfg)[0], model.params)


def padded(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded [N, T] tokens and mask, T a power of two (few compiled shapes)."""
    t = next_pow2(max(len(s) for s in seqs), 16)
    tokens = np.zeros((len(seqs), t), np.int32)
    mask = np.zeros((len(seqs), t), np.float32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)], mask[i, :len(s)] = s, 1.0
    return tokens, mask


def quality_metrics(cell: dict, base: dict, prompts: list[Prompt], gen: Generator,
                    full: Scorer, mine: Scorer | None, cfg: ExperimentConfig,
                    held_out: list[list[int]]) -> dict[str, Any]:
    """Agreement with the baseline's tokens and task accuracy on prompts with answers; with a
    scorer of the method's own distributions (`MethodBuild.score`, or the full model for the
    baseline), KL / top-1 to the full model on the baseline's outputs and perplexity on
    held-out text."""
    out: dict[str, Any] = quality.token_agreement(cell["tokens"], base["tokens"])
    answered = [i for i, p in enumerate(prompts) if p.answer is not None]
    if answered:
        out["task_accuracy"] = float(np.mean([is_correct(prompts[i].answer, cell["texts"][i])
                                              for i in answered]))
    if mine is None:
        return out
    if mine is not full:
        # The full model's greedy continuations: where it is most confident, as decoding
        # sees it. (The baseline would compare the full model with itself: skipped.)
        seqs = [gen.encode(p.text, cfg.chat) if p.token_ids is None else list(p.token_ids)
                for p in prompts]
        tokens, mask = padded([s + t for s, t in zip(seqs, base["tokens"])])
        gen_mask = mask.copy()
        for i, s in enumerate(seqs):  # count only positions that predict a generated token
            gen_mask[i, :max(len(s) - 1, 0)] = 0.0
        gen_mask[:, -1] = 0.0
        out.update(quality.teacher_forced_metrics(full(tokens), mine(tokens), gen_mask))
    if held_out:
        tokens, mask = padded(held_out)
        out["perplexity"] = quality.perplexity(*quality.nll_sums(mine(tokens), tokens, mask))
        if mine is not full:
            out["perplexity_full"] = quality.perplexity(
                *quality.nll_sums(full(tokens), tokens, mask))
    return out


def load_rows(out: Path) -> dict[str, dict]:
    file = out / RESULTS
    if not file.is_file():
        return {}
    rows = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    return {row["cell"]: row for row in rows}


def run_experiment(cfg: ExperimentConfig, out_dir: str | Path, progress: bool = True,
                   command: str = "") -> list[dict]:
    """Runs every cell not already in out_dir/results.jsonl and rewrites the tables and plots.

    Args:
      cfg: the validated experiment. out_dir: where results go (created). progress: a bar over
        cells. command: the command line, recorded in results.md.
    Returns:
      every row of results.jsonl (earlier runs' included), in grid order.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    (out / "outputs").mkdir(parents=True, exist_ok=True)
    done = load_rows(out)
    prompts = resolve_prompts(cfg)
    env = environment()
    entries = [MethodEntry(BASELINE)] + [m for m in cfg.methods if m.name != BASELINE]
    grid = [(m, b, e) for m in cfg.model for b in cfg.batch_sizes for e in entries]
    keys = [cell_key(cfg, m, e, b, prompts) for m, b, e in grid]
    todo = sum(k not in done for k in keys)
    bar = tqdm(total=len(grid), initial=len(grid) - todo, disable=not progress, unit="cell",
               desc=cfg.name)
    loaded: dict[str, Model] = {}
    gens: dict[tuple[str, str], Generator] = {}
    for (model_name, batch, entry), key in zip(grid, keys):
        if key in done:
            continue
        bar.set_postfix_str(f"{entry.name} b={batch}")
        if model_name not in loaded:
            loaded[model_name] = load(model_name, dtype=cfg.dtype)
        model = loaded[model_name]
        gkey = (model_name, entry.name)
        if gkey not in gens:
            gens[gkey] = Generator(model, impl=cfg.impl, method=entry.method,
                                   options=entry.options)
        gen = gens[gkey]
        compiled = gen.compile_seconds
        cell = run_cell(gen, prompts, batch, cfg)
        cell["compile_s"] = gen.compile_seconds - compiled
        base_key = cell_key(cfg, model_name, MethodEntry(BASELINE), batch, prompts)
        base_row = cell if entry.method == BASELINE and not entry.options else done[base_key]
        base = cell if base_row is cell else json.loads(
            (out / "outputs" / f"{base_key}.json").read_text())
        row = make_row(cfg, env, key, base_key, model_name, entry, batch, cell, base, base_row,
                       prompts)
        if cfg.quality:
            full = full_scorer(model)
            mine = (Scorer(gen.score, gen.model.params) if gen.score is not None
                    else full if base_row is cell else None)
            held = held_out_ids(model, cfg) if mine is not None else []
            row["quality"] = quality_metrics(cell, base, prompts, gen, full, mine, cfg, held)
        (out / "outputs" / f"{key}.json").write_text(json.dumps(
            {"tokens": cell["tokens"], "texts": cell["texts"], "stats": cell["stats"]}))
        line = json.dumps(row)
        with open(out / RESULTS, "a") as f:
            f.write(line + "\n")
        done[key] = json.loads(line)  # as a resumed run will read it (tuples become lists)
        report.write(cfg, [done[k] for k in keys if k in done], out, command)
        bar.update(1)
    bar.close()
    rows = [done[k] for k in keys if k in done]
    report.write(cfg, rows, out, command)
    return rows


def held_out_ids(model: Model, cfg: ExperimentConfig) -> list[list[int]]:
    """Held-out paragraphs as token ids (first PPL_TOKENS each); none without a tokenizer."""
    if model.tokenizer is None:
        return []
    return [model.tokenizer.encode(p)[:PPL_TOKENS]
            for p in prose_paragraphs(cfg.perplexity_paragraphs)]


def make_row(cfg: ExperimentConfig, env: dict, key: str, base_key: str, model_name: str,
             entry: MethodEntry, batch: int, cell: dict, base: dict, base_row: dict,
             prompts: list[Prompt]) -> dict[str, Any]:
    """One results.jsonl row: the cell's figures beside its same-run baseline's."""
    spec = methods.get(entry.method)
    greedy = cfg.temperature == 0.0
    exact = sum(a == b for a, b in zip(cell["tokens"], base["tokens"]))
    base_kinds = base_row["by_kind"]
    return {
        "cell": key, "baseline_cell": base_key, "experiment": cfg.name, "label": entry.name,
        "method": entry.method,
        "options": to_dict(methods.parse_options(spec, entry.options)),
        "lossless": spec.lossless, "model": model_name, "dtype": cfg.dtype, "impl": cfg.impl,
        "batch": batch, "prompts": len(prompts),
        "tok_s": cell["tok_s"], "speedup": cell["tok_s"] / base_row["tok_s"],
        "mean_accepted": cell["mean_accepted"],
        "by_kind": {k: {**v, "speedup": v["tok_s"] / base_kinds[k]["tok_s"]}
                    for k, v in cell["by_kind"].items() if k in base_kinds},
        "exact_prompts": exact if greedy else None,
        "exact": exact / len(prompts) if greedy else None,
        "method_stats": cell["method_stats"], "decode_s": cell["decode_s"],
        "new_tokens": cell["new_tokens"], "prefill_ms_mean": cell["prefill_ms_mean"],
        "compile_s": cell["compile_s"],
        **env, "held_out_text": text_id(prose_paragraphs(cfg.perplexity_paragraphs)),
        "config": {**dataclasses.asdict(cfg), "methods": [dataclasses.asdict(m)
                                                          for m in cfg.methods]},
    }
