"""Engine fixtures: the tiny random model, its greedy reference, and engines of fixed shape.

Every engine built by `make_llm` has the same device shapes (slots, pool, block-table width),
so the runner's executables are shared across tests and only token buckets compile.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

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


# -- the server: the tiny model widened to SmolLM2's vocabulary, with the real tokenizer ------
SERVED_NAME = "tiny-smol"
SERVER_ARGS = {"max_num_seqs": 16, "max_num_batched_tokens": 128, "page_size": 16,
               "max_model_len": 256, "num_pages": 160}


@pytest.fixture(scope="session")
def smol_tiny(smol_path) -> Model:
    import gguf

    from jdecode.io.gguf_loader import read_fields
    from jdecode.io.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf_fields(read_fields(gguf.GGUFReader(str(smol_path))))
    cfg = load_model_config_yaml(ROOT / "configs/models/tiny.yaml").replace(
        vocab_size=tok.vocab_size)
    return Model(SERVED_NAME, cfg, init_params(cfg, jax.random.key(3)), tok)


@pytest.fixture(scope="session")
def offline(smol_tiny) -> LLM:
    """The offline engine the server's outputs are compared with (same shapes, same model)."""
    return LLM(smol_tiny, **SERVER_ARGS)


@contextlib.contextmanager
def running_server(model: Model, engine_args: dict | None = None, **app_args):
    """Serves `model` on a free port of 127.0.0.1; yields (base url, AsyncEngine, Server).

    engine_args: `EngineArgs` fields over SERVER_ARGS."""
    # Imported here: the GPU machine has no uvicorn, and its engine tests need no server.
    from jdecode.engine.server import build_app, make_server

    engine = LLMEngine(model, EngineArgs(**{**SERVER_ARGS, **(engine_args or {})}))
    app, core = build_app(engine, SERVED_NAME, **app_args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = make_server(app, core, port=port, log_level="warning")
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", core, srv
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        core.shutdown()


@pytest.fixture(scope="session")
def server(smol_tiny):
    """One server for the server tests: (base url, AsyncEngine)."""
    with running_server(smol_tiny) as (url, core, _):
        yield url, core
