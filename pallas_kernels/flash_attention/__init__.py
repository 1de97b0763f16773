"""Flash attention: Pallas Triton and Hopper (Mosaic GPU) kernels, plain-jnp reference, tuning."""

from pallas_kernels.flash_attention.kernel import flash_attention, hopper_flash_attention
from pallas_kernels.flash_attention.reference import attention_xla, flash_attention_reference

__all__ = [
    "attention_xla",
    "flash_attention",
    "flash_attention_reference",
    "hopper_flash_attention",
]
