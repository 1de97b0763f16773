"""Flash attention: Pallas Triton kernel, plain-jnp reference and block-size tuning."""

from pallas_kernels.flash_attention.kernel import flash_attention
from pallas_kernels.flash_attention.reference import attention_xla, flash_attention_reference

__all__ = ["attention_xla", "flash_attention", "flash_attention_reference"]
