"""The fully non-autoregressive case: Jacobi decoding with the block set to the whole answer.

For each answer length L, every prompt is decoded at batch 1 with `jacobi` (block_size L - 1:
the prefill gives the first token, the block holds the rest) and L tokens (EOS ignored); the
decode steps are the iterations the whole answer took to converge. Autoregressive decoding
needs L - 1. With --weights, the consistency-trained model (`cllm`, a NEW model) is measured the
same way beside the target. Writes OUT/convergence.json and OUT/convergence.png.

    python scripts/nar_convergence.py --model smollm2-135m --lengths 16,32,64 --out out/
"""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from jdecode.data.prompts import eval_prompts
from jdecode.decoding import generate as generate_mod
from jdecode.decoding.generate import Generator, next_pow2
from jdecode.decoding.sampling import SamplingParams
from jdecode.io.registry import load
from jdecode.provenance import environment


def measure(gen: Generator, prompts: list[list[int]], length: int) -> list[int]:
    """Iterations (decode steps) to converge the whole L-token answer, per prompt."""
    sp = SamplingParams(max_new_tokens=length, ignore_eos=True)
    out = []
    for ids in prompts:
        (r,) = gen.generate(ids, sp)
        assert r.stats["num_tokens"] == length, r.stats
        out.append(int(r.stats["decode_steps"]))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    lengths = sorted({r["length"] for r in rows})
    ax.plot(lengths, [n - 1 for n in lengths], "k:", label="autoregressive (L - 1 steps)")
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        ax.errorbar([r["length"] for r in mine], [r["mean_iterations"] for r in mine],
                    yerr=[[r["mean_iterations"] - r["min_iterations"] for r in mine],
                          [r["max_iterations"] - r["mean_iterations"] for r in mine]],
                    marker="o", capsize=3, label=f"Jacobi, whole answer: {model}")
    ax.set(xlabel="answer length L (tokens)", ylabel="iterations to converge",
           title="Fully non-autoregressive Jacobi decoding")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--lengths", default="16,32,64", help="answer lengths L, comma-separated")
    ap.add_argument("--prompts-per-set", type=int, default=4,
                    help="prompts of each of chat, code and summarization")
    ap.add_argument("--init", default="repeat", help="the block's guesses: pad, repeat, ngram")
    ap.add_argument("--weights", default=None,
                    help="also measure this consistency-trained model (a cllm artifact)")
    ap.add_argument("--workers", type=int, default=4, help="parallel compiles (one per length)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    model = load(args.model, dtype=args.dtype)
    tok = model.tokenizer
    by_kind: dict[str, list[str]] = {}
    for kind, text in eval_prompts():
        by_kind.setdefault(kind, []).append(text)
    texts = [t for ts in by_kind.values()
             for t in ts[::max(1, len(ts) // args.prompts_per_set)][:args.prompts_per_set]]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": t}]))
               for t in texts]
    # One prompt bucket: one compile per length, not one per length and bucket.
    generate_mod.MIN_PROMPT_BUCKET = next_pow2(max(map(len, prompts)))
    models = {"target": ("jacobi", {})}
    if args.weights:
        models["cllm (new model)"] = ("cllm", {"weights": args.weights})
    lengths = [int(x) for x in args.lengths.split(",")]
    gens = {(name, length): Generator(model, method=method, options={
        "block_size": length - 1, "init": args.init, **extra})
        for name, (method, extra) in models.items() for length in lengths}
    # Compile every length first, in threads (XLA compiles outside the GIL); the fine-tune's
    # executables are the target's (same shapes), so they load from the persistent cache.
    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(lambda key: measure(gens[key], prompts[:1], key[1]), gens))
    rows = []
    for (name, length), gen in gens.items():
        iters = measure(gen, prompts, length)
        rows.append({"model": name, "length": length, "iterations": iters,
                     "mean_iterations": float(np.mean(iters)),
                     "min_iterations": int(min(iters)), "max_iterations": int(max(iters)),
                     "tokens_per_iteration": (length - 1) / float(np.mean(iters))})
        print(f"{name:>18} L={length:4d}: {np.mean(iters):6.1f} iterations "
              f"(min {min(iters)}, max {max(iters)}; autoregressive {length - 1})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "nar_convergence", "model": args.model, "dtype": args.dtype,
              "init": args.init, "weights": args.weights, "prompts": len(prompts),
              "rows": rows, **environment()}
    (out / "convergence.json").write_text(json.dumps(record, indent=1))
    plot(rows, out / "convergence.png")


if __name__ == "__main__":
    main()
