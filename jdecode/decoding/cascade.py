"""Cascades (the lecture's cascade decoding; FrugalGPT, Chen et al. 2023): models from cheapest
to dearest answer in turn, a deferral rule scores each answer, and only deferred rows go on,
re-batched, to the next model. Registers the sequence-level `cascade` and the token-level
`speculative-cascade` (Narasimhan et al. 2025: speculative decoding whose acceptance test is a
deferral rule, `speculative.deferral_accept`). Both are lossy: rows report quality beside cost.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import jax
import numpy as np

from jdecode.config import DTYPES
from jdecode.decoding import deferral as dr
from jdecode.decoding.draft_model import load_draft
from jdecode.decoding.generate import MIN_PROMPT_BUCKET, GenerationResult, Generator, next_pow2
from jdecode.decoding.methods import MethodBuild, register
from jdecode.decoding.sampling import SamplingParams
from jdecode.decoding.speculative import (
    acceptance_stats,
    build_speculative,
    deferral_accept,
    exact_accept,
)
from jdecode.io.registry import Model
from jdecode.model.layout import inference_layout
from jdecode.model.params import cast_params
from jdecode.options import option

DRAFT = "artifacts/smollm2-135m-d2.tgz"  # the committed distilled 2-layer draft
DEFAULT_LADDER = (DRAFT, "target@bfloat16", "target")


def stage_model(target: Model, spec: str) -> Model:
    """One rung of a ladder, by spec: "target" (the model the cascade is built for), or a
    draft artifact / HF directory / .gguf / known name sharing its vocabulary (in its dtype),
    either optionally cast with "@DTYPE" (e.g. "target@bfloat16")."""
    name, dtype = spec, None
    head, _, tail = spec.rpartition("@")
    if head and tail in DTYPES:
        name, dtype = head, tail
    model = target if name == "target" else load_draft(name, target)
    if model.cfg.vocab_size != target.cfg.vocab_size:
        raise ValueError(f"model {spec!r} has vocab_size {model.cfg.vocab_size} but the target "
                         f"has {target.cfg.vocab_size}: every rung must share the target's "
                         "tokenizer")
    if dtype is not None and dtype != model.cfg.dtype:
        model = Model(f"{model.name}@{dtype}", model.cfg.replace(dtype=dtype),
                      cast_params(model.params, dtype), model.tokenizer)
    return model


_SHARED: collections.OrderedDict = collections.OrderedDict()
SHARED_MAX = 32


def shared(target: Model, key: tuple, make: Callable[[], Any]) -> Any:
    """One stage model or `Stage` per (target, key) in this process, so every cascade of an
    experiment over the same ladder shares weights and compiled executables. The target is
    held beside each entry, so its id cannot be reused while the entry lives (LRU, bounded)."""
    k = (id(target), *key)
    if k not in _SHARED:
        _SHARED[k] = (target, make())
        while len(_SHARED) > SHARED_MAX:
            _SHARED.popitem(last=False)
    _SHARED.move_to_end(k)
    return _SHARED[k][1]


def _score_rows(params, classifier, tokens, prompt_lens, answer_lens, *, cfg, n, impl,
                quantile):
    """Every rule's score [B] and the classifier features [B, F] of one stage's answers."""
    stats = dr.answer_stats(params, tokens, prompt_lens, answer_lens, cfg=cfg, n=n, impl=impl)
    scores = dr.rule_scores(stats, quantile)
    features = dr.answer_features(stats)
    if classifier is not None:
        scores["classifier"] = dr.classifier_logits(classifier, features)
    return scores, features


class Stage:
    """One rung: a `Generator` (any method) and the model whose probabilities score its
    answers (default the Generator's own; give it when the method's params bundle more, e.g.
    speculative decoding's (target, draft)), with the scoring pass compiled per shape."""

    def __init__(self, generator: Generator, model: Model | None = None):
        self.generator = generator
        self.model = model or generator.model
        if generator.model.params is self.model.params:
            self.params = generator.params
        else:  # the Generator holds a bundle: a copy of the scoring model in its layout
            self.params = (inference_layout(self.model.params) if generator.layout == "inference"
                           else self.model.params)
        self._scorers: dict[tuple, Any] = {}
        self.compile_s = 0.0

    @property
    def compile_seconds(self) -> float:
        return self.compile_s + self.generator.compile_seconds

    def score(self, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
              classifier: dr.DeferralClassifier | None, quantile: float
              ) -> tuple[dict[str, np.ndarray], np.ndarray, float]:
        """Teacher-forced scores of `answers` (one per prompt) under this stage's model.

        Returns:
          ({rule: [R] scores}, features [R, F], seconds the pass took, compile excluded).
        """
        r = len(prompts)
        b = next_pow2(r)
        n = next_pow2(max(len(a) for a in answers), 16)
        t = next_pow2(max(len(p) + len(a) for p, a in zip(prompts, answers)), MIN_PROMPT_BUCKET)
        tokens = np.zeros((b, t), np.int32)
        prompt_lens = np.ones((b,), np.int32)  # padding rows: a 1-token prompt and answer
        answer_lens = np.ones((b,), np.int32)
        for i, (p, a) in enumerate(zip(prompts, answers)):
            tokens[i, :len(p) + len(a)] = [*p, *a]
            prompt_lens[i], answer_lens[i] = len(p), len(a)
        args = (self.params, classifier, tokens, prompt_lens, answer_lens)
        key = (b, t, n, quantile, classifier is not None)
        if key not in self._scorers:
            t0 = time.perf_counter()
            fn = jax.jit(partial(_score_rows, cfg=self.model.cfg, n=n,
                                 impl=self.generator.impl, quantile=quantile))
            self._scorers[key] = fn.lower(*args).compile()
            self.compile_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        scores, features = jax.device_get(self._scorers[key](*args))
        seconds = time.perf_counter() - t0
        return {k: np.asarray(v)[:r] for k, v in scores.items()}, np.asarray(features)[:r], \
            seconds


@dataclasses.dataclass(frozen=True)
class Deferral:
    """When a stage's answer goes on: the row defers where `rule`'s score is below
    thresholds[stage] (or is NaN).

    rule: one of `deferral.SEQUENCE_RULES`. thresholds: one per stage but the last (+inf
    defers every row, -inf none). quantile: q of the quantile rule. classifiers: one per stage
    but the last (rule "classifier"; with another rule their scores are recorded too).
    """

    rule: str = "mean-logprob"
    thresholds: tuple[float, ...] = ()
    quantile: float = 0.1
    classifiers: tuple[dr.DeferralClassifier, ...] | None = None


class SequenceCascade:
    """`cascade([generator_1, ..., generator_n], deferral)`: see the module docstring.

    Each stage generates whole answers for the rows that reach it (one batch, bucketed as
    `Generator` does), its answers are scored teacher-forced, and rows below the threshold
    are re-batched for the next stage. A result's stats hold the batch's figures as
    `Generator` reports them (time = every stage's prefill + decode + scoring) and, under
    "cascade", the row's own record: each stage's tokens, text, scores, deferral, forward
    passes and time share (its batch's time / rows in it).
    """

    def __init__(self, stages: Sequence[Stage | Generator], deferral: Deferral,
                 keep_features: bool = False):
        self.stages = [s if isinstance(s, Stage) else Stage(s) for s in stages]
        n = len(self.stages)
        if n < 1:
            raise ValueError("a cascade needs at least one model")
        if len(deferral.thresholds) != n - 1:
            raise ValueError(f"{n} models need {n - 1} thresholds (one per model but the "
                             f"last); got {len(deferral.thresholds)}")
        if deferral.rule not in dr.SEQUENCE_RULES:
            raise ValueError(f"rule={deferral.rule!r}: choose one of "
                             f"{', '.join(dr.SEQUENCE_RULES)}")
        if deferral.classifiers is not None and len(deferral.classifiers) != n - 1:
            raise ValueError(f"{n} models need {n - 1} classifiers; got "
                             f"{len(deferral.classifiers)}")
        if deferral.rule == "classifier" and deferral.classifiers is None:
            raise ValueError("rule=classifier needs trained classifiers (`jdecode train "
                             "deferral`, passed as calibration=...)")
        vocab = {s.model.cfg.vocab_size for s in self.stages}
        if len(vocab) > 1:
            raise ValueError(f"the models' vocab sizes differ ({sorted(vocab)}): a cascade's "
                             "models must share one tokenizer")
        self.deferral, self.keep_features = deferral, keep_features

    @property
    def compile_seconds(self) -> float:
        return sum(s.compile_seconds for s in self.stages)

    def generate(self, ids: Sequence[Sequence[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[GenerationResult]:
        """Runs the cascade on token-id prompts; one `GenerationResult` per prompt.

        sampling: one `SamplingParams` for every prompt or one per prompt (default greedy).
        """
        n = len(ids)
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * n
        d = self.deferral
        records: list[dict[str, Any]] = [
            {"deferred": [], "scores": {}, "tokens": [], "texts": [], "seconds": [],
             "passes": []} for _ in range(n)]
        features: list[list[np.ndarray]] = [[] for _ in range(n)]
        final: list[GenerationResult | None] = [None] * n
        totals = {"prefill_s": 0.0, "decode_s": 0.0, "decode_steps": 0, "row_steps": 0.0}
        rows = list(range(n))
        for i, stage in enumerate(self.stages):
            results = stage.generator.generate([list(ids[r]) for r in rows],
                                               [sampling[r] for r in rows])
            st = results[0].stats  # batch-level figures, equal on every row
            stage_s = st["prefill_ms"] / 1e3 + st["decode_s"]
            totals["prefill_s"] += st["prefill_ms"] / 1e3
            totals["decode_s"] += st["decode_s"]
            totals["decode_steps"] += st["decode_steps"]
            last = i == len(self.stages) - 1
            defer = np.zeros(len(rows), bool)
            if not last:
                clf = None if d.classifiers is None else d.classifiers[i]
                scores, feats, score_s = stage.score([ids[r] for r in rows],
                                                     [res.token_ids for res in results], clf,
                                                     d.quantile)
                stage_s += score_s
                totals["decode_s"] += score_s
                defer = ~(scores[d.rule] >= d.thresholds[i])  # NaN defers
            deferred = []
            for j, (r, res) in enumerate(zip(rows, results)):
                # Row-steps of this row's decode (exact for one-token methods).
                steps = (res.stats["num_tokens"] - 1) / max(st["mean_accepted"], 1e-9)
                totals["row_steps"] += steps
                rec = records[r]
                rec["tokens"].append(list(res.token_ids))
                rec["texts"].append(res.text)
                rec["seconds"].append(stage_s / len(rows))
                rec["passes"].append(1 + math.ceil(steps) + (0 if last else 1))
                if not last:
                    for rule, v in scores.items():
                        rec["scores"].setdefault(rule, []).append(float(v[j]))
                    rec["deferred"].append(bool(defer[j]))
                    if self.keep_features:
                        features[r].append(feats[j])
                if defer[j]:
                    deferred.append(r)
                else:
                    final[r] = res
            rows = deferred
            if not rows:
                break
        return self._results(ids, final, records, features, totals)

    def _results(self, ids, final, records, features, totals) -> list[GenerationResult]:
        n = len(ids)
        batch_tokens = sum(len(res.token_ids) for res in final)
        batch_stats = {
            "prefill_ms": 1e3 * totals["prefill_s"], "decode_s": totals["decode_s"],
            "batch_tokens": batch_tokens, "decode_steps": totals["decode_steps"],
            "decode_tok_s": (batch_tokens - n) / max(totals["decode_s"], 1e-9),
            # Final tokens per row-step of every stage: below 1 where rows were regenerated.
            "mean_accepted": (batch_tokens - n) / max(totals["row_steps"], 1e-9),
            "compile_s": self.compile_seconds, "batch": n}
        out = []
        for r, res in enumerate(final):
            rec = {**records[r], "stage": len(records[r]["tokens"]) - 1}
            if self.keep_features:
                rec["features"] = features[r]
            out.append(GenerationResult(
                prompt_token_ids=list(ids[r]), token_ids=res.token_ids, text=res.text,
                finish_reason=res.finish_reason,
                stats={**batch_stats, "num_tokens": len(res.token_ids), "cascade": rec}))
        return out


def cascade(stages: Sequence[Stage | Generator], deferral: Deferral) -> SequenceCascade:
    """The sequence-level cascade transform over decoders (`Generator`s of any method),
    cheapest first; see `SequenceCascade`."""
    return SequenceCascade(stages, deferral)


def cascade_summary(stats: dict, num_stages: int) -> dict[str, float]:
    """Per-cell cost of a cascade from its prompts' records (stats["rows"], as the experiment
    runner passes them): calls_s{i} the share of prompts model i answered (large_share for the
    last), time_share_s{i} its share of the time, passes_per_prompt, mean_stage. Without
    per-prompt records (one result's stats): nothing, the record is in the result."""
    recs = [s["cascade"] for s in stats.get("rows") or () if "cascade" in s]
    if not recs:
        return {}
    n = len(recs)
    total = sum(sum(c["seconds"]) for c in recs)
    out: dict[str, float] = {}
    for i in range(num_stages):
        reached = [c for c in recs if len(c["seconds"]) > i]
        out[f"calls_s{i}"] = len(reached) / n
        out[f"time_share_s{i}"] = sum(c["seconds"][i] for c in reached) / max(total, 1e-12)
    out["large_share"] = out[f"calls_s{num_stages - 1}"]
    out["passes_per_prompt"] = float(np.mean([sum(c["passes"]) for c in recs]))
    out["mean_stage"] = float(np.mean([c["stage"] for c in recs]))
    return out


# -- the registered methods ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CascadeOptions:
    models: tuple[str, ...] = option(
        DEFAULT_LADDER, "the ladder, cheapest first: 'target' (the model given), a draft "
        "artifact / HF directory / .gguf with its tokenizer, either optionally '@DTYPE' "
        "(e.g. target@bfloat16)")
    methods: tuple[str | dict, ...] = option(
        (), "each model's decoding method: a registered name or {method: NAME, options: {...}}"
        " (default autoregressive)")
    rule: Literal["max-prob", "mean-logprob", "quantile", "classifier"] = option(
        "mean-logprob", "deferral score: max-prob (Chow on the answer's probability), "
        "mean-logprob (Chow, length-normalized), quantile (of token log-probs, Gupta et al. "
        "2024) or classifier (trained)")
    threshold: float | tuple[float, ...] | None = option(
        None, "defer when the score is below this (one value, or one per model but the "
        "last; .inf defers every row); default: the rule's own")
    defer_rate: float | None = option(None, "calibrate each step to defer this share of the "
                                      "calibration rows (needs calibration)")
    target_quality: float | None = option(
        None, "calibrate each step to the fewest deferrals whose calibration quality reaches "
        "this (share matching the next model, or accuracy for label=correct; needs "
        "calibration)")
    label: Literal["match", "correct"] = option("match", "the quality target_quality "
                                                "calibrates")
    quantile: float = option(0.1, "q of the quantile rule")
    calibration: str | None = option(None, "a `jdecode train deferral` artifact: classifiers "
                                     "and calibration scores for the ladder's steps")

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models=[]: give at least one model")
        given = [k for k in ("threshold", "defer_rate", "target_quality")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are both set: give one way to place the "
                             "threshold")
        if isinstance(self.threshold, tuple) and len(self.threshold) != len(self.models) - 1:
            raise ValueError(f"threshold has {len(self.threshold)} values for "
                             f"{len(self.models)} models: give one per model but the last")
        if (self.defer_rate is not None or self.target_quality is not None
                or self.rule == "classifier") and self.calibration is None:
            raise ValueError("defer_rate, target_quality and rule=classifier need calibration="
                             "a `jdecode train deferral` artifact")
        if self.defer_rate is not None and not 0.0 <= self.defer_rate <= 1.0:
            raise ValueError(f"defer_rate={self.defer_rate} must lie in [0, 1]")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"quantile={self.quantile} must lie in (0, 1)")
        if self.methods and len(self.methods) != len(self.models):
            raise ValueError(f"{len(self.methods)} methods for {len(self.models)} models: give "
                             "one per model, or none")


def stage_method(entry: str | dict) -> tuple[str, dict]:
    """(method name, options) of one `methods` entry."""
    if isinstance(entry, str):
        return entry, {}
    unknown = sorted(set(entry) - {"method", "options"})
    if "method" not in entry or unknown:
        raise ValueError(f"methods entry {entry!r}: write {{method: NAME, options: {{...}}}}")
    return entry["method"], dict(entry.get("options") or {})


def thresholds_for(opts: CascadeOptions, cal: dr.Calibration | None) -> tuple[float, ...]:
    """One threshold per step of the ladder, given or calibrated."""
    steps = [dr.transition(a, b) for a, b in zip(opts.models, opts.models[1:])]
    if isinstance(opts.threshold, tuple):
        return opts.threshold
    if opts.threshold is not None:
        return (opts.threshold,) * len(steps)
    if opts.defer_rate is not None:
        return tuple(dr.threshold_for_rate(cal.scores(s, opts.rule), opts.defer_rate)
                     for s in steps)
    if opts.target_quality is not None:
        return tuple(dr.threshold_for_quality(*cal.qualities(s, opts.rule, opts.label),
                                              opts.target_quality) for s in steps)
    return (dr.DEFAULT_THRESHOLDS[opts.rule],) * len(steps)


@register("cascade", CascadeOptions, lossless=False,
          summary="models from cheapest to dearest; a deferral rule sends unsure answers on to "
                  "the next model (FrugalGPT-style sequence cascade)")
def build_cascade(model: Model, opts: CascadeOptions, impl: str) -> MethodBuild:
    try:
        models = [shared(model, ("model", spec), partial(stage_model, model, spec))
                  for spec in opts.models]
    except FileNotFoundError as e:
        raise ValueError(f"models: {e}") from None
    methods = [stage_method(m) for m in opts.methods] or [("autoregressive", {})] * len(models)
    cal = dr.load_calibration(opts.calibration, model) if opts.calibration else None
    steps = [dr.transition(a, b) for a, b in zip(opts.models, opts.models[1:])]
    classifiers = None
    if cal is not None and all(s in cal.classifiers for s in steps):
        classifiers = tuple(cal.classifiers[s] for s in steps)
    deferral = Deferral(opts.rule, thresholds_for(opts, cal), opts.quantile, classifiers)

    def run(gen: Generator, ids: list[list[int]], sampling: list[SamplingParams]) -> list:
        settings = (gen.impl, gen.layout, gen.max_seq_len, gen.specialize_greedy,
                    gen.loop_block)

        def make(m: Model, name: str, o: dict) -> Stage:
            return Stage(Generator(m, impl=gen.impl, layout=gen.layout,
                                   max_seq_len=gen.max_seq_len,
                                   specialize_greedy=gen.specialize_greedy,
                                   loop_block=gen.loop_block, method=name, options=o),
                         model=m)

        stages = [shared(model, ("stage", spec, name, json.dumps(o, sort_keys=True), *settings),
                         partial(make, m, name, o))
                  for spec, m, (name, o) in zip(opts.models, models, methods)]
        return SequenceCascade(stages, deferral).generate(ids, sampling)

    def no_decoder(cfg, max_len):
        raise TypeError("the cascade runs whole generations of several models "
                        "(MethodBuild.run); it has no single Decoder: use Generator(model, "
                        "method='cascade')")

    # The Generator never runs its own loop for a cascade: it needs no weights of its own.
    return MethodBuild(dataclasses.replace(model, params=None), no_decoder,
                       describe=partial(cascade_summary, num_stages=len(models)), run=run)


@dataclasses.dataclass(frozen=True)
class SpeculativeCascadeOptions:
    draft: str = option(DRAFT, "the small model: a `jdecode train draft` artifact, an HF "
                        "directory or a .gguf sharing the target's tokenizer")
    k: int = option(2, "tokens drafted per step")
    rule: Literal["exact", "chow", "diff", "opt"] = option(
        "opt", "token deferral rule: exact (plain, lossless speculative decoding), chow (max q "
        "< 1 - alpha), diff (max q < max p - alpha) or opt (max q < max p - alpha TV(p, q))")
    alpha: float = option(0.5, "the rule's price of deferring (higher keeps more draft tokens)")

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k={self.k}: draft at least 1 token per step")


@register("speculative-cascade", SpeculativeCascadeOptions, lossless=False,
          summary="speculative decoding whose acceptance test is a token-level deferral rule "
                  "(Narasimhan et al. 2025); rule=exact is plain speculative decoding")
def build_speculative_cascade(model: Model, opts: SpeculativeCascadeOptions, impl: str
                              ) -> MethodBuild:
    exact = opts.rule == "exact"
    accept = exact_accept if exact else deferral_accept(dr.token_deferral(opts.rule, opts.alpha))
    try:
        model, decoder_fn = build_speculative(model, opts.draft, opts.k, impl, accept=accept,
                                              draft_probs=not exact)
    except FileNotFoundError as e:
        raise ValueError(f"draft={opts.draft!r}: {e}") from None
    return MethodBuild(model, decoder_fn,
                       describe=lambda stats: acceptance_stats(stats["mean_accepted"], opts.k))
