"""Offline batch API in vLLM's shape: `LLM(model, **engine_args).generate(prompts, params)` and
`.chat(messages, params)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from jdecode.decoding.sampling import SamplingParams
from jdecode.engine.engine import EngineArgs, LLMEngine, Logprob
from jdecode.io.registry import DEFAULT_MODEL, Model, load

Prompt = str | Sequence[int]
Conversation = Sequence[dict[str, str]]  # [{"role": "user", "content": "..."}, ...]


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[Logprob] | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.logprobs is None else sum(lp.logprob for lp in self.logprobs)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    """A model plus an engine, for offline generation.

    Args:
      model: a loaded `Model`, a known name (default SmolLM2-135M-Instruct), an HF directory or
        a .gguf file.
      dtype: parameter dtype when loading by name; auto = half precision on a GPU or TPU,
        float32 on CPU (`io.registry.resolve_dtype`).
      **engine_args: `EngineArgs` fields (max_num_seqs, max_num_batched_tokens, page_size, ...).
    """

    def __init__(self, model: Model | str = DEFAULT_MODEL, *, dtype: str = "auto",
                 **engine_args) -> None:
        self.model = model if isinstance(model, Model) else load(model, dtype=dtype)
        self.engine = LLMEngine(self.model, EngineArgs(**engine_args))
        self._ids = itertools.count()

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            tok = self.model.tokenizer
            if tok is None:
                raise ValueError("this model has no tokenizer: pass token ids instead of text")
            return tok.encode(prompt)
        return [int(t) for t in prompt]

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, logprobs: int | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generates for every prompt in one continuous batch; outputs keep the input order.

        Args:
          prompts: a string, a list of token ids, or a list of either.
          sampling_params: one for all prompts, or one per prompt (heterogeneous requests).
            Each prompt gets `n` sequences (`SamplingParams.n`); siblings share the prompt's KV
            pages copy-on-write.
          logprobs: if set, each token carries its logprob and the top `logprobs` alternatives.
          use_tqdm: show a progress bar over finished requests.
        Returns:
          One RequestOutput per prompt, in input order.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(sampling_params)} "
                             "SamplingParams: pass one, or one per prompt")
        engine = self.engine
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        encoded = [self._encode(p) for p in prompts]
        results: dict[str, RequestOutput] = {}
        try:
            for rid, p, toks, sp in zip(ids, prompts, encoded, sampling_params, strict=True):
                engine.add_request(rid, toks, sp, logprobs=logprobs)
                results[rid] = RequestOutput(
                    rid, p if isinstance(p, str) else None, toks,
                    [CompletionOutput(i, "", [], None, [] if logprobs is not None else None)
                     for i in range(sp.n)])
            bar = tqdm(total=len(prompts), desc="generate", unit="req", disable=not use_tqdm)
            with bar:
                while engine.has_unfinished_requests():
                    for out in engine.step():
                        res = results[out.request_id]
                        comp = res.outputs[out.index]
                        comp.text = out.text
                        if out.finished:  # a list of its own, once per sequence
                            comp.token_ids = list(out.token_ids)
                        comp.finish_reason = out.finish_reason
                        res.num_cached_tokens = max(res.num_cached_tokens,
                                                    out.num_cached_tokens)
                        if out.logprobs is not None:
                            comp.logprobs.extend(out.logprobs)
                        if out.finished and res.finished:
                            bar.update(1)
        except BaseException:
            for rid in ids:  # leave the engine clean for the next call
                engine.abort_request(rid)
            raise
        return [results[rid] for rid in ids]

    def chat(self, messages: Conversation | Sequence[Conversation],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             *, logprobs: int | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Answers one conversation or a batch of them, rendered with the model's chat template.

        Args:
          messages: a conversation (a list of {"role", "content"} dicts) or a list of them.
          sampling_params, logprobs, use_tqdm: as in `generate`.
        Returns:
          One RequestOutput per conversation, in input order; `prompt` is the rendered text.
        """
        tok = self.model.tokenizer
        if tok is None or not tok.chat_template:
            raise ValueError(f"{self.model.name} has no chat template: use LLM.generate with "
                             "raw text")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [tok.apply_chat_template(list(c)) for c in conversations]
        return self.generate(prompts, sampling_params, logprobs=logprobs, use_tqdm=use_tqdm)
