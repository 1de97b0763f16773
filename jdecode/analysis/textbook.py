"""The seed lecture's efficiency table, reproduced: B=8, T=1024, H=4096, D=128 on an A100-80G.

The seed gives each operator's intensity as an order formula (its tables for full and
incremental decoding); `seed_formulas` evaluates them, and `textbook_summary` derives the same
headline numbers from the per-operator cost model under the "textbook" byte convention.
"""

from __future__ import annotations

from jdecode.analysis.costs import decode_phase, prefill_phase
from jdecode.analysis.hardware import seed_a100
from jdecode.analysis.roofline import PhaseReport, analyze
from jdecode.config import ModelConfig

TEXTBOOK_BATCH = 8
TEXTBOOK_SEQ = 1024
# H=4096, N=32, D=128 is LLaMA-7B's shape; the seed names the FFN width H' without a number,
# so it is LLaMA-7B's 11008 (and its 32 layers and 32000-token vocabulary).
TEXTBOOK_CONFIG = ModelConfig(
    vocab_size=32000, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
    head_dim=128, intermediate_size=11008, max_position_embeddings=2048, dtype="float16")


def seed_formulas(b: int = TEXTBOOK_BATCH, t: int = TEXTBOOK_SEQ, h: int = 4096,
                  h_ffn: int = 11008, d: int = 128) -> dict[str, list[tuple[str, str, str, float]]]:
    """The seed's intensity column, O(.) constants set to 1, evaluated at (b, t, h, h', d).

    Returns:
      {"prefill": [...], "decode": [...]}, each a list of (number, operator, formula, value).
      The cache append (decode formula 3) has no intensity in the seed and is left out.
    """
    linear = 1 / (1 / h + 1 / (b * t))  # Q,K,V = XW: 2BTH^2 / O(BTH + H^2)
    ffn = 1 / (1 / h + 1 / h_ffn + 1 / (b * t))  # G,U = X[W^G, W^U]; X = DW^D
    add_norm = 1 / (1 + 1 / (b * t))
    attn = (1 + 1 / d) / (1 / d + 1 / t)  # (4BT^2ND + 4BT^2N) / O(BTND + BT^2N)
    d_linear = 1 / (1 / h + 1 / b)  # T -> 1 outside attention
    d_ffn = 1 / (1 / h + 1 / h_ffn + 1 / b)
    d_add_norm = 1 / (1 + 1 / b)
    d_attn = (1 + 1 / d) / (1 + 1 / d + 1 / t)
    return {
        "prefill": [
            ("①", "Q,K,V = XW^{Q,K,V}", "1/(1/H + 1/BT)", linear),
            ("②", "Q,K = RoPE(Q,K)", "O(1)", 1.0),
            ("③", "O = Attn(Q,K,V)", "(1 + 1/D)/(1/D + 1/T)", attn),
            ("④", "X = OW^O", "1/(1/H + 1/BT)", linear),
            ("⑤", "X = Add&Norm(X)", "1/(1 + 1/BT)", add_norm),
            ("⑥", "G,U = X[W^G,W^U]", "1/(1/H + 1/H' + 1/BT)", ffn),
            ("⑦", "D = Swish(G)·U", "O(1)", 1.0),
            ("⑧", "X = DW^D", "1/(1/H + 1/H' + 1/BT)", ffn),
            ("⑨", "X = Add&Norm(X)", "1/(1 + 1/BT)", add_norm),
        ],
        "decode": [
            ("①", "q,k,v = xW^{Q,K,V}", "1/(1/H + 1/B)", d_linear),
            ("②", "q,k = RoPE(q,k)", "O(1)", 1.0),
            ("④", "o = Attn(q,K,V)", "(1 + 1/D)/(1 + 1/D + 1/T)", d_attn),
            ("⑤", "x = oW^O", "1/(1/H + 1/B)", d_linear),
            ("⑥", "x = Add&Norm(x)", "1/(1 + 1/B)", d_add_norm),
            ("⑦", "g,u = x[W^G,W^U]", "1/(1/H + 1/H' + 1/B)", d_ffn),
            ("⑧", "d = Swish(g)·u", "O(1)", 1.0),
            ("⑨", "x = dW^D", "1/(1/H + 1/H' + 1/B)", d_ffn),
            ("⑩", "x = Add&Norm(x)", "1/(1 + 1/B)", d_add_norm),
        ],
    }


# Which cost-model row each seed formula describes, and the bytes the formula counts: ①③④
# count what the operator reads (the "textbook" convention), while the FFN formulas ⑥⑧ follow
# the seed's general matmul rule 1/(1/n + 1/m + 1/p), which also counts the output written
# (the "full" convention). The steps in between are O(1).
FORMULA_ROWS = {
    "prefill": {"①": ("q_proj", "textbook"), "③": ("attention", "textbook"),
                "④": ("o_proj", "textbook"), "⑥": ("gate_proj", "full"),
                "⑧": ("down_proj", "full")},
    "decode": {"①": ("q_proj", "textbook"), "④": ("attention", "textbook"),
               "⑤": ("o_proj", "textbook"), "⑦": ("gate_proj", "full"),
               "⑨": ("down_proj", "full")},
}
CONVENTION_WORDS = {"textbook": "reads only", "full": "reads + writes"}
NUMBERING_NOTE = (
    "Circled numbers are the seed's step numbers, one list per phase: decode inserts step ③ "
    "(K, V = Cache(k, v), the cache append), so from attention on every decode step is one "
    "higher than the same step in prefill (attention is ③ in prefill, ④ in decode). A layer's "
    "input norm is the previous layer's last Add&Norm (⑨ in prefill, ⑩ in decode).")


