"""jdecode: fast LLM decoding and decoding-method research in JAX/XLA.

Top-level names are imported lazily, so `import jdecode.engine.scheduler` (host-side logic)
does not pull in jax.
"""

from __future__ import annotations

import importlib

__all__ = ["DEFAULT_MODEL", "LLM", "Model", "ModelConfig", "SamplingParams", "generate", "load"]
__version__ = "0.1.0"

_LAZY = {
    "ModelConfig": "jdecode.config",
    "SamplingParams": "jdecode.decoding.sampling",
    "DEFAULT_MODEL": "jdecode.io.registry",
    "LLM": "jdecode.engine.llm",
    "Model": "jdecode.io.registry",
    "load": "jdecode.io.registry",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jdecode' has no attribute {name!r}")


def generate(model, prompts, sampling=None, chat: bool = False, impl: str = "auto",
             method: str = "autoregressive", **options):
    """Generates for one prompt or a list; returns a list of `GenerationResult` (text, token
    ids, finish reason and timing stats).

    `model` is a Model or a name/path; `method` a registered decoding method (`jdecode
    methods`) and `options` its options, e.g. `generate(m, p, method="speculative", k=4)`.
    Calls with the same Model, impl, method and options reuse one Generator and its compiled
    steps (`decoding.generate.shared_generator`); a name or path loads the model anew.
    """
    from jdecode.decoding.generate import shared_generator
    from jdecode.decoding.sampling import SamplingParams
    from jdecode.io.registry import load

    if isinstance(model, str):
        model = load(model)
    return shared_generator(model, impl, method, options).generate(
        prompts, sampling or SamplingParams(), chat=chat)
