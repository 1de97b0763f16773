"""Blockwise parallel decoding (Stern, Shazeer and Uszkoreit 2018): k heads propose the next k
tokens at once, the target verifies the block in one pass and keeps the longest prefix that
agrees with its own choices, plus its next token.

The heads are the Medusa heads (`jdecode train medusa`); the block is the chain of their top-1
tokens, so a step is `medusa.heads_decoder` over a chain. As in the paper, the verify pass
also yields the hidden state the next block is proposed from: one target pass per step.
"""

from __future__ import annotations

import dataclasses

from jdecode.decoding.acceptance import sampled_tree_accept
from jdecode.decoding.base import parse_k_plan
from jdecode.decoding.medusa import (
    acceptance_describe,
    chain_tree,
    heads_decoder,
    load_for_method,
)
from jdecode.decoding.methods import MethodBuild, register
from jdecode.io.registry import Model
from jdecode.options import option

# Plain decoding from batch 16 up, unless told otherwise: the chain of 4 ran at 1.12x of plain
# decoding at batch 4 and 0.83x at 16 on the H200 with the default model
# (benchmarks/medusa_eagle_batches_h200.md; see medusa.MEASURED_PLAN).
MEASURED_K_PLAN = {16: 0}


@dataclasses.dataclass(frozen=True)
class BlockwiseOptions:
    heads: str = option("artifacts/smollm2-135m-medusa.tgz", "the proposal heads: a "
                        "`jdecode train medusa` artifact (directory or .tgz)")
    k: int = option(0, "tokens proposed per step, one per head; 0 = every head")
    k_by_batch: dict | None = option(  # noqa: RUF009 (`option` returns a field)
        None, "batch size -> k from that size up, e.g. {16: 2, 64: 0} (the cost model's "
        "per-batch choice; 0 = plain decoding); null = the plan measured for the default "
        "model, plain decoding from batch 16 ({16: 0}); {} = k at every size")

    def __post_init__(self) -> None:
        if self.k_by_batch is None:
            object.__setattr__(self, "k_by_batch", dict(MEASURED_K_PLAN))
        if self.k < 0:
            raise ValueError(f"k={self.k}: propose 0 (every head) or a positive count")
        parse_k_plan(self.k_by_batch, 0)


@register("blockwise", BlockwiseOptions, lossless=True,
          summary="blockwise parallel decoding: k heads propose the next k tokens, the target "
                  "keeps the longest agreeing prefix (Stern et al. 2018)")
def build_blockwise(model: Model, opts: BlockwiseOptions, impl: str) -> MethodBuild:
    model, accuracy = load_for_method(model, opts.heads, opts.k, 1)
    k = len(accuracy)
    trees = {batch: chain_tree(min(kb, k))
             for batch, kb in parse_k_plan(opts.k_by_batch, k).items()}
    return MethodBuild(model, lambda cfg, max_len: heads_decoder(cfg, max_len, trees, impl,
                                                                sampled_tree_accept),
                       describe=acceptance_describe(trees, accuracy))
