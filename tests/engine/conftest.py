"""Engine fixtures: the tiny random model, its greedy reference, and engines of fixed shape.

Every engine built by `make_llm` has the same device shapes (slots, pool, block-table width),
so the runner's executables are shared across tests and only token buckets compile.
"""

from __future__ import annotations

import jax
import pytest

from jdecode.config import load_model_config_yaml
from jdecode.decoding.generate import Generator
from jdecode.decoding.sampling import SamplingParams
from jdecode.engine.engine import EngineArgs, LLMEngine
from jdecode.engine.llm import LLM
from jdecode.io.registry import Model
from jdecode.model.params import init_params

ROOT = __import__("pathlib").Path(__file__).parents[2]
SHAPES = {"max_num_seqs": 8, "max_model_len": 64, "page_size": 4, "num_pages": 40}
MAX_NEW = 10


@pytest.fixture(scope="session")
def tiny() -> Model:
    cfg = load_model_config_yaml(ROOT / "configs/models/tiny.yaml")
    return Model("tiny", cfg, init_params(cfg, jax.random.key(7)), None)


@pytest.fixture(scope="session")
def greedy_reference(tiny):
    """Single-request greedy generation with the dense cache (`decoding.generate`), memoized.

    Prompts of 17..32 tokens share one prompt bucket, so this compiles once.
    """
    gen = Generator(tiny, max_seq_len=128)
    memo: dict[tuple, list[int]] = {}

    def ref(prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
        assert 17 <= len(prompt) <= 32, "keep reference prompts in one bucket (17..32 tokens)"
        key = (tuple(prompt), max_new)
        if key not in memo:
            sp = SamplingParams(max_new_tokens=max_new)
            memo[key] = gen.generate([prompt], sp)[0].token_ids
        return memo[key]

    return ref


@pytest.fixture
def make_engine(tiny):
    def make(**engine_args) -> LLMEngine:
        return LLMEngine(tiny, EngineArgs(**{**SHAPES, **engine_args}))

    return make


@pytest.fixture
def make_llm(tiny):
    def make(**engine_args) -> LLM:
        return LLM(tiny, **{**SHAPES, **engine_args})

    return make
