"""The self-distillation corpus: the target's own continuations of training prompts (greedy and
sampled), packed into fixed-length windows, split into training and held-out rows by prompt,
and cached on disk so every trained part of one target can share it.

Only token ids are stored. What a loss needs from the target (logits, hidden states of any
layer) is computed on the fly inside the training step: [N, T, V] f32 logits for a corpus
would not fit in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np

from jdecode.io.artifacts import target_identity
from jdecode.io.registry import Model


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """How the target writes the corpus.

    new_tokens, temperature: each continuation's length and sampling temperature (top-p 0.95).
    samples_per_prompt: continuations per prompt: the first greedy (what greedy verification
      checks), the rest sampled. gen_batch: prompts per generate call. seq_len: tokens per
      window (the last seq_len tokens of each sequence: the target's own text rather than the
      shared system prompt). val_fraction: share of prompts held out, with all their samples.
    """

    new_tokens: int = 96
    temperature: float = 0.7
    samples_per_prompt: int = 1
    gen_batch: int = 16
    seq_len: int = 128
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        for name in ("new_tokens", "samples_per_prompt", "gen_batch", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must lie in [0, 1)")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0")


@dataclasses.dataclass
class Corpus:
    """Token windows of the target's text: train and held-out rows [N, seq_len]."""

    tokens: np.ndarray  # [N, T] int32 training windows, right-padded
    mask: np.ndarray  # [N, T] f32, 1 = real token
    val_tokens: np.ndarray  # [M, T] int32 held-out windows (prompts never trained on)
    val_mask: np.ndarray  # [M, T] f32

    @classmethod
    def from_sequences(cls, seqs: list[list[int]], seq_len: int,
                       val_seqs: list[list[int]] = ()) -> Corpus:
        """A corpus of given token sequences (e.g. outputs already generated elsewhere)."""
        return cls(*pack(list(seqs), seq_len), *pack(list(val_seqs), seq_len))

    def info(self) -> dict:
        return {"train_rows": len(self.tokens), "train_tokens": int(self.mask.sum()),
                "val_rows": len(self.val_tokens), "val_tokens": int(self.val_mask.sum())}


def held_out_prompts(n: int, val_fraction: float) -> set[int]:
    """int(n * val_fraction) prompt indices spread evenly over [0, n) (the prompt list is
    grouped by kind, so every kind is represented)."""
    k = int(n * val_fraction)
    return {int((i + 0.5) * n / k) for i in range(k)} if k else set()


def generate_continuations(target: Model, prompts: list[str] | list[list[int]],
                           cc: CorpusConfig, seed: int = 0
                           ) -> tuple[list[list[int]], list[int]]:
    """Each prompt (text goes through the chat template) continued `cc.samples_per_prompt`
    times by the target: prompt + output ids, and the index of each sequence's prompt."""
    from jdecode.decoding.generate import Generator
    from jdecode.decoding.sampling import SamplingParams

    # Stacked layers compile several times faster than the unrolled GPU layout, and at a
    # corpus-sized batch the step is not launch-bound.
    gen = Generator(target, layout="stacked")
    jobs = [(i, s) for s in range(cc.samples_per_prompt) for i in range(len(prompts))]
    # Similar lengths and kinds (greedy or sampled) share a chunk, and every chunk is full: few
    # shape buckets, so few compiles. The wrapped-around extra jobs are just more samples.
    jobs.sort(key=lambda j: (j[1] > 0, len(prompts[j[0]])))
    jobs += jobs[:-len(jobs) % cc.gen_batch]  # pad to a multiple of gen_batch
    seqs: list[list[int]] = []
    index: list[int] = []
    for start in range(0, len(jobs), cc.gen_batch):
        chunk = jobs[start:start + cc.gen_batch]
        # Sample 0 is greedy (top_p 1: greedy ignores it anyway); one batch mixes both.
        sps = [SamplingParams(temperature=cc.temperature if s else 0.0, top_p=0.95 if s else 1.0,
                              seed=seed + start + i, max_new_tokens=cc.new_tokens)
               for i, (_, s) in enumerate(chunk)]
        prompts_chunk = [prompts[i] for i, _ in chunk]
        chat = target.tokenizer is not None and isinstance(prompts_chunk[0], str)
        for r in gen.generate(prompts_chunk, sps, chat=chat):
            seqs.append(r.prompt_token_ids + r.token_ids)
        index += [i for i, _ in chunk]
    return seqs, index


def pack(seqs: list[list[int]], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Last seq_len tokens of each sequence, right-padded: [N, seq_len] int32 tokens and a
    [N, seq_len] f32 mask."""
    tokens = np.zeros((len(seqs), seq_len), np.int32)
    mask = np.zeros((len(seqs), seq_len), np.float32)
    for i, s in enumerate(seqs):
        s = s[-seq_len:]
        tokens[i, :len(s)], mask[i, :len(s)] = s, 1.0
    return tokens, mask


def corpus_key(target: Model, prompts: list, cc: CorpusConfig, seed: int) -> str:
    """What the corpus depends on: the target's weights, the prompts, the config and seed."""
    blob = json.dumps([target_identity(target)["fingerprint"], prompts,
                       dataclasses.asdict(cc), seed], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_or_build(target: Model, prompts: list[str] | list[list[int]], cc: CorpusConfig,
                  path: str | Path, seed: int = 0) -> Corpus:
    """The corpus cached at `path` (a .npz) if it was built from the same target, prompts and
    config; otherwise generated and written there.

    Args:
      target: the model whose text it is. prompts: user messages (chat template applied) or
        token-id prompts. cc: sizes. path: the cache file; share one across trained parts.
      seed: seeds the sampled continuations.
    """
    path = Path(path)
    key = corpus_key(target, prompts, cc, seed)
    if path.is_file():
        data = np.load(path)
        if "key" in data.files and str(data["key"]) == key:
            return Corpus(data["tokens"], data["mask"], data["val_tokens"], data["val_mask"])
    seqs, index = generate_continuations(target, prompts, cc, seed)
    held = held_out_prompts(len(prompts), cc.val_fraction)
    tokens, mask = pack([s for s, i in zip(seqs, index) if i not in held], cc.seq_len)
    val_tokens, val_mask = pack([s for s, i in zip(seqs, index) if i in held], cc.seq_len)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, tokens=tokens, mask=mask, val_tokens=val_tokens, val_mask=val_mask,
             key=np.asarray(key))
    return Corpus(tokens, mask, val_tokens, val_mask)
