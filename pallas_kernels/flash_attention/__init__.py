"""Flash attention: Pallas Triton kernel, plain-jnp reference and block-size tuning."""

from pallas_kernels.flash_attention.kernel import flash_attention
from pallas_kernels.flash_attention.reference import flash_attention_reference

__all__ = ["flash_attention", "flash_attention_reference"]
