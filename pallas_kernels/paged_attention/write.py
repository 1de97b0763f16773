"""Writes this step's new K/V rows into the page pool, in place (Pallas kernel or XLA scatter)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.flash_attention.tuning import resolve_interpret
from pallas_kernels.paged_attention.reference import write_kv_pages_reference


def _write_kernel(slot_ref, k_new_ref, v_new_ref, k_in_ref, v_in_ref, k_ref, v_ref, *, page_size):
    """One token: k_new [K, D] -> k_pages[slot // page, slot % page]; negative slot = skip."""
    del k_in_ref, v_in_ref  # aliased with k_ref / v_ref: the pool is updated in place
    slot = slot_ref[()]
    keep = slot >= 0
    # A padding slot is clamped to 0 so the address is valid; the mask suppresses the store.
    s = jnp.maximum(slot, 0)
    page, off = s // page_size, s % page_size
    k = k_new_ref[...]
    v = v_new_ref[...]
    mask = jnp.full(k.shape, keep)
    plgpu.store(k_ref.at[page, off], k.astype(k_ref.dtype), mask=mask)
    plgpu.store(v_ref.at[page, off], v.astype(v_ref.dtype), mask=mask)


def write_kv_pages(
    k_pages: jax.Array,
    v_pages: jax.Array,
    k_new: jax.Array,
    v_new: jax.Array,
    slot_mapping: jax.Array,
    *,
    interpret: bool | None = None,
    impl: str = "pallas",
) -> tuple[jax.Array, jax.Array]:
    """Stores this step's keys and values into their page slots.

    The pool is aliased to the output: donate k_pages/v_pages to the enclosing jit (as the
    engine does with its cache) or XLA copies the whole pool first.

    Args:
      k_pages, v_pages: [P, page_size, K, D] one layer's page pool.
      k_new, v_new: [N, K, D] new rows (cast to the pool's dtype).
      slot_mapping: [N] int32 slot = page * page_size + offset for each row; negative values
        mark padding rows, which are skipped. Slots must be distinct.
      interpret: Pallas interpreter; None = interpret unless the backend is GPU.
      impl: "pallas" (one program per row, in-place stores), or "xla"/"reference" (scatter).

    Returns:
      (k_pages, v_pages) updated.
    """
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(
            f"k_pages {k_pages.shape} and v_pages {v_pages.shape} must both be "
            "[num_pages, page_size, num_kv_heads, head_dim]"
        )
    n = slot_mapping.shape[0] if slot_mapping.ndim == 1 else -1
    want = (n, *k_pages.shape[2:])
    if k_new.shape != want or v_new.shape != want:
        raise ValueError(
            f"k_new {k_new.shape} and v_new {v_new.shape} must be {want} to match slot_mapping "
            f"{slot_mapping.shape} and k_pages {k_pages.shape}"
        )
    if impl in ("xla", "reference"):
        return write_kv_pages_reference(k_pages, v_pages, k_new, v_new, slot_mapping)
    if impl != "pallas":
        raise ValueError(f"impl={impl!r}; expected 'pallas', 'xla' or 'reference'")
    num_kv = k_pages.shape[2]
    if num_kv & (num_kv - 1):
        raise ValueError(
            f"impl='pallas' needs a power-of-2 kv head count, got {k_pages.shape}; use impl='xla'"
        )
    return _write_call(
        k_pages,
        v_pages,
        k_new,
        v_new,
        slot_mapping.astype(jnp.int32),
        interpret=resolve_interpret(interpret),
    )


@functools.partial(jax.jit, static_argnames=("interpret",))
def _write_call(k_pages, v_pages, k_new, v_new, slot_mapping, *, interpret):
    n = slot_mapping.shape[0]
    pool = pl.BlockSpec(k_pages.shape, lambda i: (0, 0, 0, 0))
    row = pl.BlockSpec((None, *k_new.shape[1:]), lambda i: (i, 0, 0))
    return pl.pallas_call(
        functools.partial(_write_kernel, page_size=k_pages.shape[1]),
        grid=(n,),
        in_specs=[pl.BlockSpec((None,), lambda i: (i,)), row, row, pool, pool],
        out_specs=[pool, pool],
        out_shape=[jax.ShapeDtypeStruct(k_pages.shape, k_pages.dtype)] * 2,
        input_output_aliases={3: 0, 4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=1, num_stages=1),
        interpret=interpret,
        name="write_kv_pages",
    )(slot_mapping, k_new, v_new, k_pages, v_pages)
