"""`jdecode train ...`: training commands (registered by `jdecode/cli.py` as the `train` app)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Train the learned parts of decoding methods.")


@app.command("draft")
def train_draft(
    out: Annotated[str, typer.Option("--out", help="output directory (resumes if it holds "
                                     "checkpoints)")] = "drafts/smollm2-135m-draft",
    model: Annotated[str, typer.Option("--model", "-m", help="target: name, HF dir or .gguf")
                     ] = "smollm2-135m",
    num_layers: Annotated[int, typer.Option(help="target layers kept, spread over its depth")
                          ] = 4,
    steps: int = 200, batch_size: int = 4, seq_len: int = 128, learning_rate: float = 1e-3,
    warmup_steps: int = 20,
    new_tokens: Annotated[int, typer.Option(help="tokens the target writes per training "
                                            "prompt")] = 96,
    temperature: Annotated[float, typer.Option(help="sampling temperature of that text")] = 0.7,
    samples_per_prompt: Annotated[int, typer.Option(help="continuations per training prompt "
                                                    "(the first greedy, the rest sampled)")] = 1,
    gen_batch: Annotated[int, typer.Option(help="prompts per generate call for the corpus")
                         ] = 16,
    time_budget: Annotated[float | None, typer.Option(
        "--time-budget", help="seconds of training at most (checkpoints and saves the draft; "
        "the schedule shrinks to the steps that fit)")] = None,
    save_dtype: Annotated[str | None, typer.Option(help="dtype of the saved draft layers, "
                                                   "e.g. bfloat16 (default: the target's)")
                          ] = None,
    num_prompts: Annotated[int | None, typer.Option(help="use this many of the training "
                                                    "prompts, spread over their kinds")] = None,
    val_fraction: Annotated[float, typer.Option(help="share of the prompts held out: held-out "
                                               "KL and top-1 agreement every --eval-every "
                                               "steps (0 = none)")] = 0.1,
    eval_every: int = 250,
    max_epochs: Annotated[float, typer.Option(help="warn when the steps pass over the corpus "
                                              "more often than this")] = 10.0,
    seed: int = 0, checkpoint_every: int = 50, dtype: str = "float32",
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Distil a draft model for speculative decoding from the target (KL on its own text)."""
    from rich.console import Console

    from jdecode.io.registry import load
    from jdecode.training.distill import DistillConfig, train_draft_model
    from jdecode.training.prompts import train_prompts

    err = Console(stderr=True)
    try:
        dc = DistillConfig(num_layers=num_layers, steps=steps, batch_size=batch_size,
                           seq_len=seq_len, learning_rate=learning_rate,
                           warmup_steps=warmup_steps, new_tokens=new_tokens,
                           temperature=temperature, seed=seed, checkpoint_every=checkpoint_every,
                           samples_per_prompt=samples_per_prompt, gen_batch=gen_batch,
                           time_budget_s=time_budget, save_dtype=save_dtype,
                           val_fraction=val_fraction, eval_every=eval_every,
                           max_epochs=max_epochs)
        target = load(model, dtype=dtype)
        prompts = train_prompts()
        if num_prompts is not None:  # an even spread keeps chat, code and summarization
            prompts = prompts[::max(1, len(prompts) // num_prompts)][:num_prompts]
        draft, losses = train_draft_model(target, out, dc, prompts=prompts,
                                          progress=not as_json)
    except (FileNotFoundError, ValueError) as e:
        err.print(f"[bold red]error:[/] {e}")
        raise typer.Exit(2) from None
    summary = {"out": out, "target": model, "draft_layers": draft.cfg.num_layers,
               "steps_run": len(losses), "first_kl": losses[0] if losses else None,
               "last_kl": losses[-1] if losses else None}
    meta = json.loads((Path(out) / "draft.json").read_text())
    summary.update({key: meta.get(key) for key in ("train_rows", "val_rows", "epochs_done",
                                                    "last_eval")})
    if as_json:
        print(json.dumps(summary))
    else:
        ev = summary["last_eval"]
        held = (f" | held-out KL {ev['val_kl']:.3f}, top-1 {ev['val_top1']:.3f} (train rows: "
                f"{ev['train_kl']:.3f}, {ev['train_top1']:.3f})" if ev else "")
        err.print(f"draft saved to {out} | KL {summary['first_kl']} -> {summary['last_kl']} | "
                  f"{summary['epochs_done']:.1f} epochs over {summary['train_rows']} rows{held} "
                  f"| use: jdecode generate --method speculative --draft {out}")
