"""jdecode: fast LLM decoding and decoding-method research in JAX/XLA."""

from jdecode.config import ModelConfig
from jdecode.decoding.sampling import SamplingParams
from jdecode.io.registry import DEFAULT_MODEL, Model, load

__all__ = ["DEFAULT_MODEL", "Model", "ModelConfig", "SamplingParams", "generate", "load"]
__version__ = "0.1.0"


def generate(model: Model | str, prompts, sampling: SamplingParams = SamplingParams(),
             chat: bool = False, impl: str = "auto"):
    """Generates for one prompt or a list; returns a list of `GenerationResult`
    (text, token ids, finish reason and timing stats)."""
    from jdecode.decoding.generate import Generator

    if isinstance(model, str):
        model = load(model)
    return Generator(model, impl=impl).generate(prompts, sampling, chat=chat)
