"""Per-operator FLOPs and HBM bytes of a Llama decoder step, following the seed's formula list.

Letters as in STYLE.md and the seed: b batch, t query tokens per sequence, s keys attended,
e hidden (the seed's H), h query heads (the seed's N), k kv heads, d head dim, f FFN width
(the seed's H'), v vocab. M = b*t rows go through every linear layer.

Two byte conventions:
  "textbook" charges what an operator reads (inputs and weights), as the seed does, so that
      a linear layer X[M, e] @ W[e, e] has intensity 2*M*e^2 / (2*(M*e + e^2))
      = 1 / (1/e + 1/M) (the seed's formula 1). For unfused attention it follows the seed's
      memory term O(BTND + BT^2N) per matmul: each of QK^T and .V is charged one K/V operand
      and one [t, s] score matrix; the query and the output are not charged (charging Q too
      would give 108.6 instead of the seed's 114.7 at B=8 T=1024 D=128).
  "full" also charges every output write and every intermediate that round-trips HBM
      (LLM-Viewer's convention); the seed's formulas 6 and 8, 1/(1/H + 1/H' + 1/BT), are this
      convention.
"""

from __future__ import annotations

import dataclasses

from jdecode.analysis.hardware import DTYPE_BYTES
from jdecode.config import ModelConfig

CONVENTIONS = ("textbook", "full")
ATTENTION_IMPLS = ("unfused", "flash")

# FLOPs per element of the elementwise operators (what a straightforward kernel executes).
RMSNORM_FLOPS = 4  # x*x, the sum, x*rsqrt(mean), *weight (the per-row rsqrt is negligible)
ROPE_FLOPS = 3  # x1*cos - x2*sin: two multiplies and one add per output element
SWIGLU_FLOPS = 5  # sigmoid(g) as exp, add, divide; then *g and *u
SOFTMAX_FLOPS = 4  # the seed's count per score: 1/sqrt(D) scaling, max-subtract, exp, divide


@dataclasses.dataclass(frozen=True)
class Phase:
    """One jitted step: every sequence feeds `q_len` tokens and attends to `kv_len` keys.

    `head_tokens` rows per sequence go through the final norm and LM head (prefill returns the
    last position's logits only; verification needs all of its q_len).
    """

    name: str
    batch: int
    q_len: int
    kv_len: int
    head_tokens: int = 1

    def __post_init__(self) -> None:
        for field in ("batch", "q_len", "kv_len", "head_tokens"):
            if getattr(self, field) < 1:
                raise ValueError(f"{self.name}: {field}={getattr(self, field)} must be >= 1")

    @property
    def new_tokens(self) -> int:
        """Tokens a step handles: prefill the whole prompt, decode one per sequence, verify its
        k+1 scored positions (an upper bound on the tokens it accepts)."""
        return self.batch * (self.q_len if self.name == "prefill" else self.head_tokens)


def prefill_phase(batch: int, seq: int) -> Phase:
    """Full decoding of a [batch, seq] prompt (causal attention over the prompt itself)."""
    return Phase("prefill", batch, seq, seq, 1)


def decode_phase(batch: int, context: int) -> Phase:
    """Incremental decoding: one token per sequence attending to `context` cached keys."""
    return Phase("decode", batch, 1, context, 1)


def verify_phase(batch: int, context: int, num_draft: int) -> Phase:
    """Speculative verification of `num_draft` drafted tokens (+1 bonus) in one pass."""
    return Phase("verify", batch, num_draft + 1, context, num_draft + 1)


@dataclasses.dataclass(frozen=True)
class OpCost:
    """FLOPs and bytes of one operator, for one layer (per_layer) or once per model."""

    name: str
    group: str  # "linear" | "attention" | "other" | "cache"
    seed: str  # the operator's formula number in the seed's table for this phase
    flops: float
    bytes_read: float
    bytes_written: float
    bytes_textbook: float
    per_layer: bool = True
    alternative: bool = False  # the attention variant not selected: shown, never summed

    def bytes(self, convention: str) -> float:
        """HBM bytes under `convention` ("textbook" or "full")."""
        if convention == "textbook":
            return self.bytes_textbook
        if convention == "full":
            return self.bytes_read + self.bytes_written
        raise ValueError(f"convention={convention!r}: choose one of {', '.join(CONVENTIONS)}")

    def intensity(self, convention: str) -> float:
        """FLOP per byte; 0 for pure data movement."""
        nbytes = self.bytes(convention)
        return self.flops / nbytes if nbytes else 0.0