def formula_checks() -> dict[str, dict[str, tuple[float, str]]]:
    """The cost model's intensity for each seed formula that names one operator, under the
    byte convention the formula uses: {phase: {number: (intensity, convention)}}."""
    reports = {conv: dict(zip(("prefill", "decode"), textbook_reports(conv)))
               for conv in ("textbook", "full")}
    return {phase: {number: (reports[conv][phase].row(row).intensity, conv)
                    for number, (row, conv) in rows.items()}
            for phase, rows in FORMULA_ROWS.items()}


def textbook_reports(convention: str = "textbook", attention: str = "unfused"
                     ) -> tuple[PhaseReport, PhaseReport]:
    """Prefill (B=8, T=1024) and decode (B=8, context 1024) on the seed's A100 reading."""
    hw = seed_a100()
    kw = {"dtype": "float16", "convention": convention, "attention": attention,
          "model": "textbook"}
    return (analyze(TEXTBOOK_CONFIG, prefill_phase(TEXTBOOK_BATCH, TEXTBOOK_SEQ), hw, **kw),
            analyze(TEXTBOOK_CONFIG, decode_phase(TEXTBOOK_BATCH, TEXTBOOK_SEQ), hw, **kw))


def textbook_summary(convention: str = "textbook") -> dict:
    """The seed's headline intensities from the cost model, with bounds and both ridges.

    Linear is the Q/K/V/O projection (seed formulas 1 and 4, 2730.7 in prefill); the FFN
    projections are listed beside it. "Other" is the seed's O(1) order value (formula 5,
    1/(1 + 1/BT)); the model's own elementwise intensities are given as a range.
    """
    prefill, decode = textbook_reports(convention)
    hw = prefill.hardware
    ridges = hw.ridges("float16")
    seed = {p: {n: v for n, _, _, v in rows} for p, rows in seed_formulas().items()}

    def entry(rep: PhaseReport, name: str) -> dict:
        r = rep.row(name)
        return {"intensity": r.intensity, "bound": r.bound}

    def other_range(rep: PhaseReport) -> list[float]:
        vals = [r.intensity for r in rep.rows if r.op.group == "other" and r.op.per_layer]
        return [min(vals), max(vals)]

    flash = prefill.row("attention_flash")

    def order(value: float) -> dict:  # the seed's O(1) figure against the same ridge
        return {"intensity": value, "bound": "compute" if value > prefill.ridge else "memory"}

    return {
        "convention": convention,
        "ridge_gib": ridges["GiB"], "ridge_gb": ridges["GB"],
        "prefill": {
            "linear": entry(prefill, "q_proj"),
            "ffn_gate_up": entry(prefill, "gate_proj"), "ffn_down": entry(prefill, "down_proj"),
            # counting the output too, as the seed's formulas ⑥⑧ do
            "ffn_with_writes": entry(textbook_reports("full")[0], "gate_proj"),
            "attention": entry(prefill, "attention"),
            "attention_flash": {"intensity": flash.intensity, "bound": flash.bound},
            "other": {**order(seed["prefill"]["⑤"]), "model_range": other_range(prefill)},
        },
        "decode": {
            "linear": entry(decode, "q_proj"),
            "ffn_gate_up": entry(decode, "gate_proj"), "ffn_down": entry(decode, "down_proj"),
            "attention": entry(decode, "attention"),
            "other": {**order(seed["decode"]["⑥"]), "model_range": other_range(decode)},
        },
        "seed_formulas": seed,
    }


def textbook_conclusions(summary: dict) -> list[str]:
    """What the table implies, in plain sentences."""
    p, d = summary["prefill"], summary["decode"]
    gib, gb = summary["ridge_gib"], summary["ridge_gb"]
    return [
        (f"A100-80G ridge: 312e12 / (2039 x 2^30) = {gib:.1f} FLOP/byte (the seed's reading); "
         f"with decimal GB/s, 312e12 / 2039e9 = {gb:.1f}."),
        (f"Prefill linear layers at {p['linear']['intensity']:.1f} sit far above the ridge: "
         "full decoding is compute-bound."),
        (f"Prefill attention at {p['attention']['intensity']:.1f} < {gib:.1f} ridge -> unfused "
         "attention is mildly memory-bound even in prefill, which is why FlashAttention helps: "
         "fused, the scores never reach HBM and its intensity rises to "
         f"{p['attention_flash']['intensity']:.1f} (compute-bound)."),
        (f"FFN gate/up reads X [BT, H] and W [H, H'] and writes G, U [BT, H']: counting what it "
         f"reads, as for the linear layers, gives {p['ffn_gate_up']['intensity']:.1f}; the "
         "seed's formulas 6 and 8, 1/(1/H + 1/H' + 1/BT), also count the output written, which "
         f"gives {p['ffn_with_writes']['intensity']:.1f} (--convention full). Either way far "
         "above the ridge: compute-bound."),
        (f"Other operators (RoPE, Add&Norm, SwiGLU) are O(1) ~ {p['other']['intensity']:.1f} "
         "FLOP/byte: always memory-bound."),
        (f"Decode linear at {d['linear']['intensity']:.1f} and attention at "
         f"{d['attention']['intensity']:.1f} are far below the ridge: incremental decoding is "
         "bandwidth-bound (the memory wall)."),
    ]
