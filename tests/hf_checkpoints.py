"""Tiny random HF checkpoints (saved as safetensors) for parity tests; built with CPU torch."""

from __future__ import annotations

from pathlib import Path

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-5, rope_theta=10000.0)

VARIANTS = {
    "llama_gqa": ("LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama_tied": ("LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "llama3_rope": ("LlamaForCausalLM", dict(
        tie_word_embeddings=False, num_key_value_heads=1,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=64))),
    "qwen2": ("Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
    "mistral": ("MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=None)),
    # A window much shorter than the parity sequence (24-token prompt + 32 new), so the mask
    # that drops old keys is exercised in prefill and in every decode step.
    "mistral_swa": ("MistralForCausalLM", dict(tie_word_embeddings=False, sliding_window=8)),
}


def make_checkpoint(variant: str, out_dir: Path, seed: int = 0):
    """Creates, randomizes (norms too) and saves a tiny checkpoint; returns the torch model."""
    import torch
    import transformers

    arch, extra = VARIANTS[variant]
    kwargs = {**COMMON, **extra}
    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    config = config_cls(**kwargs)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial norm weights
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (0.5 if p.dim() == 2 and "embed" in name else
                                               1.0 / p.shape[-1] ** 0.5))
    model.save_pretrained(out_dir, safe_serialization=True)
    return model