def _op(name, group, seed, flops, read, written, textbook=None, **kw) -> OpCost:
    return OpCost(name, group, seed, float(flops), float(read), float(written),
                  float(read if textbook is None else textbook), **kw)


def _linear(name: str, seed: str, m: int, d_in: int, d_out: int, nbytes: int,
            bias: bool = False, per_layer: bool = True) -> OpCost:
    """Y[m, d_out] = X[m, d_in] @ W[d_in, d_out] (+ b): 2*m*d_in*d_out FLOPs (seed: 2nmp)."""
    flops = 2 * m * d_in * d_out + (m * d_out if bias else 0)
    read = (m * d_in + d_in * d_out + (d_out if bias else 0)) * nbytes
    return _op(name, "linear", seed, flops, read, m * d_out * nbytes, per_layer=per_layer)


def _elementwise(name: str, seed: str, flops: float, read_elems: float, write_elems: float,
                 nbytes: int, per_layer: bool = True) -> OpCost:
    return _op(name, "other", seed, flops, read_elems * nbytes, write_elems * nbytes,
               per_layer=per_layer)


# The seed numbers its formulas differently in its prefill and decode tables (decode lists the
# cache append as its own formula 3). Norms are grouped with the residual add before them.
_SEED_NUMBERS = {
    "prefill": {
        "attn_norm": "⑨", "q_proj": "①", "k_proj": "①", "v_proj": "①", "rope": "②",
        "kv_append": "", "attention": "③", "o_proj": "④", "resid_attn": "⑤", "mlp_norm": "⑤",
        "gate_proj": "⑥", "up_proj": "⑥", "swiglu": "⑦", "down_proj": "⑧", "resid_mlp": "⑨",
    },
    "decode": {
        "attn_norm": "⑩", "q_proj": "①", "k_proj": "①", "v_proj": "①", "rope": "②",
        "kv_append": "③", "attention": "④", "o_proj": "⑤", "resid_attn": "⑥", "mlp_norm": "⑥",
        "gate_proj": "⑦", "up_proj": "⑦", "swiglu": "⑧", "down_proj": "⑨", "resid_mlp": "⑩",
    },
}


def attention_costs(cfg: ModelConfig, phase: Phase, nbytes: int,
                    score_bytes: int | None = None) -> tuple[OpCost, OpCost]:
    """Unfused and fused (flash) attention for one layer; same FLOPs, different traffic.

    FLOPs (seed): QK^T and P.V are 2*b*t*s*h*d each, scaling + softmax 4*b*t*s*h, total
    4*b*t*s*h*(d + 1). Masked-out scores are counted (the seed counts T^2, and XLA computes the
    full masked matrix); a causal flash kernel that skips blocks does about half in prefill.
    score_bytes: bytes per element of the scores S (default nbytes, as the seed; jdecode's XLA
    attention keeps S in f32 and casts the probabilities P back to the model dtype).
    """
    b, t, s = phase.batch, phase.q_len, phase.kv_len
    h, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q_el, kv_el, o_el = b * t * h * d, b * s * k * d, b * t * h * d  # Q, one of K/V, output
    score_el = b * t * s * h  # one [t, s] matrix per query head
    flops = 2 * 2 * b * t * s * h * d + SOFTMAX_FLOPS * score_el
    seed = _SEED_NUMBERS["prefill" if phase.name == "prefill" else "decode"]["attention"]
    # Unfused: QK^T reads Q, K, writes S; softmax reads S, writes P; P.V reads P, V, writes O.
    sb = nbytes if score_bytes is None else score_bytes
    # textbook (the seed's 2 x O(BTND + BT^2N)): each matmul's K or V and its score matrix
    unfused = _op("attention", "attention", seed, flops,
                  read=(q_el + 2 * kv_el) * nbytes + score_el * (sb + nbytes),
                  written=o_el * nbytes + score_el * (sb + nbytes),
                  textbook=2 * kv_el * nbytes + score_el * (sb + nbytes))
    # Flash: scores stay in SRAM; Q, K, V are read once and O written once.
    flash = _op("attention_flash", "attention", seed, flops,
                read=(q_el + 2 * kv_el) * nbytes, written=o_el * nbytes)
    return unfused, flash


