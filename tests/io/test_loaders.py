"""Checkpoint loaders: sharded vs single-file safetensors, missing tensors, GGUF (written here
from a tiny HF checkpoint with llama.cpp's Q/K permutation), the orbax param cache, dtypes."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from helpers import seed_of
from hf_checkpoints import COMMON, make_checkpoint
from safetensors.numpy import load_file, save_file

from jdecode.config import ConfigError
from jdecode.io import checkpoint, gguf_loader
from jdecode.io.gguf_loader import unpermute_qk
from jdecode.io.registry import load
from jdecode.io.safetensors_loader import load_hf_checkpoint


def leaves(params) -> dict[str, np.ndarray]:
    flat, _ = jax.tree_util.tree_flatten_with_path(params)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def assert_same_params(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for name in la:
        assert la[name].dtype == lb[name].dtype, name
        np.testing.assert_array_equal(la[name], lb[name], err_msg=name)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_gqa")
    hf = make_checkpoint("llama_gqa", path, seed=seed_of(__name__))
    return path, hf


def test_sharded_checkpoint_loads_the_same_params(llama_dir, tmp_path):
    path, hf = llama_dir
    hf.save_pretrained(tmp_path, max_shard_size="20KB", safe_serialization=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3  # really sharded
    cfg_a, a = load_hf_checkpoint(path)
    cfg_b, b = load_hf_checkpoint(tmp_path)
    assert cfg_a == cfg_b
    assert_same_params(a, b)
    # And the values are HF's, transposed to [in, out] and stacked over layers.
    np.testing.assert_array_equal(
        np.asarray(b.layers.wk[1]), hf.model.layers[1].self_attn.k_proj.weight.detach().numpy().T)


def test_missing_tensor_is_named(llama_dir, tmp_path):
    path, _ = llama_dir
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(ConfigError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj"
                                          r"\.weight'"):
        load(str(tmp_path))


def test_no_safetensors_is_a_clear_error(tmp_path, llama_dir):
    (tmp_path / "config.json").write_text((llama_dir[0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors files in"):
        load(str(tmp_path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cast_on_load(llama_dir, dtype):
    path, _ = llama_dir
    _, ref = load_hf_checkpoint(path, "float32")
    model = load(str(path), dtype=dtype)
    assert model.cfg.dtype == dtype
    got, want = leaves(model.params), leaves(ref)
    for name in got:
        assert got[name].dtype == np.dtype(jax.numpy.dtype(dtype)), name
        # Exactly the f32 values rounded once to the target dtype.
        np.testing.assert_array_equal(got[name], want[name].astype(got[name].dtype), name)


# -- GGUF -----------------------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py `LlamaModel.permute` (the spec our unpermute undoes)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@pytest.mark.parametrize("n_head, head_dim, cols", [(4, 16, 64), (2, 8, 0), (3, 64, 576)])
def test_unpermute_inverts_llama_cpp_permute(rng, n_head, head_dim, cols):
    shape = (n_head * head_dim, cols) if cols else (n_head * head_dim,)  # weight or bias
    w = rng.standard_normal(shape).astype(np.float32)
    permuted = llama_cpp_permute(w, n_head)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)
    np.testing.assert_array_equal(llama_cpp_permute(unpermute_qk(w, n_head), n_head), w)


def byte_level_vocab(n: int) -> tuple[list[str], list[str]]:
    """n tokens: printable ASCII bytes as byte-level BPE spells them, then merged pairs."""
    singles = ["Ġ"] + [chr(c) for c in range(33, 127)]
    merges = [f"{a} {b}" for a in "abcdefgh" for b in "etaoinsh"][:n - len(singles)]
    return singles + [m.replace(" ", "") for m in merges], merges


def write_gguf(path, hf) -> None:
    """A llama GGUF (f32 tensors) of a tiny HF Llama, Q/K rows permuted as llama.cpp does."""
    import gguf

    c = hf.config
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_theta if hasattr(c, "rope_theta") else COMMON["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokens, merges = byte_level_vocab(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    names = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        for ours, theirs in names.items():
            t = sd[f"model.layers.{i}.{theirs}.weight"]
            if ours == "attn_q":
                t = llama_cpp_permute(t, c.num_attention_heads)
            elif ours == "attn_k":
                t = llama_cpp_permute(t, c.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{ours}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def gguf_file(llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, llama_dir[1])
    return path


def test_gguf_loads_the_same_params_as_safetensors(llama_dir, gguf_file, monkeypatch, tmp_path):
    monkeypatch.setenv("JDECODE_CACHE", str(tmp_path))
    # dtype named: "auto" means bf16 on a GPU, while load_hf_checkpoint's default is f32.
    from_gguf = load(str(gguf_file), dtype="float32", use_cache=False)
    cfg, ref = load_hf_checkpoint(llama_dir[0])
    assert from_gguf.cfg == cfg.replace(rms_norm_eps=from_gguf.cfg.rms_norm_eps)
    assert from_gguf.cfg.rms_norm_eps == pytest.approx(cfg.rms_norm_eps)
    assert_same_params(from_gguf.params, ref)  # the Q/K unpermute restored HF's row order
    assert from_gguf.tokenizer.decode(from_gguf.tokenizer.encode("a cat")) == "a cat"


def test_orbax_cache_second_load_is_identical(gguf_file, monkeypatch, tmp_path):
    monkeypatch.setenv("JDECODE_CACHE", str(tmp_path))
    first = load(str(gguf_file))
    assert list((tmp_path / "params").iterdir()), "the first load wrote no cache"

    def no_conversion(*a, **k):
        raise AssertionError("second load converted the GGUF again instead of using the cache")

    monkeypatch.setattr(gguf_loader, "load_gguf", no_conversion)
    second = load(str(gguf_file))
    assert second.cfg == first.cfg
    assert_same_params(second.params, first.params)


def test_cached_load_skips_the_gguf_metadata(gguf_file, monkeypatch, tmp_path):
    """A cached load takes the config and tokenizer from the cache (meta.json, tokenizer.json)
    without opening the GGUF; a cache written before that (no format in meta.json) reads the
    GGUF once and is upgraded."""
    monkeypatch.setenv("JDECODE_CACHE", str(tmp_path))
    first = load(str(gguf_file))
    (cache,) = (tmp_path / "params").iterdir()
    real_open = gguf_loader.open_gguf
    opened = []

    def counting_open(path):
        opened.append(path)
        return real_open(path)

    monkeypatch.setattr(gguf_loader, "open_gguf", counting_open)
    second = load(str(gguf_file))
    assert opened == [] and second.cfg == first.cfg
    assert_same_params(second.params, first.params)
    t1, t2 = first.tokenizer, second.tokenizer
    assert (t2.bos_id, t2.eos_ids, t2.add_bos, t2.chat_template, t2.vocab_size) == (
        t1.bos_id, t1.eos_ids, t1.add_bos, t1.chat_template, t1.vocab_size)
    for text in ("a cat", "hot tea in a boat", " ehst aoin!"):
        assert t2.encode(text) == t1.encode(text)
        assert t2.decode(t1.encode(text)) == t1.decode(t1.encode(text))
    (cache / "meta.json").write_text(json.dumps({"source": str(gguf_file)}))  # an old cache
    third = load(str(gguf_file))
    assert len(opened) == 1 and third.cfg == first.cfg
    assert json.loads((cache / "meta.json").read_text())["format"] == checkpoint.META_FORMAT
    load(str(gguf_file))
    assert len(opened) == 1  # upgraded: the GGUF is not read again
    (cache / "tokenizer.json").write_text("not json")  # damaged: read the GGUF instead
    assert load(str(gguf_file)).tokenizer.encode("a cat") == t1.encode("a cat")
    assert len(opened) == 2


def test_load_config_reads_the_shape_without_weights(llama_dir, gguf_file, monkeypatch):
    from jdecode.io import registry

    def no_weights(*a, **k):
        raise AssertionError("load_config read the weights")

    monkeypatch.setattr(gguf_loader, "load_gguf", no_weights)
    cfg, _ = load_hf_checkpoint(llama_dir[0])
    assert registry.load_config(str(llama_dir[0])) == cfg
    from_gguf = registry.load_config(str(gguf_file))
    assert from_gguf.hidden_size == cfg.hidden_size and from_gguf.num_layers == cfg.num_layers
    assert from_gguf.tie_word_embeddings == cfg.tie_word_embeddings
    assert registry.load_config("llama-3.2-1b").num_layers == 16  # a dotted config name


def test_param_cache_is_announced_once(gguf_file, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("JDECODE_CACHE", str(tmp_path))
    with caplog.at_level("WARNING"):
        load(str(gguf_file))
    said = [r.getMessage() for r in caplog.records if "cached the converted params" in r.msg]
    assert len(said) == 1 and f"rm -rf {tmp_path / 'params'}" in said[0]
    assert "JDECODE_CACHE" in (tmp_path / "README.txt").read_text()
    caplog.clear()
    with caplog.at_level("WARNING"):
        load(str(gguf_file), dtype="bfloat16")  # a second cache entry: not said again
    assert not [r for r in caplog.records if "cached the converted params" in r.msg]


@pytest.mark.parametrize("backend, expected", [("cpu", "float32"), ("gpu", "bfloat16"),
                                               ("tpu", "bfloat16")])
def test_auto_dtype_loads_a_checkpoint_in_the_backends_dtype(gguf_file, llama_dir, monkeypatch,
                                                            tmp_path, backend, expected):
    # `auto` is the default of load / LLM / the CLI: an f32 checkpoint runs bf16 on an
    # accelerator (vLLM's rule) and f32 on CPU. The backend is faked; the params are real.
    monkeypatch.setenv("JDECODE_CACHE", str(tmp_path))
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    for path in (str(gguf_file), str(llama_dir[0])):
        m = load(path)
        assert m.cfg.dtype == expected, path
        assert {leaf.dtype.name for leaf in jax.tree.leaves(m.params)} == {expected}, path


def test_auto_dtype_keeps_a_model_configs_own(monkeypatch):
    from jdecode.io import registry

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert registry.load_config("llama-3.2-1b", dtype="auto").dtype == "bfloat16"
    assert registry.load_config("tiny", dtype="auto").dtype == "float32"  # as tiny.yaml says
    m = load("tiny", overrides=("dtype=bfloat16",))  # default auto: not forced to f32
    assert m.cfg.dtype == "bfloat16" and m.params.embed.dtype.name == "bfloat16"
    assert load("tiny", dtype="float16").params.embed.dtype.name == "float16"


def test_unknown_dtype_is_named_with_the_choices():
    from jdecode.io import registry

    with pytest.raises(ConfigError, match=r"dtype='fp8'.*auto, float32, bfloat16, float16"):
        registry.resolve_dtype("fp8")
    with pytest.raises(ConfigError, match="dtype='half'"):
        load("tiny", dtype="half")


@pytest.mark.parametrize("key, saved, on_gpu", [
    ("torch_dtype", "float16", "float16"), ("dtype", "bfloat16", "bfloat16"),
    ("torch_dtype", "float32", "bfloat16")])
def test_auto_dtype_keeps_an_hf_checkpoints_half_dtype(llama_dir, monkeypatch, tmp_path, key,
                                                      saved, on_gpu):
    # vLLM's auto: an f16 checkpoint runs f16 on a GPU (not bf16); on CPU f32 as ever.
    import shutil

    from jdecode.io import registry

    ckpt = shutil.copytree(llama_dir[0], tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())  # one of the two keys, as saved
    config = {k: v for k, v in config.items() if k not in ("dtype", "torch_dtype")}
    (ckpt / "config.json").write_text(json.dumps({**config, key: saved}))
    for backend, expected in (("gpu", on_gpu), ("cpu", "float32")):
        monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
        assert registry.load_config(str(ckpt), dtype="auto").dtype == expected
        assert load(str(ckpt)).params.embed.dtype.name == expected
