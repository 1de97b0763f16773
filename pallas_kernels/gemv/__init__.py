"""Skinny matmul (few rows x weight matrix) that streams the weights at HBM rate."""

from pallas_kernels.gemv.kernel import gemv, gemv_reference

__all__ = ["gemv", "gemv_reference"]