def layer_costs(cfg: ModelConfig, phase: Phase, dtype: str, attention: str = "unfused",
                score_bytes: int | None = None) -> list[OpCost]:
    """The operators of one decoder layer, in execution order.

    Args:
      cfg: model shape. phase: the step (prefill / decode / verify) with its b, t, s.
      dtype: weights, activations and KV cache dtype (sets bytes per element).
      attention: "unfused" or "flash": which attention row is summed; the other is marked
        `alternative`.
      score_bytes: bytes per attention score in HBM (default: dtype's; see attention_costs).
    Returns:
      One OpCost per operator; per_layer is True for all of them.
    """
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"attention={attention!r}: choose one of {', '.join(ATTENTION_IMPLS)}")
    nb = _bytes_per_element(dtype)
    seeds = _SEED_NUMBERS["prefill" if phase.name == "prefill" else "decode"]
    m = phase.batch * phase.q_len  # rows through every linear layer: the seed's BT (decode: B)
    e, f = cfg.hidden_size, cfg.intermediate_size
    hd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    bias = cfg.qkv_bias

    def norm(name):  # RMSNorm: reads x [m, e] and its weight [e], writes [m, e]
        return _elementwise(name, seeds[name], RMSNORM_FLOPS * m * e, m * e + e, m * e, nb)

    def residual(name):  # x + y: reads both [m, e], writes [m, e]
        return _elementwise(name, seeds[name], m * e, 2 * m * e, m * e, nb)

    unfused, flash = attention_costs(cfg, phase, nb, score_bytes)
    rope_el = m * (hd + kd)  # RoPE rotates q [m, h*d] and k [m, k*d]
    return [
        norm("attn_norm"),
        _linear("q_proj", seeds["q_proj"], m, e, hd, nb, bias),
        _linear("k_proj", seeds["k_proj"], m, e, kd, nb, bias),
        _linear("v_proj", seeds["v_proj"], m, e, kd, nb, bias),
        # reads q, k and the cos/sin tables [m, d/2] each; writes rotated q, k
        _elementwise("rope", seeds["rope"], ROPE_FLOPS * rope_el, rope_el + m * cfg.head_dim,
                     rope_el, nb),
        # the new k, v [m, k*d] are written into the cache (the seed's Cache(k, v), no FLOPs)
        _op("kv_append", "cache", seeds["kv_append"], 0, 2 * m * kd * nb, 2 * m * kd * nb),
        dataclasses.replace(unfused, alternative=attention != "unfused"),
        dataclasses.replace(flash, alternative=attention != "flash"),
        _linear("o_proj", seeds["o_proj"], m, hd, e, nb),
        residual("resid_attn"),
        norm("mlp_norm"),
        _linear("gate_proj", seeds["gate_proj"], m, e, f, nb),
        _linear("up_proj", seeds["up_proj"], m, e, f, nb),
        _elementwise("swiglu", seeds["swiglu"], SWIGLU_FLOPS * m * f, 2 * m * f, m * f, nb),
        _linear("down_proj", seeds["down_proj"], m, f, e, nb),
        residual("resid_mlp"),
    ]


def model_costs(cfg: ModelConfig, phase: Phase, dtype: str, attention: str = "unfused",
                score_bytes: int | None = None) -> list[OpCost]:
    """All operators of one step: the layer's rows (x num_layers) plus embedding and head.

    The embedding gather reads b*t rows of the table; the final norm and the LM head run on
    `phase.head_tokens` rows per sequence (the model gathers the last prompt position before
    the head in prefill). The seed's tables cover the layer only.
    """
    nb = _bytes_per_element(dtype)
    m = phase.batch * phase.q_len
    m_head = phase.batch * phase.head_tokens
    e, v = cfg.hidden_size, cfg.vocab_size
    return [
        _op("embed", "other", "", 0, m * e * nb, m * e * nb, per_layer=False),
        *layer_costs(cfg, phase, dtype, attention, score_bytes),
        _elementwise("final_norm", "", RMSNORM_FLOPS * m_head * e, m_head * e + e, m_head * e,
                     nb, per_layer=False),
        _linear("lm_head", "", m_head, e, v, nb, per_layer=False),
    ]


def _bytes_per_element(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def weight_bytes(cfg: ModelConfig, dtype: str) -> float:
    """Bytes of all parameters at `dtype` (embedding counted once when tied)."""
    e, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd, kd = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = e * (hd + 2 * kd) + hd * e + 3 * e * f + 2 * e
    per_layer += (hd + 2 * kd) if cfg.qkv_bias else 0
    embeds = v * e * (1 if cfg.tie_word_embeddings else 2)
    return float((cfg.num_layers * per_layer + embeds + e) * _bytes_per_element(dtype))


def kv_cache_bytes(cfg: ModelConfig, batch: int, context: int, dtype: str) -> float:
    """Bytes of K and V for `batch` sequences of `context` tokens across all layers."""
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim
    return float(batch * context * per_token * _bytes_per_element(dtype))
